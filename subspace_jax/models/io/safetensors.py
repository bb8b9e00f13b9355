"""Reading and writing the safetensors file format, a tensor at a time.

A safetensors file is an 8-byte little-endian header length ``N``, a JSON
header of ``N`` bytes (``{name: {"dtype", "shape", "data_offsets": [begin,
end]}, "__metadata__": {str: str}}``, offsets relative to the data that
follows the header) and the tensors' bytes, little-endian, in C order.

Files are read with the official ``safetensors`` package (``safe_open``),
which checks the header against the file (no gaps or overlaps between
tensors, no data outside the file) and reads any slice of one tensor
without loading the rest. The package cannot write a file whose tensors
come one at a time (its writers take them all at once), so :func:`write`
is this module's own: it writes the header from the declared dtypes and
shapes, then each tensor as it is produced, to a temporary file that is
renamed into place when complete, so that neither side ever holds a whole
model in host memory and a reader never sees a half-written file.
"""

from __future__ import annotations

import json
import math
import os
import struct
from typing import Any, BinaryIO, Callable, Iterable, Mapping, NamedTuple, Sequence

import jax.numpy as jnp
import numpy as np
import safetensors

from subspace_jax import atomic

__all__ = ["DTYPES", "TensorInfo", "SafetensorsFile", "dtype_name",
           "write"]

DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(jnp.bfloat16),
}
"""The safetensors dtypes of floating-point weights, as NumPy dtypes."""


def dtype_name(dtype: Any) -> str:
  """The safetensors name (``"BF16"``...) of a float dtype.

  Raises:
    ValueError: For a dtype that is not one of :data:`DTYPES`.
  """
  dtype = np.dtype(dtype)
  for name, known in DTYPES.items():
    if known == dtype:
      return name
  raise ValueError(f"dtype {dtype} cannot be written to safetensors here; "
                   f"use one of {', '.join(str(d) for d in DTYPES.values())}")


class TensorInfo(NamedTuple):
  """One tensor of a file: its dtype and shape."""

  dtype: np.dtype
  shape: tuple[int, ...]


def _first_line(error: BaseException) -> str:
  lines = str(error).strip().splitlines()
  return lines[0] if lines else type(error).__name__


class SafetensorsFile:
  """The tensors of a safetensors file, and reads of their slices.

  The ``safetensors`` package parses and checks the file (header length,
  JSON, dtypes, shapes, offsets that tile the data exactly, without gaps or
  overlaps) each time the file is opened; this class opens it once to list
  the tensors and again for every :meth:`read`, which copies only the slice
  asked for out of the memory-mapped file and unmaps it, so the process
  holds one slice at a time.

  Args:
    path: The file.

  Raises:
    ValueError: If the file is not a valid safetensors file (one line
      naming it and what the ``safetensors`` package found) or a tensor has
      a dtype other than :data:`DTYPES`.
    OSError: If the file cannot be opened.
  """

  def __init__(self, path: str | os.PathLike[str]):
    self.path = os.fspath(path)
    with self._open() as f:
      self.metadata = dict(f.metadata() or {})
      infos = {name: f.get_slice(name) for name in f.keys()}
      self.tensors: dict[str, TensorInfo] = {}
      for name, info in infos.items():
        code = info.get_dtype()
        if code not in DTYPES:
          raise ValueError(
              f"{self.path}: tensor {name!r} has dtype {code}; only "
              f"{', '.join(DTYPES)} weights are supported")
        self.tensors[name] = TensorInfo(DTYPES[code],
                                        tuple(int(d) for d in info.get_shape()))

  def _open(self):
    try:
      return safetensors.safe_open(self.path, framework="numpy")
    except safetensors.SafetensorError as e:
      raise ValueError(f"{self.path} is not a safetensors file, or is "
                       f"truncated or damaged ({_first_line(e)})") from None

  def read(self, name: str, index: Sequence[slice] | None = None
           ) -> np.ndarray:
    """Reads ``tensor[index]`` (a tuple of slices, one per leading axis).

    Args:
      name: The tensor's name.
      index: Slices of its axes (None: all of it).

    Returns:
      A new array in the stored dtype.
    """
    if name not in self.tensors:
      raise ValueError(f"{self.path} has no tensor {name!r}")
    with self._open() as f:
      try:
        part = f.get_slice(name)[tuple(index or ())]
      except safetensors.SafetensorError as e:
        raise ValueError(f"{self.path}: cannot read tensor {name!r} "
                         f"({_first_line(e)})") from None
    return np.asarray(part, dtype=self.tensors[name].dtype)


def write(path: str | os.PathLike[str] | BinaryIO,
          tensors: Iterable[tuple[str, np.dtype, tuple[int, ...],
                                  Callable[[], np.ndarray]]],
          metadata: Mapping[str, str] | None = None) -> int:
  """Writes a safetensors file from tensors produced one at a time.

  The header is written first from the declared dtypes and shapes, then
  each tensor is produced (``make()``), checked against its declaration and
  written, so at most one tensor is in memory. A path is written under a
  temporary name in its directory and renamed into place once complete
  (the temporary file is removed if anything fails), so the file is never
  seen half written and a file it replaces stays whole until then.

  Args:
    path: The file to write (replaced if it exists), or a binary file open
      for writing (written as it is; the caller makes it appear whole).
    tensors: ``(name, dtype, shape, make)`` in file order.
    metadata: The header's ``__metadata__`` (string values).

  Returns:
    The number of bytes of tensor data written.

  Raises:
    ValueError: If a produced tensor does not have its declared dtype and
      shape.
    OSError: If the file cannot be written (then nothing was replaced).
  """
  if not isinstance(path, (str, os.PathLike)):
    return _write_to(path, list(tensors), metadata)
  with atomic.replacing(path) as f:
    size = _write_to(f, list(tensors), metadata)
  return size


def _write_to(f: BinaryIO, tensors: list, metadata: Mapping[str, str] | None
              ) -> int:
  header: dict[str, Any] = {}
  if metadata:
    header["__metadata__"] = dict(metadata)
  offset = 0
  for name, dtype, shape, _ in tensors:
    size = math.prod(shape) * np.dtype(dtype).itemsize
    header[name] = {"dtype": dtype_name(dtype), "shape": list(shape),
                    "data_offsets": [offset, offset + size]}
    offset += size
  raw = json.dumps(header, separators=(",", ":")).encode()
  raw += b" " * (-len(raw) % 8)  # Data aligned to 8 bytes, as the format does.
  f.write(struct.pack("<Q", len(raw)))
  f.write(raw)
  for name, dtype, shape, make in tensors:
    array = np.asarray(make())
    if array.dtype != np.dtype(dtype) or array.shape != tuple(shape):
      raise ValueError(f"tensor {name!r} is {array.dtype} {array.shape}, "
                       f"declared {np.dtype(dtype)} {tuple(shape)}")
    f.write(np.ascontiguousarray(array).view(np.uint8).data)
  return offset
