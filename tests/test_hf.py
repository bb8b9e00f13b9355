"""Tests of subspace_jax.models.hf: Hugging Face LLaMA checkpoints in and out.

Checkpoints are written here from NumPy arrays with the ``safetensors``
package in the Hugging Face layout (tensor names, ``(out, in)`` weights), so
the mapping is checked without torch: the model's logits against the NumPy
reference LLaMA fed from the same arrays. The comparison with transformers
itself is benchmarks/hf_parity.py.
"""

import dataclasses
import json
import pathlib

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

safetensors_numpy = pytest.importorskip("safetensors.numpy")

from reference_llama import numpy_forward
from subspace_jax import factored
from subspace_jax.models import hf, llama
from subspace_jax.training import sharding as shd

VOCAB, HIDDEN, MLP, HEADS, LAYERS = 96, 32, 48, 4, 2


def _config_json(**changes) -> dict:
  config = {
      "architectures": ["LlamaForCausalLM"], "model_type": "llama",
      "vocab_size": VOCAB, "hidden_size": HIDDEN, "intermediate_size": MLP,
      "num_attention_heads": HEADS, "num_key_value_heads": 2,
      "num_hidden_layers": LAYERS, "max_position_embeddings": 32,
      "rms_norm_eps": 1e-5, "rope_theta": 500.0, "hidden_act": "silu",
      "tie_word_embeddings": False, "torch_dtype": "float32",
  }
  config.update(changes)
  return config


def _hf_arrays(config: dict, dtype=np.float32, seed: int = 0) -> dict:
  """Random weights in the Hugging Face layout, scaled so that every part
  of the network moves the logits."""
  rng = np.random.default_rng(seed)
  d, f = config["hidden_size"], config["intermediate_size"]
  hd = d // config["num_attention_heads"]
  kv = config["num_key_value_heads"] * hd

  def w(out, inp):
    return rng.standard_normal((out, inp)) * 2 / np.sqrt(inp)

  def norm():
    return 1 + 0.3 * rng.standard_normal(d)

  arrays = {"model.embed_tokens.weight":
            rng.standard_normal((config["vocab_size"], d)),
            "model.norm.weight": norm()}
  if not config["tie_word_embeddings"]:
    arrays["lm_head.weight"] = w(config["vocab_size"], d)
  for i in range(config["num_hidden_layers"]):
    p = f"model.layers.{i}."
    arrays.update({
        p + "self_attn.q_proj.weight": w(d, d),
        p + "self_attn.k_proj.weight": w(kv, d),
        p + "self_attn.v_proj.weight": w(kv, d),
        p + "self_attn.o_proj.weight": w(d, d),
        p + "mlp.gate_proj.weight": w(f, d),
        p + "mlp.up_proj.weight": w(f, d),
        p + "mlp.down_proj.weight": w(d, f),
        p + "input_layernorm.weight": norm(),
        p + "post_attention_layernorm.weight": norm(),
    })
  return {k: v.astype(dtype) for k, v in arrays.items()}


def _write(directory: pathlib.Path, config: dict, arrays: dict,
           files: int = 1) -> pathlib.Path:
  """A checkpoint directory, written with the safetensors package: one
  model.safetensors, or ``files`` files and an index."""
  directory.mkdir(parents=True, exist_ok=True)
  (directory / "config.json").write_text(json.dumps(config))
  names = list(arrays)
  if files == 1:
    safetensors_numpy.save_file(arrays, directory / "model.safetensors",
                                metadata={"format": "pt"})
    return directory
  weight_map = {}
  for k, part in enumerate(np.array_split(np.array(names), files)):
    name = f"model-{k + 1:05d}-of-{files:05d}.safetensors"
    safetensors_numpy.save_file({n: arrays[n] for n in part},
                                directory / name, metadata={"format": "pt"})
    weight_map.update({n: name for n in part})
  (directory / "model.safetensors.index.json").write_text(
      json.dumps({"metadata": {}, "weight_map": weight_map}))
  return directory


def _reference_params(arrays: dict, config: dict) -> dict:
  """The arrays in the reference LLaMA's layout: (in, out) kernels, the
  norms by their names in the model, one dict per layer."""
  a = {k: np.asarray(v, np.float64) for k, v in arrays.items()}
  layers = {}
  for i in range(config["num_hidden_layers"]):
    g = lambda name: a[f"model.layers.{i}.{name}"]
    layers[i] = {
        "attn": {n: {"kernel": g(f"self_attn.{n}.weight").T}
                 for n in ("q_proj", "k_proj", "v_proj", "o_proj")},
        "mlp": {n: {"kernel": g(f"mlp.{n}.weight").T}
                for n in ("gate_proj", "up_proj", "down_proj")},
        "attn_norm": {"scale": g("input_layernorm.weight")},
        "mlp_norm": {"scale": g("post_attention_layernorm.weight")},
    }
  params = {"embed": {"embedding": a["model.embed_tokens.weight"]},
            "final_norm": {"scale": a["model.norm.weight"]}, "layers": layers}
  if "lm_head.weight" in a:
    params["lm_head"] = {"kernel": a["lm_head.weight"].T}
  return params


def _tokens(seed: int = 1) -> np.ndarray:
  return np.random.default_rng(seed).integers(0, VOCAB, (2, 11))


# --------------------------------------------------------------------------
# Loading: the mapping against the NumPy reference
# --------------------------------------------------------------------------


@pytest.mark.parametrize("case", ["gqa", "tied-scanned-sharded"])
def test_load_matches_numpy_reference(tmp_path, case):
  """Logits of a loaded checkpoint against the float64 NumPy LLaMA fed the
  same arrays: float64 throughout, so they agree to ~1e-12 (logits of std
  ~5); 1e-9 fails on any mapping error (a missing transpose, swapped
  norms, a wrong head grouping)."""
  tied = case.startswith("tied")
  config = _config_json(tie_word_embeddings=tied,
                        num_key_value_heads=1 if tied else 2)
  arrays = _hf_arrays(config)
  path = _write(tmp_path / "ckpt", config, arrays, files=3 if tied else 1)
  with jax.enable_x64(True):
    cfg, params = hf.load(path, param_dtype="float64", dtype="float64",
                          scan_layers=tied)
    assert (cfg.kv_heads, cfg.tie_embeddings, cfg.rope_theta, cfg.norm_eps,
            cfg.max_seq_len) == (config["num_key_value_heads"], tied, 500.0,
                                 1e-5, 32)
    assert jax.tree.structure(params) == jax.tree.structure(
        jax.eval_shape(lambda: llama.ModelDef(cfg).init(0)))
    tokens = _tokens()
    got = np.asarray(jax.jit(lambda p, t: llama.forward(cfg, p, t))(
        params, tokens))
  expected = numpy_forward(_reference_params(arrays, config), tokens,
                           dataclasses.replace(cfg, scan_layers=False))
  assert np.std(expected) > 1
  np.testing.assert_allclose(got, expected, rtol=1e-9, atol=1e-9)


def test_dtype_on_load(tmp_path):
  """A bfloat16 checkpoint loads as bfloat16 (its torch_dtype), or as
  float32 on request: the same values, exactly (bf16 -> f32 is exact)."""
  config = _config_json(torch_dtype="bfloat16")
  arrays = _hf_arrays(config, dtype=ml_dtypes.bfloat16)
  path = _write(tmp_path / "ckpt", config, arrays)
  cfg16, p16 = hf.load(path)
  cfg32, p32 = hf.load(path, param_dtype="float32")
  assert cfg16.param_dtype == jnp.bfloat16 and cfg32.param_dtype == jnp.float32
  assert {x.dtype for x in jax.tree.leaves(p16)} == {jnp.dtype(jnp.bfloat16)}
  assert {x.dtype for x in jax.tree.leaves(p32)} == {jnp.dtype(jnp.float32)}
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(
      np.asarray(a, np.float32), np.asarray(b)), p16, p32)
  np.testing.assert_array_equal(
      np.asarray(p32["layers"][1]["mlp"]["down_proj"]["kernel"]),
      arrays["model.layers.1.mlp.down_proj.weight"].astype(np.float32).T)


def test_load_into_a_sharded_mesh(tmp_path):
  """On an 8-device fsdp x tensor mesh each weight is created in the
  trainer's sharding (each device reading its own slice) with the values of
  a single-device load."""
  config = _config_json()
  path = _write(tmp_path / "ckpt", config, _hf_arrays(config), files=2)
  mesh = shd.make_mesh(1, 4, 2)
  cfg, sharded = hf.load(path, mesh=mesh, scan_layers=True)
  _, single = hf.load(path, scan_layers=True)
  model = llama.ModelDef(cfg)
  expected = shd.tree_shardings(single, model.logical_axes, mesh)
  for got, want, ref in zip(jax.tree.leaves(sharded), jax.tree.leaves(expected),
                            jax.tree.leaves(single)):
    assert got.sharding == want
    np.testing.assert_array_equal(np.asarray(got), np.asarray(ref))
  kernel = sharded["layers"]["mlp"]["up_proj"]["kernel"]  # (L, embed, mlp)
  assert kernel.sharding.shard_shape(kernel.shape) == (LAYERS, HIDDEN // 4,
                                                       MLP // 2)


# --------------------------------------------------------------------------
# Saving and the round trip
# --------------------------------------------------------------------------


@pytest.mark.parametrize("dtype,scan,shard_bytes", [
    ("bfloat16", False, hf.DEFAULT_SHARD_BYTES),
    ("float32", True, 20_000),
])
def test_round_trip_is_bit_identical(tmp_path, dtype, scan, shard_bytes):
  """load -> save -> load gives the same bits; the saved files hold the
  original tensors under their names (read back with the safetensors
  package), and config.json the original settings."""
  config = _config_json(torch_dtype=dtype, tie_word_embeddings=scan)
  arrays = _hf_arrays(config, dtype=np.dtype(jnp.dtype(dtype)))
  source = _write(tmp_path / "in", config, arrays)
  cfg, params = hf.load(source, scan_layers=scan)
  written = hf.save(tmp_path / "out", cfg, params,
                    max_shard_bytes=shard_bytes)
  cfg2, params2 = hf.load(tmp_path / "out", scan_layers=scan)
  assert cfg2 == cfg
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(
      np.asarray(a).view(np.uint8), np.asarray(b).view(np.uint8)),
      params, params2)
  files = [f for f in written if f.endswith(".safetensors")]
  assert (len(files) > 1) == (shard_bytes < hf.DEFAULT_SHARD_BYTES)
  if len(files) > 1:
    index = json.loads((tmp_path / "out" / hf.INDEX_FILE).read_text())
    assert sorted(set(index["weight_map"].values())) == sorted(files)
  saved = {}
  for f in files:
    saved.update(safetensors_numpy.load_file(tmp_path / "out" / f))
  assert saved.keys() == arrays.keys()
  for name, array in arrays.items():
    np.testing.assert_array_equal(saved[name], array)
  written_config = json.loads((tmp_path / "out" / "config.json").read_text())
  for key in ("vocab_size", "hidden_size", "intermediate_size",
              "num_attention_heads", "num_key_value_heads",
              "num_hidden_layers", "max_position_embeddings", "rms_norm_eps",
              "rope_theta", "tie_word_embeddings", "torch_dtype"):
    assert written_config[key] == config[key], key


def test_save_in_another_dtype_and_a_model_of_this_package(tmp_path):
  """A model made here (MHA, float32) saved as bfloat16: the tensors are
  the rounded weights, and config.json says bfloat16 and carries the
  extra entries."""
  cfg = llama.get_config("tiny", num_layers=1)
  params = llama.ModelDef(cfg).init(0)
  hf.save(tmp_path, cfg, params, dtype="bfloat16",
          extra_config={"bos_token_id": 257, "eos_token_id": 258})
  saved = safetensors_numpy.load_file(tmp_path / "model.safetensors")
  np.testing.assert_array_equal(
      saved["model.layers.0.self_attn.k_proj.weight"],
      np.asarray(params["layers"][0]["attn"]["k_proj"]["kernel"]).T.astype(
          ml_dtypes.bfloat16))
  written = json.loads((tmp_path / "config.json").read_text())
  assert written["torch_dtype"] == "bfloat16"
  assert written["num_key_value_heads"] == cfg.num_heads
  assert (written["bos_token_id"], written["eos_token_id"]) == (257, 258)
  cfg2, _ = hf.load(tmp_path, param_dtype="float32")
  assert cfg2 == cfg


def test_model_mode_saves_the_merged_weights(tmp_path):
  """FactoredParams are saved as W + P·B, P being the projection of the
  optimizer state's subproblem (drawn here for the whole leaf, which the
  model never does, and multiplied in float64)."""
  cfg = llama.get_config("tiny", num_layers=2, scan_layers=True)
  weights = llama.ModelDef(cfg).init(0)
  subspace = factored.Subspace.for_params(
      weights, rank=4, update_gap=10, views=llama.views())
  params = subspace.init(weights)
  keys = iter(jax.random.split(jax.random.key(3), 64))
  params = params._replace(low=jax.tree.map(
      lambda b: jax.random.normal(next(keys), b.shape, b.dtype), params.low))
  opt_state = factored.scale_by_factored(subspace=subspace).init(
      subspace.trainable(params))
  with pytest.raises(ValueError, match="pass subspace= and opt_state="):
    hf.save(tmp_path, cfg, params)
  hf.save(tmp_path, cfg, params, subspace=subspace, opt_state=opt_state)
  _, loaded = hf.load(tmp_path, scan_layers=True)
  projections = subspace.projections(params, opt_state)
  flat_w = subspace.treedef.flatten_up_to(params.weights)
  flat_b = subspace.treedef.flatten_up_to(params.low)
  merged = 0
  for w, b, p, plan, got in zip(flat_w, flat_b, projections, subspace.plans,
                                subspace.treedef.flatten_up_to(loaded)):
    w = np.asarray(w, np.float64)
    if plan is None:
      np.testing.assert_array_equal(np.asarray(got), w)
      continue
    delta = np.asarray(p, np.float64) @ np.asarray(b, np.float64)
    if plan.transpose:
      delta = np.swapaxes(delta, -1, -2)
    expected = w + delta
    assert np.abs(delta).max() > 1e-2
    # float32 W + P·B against float64: a few float32 ulps.
    np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-5, atol=1e-6)
    merged += 1
  assert merged == 7


# --------------------------------------------------------------------------
# What is refused
# --------------------------------------------------------------------------


@pytest.mark.parametrize("changes,words", [
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}},
     "rope_scaling type 'llama3' is not supported"),
    ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4}},
     "rope_parameters type 'yarn' is not supported"),
    ({"attention_bias": True}, "attention_bias true is not supported"),
    ({"mlp_bias": True}, "mlp_bias true is not supported"),
    ({"model_type": "mistral"}, "model_type 'mistral' is not supported"),
    ({"architectures": ["LlamaForSequenceClassification"]},
     "architectures ['LlamaForSequenceClassification'] is not supported"),
    ({"hidden_act": "gelu"}, "hidden_act 'gelu' is not supported"),
    ({"head_dim": 16}, "head_dim 16 is not hidden_size / num_attention_heads"),
    ({"num_key_value_heads": 3}, "num_kv_heads=3 must be a positive int that"),
    ({"torch_dtype": "int8"}, "torch_dtype 'int8' is not supported"),
])
def test_unsupported_configurations_are_refused(tmp_path, changes, words):
  config = _config_json(**changes)
  path = _write(tmp_path, config, _hf_arrays(_config_json()))
  with pytest.raises(ValueError) as info:
    hf.load(path)
  message = str(info.value)
  assert words in message and "\n" not in message
  assert "config.json" in message


def _damaged(tmp_path, damage) -> str:
  config = _config_json()
  arrays = _hf_arrays(config)
  path = _write(tmp_path, config, arrays)
  damage(path, arrays)
  with pytest.raises(ValueError) as info:
    hf.load(path)
  assert "\n" not in str(info.value)
  return str(info.value)


def test_damaged_or_foreign_checkpoints_are_refused(tmp_path):
  def rewrite(arrays_change):
    def damage(path, arrays):
      arrays_change(arrays)
      safetensors_numpy.save_file(arrays, path / "model.safetensors")
    return damage

  bias = rewrite(lambda a: a.update(
      {"model.layers.0.self_attn.q_proj.bias": np.zeros(HIDDEN, np.float32)}))
  assert "'model.layers.0.self_attn.q_proj.bias' is a bias" in _damaged(
      tmp_path / "a", bias)
  missing = rewrite(lambda a: a.pop("model.layers.1.mlp.up_proj.weight"))
  assert "no tensor 'model.layers.1.mlp.up_proj.weight'" in _damaged(
      tmp_path / "b", missing)
  wrong = rewrite(lambda a: a.update(
      {"model.norm.weight": np.ones(HIDDEN + 1, np.float32)}))
  assert "'model.norm.weight' has shape [33], config.json implies [32]" in (
      _damaged(tmp_path / "c", wrong))
  extra = rewrite(lambda a: a.update({"score.weight": np.ones(2, np.float32)}))
  assert "unexpected tensor 'score.weight'" in _damaged(tmp_path / "d", extra)

  def truncate(path, arrays):
    f = path / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
  assert "truncated or damaged" in _damaged(tmp_path / "e", truncate)

  def garbage(path, arrays):
    (path / "model.safetensors").write_bytes(b"\x10" * 64)
  assert "not a safetensors file" in _damaged(tmp_path / "f", garbage)


def test_shape_fields_cannot_be_overridden(tmp_path):
  path = _write(tmp_path, _config_json(), _hf_arrays(_config_json()))
  with pytest.raises(ValueError, match="hidden_size come.s. from .*config.json"):
    hf.load(path, hidden_size=64)
  with pytest.raises(ValueError, match="is not a directory"):
    hf.load(tmp_path / "absent")
