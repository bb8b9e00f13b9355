"""One run per directory: the lock file that names the run using it.

A run takes the lock of its checkpoint directory (or, without one, of its
metrics file) before it writes anything there, and releases it at the end;
a second run that finds the lock held is refused with a message naming the
holder.
"""

from __future__ import annotations

import json
import os
import socket
import tempfile
import time
from typing import Any, Mapping

import jax

from subspace_jax import jsonio
from subspace_jax.run.distributed import allgather_json
from subspace_jax.run.reporting import info
from subspace_jax.naming import setting

__all__ = ["RunLock", "take_lock"]

# The file, in the checkpoint directory, that names the run using it.
_LOCK_FILE = "run.lock"


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True  # Another user's process.
  return True


class RunLock:
  """A lock file that names the run (host and pid) using a directory.

  Taken by creating the file with its content in one step (a hard link of a
  finished temporary file), so a reader never sees it half written. A lock
  of a process that is gone on this host is stale and taken over; a lock
  from another host cannot be checked and is always respected.
  """

  def __init__(self, path: str):
    self.path = path
    self._me = {"host": socket.gethostname(), "pid": os.getpid(),
                "since": time.strftime("%Y-%m-%d %H:%M:%S")}

  def _create(self) -> bool:
    """Creates the lock file; False if it exists."""
    folder = os.path.dirname(self.path) or "."
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{_LOCK_FILE}.")
    try:
      with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(self._me, f)
      try:
        os.link(tmp, self.path)
      except FileExistsError:
        return False
      except OSError:  # No hard links here: create it exclusively instead.
        try:
          fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
          return False
        with os.fdopen(fd, "w", encoding="utf-8") as f:
          json.dump(self._me, f)
      return True
    finally:
      os.unlink(tmp)

  def _holder(self) -> dict[str, Any] | None:
    """The lock file's content; None if there is no lock file, {} if it
    cannot be read."""
    try:
      holder = jsonio.read(self.path, max_bytes=4096)
    except FileNotFoundError:
      return None
    except (OSError, ValueError):
      return {}
    ok = (isinstance(holder, dict) and isinstance(holder.get("pid"), int)
          and isinstance(holder.get("host"), str))
    return holder if ok else {}

  def _is_stale(self, holder: Mapping[str, Any]) -> bool:
    return (holder.get("host") == self._me["host"]
            and holder.get("pid") != self._me["pid"]
            and not _pid_alive(holder["pid"]))

  def acquire(self) -> str | None:
    """Takes the lock.

    Returns:
      An info line if a stale lock was taken over, else None.

    Raises:
      ValueError: If another run holds it, naming that run.
    """
    taken_over = None
    for _ in range(3):
      if self._create():
        if taken_over is None:
          return None
        return (f"took over the lock of a run that is gone (pid "
                f"{taken_over['pid']} on {taken_over['host']}, since "
                f"{taken_over.get('since', '?')}): {self.path}")
      holder = self._holder()
      if holder is None:
        continue  # Released in between: try again.
      if not holder or not self._is_stale(holder):
        break
      if self._holder() == holder:  # Not taken over by another run meanwhile.
        try:
          os.unlink(self.path)
        except FileNotFoundError:
          pass
      taken_over = holder
    else:
      holder = self._holder() or {}
    directory = os.path.dirname(self.path) or "."
    who = (f"pid {holder['pid']} on {holder['host']}, since "
           f"{holder.get('since', '?')}" if holder else "its lock file cannot "
           "be read")
    raise ValueError(
        f"{directory} is in use by another run ({who}); wait for it to end, or "
        f"use another {setting('checkpoint_dir')} for a new run; if no run is "
        f"using it, delete {self.path}")

  def release(self) -> None:
    """Deletes the lock file if it is still this process's."""
    holder = self._holder()
    if holder and holder.get("host") == self._me["host"] and (
        holder.get("pid") == self._me["pid"]):
      try:
        os.unlink(self.path)
      except OSError:
        pass


def _lock_path(checkpoint_dir: str | None, metrics_path: str | None
               ) -> str | None:
  """The run's lock file: in the checkpoint directory, else next to the
  metrics file; None for neither or for a remote (URL) checkpoint path."""
  if checkpoint_dir:
    if "://" in checkpoint_dir:
      return None
    return os.path.join(checkpoint_dir, _LOCK_FILE)
  if metrics_path:
    return metrics_path.replace("{process}", "0") + ".lock"
  return None


def take_lock(checkpoint_dir: str | None, metrics_path: str | None
              ) -> RunLock | None:
  """Process 0 takes the lock of the run that writes to ``checkpoint_dir``
  (else ``metrics_path``); all processes raise if it is held.

  Raises:
    ValueError: If another run holds the lock (one line naming it).
  """
  path = _lock_path(checkpoint_dir, metrics_path)
  if path is None:
    return None
  lock = error = note = None
  if jax.process_index() == 0:
    lock = RunLock(path)
    try:
      note = lock.acquire()
    except ValueError as e:
      lock, error = None, str(e)
    except OSError as e:
      lock, error = None, (f"cannot create the lock file {path} "
                           f"({e.strerror or e}); check the directory's "
                           "permissions or use another "
                           f"{setting('checkpoint_dir')}")
  error = allgather_json(error)[0]  # Every process stops if process 0 must.
  if error:
    raise ValueError(error)
  if note:
    info(note)
  return lock
