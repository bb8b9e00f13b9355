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

import contextlib
import dataclasses
import hashlib
import json
import os
import re
import warnings
from typing import TYPE_CHECKING, Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from subspace_jax import jsonio
from subspace_jax.matrix_view import path_str
from subspace_jax.naming import setting
from subspace_jax.train import checksums as checksums_lib
from subspace_jax.train import quiet
from subspace_jax.train.checksums import state_checksums

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


_CorruptError = checksums_lib.CorruptError


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


_brief = quiet.brief


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
    self._quiet_saves = quiet.QuietSaves()
    try:
      with quiet.restoring():  # Orbax logs a step with lost metadata as it lists them.
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
          f"cannot use the checkpoint directory {directory} ({quiet.os_reason(e)}); "
          f"{quiet.advice(e)}") from None
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
      with quiet.restoring():
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
        "format": checksums_lib.FORMAT,
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
        f"({quiet.os_reason(error)}); {quiet.advice(error)}; {newest}")

  def _delete(self, step: int, why: str) -> bool:
    try:
      self._manager.delete(step)
      return True
    except Exception as e:  # pylint: disable=broad-except
      self._warn(f"could not delete checkpoint step {step} in "
                 f"{self.directory} ({why}): {quiet.os_reason(e)}; delete it by hand")
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
    with quiet.restoring():
      for candidate in reversed(steps):
        try:
          restored, unverified = self._restore_step(
              candidate, abstract_state, expected_config
          )
          break
        except IncompatibleCheckpointError:
          raise
        except Exception as e:  # pylint: disable=broad-except
          bad.append((candidate, quiet.reason(e, self.directory)))
    listed = ", ".join(str(s) for s, _ in bad)
    why = bad[0][1] if len(bad) == 1 else "; ".join(f"step {s}: {r}" for s, r in bad)
    # Raised and warned outside quiet.restoring(), which ignores all warnings.
    if restored is None:
      raise UnreadableCheckpointError(
          f"no readable checkpoint in {self.directory}: step(s) {listed} are "
          f"corrupt or incomplete (step {bad[0][0]}: {bad[0][1]}); remove "
          f"them or use another {setting('checkpoint_dir')}"
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
          f"{setting('checkpoint_dir')}"
      )
    arrays = None if checksums is None else checksums["arrays"]
    target = abstract_state
    if arrays is not None:
      target = checksums_lib.with_saved_dtypes(abstract_state, arrays)
    out = self._manager.restore(
        step,
        args=ocp.args.Composite(**{
            _STATE: ocp.args.StandardRestore(target),
            _DATA: _PerProcessJsonRestore(step=step),
        }),
    )
    state = out[_STATE]
    if arrays is not None:
      checksums_lib.verify(state, arrays)
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
          f"with that version or use another {setting('checkpoint_dir')}"
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
    if not isinstance(saved, dict) or saved.get("format") == checksums_lib.FORMAT:
      try:
        jsonio.check(saved, checksums_lib.SCHEMA, "checksums")
      except jsonio.JSONError as e:
        raise _CorruptError(f"the checksum item is garbled ({e})") from None
    if saved.get("format") != checksums_lib.FORMAT:
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
          f"({diffs}); use another {setting('checkpoint_dir')}"
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
