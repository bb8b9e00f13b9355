"""Checksums of a train state's arrays, computed on the devices.

Orbax and TensorStore do not check array contents (Zarr v2 chunks carry no
checksum, and zstd frames with flipped bytes can still decode), so a
checkpoint holds, beside the state, the dtype and a 64-bit hash of every
array (:func:`state_checksums`), and a restored state is compared with them
(:func:`verify`): a damaged file never loads as garbage weights. The hash
mixes every element's bits with its position, on the devices where the
array lives (each device hashes its shard; the partial hashes are summed),
so nothing is gathered to the host.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from subspace_jax.matrix_view import path_str

__all__ = ["FORMAT", "SCHEMA", "CorruptError", "state_checksums", "verify",
           "with_saved_dtypes"]

FORMAT = "subspace_jax.u32x2.v1"
"""The hash of :func:`state_checksums`; a checkpoint with another one is
unverifiable."""


class CorruptError(Exception):
  """A checkpoint that reads, but whose contents are not what was saved (an
  array or item whose checksum does not match); the message is one line."""


# Odd constants of the hash (fixed by FORMAT): the position's
# salt, the multiplier of the mix, the second word's position multiplier.
_SALT, _MIX, _SECOND = 0x9E3779B1, 0x85EBCA77, 0x27D4EB2F


def _as_u32(x: jax.Array) -> jax.Array:
  """The bits of ``x`` as uint32 (traced): one word per element, or two
  (a trailing axis) for 64-bit dtypes; injective for every dtype."""
  if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
    x = jax.random.key_data(x)
  if jnp.iscomplexobj(x):
    x = jnp.stack([jnp.real(x), jnp.imag(x)], axis=-1)
  bits = x.dtype.itemsize * 8
  if x.dtype == jnp.bool_ or jnp.issubdtype(x.dtype, jnp.integer):
    if bits == 64:
      return jax.lax.bitcast_convert_type(x, jnp.uint32)
    # Widening (sign- or zero-extending) keeps distinct values distinct.
    wide = x.astype(jnp.int32 if jnp.issubdtype(x.dtype, jnp.signedinteger) else jnp.uint32)
    return jax.lax.bitcast_convert_type(wide, jnp.uint32)
  if bits in (8, 16, 32, 64) and jnp.finfo(x.dtype).bits == bits:
    unsigned = {8: jnp.uint8, 16: jnp.uint16, 32: jnp.uint32, 64: jnp.uint32}[bits]
    return jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32)
  # Sub-byte floats (float4): float32 holds each value exactly.
  return jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.uint32)


def _leaf_hash(x: jax.Array) -> jax.Array:
  """Two 32-bit hash words of one array (traced; one fused reduction).

  The bits ``u`` of the element at flat position ``i`` are mixed with the
  position, ``z = mix(u ^ (i * salt))`` (``mix``: xor-shift, multiply by an
  odd constant, xor-shift; it carries high bits into low ones), and summed
  with two position-dependent odd multipliers, mod 2**32::

    word0 = sum(z * (2 * i + 1)),  word1 = sum(z * ((i * c) | 1)).

  ``z`` is a bijection of ``u`` for each ``i`` and the multipliers are odd,
  so a change of any one element always changes both words; other changes
  go unnoticed with a chance of about 2**-64. Integer sums do not depend on
  the order of the reduction: the hash is the same on every mesh and every
  process.
  """
  u = _as_u32(jnp.asarray(x))
  uint = jnp.uint32
  pos = jnp.zeros(u.shape, uint)
  stride = 1
  for axis in reversed(range(u.ndim)):
    pos = pos + jax.lax.broadcasted_iota(uint, u.shape, axis) * uint(stride)
    stride = (stride * u.shape[axis]) % 2**32
  z = u ^ (pos * uint(_SALT))
  z = z ^ (z >> 15)
  z = z * uint(_MIX)
  z = z ^ (z >> 13)
  terms = (z * (pos * uint(2) + uint(1)), z * ((pos * uint(_SECOND)) | uint(1)))
  # Both words in one reduction (on CPU several times faster than two sums).
  words = jax.lax.reduce(
      terms, (uint(0), uint(0)), lambda a, b: (a[0] + b[0], a[1] + b[1]),
      tuple(range(u.ndim)),
  )
  return jnp.stack(words)


@functools.lru_cache(maxsize=None)
def _hash_fn(out_sharding) -> Any:
  """One jitted function: a list of arrays to their hashes,
  ``uint32[n, 2]``, replicated (``out_sharding``) if not None.

  One program for the whole state, not one per array: XLA:CPU can deadlock
  when many programs with collectives run at once on its device threads.
  """
  def hashes(leaves):
    if not leaves:
      return jnp.zeros((0, 2), jnp.uint32)
    return jnp.stack([_leaf_hash(x) for x in leaves])
  return jax.jit(hashes, out_shardings=out_sharding)


def state_checksums(state: Any) -> dict[str, str]:
  """A 64-bit hash (16 hex digits) of every array of ``state``, by path.

  One jitted function hashes all arrays where they are, one fused reduction
  per array (compiled once per process for a given state structure and
  sharding); only the hashes are copied to the host. Sharded arrays spanning
  several processes are fine (every process must call this): the hashes are
  replicated, the same on all of them, and do not depend on the sharding.

  Args:
    state: A pytree of arrays (``jax.Array``, NumPy or scalars), all on the
      same devices.

  Returns:
    ``{"params/embed/embedding": "0123456789abcdef", ...}``, with the paths
    that the checkpoint's metadata uses.
  """
  flat = jax.tree_util.tree_flatten_with_path(state)[0]
  leaves = [leaf for _, leaf in flat]
  replicated = None
  for leaf in leaves:
    sharding = getattr(leaf, "sharding", None)
    if isinstance(sharding, jax.sharding.NamedSharding):
      replicated = jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec())
      break
  words = np.asarray(jax.device_get(_hash_fn(replicated)(leaves)))
  return {
      path_str(path): f"{int(a):08x}{int(b):08x}"
      for (path, _), (a, b) in zip(flat, words)
  }


SCHEMA = {
    "type": "object",
    "required": ["format", "arrays"],
    "properties": {
        "format": {"type": "string"},
        "arrays": {"type": "object", "additionalProperties": {
            "type": "array", "minItems": 2, "maxItems": 2,
            "items": {"type": "string", "maxLength": 64}}},
        "config": {"type": "string", "pattern": "^[0-9a-f]{64}$"},
    },
}


def with_saved_dtypes(abstract_state: Any, checksums: dict) -> Any:
  """``abstract_state`` with each leaf's dtype as saved, so that what is
  hashed on restore is the saved bits (Orbax casts to the target dtype)."""
  def leaf(path, a):
    name = path_str(path)
    saved = checksums.get(name)
    if not saved or saved[0] == jnp.dtype(a.dtype).name:
      return a
    try:
      dtype = jnp.dtype(saved[0])
    except TypeError:  # Not a plain dtype: Orbax restores it as it can.
      return a
    return jax.ShapeDtypeStruct(a.shape, dtype, sharding=a.sharding)
  return jax.tree_util.tree_map_with_path(leaf, abstract_state)


def verify(state: Any, checksums: dict) -> None:
  """Raises :class:`CorruptError` naming the first array whose hash is not
  the saved one (or that has no saved hash)."""
  got = state_checksums(state)
  for name in sorted(got.keys() | checksums.keys()):
    if name not in checksums:
      raise CorruptError(f"array {name} has no saved checksum")
    if name not in got:
      raise CorruptError(f"array {name} has a checksum but was not restored")
    if got[name] != checksums[name][1]:
      raise CorruptError(f"array {name}: checksum mismatch")
