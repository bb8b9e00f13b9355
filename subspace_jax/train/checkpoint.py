"""Saving and resuming training runs with Orbax.

A checkpoint is one step directory with five items, written in one Orbax
save (committed together or not at all):

* ``state``: the :class:`~subspace_jax.train.step.TrainState` (step,
  parameters, optimizer state), written by every process in parallel;
* ``data``: the data position of every process (its data iterator's
  ``get_state()``, JSON), each written by its process to its own file
  ``process_I-of-N.json``, so that saving exchanges nothing between
  processes, with the step, the process and a SHA-256 of them (an edited
  position, or one of another step, is a corrupt checkpoint); restored as
  the list of all of them, in process order;
* ``config``: the run configuration (JSON), checked on resume so that a run
  never continues from a checkpoint of another model;
* ``checksums``: the dtype and a 64-bit hash of every array of the state
  (JSON; :func:`state_checksums`), computed on the devices before the save
  starts, and compared with the restored arrays' on restore. Orbax and
  TensorStore do not check array contents (Zarr v2 chunks carry no
  checksum, and zstd frames with flipped bytes can still decode), so
  without it a damaged file loads as garbage weights; and a SHA-256 of the
  config item;
* ``version``: ``{"format": FORMAT}`` (JSON), the layout of the checkpoint
  (its items and the state's tree). A checkpoint of another format is
  refused in one line; one without the item is of format 1.

Every JSON item is read bounded in size and depth
(:mod:`subspace_jax.jsonio`).

The state is restored *into* an abstract state (``ShapeDtypeStruct``\\ s with
shardings, :attr:`Setup.abstract_state <subspace_jax.train.step.Setup>`),
which gives the exact pytree (NamedTuples, ``optax.MaskedNode`` placeholders)
and the target shardings, so a run saved on one mesh resumes on another::

    with Checkpointer(ckpt_dir, save_interval_steps=500) as ckpt:
      restored = ckpt.restore(setup.abstract_state, expected_config=config)
      if restored is None:
        state = setup.init(seed)
      else:
        state = restored.state
        data.set_state(restored.data_state[jax.process_index()])
      for step in range(int(state.step), total_steps):
        state, metrics = setup.train_step(state, next(data))
        ckpt.save(step + 1, state, data_state=data.get_state(), config=config)

If the newest checkpoint is corrupt (a checksum mismatch, a file lost,
truncated or overwritten, a step directory only half written),
:meth:`Checkpointer.restore` warns in one line and falls back to the newest
intact one; it never deletes anything then, but the corrupt step is
replaced when the run saves that step again. What a failed TensorStore read
prints (tracebacks from its threads, absl logs) is silenced meanwhile. A
checkpoint saved without checksums (an older version of this module) is
restored unverified, with a warning.

A save that cannot be written (a full disk, a read-only or forbidden
directory) raises one :class:`CheckpointSaveError` (at the next save, or
when waiting for it) saying what to do; the steps saved before are intact.
Steps beyond ``max_to_keep`` are deleted only once a newer one is
committed, and one that cannot be deleted is a one-line note.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import functools
import gc
import hashlib
import json
import logging
import os
import re
import sys
import warnings
from typing import TYPE_CHECKING, Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from subspace_jax import jsonio
from subspace_jax.matrix_view import path_str

if TYPE_CHECKING:
  from subspace_jax.train.step import TrainState

__all__ = [
    "Restored",
    "Checkpointer",
    "CheckpointSaveError",
    "CheckpointWarning",
    "FORMAT",
    "IncompatibleCheckpointError",
    "UnreadableCheckpointError",
    "state_checksums",
]

_STATE, _DATA, _CONFIG, _CHECKSUMS = "state", "data", "config", "checksums"
_VERSION = "version"
# The checkpoint format this module writes and reads. Raise it when a
# change makes older checkpoints unreadable (items, the state's tree); a
# checkpoint without the version item is of format 1 (the oldest).
# 2: model mode's counter and projection key moved from the parameters
#    (FactoredParams) to the optimizer state (FactoredState).
# 3: model mode's B on each leaf's lean side (r × min(m, n) shapes), and a
#    stacked leaf's projections drawn from fold_in(leaf key, layer).
# 4: the data item holds one file per process (process_I-of-N.json, grain
#    pipeline positions), not one JSON list gathered from all processes.
# 5: each data file holds its position with the step, the process and a
#    SHA-256 of them; the checksums item holds a SHA-256 of the config item.
#    Format 4 is still read (its data positions and config unverified).
FORMAT = 5
_OLDEST_FORMAT = 1
# Formats read besides FORMAT, and the first whose data positions and config
# carry checksums.
_ALSO_READ = (4,)
_VERIFIED_ITEMS_FORMAT = 5
# Largest JSON item read from a checkpoint (a config, the checksums of
# every array, one process's data position).
_MAX_ITEM_BYTES = 64 * 2**20
# The hash of state_checksums; a checkpoint with another one is unverifiable.
_CHECKSUM_FORMAT = "subspace_jax.u32x2.v1"


class IncompatibleCheckpointError(ValueError):
  """A checkpoint that is readable but belongs to another model or optimizer."""


class UnreadableCheckpointError(RuntimeError):
  """No checkpoint that was asked for can be read."""


class CheckpointSaveError(RuntimeError):
  """A checkpoint could not be written (a full disk, a read-only or
  forbidden directory); the message is one line saying what to do, and the
  checkpoints saved before are intact."""


class CheckpointWarning(UserWarning):
  """A restore that fell back past a corrupt checkpoint, or one that could
  not be verified. The message is one line."""


class _CorruptError(Exception):
  """A checkpoint that reads but whose contents are not what was saved."""


class Restored(NamedTuple):
  """What :meth:`Checkpointer.restore` returns.

  Attributes:
    step: The step of the checkpoint that was restored.
    state: The train state, placed in the shardings of the abstract state.
    data_state: The data positions saved with it, one per process that
      saved it (``data_state[i]`` is what process ``i`` passed to
      :meth:`Checkpointer.save`), or None.
    config: The run configuration saved with it, or None.
  """

  step: int
  state: TrainState
  data_state: list | None
  config: dict | None


def _brief(error: BaseException, limit: int = 160) -> str:
  """The first line of an error, shortened, for one-line messages."""
  lines = str(error).strip().splitlines()
  text = f"{type(error).__name__}: {lines[0] if lines else ''}"
  return text if len(text) <= limit else text[: limit - 3] + "..."


def _shapes(tree) -> dict[str, tuple[int, ...]]:
  """``{'opt_state/1/count': shape, ...}`` for every array leaf of ``tree``."""
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {
      path_str(path): tuple(leaf.shape)
      for path, leaf in flat
  }


def _dtypes(tree) -> dict[str, str]:
  """``{'opt_state/1/count': 'int32', ...}`` for every array leaf."""
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {
      path_str(path): jnp.result_type(leaf).name
      for path, leaf in flat
  }


def _tree_mismatch(saved, wanted) -> str | None:
  """A short description of how two ``{path: shape}`` maps differ, or None."""
  missing = sorted(wanted.keys() - saved.keys())
  extra = sorted(saved.keys() - wanted.keys())
  common = wanted.keys() & saved.keys()
  reshaped = sorted(k for k in common if wanted[k] != saved[k])
  parts = []
  if missing:
    parts.append(
        f"{len(missing)} array(s) not in the checkpoint (e.g. {missing[0]})"
    )
  if extra:
    parts.append(f"{len(extra)} array(s) not in this run (e.g. {extra[0]})")
  if reshaped:
    k = reshaped[0]
    parts.append(
        f"{len(reshaped)} array(s) with other shapes (e.g. {k}: "
        f"{saved[k]} saved, {wanted[k]} expected)"
    )
  return "; ".join(parts) or None


def _as_json(value: Any) -> Any:
  """``value`` as it comes back from JSON (tuples become lists, ...)."""
  return json.loads(json.dumps(value))


def _digest(value: Any) -> str:
  """SHA-256 (hex) of the canonical JSON of ``value`` (sorted keys, no
  spaces): the same before saving and after loading."""
  text = json.dumps(value, sort_keys=True, separators=(",", ":"),
                    allow_nan=False)
  return hashlib.sha256(text.encode()).hexdigest()


# --------------------------------------------------------------------------
# Checksums of the arrays
# --------------------------------------------------------------------------

# Odd constants of the hash (fixed by _CHECKSUM_FORMAT): the position's
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


# --------------------------------------------------------------------------
# Quiet restore attempts
# --------------------------------------------------------------------------

# Python loggers a failed restore writes to: Orbax logs through absl, and
# asyncio's loop exception handler ("Task exception was never retrieved",
# "Task was destroyed but it is pending!") through "asyncio".
_NOISY_LOGGERS = ("absl", "asyncio")


def _close_after_draining(loop: asyncio.AbstractEventLoop, close) -> None:
  """``loop.close()`` that first cancels and finishes the loop's tasks.

  When one read of a restore fails, Orbax closes its event loop with the
  other reads still pending; TensorStore then calls back into the closed
  loop from its threads ("RuntimeError: Event loop is closed", once per
  read) and the abandoned coroutines raise again when collected
  ("Exception ignored in: <coroutine ...>"). Ending them here, while the
  loop can still run, leaves nothing behind.
  """
  if not loop.is_closed() and not loop.is_running():
    pending = [t for t in asyncio.all_tasks(loop) if not t.done()]
    for task in pending:
      task.cancel()
    if pending:
      done, _ = loop.run_until_complete(asyncio.wait(pending, timeout=30))
      for task in done:
        if not task.cancelled():
          task.exception()  # Retrieved: no "Task exception was never retrieved".
  close()


@functools.cache
def _draining_policy_class() -> type | None:
  """A policy class that wraps another one and makes its new loops close
  by :func:`_close_after_draining`; None where asyncio has no policies
  (Python 3.16+)."""
  base_class = getattr(asyncio, "AbstractEventLoopPolicy", None)
  if base_class is None or not hasattr(asyncio, "set_event_loop_policy"):
    return None

  class DrainingPolicy(base_class):
    """The wrapped policy, but for how its new loops close."""

    def __init__(self, base):
      self._base = base

    def get_event_loop(self):
      return self._base.get_event_loop()

    def set_event_loop(self, loop):
      self._base.set_event_loop(loop)

    def new_event_loop(self):
      loop = self._base.new_event_loop()
      try:
        loop.close = functools.partial(_close_after_draining, loop, loop.close)
      except AttributeError:  # A loop type without instance attributes.
        pass
      return loop

    def get_child_watcher(self):  # Python < 3.14.
      return self._base.get_child_watcher()

    def set_child_watcher(self, watcher):
      self._base.set_child_watcher(watcher)

  return DrainingPolicy


@contextlib.contextmanager
def _quiet():
  """Silences what failed Orbax/TensorStore reads print, for the duration.

  Found by reproducing truncated and garbled array files (TensorStore
  itself writes nothing to the stderr file descriptor; all of it goes
  through Python):

  * unraisable exceptions (``sys.unraisablehook``), thousands of lines:
    TensorStore's threads report through it their callbacks into Orbax's
    closed event loop, and abandoned read coroutines their error once more
    when collected. The cause is removed as well: while quiet, Orbax's
    event loops cancel and finish their pending tasks before closing (see
    :func:`_close_after_draining`), and what is left is collected before
    the hook is put back;
  * the ``absl`` (Orbax) and ``asyncio`` loggers;
  * Python warnings (all; restore warns its own after this).

  Not thread-safe (it swaps process-wide hooks): restores run alone.
  """
  loggers = [logging.getLogger(name) for name in _NOISY_LOGGERS]
  disabled = [logger.disabled for logger in loggers]
  unraisablehook = sys.unraisablehook
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    draining = _draining_policy_class()
    policy = asyncio.get_event_loop_policy() if draining else None
    try:
      for logger in loggers:
        logger.disabled = True
      sys.unraisablehook = lambda unraisable: None
      if draining:
        asyncio.set_event_loop_policy(draining(policy))
      yield
    finally:
      if draining:
        asyncio.set_event_loop_policy(policy)
      gc.collect()
      sys.unraisablehook = unraisablehook
      for logger, was in zip(loggers, disabled):
        logger.disabled = was


class _QuietSaves(logging.Filter):
  """While started, holds back what a failing background save prints.

  Orbax's save threads log each failure with its traceback through absl
  (one record per thread that saw it) and TensorStore's callbacks into
  Orbax's event loops print "Event loop is closed" once the loop that
  failed is closed; a full disk gave hundreds of lines. The error records
  of Orbax's threads are dropped (the first message is kept for the
  :class:`CheckpointSaveError` the Checkpointer raises), and Orbax's event
  loops finish their pending tasks before closing
  (:func:`_close_after_draining`), so that no callback finds them closed.
  """

  def __init__(self):
    super().__init__()
    self.first_error: str | None = None
    self._policy = self._mine = None
    self._started = False

  def filter(self, record: logging.LogRecord) -> bool:
    if record.levelno < logging.ERROR or "orbax" not in record.pathname:
      return True
    if self.first_error is None:
      error = record.exc_info[1] if record.exc_info else None
      self.first_error = str(error) if error else record.getMessage()
    return False

  def start(self) -> None:
    logging.getLogger("absl").addFilter(self)
    draining = _draining_policy_class()
    if draining is not None:
      self._policy = asyncio.get_event_loop_policy()
      self._mine = draining(self._policy)
      asyncio.set_event_loop_policy(self._mine)
    self._started = True

  def stop(self) -> None:
    if not self._started:
      return
    self._started = False
    logging.getLogger("absl").removeFilter(self)
    # Put back only if no one has set another policy since (two
    # Checkpointers closed out of order leave the first one's).
    if self._policy is not None and asyncio.get_event_loop_policy() is self._mine:
      asyncio.set_event_loop_policy(self._policy)
    self._policy = self._mine = None


# What to do about a failed save, by the errno it failed with.
_NO_SPACE = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)
_FORBIDDEN = (errno.EACCES, errno.EPERM, errno.EROFS)


def _errno(error: Any) -> int | None:
  """The OS error code of a failed save: an OSError's, or the one
  TensorStore names in its message (``[os_error_code='28']``)."""
  while isinstance(error, BaseException):
    if isinstance(error, OSError) and error.errno:
      return error.errno
    found = re.search(r"os_error_code='?(\d+)", str(error))
    if found:
      return int(found.group(1))
    error = error.__cause__ or error.__context__
  if isinstance(error, str):
    found = re.search(r"os_error_code='?(\d+)", error)
    if found:
      return int(found.group(1))
  return None


def _os_reason(error: Any) -> str:
  """Why a save failed, in a few words: the OS error's, else the first
  line of the error without TensorStore's spec."""
  code = _errno(error)
  if code is not None:
    return os.strerror(code)
  if error is None:
    return "the save did not commit"
  text = str(error).split(" [tensorstore_spec=")[0].strip()
  text = text.splitlines()[0] if text else type(error).__name__
  return text if len(text) <= 200 else text[:197] + "..."


def _advice(error: Any) -> str:
  code = _errno(error)
  if code in _NO_SPACE:
    return "free space there or give another --checkpoint-dir"
  if code in _FORBIDDEN:
    return ("make the directory writable by this user or give another "
            "--checkpoint-dir")
  return "check the disk and the directory, or give another --checkpoint-dir"


def _root_cause(error: BaseException) -> BaseException:
  """The innermost cause of ``error``: Orbax wraps TensorStore's error (which
  names the file) in one that names only the array index."""
  seen = set()
  while id(error) not in seen:
    seen.add(id(error))
    inner = error.__cause__ or error.__context__
    if inner is None:
      break
    error = inner
  return error


def _reason(error: BaseException, directory: str) -> str:
  """Why a checkpoint could not be used, in one line: the array and the
  file (relative to ``directory``) where TensorStore names them."""
  root = _root_cause(error)
  for e in (error, root):
    if isinstance(e, _CorruptError):
      return str(e)
  text = str(root).split(" [tensorstore_spec=")[0].strip()
  text = text.splitlines()[0] if text else ""
  text = text.replace(directory.rstrip("/") + "/", "")
  # TensorStore's keys: "params.lm_head.kernel/.zarray", ".../0.1" (chunks).
  array = re.search(r'"([^"/]+)/(?:\.z\w+|[\d.]+)"', text)
  if not array:
    return _brief(root, 200)
  parts = [f"array {array.group(1).replace('.', '/')}"]
  files = [f for f in re.findall(r'local file "([^"]*)"', text) if not f.endswith("/")]
  detail = text.rsplit(": ", 1)[-1]
  if files:
    parts.append(f"file {files[-1]}")
    detail = text.rsplit(f'local file "{files[-1]}": ', 1)[-1]
  parts.append(detail)
  line = ": ".join(parts)
  return line if len(line) <= 240 else line[:237] + "..."


_CHECKSUMS_SCHEMA = {
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


def _with_saved_dtypes(abstract_state: Any, checksums: dict) -> Any:
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


def _verify(state: Any, checksums: dict) -> None:
  """Raises :class:`_CorruptError` naming the first array whose hash is not
  the saved one (or that has no saved hash)."""
  got = state_checksums(state)
  for name in sorted(got.keys() | checksums.keys()):
    if name not in checksums:
      raise _CorruptError(f"array {name} has no saved checksum")
    if name not in got:
      raise _CorruptError(f"array {name} has a checksum but was not restored")
    if got[name] != checksums[name][1]:
      raise _CorruptError(f"array {name}: checksum mismatch")


def _read_item(path) -> Any:
  """A JSON file of a checkpoint, bounded in size and depth
  (:mod:`subspace_jax.jsonio`); a local path or an ``etils.epath`` one."""
  with path.open("rb") as f:
    data = f.read(_MAX_ITEM_BYTES + 1)
  if len(data) > _MAX_ITEM_BYTES:
    raise _CorruptError(f"{path.name} is larger than {_MAX_ITEM_BYTES:,} bytes")
  try:
    return jsonio.loads(data)
  except jsonio.JSONError as e:
    raise _CorruptError(f"{path.parent.name}/{path.name} is {e}") from None


class _JsonHandler(ocp.JsonCheckpointHandler):
  """Orbax's JSON item, read through :func:`_read_item` (bounded)."""

  def restore(self, directory, item=None, args=None) -> Any:
    del item, args
    path = directory / self._filename
    if not path.exists():
      raise FileNotFoundError(f"File {path} not found.")
    return _read_item(path)


@ocp.args.register_with_handler(_JsonHandler, for_save=True)
@dataclasses.dataclass
class _JsonSave(ocp.args.CheckpointArgs):
  item: Any


@ocp.args.register_with_handler(_JsonHandler, for_restore=True)
@dataclasses.dataclass
class _JsonRestore(ocp.args.CheckpointArgs):
  pass


# A data file of format 5: the position, where it belongs, and its SHA-256.
_DATA_KEYS = frozenset({"step", "process", "count", "position", "sha256"})
_DATA_SCHEMA = {
    "type": "object",
    "required": sorted(_DATA_KEYS),
    "properties": {
        "step": {"type": "integer", "minimum": 0},
        "process": {"type": "integer", "minimum": 0},
        "count": {"type": "integer", "minimum": 1},
        "sha256": {"type": "string", "pattern": "^[0-9a-f]{64}$"},
    },
}


def _data_record(step: int, position: Any) -> dict[str, Any]:
  """This process's data file: its position, the step, the process and a
  SHA-256 of those (checked on restore: an edited position, or a file of
  another step or process, is a corrupt checkpoint)."""
  body = {"step": step, "process": jax.process_index(),
          "count": jax.process_count(), "position": position}
  return {**body, "sha256": _digest(body)}


def _data_position(value: Any, step: int | None, index: int, count: int,
                   name: str) -> tuple[Any, bool]:
  """The position in a data file and whether it was verified; raises
  :class:`_CorruptError` for a record that fails its checks."""
  if not (isinstance(value, dict) and value.keys() == _DATA_KEYS):
    return value, False  # Written before format 5: a bare position.
  try:
    jsonio.check(value, _DATA_SCHEMA, name)
  except jsonio.JSONError as e:
    raise _CorruptError(f"data position {e}") from None
  body = {k: v for k, v in value.items() if k != "sha256"}
  if _digest(body) != value["sha256"]:
    raise _CorruptError(f"data position {name}: checksum mismatch")
  if (value["process"], value["count"]) != (index, count) or (
      step is not None and value["step"] != step):
    raise _CorruptError(
        f"data position {name} is of step {value['step']}, process "
        f"{value['process']} of {value['count']}, not of this step")
  return value["position"], True


class _PerProcessJsonHandler(ocp.JsonCheckpointHandler):
  """A JSON item that every process writes to its own file.

  ``process_I-of-N.json`` holds process ``I``'s value (of ``N``), with the
  step and a SHA-256 (:func:`_data_record`) when saved with a step;
  restoring reads all of them and returns their list in process order, so
  a run may resume with another number of processes where the values allow
  it. Files of format 4 hold the bare value.
  """

  async def async_save(self, directory, item=None, args=None):
    value = args.item if args is not None else item
    step = getattr(args, "step", None)
    if step is not None:
      value = _data_record(step, value)
    name = f"process_{jax.process_index()}-of-{jax.process_count()}.json"

    async def write():  # Once Orbax has made the step's directories.
      (directory / name).write_text(json.dumps(value))
    return [ocp.future.CommitFutureAwaitingContractedSignals(
        write(), name="data_positions_save")]

  def restore(self, directory, item=None, args=None) -> list:
    """The positions, and (as the attribute ``verified``) whether all were
    checked against their checksums."""
    del item
    step = getattr(args, "step", None)
    found = {}
    for path in directory.glob("process_*-of-*.json"):
      match = re.fullmatch(r"process_(\d+)-of-(\d+)\.json", path.name)
      if match:
        found[tuple(map(int, match.groups()))] = path
    counts = {n for _, n in found}
    if len(counts) != 1 or sorted(i for i, _ in found) != list(range(counts.pop())):
      names = ", ".join(sorted(p.name for p in found.values())) or "none"
      raise FileNotFoundError(f"the data positions are incomplete (files: {names})")
    positions = _Positions()
    for (index, count) in sorted(found):
      position, verified = _data_position(
          _read_item(found[index, count]), step, index, count,
          found[index, count].name)
      positions.append(position)
      positions.verified &= verified
    return positions


class _Positions(list):
  """The data positions restored, in process order."""

  verified = True


@ocp.args.register_with_handler(_PerProcessJsonHandler, for_save=True)
@dataclasses.dataclass
class _PerProcessJsonSave(ocp.args.CheckpointArgs):
  item: Any
  step: int | None = None


@ocp.args.register_with_handler(_PerProcessJsonHandler, for_restore=True)
@dataclasses.dataclass
class _PerProcessJsonRestore(ocp.args.CheckpointArgs):
  step: int | None = None


class Checkpointer:
  """Periodic, asynchronous, sharded checkpoints of a training run.

  All processes must call :meth:`save` and :meth:`restore` with the same
  arguments; Orbax writes each process's shards and the JSON items once.

  Args:
    directory: Root directory of the run's checkpoints (one subdirectory per
      step). A local path or a URL that ``etils.epath`` understands
      (``gs://...``).
    save_interval_steps: :meth:`save` writes only at multiples of this (or
      when forced, or when a preemption was signalled).
    max_to_keep: Number of most recent checkpoints kept; older ones are
      deleted after each save.
    async_save: Write in a background thread; :meth:`save` returns once the
      arrays are copied off the devices, so the state may be donated next.
    warn: Called with a one-line note when an old checkpoint cannot be
      deleted (default: a :class:`CheckpointWarning`).

  A save that fails (a full disk, a read-only or forbidden directory) is
  reported by the next :meth:`save`, :meth:`wait_until_finished` or
  :meth:`close` as one :class:`CheckpointSaveError`; what Orbax's
  background threads print about it meanwhile (absl error logs with
  tracebacks, "Event loop is closed" from TensorStore's callbacks) is held
  back while a Checkpointer is open. Old checkpoints beyond ``max_to_keep``
  are deleted only once a newer one is committed, and one that cannot be
  deleted is a note, not a failure.
  """

  def __init__(
      self,
      directory: str | os.PathLike,
      *,
      save_interval_steps: int = 1000,
      max_to_keep: int = 3,
      async_save: bool = True,
      warn: Callable[[str], None] | None = None,
  ):
    if save_interval_steps < 1 or max_to_keep < 1:
      raise ValueError(
          f"save_interval_steps and max_to_keep must be >= 1, got "
          f"{save_interval_steps} and {max_to_keep}"
      )
    directory = os.fspath(directory)
    if "://" not in directory:
      directory = os.path.abspath(directory)
    policies = ocp.checkpoint_managers
    self._interval, self._keep = save_interval_steps, max_to_keep
    self._warn = warn or (lambda line: warnings.warn(
        CheckpointWarning(line), stacklevel=3))
    options = ocp.CheckpointManagerOptions(
        save_interval_steps=save_interval_steps,
        # Old steps are deleted here (_delete_old_steps), after a newer one
        # is committed: Orbax's own deletion fails the save it follows.
        max_to_keep=None,
        enable_async_checkpointing=async_save,
        # As save_interval_steps, but without Orbax's default rule that also
        # saves the first step seen when the directory is empty.
        save_decision_policy=policies.AnySavePolicy([
            policies.FixedIntervalPolicy(save_interval_steps),
            policies.PreemptionCheckpointingPolicy(),
        ]),
    )
    self._damaged: set[int] = set()  # Steps a restore found corrupt.
    self._undeletable: set[int] = set()  # Old steps that could not be deleted.
    self._saving: int | None = None  # The step of a save not yet checked.
    self._quiet_saves = _QuietSaves()
    try:
      with _quiet():  # Orbax logs a step with lost metadata as it lists them.
        self._manager = ocp.CheckpointManager(
            directory,
            options=options,
            item_handlers={
                _STATE: ocp.StandardCheckpointHandler(),
                _DATA: _PerProcessJsonHandler(),
                _CONFIG: _JsonHandler(),
                _CHECKSUMS: _JsonHandler(),
                _VERSION: _JsonHandler(),
            },
        )
    except OSError as e:
      raise CheckpointSaveError(
          f"cannot use the checkpoint directory {directory} ({_os_reason(e)}); "
          f"{_advice(e)}") from None
    self._closed = False
    self._quiet_saves.start()

  @property
  def directory(self) -> str:
    """The root directory of the checkpoints."""
    return str(self._manager.directory)

  def all_steps(self) -> list[int]:
    """Steps of all finished checkpoints, oldest first."""
    return sorted(self._manager.all_steps())

  def latest_step(self) -> int | None:
    """The newest finished checkpoint's step (None if there is none).

    The step may still turn out to be unreadable; :meth:`restore` checks.
    """
    return self._manager.latest_step()

  def saved_config(self, step: int) -> dict | None:
    """The run configuration saved with ``step``, without the state.

    Returns:
      The ``config`` item, or None if the step has none or it cannot be
      read (:meth:`restore` then reports the damage).
    """
    try:
      with _quiet():
        config = self._manager.restore(
            int(step),
            args=ocp.args.Composite(**{_CONFIG: _JsonRestore()}))[_CONFIG]
        self._verify_config(int(step), config)
    except Exception:  # pylint: disable=broad-except
      return None
    return config if isinstance(config, dict) else None

  def save(
      self,
      step: int,
      state: TrainState,
      *,
      data_state: dict | None = None,
      config: dict | None = None,
      force: bool = False,
  ) -> bool:
    """Saves a checkpoint if ``step`` is due (or ``force``).

    Args:
      step: The number of steps taken (``int(state.step)``).
      state: The train state; it may be donated as soon as this returns.
      data_state: This process's data position (its data iterator's
        JSON-able ``get_state()``); every process saves its own.
      config: The JSON-able run configuration; its ``"model"`` entry is what
        :meth:`restore` compares with ``expected_config``.
      force: Save even if ``step`` is not a multiple of the interval.

    Returns:
      True if a save started (it may still be running in the background);
      False if the step was not due or is already saved. A step that
      :meth:`restore` found corrupt is replaced.

    Raises:
      CheckpointSaveError: If this save, or the one before it, could not
        be written.
    """
    step = int(step)
    self._settle()  # Raises if the previous save failed.
    exists = step in self._manager.all_steps()
    if exists and step not in self._damaged:
      return False
    # Due by the interval (not Orbax's should_save, which refuses any step
    # older than the newest, such as one re-trained after a fallback).
    if not (force or step % self._interval == 0
            or self._manager.reached_preemption(step)):
      return False
    if exists:  # Corrupt: replaced by the re-trained step.
      self._delete(step, "it is corrupt and being replaced")
      self._damaged.discard(step)
      if step in self._manager.all_steps():
        return False
    # Hashed before the save starts, so before the state may be donated.
    hashes = state_checksums(state)
    dtypes = _dtypes(state)
    checksums = {
        "format": _CHECKSUM_FORMAT,
        "arrays": {name: [dtypes[name], h] for name, h in hashes.items()},
    }
    checksums["config"] = _digest(_as_json(config))
    args = ocp.args.Composite(**{
        _STATE: ocp.args.StandardSave(state),
        _DATA: _PerProcessJsonSave(data_state, step=step),
        _CONFIG: _JsonSave(config),
        _CHECKSUMS: _JsonSave(checksums),
        _VERSION: _JsonSave({"format": FORMAT}),
    })
    # Due, as decided above (deciding again could differ once a background
    # save has finished meanwhile).
    self._saving = step
    try:
      started = self._manager.save(step, args=args, force=True)
    except Exception as e:  # pylint: disable=broad-except
      self._saving = None
      raise self._save_error(step, e) from None
    if not started:
      self._saving = None
    return started

  def _settle(self) -> None:
    """Waits for the save in flight; raises :class:`CheckpointSaveError` if
    it failed (it is then not committed); deletes the steps beyond
    ``max_to_keep`` once it is."""
    step, self._saving = self._saving, None
    try:
      self._manager.wait_until_finished()
    except Exception as e:  # pylint: disable=broad-except
      raise self._save_error(step, e) from None
    if step is not None:
      self._manager.reload()
      if step not in self._manager.all_steps():  # Orbax only logged why.
        raise self._save_error(step, self._quiet_saves.first_error)
    self._delete_old_steps()

  def _save_error(self, step: int | None, error) -> CheckpointSaveError:
    self._quiet_saves.first_error = None
    if isinstance(error, CheckpointSaveError):
      return error
    latest = [s for s in self._manager.all_steps() if s != step]
    newest = (f"the newest checkpoint, step {max(latest)}, is intact" if latest
              else "no checkpoint was saved before")
    what = f"step {step}" if step is not None else "a checkpoint"
    return CheckpointSaveError(
        f"cannot save checkpoint {what} in {self.directory} "
        f"({_os_reason(error)}); {_advice(error)}; {newest}")

  def _delete(self, step: int, why: str) -> bool:
    try:
      self._manager.delete(step)
      return True
    except Exception as e:  # pylint: disable=broad-except
      self._warn(f"could not delete checkpoint step {step} in "
                 f"{self.directory} ({why}): {_os_reason(e)}; delete it by hand")
      return False

  def _delete_old_steps(self) -> None:
    """Deletes the oldest steps beyond ``max_to_keep`` (a note for each one
    that cannot be deleted; it is not tried again)."""
    steps = self.all_steps()
    for step in steps[:max(0, len(steps) - self._keep)]:
      if step in self._undeletable:
        continue
      if not self._delete(step, f"older than the newest {self._keep}"):
        self._undeletable.add(step)

  def restore(
      self,
      abstract_state: Any,
      *,
      step: int | None = None,
      expected_config: dict | None = None,
  ) -> Restored | None:
    """Restores the newest intact checkpoint (or ``step``).

    Every array restored is hashed and compared with the checksum saved with
    it. A corrupt checkpoint (a checksum mismatch; missing, truncated or
    garbled files; a half-written step) is skipped, and a
    :class:`CheckpointWarning` of one line names it, why, and the step used
    instead; with an explicit ``step`` there is no fallback. Nothing on disk
    is changed. What Orbax and TensorStore print about failed reads is
    silenced.

    A checkpoint saved without checksums (by an older version of this
    module) is restored unverified, with a :class:`CheckpointWarning`
    saying so: refusing it would strand runs saved before checksums
    existed. One whose step metadata lists the checksum item (or is lost)
    but that lacks the item is corrupt.

    Args:
      abstract_state: ``ShapeDtypeStruct``\\ s with shardings of the train
        state (``Setup.abstract_state``): the exact pytree to rebuild and
        where to place it, which may be another mesh than the saving one.
      step: A particular step to restore; None for the newest readable one.
      expected_config: The current run's configuration; if the checkpoint's
        ``config["model"]`` differs from ``expected_config["model"]`` the
        restore fails.

    Returns:
      The restored checkpoint, or None if the directory has none.

    Raises:
      IncompatibleCheckpointError: (a ``ValueError``) if the checkpoint is of
        another model (config or tree structure/shapes differ) or of another
        checkpoint format (:data:`FORMAT`).
      UnreadableCheckpointError: if no candidate checkpoint is intact; the
        message is one line.
    """
    steps = self.all_steps()
    if step is not None:
      if step not in steps:
        raise UnreadableCheckpointError(
            f"no checkpoint for step {step} in {self.directory} (steps there: "
            f"{', '.join(map(str, steps)) or 'none'})"
        )
      steps = [step]
    if not steps:
      return None
    bad: list[tuple[int, str]] = []
    restored = unverified = None
    with _quiet():
      for candidate in reversed(steps):
        try:
          restored, unverified = self._restore_step(
              candidate, abstract_state, expected_config
          )
          break
        except IncompatibleCheckpointError:
          raise
        except Exception as e:  # pylint: disable=broad-except
          bad.append((candidate, _reason(e, self.directory)))
    listed = ", ".join(str(s) for s, _ in bad)
    why = bad[0][1] if len(bad) == 1 else "; ".join(f"step {s}: {r}" for s, r in bad)
    # Raised and warned outside _quiet(), which ignores all warnings.
    if restored is None:
      raise UnreadableCheckpointError(
          f"no readable checkpoint in {self.directory}: step(s) {listed} are "
          f"corrupt or incomplete (step {bad[0][0]}: {bad[0][1]}); remove "
          "them or use another --checkpoint-dir"
      )
    if bad:
      warnings.warn(CheckpointWarning(
          f"checkpoint step(s) {listed} in {self.directory} "
          f"{'is' if len(bad) == 1 else 'are'} corrupt ({why}); restored step "
          f"{restored.step} instead"
      ), stacklevel=2)
    if unverified:
      warnings.warn(CheckpointWarning(
          f"checkpoint step {restored.step} in {self.directory} has no "
          f"checksums ({unverified}); restored it unverified"
      ), stacklevel=2)
    if bad:
      self._damaged.update(s for s, _ in bad)
    return restored

  def _restore_step(
      self, step: int, abstract_state: Any, expected_config: dict | None
  ) -> tuple[Restored, str | None]:
    """Checks, restores and verifies one step.

    Returns:
      The restored step, and why it is unverified (None if verified).

    Raises:
      IncompatibleCheckpointError: On a checkpoint of another model or
        format.
      Exception: Any other error means the step is corrupt.
    """
    saved_format = self._check_format(step)
    checksums, unverified = self._saved_checksums(step)
    config = self._manager.restore(
        step, args=ocp.args.Composite(**{_CONFIG: _JsonRestore()})
    )[_CONFIG]
    config_verified = self._verify_config(step, config, checksums)
    if expected_config is not None:
      self._check_model(step, config, expected_config)
    metadata = self._manager.item_metadata(step)[_STATE]
    if metadata is None:
      raise FileNotFoundError(f"step {step} has no readable state metadata")
    mismatch = _tree_mismatch(_shapes(metadata.tree), _shapes(abstract_state))
    if mismatch:
      raise IncompatibleCheckpointError(
          f"checkpoint step {step} in {self.directory} does not fit this "
          f"model/optimizer: {mismatch}; use the same settings or another "
          "--checkpoint-dir"
      )
    arrays = None if checksums is None else checksums["arrays"]
    target = abstract_state
    if arrays is not None:
      target = _with_saved_dtypes(abstract_state, arrays)
    out = self._manager.restore(
        step,
        args=ocp.args.Composite(**{
            _STATE: ocp.args.StandardRestore(target),
            _DATA: _PerProcessJsonRestore(step=step),
        }),
    )
    state = out[_STATE]
    if arrays is not None:
      _verify(state, arrays)
      # Cast only after verifying the bits as saved.
      state = jax.tree.map(
          lambda x, want: x if x.dtype == want.dtype else x.astype(want.dtype),
          state, abstract_state,
      )
    positions = out[_DATA]
    data_verified = getattr(positions, "verified", True)
    if all(p is None for p in positions):  # Saved without data positions.
      positions = None
    positions = None if positions is None else list(positions)
    if (not data_verified or not config_verified) and unverified is None:
      if saved_format >= _VERIFIED_ITEMS_FORMAT:
        what = "data position" if not data_verified else "config"
        raise _CorruptError(f"the {what} item has no checksum")
      unverified = (f"format {saved_format}: its data position and config "
                    "carry none")
    return Restored(step, state, positions, config), unverified

  def _verify_config(self, step: int, config: Any,
                     checksums: dict | None = None) -> bool:
    """Whether the config item matches its checksum (False: none saved);
    raises :class:`_CorruptError` on a mismatch."""
    if checksums is None:
      checksums, _ = self._saved_checksums(step)
    if checksums is None or "config" not in checksums:
      return False
    if _digest(config) != checksums["config"]:
      raise _CorruptError("config: checksum mismatch")
    return True

  def _check_format(self, step: int) -> int:
    """The format ``step`` was written in; raises if it is not read here."""
    try:
      handlers = self._manager.metadata(step).item_handlers
    except Exception:  # pylint: disable=broad-except
      handlers = None
    if isinstance(handlers, dict) and _VERSION not in handlers:
      saved = _OLDEST_FORMAT  # Written before the version item existed.
    else:
      item = self._manager.restore(
          step, args=ocp.args.Composite(**{_VERSION: _JsonRestore()})
      )[_VERSION]
      saved = item.get("format") if isinstance(item, dict) else None
      if not isinstance(saved, int) or isinstance(saved, bool):
        raise _CorruptError("the version item is garbled")
    if saved != FORMAT and saved not in _ALSO_READ:
      age = "an older" if saved < FORMAT else "a newer"
      raise IncompatibleCheckpointError(
          f"checkpoint step {step} in {self.directory} was written by {age} "
          f"subspace_jax (format {saved}, this one reads {FORMAT}); resume it "
          "with that version or use another --checkpoint-dir"
      )
    return saved

  def _saved_checksums(self, step: int) -> tuple[dict | None, str | None]:
    """The step's checksums item (``{"arrays": {path: [dtype, hash]},
    "config": hash}``) and, if there is none, why."""
    try:
      handlers = self._manager.metadata(step).item_handlers
    except Exception:  # pylint: disable=broad-except
      handlers = None
    if not isinstance(handlers, dict) or _CHECKSUMS in handlers:
      # Saved with checksums (or the step metadata is lost): they must read.
      saved = self._manager.restore(
          step, args=ocp.args.Composite(**{_CHECKSUMS: _JsonRestore()})
      )[_CHECKSUMS]
    else:
      return None, "saved by an older version"
    if not isinstance(saved, dict) or saved.get("format") == _CHECKSUM_FORMAT:
      try:
        jsonio.check(saved, _CHECKSUMS_SCHEMA, "checksums")
      except jsonio.JSONError as e:
        raise _CorruptError(f"the checksum item is garbled ({e})") from None
    if saved.get("format") != _CHECKSUM_FORMAT:
      return None, f"unknown checksum format {str(saved.get('format'))[:40]!r}"
    return saved, None

  def _check_model(self, step: int, config, expected: dict) -> None:
    """Raises if the saved config's "model" entry differs from ``expected``'s."""
    saved = (config or {}).get("model")
    wanted = expected.get("model")
    if saved is None or wanted is None:
      return
    wanted = _as_json(wanted)
    keys = sorted(
        k for k in saved.keys() | wanted.keys() if saved.get(k) != wanted.get(k)
    )
    if keys:
      diffs = ", ".join(
          f"{k}: {saved.get(k)!r} saved, {wanted.get(k)!r} now" for k in keys
      )
      raise IncompatibleCheckpointError(
          f"checkpoint step {step} in {self.directory} is of another model "
          f"({diffs}); use another --checkpoint-dir"
      )

  def wait_until_finished(self) -> None:
    """Blocks until any background save has been written and committed.

    Raises:
      CheckpointSaveError: If it could not be written.
    """
    self._settle()

  def close(self) -> None:
    """Waits for background saves, then releases Orbax's resources.

    Raises:
      CheckpointSaveError: If the last save could not be written (the
        resources are released all the same).
    """
    if self._closed:
      return
    self._closed = True
    try:
      self._settle()
    finally:
      try:
        with contextlib.suppress(Exception):
          self._manager.close()
      finally:
        self._quiet_saves.stop()

  def __enter__(self) -> Checkpointer:
    return self

  def __exit__(self, *exc_info) -> None:
    self.close()
