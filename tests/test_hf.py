"""Tests of subspace_jax.models.io.hf: Hugging Face LLaMA checkpoints in and out.

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
from subspace_jax.models import llama
from subspace_jax.models.io import hf
from subspace_jax import sharding as shd

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


# --------------------------------------------------------------------------
# Untrusted directories (issue 20): each case was followed, accepted or a
# traceback before
# --------------------------------------------------------------------------


def _refused(path, *words) -> str:
  """``hf.load(path)``'s one-line ValueError, holding ``words``."""
  with pytest.raises(ValueError) as info:
    hf.load(path)
  message = str(info.value)
  assert "\n" not in message, message
  for word in words:
    assert word in message, message
  return message


@pytest.mark.parametrize("target", ["../../etc/passwd", "/proc/self/environ",
                                    "../outside/model.safetensors"])
def test_an_index_may_only_name_files_inside_its_directory(tmp_path, target):
  """A valid checkpoint outside the directory, which the index names, is
  not opened (it used to load and train)."""
  config = _config_json()
  arrays = _hf_arrays(config)
  _write(tmp_path / "outside", config, arrays)
  path = _write(tmp_path / "model", config, arrays, files=2)
  index = json.loads((path / "model.safetensors.index.json").read_text())
  index["weight_map"] = {name: target for name in index["weight_map"]}
  (path / "model.safetensors.index.json").write_text(json.dumps(index))
  message = _refused(path, "model.safetensors.index.json: weight_map/",
                     "is not a file inside")
  assert target in message


def _raw_safetensors(path, header: bytes, data: bytes):
  path.write_bytes(len(header).to_bytes(8, "little") + header + data)


def test_overlapping_tensors_are_refused(tmp_path):
  """Every tensor at offset 0: loaded as the same bytes before; the
  safetensors package refuses the file."""
  config = _config_json()
  arrays = _hf_arrays(config)
  path = _write(tmp_path, config, arrays)
  biggest = max(v.nbytes for v in arrays.values())
  header = {name: {"dtype": "F32", "shape": list(v.shape),
                   "data_offsets": [0, v.nbytes]} for name, v in arrays.items()}
  _raw_safetensors(path / "model.safetensors", json.dumps(header).encode(),
                   bytes(biggest))
  _refused(path, "model.safetensors is not a safetensors file",
           "invalid offset")


@pytest.mark.parametrize("header,words", [
    (b'{"a":' + b"[" * 100_000 + b"]" * 100_000 + b"}", "recursion limit"),
    (b'{"a": {"dtype": "F32", "shape": [1e400], "data_offsets": [0, 4]}}',
     "number out of range"),
    (b'{"a": {"dtype": "F32", "shape": [Infinity], "data_offsets": [0, 4]}}',
     "expected value"),
    (b'{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 1e400]}}',
     "number out of range"),
    (b'{"a": {"dtype": ["F32"], "shape": [1], "data_offsets": [0, 4]}}',
     "invalid type"),
])
def test_crafted_safetensors_headers_are_one_line_errors(tmp_path, header,
                                                         words):
  """RecursionError, OverflowError and TypeError tracebacks before."""
  path = _write(tmp_path, _config_json(), _hf_arrays(_config_json()))
  _raw_safetensors(path / "model.safetensors", header, bytes(4))
  _refused(path, "model.safetensors is not a safetensors file", words)


@pytest.mark.parametrize("changes,words", [
    ({"rope_theta": "nan"}, "rope_theta: 'nan' is not of type 'number'"),
    ({"rope_theta": 0}, "rope_theta: 0 is less than or equal to the minimum"),
    ({"rms_norm_eps": -1}, "rms_norm_eps: -1 is less than or equal to the "
     "minimum of 0"),
    ({"hidden_size": "32"}, "hidden_size: '32' is not of type 'integer'"),
    ({"num_hidden_layers": [2]}, "num_hidden_layers: [2] is not of type"),
    ({"tie_word_embeddings": "no"}, "tie_word_embeddings: 'no' is not of type"),
    ({"architectures": "LlamaForCausalLM"}, "architectures: 'LlamaForCausalLM'"
     " is not of type"),
    ({"rope_scaling": [1]}, "rope_scaling: [1] is not of type"),
    ({"torch_dtype": ["float32"]}, "torch_dtype: ['float32'] is not of type"),
    ({"num_hidden_layers": 10**9}, "num_hidden_layers: 1000000000 is greater "
     "than the maximum"),
    ({"vocab_size": 2**24, "hidden_size": 2**17, "intermediate_size": 2**20,
      "num_hidden_layers": 4096}, "parameters, more than the 2e+12"),
])
def test_config_values_are_checked_before_use(tmp_path, changes, words):
  """Wrong types were TypeErrors or silently taken (bool("no") is True),
  rope_theta "nan" and rms_norm_eps -1 were accepted, and 10**9 layers
  hung building the model."""
  path = _write(tmp_path, _config_json(), _hf_arrays(_config_json()))
  (path / "config.json").write_text(json.dumps(_config_json(**changes)))
  _refused(path, "config.json: ", words)
  with pytest.raises(ValueError, match="config.json: "):
    hf.read_config(path)


@pytest.mark.parametrize("text,words", [
    ('{"a": ' * 100_000, "nested 100000 deep (at most 64)"),
    ('{"vocab_size": 1e400}', "the number 1e400 does not fit a float"),
    ('{"vocab_size": Infinity}', "Infinity is not a finite number"),
    ("[1, 2", "is not valid JSON"),
])
def test_damaged_config_json_is_one_line(tmp_path, text, words):
  path = _write(tmp_path, _config_json(), _hf_arrays(_config_json()))
  (path / "config.json").write_text(text)
  _refused(path, "config.json", words)


def test_layers_are_checked_against_the_weights_before_building(tmp_path):
  """A config.json of 4000 layers over a checkpoint of 2: refused by the
  tensors it lacks, before a model of 4000 layers is built."""
  path = _write(tmp_path, _config_json(), _hf_arrays(_config_json()))
  (path / "config.json").write_text(json.dumps(
      _config_json(num_hidden_layers=4000)))
  _refused(path, "has no tensor 'model.layers.2.")


def _saved(path, seed=1, **kwargs):
  cfg = llama.get_config("tiny")
  params = llama.ModelDef(cfg).init(seed)
  return cfg, params, hf.save(path, cfg, params, **kwargs)


def test_save_replaces_only_its_own_files(tmp_path):
  """--export-hf into an existing model deleted every model*.safetensors*
  file first (unrelated ones too) and then wrote in place."""
  _saved(tmp_path, seed=1)
  keep = {"model.safetensors.notes.txt": "mine", "model-old.safetensors": "x",
          "README.md": "a model card"}
  for name, text in keep.items():
    (tmp_path / name).write_text(text)
  cfg, params, written = _saved(tmp_path, seed=2)
  assert sorted(written) == ["config.json", "model.safetensors"]
  for name, text in keep.items():
    assert (tmp_path / name).read_text() == text
  assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
      [*keep, "config.json", "model.safetensors"])  # No temporary file left.
  _, loaded = hf.load(tmp_path)
  jax.tree.map(np.testing.assert_array_equal, loaded, params)


@pytest.mark.parametrize("fail_at", [1, 15])
def test_a_failed_save_leaves_the_previous_model(tmp_path, monkeypatch,
                                                 fail_at):
  """A disk that fills up (the n-th tensor cannot be written): the
  previous model loads as it was, and no temporary file is left."""
  cfg, params, _ = _saved(tmp_path, seed=1, max_shard_bytes=40_000)
  before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
  count = [0]
  tensors = hf._tensors  # pylint: disable=protected-access

  def failing(*args):
    out = []
    for name, dtype, shape, make in tensors(*args):
      def fail(make=make):
        count[0] += 1
        if count[0] == fail_at:
          raise OSError(28, "No space left on device")
        return make()
      out.append((name, dtype, shape, fail))
    return out

  monkeypatch.setattr(hf, "_tensors", failing)
  other = llama.ModelDef(cfg).init(2)
  with pytest.raises(OSError, match="No space left"):
    hf.save(tmp_path, cfg, other, max_shard_bytes=40_000)
  assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
  _, loaded = hf.load(tmp_path)
  jax.tree.map(np.testing.assert_array_equal, loaded, params)


def test_a_sharded_save_is_not_hidden_by_an_older_single_file(tmp_path):
  _saved(tmp_path, seed=1)
  cfg = llama.get_config("tiny")
  before = (tmp_path / "model.safetensors").read_bytes()
  with pytest.raises(ValueError, match="model.safetensors exists and would be "
                     "loaded instead of the .* files of this save"):
    hf.save(tmp_path, cfg, llama.ModelDef(cfg).init(2), max_shard_bytes=40_000)
  assert (tmp_path / "model.safetensors").read_bytes() == before
