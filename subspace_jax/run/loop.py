"""The pretraining loop: data, sharded steps, evaluation, logging, checkpoints.

:class:`RunConfig` holds every setting of a run and round-trips through a
JSON dict; :func:`train` runs it::

    from subspace_jax.run import loop
    from subspace_jax.train import step as train
    cfg = loop.RunConfig(model="tiny", steps=200,
                         optimizer=train.OptimizerConfig(name="golore", rank=16),
                         checkpoint_dir="runs/demo/ckpt",
                         metrics_path="runs/demo/metrics.jsonl")
    summary = loop.train(cfg)   # {"train_loss": ..., "eval_loss": ..., ...}

What a run does, in order: start multi-process JAX if asked (flags or the
``JAX_COORDINATOR_ADDRESS`` environment), build the mesh, take the lock of
the checkpoint directory (a ``run.lock`` file naming the host and process,
so that a second run there is refused; a lock left by a process of this host
that is gone is taken over), build the tokenizer and the model, check the
settings against them, resume from the newest checkpoint (state and data
position, once its settings are found to fit this run's, see
:class:`RunConfig`) or initialize, then step. Every
``log_every`` steps the metrics are fetched and appended to the JSONL file;
every ``eval_every`` steps the held-out loss is measured; every
``checkpoint_every`` steps a checkpoint is written in the background. SIGINT
and SIGTERM stop the run after the current step with a checkpoint, so the
same call resumes it. Files are only ever appended to or added: an error or
an interruption never truncates what a run has written.

Errors in the settings or the data raise ``ValueError`` (the data pipeline's
``DataError`` is one) with a one-line message that names the option to
change (as its command-line flag, e.g. ``--batch-size``).

This module holds the loop; the rest of a run lives beside it:
:mod:`~subspace_jax.run.config` (the settings and their checks,
re-exported here), :mod:`~subspace_jax.run.distributed` (multi-process
start-up and exchanges), :mod:`~subspace_jax.run.inputs` (tokenizer,
iterators, data positions), :mod:`~subspace_jax.run.lock` (the run
lock) and :mod:`~subspace_jax.run.reporting` (status lines, progress,
metrics, summary).
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import sys
import threading
import time
import warnings
from typing import Any, Mapping

import jax
import numpy as np

from subspace_jax import atomic
from subspace_jax import models
from subspace_jax import sharding as shd
from subspace_jax.data import pipeline as data_lib
from subspace_jax.models.io import hf, pretrained
from subspace_jax.naming import setting
from subspace_jax.run import answers as answers_lib
from subspace_jax.run import export as export_lib
from subspace_jax.run import inputs
from subspace_jax.run import lock as lock_lib
from subspace_jax.run import reporting
from subspace_jax.run import resume as resume_lib
from subspace_jax.run.config import (RESUME_ALTERING_FIELDS,
                                     RESUME_SAFE_FIELDS, RunConfig)
from subspace_jax.run.distributed import any_process, initialize_distributed
from subspace_jax.run.reporting import info
from subspace_jax.train import step as train_lib
from subspace_jax.train.checkpoint import (Checkpointer, CheckpointSaveError,
                                           CheckpointWarning)

__all__ = ["RunConfig", "NonFiniteError", "OutOfMemoryError", "ExportError",
           "CheckpointSaveError", "RESUME_SAFE_FIELDS",
           "RESUME_ALTERING_FIELDS", "initialize_distributed", "train"]


# ----------------------------------------------------------------------------
# Stopping on SIGINT / SIGTERM
# ----------------------------------------------------------------------------


class _StopRequest:
  """Turns SIGINT/SIGTERM into a flag that the loop polls.

  A second signal ends the process at once (exit code 128 + its number),
  without a checkpoint. The previous handlers come back on exit. Handlers can only be set from the main
  thread; elsewhere signals keep their usual effect.
  """

  def __init__(self):
    self.signal_name: str | None = None
    self._previous: dict[int, Any] = {}

  def __enter__(self) -> _StopRequest:
    if threading.current_thread() is threading.main_thread():
      for sig in (signal.SIGINT, signal.SIGTERM):
        self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def _handle(self, signum, frame) -> None:
    del frame
    name = signal.Signals(signum).name
    if self.signal_name is not None:
      # A second signal: exit at once. Raising KeyboardInterrupt here could
      # land inside a compile or a background thread (seen to end in a
      # segfault); exiting loses nothing that was committed: Orbax renames
      # a checkpoint into place only when it is complete, and the metrics
      # file is flushed line by line.
      sys.stderr.write(f"\nsecond {name}: stopped at once, without saving\n")
      sys.stderr.flush()
      os._exit(128 + signum)  # pylint: disable=protected-access
    self.signal_name = name

  def __exit__(self, *exc_info) -> None:
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)

  def agreed(self) -> bool:
    """Whether any process was signalled; all processes must call this at
    the same steps when there are several."""
    return any_process(self.signal_name is not None)


# ----------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------


def _evaluate(setup, state, iterator, start_state, cfg) -> tuple[float, float]:
  """Mean loss and perplexity over the first ``eval_batches`` batches."""
  iterator.set_state(start_state)
  losses = [setup.eval_step(state, _global_batch(next(iterator), setup, cfg))
            for _ in range(cfg.eval_batches)]
  loss = float(np.mean(jax.device_get(losses)))
  return loss, math.inf if loss > 700 else math.exp(loss)  # NaN stays NaN.


def _global_batch(local: Mapping[str, np.ndarray], setup: train_lib.Setup,
                  cfg: RunConfig) -> dict[str, jax.Array]:
  """This process's rows as one array over the whole mesh."""
  shape = (cfg.batch_size, cfg.seq_len)
  return {k: jax.make_array_from_process_local_data(setup.batch_sharding, v, shape)
          for k, v in local.items()}


def _restore_or_init(cfg, setup, ckpt, train_iter) -> tuple[Any, int]:
  """The state to start from and its step."""
  latest = ckpt.latest_step() if ckpt is not None else None
  if latest is not None and not cfg.resume:
    raise ValueError(
        f"{cfg.checkpoint_dir} already holds checkpoints (newest: step "
        f"{latest}) and resuming is off; use another "
        f"{setting('checkpoint_dir')} or drop {setting('resume', False)}")
  if latest is None:
    if cfg.init_from is not None:
      return _init_from_hf(cfg, setup), 0
    return setup.init(cfg.seed), 0
  # The settings first, from the newest checkpoint's config alone (quick);
  # another model is left to the checkpointer, which names it as such.
  expected, changes = cfg.to_dict(), None
  saved = ckpt.saved_config(latest)
  if saved is not None and resume_lib.same_model(saved, expected):
    changes = resume_lib.check_resume(cfg, saved, latest, ckpt.directory)
  restored = _restore_quietly(ckpt, setup.abstract_state, expected)
  if changes is None or restored.step != latest:  # Fell back to an older one.
    changes = resume_lib.check_resume(cfg, restored.config, restored.step,
                                      ckpt.directory)
  data_note = _restore_data_state(cfg, train_iter, restored)
  info(f"resumed from step {restored.step} ({ckpt.directory})")
  for line in (changes, data_note):
    if line:
      info(line)
  return restored.state, restored.step


def _init_from_hf(cfg: RunConfig, setup) -> Any:
  """The state that starts from the weights of ``--init-from``, each
  loaded straight into its sharding."""
  model_config = cfg.model_config
  overrides = {f: getattr(model_config, f) for f in (
      "scan_layers", "remat", "dtype", "param_dtype", "max_seq_len")}
  loaded_config, params = pretrained.load(cfg.init_from, mesh=setup.mesh, **overrides)
  if loaded_config != model_config:  # config.json changed since the start.
    raise ValueError(f"{setting('init_from')} {cfg.init_from}: its config.json "
                     "changed while the run started; start again")
  info(f"starting from the weights of {cfg.init_from}")
  return setup.init_from(params)


def _export(cfg: RunConfig, setup, state, tokenizer) -> None:
  """Writes the trained model to ``--export-hf`` (merged ``W + P·B`` in
  model mode), with the files of a loaded tokenizer."""
  extra = {f"{role}_token_id": getattr(tokenizer, f"{role}_id", None)
           for role in ("bos", "eos", "pad")}
  try:
    hf.save(cfg.export_hf, cfg.model_config, state.params,
            subspace=setup.subspace, opt_state=state.opt_state,
            extra_config={k: v for k, v in extra.items() if v is not None})
    if cfg.tokenizer_model is not None and jax.process_index() == 0:
      source = tokenizer.model_path  # Saved under the name loaders expect.
      copies = {source: "tokenizer.json" if cfg.tokenizer == "huggingface"
                else "tokenizer.model"}
      for name in ("tokenizer_config.json", "special_tokens_map.json"):
        if (source.parent / name).is_file():
          copies[source.parent / name] = name
      for path, name in copies.items():
        atomic.copy(path, os.path.join(cfg.export_hf, name))
    if jax.process_index() == 0:
      export_lib.add_chat_files(cfg.export_hf, tokenizer, cfg.init_from)
  except (OSError, ValueError) as e:
    reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
    raise ExportError(
        f"cannot export the model to {setting('export_hf')} {cfg.export_hf} "
        f"({reason}); the files there are as they were and the run's checkpoint "
        "is saved: free space or fix the directory, then run the same command "
        "again to export") from None
  info(f"exported the model to {cfg.export_hf} (Hugging Face LLaMA)")


def _answers(cfg: RunConfig, setup, state, tokenizer, when: str):
  """Greedy answers to the first ``--answers`` held-out questions: their
  exact-match accuracy and the first three printed (None without
  ``--answers``, an evaluation (``--eval-every``, ``--eval-split``) of
  prompts, or with several processes)."""
  if not (cfg.answers and cfg.eval_every and cfg.eval_split):
    return None
  if jax.process_count() > 1:
    info(f"{setting('answers')}: skipped in a run of several processes")
    return None
  records = inputs.held_out_records(cfg)
  qs = answers_lib.questions(records, tokenizer,
                             None if cfg.answers < 0 else cfg.answers)
  if not qs:
    if records is not None and cfg.eval_split:
      info(f"{setting('answers')}: the held-out split holds no prompt/response "
           "pair or conversation to answer")
    return None
  params = state.params
  if setup.subspace is not None:  # Model mode: the merged W + P·B.
    params = jax.jit(setup.subspace.merged_weights)(state.params,
                                                    state.opt_state)
  t0 = time.perf_counter()
  scored = answers_lib.score(cfg.model_config, params, tokenizer, qs)
  for i, line in enumerate(scored.lines()):
    info(f"{when}: {line} [{time.perf_counter() - t0:.0f} s]" if i == 0
         else line)
  return scored


def _restore_data_state(cfg, iterator, restored) -> str | None:
  """Moves ``iterator`` to the checkpoint's data position.

  Returns:
    An info line if, with ``allow_changes``, the position does not fit the
    data any more and the data starts from its beginning; else None.

  Raises:
    ValueError: If the position does not fit and changes are not allowed.
  """
  try:
    inputs.set_data_state(iterator, restored.data_state, step=restored.step)
  except data_lib.DataError:
    if not cfg.allow_changes:
      raise ValueError(
          f"the data position saved at step {restored.step} does not fit the "
          f"data of this run (have the files of {setting('data')} or "
          f"{setting('data_workers')} changed?); use "
          f"{setting('allow_changes', True)} to start the data from its "
          f"beginning, or another {setting('checkpoint_dir')}") from None
    return (f"the data position saved at step {restored.step} does not fit "
            "this run's data: the data starts from its beginning")
  return None


def _restore_quietly(ckpt, abstract_state, expected):
  """``ckpt.restore``, its warnings (a fallback past a corrupt step, ...)
  printed as one ``warning: ...`` line each, not in Python's two-line
  format."""
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always", CheckpointWarning)
    restored = ckpt.restore(abstract_state, expected_config=expected)
  for w in caught:
    if issubclass(w.category, CheckpointWarning):
      info(f"warning: {w.message}")
    else:
      warnings.showwarning(w.message, w.category, w.filename, w.lineno)
  return restored


def train(cfg: RunConfig) -> dict[str, Any]:
  """Runs (or resumes) a pretraining run; see the module docstring.

  Args:
    cfg: The run's settings.

  Returns:
    A summary: ``step`` (steps done), ``start_step``, ``train_loss`` (mean
    over the last logging window), ``eval_loss``, ``eval_ppl``,
    ``tokens_per_s`` (after the first, compiling, step; evaluation and
    checkpointing excluded), ``wall_time_s``, ``interrupted`` (the signal's
    name or None), ``checkpoint_step`` (the newest saved, or None),
    ``eval_step`` (the step ``eval_loss`` is from), ``nonfinite_steps``
    (steps skipped because their loss or gradient was not finite) and,
    with ``answers``, ``answers`` (held-out questions answered),
    ``exact_match`` (the fraction answered exactly right at the end) and
    ``exact_match_before`` (before the first step; None when resumed).
    With ``steps`` 0 (or as many as the checkpoint has) nothing is
    trained: the loaded model is evaluated.

  Raises:
    ValueError: On settings or data that cannot work (one-line message).
    NonFiniteError: After ``max_bad_steps`` consecutive non-finite steps.
  """
  t_begin = time.perf_counter()
  initialize_distributed(cfg.coordinator, cfg.num_processes, cfg.process_id)

  mesh = shd.make_mesh(*cfg.mesh)
  shd.check_batch(cfg.batch_size, mesh, cfg.optimizer.grad_accum)
  lock = lock_lib.take_lock(cfg.checkpoint_dir, cfg.metrics_path)
  try:
    return _train(cfg, mesh, t_begin)
  finally:
    if lock is not None:
      lock.release()


def _train(cfg: RunConfig, mesh, t_begin: float) -> dict[str, Any]:
  """:func:`train` once the mesh is made and the run's lock is held."""
  tokenizer = inputs.make_tokenizer(cfg)
  model_config = cfg.model_config
  _check_vocab(cfg, tokenizer.vocab_size, model_config.vocab_size)
  setup = train_lib.setup(model_config, cfg.optimizer, mesh)
  train_lib.check_rank(setup, cfg.optimizer)

  train_iter, eval_iter, eval_start = inputs.make_iterators(cfg, tokenizer)

  ckpt = None
  try:
    if cfg.checkpoint_dir:
      ckpt = Checkpointer(cfg.checkpoint_dir,
                          save_interval_steps=cfg.checkpoint_every,
                          max_to_keep=cfg.keep,
                          warn=lambda line: info(f"warning: {line}"))
  except BaseException:
    for iterator in (train_iter, eval_iter):
      if iterator is not None:
        iterator.close()
    raise
  sink = progress = None
  with _StopRequest() as stop:  # From here on a signal stops the run cleanly.
    try:
      state, start = _restore_or_init(cfg, setup, ckpt, train_iter)
      if start == 0:
        info(f"{cfg.init_from or cfg.model}: "
             f"{models.param_count(model_config) / 1e6:.2f}M parameters, "
             f"{cfg.optimizer.name}{' (model mode)' if cfg.optimizer.model_mode else ''}, "
             f"mesh {dict(mesh.shape)} on {jax.device_count()} "
             f"{jax.devices()[0].platform} device(s), {jax.process_count()} "
             "process(es)")
      sink = reporting.MetricsSink(cfg.metrics_path, cfg.tensorboard_dir)
      progress = reporting.Progress(cfg.steps, cfg.progress and jax.process_index() == 0)
      trains = cfg.steps > start
      before = (_answers(cfg, setup, state, tokenizer, "before training")
                if trains and start == 0 else None)
      if trains:
        info(f"compiling the train step (step {start + 1}) ...")
      summary, state = _run(cfg, setup, state, start, train_iter, eval_iter,
                            eval_start, ckpt, sink, progress, stop)
      if ckpt is not None:  # The last save committed before the export.
        ckpt.wait_until_finished()
      if not summary["interrupted"]:
        after = _answers(cfg, setup, state, tokenizer,
                         "after training" if trains else "the loaded model")
        if after is not None:
          summary.update(answers=len(after.questions),
                         exact_match=after.accuracy,
                         exact_match_before=before.accuracy if before else None)
      if cfg.export_hf is not None and not summary["interrupted"]:
        _export(cfg, setup, state, tokenizer)
    except jax.errors.JaxRuntimeError as e:
      if not _out_of_memory(e):
        raise
      raise _out_of_memory_error(
          e, ckpt.latest_step() if ckpt is not None else None) from None
    finally:
      try:
        if progress is not None:
          progress.close()
        if sink is not None:
          sink.close()
        if ckpt is not None:
          # Raises CheckpointSaveError if the last save failed, unless
          # another error is already on its way out (then it is dropped).
          with _unless(sys.exc_info()[0] is not None):
            ckpt.close()
      finally:
        for iterator in (train_iter, eval_iter):
          if iterator is not None:
            iterator.close()  # Stops the data's threads and worker processes.
  summary["wall_time_s"] = time.perf_counter() - t_begin
  reporting.print_summary(summary)
  return summary


class NonFiniteError(RuntimeError):
  """Too many consecutive steps had a non-finite loss or gradient."""


class OutOfMemoryError(RuntimeError):
  """A step (or the state) did not fit in the devices' memory; the message
  is one line saying what to change."""


class ExportError(RuntimeError):
  """``--export-hf`` could not be written; the files that were there are
  as they were."""


def _check_vocab(cfg: RunConfig, tokenizer_ids: int, model_ids: int) -> None:
  """The tokenizer must fit the model: no more ids than a pretrained
  model's embedding has, exactly as many as a new model's."""
  if cfg.init_from is not None:
    if tokenizer_ids > model_ids:
      raise ValueError(
          f"the tokenizer has {tokenizer_ids} ids, more than the {model_ids} "
          f"of the {setting('init_from')} model; give its own tokenizer with "
          f"{setting('tokenizer_model')}")
  elif tokenizer_ids != model_ids:
    raise ValueError(f"the tokenizer has {tokenizer_ids} ids, not {model_ids}; "
                     f"set {setting('vocab_size')} {tokenizer_ids}")


def _out_of_memory_error(error: BaseException,
                         newest: int | None) -> OutOfMemoryError:
  return OutOfMemoryError(
      f"out of device memory ({_brief(error)}): the step does not fit; use a "
      f"smaller {setting('batch_size')} or {setting('seq_len')}, "
      f"{setting('remat')}, or split the state over the devices with "
      f"{setting('mesh')} 1,-1,1 (plan it with {setting('compile_for')} "
      "first); " + (f"the newest checkpoint, step {newest}, is intact"
                    if newest is not None else "no checkpoint was saved"))


def _out_of_memory(error: BaseException) -> bool:
  text = str(error)
  return "RESOURCE_EXHAUSTED" in text or "Out of memory" in text


def _brief(error: BaseException, limit: int = 160) -> str:
  lines = str(error).strip().splitlines()
  text = lines[0] if lines else type(error).__name__
  return text if len(text) <= limit else text[:limit - 3] + "..."


@contextlib.contextmanager
def _unless(suppress: bool):
  """Drops any exception of the block if ``suppress``."""
  try:
    yield
  except Exception:  # pylint: disable=broad-except
    if not suppress:
      raise


class _Health:
  """Counts the steps that were skipped as non-finite.

  The step's ``finite`` flags stay on the device until the loop syncs (at
  logging, checkpoint and stop points, or once the pending flags could
  complete a stopping streak), so there is no host round trip per step.
  """

  def __init__(self, max_bad_steps: int):
    self.max_bad_steps = max_bad_steps
    self.pending: list[jax.Array] = []
    self.run = self.total = 0  # Consecutive and all non-finite steps.

  def due(self) -> bool:
    """Whether the pending flags could complete a stopping streak."""
    return self.run + len(self.pending) >= self.max_bad_steps

  def check(self, step: int) -> None:
    """Books the pending flags; raises once ``max_bad_steps`` in a row
    were non-finite."""
    for ok in jax.device_get(self.pending):
      self.run = 0 if ok else self.run + 1
      self.total += not ok
    self.pending.clear()
    if self.run >= self.max_bad_steps:
      raise NonFiniteError(
          f"stopped at step {step}: the last {self.run} steps had a non-finite "
          "loss or gradient and were skipped (the state is the one before "
          "them, and no checkpoint was written after them); lower "
          f"{setting('optimizer.learning_rate')}, check the data, or resume "
          "from an earlier checkpoint")


_SUMMARY_KEYS = ("step", "start_step", "train_loss", "eval_loss", "eval_ppl",
                 "eval_step", "tokens_per_s", "interrupted", "checkpoint_step",
                 "nonfinite_steps", "answers", "exact_match",
                 "exact_match_before")


def _next_batch(train_iter, step: int):
  try:
    return next(train_iter)
  except StopIteration:  # It repeats forever: only a bad position ends it.
    raise data_lib.DataError(
        f"the training data ended at step {step} (its saved position is past "
        f"its end); use {setting('allow_changes', True)} to start the data "
        f"from its beginning, or another {setting('checkpoint_dir')}") from None


def _run(cfg, setup, state, start, train_iter, eval_iter, eval_start, ckpt,
         sink, progress, stop) -> tuple[dict[str, Any], Any]:
  """The step loop proper; returns the summary (without wall time) and the
  last state."""
  config_dict = cfg.to_dict()
  tokens_per_step = cfg.batch_size * cfg.seq_len
  single = jax.process_count() == 1
  summary = dict.fromkeys(_SUMMARY_KEYS, None)
  summary.update(step=start, start_step=start, nonfinite_steps=0)
  losses: list[jax.Array] = []    # Step losses since the last record.
  health = _Health(cfg.max_bad_steps)
  timed = reporting.Timer()

  def eval_due(step: int) -> bool:
    return eval_iter is not None and (step % cfg.eval_every == 0 or step == cfg.steps)

  def evaluate(step: int) -> tuple[float, float]:
    loss, ppl = _evaluate(setup, state, eval_iter, eval_start, cfg)
    summary.update(eval_loss=loss, eval_ppl=ppl, eval_step=step)
    progress.write(f"step {step}: eval loss {loss:.4f}, perplexity {ppl:.2f}")
    return loss, ppl

  step = start
  for step in range(start + 1, cfg.steps + 1):
    batch = _global_batch(_next_batch(train_iter, step), setup, cfg)
    state, metrics = setup.train_step(state, batch)
    losses.append(metrics["loss"])
    health.pending.append(metrics["finite"])
    if step == start + 1:  # The compiling step is not timed.
      jax.block_until_ready(metrics)
      timed.restart()
      progress.start(step)
    else:
      timed.pending += 1
    do_eval = eval_due(step)
    do_save = ckpt is not None and step % cfg.checkpoint_every == 0
    do_log = step % cfg.log_every == 0 or step == cfg.steps or do_eval
    # Processes must agree on stopping, so they poll at the same steps.
    stopping = (do_log or single) and stop.agreed()
    if not (do_log or do_save or stopping or health.due()):
      progress.update(step)
      continue
    jax.block_until_ready(metrics)
    tps = timed.book(tokens_per_step)
    health.check(step)  # Raises after too many non-finite steps.
    summary["nonfinite_steps"] = health.total
    if do_log or stopping:
      record = _record(step, losses, metrics, tps, health)
      losses.clear()
      summary["train_loss"] = record["loss"]
      if do_eval and not stopping:
        record["eval_loss"], record["eval_ppl"] = evaluate(step)
      sink.write(record)
      progress.update(step, record["loss"], tps)
    else:
      progress.update(step)
    # A state reached through non-finite steps is the one before them:
    # saving it again would only push good checkpoints out of --keep.
    saved = False
    if (ckpt is not None and (do_save or stopping or step == cfg.steps)
        and health.run == 0 and _finite_state(setup, state, step, progress)):
      saved = ckpt.save(step, state, data_state=inputs.data_state(train_iter),
                        config=config_dict, force=stopping or step == cfg.steps)
      if saved:
        summary["checkpoint_step"] = step
    timed.restart()  # Evaluating, logging and saving are not timed.
    if stopping:
      summary["interrupted"] = stop.signal_name or "a signal to another process"
      progress.write(f"stopped at step {step} by {summary['interrupted']}"
                     + ("; checkpoint saved" if saved else ""))
      break
  summary["step"] = step
  if ckpt is not None and summary["checkpoint_step"] is None:
    summary["checkpoint_step"] = ckpt.latest_step()
  summary["tokens_per_s"] = timed.total_rate(tokens_per_step)
  if eval_iter is not None and summary["eval_loss"] is None and not summary["interrupted"]:
    evaluate(step)
  return summary, state


def _finite_state(setup, state, step: int, progress) -> bool:
  """Whether ``state`` may be checkpointed: every array finite. The step
  skips non-finite gradients, not non-finite updates (see
  :func:`~subspace_jax.train.step.setup`), so an optimizer that made
  one from a finite gradient is caught here; the next steps then fail
  their loss check and the run stops."""
  if bool(setup.state_is_finite(state)):
    return True
  progress.write(f"warning: the state at step {step} is not finite (an "
                 "update was, from a finite gradient); no checkpoint written")
  return False


def _record(step, losses, metrics, tps, health) -> dict[str, Any]:
  """The metrics record of a logging step: the mean loss of the window's
  finite steps (None if it had none)."""
  fetched, last = jax.device_get((losses, metrics))
  finite = [float(l) for l in fetched if math.isfinite(l)]
  return {"step": step, "loss": float(np.mean(finite)) if finite else None,
          "grad_norm": float(last["grad_norm"]), "lr": float(last["lr"]),
          "tokens_per_s": tps, "nonfinite_steps": health.total}
