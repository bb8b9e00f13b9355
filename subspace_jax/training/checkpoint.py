"""Saving and resuming training runs with Orbax.

A checkpoint is one step directory with five items, written in one Orbax
save (committed together or not at all):

* ``state``: the :class:`~subspace_jax.training.train.TrainState` (step,
  parameters, optimizer state), written by every process in parallel;
* ``data``: the data position of every process (its data iterator's
  ``get_state()``, JSON), each written by its process to its own file
  ``process_I-of-N.json``, so that saving exchanges nothing between
  processes; restored as the list of all of them, in process order;
* ``config``: the run configuration (JSON), checked on resume so that a run
  never continues from a checkpoint of another model;
* ``checksums``: the dtype and a 64-bit hash of every array of the state
  (JSON; :func:`state_checksums`), computed on the devices before the save
  starts, and compared with the restored arrays' on restore. Orbax and
  TensorStore do not check array contents (Zarr v2 chunks carry no
  checksum, and zstd frames with flipped bytes can still decode), so
  without it a damaged file loads as garbage weights;
* ``version``: ``{"format": FORMAT}`` (JSON), the layout of the checkpoint
  (its items and the state's tree). A checkpoint of another format is
  refused in one line; one without the item is of format 1.

The state is restored *into* an abstract state (``ShapeDtypeStruct``\\ s with
shardings, :attr:`Setup.abstract_state <subspace_jax.training.train.Setup>`),
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
intact one; it never deletes anything. What a failed TensorStore read
prints (tracebacks from its threads, absl logs) is silenced meanwhile. A
checkpoint saved without checksums (an older version of this module) is
restored unverified, with a warning.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import gc
import json
import logging
import os
import re
import sys
import warnings
from typing import TYPE_CHECKING, Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from subspace_jax.matrix_view import path_str

if TYPE_CHECKING:
  from subspace_jax.training.train import TrainState

__all__ = [
    "Restored",
    "Checkpointer",
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
FORMAT = 4
_OLDEST_FORMAT = 1
# The hash of state_checksums; a checkpoint with another one is unverifiable.
_CHECKSUM_FORMAT = "subspace_jax.u32x2.v1"


class IncompatibleCheckpointError(ValueError):
  """A checkpoint that is readable but belongs to another model or optimizer."""


class UnreadableCheckpointError(RuntimeError):
  """No checkpoint that was asked for can be read."""


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
  if isinstance(error, _CorruptError):
    return str(error)
  root = _root_cause(error)
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


class _PerProcessJsonHandler(ocp.JsonCheckpointHandler):
  """A JSON item that every process writes to its own file.

  ``process_I-of-N.json`` holds process ``I``'s value (of ``N``); restoring
  reads all of them and returns their list in process order, so a run may
  resume with another number of processes where the values allow it.
  """

  async def async_save(self, directory, item=None, args=None):
    value = args.item if args is not None else item
    name = f"process_{jax.process_index()}-of-{jax.process_count()}.json"

    async def write():  # Once Orbax has made the step's directories.
      (directory / name).write_text(json.dumps(value))
    return [ocp.future.CommitFutureAwaitingContractedSignals(
        write(), name="data_positions_save")]

  def restore(self, directory, item=None, args=None) -> list:
    del item, args
    found = {}
    for path in directory.glob("process_*-of-*.json"):
      match = re.fullmatch(r"process_(\d+)-of-(\d+)\.json", path.name)
      if match:
        found[tuple(map(int, match.groups()))] = path
    counts = {n for _, n in found}
    if len(counts) != 1 or sorted(i for i, _ in found) != list(range(counts.pop())):
      names = ", ".join(sorted(p.name for p in found.values())) or "none"
      raise FileNotFoundError(f"the data positions are incomplete (files: {names})")
    return [json.loads(found[key].read_text()) for key in sorted(found)]


@ocp.args.register_with_handler(_PerProcessJsonHandler, for_save=True)
@dataclasses.dataclass
class _PerProcessJsonSave(ocp.args.CheckpointArgs):
  item: Any


@ocp.args.register_with_handler(_PerProcessJsonHandler, for_restore=True)
@dataclasses.dataclass
class _PerProcessJsonRestore(ocp.args.CheckpointArgs):
  pass


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
  """

  def __init__(
      self,
      directory: str | os.PathLike,
      *,
      save_interval_steps: int = 1000,
      max_to_keep: int = 3,
      async_save: bool = True,
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
    options = ocp.CheckpointManagerOptions(
        save_interval_steps=save_interval_steps,
        max_to_keep=max_to_keep,
        enable_async_checkpointing=async_save,
        # As save_interval_steps, but without Orbax's default rule that also
        # saves the first step seen when the directory is empty.
        save_decision_policy=policies.AnySavePolicy([
            policies.FixedIntervalPolicy(save_interval_steps),
            policies.PreemptionCheckpointingPolicy(),
        ]),
    )
    with _quiet():  # Orbax logs a step with lost metadata as it lists them.
      self._manager = ocp.CheckpointManager(
          directory,
          options=options,
          item_handlers={
              _STATE: ocp.StandardCheckpointHandler(),
              _DATA: _PerProcessJsonHandler(),
              _CONFIG: ocp.JsonCheckpointHandler(),
              _CHECKSUMS: ocp.JsonCheckpointHandler(),
              _VERSION: ocp.JsonCheckpointHandler(),
          },
      )
    self._closed = False

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
      config = self._manager.restore(
          int(step),
          args=ocp.args.Composite(**{_CONFIG: ocp.args.JsonRestore()}))[_CONFIG]
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
      False if the step was not due or is already saved.
    """
    step = int(step)
    if step in self._manager.all_steps():
      return False
    if not (force or self._manager.should_save(step)):
      return False
    # Hashed before the save starts, so before the state may be donated.
    hashes = state_checksums(state)
    dtypes = _dtypes(state)
    checksums = {
        "format": _CHECKSUM_FORMAT,
        "arrays": {name: [dtypes[name], h] for name, h in hashes.items()},
    }
    args = ocp.args.Composite(**{
        _STATE: ocp.args.StandardSave(state),
        _DATA: _PerProcessJsonSave(data_state),
        _CONFIG: ocp.args.JsonSave(config),
        _CHECKSUMS: ocp.args.JsonSave(checksums),
        _VERSION: ocp.args.JsonSave({"format": FORMAT}),
    })
    # Due, as decided above (deciding again could differ once a background
    # save has finished meanwhile).
    return self._manager.save(step, args=args, force=True)

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
    self._check_format(step)
    config = self._manager.restore(
        step, args=ocp.args.Composite(**{_CONFIG: ocp.args.JsonRestore()})
    )[_CONFIG]
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
    checksums, unverified = self._saved_checksums(step)
    target = abstract_state
    if checksums is not None:
      target = _with_saved_dtypes(abstract_state, checksums)
    out = self._manager.restore(
        step,
        args=ocp.args.Composite(**{
            _STATE: ocp.args.StandardRestore(target),
            _DATA: _PerProcessJsonRestore(),
        }),
    )
    state = out[_STATE]
    if checksums is not None:
      _verify(state, checksums)
      # Cast only after verifying the bits as saved.
      state = jax.tree.map(
          lambda x, want: x if x.dtype == want.dtype else x.astype(want.dtype),
          state, abstract_state,
      )
    positions = out[_DATA]
    if all(p is None for p in positions):  # Saved without data positions.
      positions = None
    return Restored(step, state, positions, config), unverified

  def _check_format(self, step: int) -> None:
    """Raises if ``step`` was written in another checkpoint format."""
    try:
      handlers = self._manager.metadata(step).item_handlers
    except Exception:  # pylint: disable=broad-except
      handlers = None
    if isinstance(handlers, dict) and _VERSION not in handlers:
      saved = _OLDEST_FORMAT  # Written before the version item existed.
    else:
      item = self._manager.restore(
          step, args=ocp.args.Composite(**{_VERSION: ocp.args.JsonRestore()})
      )[_VERSION]
      saved = item.get("format") if isinstance(item, dict) else None
      if not isinstance(saved, int) or isinstance(saved, bool):
        raise _CorruptError("the version item is garbled")
    if saved != FORMAT:
      age = "an older" if saved < FORMAT else "a newer"
      raise IncompatibleCheckpointError(
          f"checkpoint step {step} in {self.directory} was written by {age} "
          f"subspace_jax (format {saved}, this one reads {FORMAT}); resume it "
          "with that version or use another --checkpoint-dir"
      )

  def _saved_checksums(self, step: int) -> tuple[dict | None, str | None]:
    """The step's ``{path: [dtype, hash]}`` and, if there is none, why."""
    try:
      handlers = self._manager.metadata(step).item_handlers
    except Exception:  # pylint: disable=broad-except
      handlers = None
    if not isinstance(handlers, dict) or _CHECKSUMS in handlers:
      # Saved with checksums (or the step metadata is lost): they must read.
      saved = self._manager.restore(
          step, args=ocp.args.Composite(**{_CHECKSUMS: ocp.args.JsonRestore()})
      )[_CHECKSUMS]
    else:
      return None, "saved by an older version"
    if not isinstance(saved, dict) or not isinstance(saved.get("arrays"), dict):
      raise _CorruptError("the checksum item is garbled")
    if saved.get("format") != _CHECKSUM_FORMAT:
      return None, f"unknown checksum format {saved.get('format')!r}"
    return saved["arrays"], None

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
    """Blocks until any background save has been written and committed."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    """Waits for background saves, then releases Orbax's resources."""
    if not self._closed:
      self._manager.close()
      self._closed = True

  def __enter__(self) -> Checkpointer:
    return self

  def __exit__(self, *exc_info) -> None:
    self.close()
