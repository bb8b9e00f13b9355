"""What a failed Orbax save or restore prints, held back, and the one line
that says why it failed.

A restore that meets a damaged file makes TensorStore's threads and Orbax's
event loops print thousands of lines (tracebacks, "Event loop is closed",
"Task exception was never retrieved"); a failing background save hundreds.
:func:`restoring` and :class:`QuietSaves` hold that back, so that the
checkpointer can report one line (:func:`reason`, :func:`advice`). They
swap process-wide hooks (loggers, the unraisable hook, the event loop
policy): restores run alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import gc
import logging
import os
import re
import sys
import warnings
from typing import Any

from subspace_jax.naming import setting
from subspace_jax.train.checksums import CorruptError

__all__ = ["QuietSaves", "advice", "brief", "errno_of", "os_reason", "reason",
           "restoring"]


def brief(error: BaseException, limit: int = 160) -> str:
  """The first line of an error, shortened, for one-line messages."""
  lines = str(error).strip().splitlines()
  text = f"{type(error).__name__}: {lines[0] if lines else ''}"
  return text if len(text) <= limit else text[: limit - 3] + "..."

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


def _closed_loop_error(error: BaseException | None) -> bool:
  return isinstance(error, RuntimeError) and str(error) == "Event loop is closed"


def _quiet_excepthook(previous):
  """``previous``, but silent for "Event loop is closed": TensorStore's
  threads print that error through ``sys.excepthook`` when their callback
  finds an Orbax event loop already closed (a race the draining below
  narrows but cannot close: the callback may come after the close)."""

  def hook(kind, error, tb):
    if not _closed_loop_error(error):
      previous(kind, error, tb)

  return hook


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
def restoring():
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
  unraisablehook, excepthook = sys.unraisablehook, sys.excepthook
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    draining = _draining_policy_class()
    policy = asyncio.get_event_loop_policy() if draining else None
    try:
      for logger in loggers:
        logger.disabled = True
      sys.unraisablehook = lambda unraisable: None
      sys.excepthook = _quiet_excepthook(excepthook)
      if draining:
        asyncio.set_event_loop_policy(draining(policy))
      yield
    finally:
      if draining:
        asyncio.set_event_loop_policy(policy)
      gc.collect()
      sys.unraisablehook, sys.excepthook = unraisablehook, excepthook
      for logger, was in zip(loggers, disabled):
        logger.disabled = was


class QuietSaves(logging.Filter):
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
    self._excepthook = None
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
    self._excepthook = sys.excepthook
    sys.excepthook = _quiet_excepthook(self._excepthook)
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
    sys.excepthook = self._excepthook
    # Put back only if no one has set another policy since (two
    # Checkpointers closed out of order leave the first one's).
    if self._policy is not None and asyncio.get_event_loop_policy() is self._mine:
      asyncio.set_event_loop_policy(self._policy)
    self._policy = self._mine = None


# What to do about a failed save, by the errno it failed with.
_NO_SPACE = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)
_FORBIDDEN = (errno.EACCES, errno.EPERM, errno.EROFS)


def errno_of(error: Any) -> int | None:
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


def os_reason(error: Any) -> str:
  """Why a save failed, in a few words: the OS error's, else the first
  line of the error without TensorStore's spec."""
  code = errno_of(error)
  if code is not None:
    return os.strerror(code)
  if error is None:
    return "the save did not commit"
  text = str(error).split(" [tensorstore_spec=")[0].strip()
  text = text.splitlines()[0] if text else type(error).__name__
  return text if len(text) <= 200 else text[:197] + "..."


def advice(error: Any) -> str:
  code = errno_of(error)
  if code in _NO_SPACE:
    return f"free space there or give another {setting('checkpoint_dir')}"
  if code in _FORBIDDEN:
    return ("make the directory writable by this user or give another "
            f"{setting('checkpoint_dir')}")
  return f"check the disk and the directory, or give another {setting('checkpoint_dir')}"


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


def reason(error: BaseException, directory: str) -> str:
  """Why a checkpoint could not be used, in one line: the array and the
  file (relative to ``directory``) where TensorStore names them."""
  root = _root_cause(error)
  for e in (error, root):
    if isinstance(e, CorruptError):
      return str(e)
  text = str(root).split(" [tensorstore_spec=")[0].strip()
  text = text.splitlines()[0] if text else ""
  text = text.replace(directory.rstrip("/") + "/", "")
  # TensorStore's keys: "params.lm_head.kernel/.zarray", ".../0.1" (chunks).
  array = re.search(r'"([^"/]+)/(?:\.z\w+|[\d.]+)"', text)
  if not array:
    return brief(root, 200)
  parts = [f"array {array.group(1).replace('.', '/')}"]
  files = [f for f in re.findall(r'local file "([^"]*)"', text) if not f.endswith("/")]
  detail = text.rsplit(": ", 1)[-1]
  if files:
    parts.append(f"file {files[-1]}")
    detail = text.rsplit(f'local file "{files[-1]}": ', 1)[-1]
  parts.append(detail)
  line = ": ".join(parts)
  return line if len(line) <= 240 else line[:237] + "..."
