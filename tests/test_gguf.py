"""Tests of subspace_jax.models.io.gguf: LLaMA GGUF files in.

Files are written here with the gguf package's writer from NumPy arrays in
the Hugging Face layout, the query and key rows interleaved as llama.cpp's
converter stores them (:func:`_llama_cpp_permute`, written from its
description, not from this library), and quantized by the gguf package;
the loaded model is checked against the NumPy reference LLaMA on the
original arrays. The K-quants, which the gguf package cannot write, are
random blocks checked against dequantizers written here from llama.cpp's
block layouts.
"""


import jax.numpy as jnp
import numpy as np
import pytest

gguf_lib = pytest.importorskip("gguf")

from reference_llama import numpy_forward
from subspace_jax.models import llama
from subspace_jax.models.io import gguf
from subspace_jax.models.io import hf, pretrained

Q = gguf_lib.GGMLQuantizationType
VOCAB, HIDDEN, MLP, HEADS, KV, LAYERS = 64, 64, 96, 4, 2, 2


def _llama_cpp_permute(w: np.ndarray, heads: int) -> np.ndarray:
  """How llama.cpp's converter stores a q/k projection (out, in): within
  each head, the row pairs (i, i + half) become adjacent rows (2i, 2i+1)."""
  out = np.empty_like(w)
  hd = w.shape[0] // heads
  half = hd // 2
  for h in range(heads):
    for i in range(half):
      out[h * hd + 2 * i] = w[h * hd + i]
      out[h * hd + 2 * i + 1] = w[h * hd + half + i]
  return out


def _hf_arrays(seed=0, hidden=HIDDEN, mlp=MLP, heads=HEADS, kv=KV,
               vocab=VOCAB, layers=LAYERS, tied=False) -> dict:
  rng = np.random.default_rng(seed)
  hd = hidden // heads
  w = lambda o, i: (rng.standard_normal((o, i)) * 2 / np.sqrt(i)).astype(
      np.float32)
  norm = lambda: (1 + 0.3 * rng.standard_normal(hidden)).astype(np.float32)
  a = {"model.embed_tokens.weight":
       rng.standard_normal((vocab, hidden)).astype(np.float32),
       "model.norm.weight": norm()}
  if not tied:
    a["lm_head.weight"] = w(vocab, hidden)
  for i in range(layers):
    p = f"model.layers.{i}."
    a.update({p + "self_attn.q_proj.weight": w(hidden, hidden),
              p + "self_attn.k_proj.weight": w(kv * hd, hidden),
              p + "self_attn.v_proj.weight": w(kv * hd, hidden),
              p + "self_attn.o_proj.weight": w(hidden, hidden),
              p + "mlp.gate_proj.weight": w(mlp, hidden),
              p + "mlp.up_proj.weight": w(mlp, hidden),
              p + "mlp.down_proj.weight": w(hidden, mlp),
              p + "input_layernorm.weight": norm(),
              p + "post_attention_layernorm.weight": norm()})
  return a


_NAMES = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
          "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
          "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
          "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm",
          "post_attention_layernorm": "ffn_norm"}


def _gguf_name(name: str) -> str:
  if name == "model.embed_tokens.weight":
    return "token_embd.weight"
  if name == "model.norm.weight":
    return "output_norm.weight"
  if name == "lm_head.weight":
    return "output.weight"
  _, _, i, rest = name.split(".", 3)
  return f"blk.{i}.{_NAMES[rest.rsplit('.', 1)[0]]}.weight"


def _write_gguf(path, arrays, *, qtype=Q.F32, heads=HEADS, kv=KV,
                metadata=None, raw=None, skip_keys=()):
  """A LLaMA GGUF file of ``arrays`` (Hugging Face names and layout),
  matrices stored as ``qtype`` (norms F32), ``raw``: tensors given as
  (GGUF name -> (bytes array, type)) instead."""
  hidden = arrays["model.embed_tokens.weight"].shape[1]
  layers = 1 + max(int(n.split(".")[2]) for n in arrays
                   if n.startswith("model.layers."))
  mlp = arrays["model.layers.0.mlp.up_proj.weight"].shape[0]
  w = gguf_lib.GGUFWriter(str(path), "llama")
  meta = {"llama.block_count": layers, "llama.context_length": 64,
          "llama.embedding_length": hidden, "llama.feed_forward_length": mlp,
          "llama.attention.head_count": heads,
          "llama.attention.head_count_kv": kv}
  meta.update(metadata or {})
  for key, value in meta.items():
    if key in skip_keys:
      continue
    if isinstance(value, float):
      w.add_float32(key, value)
    elif isinstance(value, str):
      w.add_string(key, value)
    else:
      w.add_uint32(key, value)
  if "llama.rope.freq_base" not in skip_keys:
    w.add_float32("llama.rope.freq_base", 500.0)
  w.add_float32("llama.attention.layer_norm_rms_epsilon", 1e-5)
  for name, a in arrays.items():
    if name.endswith("q_proj.weight"):
      a = _llama_cpp_permute(a, heads)
    elif name.endswith("k_proj.weight"):
      a = _llama_cpp_permute(a, kv)
    g = _gguf_name(name)
    if raw and g in raw:
      data, kind = raw[g]
      w.add_tensor(g, data, raw_dtype=kind)
    elif a.ndim == 1 or qtype == Q.F32:
      w.add_tensor(g, a.astype(np.float32))
    elif qtype == Q.F16:
      w.add_tensor(g, a.astype(np.float16))
    else:
      w.add_tensor(g, gguf_lib.quants.quantize(a, qtype), raw_dtype=qtype)
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  return path


def _reference(arrays: dict) -> dict:
  """The Hugging Face arrays in the reference LLaMA's layout."""
  a = {k: np.asarray(v, np.float64) for k, v in arrays.items()}
  layers = {}
  for i in range(LAYERS):
    g = lambda n: a[f"model.layers.{i}.{n}"]
    layers[i] = {
        "attn": {n: {"kernel": g(f"self_attn.{n}.weight").T}
                 for n in ("q_proj", "k_proj", "v_proj", "o_proj")},
        "mlp": {n: {"kernel": g(f"mlp.{n}.weight").T}
                for n in ("gate_proj", "up_proj", "down_proj")},
        "attn_norm": {"scale": g("input_layernorm.weight")},
        "mlp_norm": {"scale": g("post_attention_layernorm.weight")}}
  out = {"embed": {"embedding": a["model.embed_tokens.weight"]},
         "final_norm": {"scale": a["model.norm.weight"]}, "layers": layers}
  if "lm_head.weight" in a:
    out["lm_head"] = {"kernel": a["lm_head.weight"].T}
  return out


TOKENS = np.random.default_rng(1).integers(0, VOCAB, (2, 12))


@pytest.mark.parametrize("scan", [False, True])
@pytest.mark.parametrize("tied", [False, True])
def test_f32_file_gives_the_reference_logits(tmp_path, scan, tied):
  """Config from the metadata, every tensor mapped, q/k rows put back:
  float32 logits equal the float64 NumPy LLaMA's on the original arrays.
  (Without the un-permutation of q/k this fails by O(1).)"""
  arrays = _hf_arrays(tied=tied)
  path = _write_gguf(tmp_path / "m.gguf", arrays)
  config, params = pretrained.load(path, scan_layers=scan)
  assert (config.num_kv_heads, config.tie_embeddings) == (KV, tied)
  assert (config.rope_theta, config.norm_eps) == (500.0, pytest.approx(1e-5))
  got = np.asarray(llama.forward(config, params, jnp.asarray(TOKENS)))
  ref_cfg = llama.LlamaConfig(**{**config.__dict__, "scan_layers": False})
  want = numpy_forward(_reference(arrays), TOKENS, ref_cfg)
  np.testing.assert_allclose(got, want, atol=2e-4, rtol=1e-4)


# The largest error of one dequantized value, as a fraction of the largest
# magnitude in its block of 32: half a quantization step (Q8_0: 127 steps
# of the largest magnitude; Q4_1: 15 over the block's range, at most twice
# it), plus the float16 rounding of the block's scale. Q4_0 maps the value
# of largest magnitude to -8 and clamps the other side at +7: a whole step,
# 1/8, for values of the other sign near that magnitude.
_BOUNDS = {Q.F16: 1e-3, Q.BF16: 8e-3, Q.Q8_0: 0.5 / 127 + 2e-3,
           Q.Q4_0: 1 / 8 + 2e-3, Q.Q4_1: 2 * 0.5 / 15 + 2e-3}


@pytest.mark.parametrize("qtype", list(_BOUNDS), ids=lambda q: q.name)
def test_quantized_weights_are_dequantized_within_their_step(tmp_path, qtype):
  arrays = _hf_arrays()
  path = _write_gguf(tmp_path / "m.gguf", arrays, qtype=qtype)
  for dtype in ("float32", "bfloat16"):
    config, params = gguf.load(path, param_dtype=dtype)
    assert config.param_dtype == jnp.dtype(dtype)
    ref = _reference(arrays)
    for got, want in ((params["layers"][1]["attn"]["q_proj"]["kernel"],
                       ref["layers"][1]["attn"]["q_proj"]["kernel"]),
                      (params["lm_head"]["kernel"], ref["lm_head"]["kernel"])):
      got = np.asarray(got, np.float64)
      # Blocks of 32 run along the Hugging Face rows: the kernel's columns.
      blocks = np.abs(want.T).reshape(want.shape[1], -1, 32).max(-1)
      scale = np.repeat(blocks, 32, axis=1).T
      bound = _BOUNDS[qtype] + (2 ** -8 if dtype == "bfloat16" else 0)
      assert np.all(np.abs(got - want) <= bound * scale + 1e-7), qtype
    # Every norm is stored in float32: exact.
    np.testing.assert_array_equal(
        np.asarray(params["final_norm"]["scale"], np.float32),
        arrays["model.norm.weight"].astype(dtype).astype(np.float32))


def _f16(rng, n):
  return rng.uniform(0.01, 0.1, n).astype(np.float16)


def _q4_k_reference(block: bytes) -> np.ndarray:
  """llama.cpp's dequantize_row_q4_K for one block of 256: d, dmin (f16),
  12 bytes of 6-bit scales and mins of 8 sub-blocks, 128 bytes of 4-bit
  values (low nibbles: the first 32 of each 64, high nibbles the next)."""
  d, dmin = np.frombuffer(block[:4], np.float16).astype(np.float64)
  q = block[4:16]
  qs = block[16:]

  def scale_min(j):
    if j < 4:
      return q[j] & 63, q[j + 4] & 63
    return ((q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4),
            (q[j + 4] >> 4) | ((q[j] >> 6) << 4))

  out = []
  for j in range(4):
    sc1, m1 = scale_min(2 * j)
    sc2, m2 = scale_min(2 * j + 1)
    chunk = qs[32 * j:32 * j + 32]
    out += [d * sc1 * (b & 0xF) - dmin * m1 for b in chunk]
    out += [d * sc2 * (b >> 4) - dmin * m2 for b in chunk]
  return np.asarray(out)


def _q6_k_reference(block: bytes) -> np.ndarray:
  """llama.cpp's dequantize_row_q6_K for one block of 256: 128 bytes of
  low 4 bits, 64 of high 2 bits, 16 int8 scales, d (f16)."""
  ql, qh = block[:128], block[128:192]
  sc = np.frombuffer(block[192:208], np.int8).astype(np.float64)
  d = float(np.frombuffer(block[208:210], np.float16)[0])
  y = np.zeros(256)
  for half in range(2):
    l_, h_, s_, o = ql[64 * half:], qh[32 * half:], sc[8 * half:], 128 * half
    for l in range(32):
      i = l // 16
      q1 = ((l_[l] & 0xF) | (((h_[l] >> 0) & 3) << 4)) - 32
      q2 = ((l_[l + 32] & 0xF) | (((h_[l] >> 2) & 3) << 4)) - 32
      q3 = ((l_[l] >> 4) | (((h_[l] >> 4) & 3) << 4)) - 32
      q4 = ((l_[l + 32] >> 4) | (((h_[l] >> 6) & 3) << 4)) - 32
      y[o + l] = d * s_[i] * q1
      y[o + l + 32] = d * s_[i + 2] * q2
      y[o + l + 64] = d * s_[i + 4] * q3
      y[o + l + 96] = d * s_[i + 6] * q4
  return y


def _k_blocks(qtype, rows, cols, rng) -> tuple[np.ndarray, np.ndarray]:
  """Random K-quant blocks of a (rows, cols) matrix, and their values by
  the reference dequantizers."""
  per_row = cols // 256
  blocks, values = [], []
  for _ in range(rows * per_row):
    if qtype == Q.Q4_K:
      block = (_f16(rng, 2).tobytes()
               + rng.integers(0, 256, 140, dtype=np.uint8).tobytes())
      values.append(_q4_k_reference(block))
    else:
      block = (rng.integers(0, 256, 208, dtype=np.uint8).tobytes()
               + _f16(rng, 1).tobytes())
      values.append(_q6_k_reference(block))
    blocks.append(np.frombuffer(block, np.uint8))
  size = len(blocks[0])
  return (np.concatenate(blocks).reshape(rows, per_row * size),
          np.concatenate(values).reshape(rows, cols))


@pytest.mark.parametrize("qtype", [Q.Q4_K, Q.Q6_K], ids=lambda q: q.name)
def test_k_quants_match_llama_cpp_block_layouts(tmp_path, qtype):
  """The MLP's up projection (1 x 512 -> rows of 256) stored as a
  K-quant: the loaded kernel is the reference dequantization, transposed."""
  arrays = _hf_arrays(hidden=256, mlp=64, heads=4, kv=2, layers=1)
  data, values = _k_blocks(qtype, 64, 256, np.random.default_rng(0))
  path = _write_gguf(tmp_path / "k.gguf", arrays,
                     raw={"blk.0.ffn_up.weight": (data, qtype)})
  _, params = gguf.load(path)
  got = np.asarray(params["layers"][0]["mlp"]["up_proj"]["kernel"])
  np.testing.assert_allclose(got, values.T, rtol=1e-6, atol=1e-6)


def test_to_hf_writes_a_checkpoint_that_loads_to_the_same_params(tmp_path):
  arrays = _hf_arrays()
  path = _write_gguf(tmp_path / "m.gguf", arrays, qtype=Q.Q8_0)
  out = gguf.to_hf(path, tmp_path / "hf")
  assert sorted(p.name for p in out.iterdir()) == ["config.json",
                                                   "model.safetensors"]
  _, a = gguf.load(path)
  _, b = hf.load(out)
  for x, y in zip(jax_leaves(a), jax_leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  with pytest.raises(ValueError, match="is not an empty directory"):
    gguf.to_hf(path, out)


def jax_leaves(tree):
  import jax  # pylint: disable=import-outside-toplevel
  return jax.tree.leaves(tree)


# ----------------------------------------------------------------------------
# Files from strangers
# ----------------------------------------------------------------------------


def _one_line(error) -> str:
  message = str(error.value)
  assert "\n" not in message
  return message


def test_damaged_headers_are_refused_in_one_line(tmp_path):
  good = _write_gguf(tmp_path / "good.gguf", _hf_arrays())
  data = good.read_bytes()
  cases = {
      "magic": (b"GGUX" + data[4:], "is not a GGUF file"),
      "truncated": (data[:1000], "the file is truncated or damaged"),
      "empty": (b"", "is empty"),
      "version": (data[:4] + (9).to_bytes(4, "little") + data[8:],
                  "GGUF version 9 is not supported"),
      # kv count 2**60: refused before anything is read.
      "count": (data[:16] + (1 << 60).to_bytes(8, "little") + data[24:],
                "cannot fit in the file"),
  }
  for name, (content, words) in cases.items():
    bad = tmp_path / f"{name}.gguf"
    bad.write_bytes(content)
    with pytest.raises(ValueError) as e:
      gguf.read_config(bad)
    assert words in _one_line(e) and str(bad) in str(e.value), name


def test_an_array_longer_than_the_file_is_refused(tmp_path):
  """A string array whose count claims 2**40 elements: refused from the
  count, never looped over."""
  path = _write_gguf(tmp_path / "m.gguf", _hf_arrays(),
                     metadata={"zz.test": "x"})
  data = bytearray(path.read_bytes())
  key = b"zz.test"
  at = data.index(key) + len(key)
  # Turn the string value into an array of strings of 2**40 elements.
  # Its type (string: 8) becomes array (9) of strings (8) of 2**40.
  data[at:at + 16] = ((9).to_bytes(4, "little") + (8).to_bytes(4, "little")
                      + (1 << 40).to_bytes(8, "little"))
  path.write_bytes(bytes(data))
  with pytest.raises(ValueError) as e:
    gguf.read_config(path)
  assert "zz.test is an array of 1099511627776 elements" in _one_line(e)


@pytest.mark.parametrize("change,words", [
    (dict(metadata={"general.architecture": "qwen2"}),
     "general.architecture 'qwen2' is not supported"),
    (dict(metadata={"llama.rope.scaling.type": "linear"}),
     "llama.rope.scaling.type 'linear' is not supported"),
    (dict(metadata={"llama.expert_count": 8}), "llama.expert_count is not 0"),
    (dict(skip_keys=("llama.block_count",)), "no metadata llama.block_count"),
    (dict(metadata={"llama.block_count": "two"}),
     "metadata llama.block_count is string, not int"),
    (dict(metadata={"llama.block_count": 3}),
     "has no tensor 'blk.2."),
], ids=["arch", "rope", "experts", "missing", "type", "layers"])
def test_unsupported_or_inconsistent_metadata_is_refused(tmp_path, change,
                                                         words):
  path = _write_gguf(tmp_path / "m.gguf", _hf_arrays(), **change)
  with pytest.raises(ValueError) as e:
    gguf.load(path)
  assert words in _one_line(e) and str(path) in str(e.value)


def test_tensor_past_the_end_is_refused(tmp_path):
  path = _write_gguf(tmp_path / "m.gguf", _hf_arrays())
  data = path.read_bytes()
  path.write_bytes(data[:-64])
  with pytest.raises(ValueError) as e:
    gguf.read_config(path)
  assert "runs past the end of the file" in _one_line(e)


def test_a_gguf_without_tokenizer_says_how_to_give_one(tmp_path):
  path = _write_gguf(tmp_path / "m.gguf", _hf_arrays())
  assert not gguf.has_tokenizer(path)
  with pytest.raises(ValueError, match="has no tokenizer .*tokenizer_model"):
    gguf.tokenizer_files(path)
