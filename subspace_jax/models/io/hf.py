"""Hugging Face LLaMA checkpoints in and out.

A Hugging Face LLaMA checkpoint is a directory with ``config.json`` and the
weights in ``model.safetensors`` or in several files listed by
``model.safetensors.index.json``::

    from subspace_jax.models import llama
    from subspace_jax.models.io import hf
    config, params = hf.load("path/to/llama", param_dtype="bfloat16")
    logits = llama.forward(config, params, tokens)
    hf.save("path/to/out", config, params)  # transformers loads it

:func:`load` maps ``config.json`` onto a
:class:`~subspace_jax.models.llama.LlamaConfig` (:func:`read_config`) and
each tensor onto the parameter tree the trainer uses (a plain nested dict;
kernels transposed to ``(in, out)``, the norms renamed, the layers stacked
on a leading axis for ``scan_layers=True``). It reads one tensor, or the
slice of one that a device holds, at a time, straight into the shardings of
a device mesh: the host never holds more than one tensor of the checkpoint.
Configurations this model cannot compute (RoPE scaling, biases, other
activations or architectures) are refused with one line naming the key.

:func:`save` writes the same layout back (``safetensors`` with
``format: pt`` metadata, split into files of at most ``max_shard_bytes``
with an index when larger), with a ``config.json`` that
``transformers.LlamaForCausalLM.from_pretrained`` loads as it is.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pathlib
import re
import tempfile
from typing import Any, Callable, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from subspace_jax import factored
from subspace_jax import jsonio
from subspace_jax import matrix_view as mv
from subspace_jax.models import llama
from subspace_jax.models.io import safetensors as stf
from subspace_jax import sharding as shd

__all__ = ["CONFIG_FILE", "WEIGHTS_FILE", "INDEX_FILE", "read_config",
           "load", "save", "hf_config"]

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

# Weight paths of a block (in the parameter tree, below layers/i or the
# stacked layers) -> (name below model.layers.{i}., stored transposed).
# Hugging Face stores a linear layer's weight (out, in); kernels here are
# (in, out).
_BLOCK = {
    "attn/q_proj/kernel": ("self_attn.q_proj.weight", True),
    "attn/k_proj/kernel": ("self_attn.k_proj.weight", True),
    "attn/v_proj/kernel": ("self_attn.v_proj.weight", True),
    "attn/o_proj/kernel": ("self_attn.o_proj.weight", True),
    "mlp/gate_proj/kernel": ("mlp.gate_proj.weight", True),
    "mlp/up_proj/kernel": ("mlp.up_proj.weight", True),
    "mlp/down_proj/kernel": ("mlp.down_proj.weight", True),
    "attn_norm/scale": ("input_layernorm.weight", False),
    "mlp_norm/scale": ("post_attention_layernorm.weight", False),
}
_TOP = {
    "embed/embedding": ("model.embed_tokens.weight", False),
    "final_norm/scale": ("model.norm.weight", False),
    "lm_head/kernel": ("lm_head.weight", True),
}
# Tensors older checkpoints carry that the model computes itself.
_IGNORED = re.compile(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq")

# LlamaConfig fields that fix the weights' shapes: they come from
# config.json and cannot be overridden.
_SHAPE_FIELDS = ("vocab_size", "hidden_size", "intermediate_size",
                 "num_heads", "num_layers", "num_kv_heads", "tie_embeddings")

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16,
           "float16": jnp.float16, "float64": jnp.float64}

DEFAULT_SHARD_BYTES = 5 * 2**30
"""Largest weights file :func:`save` writes (5 GiB, as transformers does)."""


# --------------------------------------------------------------------------
# config.json
# --------------------------------------------------------------------------


def _directory(path: str | os.PathLike[str]) -> pathlib.Path:
  directory = pathlib.Path(path).expanduser()
  if not directory.is_dir():
    raise ValueError(f"{directory} is not a directory; pass a Hugging Face "
                     "checkpoint directory (config.json and model.safetensors)"
                     " (subspace_jax.models.io.pretrained reads .gguf files "
                     "too)")
  return directory


def _read_json(path: pathlib.Path, schema: Mapping[str, Any]) -> Any:
  try:
    return jsonio.read(path, max_bytes=_MAX_JSON_BYTES, schema=schema)
  except FileNotFoundError:
    raise ValueError(f"{path} not found; a Hugging Face checkpoint directory "
                     "holds config.json and model.safetensors") from None
  except OSError as e:
    raise ValueError(f"cannot read {path} ({e.strerror or e})") from None


def _int(most: int, *, nullable: bool = False) -> dict[str, Any]:
  return {"type": ["integer", "null"] if nullable else "integer",
          "minimum": 1, "maximum": most}


def _number(**bounds: float) -> dict[str, Any]:
  return {"type": "number", **bounds}


_NULLABLE_STRING = {"type": ["string", "null"]}
_NULLABLE_BOOL = {"type": ["boolean", "null"]}
# RoPE settings: a kind, and a base where the newer rope_parameters has it.
_ROPE = {"type": ["object", "null"], "properties": {
    "rope_type": _NULLABLE_STRING, "type": _NULLABLE_STRING,
    "rope_theta": _number(exclusiveMinimum=0)}}
# config.json: the types and ranges of the keys read_config uses (others
# are ignored). The bounds are far above any LLaMA (405B: 126 layers,
# width 16384, MLP 53248, vocabulary 128256) and keep every product of
# them a small number; _MAX_PARAMETERS bounds the whole.
CONFIG_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["vocab_size", "hidden_size", "intermediate_size",
                 "num_attention_heads", "num_hidden_layers"],
    "properties": {
        "model_type": _NULLABLE_STRING,
        "architectures": {"type": ["array", "null"], "maxItems": 16,
                          "items": {"type": "string"}},
        "hidden_act": _NULLABLE_STRING,
        "attention_bias": _NULLABLE_BOOL,
        "mlp_bias": _NULLABLE_BOOL,
        "tie_word_embeddings": _NULLABLE_BOOL,
        "vocab_size": _int(2**24),
        "hidden_size": _int(2**17),
        "intermediate_size": _int(2**20),
        "num_attention_heads": _int(2**14),
        "num_key_value_heads": _int(2**14, nullable=True),
        "head_dim": _int(2**17, nullable=True),
        "num_hidden_layers": _int(2**12),
        "max_position_embeddings": _int(2**31),
        "rope_theta": _number(exclusiveMinimum=0),
        "rms_norm_eps": _number(exclusiveMinimum=0, maximum=1),
        "initializer_range": _number(minimum=0),
        "torch_dtype": _NULLABLE_STRING,
        "dtype": _NULLABLE_STRING,
        "rope_scaling": _ROPE,
        "rope_parameters": _ROPE,
    },
}
"""The JSON Schema ``config.json`` is checked against before it is used."""

INDEX_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["weight_map"],
    "properties": {"weight_map": {
        "type": "object",
        "additionalProperties": {"type": "string", "minLength": 1,
                                 "maxLength": 4096}}},
}
"""The JSON Schema of ``model.safetensors.index.json``."""

# A config.json implying more parameters than this is refused before any
# model is built from it (2e12: beyond any LLaMA).
_MAX_PARAMETERS = 2 * 10**12
# Longest config.json or index accepted.
_MAX_JSON_BYTES = 64 * 2**20
_INTEGER_KEYS = frozenset(k for k, v in CONFIG_SCHEMA["properties"].items()
                          if "integer" in v.get("type", ()))


def _parameters(hf: Mapping[str, Any]) -> int:
  """The number of weights ``config.json`` implies (exact integers: no
  model is built)."""
  d, f, layers = hf["hidden_size"], hf["intermediate_size"], hf["num_hidden_layers"]
  heads = hf["num_attention_heads"]
  kv = hf.get("num_key_value_heads") or heads
  head = d // heads
  attention = d * head * (2 * heads + 2 * kv)
  per_layer = attention + 3 * d * f + 2 * d
  lm_head = 0 if hf.get("tie_word_embeddings") else hf["vocab_size"] * d
  return hf["vocab_size"] * d + lm_head + layers * per_layer + d


def _inside(directory: pathlib.Path, name: str, where: str) -> pathlib.Path:
  """``directory / name`` for a file name an index gives, refused unless
  it names a file inside ``directory`` (no absolute path, no ``..``)."""
  parts = pathlib.PurePosixPath(name).parts
  if (not parts or name.startswith("/") or ".." in parts or "\0" in name):
    raise ValueError(f"{where} names {name[:200]!r}, which is not a file "
                     f"inside {directory}; an index may only name files of "
                     "its own directory")
  return directory.joinpath(*parts)




def _rope_theta(hf: Mapping[str, Any], where: str) -> float:
  """RoPE's base, refusing any scaling (``rope_scaling``, or the newer
  ``rope_parameters``)."""
  theta = hf.get("rope_theta")
  for key in ("rope_scaling", "rope_parameters"):
    rope = hf.get(key)
    if rope is None:
      continue
    if not isinstance(rope, Mapping):
      raise ValueError(f"{where}: {key} {rope!r} is not supported")
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind != "default":
      raise ValueError(f"{where}: {key} type {kind!r} is not supported (only "
                       "plain RoPE)")
    theta = rope.get("rope_theta", theta)
  return float(10000.0 if theta is None else theta)


def _check_supported(hf: Mapping[str, Any], where: str) -> None:
  """Refuses what this LLaMA cannot compute, naming the key."""
  model_type = hf.get("model_type")
  if model_type != "llama":
    raise ValueError(f"{where}: model_type {model_type!r} is not supported; "
                     "only 'llama' checkpoints can be loaded")
  archs = hf.get("architectures")
  if archs is not None and list(archs) != ["LlamaForCausalLM"]:
    raise ValueError(f"{where}: architectures {list(archs)} is not "
                     "supported; only ['LlamaForCausalLM']")
  act = hf.get("hidden_act", "silu")
  if act != "silu":
    raise ValueError(f"{where}: hidden_act {act!r} is not supported (only "
                     "'silu')")
  for key in ("attention_bias", "mlp_bias"):
    if hf.get(key):
      raise ValueError(f"{where}: {key} true is not supported (the model "
                       "has no biases)")
  heads, hidden = hf.get("num_attention_heads"), hf.get("hidden_size")
  head_dim = hf.get("head_dim")
  if (head_dim is not None and isinstance(heads, int) and heads > 0
      and head_dim * heads != hidden):
    raise ValueError(f"{where}: head_dim {head_dim} is not hidden_size / "
                     f"num_attention_heads ({hidden} / {heads}); not "
                     "supported")


def _dtype_of(hf: Mapping[str, Any], where: str) -> Any:
  name = hf.get("torch_dtype", hf.get("dtype")) or "float32"
  if name not in _DTYPES:
    raise ValueError(f"{where}: torch_dtype {name!r} is not supported; "
                     f"one of {', '.join(_DTYPES)}")
  return _DTYPES[name]


def read_config(path: str | os.PathLike[str],
                **overrides: Any) -> llama.LlamaConfig:
  """The :class:`~subspace_jax.models.llama.LlamaConfig` of a checkpoint.

  Args:
    path: The checkpoint directory (its ``config.json`` is read; for a
      ``.gguf`` file see :mod:`subspace_jax.models.io.pretrained`).
    **overrides: ``LlamaConfig`` fields that do not change the weights'
      shapes: ``param_dtype`` (default: the checkpoint's ``torch_dtype``),
      ``dtype``, ``scan_layers``, ``remat``, ``max_seq_len``, ...

  Raises:
    ValueError: On a configuration this model cannot compute (naming the
      key), a missing key, or an override of a shape field.
  """
  directory = _directory(path)
  where = str(directory / CONFIG_FILE)
  hf = _read_json(directory / CONFIG_FILE, CONFIG_SCHEMA)
  _check_supported(hf, where)
  fixed = sorted(set(overrides) & set(_SHAPE_FIELDS))
  if fixed:
    raise ValueError(f"{', '.join(fixed)} come(s) from {where} and cannot be "
                     "overridden")
  # The schema accepts 64.0 for an integer: made an int here.
  hf = {k: int(v) if k in _INTEGER_KEYS and v is not None else v
        for k, v in hf.items()}
  heads = hf["num_attention_heads"]
  kv = hf.get("num_key_value_heads")
  size = _parameters(hf)
  if size > _MAX_PARAMETERS:
    raise ValueError(f"{where}: its sizes make a model of {size:.3g} "
                     f"parameters, more than the {_MAX_PARAMETERS:.0e} this "
                     "loader accepts; the file is damaged or not a LLaMA")
  fields = dict(
      vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"],
      intermediate_size=hf["intermediate_size"], num_heads=heads,
      num_layers=hf["num_hidden_layers"],
      num_kv_heads=None if kv in (None, heads) else kv,
      max_seq_len=hf.get("max_position_embeddings", 2048),
      rope_theta=_rope_theta(hf, where),
      norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
      tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
      init_std=float(hf.get("initializer_range", 0.02)),
      param_dtype=_dtype_of(hf, where))
  fields.update(overrides)
  try:
    return llama.LlamaConfig(**fields)
  except TypeError as e:
    raise ValueError(f"bad LlamaConfig override ({e})") from None
  except ValueError as e:
    raise ValueError(f"{where}: {e}") from None


def hf_config(config: llama.LlamaConfig, dtype: Any = None) -> dict[str, Any]:
  """The ``config.json`` of ``config`` (weights stored as ``dtype``, default
  ``config.param_dtype``)."""
  dtype = jnp.dtype(dtype or config.param_dtype)
  return {
      "architectures": ["LlamaForCausalLM"],
      "model_type": "llama",
      "vocab_size": config.vocab_size,
      "hidden_size": config.hidden_size,
      "intermediate_size": config.intermediate_size,
      "num_hidden_layers": config.num_layers,
      "num_attention_heads": config.num_heads,
      "num_key_value_heads": config.kv_heads,
      "head_dim": config.head_dim,
      "max_position_embeddings": config.max_seq_len,
      "rms_norm_eps": config.norm_eps,
      "rope_theta": config.rope_theta,
      "rope_scaling": None,
      "tie_word_embeddings": config.tie_embeddings,
      "hidden_act": "silu",
      "attention_bias": False,
      "mlp_bias": False,
      "attention_dropout": 0.0,
      "initializer_range": config.init_std,
      "torch_dtype": dtype.name,
      "use_cache": True,
  }


# --------------------------------------------------------------------------
# Which tensor is which leaf
# --------------------------------------------------------------------------


def _sources(config: llama.LlamaConfig, path: str) -> list[tuple[str, bool]]:
  """The Hugging Face tensors of the leaf at ``path`` ('/'-joined):
  ``(name, transposed)``, one per layer of a stacked leaf."""
  parts = path.split("/")
  if parts[0] != "layers":
    return [_TOP[path]]
  if config.scan_layers:
    layers, within = range(config.num_layers), "/".join(parts[1:])
  else:
    layers, within = [int(parts[1])], "/".join(parts[2:])
  name, transposed = _BLOCK[within]
  return [(f"model.layers.{i}.{name}", transposed) for i in layers]


class _Leaf(NamedTuple):
  """A leaf of the parameter tree and the Hugging Face tensors it holds."""

  path: str
  value: Any
  sources: list[tuple[str, bool]]  # (name, transposed), one per layer.
  stacked: bool  # A scanned model's (layers, ...) leaf.

  @property
  def tensor_shape(self) -> tuple[int, ...]:
    """The shape of one of its tensors, in this model's layout."""
    return tuple(self.value.shape[1:] if self.stacked else self.value.shape)


def _leaves(config: llama.LlamaConfig, tree: Any) -> list[_Leaf]:
  """Every leaf of a parameter tree, in flatten order."""
  out = []
  for key, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    path = mv.path_str(key)
    out.append(_Leaf(path, leaf, _sources(config, path),
                     config.scan_layers and path.startswith("layers/")))
  return out


def _stored_shape(shape: tuple[int, ...], transposed: bool) -> tuple[int, ...]:
  return tuple(reversed(shape)) if transposed else tuple(shape)


# --------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------


class _Checkpoint:
  """The tensors of a checkpoint directory, by name, across its files.

  Every file an index names must be inside the directory (see
  :func:`_inside`); the safetensors files are opened when first needed.
  """

  def __init__(self, directory: pathlib.Path):
    self.directory = directory
    self._files: dict[str, stf.SafetensorsFile] = {}
    index = directory / INDEX_FILE
    single = directory / WEIGHTS_FILE
    if single.is_file():
      file = self._file(WEIGHTS_FILE)
      self.where = {name: WEIGHTS_FILE for name in file.tensors}
    elif index.is_file():
      content = _read_json(index, INDEX_SCHEMA)
      self.where = dict(content["weight_map"])
      for tensor, name in self.where.items():
        _inside(directory, name, f"{index}: weight_map/{tensor}")
    else:
      raise ValueError(f"{directory} has neither {WEIGHTS_FILE} nor "
                       f"{INDEX_FILE}; only safetensors checkpoints can be "
                       "loaded")

  def _file(self, name: str) -> stf.SafetensorsFile:
    if name not in self._files:
      path = _inside(self.directory, name, str(self.directory / INDEX_FILE))
      if not path.is_file():
        raise ValueError(f"{path} (listed in {INDEX_FILE}) not found")
      try:
        self._files[name] = stf.SafetensorsFile(path)
      except OSError as e:
        raise ValueError(f"cannot read {path} ({e.strerror or e})") from None
    return self._files[name]

  def info(self, name: str) -> stf.TensorInfo:
    file = self._file(self.where[name])
    if name not in file.tensors:
      raise ValueError(f"{file.path} has no tensor {name!r} (listed in "
                       f"{INDEX_FILE})")
    return file.tensors[name]

  def read(self, name: str, transposed: bool, index: tuple[slice, ...],
           dtype: Any) -> np.ndarray:
    """``tensor[index]`` in this model's layout (transposed back) and
    ``dtype``."""
    file = self._file(self.where[name])
    if transposed:
      part = file.read(name, tuple(reversed(index))).T
    else:
      part = file.read(name, index)
    return np.ascontiguousarray(part, dtype=dtype)


def _expected_tensors(config: llama.LlamaConfig) -> dict[str, tuple[int, ...]]:
  """The stored shape of every tensor ``config`` needs, by name, from a
  one-layer model: nothing of the size ``config`` claims is built."""
  one = dataclasses.replace(config, num_layers=1, scan_layers=False)
  abstract = jax.eval_shape(lambda: llama.ModelDef(one).init(0))
  expected, layer = {}, "model.layers.0."
  for leaf in _leaves(one, abstract):
    for name, transposed in leaf.sources:
      shape = _stored_shape(leaf.tensor_shape, transposed)
      if name.startswith(layer):
        for i in range(config.num_layers):
          expected[f"model.layers.{i}.{name[len(layer):]}"] = shape
      else:
        expected[name] = shape
  return expected


def _check_tensors(ckpt: _Checkpoint, config: llama.LlamaConfig) -> None:
  """Every tensor the model needs is there with its shape, and there is no
  tensor the model would not use."""
  expected = _expected_tensors(config)
  where = ckpt.directory
  for name, shape in expected.items():
    if name not in ckpt.where:
      raise ValueError(f"{where} has no tensor {name!r}, which config.json "
                       "implies; the checkpoint is incomplete or not a LLaMA")
    info = ckpt.info(name)
    if info.shape != shape:
      raise ValueError(f"{where}: tensor {name!r} has shape {list(info.shape)}"
                       f", config.json implies {list(shape)}")
  for name in ckpt.where:
    if name in expected or _IGNORED.fullmatch(name):
      continue
    if name == "lm_head.weight" and config.tie_embeddings:
      continue  # The tied copy of the embedding.
    if name.endswith(".bias"):
      raise ValueError(f"{where}: tensor {name!r} is a bias; biases are not "
                       "supported")
    raise ValueError(f"{where}: unexpected tensor {name!r} (not a weight of "
                     "this LLaMA)")


def _single_device_mesh() -> jax.sharding.Mesh:
  return shd.make_mesh(1, 1, 1, devices=jax.local_devices()[:1])


def load(path: str | os.PathLike[str], *, mesh: jax.sharding.Mesh | None = None,
         **config_overrides: Any) -> tuple[llama.LlamaConfig, dict]:
  """Loads a Hugging Face LLaMA checkpoint.

  Each weight is created directly in its sharding over ``mesh`` (from the
  model's logical axis names, as the trainer shards it): every device's
  slice is read from the file on its own, one tensor at a time, so the host
  holds at most one tensor (a stacked leaf of a scanned model is filled one
  layer at a time on the devices).

  Args:
    path: The checkpoint directory (``config.json`` and
      ``model.safetensors`` or ``model.safetensors.index.json``); for a
      ``.gguf`` file see :mod:`subspace_jax.models.io.pretrained`.
    mesh: The device mesh (default: this process's first device).
    **config_overrides: See :func:`read_config`; e.g.
      ``param_dtype="float32"`` to train in float32 from a bfloat16
      checkpoint, ``scan_layers=True``.

  Returns:
    ``(config, params)``: ``params`` is the plain nested dict the trainer
    uses for ``config`` (:meth:`subspace_jax.models.llama.ModelDef.init`'s
    layout), in ``config.param_dtype``.

  Raises:
    ValueError: On an unsupported configuration, a missing, misshapen or
      unexpected tensor, or a damaged file (one line naming it).
  """
  config = read_config(path, **config_overrides)
  ckpt = _Checkpoint(_directory(path))
  # The checkpoint's tensors are checked against config.json before the
  # model of the size it claims is built.
  _check_tensors(ckpt, config)
  model = llama.ModelDef(config)
  abstract = jax.eval_shape(lambda: model.init(0))
  mesh = mesh if mesh is not None else _single_device_mesh()
  shardings = shd.tree_shardings(abstract, model.logical_axes, mesh)
  leaves = _leaves(config, abstract)
  dtype = config.param_dtype
  loaded = []
  for leaf, sharding in zip(leaves, jax.tree.leaves(shardings)):
    if leaf.stacked:
      loaded.append(stacked_array(
          lambda n, t, index: ckpt.read(n, t, index, dtype), leaf.sources,
          leaf.value.shape, dtype, sharding))
    else:
      (name, transposed), = leaf.sources
      loaded.append(jax.make_array_from_callback(
          leaf.value.shape, sharding,
          lambda index, n=name, t=transposed: ckpt.read(n, t, index, dtype)))
  return config, jax.tree.unflatten(jax.tree.structure(abstract), loaded)


def stacked_array(read, sources, shape, dtype,
                  sharding: NamedSharding) -> jax.Array:
  """A ``(layers, ...)`` leaf, filled one layer at a time on the devices.

  ``sources`` holds each layer's ``(tensor name, transposed)``, and
  ``read(name, transposed, index)`` gives the slice ``index`` of that
  layer's tensor in ``dtype`` (the Hugging Face and GGUF readers).
  """
  spec = tuple(sharding.spec) + (None,) * (len(shape) - len(sharding.spec))
  layer_sharding = NamedSharding(sharding.mesh, PartitionSpec(*spec[1:]))
  out = jax.jit(lambda: jnp.zeros(shape, dtype), out_shardings=sharding)()
  put = jax.jit(lambda a, x, i: jax.lax.dynamic_update_index_in_dim(a, x, i, 0),
                donate_argnums=0, out_shardings=sharding)
  for i, (name, transposed) in enumerate(sources):
    layer = jax.make_array_from_callback(
        shape[1:], layer_sharding,
        lambda index, n=name, t=transposed: read(n, t, index))
    out = put(out, layer, i)
  return out


# --------------------------------------------------------------------------
# Saving
# --------------------------------------------------------------------------


def _to_host(x: jax.Array) -> np.ndarray:
  if getattr(x, "is_fully_addressable", True):
    return np.asarray(jax.device_get(x))
  from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def _tensors(config: llama.LlamaConfig, params: Any, dtype: Any
             ) -> list[tuple[str, np.dtype, tuple[int, ...], Callable]]:
  """``(name, dtype, shape, make)`` of every tensor, in the order
  transformers writes them (embedding, layer by layer, norm, lm_head)."""
  dtype = np.dtype(dtype)
  by_name = {}
  for leaf in _leaves(config, params):
    for i, (name, transposed) in enumerate(leaf.sources):
      def make(x=leaf.value, i=i, stacked=leaf.stacked, transposed=transposed):
        x = _to_host(x[i] if stacked else x)
        return np.ascontiguousarray(x.T if transposed else x, dtype=dtype)
      by_name[name] = (name, dtype, _stored_shape(leaf.tensor_shape,
                                                  transposed), make)
  order = ["model.embed_tokens.weight"]
  for i in range(config.num_layers):
    order += [f"model.layers.{i}.{name}" for name, _ in _BLOCK.values()]
  order += ["model.norm.weight", "lm_head.weight"]
  return [by_name[n] for n in order if n in by_name]


def _shards(tensors, max_bytes: int) -> list[list]:
  """Consecutive groups of tensors of at most ``max_bytes`` each (a larger
  tensor alone)."""
  groups, size = [[]], 0
  for t in tensors:
    nbytes = math.prod(t[2]) * t[1].itemsize
    if groups[-1] and size + nbytes > max_bytes:
      groups.append([])
      size = 0
    groups[-1].append(t)
    size += nbytes
  return groups


def _plain_weights(params: Any, subspace, opt_state) -> Any:
  if isinstance(params, nnx.State):
    return nnx.to_pure_dict(params)
  if not isinstance(params, factored.FactoredParams):
    return params
  if subspace is None or opt_state is None:
    raise ValueError("model-mode parameters (FactoredParams) are saved as the "
                     "merged W + P·B: pass subspace= and opt_state= (the "
                     "train state's) to hf.save")
  return jax.jit(subspace.merged_weights)(params, opt_state)


def save(path: str | os.PathLike[str], config: llama.LlamaConfig,
         params: Any, *, subspace: factored.Subspace | None = None,
         opt_state: Any = None, dtype: Any = None,
         max_shard_bytes: int = DEFAULT_SHARD_BYTES,
         extra_config: Mapping[str, Any] | None = None) -> list[str]:
  """Writes ``params`` as a Hugging Face LLaMA checkpoint.

  Tensors are fetched from the devices and written one at a time (a
  stacked leaf one layer at a time). In a multi-process run every process
  must call this; process 0 writes.

  Args:
    path: The directory (created if needed). Every file is written under a
      temporary name in it and renamed into place once all are complete,
      so a save that fails or is killed leaves the files that were there
      as they were (its temporary files are removed when it fails); files
      of the same names (an earlier save's) are replaced, and no other
      file is touched (an earlier save's other weights files are left:
      loaders follow ``model.safetensors``, else the index).
    config: The model's configuration.
    params: The parameter tree (plain dict or ``nnx.State``), or model
      mode's :class:`~subspace_jax.factored.FactoredParams`, which is saved
      merged (``W + P·B``): pass its ``subspace`` and the train state's
      ``opt_state`` then.
    subspace: Model mode's :class:`~subspace_jax.factored.Subspace`.
    opt_state: Model mode's optimizer state (it chooses ``P``).
    dtype: dtype of the saved weights (default: ``config.param_dtype``).
    max_shard_bytes: Largest weights file; a larger model is split into
      ``model-0000K-of-0000N.safetensors`` files with an index.
    extra_config: More ``config.json`` entries (e.g. ``bos_token_id``).

  Returns:
    The names of the files written.

  Raises:
    ValueError: If a sharded save would be hidden by a ``model.safetensors``
      in ``path`` (nothing is written then).
    OSError: If a file cannot be written (nothing is replaced then).
  """
  directory = pathlib.Path(path).expanduser()
  dtype = jnp.dtype(dtype or config.param_dtype)
  stf.dtype_name(dtype)  # Refuses a dtype safetensors cannot hold here.
  params = _plain_weights(params, subspace, opt_state)
  tensors = _tensors(config, params, dtype)
  groups = _shards(tensors, max_shard_bytes)
  names = ([WEIGHTS_FILE] if len(groups) == 1 else
           [f"model-{k + 1:05d}-of-{len(groups):05d}.safetensors"
            for k in range(len(groups))])
  if len(groups) > 1 and (directory / WEIGHTS_FILE).exists():
    # Loaders take model.safetensors before an index: it would hide this save.
    raise ValueError(
        f"{directory / WEIGHTS_FILE} exists and would be loaded instead of "
        f"the {len(groups)} files of this save (loaders prefer it to an "
        "index); move it away or save to another directory")
  writer = jax.process_index() == 0
  staged = _Staged(directory) if writer else None
  try:
    total = 0
    for name, group in zip(names, groups):
      if writer:
        with staged.open(name) as f:
          total += stf.write(f, group, metadata={"format": "pt"})
      else:
        for *_, make in group:  # Every process takes part in the gathers.
          make()
    written = list(names)
    if len(groups) > 1:
      index = {"metadata": {"total_size": total},
               "weight_map": {t[0]: n for n, g in zip(names, groups) for t in g}}
      if writer:
        with staged.open(INDEX_FILE) as f:
          f.write((json.dumps(index, indent=2) + "\n").encode())
      written.append(INDEX_FILE)
    if writer:
      content = dict(hf_config(config, dtype), **(extra_config or {}))
      with staged.open(CONFIG_FILE) as f:
        f.write((json.dumps(content, indent=2) + "\n").encode())
      staged.commit()
    written.append(CONFIG_FILE)
  finally:
    if staged is not None:
      staged.discard()
  return written


class _Staged:
  """Files written under temporary names in one directory and renamed into
  place together by :meth:`commit`, once all are complete; :meth:`discard`
  removes those not committed. Files of the directory that are not
  replaced are left alone."""

  def __init__(self, directory: pathlib.Path):
    directory.mkdir(parents=True, exist_ok=True)
    self.directory = directory
    self._temps: dict[str, str] = {}

  def open(self, name: str):
    """A new temporary file for ``name``, open for binary writing; it is
    flushed to the disk when closed."""
    fd, tmp = tempfile.mkstemp(dir=self.directory, prefix=f".{name}.",
                               suffix=".tmp")
    self._temps[name] = tmp
    return _SyncedFile(os.fdopen(fd, "wb"))

  def commit(self) -> None:
    """Renames every file into place, then syncs the directory."""
    for name, tmp in list(self._temps.items()):
      os.replace(tmp, self.directory / name)
      del self._temps[name]
    fd = os.open(self.directory, os.O_RDONLY)
    try:
      os.fsync(fd)
    finally:
      os.close(fd)

  def discard(self) -> None:
    for tmp in self._temps.values():
      try:
        os.unlink(tmp)
      except OSError:
        pass
    self._temps.clear()


class _SyncedFile:
  """A binary file that is fsynced before it is closed."""

  def __init__(self, f):
    self._f = f

  def write(self, data) -> int:
    return self._f.write(data)

  def __enter__(self):
    return self

  def __exit__(self, *exc_info) -> None:
    try:
      if exc_info[0] is None:
        self._f.flush()
        os.fsync(self._f.fileno())
    finally:
      self._f.close()
