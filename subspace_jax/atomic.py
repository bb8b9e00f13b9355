"""Files written whole or not at all.

Every file the library writes goes to a temporary name in its own
directory and is renamed into place once complete (and flushed to the
disk), so a reader sees the old file or the new one, never a part: a full
disk or a kill while writing leaves the previous file as it was, and the
temporary file is removed on any error.
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import shutil
import tempfile
from typing import BinaryIO, Iterator

__all__ = ["copy", "replacing", "write_bytes", "write_text"]


@contextlib.contextmanager
def replacing(path: str | os.PathLike[str]) -> Iterator[BinaryIO]:
  """A binary file to write ``path``'s new content to; it replaces
  ``path`` when the block ends without an error (``path``'s folder is made
  if missing)."""
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.",
                             suffix=".tmp")
  try:
    with os.fdopen(fd, "wb") as f:
      yield f
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    with contextlib.suppress(OSError):
      os.unlink(tmp)
    raise


def write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
  """Writes ``data`` to ``path`` whole or not at all."""
  with replacing(path) as f:
    f.write(data)


def write_text(path: str | os.PathLike[str], text: str) -> None:
  """Writes ``text`` (UTF-8) to ``path`` whole or not at all."""
  write_bytes(path, text.encode("utf-8"))


def copy(source: str | os.PathLike[str], target: str | os.PathLike[str]) -> None:
  """Copies the file ``source`` to ``target`` whole or not at all."""
  with open(source, "rb") as src, replacing(target) as dst:
    shutil.copyfileobj(src, dst)
