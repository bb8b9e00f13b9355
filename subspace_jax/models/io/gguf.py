"""GGUF (llama.cpp) LLaMA checkpoints in: weights, config and tokenizer.

A GGUF file holds a model's configuration and tokenizer as metadata and its
weights as tensors, often quantized. This module reads a LLaMA-family file
into the parameters :func:`subspace_jax.models.io.hf.load` gives for the same
model, dequantized to the run's dtype::

    from subspace_jax.models import llama
    from subspace_jax.models.io import gguf
    config, params = gguf.load("SmolLM2-135M-Instruct.Q4_1.gguf")
    logits = llama.forward(config, params, tokens)
    gguf.to_hf("SmolLM2-135M-Instruct.Q4_1.gguf", "smollm2-hf")

(:mod:`subspace_jax.models.io.pretrained` reads a ``.gguf`` file or a directory, so
``--init-from FILE.gguf`` works like a Hugging Face directory.)

* The header is parsed here, every length checked against what is left of
  the file before it is read (a file from a stranger cannot make a read
  run past its end or loop over an array longer than the file), and
  anything malformed is a one-line ``ValueError`` naming the file and the
  key or tensor. The tensors are memory-mapped, never read whole.
* Dequantization is the ``gguf`` package's (``pip install
  "subspace_jax[gguf]"``): F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1 and
  the K-quants (Q2_K ... Q6_K), one tensor at a time.
* llama.cpp stores the query and key projections with the two halves of
  each head's rotary features interleaved (its RoPE rotates adjacent
  pairs); :func:`_unpermute` puts them back in the Hugging Face order
  (rotate-half) this model uses.
* The tokenizer (``tokenizer.ggml.*``: a byte-level BPE vocabulary, its
  merges and special tokens, and ``tokenizer.chat_template``) becomes the
  files of a Hugging Face tokenizer (:func:`tokenizer_files`), which
  :func:`subspace_jax.data.tokenizers.load_tokenizer` reads.

Refused, naming the key: architectures other than ``llama``, RoPE scaling,
biases, mixtures of experts, heads of another size than ``hidden /
heads``, SentencePiece (``tokenizer.ggml.model`` ``llama``) tokenizers (the
weights still load; give the tokenizer with ``--tokenizer-model``).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import mmap
import os
import pathlib
import shutil
import struct
import tempfile
from typing import Any, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from subspace_jax import cache
from subspace_jax import matrix_view as mv
from subspace_jax.models import llama
from subspace_jax.models.io import hf
from subspace_jax.naming import setting

__all__ = ["is_gguf", "read_config", "load", "tokenizer_files",
           "tokenizer_dir", "to_hf", "SUFFIX"]

SUFFIX = ".gguf"
_MAGIC = b"GGUF"
_VERSIONS = (2, 3)
_MAX_DIMS = 4  # GGML_MAX_DIMS.
_MAX_DEPTH = 2  # Arrays of arrays, at most.
_DEFAULT_ALIGNMENT = 32

# GGUF value types: code -> (name, struct format or None).
_SCALARS = {0: ("uint8", "B"), 1: ("int8", "b"), 2: ("uint16", "H"),
            3: ("int16", "h"), 4: ("uint32", "I"), 5: ("int32", "i"),
            6: ("float32", "f"), 7: ("bool", "?"), 10: ("uint64", "Q"),
            11: ("int64", "q"), 12: ("float64", "d")}
_STRING, _ARRAY = 8, 9
_INTEGER = {"uint8", "int8", "uint16", "int16", "uint32", "int32", "uint64",
            "int64"}

_SHAPE_FIELDS = ("vocab_size", "hidden_size", "intermediate_size",
                 "num_heads", "num_layers", "num_kv_heads", "tie_embeddings")

# Parameter paths -> (GGUF tensor name, stored (out, in) and transposed
# here). GGUF's numpy layout (dims reversed) is Hugging Face's.
_TOP = {
    "embed/embedding": ("token_embd.weight", False),
    "final_norm/scale": ("output_norm.weight", False),
    "lm_head/kernel": ("output.weight", True),
}
_BLOCK = {
    "attn/q_proj/kernel": ("attn_q.weight", True),
    "attn/k_proj/kernel": ("attn_k.weight", True),
    "attn/v_proj/kernel": ("attn_v.weight", True),
    "attn/o_proj/kernel": ("attn_output.weight", True),
    "mlp/gate_proj/kernel": ("ffn_gate.weight", True),
    "mlp/up_proj/kernel": ("ffn_up.weight", True),
    "mlp/down_proj/kernel": ("ffn_down.weight", True),
    "attn_norm/scale": ("attn_norm.weight", False),
    "mlp_norm/scale": ("ffn_norm.weight", False),
}

# tokenizer.ggml.pre -> the pre-tokenizer of the Hugging Face tokenizer
# that llama.cpp's pre-tokenizer of that name reproduces.
_GPT2_REGEX = (r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+"
               r"|\s+(?!\S)|\s+")
_LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+"
                 r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)"
                 r"|\s+")
_PRE_TOKENIZERS = {
    "default": "gpt2", "gpt2": "gpt2",
    "smollm": "digits+gpt2", "starcoder": "digits+gpt2",
    "refact": "digits+gpt2",
    "llama-bpe": "llama3", "llama3": "llama3", "smaug-bpe": "llama3",
}


def is_gguf(path: str | os.PathLike[str]) -> bool:
  """Whether ``path`` names a GGUF file (by its suffix; its content is
  checked when it is read)."""
  return str(path).lower().endswith(SUFFIX)


def _import_gguf() -> Any:
  try:
    import gguf  # pylint: disable=import-outside-toplevel
  except ImportError:
    raise ImportError('GGUF files need the gguf package: pip install '
                      '"subspace_jax[gguf]" (or pip install gguf)') from None
  return gguf


# --------------------------------------------------------------------------
# The header, read with bounds
# --------------------------------------------------------------------------


class _Tensor(NamedTuple):
  """A tensor of the file: its numpy shape (GGUF's dims reversed), GGML
  type, absolute byte offset and size."""

  name: str
  shape: tuple[int, ...]
  qtype: int
  offset: int
  nbytes: int


@dataclasses.dataclass
class _Header:
  path: str
  size: int
  metadata: dict[str, tuple[str, Any]]  # key -> (type name, value)
  tensors: dict[str, _Tensor]


class _Cursor:
  """Reads the header of ``data`` front to back; every read is checked
  against the bytes left first."""

  def __init__(self, data, where: str):
    self.data, self.where, self.pos = data, where, 0

  def take(self, n: int, what: str) -> bytes:
    left = len(self.data) - self.pos
    if n < 0 or n > left:
      raise ValueError(f"{self.where}: {what} needs {n} bytes at offset "
                       f"{self.pos}, but only {left} are left (the file is "
                       "truncated or damaged)")
    out = self.data[self.pos:self.pos + n]
    self.pos += n
    return bytes(out)

  def unpack(self, fmt: str, what: str):
    return struct.unpack("<" + fmt, self.take(struct.calcsize(fmt), what))[0]

  def string(self, what: str) -> str:
    n = self.unpack("Q", what)
    raw = self.take(n, what)
    try:
      return raw.decode("utf-8")
    except UnicodeDecodeError:
      raise ValueError(f"{self.where}: {what} is not UTF-8 text") from None

  def value(self, code: int, what: str, depth: int = 0) -> tuple[str, Any]:
    if code in _SCALARS:
      name, fmt = _SCALARS[code]
      return name, self.unpack(fmt, what)
    if code == _STRING:
      return "string", self.string(what)
    if code != _ARRAY:
      raise ValueError(f"{self.where}: {what} has value type {code}, which "
                       "is not a GGUF type")
    if depth >= _MAX_DEPTH:
      raise ValueError(f"{self.where}: {what} nests arrays more than "
                       f"{_MAX_DEPTH} deep")
    item = self.unpack("I", what)
    count = self.unpack("Q", what)
    least = (struct.calcsize(_SCALARS[item][1]) if item in _SCALARS
             else 8 if item == _STRING else 12)
    if count * least > len(self.data) - self.pos:
      raise ValueError(f"{self.where}: {what} is an array of {count} "
                       "elements, more than the rest of the file can hold")
    if item in _SCALARS:
      name, fmt = _SCALARS[item]
      raw = self.take(count * struct.calcsize(fmt), what)
      dtype = np.dtype(bool if name == "bool" else name).newbyteorder("<")
      return f"array[{name}]", np.frombuffer(raw, dtype).copy()
    items = [self.value(item, f"{what}[{i}]", depth + 1)[1]
             for i in range(count)]
    kind = "string" if item == _STRING else "array"
    return f"array[{kind}]", items


def _file_key(path: str) -> tuple[str, int, int]:
  try:
    stat = os.stat(path)
  except OSError as e:
    raise ValueError(f"cannot read {path} ({e.strerror or e})") from None
  if not os.path.isfile(path):
    raise ValueError(f"{path} is not a file; pass a .gguf file")
  return os.path.realpath(path), stat.st_size, stat.st_mtime_ns


def _header(path: str | os.PathLike[str]) -> _Header:
  """The parsed header of the GGUF file at ``path`` (cached while the file
  is unchanged)."""
  path = os.path.expanduser(os.fspath(path))
  return _parse_header(path, *_file_key(path)[1:])


@functools.lru_cache(maxsize=4)
def _parse_header(path: str, size: int, mtime_ns: int) -> _Header:
  del mtime_ns  # Part of the cache key only.
  gguf = _import_gguf()
  with open(path, "rb") as f:
    if size == 0:
      raise ValueError(f"{path} is empty, not a GGUF file")
    with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
      cur = _Cursor(data, path)
      if cur.take(min(4, size), "the magic number") != _MAGIC:
        raise ValueError(f"{path} is not a GGUF file (it does not start with "
                         "'GGUF')")
      version = cur.unpack("I", "the version")
      if version not in _VERSIONS:
        swapped = struct.unpack(">I", struct.pack("<I", version))[0]
        why = (" (a big-endian file, which is not supported)"
               if swapped in _VERSIONS else "")
        raise ValueError(f"{path}: GGUF version {version} is not supported"
                         f"{why}; versions {_VERSIONS} are")
      n_tensors = cur.unpack("Q", "the tensor count")
      n_keys = cur.unpack("Q", "the metadata count")
      if (n_keys * 13 + n_tensors * 24) > size - cur.pos:
        raise ValueError(f"{path}: {n_keys} metadata entries and {n_tensors} "
                         "tensors cannot fit in the file (damaged header)")
      metadata: dict[str, tuple[str, Any]] = {}
      for i in range(n_keys):
        key = cur.string(f"the key of metadata entry {i}")
        code = cur.unpack("I", f"the type of {key}")
        if key in metadata:
          raise ValueError(f"{path}: metadata key {key} appears twice")
        metadata[key] = cur.value(code, key)
      infos = []
      for i in range(n_tensors):
        name = cur.string(f"the name of tensor {i}")
        n_dims = cur.unpack("I", f"the rank of tensor {name!r}")
        if not 1 <= n_dims <= _MAX_DIMS:
          raise ValueError(f"{path}: tensor {name!r} has {n_dims} dimensions; "
                           f"GGUF allows 1 to {_MAX_DIMS}")
        dims = [cur.unpack("Q", f"the shape of tensor {name!r}")
                for _ in range(n_dims)]
        qtype = cur.unpack("I", f"the type of tensor {name!r}")
        offset = cur.unpack("Q", f"the offset of tensor {name!r}")
        infos.append((name, dims, qtype, offset))
      kind, alignment = metadata.get("general.alignment",
                                     ("uint32", _DEFAULT_ALIGNMENT))
      if kind != "uint32" or alignment <= 0 or alignment & (alignment - 1):
        raise ValueError(f"{path}: general.alignment {alignment!r} is not a "
                         "power of two (uint32)")
      start = -(-cur.pos // alignment) * alignment
  tensors: dict[str, _Tensor] = {}
  for name, dims, qtype, offset in infos:
    try:
      kind = gguf.GGMLQuantizationType(qtype)
      block, type_size = gguf.GGML_QUANT_SIZES[kind]
    except (ValueError, KeyError):
      raise ValueError(f"{path}: tensor {name!r} has type {qtype}, which is "
                       "not a GGML type") from None
    if any(d < 1 for d in dims) or math.prod(dims) > 1 << 48:
      raise ValueError(f"{path}: tensor {name!r} has shape {dims}, which is "
                       "not a tensor shape")
    if dims[0] % block:
      raise ValueError(f"{path}: tensor {name!r} rows of {dims[0]} are not "
                       f"whole {kind.name} blocks of {block}")
    nbytes = math.prod(dims) // block * type_size
    if offset % alignment or start + offset + nbytes > size:
      raise ValueError(f"{path}: tensor {name!r} ({nbytes} bytes at offset "
                       f"{start + offset}) is misaligned or runs past the end "
                       f"of the file ({size} bytes)")
    if name in tensors:
      raise ValueError(f"{path}: tensor {name!r} appears twice")
    tensors[name] = _Tensor(name, tuple(int(d) for d in reversed(dims)),
                            int(kind), start + offset, nbytes)
  return _Header(path, size, metadata, tensors)


def _get(header: _Header, key: str, kinds: tuple[str, ...] | str,
         default: Any = ...) -> Any:
  """Metadata ``key``, which must be of one of ``kinds`` ("int" for any
  integer type, "float" for any number)."""
  if key not in header.metadata:
    if default is ...:
      raise ValueError(f"{header.path}: no metadata {key}; the file is not a "
                       "complete LLaMA GGUF")
    return default
  kind, value = header.metadata[key]
  kinds = (kinds,) if isinstance(kinds, str) else kinds
  ok = (kind in kinds or ("int" in kinds and kind in _INTEGER)
        or ("float" in kinds and kind in _INTEGER | {"float32", "float64"}))
  if not ok:
    raise ValueError(f"{header.path}: metadata {key} is {kind}, not "
                     f"{' or '.join(kinds)}")
  return value


# --------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------


def read_config(path: str | os.PathLike[str],
                **overrides: Any) -> llama.LlamaConfig:
  """The :class:`~subspace_jax.models.llama.LlamaConfig` of a GGUF file.

  Args:
    path: The ``.gguf`` file.
    **overrides: ``LlamaConfig`` fields that do not change the weights'
      shapes (``param_dtype``, default float32; ``dtype``, ``scan_layers``,
      ``remat``, ``max_seq_len``, ...).

  Raises:
    ValueError: On a file or configuration this model cannot compute (one
      line naming the file and key).
  """
  h = _header(path)
  where = h.path
  arch = _get(h, "general.architecture", "string")
  if arch != "llama":
    raise ValueError(f"{where}: general.architecture {arch!r} is not "
                     "supported; only 'llama' GGUF files")
  p = arch + "."
  fixed = sorted(set(overrides) & set(_SHAPE_FIELDS))
  if fixed:
    raise ValueError(f"{', '.join(fixed)} come(s) from {where} and cannot "
                     "be overridden")
  hidden = _get(h, p + "embedding_length", "int")
  heads = _get(h, p + "attention.head_count", "int")
  kv = _get(h, p + "attention.head_count_kv", "int", heads)
  for key in (p + "rope.scaling.type",):
    kind = _get(h, key, "string", "none")
    if kind not in ("none", ""):
      raise ValueError(f"{where}: {key} {kind!r} is not supported (only plain "
                       "RoPE)")
  if _get(h, p + "expert_count", "int", 0):
    raise ValueError(f"{where}: {p}expert_count is not 0; mixtures of experts "
                     "are not supported")
  head_dim = hidden // heads if heads else 0
  for key in ("rope.dimension_count", "attention.key_length",
              "attention.value_length"):
    value = _get(h, p + key, "int", head_dim)
    if value != head_dim:
      raise ValueError(f"{where}: {p}{key} {value} is not hidden / heads "
                       f"({hidden} / {heads}); not supported")
  for name in h.tensors:
    if name.endswith(".bias"):
      raise ValueError(f"{where}: tensor {name!r} is a bias; biases are not "
                       "supported")
    if name == "rope_freqs.weight":
      raise ValueError(f"{where}: tensor 'rope_freqs.weight' (RoPE scaling) "
                       "is not supported")
  embed = h.tensors.get("token_embd.weight")
  if embed is None:
    raise ValueError(f"{where} has no tensor 'token_embd.weight'; not a LLaMA "
                     "GGUF")
  vocab = _get(h, p + "vocab_size", "int", embed.shape[0])
  fields = dict(
      vocab_size=vocab, hidden_size=hidden,
      intermediate_size=_get(h, p + "feed_forward_length", "int"),
      num_heads=heads, num_layers=_get(h, p + "block_count", "int"),
      num_kv_heads=None if kv == heads else kv,
      max_seq_len=_get(h, p + "context_length", "int", 2048),
      rope_theta=float(_get(h, p + "rope.freq_base", "float", 10000.0)),
      norm_eps=float(_get(h, p + "attention.layer_norm_rms_epsilon", "float",
                          1e-5)),
      tie_embeddings="output.weight" not in h.tensors,
      param_dtype=jnp.float32)
  fields.update(overrides)
  try:
    return llama.LlamaConfig(**fields)
  except TypeError as e:
    raise ValueError(f"bad LlamaConfig override ({e})") from None
  except ValueError as e:
    raise ValueError(f"{where}: {e}") from None


# --------------------------------------------------------------------------
# Tensors
# --------------------------------------------------------------------------


def _unpermute(w: np.ndarray, heads: int) -> np.ndarray:
  """The rows of a GGUF query/key projection ``(heads * head_dim, in)`` in
  the Hugging Face order.

  llama.cpp rotates adjacent pairs of a head's features, Hugging Face the
  pair ``(i, i + head_dim / 2)``; its converter moves row ``j * half + i``
  of a head (``j`` in {0, 1}) to row ``2 i + j``. This moves it back.
  """
  rows = w.shape[0]
  half = rows // heads // 2
  return w.reshape(heads, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(
      w.shape)


class _Reader:
  """The tensors of a GGUF file in this model's layout, one at a time: the
  last one read is kept, so that the slices of a sharded tensor are cut
  from one dequantization."""

  def __init__(self, header: _Header, config: llama.LlamaConfig):
    self.header, self.config = header, config
    self._last: tuple[tuple, np.ndarray] | None = None

  def array(self, name: str, transposed: bool, dtype: Any) -> np.ndarray:
    key = (name, transposed, np.dtype(dtype).name)
    if self._last is not None and self._last[0] == key:
      return self._last[1]
    gguf = _import_gguf()
    t = self.header.tensors[name]
    with open(self.header.path, "rb") as f, mmap.mmap(
        f.fileno(), 0, access=mmap.ACCESS_READ) as data:
      raw = np.frombuffer(data, np.uint8, t.nbytes, t.offset)
      kind = gguf.GGMLQuantizationType(t.qtype)
      try:
        byte_shape = gguf.quants.quant_shape_to_byte_shape(t.shape, kind)
        w = gguf.quants.dequantize(raw.reshape(byte_shape), kind)
      except NotImplementedError:
        raise ValueError(f"{self.header.path}: tensor {name!r} is {kind.name}, "
                         "which cannot be dequantized here") from None
      w = np.array(w, np.float32)  # A copy: the map closes.
      del raw
    if not np.all(np.isfinite(w)):
      raise ValueError(f"{self.header.path}: tensor {name!r} holds values "
                       "that are not finite")
    if name.endswith("attn_q.weight"):
      w = _unpermute(w, self.config.num_heads)
    elif name.endswith("attn_k.weight"):
      w = _unpermute(w, self.config.kv_heads)
    w = np.ascontiguousarray(w.T if transposed else w, dtype=dtype)
    self._last = (key, w)
    return w


def _sources(config: llama.LlamaConfig, path: str) -> list[tuple[str, bool]]:
  """The GGUF tensors of the leaf at ``path``: ``(name, transposed)``, one
  per layer of a stacked leaf."""
  parts = path.split("/")
  if parts[0] != "layers":
    return [_TOP[path]]
  if config.scan_layers:
    layers, within = range(config.num_layers), "/".join(parts[1:])
  else:
    layers, within = [int(parts[1])], "/".join(parts[2:])
  name, transposed = _BLOCK[within]
  return [(f"blk.{i}.{name}", transposed) for i in layers]


def _check_tensors(header: _Header, config: llama.LlamaConfig,
                   leaves) -> None:
  expected = {}
  for path, leaf in leaves:
    shape = leaf.shape[1:] if (config.scan_layers
                               and path.startswith("layers/")) else leaf.shape
    for name, transposed in _sources(config, path):
      expected[name] = tuple(reversed(shape)) if transposed else tuple(shape)
  for name, shape in expected.items():
    if name not in header.tensors:
      raise ValueError(f"{header.path} has no tensor {name!r}, which its "
                       "metadata implies; the file is incomplete or not a "
                       "LLaMA")
    if header.tensors[name].shape != shape:
      raise ValueError(f"{header.path}: tensor {name!r} has shape "
                       f"{list(header.tensors[name].shape)}, the metadata "
                       f"implies {list(shape)}")
  for name in header.tensors:
    if name not in expected:
      raise ValueError(f"{header.path}: unexpected tensor {name!r} (not a "
                       "weight of this LLaMA)")


def load(path: str | os.PathLike[str], *, mesh: jax.sharding.Mesh | None = None,
         **config_overrides: Any) -> tuple[llama.LlamaConfig, dict]:
  """Loads a LLaMA GGUF file, dequantized, as :func:`hf.load
  <subspace_jax.models.io.hf.load>` loads a Hugging Face checkpoint.

  Each weight is dequantized on the host (one tensor at a time) and created
  in its sharding over ``mesh``; a stacked leaf of a scanned model is
  filled one layer at a time.

  Args:
    path: The ``.gguf`` file.
    mesh: The device mesh (default: this process's first device).
    **config_overrides: See :func:`read_config` (e.g. ``scan_layers=True``,
      ``param_dtype="bfloat16"``).

  Returns:
    ``(config, params)``, ``params`` the plain nested dict the trainer uses,
    in ``config.param_dtype``.

  Raises:
    ValueError: On an unsupported or damaged file (one line naming the file
      and the key or tensor).
  """
  from subspace_jax import sharding as shd  # pylint: disable=import-outside-toplevel
  config = read_config(path, **config_overrides)
  header = _header(path)
  model = llama.ModelDef(config)
  abstract = jax.eval_shape(lambda: model.init(0))
  if mesh is None:
    mesh = shd.make_mesh(1, 1, 1, devices=jax.local_devices()[:1])
  shardings = shd.tree_shardings(abstract, model.logical_axes, mesh)
  flat = [(mv.path_str(k), leaf) for k, leaf in
          jax.tree_util.tree_flatten_with_path(abstract)[0]]
  _check_tensors(header, config, flat)
  reader = _Reader(header, config)
  dtype = config.param_dtype
  loaded = []
  for (path_, leaf), sharding in zip(flat, jax.tree.leaves(shardings)):
    sources = _sources(config, path_)
    if config.scan_layers and path_.startswith("layers/"):
      loaded.append(hf.stacked_array(
          lambda n, t, index: reader.array(n, t, dtype)[index], sources,
          leaf.shape, dtype, sharding))
    else:
      (name, transposed), = sources
      loaded.append(jax.make_array_from_callback(
          leaf.shape, sharding,
          lambda index, n=name, t=transposed: reader.array(n, t, dtype)[index]))
  return config, jax.tree.unflatten(jax.tree.structure(abstract), loaded)


# --------------------------------------------------------------------------
# The tokenizer
# --------------------------------------------------------------------------

# tokenizer.ggml.token_type values (llama.cpp's llama_token_type).
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6


def has_tokenizer(path: str | os.PathLike[str]) -> bool:
  """Whether the GGUF file's metadata holds a tokenizer."""
  return "tokenizer.ggml.model" in _header(path).metadata


def _special(h: _Header, role: str, tokens: list[str]) -> str | None:
  key = f"tokenizer.ggml.{role}_token_id"
  i = _get(h, key, "int", None)
  if i is None:
    return None
  if not 0 <= i < len(tokens):
    raise ValueError(f"{h.path}: {key} {i} is not a token id (the vocabulary "
                     f"has {len(tokens)})")
  return tokens[i]


def _tokenizer_json(h: _Header) -> tuple[str, dict[str, Any]]:
  """The ``tokenizer.json`` text of the file's tokenizer and what
  ``tokenizer_config.json`` says of it."""
  try:
    import tokenizers  # pylint: disable=import-outside-toplevel
    from tokenizers import decoders, models, pre_tokenizers, processors  # pylint: disable=import-outside-toplevel
  except ImportError:
    raise ImportError("the tokenizer of a GGUF file needs the tokenizers "
                      'package: pip install "subspace_jax[gguf]"') from None
  where = h.path
  kind = _get(h, "tokenizer.ggml.model", "string")
  if kind != "gpt2":
    raise ValueError(f"{where}: tokenizer.ggml.model {kind!r} is not supported "
                     "(only 'gpt2', byte-level BPE); give the tokenizer with "
                     f"{setting('tokenizer_model')}")
  pre = _get(h, "tokenizer.ggml.pre", "string", "default")
  if pre not in _PRE_TOKENIZERS:
    raise ValueError(f"{where}: tokenizer.ggml.pre {pre!r} is not supported "
                     f"(known: {', '.join(sorted(_PRE_TOKENIZERS))}); give the "
                     f"tokenizer with {setting('tokenizer_model')}")
  tokens = _get(h, "tokenizer.ggml.tokens", "array[string]")
  types = _get(h, "tokenizer.ggml.token_type", ("array[int32]",
                                                "array[uint32]"), None)
  if types is not None and len(types) != len(tokens):
    raise ValueError(f"{where}: tokenizer.ggml.token_type has {len(types)} "
                     f"entries for {len(tokens)} tokens")
  if len(set(tokens)) != len(tokens):
    raise ValueError(f"{where}: tokenizer.ggml.tokens repeats a token")
  merges = []
  for i, m in enumerate(_get(h, "tokenizer.ggml.merges", "array[string]")):
    parts = m.split(" ")
    if len(parts) != 2:
      raise ValueError(f"{where}: tokenizer.ggml.merges[{i}] {m!r} is not two "
                       "tokens separated by a space")
    merges.append((parts[0], parts[1]))
  vocab = {t: i for i, t in enumerate(tokens)}
  style = _PRE_TOKENIZERS[pre]
  tok = tokenizers.Tokenizer(models.BPE(
      vocab, merges, ignore_merges=style == "llama3"))
  byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False,
                                        use_regex=style != "llama3")
  if style == "gpt2":
    tok.pre_tokenizer = byte_level
  elif style == "digits+gpt2":
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), byte_level])
  else:
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(tokenizers.Regex(_LLAMA3_REGEX),
                             behavior="isolated"), byte_level])
  tok.decoder = decoders.ByteLevel()
  added = []
  for i, t in enumerate(tokens):
    kind_i = int(types[i]) if types is not None else _NORMAL
    if kind_i in (_CONTROL, _USER_DEFINED, _UNKNOWN):
      added.append(tokenizers.AddedToken(t, special=kind_i != _USER_DEFINED,
                                         normalized=False))
  tok.add_tokens(added)  # Ids already in the vocabulary: kept.
  specials = {role: _special(h, role, tokens)
              for role in ("bos", "eos", "unknown", "padding")}
  add_bos = bool(_get(h, "tokenizer.ggml.add_bos_token", "bool", False))
  if add_bos and specials["bos"] is not None:
    bos = specials["bos"]
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
        special_tokens=[(bos, vocab[bos])])
  else:
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
  config = {
      "add_bos_token": add_bos,
      "add_eos_token": bool(_get(h, "tokenizer.ggml.add_eos_token", "bool",
                                 False)),
      "bos_token": specials["bos"], "eos_token": specials["eos"],
      "unk_token": specials["unknown"], "pad_token": specials["padding"],
      "clean_up_tokenization_spaces": False,
      "model_max_length": int(_get(h, "llama.context_length", "int", 2048)),
      "tokenizer_class": "PreTrainedTokenizerFast",
  }
  return tok.to_str(), config


def tokenizer_files(path: str | os.PathLike[str]) -> dict[str, str]:
  """The files of a Hugging Face tokenizer made from the GGUF file's
  metadata: ``{file name: text}`` of ``tokenizer.json``,
  ``tokenizer_config.json``, ``special_tokens_map.json``,
  ``generation_config.json`` and, if the file has one, the chat template
  (``chat_template.jinja``).

  Raises:
    ValueError: If the file has no tokenizer or one that cannot be made.
  """
  h = _header(path)
  if "tokenizer.ggml.model" not in h.metadata:
    raise ValueError(f"{h.path} has no tokenizer (no tokenizer.ggml.model); "
                     f"give one with {setting('tokenizer_model')}")
  text, config = _tokenizer_json(h)
  ids = {role: _get(h, f"tokenizer.ggml.{role}_token_id", "int", None)
         for role in ("bos", "eos", "padding")}
  special_map = {f"{r}_token": config[f"{r}_token"]
                 for r in ("bos", "eos", "unk", "pad")
                 if config[f"{r}_token"] is not None}
  files = {
      "tokenizer.json": text,
      "tokenizer_config.json": _json(config),
      "special_tokens_map.json": _json(special_map),
      "generation_config.json": _json(generation_config(
          ids["bos"], ids["eos"], ids["padding"])),
  }
  template = _get(h, "tokenizer.chat_template", "string", None)
  if template:
    files["chat_template.jinja"] = template
  return files


def generation_config(bos: int | None, eos: int | list[int] | None,
                      pad: int | None) -> dict[str, Any]:
  """A ``generation_config.json`` of these special ids (greedy by
  default, as transformers' own)."""
  out = {"_from_model_config": False}
  for key, value in (("bos_token_id", bos), ("eos_token_id", eos),
                     ("pad_token_id", pad)):
    if value is not None:
      out[key] = value
  return out


def _json(content: Any) -> str:
  return json.dumps(content, indent=2, ensure_ascii=False) + "\n"


def _write_files(directory: pathlib.Path, files: Mapping[str, str]) -> None:
  for name, text in files.items():
    (directory / name).write_text(text, encoding="utf-8")


def tokenizer_dir(path: str | os.PathLike[str],
                  cache_dir: str | os.PathLike[str] | None = None
                  ) -> pathlib.Path:
  """A directory holding :func:`tokenizer_files` of the GGUF file, written
  once into the cache (``$SUBSPACE_JAX_CACHE_DIR``, default
  ``~/.cache/subspace_jax``) under a hash of the files' content."""
  files = tokenizer_files(path)
  digest = hashlib.sha256(_json(files).encode()).hexdigest()[:20]
  target = cache.cache_path(cache_dir, "gguf_tokenizers", digest)
  if (target / "tokenizer.json").is_file():
    return target
  target.parent.mkdir(parents=True, exist_ok=True)
  tmp = pathlib.Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{digest}-"))
  _write_files(tmp, files)
  try:
    os.rename(tmp, target)  # Whole or not at all; another process may win.
  except OSError:
    shutil.rmtree(tmp, ignore_errors=True)
  return target


# --------------------------------------------------------------------------
# Conversion
# --------------------------------------------------------------------------


def to_hf(gguf_path: str | os.PathLike[str], out_dir: str | os.PathLike[str],
          *, dtype: Any = "float32") -> pathlib.Path:
  """Converts a LLaMA GGUF file into a Hugging Face checkpoint directory.

  The directory (written whole into a temporary one beside it, then
  renamed) holds ``config.json`` and ``model.safetensors`` (dequantized
  to ``dtype``), and the tokenizer's files (:func:`tokenizer_files`);
  ``transformers.AutoModelForCausalLM`` and ``AutoTokenizer`` load it.

  Args:
    gguf_path: The ``.gguf`` file.
    out_dir: The directory to create; it must not exist or be empty.
    dtype: dtype of the saved weights (float32 keeps the dequantized
      values exactly).

  Returns:
    ``out_dir``.

  Raises:
    ValueError: On an unsupported or damaged file, or an ``out_dir`` that
      holds files.
  """
  out = pathlib.Path(out_dir).expanduser()
  if out.exists() and (not out.is_dir() or any(out.iterdir())):
    raise ValueError(f"{out} exists and is not an empty directory; give a new "
                     "one")
  config, params = load(gguf_path, param_dtype=dtype)
  h = _header(gguf_path)
  files = tokenizer_files(gguf_path) if has_tokenizer(gguf_path) else {}
  ids = {f"{r}_token_id": _get(h, f"tokenizer.ggml.{k}_token_id", "int", None)
         for r, k in (("bos", "bos"), ("eos", "eos"), ("pad", "padding"))}
  out.parent.mkdir(parents=True, exist_ok=True)
  tmp = pathlib.Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}-"))
  try:
    hf.save(tmp, config, params, dtype=dtype,
            extra_config={k: v for k, v in ids.items() if v is not None})
    _write_files(tmp, files)
    if out.exists():
      out.rmdir()
    os.rename(tmp, out)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return out
