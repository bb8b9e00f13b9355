"""What a run shows and writes: status lines, progress, metrics, summary.

Status lines (:func:`info`) and the progress bar (:class:`Progress`) go to
stderr from process 0; metric records go to a JSONL file and TensorBoard
(:class:`MetricsSink`); the summary line (:func:`print_summary`) is the
only output on stdout. :class:`Timer` measures the training time between
the loop's sync points, for tokens/s.
"""

from __future__ import annotations

import json
import pathlib
import sys
import time
from typing import Any, Mapping

import jax


__all__ = ["info", "Progress", "MetricsSink", "Timer", "print_summary"]


def _format_eta(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class Progress:
  """Progress on stderr: on a terminal a one-line bar (tqdm if installed,
  else ``\\r``); elsewhere (a log file, a pipe) a plain line at every
  logged step, which a file keeps readable.

  The bar (and its ETA) starts with :meth:`start`, once the first step has
  compiled and run, so the compile time does not count in the rate. Lines
  written with :meth:`write` (evaluations, the stop) are shown whether or
  not the bar is.
  """

  def __init__(self, total: int, enabled: bool, terminal: bool | None = None):
    self._enabled, self._total = enabled, total
    self._terminal = sys.stderr.isatty() if terminal is None else terminal
    self._step = self._start = 0
    self._t0: float | None = None
    self._postfix = ""
    self._width = 0  # Of the last line written, to blank it out.
    self._bar = None

  def start(self, step: int) -> None:
    """Starts the clock at ``step`` (steps before it are not timed)."""
    self._t0, self._start, self._step = time.perf_counter(), step, step
    if not (self._enabled and self._terminal):
      return
    try:
      from tqdm import tqdm  # pylint: disable=import-outside-toplevel
    except ImportError:
      return
    self._bar = tqdm(total=self._total, initial=step, file=sys.stderr,
                     unit="step", dynamic_ncols=True, smoothing=0.1)

  def update(self, step: int, loss: float | None = None,
             tokens_per_s: float | None = None) -> None:
    if not self._enabled or self._t0 is None:
      return
    if loss is not None:
      self._postfix = f"loss {loss:.4f}" + (
          f", {tokens_per_s:,.0f} tok/s" if tokens_per_s else "")
    if self._bar is not None:
      if loss is not None:
        self._bar.set_postfix_str(self._postfix, refresh=False)
      self._bar.update(step - self._step)
    elif loss is not None or step == self._total:
      done = step - self._start
      rate = done / max(time.perf_counter() - self._t0, 1e-9)
      eta = _format_eta((self._total - step) / rate) if done else "?"
      text = f"step {step}/{self._total} {self._postfix} ETA {eta}"
      if self._terminal:
        sys.stderr.write(f"\r{text.ljust(self._width)}")
        self._width = len(text)
      elif loss is not None:
        sys.stderr.write(text + "\n")
      sys.stderr.flush()
    self._step = step

  def write(self, line: str) -> None:
    """Prints ``line`` on stderr above the bar (process 0 only)."""
    if jax.process_index() != 0:
      return
    if self._bar is not None:
      self._bar.write(line, file=sys.stderr)
    elif self._width:
      sys.stderr.write(f"\r{line.ljust(self._width)}\n")
    else:
      sys.stderr.write(line + "\n")
    sys.stderr.flush()

  def close(self) -> None:
    if self._bar is not None:
      self._bar.close()
    elif self._width:
      sys.stderr.write("\n")
      sys.stderr.flush()
    self._bar, self._width = None, 0


def _tensorboard_writer(logdir: str):
  """A SummaryWriter from tensorboardX or torch, or None if neither imports."""
  for module in ("tensorboardX", "torch.utils.tensorboard"):
    try:
      writer_cls = __import__(module, fromlist=["SummaryWriter"]).SummaryWriter
    except ImportError:
      continue
    return writer_cls(logdir)
  return None


class MetricsSink:
  """Appends metric records to a JSONL file and TensorBoard, if set."""

  def __init__(self, metrics_path: str | None, tensorboard_dir: str | None):
    index, path = jax.process_index(), metrics_path
    self._file = self._tb = None
    if path and ("{process}" in path or index == 0):
      path = pathlib.Path(path.replace("{process}", str(index)))
      path.parent.mkdir(parents=True, exist_ok=True)
      self._file = open(path, "a", encoding="utf-8")  # Append, never truncate.
      # Each record is one whole line, written at once; a line cut short
      # before (a full disk) is ended so that the next record starts its own.
      if path.stat().st_size and not _ends_a_line(path):
        self._file.write("\n")
    if tensorboard_dir and index == 0:
      self._tb = _tensorboard_writer(tensorboard_dir)

  def write(self, record: dict[str, Any]) -> None:
    if self._file is not None:
      self._file.write(json.dumps(record) + "\n")  # One write of the line.
      self._file.flush()
    if self._tb is not None:
      for key, value in record.items():
        if key != "step" and value is not None:
          self._tb.add_scalar(key, value, record["step"])
      self._tb.flush()

  def close(self) -> None:
    if self._file is not None:
      self._file.close()
    if self._tb is not None:
      self._tb.close()


def _ends_a_line(path: pathlib.Path) -> bool:
  with open(path, "rb") as f:
    f.seek(-1, 2)
    return f.read(1) == b"\n"


def info(line: str) -> None:
  """Prints a status line on stderr, from process 0 only."""
  if jax.process_index() == 0:
    print(line, file=sys.stderr, flush=True)


class Timer:
  """Training time between sync points, for tokens/s.

  ``pending`` counts the steps dispatched since the last :meth:`restart`;
  :meth:`book`, called once they are finished, adds their time.
  """

  def __init__(self):
    self.pending = 0
    self._mark: float | None = None
    self._total_s, self._total_steps = 0.0, 0
    self._window_s, self._window_steps = 0.0, 0

  def restart(self) -> None:
    self._mark, self.pending = time.perf_counter(), 0

  def book(self, tokens_per_step: int) -> float | None:
    """Books the pending steps; returns tokens/s since the previous call."""
    if self._mark is not None and self.pending:
      elapsed = time.perf_counter() - self._mark
      self._total_s += elapsed
      self._total_steps += self.pending
      self._window_s += elapsed
      self._window_steps += self.pending
    self.pending = 0
    if not self._window_steps:
      return None
    rate = self._window_steps * tokens_per_step / self._window_s
    self._window_s, self._window_steps = 0.0, 0
    return rate

  def total_rate(self, tokens_per_step: int) -> float | None:
    if not self._total_steps:
      return None
    return self._total_steps * tokens_per_step / self._total_s


def print_summary(s: Mapping[str, Any]) -> None:
  """Prints the run's summary (see :func:`~subspace_jax.run.loop.train`)
  as one ``done: ...`` line on stdout, from every process."""
  parts = [f"{s['step'] - s['start_step']} steps (to step {s['step']})"]
  if s["train_loss"] is not None:
    parts.append(f"train loss {s['train_loss']:.4f}")
  if s["eval_loss"] is not None:
    stale = s["eval_step"] is not None and s["eval_step"] != s["step"]
    parts.append(f"eval loss {s['eval_loss']:.4f} (perplexity {s['eval_ppl']:.2f}"
                 + (f", at step {s['eval_step']})" if stale else ")"))
  if s.get("exact_match") is not None:
    before = s.get("exact_match_before")
    parts.append(f"exact match {s['exact_match']:.1%} of {s['answers']} "
                 "held-out answers"
                 + (f" (before: {before:.1%})" if before is not None else ""))
  if s.get("nonfinite_steps"):
    parts.append(f"{s['nonfinite_steps']} non-finite step(s) skipped")
  if s["tokens_per_s"]:
    parts.append(f"{s['tokens_per_s']:,.0f} tokens/s")
  parts.append(f"{s['wall_time_s']:.1f} s")
  if s["interrupted"]:
    parts.append(f"interrupted by {s['interrupted']}")
  prefix = "" if jax.process_count() == 1 else f"[process {jax.process_index()}] "
  print(prefix + "done: " + ", ".join(parts), flush=True)
