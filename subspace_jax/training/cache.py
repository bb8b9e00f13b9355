"""An on-disk cache of files named by a hash of their content's inputs.

The data pipeline caches what is costly to make again: trained tokenizer
models and tokenized corpora. Each cached file's name holds a hash of
everything it was made from (:func:`content_key`), so a changed input is a
miss rather than a stale hit, and it is written in one step
(:func:`write_atomic`), so a reader never sees it half written::

    key = content_key("tokens-v1|byte-v1", docs)
    path = cache_path(None, "tokens", f"{key[:24]}.npy")
    if not path.is_file():
      write_atomic(path, lambda f: np.save(f, tokens), suffix=".tmp.npy")
"""

from __future__ import annotations

import hashlib
import os
import pathlib
import tempfile
from collections.abc import Callable, Iterable
from typing import BinaryIO

__all__ = ["default_cache_dir", "content_key", "cache_path", "write_atomic"]

_CACHE_ENV = "SUBSPACE_JAX_CACHE_DIR"


def default_cache_dir() -> pathlib.Path:
  """Returns the cache directory for tokenizer models and packed tokens.

  ``$SUBSPACE_JAX_CACHE_DIR`` if set, else ``$XDG_CACHE_HOME/subspace_jax``,
  else ``~/.cache/subspace_jax``.
  """
  if os.environ.get(_CACHE_ENV):
    return pathlib.Path(os.environ[_CACHE_ENV]).expanduser()
  base = os.environ.get("XDG_CACHE_HOME") or pathlib.Path.home() / ".cache"
  return pathlib.Path(base).expanduser() / "subspace_jax"


def content_key(header: str, texts: Iterable[str]) -> str:
  """The SHA-256 hex digest of ``header`` and ``texts``.

  Each text is hashed with its length in front, so the key tells apart
  texts that concatenate to the same string.

  Args:
    header: What else the cached file depends on (a format version, the
      settings it was made with).
    texts: The texts it was made from, in order.

  Returns:
    64 hex digits.
  """
  key = hashlib.sha256(header.encode())
  for text in texts:
    data = text.encode("utf-8")
    key.update(len(data).to_bytes(8, "little") + data)
  return key.hexdigest()


def cache_path(cache_dir: str | os.PathLike[str] | None, folder: str,
               name: str) -> pathlib.Path:
  """The path of cached file ``name`` in ``folder`` of ``cache_dir``.

  Args:
    cache_dir: The cache directory; None means :func:`default_cache_dir`.
    folder: The kind of file (``"tokens"``, ``"tokenizers"``).
    name: The file name, usually holding a :func:`content_key`.

  Returns:
    The path; neither it nor its folder need exist.
  """
  return pathlib.Path(cache_dir or default_cache_dir()) / folder / name


def write_atomic(path: pathlib.Path, write: Callable[[BinaryIO], None], *,
                 suffix: str = ".tmp") -> None:
  """Writes a file in one step: to a temporary file beside it, then renamed.

  Args:
    path: The file; its folder is made if missing.
    write: Writes the content to the binary file it is given.
    suffix: Suffix of the temporary file's name.
  """
  path.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=suffix)
  try:
    with os.fdopen(fd, "wb") as f:
      write(f)
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.unlink(tmp)
    raise
