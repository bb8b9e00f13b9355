"""Saving and resuming training runs with Orbax.

A checkpoint is one step directory with three items:

* ``state``: the :class:`~subspace_jax.training.train.TrainState` (step,
  parameters, optimizer state), written by every process in parallel;
* ``data``: the data iterator's ``get_state()`` (JSON);
* ``config``: the run configuration (JSON), checked on resume so that a run
  never continues from a checkpoint of another model.

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
        data.set_state(restored.data_state)
      for step in range(int(state.step), total_steps):
        state, metrics = setup.train_step(state, next(data))
        ckpt.save(step + 1, state, data_state=data.get_state(), config=config)

If the newest checkpoint cannot be read (a file lost or overwritten, a step
directory only half written), :meth:`Checkpointer.restore` warns and falls
back to the newest one that can; it never deletes anything.
"""

from __future__ import annotations

import json
import os
import warnings
from typing import Any, NamedTuple

import jax
import orbax.checkpoint as ocp

from subspace_jax.training.train import TrainState

__all__ = [
    "Restored",
    "Checkpointer",
    "IncompatibleCheckpointError",
    "UnreadableCheckpointError",
]

_STATE, _DATA, _CONFIG = "state", "data", "config"


class IncompatibleCheckpointError(ValueError):
  """A checkpoint that is readable but belongs to another model or optimizer."""


class UnreadableCheckpointError(RuntimeError):
  """No checkpoint that was asked for can be read."""


class Restored(NamedTuple):
  """What :meth:`Checkpointer.restore` returns.

  Attributes:
    step: The step of the checkpoint that was restored.
    state: The train state, placed in the shardings of the abstract state.
    data_state: The data iterator's ``get_state()`` saved with it, or None.
    config: The run configuration saved with it, or None.
  """

  step: int
  state: TrainState
  data_state: dict | None
  config: dict | None


def _brief(error: BaseException, limit: int = 160) -> str:
  """The first line of an error, shortened, for one-line messages."""
  lines = str(error).strip().splitlines()
  text = f"{type(error).__name__}: {lines[0] if lines else ''}"
  return text if len(text) <= limit else text[: limit - 3] + "..."


def _key_name(key) -> str:
  """A pytree key as Orbax names it on disk (NamedTuple fields become dict
  keys, tuple positions and int dict keys become strings)."""
  for attr in ("name", "key", "idx"):
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def _shapes(tree) -> dict[str, tuple[int, ...]]:
  """``{'opt_state/1/count': shape, ...}`` for every array leaf of ``tree``."""
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {
      "/".join(_key_name(k) for k in path): tuple(leaf.shape)
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
    self._manager = ocp.CheckpointManager(
        directory,
        options=options,
        item_handlers={
            _STATE: ocp.StandardCheckpointHandler(),
            _DATA: ocp.JsonCheckpointHandler(),
            _CONFIG: ocp.JsonCheckpointHandler(),
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
      data_state: The data iterator's JSON-able ``get_state()``.
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
    args = ocp.args.Composite(**{
        _STATE: ocp.args.StandardSave(state),
        _DATA: ocp.args.JsonSave(data_state),
        _CONFIG: ocp.args.JsonSave(config),
    })
    return self._manager.save(step, args=args, force=force)

  def restore(
      self,
      abstract_state: Any,
      *,
      step: int | None = None,
      expected_config: dict | None = None,
  ) -> Restored | None:
    """Restores the newest readable checkpoint (or ``step``).

    An unreadable checkpoint (missing or garbled files, a half-written step)
    is skipped with a warning that names it and the step used instead; with
    an explicit ``step`` there is no fallback. Nothing on disk is changed.

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
        another model (config or tree structure/shapes differ).
      UnreadableCheckpointError: if no candidate checkpoint can be read.
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
    bad: list[int] = []
    last_error = None
    for candidate in reversed(steps):
      try:
        restored = self._restore_step(candidate, abstract_state, expected_config)
      except IncompatibleCheckpointError:
        raise
      except Exception as e:  # pylint: disable=broad-except
        bad.append(candidate)
        last_error = e
        continue
      if bad:
        warnings.warn(
            f"checkpoint step(s) {', '.join(map(str, bad))} in "
            f"{self.directory} cannot be read ({_brief(last_error)}); "
            f"restored step {candidate} instead",
            stacklevel=2,
        )
      return restored
    raise UnreadableCheckpointError(
        f"no readable checkpoint in {self.directory}: step(s) "
        f"{', '.join(map(str, bad))} are corrupt or incomplete "
        f"({_brief(last_error)}); remove them or use another --checkpoint-dir"
    )

  def _restore_step(
      self, step: int, abstract_state: Any, expected_config: dict | None
  ) -> Restored:
    """Checks and restores one step; any error but a mismatch means corrupt."""
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
    out = self._manager.restore(
        step,
        args=ocp.args.Composite(**{
            _STATE: ocp.args.StandardRestore(abstract_state),
            _DATA: ocp.args.JsonRestore(),
        }),
    )
    return Restored(step, out[_STATE], out[_DATA], config)

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
