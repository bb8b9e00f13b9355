"""Tests for the Flax NNX LLaMA model in ``subspace_jax.models.llama``."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import subspace_jax as sj
from subspace_jax import models
from subspace_jax.models import llama
from reference_llama import numpy_forward, numpy_rope


def _tiny(**overrides) -> llama.LlamaConfig:
  return llama.get_config("tiny", **overrides)


def _n_params(tree) -> int:
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def _random_tokens(seed: int, shape, vocab: int) -> jax.Array:
  return jax.random.randint(jax.random.key(seed), shape, 0, vocab, jnp.int32)


@pytest.fixture(scope="module")
def tiny_split():
  """(graphdef, params, jitted forward) of the unscanned tiny model."""
  graphdef, params = llama.init(_tiny(), seed=0)
  forward = jax.jit(lambda p, t: llama.apply(graphdef, p, t))
  return graphdef, params, forward


# --------------------------------------------------------------------------
# Configs
# --------------------------------------------------------------------------


def test_get_config_unknown_name_lists_known_names():
  with pytest.raises(ValueError) as info:
    llama.get_config("llama_3b")
  message = str(info.value)
  assert "\n" not in message
  assert "llama_3b" in message
  for name in llama.CONFIGS:
    assert name in message


def test_get_config_applies_overrides():
  cfg = llama.get_config("llama_60m", scan_layers=True, dtype=jnp.bfloat16)
  assert cfg.scan_layers and cfg.dtype == jnp.bfloat16
  assert cfg.hidden_size == 512 and cfg.num_layers == 8
  assert not llama.CONFIGS["llama_60m"].scan_layers  # original untouched


def test_config_rejects_hidden_not_divisible_by_heads():
  with pytest.raises(ValueError, match="not divisible") as info:
    _tiny(num_heads=5)
  assert "\n" not in str(info.value)


# --------------------------------------------------------------------------
# Parameter counts and logical axes
# --------------------------------------------------------------------------


@pytest.mark.parametrize("scan_layers", [False, True])
def test_param_count_matches_built_tiny_model(scan_layers):
  cfg = _tiny(scan_layers=scan_layers)
  _, params = llama.init(cfg)
  assert _n_params(params) == llama.param_count(cfg)


def _nominal_size(name: str) -> float:
  number, unit = re.fullmatch(r"llama_(\d+)([mb])", name).groups()
  return float(number) * (1e6 if unit == "m" else 1e9)


# The brief's accepted ranges for the two largest models; others: name +-15%.
_EXPLICIT_RANGES = {"llama_1b": (1.0e9, 1.4e9), "llama_7b": (6.5e9, 7.0e9)}


@pytest.mark.parametrize(
    "name", [n for n in llama.CONFIGS if n.startswith("llama_")])
def test_named_config_sizes_match_their_names(name):
  cfg = llama.get_config(name)
  abstract = nnx.eval_shape(lambda: llama.Llama(cfg, rngs=nnx.Rngs(0)))
  counted = _n_params(nnx.state(abstract, nnx.Param))
  analytic = llama.param_count(cfg)
  print(f"{name}: {counted:,} parameters ({counted / 1e6:.1f}M)")
  assert counted == analytic
  nominal = _nominal_size(name)
  low, high = _EXPLICIT_RANGES.get(name, (0.85 * nominal, 1.15 * nominal))
  assert low <= counted <= high, (name, counted)


def test_scanned_abstract_model_has_same_count():
  cfg = llama.get_config("llama_60m", scan_layers=True)
  abstract = nnx.eval_shape(lambda: llama.Llama(cfg, rngs=nnx.Rngs(0)))
  kernel = abstract.layers.mlp.up_proj.kernel
  assert kernel.shape == (8, 512, 1376)
  assert _n_params(nnx.state(abstract, nnx.Param)) == llama.param_count(cfg)


_BLOCK_AXES = {
    "attn/q_proj/kernel": ("embed", "heads"),
    "attn/k_proj/kernel": ("embed", "heads"),
    "attn/v_proj/kernel": ("embed", "heads"),
    "attn/o_proj/kernel": ("heads", "embed"),
    "mlp/gate_proj/kernel": ("embed", "mlp"),
    "mlp/up_proj/kernel": ("embed", "mlp"),
    "mlp/down_proj/kernel": ("mlp", "embed"),
    "attn_norm/scale": ("norm",),
    "mlp_norm/scale": ("norm",),
}
_TOP_AXES = {
    "embed/embedding": ("vocab", "embed"),
    "final_norm/scale": ("norm",),
    "lm_head/kernel": ("embed", "vocab"),
}


@pytest.mark.parametrize("scan_layers", [False, True])
def test_every_weight_has_expected_logical_axes(scan_layers):
  cfg = _tiny(scan_layers=scan_layers)
  _, params = llama.init(cfg)
  expected = dict(_TOP_AXES)
  if scan_layers:
    expected.update({f"layers/{k}": ("layers",) + v
                     for k, v in _BLOCK_AXES.items()})
  else:
    for i in range(cfg.num_layers):
      expected.update({f"layers/{i}/{k}": v for k, v in _BLOCK_AXES.items()})
  axes = llama.param_logical_axes(params)
  assert axes == expected
  sizes = {"vocab": cfg.vocab_size, "embed": cfg.hidden_size,
           "mlp": cfg.intermediate_size, "heads": cfg.hidden_size,
           "norm": cfg.hidden_size, "layers": cfg.num_layers}
  for path, var in nnx.to_flat_state(params):
    names = axes["/".join(map(str, path))]
    assert var[...].shape == tuple(sizes[n] for n in names), path
  # The annotations are what nnx's own sharding helpers read.
  spec = nnx.get_partition_spec(params)
  assert tuple(spec["lm_head"]["kernel"].get_value()) == ("embed", "vocab")
  up = spec["layers"]["mlp"]["up_proj"] if scan_layers else (
      spec["layers"][0]["mlp"]["up_proj"])
  assert tuple(up["kernel"].get_value()) == expected[
      "layers/mlp/up_proj/kernel" if scan_layers
      else "layers/0/mlp/up_proj/kernel"]


@pytest.mark.parametrize("scan_layers", [False, True])
def test_views_and_decay_mask_follow_the_logical_axes(scan_layers):
  """Projected: every matrix without a 'vocab' axis (the attention and MLP
  kernels); decayed: every weight but the norm scales; for any config."""
  cfg = _tiny(scan_layers=scan_layers, num_layers=3)
  params = llama.ModelDef(cfg).init(0)
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  names = ["/".join(str(k.key) for k in path) for path, _ in flat]
  views = llama.views()
  projected = {n for n, (path, x) in zip(names, flat) if views(path, x) is not None}
  kernels = {n for n in names if re.search(r"(attn|mlp)/\w+_proj/kernel$", n)}
  assert projected == kernels and len(kernels) == (7 if scan_layers else 21)
  for n, (path, x) in zip(names, flat):
    if n in kernels:
      assert views(path, x) == sj.MatrixView(batch_dims=int(scan_layers), row_dims=1)
  decayed = {n for n, d in zip(names, jax.tree.leaves(llama.decay_mask(params))) if d}
  assert decayed == {n for n in names if not n.endswith("norm/scale")}
  # A part of the tree (one block) follows the same rules.
  block = llama.ModelDef(_tiny()).init(0)["layers"][0]
  mask = llama.decay_mask(block)
  assert not mask["attn_norm"]["scale"] and mask["mlp"]["up_proj"]["kernel"]
  assert views((jax.tree_util.DictKey("lm_head"), jax.tree_util.DictKey("kernel")),
               params["lm_head"]["kernel"]) is None


def test_registry_finds_the_model_of_a_config():
  entry = models.for_config(_tiny())
  assert entry is models.MODELS["llama"] and entry.model_def is llama.ModelDef
  assert entry.get_config("tiny") == llama.get_config("tiny")
  with pytest.raises(TypeError, match="no model .* takes a dict config"):
    models.for_config({})


# --------------------------------------------------------------------------
# Scan / remat equivalence
# --------------------------------------------------------------------------


def _unstack_into(unscanned: llama.Llama, scanned: llama.Llama) -> None:
  """Copies the stacked weights of ``scanned`` into the per-layer model."""
  stacked = dict(nnx.to_flat_state(nnx.state(scanned, nnx.Param)))
  copied = []
  for path, _ in nnx.to_flat_state(nnx.state(unscanned, nnx.Param)):
    if path[0] == "layers":
      value = stacked[("layers",) + path[2:]][...][path[1]]
    else:
      value = stacked[path][...]
    copied.append((path, value))
  nnx.update(unscanned, nnx.from_flat_state(copied))


def test_scanned_model_matches_unscanned_with_same_weights():
  scanned = llama.Llama(_tiny(scan_layers=True), rngs=nnx.Rngs(1))
  unscanned = llama.Llama(_tiny(scan_layers=False), rngs=nnx.Rngs(2))
  tokens = _random_tokens(0, (2, 24), 256)
  logits = lambda m: nnx.jit(lambda mod, t: mod(t))(m, tokens)
  reference = logits(scanned)
  assert not np.allclose(reference, logits(unscanned), atol=1e-4)
  _unstack_into(unscanned, scanned)
  np.testing.assert_allclose(logits(unscanned), reference, rtol=1e-5,
                             atol=1e-5)


@pytest.mark.parametrize("remat", [True, "full", "dots", "names"])
@pytest.mark.parametrize("scan_layers", [False, True])
def test_remat_gives_same_loss_and_gradients(scan_layers, remat):
  """A policy changes what is recomputed, not the result (float32: the
  recomputation may fuse differently, a few ulp)."""
  tokens = _random_tokens(1, (2, 16), 256)
  results = []
  for policy in ("none", remat):
    graphdef, params = llama.init(_tiny(scan_layers=scan_layers,
                                        remat=policy), seed=3)
    loss = lambda p: llama.cross_entropy_loss(
        llama.apply(graphdef, p, tokens[:, :-1]), tokens[:, 1:])
    results.append(jax.jit(jax.value_and_grad(loss))(params))
  (loss0, grads0), (loss1, grads1) = results
  np.testing.assert_allclose(loss0, loss1, rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4,
                                                       atol=1e-6),
               grads0, grads1)


def test_remat_policies_trade_memory_for_recomputation():
  """XLA's count of a scanned step's temporaries: keeping everything needs
  the most, keeping the projections' outputs less, the block input alone the
  least; True means "full" and a bad name is refused."""
  cfg = lambda remat: _tiny(scan_layers=True, remat=remat, hidden_size=128,
                            intermediate_size=512, num_layers=4,
                            max_seq_len=128)
  tokens = jax.ShapeDtypeStruct((8, 128), jnp.int32)
  temps = {}
  for policy in ("none", "dots", "full"):
    graphdef, params = llama.init(cfg(policy), seed=0)
    loss = lambda p, t: llama.cross_entropy_loss(
        llama.apply(graphdef, p, t), t)
    temps[policy] = sj.memory.compiled(jax.grad(loss), params,
                                       tokens).temporaries
  assert temps["full"] < temps["dots"] < temps["none"], temps
  assert cfg(True).remat == "full" and cfg(False).remat == "none"
  with pytest.raises(ValueError, match="remat must be one of none, full"):
    cfg("some")


# --------------------------------------------------------------------------
# RoPE, causality, input checks
# --------------------------------------------------------------------------


def test_rope_matches_numpy_reference():
  rng = np.random.default_rng(0)
  x = rng.standard_normal((2, 7, 3, 16)).astype(np.float32)
  positions = np.array([0, 1, 2, 5, 9, 30, 63])
  cos, sin = llama.rope_cos_sin(jnp.asarray(positions), 16, 10000.0)
  got = llama.apply_rope(jnp.asarray(x), cos, sin)
  np.testing.assert_allclose(got, numpy_rope(x, positions, 10000.0),
                             rtol=1e-5, atol=1e-5)


def test_rope_scores_depend_only_on_relative_position():
  rng = np.random.default_rng(1)
  q = jnp.asarray(rng.standard_normal((1, 1, 1, 32)), jnp.float32)
  k = jnp.asarray(rng.standard_normal((1, 1, 1, 32)), jnp.float32)

  def score(m: int, n: int) -> float:
    rot = lambda x, p: llama.apply_rope(
        x, *llama.rope_cos_sin(jnp.array([p]), 32, 10000.0))
    return float(jnp.sum(rot(q, m) * rot(k, n)))

  assert score(7, 3) == pytest.approx(score(24, 20), rel=1e-4)
  assert score(7, 3) != pytest.approx(score(7, 5), rel=1e-2)


def _perturbed(params, seed: int = 9):
  """Random norm scales and larger weights, so that every part matters."""
  keys = iter(jax.random.split(jax.random.key(seed), 64))
  return jax.tree.map(
      lambda x: x * 5.0 + 0.3 * jax.random.normal(next(keys), x.shape), params)


def test_forward_matches_numpy_reference(tiny_split):
  _, params, forward = tiny_split
  params = _perturbed(params)
  tokens = np.asarray(_random_tokens(8, (2, 12), 256))
  expected = numpy_forward(params, tokens, _tiny())
  got = forward(params, jnp.asarray(tokens))
  assert float(np.std(expected)) > 0.1
  np.testing.assert_allclose(got, expected, rtol=2e-4, atol=2e-4)


def _f64(**overrides) -> llama.LlamaConfig:
  """A tiny float64 model: compared with the float64 NumPy reference it
  agrees to ~1e-12 (logits of std ~10), so 1e-9 checks the computation
  itself, not float32 rounding. Float64 attention is the model's own
  einsum path (_attention_f64); the float32 runs check the
  jax.nn.dot_product_attention path with the tolerance _F32_TOL."""
  return _tiny(dtype=jnp.float64, param_dtype=jnp.float64, **overrides)


# Float32 logits against the float64 reference: GQA's sharper attention on
# the perturbed weights amplifies float32 rounding to ~1.5e-3 (logits of std
# ~12); a wrong head grouping or a mask leak is off by O(1).
_F32_TOL = dict(rtol=0, atol=1e-2)


@pytest.mark.parametrize("overrides", [
    dict(num_kv_heads=2),
    dict(num_kv_heads=1, scan_layers=True, tie_embeddings=True),
], ids=["gqa", "mqa-scanned-tied"])
def test_grouped_query_attention_matches_numpy_reference(overrides):
  with jax.enable_x64(True):
    cfg = _f64(**overrides)
    params = _perturbed(llama.ModelDef(cfg).init(0))
    _check_against_reference(cfg, params, dict(rtol=1e-9, atol=1e-9))
  cfg = _tiny(**overrides)
  params = _perturbed(llama.ModelDef(cfg).init(0))
  _check_against_reference(cfg, params, _F32_TOL)


def _check_against_reference(cfg, params, tolerance):
  shapes = {k: v["kernel"].shape for k, v in (
      params["layers"][0] if not cfg.scan_layers else params["layers"]
  )["attn"].items()}
  kv = cfg.kv_heads * cfg.head_dim
  assert shapes["k_proj"][-1] == shapes["v_proj"][-1] == kv < cfg.hidden_size
  assert ("lm_head" in params) != cfg.tie_embeddings
  assert sum(x.size for x in jax.tree.leaves(params)) == llama.param_count(cfg)
  tokens = np.asarray(_random_tokens(8, (2, 12), 256))
  got = jax.jit(lambda p, t: llama.forward(cfg, p, t))(params, tokens)
  assert got.dtype == cfg.dtype
  np.testing.assert_allclose(got, numpy_forward(params, tokens, cfg),
                             **tolerance)


def test_config_refuses_kv_heads_that_do_not_divide_heads():
  with pytest.raises(ValueError, match="num_kv_heads=3 must be a positive "
                     "int that divides num_heads=4") as info:
    _tiny(num_kv_heads=3)
  assert "\n" not in str(info.value)


def _packed_segments() -> np.ndarray:
  """Row 0: examples of 5, 4 and 3 tokens; row 1: one of 7, then padding
  (its own segment)."""
  return np.array([[1] * 5 + [2] * 4 + [3] * 3,
                   [4] * 7 + [0] * 5], np.int32)


def test_packed_segments_do_not_attend_across_boundaries():
  """The logits of each packed example are those of the example alone (an
  independent check: RoPE depends on relative positions only), and match
  the NumPy reference with its segment mask (float64, as above)."""
  # Both layouts (the segment ids pass through the scan as a constant),
  # one of each dtype to keep the test short.
  with jax.enable_x64(True):
    _check_packed(_f64(num_kv_heads=2, scan_layers=True),
                  dict(rtol=1e-9, atol=1e-9))
  _check_packed(_tiny(num_kv_heads=2), _F32_TOL)


def _check_packed(cfg, tolerance):
  params = _perturbed(llama.ModelDef(cfg).init(0))
  segments = _packed_segments()
  tokens = np.asarray(_random_tokens(3, segments.shape, 256))
  fwd = jax.jit(lambda p, t, s: llama.forward(cfg, p, t, s))
  got = np.asarray(fwd(params, tokens, segments))
  np.testing.assert_allclose(got, numpy_forward(params, tokens, cfg, segments),
                             **tolerance)
  alone = jax.jit(lambda p, t: llama.forward(cfg, p, t))
  for row in range(2):
    for seg in np.unique(segments[row]):
      cols = np.flatnonzero(segments[row] == seg)
      single = np.asarray(alone(params, tokens[row:row + 1, cols]))[0]
      np.testing.assert_allclose(got[row, cols], single, **tolerance)
  # Without the segments the later examples do see the earlier ones.
  unpacked = np.asarray(fwd(params, tokens, np.zeros_like(segments)))
  assert not np.allclose(unpacked[0, 5:], got[0, 5:], atol=1e-3)
  np.testing.assert_allclose(unpacked, np.asarray(alone(params, tokens)),
                             **tolerance)


def test_loss_mask_and_segments_in_the_model_loss():
  """ModelDef.loss with "segment_ids" and "loss_mask": the mean NumPy
  cross-entropy of the reference logits over the masked targets."""
  with jax.enable_x64(True):
    _check_masked_loss(_f64(num_kv_heads=2))


def _check_masked_loss(cfg):
  model = llama.ModelDef(cfg)
  params = _perturbed(model.init(0))
  segments = _packed_segments()
  tokens = np.asarray(_random_tokens(4, (2, 13), 256))
  mask = (np.random.default_rng(0).random(segments.shape) > 0.5).astype(
      np.float64)
  batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
           "segment_ids": segments, "loss_mask": mask}
  logits = numpy_forward(params, batch["inputs"], cfg, segments)
  shifted = logits - logits.max(-1, keepdims=True)
  log_probs = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
  nll = -np.take_along_axis(log_probs, batch["targets"][..., None], -1)[..., 0]
  got = jax.jit(model.loss)(params, batch)
  np.testing.assert_allclose(got, (nll * mask).sum() / mask.sum(), rtol=1e-10)
  plain = jax.jit(model.loss)(params, {"inputs": batch["inputs"],
                                       "targets": batch["targets"]})
  assert not np.isclose(float(plain), float(got), rtol=1e-3)
  with pytest.raises(ValueError, match="segment_ids shape"):
    model.loss(params, dict(batch, segment_ids=segments[:, :5]))


def test_changing_a_token_does_not_change_earlier_logits(tiny_split):
  _, params, forward = tiny_split
  tokens = _random_tokens(2, (2, 32), 256)
  t = 13
  edited = tokens.at[:, t].set((tokens[:, t] + 1) % 256)
  before, after = forward(params, tokens), forward(params, edited)
  np.testing.assert_array_equal(before[:, :t], after[:, :t])
  assert not np.allclose(before[:, t:], after[:, t:], atol=1e-6)


def test_rejects_non_integer_tokens(tiny_split):
  graphdef, params, _ = tiny_split
  with pytest.raises(TypeError, match="integer") as info:
    llama.apply(graphdef, params, jnp.zeros((1, 8), jnp.float32))
  assert "\n" not in str(info.value)


def test_rejects_sequence_longer_than_max_seq_len(tiny_split):
  graphdef, params, _ = tiny_split
  with pytest.raises(ValueError, match="max_seq_len") as info:
    llama.apply(graphdef, params, jnp.zeros((1, 65), jnp.int32))
  assert "\n" not in str(info.value)


def test_rejects_tokens_that_are_not_2d(tiny_split):
  graphdef, params, _ = tiny_split
  with pytest.raises(ValueError, match="batch, seq"):
    llama.apply(graphdef, params, jnp.zeros((8,), jnp.int32))


def test_forward_shape_and_dtype(tiny_split):
  _, params, forward = tiny_split
  logits = forward(params, _random_tokens(3, (3, 20), 256))
  assert logits.shape == (3, 20, 256) and logits.dtype == jnp.float32
  assert np.all(np.isfinite(logits))


# --------------------------------------------------------------------------
# bfloat16
# --------------------------------------------------------------------------


def test_bf16_compute_runs_and_stays_close_to_fp32(tiny_split):
  graphdef32, params, forward32 = tiny_split
  graphdef16, _ = llama.init(_tiny(dtype=jnp.bfloat16))
  tokens = _random_tokens(4, (2, 32), 256)
  forward16 = lambda p, t: llama.apply(graphdef16, p, t)
  assert "bf16" in str(jax.make_jaxpr(forward16)(params, tokens))
  logits16 = jax.jit(forward16)(params, tokens)
  logits32 = forward32(params, tokens)
  assert logits16.dtype == jnp.float32
  assert np.all(np.isfinite(logits16))
  scale = float(jnp.std(logits32))
  assert float(jnp.max(jnp.abs(logits16 - logits32))) < 0.1 * scale
  assert not np.array_equal(logits16, logits32)


@pytest.mark.parametrize("scan_layers", [False, True])
def test_bf16_params(scan_layers):
  cfg = _tiny(dtype=jnp.bfloat16, param_dtype=jnp.bfloat16,
              scan_layers=scan_layers)
  graphdef, params = llama.init(cfg)
  dtypes = {x.dtype for x in jax.tree.leaves(params)}
  assert dtypes == {jnp.dtype(jnp.bfloat16)}
  logits = jax.jit(lambda p, t: llama.apply(graphdef, p, t))(
      params, _random_tokens(5, (2, 16), 256))
  assert logits.dtype == jnp.float32 and np.all(np.isfinite(logits))


def test_attention_takes_cudnn_on_a_gpu_only_where_it_applies():
  choose = llama.attention_implementation
  assert choose(jnp.bfloat16, 128, False, "gpu") == "cudnn"
  assert choose(jnp.float16, 64, False, "gpu") == "cudnn"
  assert choose(jnp.float32, 64, False, "gpu") is None      # cuDNN: 16-bit only
  assert choose(jnp.bfloat16, 256, False, "gpu") is None    # head too wide
  assert choose(jnp.bfloat16, 60, False, "gpu") is None     # not a multiple of 8
  assert choose(jnp.bfloat16, 64, True, "gpu") is None      # packed segments
  for platform in ("cpu", "tpu"):
    assert choose(jnp.bfloat16, 64, False, platform) is None


def test_attention_traced_for_a_gpu_still_runs_elsewhere(monkeypatch):
  """A step traced with a GPU as the default backend holds the cuDNN kernel
  only in its CUDA branch: on the CPU it computes XLA's attention (here
  the cuDNN branch cannot even be traced, and falls back)."""
  q, k, v = (jax.random.normal(jax.random.key(i), (2, 16, 4, 64), jnp.bfloat16)
             for i in range(3))
  want = jax.nn.dot_product_attention(q, k, v, is_causal=True)
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  got = jax.jit(lambda *a: llama._dot_product_attention(*a, None))(q, k, v)  # pylint: disable=protected-access
  np.testing.assert_array_equal(np.asarray(got, np.float32),
                                np.asarray(want, np.float32))


# --------------------------------------------------------------------------
# Loss and training
# --------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_lm_head_backward_works_in_the_operands_dtype(dtype):
  """The lm_head's custom backward (float32 logits, no float32 kernel
  gradient): with float32 operands it is autodiff's, to float32 rounding of
  the same sums; with bfloat16 ones it differs from the float32-cotangent
  product only by rounding the cotangent (relative 2**-9) and the result
  (2**-9), so by at most 2**-8 of the sum of |x|·|ct| per entry."""
  k = jax.random.split(jax.random.key(0), 3)
  x = jax.random.normal(k[0], (2, 5, 16), jnp.float32)
  w = jax.random.normal(k[1], (16, 24), jnp.float32)
  ct = jax.random.normal(k[2], (2, 5, 24), jnp.float32)
  mm = lambda x, w: llama._wide_output_matmul(x, w, jnp.dtype(jnp.float32))
  out, vjp = jax.vjp(mm, x.astype(dtype), w.astype(dtype))
  assert out.dtype == jnp.float32
  dx, dw = vjp(ct)
  assert dx.dtype == dw.dtype == dtype
  xs, ws = np.asarray(x.astype(dtype), np.float64), np.asarray(
      w.astype(dtype), np.float64)
  ref_dx = np.einsum("bso,io->bsi", np.asarray(ct, np.float64), ws)
  ref_dw = np.einsum("bsi,bso->io", xs, np.asarray(ct, np.float64))
  size_dx = np.einsum("bso,io->bsi", np.abs(np.asarray(ct)), np.abs(ws))
  size_dw = np.einsum("bsi,bso->io", np.abs(xs), np.abs(np.asarray(ct)))
  rel = 2.0**-8 if dtype == jnp.bfloat16 else 1e-6
  np.testing.assert_array_less(np.abs(np.asarray(dx, np.float64) - ref_dx),
                               rel * size_dx + 1e-30)
  np.testing.assert_array_less(np.abs(np.asarray(dw, np.float64) - ref_dw),
                               rel * size_dw + 1e-30)
  if dtype == jnp.float32:  # Exactly what autodiff of the plain matmul does.
    plain = lambda x, w: jnp.matmul(x, w, preferred_element_type=jnp.float32)
    auto = jax.vjp(plain, x, w)[1](ct)
    np.testing.assert_allclose(dx, auto[0], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(dw, auto[1], rtol=1e-6, atol=1e-6)


def test_cross_entropy_loss_matches_numpy():
  rng = np.random.default_rng(2)
  logits = rng.standard_normal((2, 5, 11)).astype(np.float32)
  targets = rng.integers(0, 11, (2, 5))
  mask = (rng.random((2, 5)) > 0.4).astype(np.float32)
  shifted = logits - logits.max(-1, keepdims=True)
  log_probs = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
  nll = -np.take_along_axis(log_probs, targets[..., None], -1)[..., 0]
  got = llama.cross_entropy_loss(jnp.asarray(logits), jnp.asarray(targets))
  assert got.dtype == jnp.float32
  np.testing.assert_allclose(got, nll.mean(), rtol=1e-5)
  got_masked = llama.cross_entropy_loss(
      jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(mask))
  np.testing.assert_allclose(got_masked, (nll * mask).sum() / mask.sum(),
                             rtol=1e-5)
  with pytest.raises(ValueError, match="does not match"):
    llama.cross_entropy_loss(jnp.asarray(logits), jnp.asarray(targets[:, :4]))


def test_functional_adamw_lowers_loss():
  graphdef, params = llama.init(_tiny(), seed=0)
  tokens = _random_tokens(6, (4, 33), 256)
  inputs, targets = tokens[:, :-1], tokens[:, 1:]
  tx = optax.adamw(3e-3)
  opt_state = tx.init(params)

  def loss_fn(p):
    return llama.cross_entropy_loss(llama.apply(graphdef, p, inputs), targets)

  @jax.jit
  def step(p, s):
    loss, grads = jax.value_and_grad(loss_fn)(p)
    updates, s = tx.update(grads, s, p)
    return optax.apply_updates(p, updates), s, loss

  first = float(loss_fn(params))
  for _ in range(20):
    params, opt_state, _ = step(params, opt_state)
  last = float(jax.jit(loss_fn)(params))
  assert last < first - 1.0, (first, last)


def test_nnx_optimizer_lowers_loss_scanned_remat():
  model = llama.Llama(_tiny(scan_layers=True, remat=True), rngs=nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, optax.adamw(3e-3), wrt=nnx.Param)
  tokens = _random_tokens(7, (4, 33), 256)
  inputs, targets = tokens[:, :-1], tokens[:, 1:]

  def loss_fn(m):
    return llama.cross_entropy_loss(m(inputs), targets)

  @nnx.jit
  def step(m, opt):
    loss, grads = nnx.value_and_grad(loss_fn)(m)
    opt.update(m, grads)
    return loss

  losses = [float(step(model, optimizer)) for _ in range(20)]
  final = float(nnx.jit(loss_fn)(model))
  assert final < losses[0] - 1.0, (losses[0], final)
