"""Reading and writing the safetensors file format, a tensor at a time.

A safetensors file is an 8-byte little-endian header length ``N``, a JSON
header of ``N`` bytes (``{name: {"dtype", "shape", "data_offsets": [begin,
end]}, "__metadata__": {str: str}}``, offsets relative to the data that
follows the header) and the tensors' bytes, little-endian, in C order.

This module reads any slice of one tensor with a positioned read of the rows
it covers (nothing is memory-mapped, so the process holds only what it
asked for), and writes a file from tensors produced one at a time, so that
neither side ever holds a whole model in host memory. The ``safetensors``
package (which the tests use to check both directions) is not needed.
"""

from __future__ import annotations

import json
import math
import os
import struct
from typing import Any, Callable, Iterable, Mapping, NamedTuple, Sequence

import jax.numpy as jnp
import numpy as np

__all__ = ["DTYPES", "TensorInfo", "SafetensorsFile", "dtype_name",
           "write"]

DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(jnp.bfloat16),
}
"""The safetensors dtypes of floating-point weights, as NumPy dtypes."""

# The format's own bound on the header (100 MB): a larger length is damage.
_MAX_HEADER = 100_000_000


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
  """Where one tensor is: its dtype, shape and absolute byte offset."""

  dtype: np.dtype
  shape: tuple[int, ...]
  offset: int


class SafetensorsFile:
  """The header of a safetensors file, and reads of its tensors' slices.

  Args:
    path: The file.

  Raises:
    ValueError: If the header is damaged (a bad length or JSON, offsets
      outside the file or not matching the shape) or a tensor has a dtype
      other than :data:`DTYPES`; the message names the file and the tensor.
    OSError: If the file cannot be read.
  """

  def __init__(self, path: str | os.PathLike[str]):
    self.path = os.fspath(path)
    size = os.path.getsize(self.path)
    with open(self.path, "rb") as f:
      head = f.read(8)
      if len(head) < 8:
        raise ValueError(f"{self.path} is not a safetensors file (only "
                         f"{size} bytes)")
      (length,) = struct.unpack("<Q", head)
      if length > min(_MAX_HEADER, size - 8):
        raise ValueError(f"{self.path} is not a safetensors file or is "
                         f"truncated (header of {length} bytes in a file of "
                         f"{size})")
      try:
        header = json.loads(f.read(length))
      except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{self.path}: the safetensors header is not valid "
                         f"JSON ({e})") from None
    if not isinstance(header, dict):
      raise ValueError(f"{self.path}: the safetensors header is not a JSON "
                       "object")
    self.metadata = header.pop("__metadata__", None) or {}
    data_start, data_size = 8 + length, size - 8 - length
    self.tensors: dict[str, TensorInfo] = {}
    for name, entry in header.items():
      self.tensors[name] = self._entry(name, entry, data_start, data_size)

  def _entry(self, name: str, entry: Any, start: int,
             data_size: int) -> TensorInfo:
    try:
      dtype_code, shape = entry["dtype"], tuple(int(d) for d in entry["shape"])
      begin, end = (int(o) for o in entry["data_offsets"])
    except (TypeError, KeyError, ValueError):
      raise ValueError(f"{self.path}: bad header entry for tensor {name!r}: "
                       f"{entry!r}") from None
    if dtype_code not in DTYPES:
      raise ValueError(f"{self.path}: tensor {name!r} has dtype {dtype_code}; "
                       f"only {', '.join(DTYPES)} weights are supported")
    dtype = DTYPES[dtype_code]
    expected = math.prod(shape) * dtype.itemsize
    if not 0 <= begin <= end <= data_size or end - begin != expected:
      raise ValueError(
          f"{self.path}: tensor {name!r} ({dtype_code} {list(shape)}) has "
          f"data offsets [{begin}, {end}] that do not fit its {expected} "
          f"bytes in the file's {data_size} bytes of data (truncated or "
          "damaged file)")
    return TensorInfo(dtype, shape, start + begin)

  def read(self, name: str, index: Sequence[slice] | None = None
           ) -> np.ndarray:
    """Reads ``tensor[index]`` (a tuple of step-1 slices, one per axis).

    Only the rows (first-axis entries) that ``index`` covers are read from
    the file.

    Args:
      name: The tensor's name.
      index: Slices of its axes (None: all of it).

    Returns:
      A new array in the stored dtype.
    """
    info = self.tensors[name]
    shape = info.shape
    index = tuple(index or ()) + (slice(None),) * (len(shape) - len(index or ()))
    if not shape:
      return self._read_bytes(info.offset, 1, info.dtype).reshape(())
    first = range(*index[0].indices(shape[0]))
    if first.step != 1:
      raise ValueError(f"only step-1 slices can be read, got {index[0]}")
    row = math.prod(shape[1:])
    rows = self._read_bytes(info.offset + first.start * row * info.dtype.itemsize,
                            len(first) * row, info.dtype)
    rows = rows.reshape((len(first),) + shape[1:])
    return np.ascontiguousarray(rows[(slice(None),) + index[1:]])

  def _read_bytes(self, offset: int, count: int, dtype: np.dtype) -> np.ndarray:
    out = np.empty(count, dtype)
    view = memoryview(out.view(np.uint8))
    with open(self.path, "rb", buffering=0) as f:
      f.seek(offset)
      done = 0
      while done < len(view):
        n = f.readinto(view[done:])
        if not n:
          raise ValueError(f"{self.path} ends early (truncated file)")
        done += n
    return out


def write(path: str | os.PathLike[str],
          tensors: Iterable[tuple[str, np.dtype, tuple[int, ...],
                                  Callable[[], np.ndarray]]],
          metadata: Mapping[str, str] | None = None) -> int:
  """Writes a safetensors file from tensors produced one at a time.

  The header is written first from the declared dtypes and shapes, then
  each tensor is produced (``make()``), checked against its declaration and
  written, so at most one tensor is in memory.

  Args:
    path: The file to write (replaced if it exists).
    tensors: ``(name, dtype, shape, make)`` in file order.
    metadata: The header's ``__metadata__`` (string values).

  Returns:
    The number of bytes of tensor data written.

  Raises:
    ValueError: If a produced tensor does not have its declared dtype and
      shape.
  """
  tensors = list(tensors)
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
  with open(path, "wb") as f:
    f.write(struct.pack("<Q", len(raw)))
    f.write(raw)
    for name, dtype, shape, make in tensors:
      array = np.asarray(make())
      if array.dtype != np.dtype(dtype) or array.shape != tuple(shape):
        raise ValueError(f"tensor {name!r} is {array.dtype} {array.shape}, "
                         f"declared {np.dtype(dtype)} {tuple(shape)}")
      f.write(np.ascontiguousarray(array).view(np.uint8).data)
  return offset
