"""An on-disk cache of files named by a hash of their content's inputs.

The data pipeline caches what is costly to make again: trained tokenizer
models and tokenized corpora. Each cached file's name holds a hash of
everything it was made from (:func:`content_key`), so a changed input is a
miss rather than a stale hit, and it is written in one step
(:func:`write_atomic`), so a reader never sees it half written. A cached
file is written with a small manifest beside it (``NAME.sha256.json``: its
size and SHA-256, :func:`write_verified`) and checked against it before use
(:func:`damage`), so a file damaged since (flipped bytes, truncated) is made
again rather than trusted::

    key = content_key("tokens-v2|byte-v1", docs)
    path = cache_path(None, "tokens", f"{key[:24]}.npy")
    if damage(path) is not None:  # Missing, or not what was written.
      write_verified(path, lambda f: np.save(f, tokens))
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
from collections.abc import Callable, Iterable
from typing import BinaryIO

from subspace_jax import atomic
from subspace_jax import jsonio

__all__ = ["default_cache_dir", "content_key", "cache_path", "write_atomic",
           "write_verified", "damage"]

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


def write_atomic(path: pathlib.Path, write: Callable[[BinaryIO], None]) -> None:
  """Writes a file in one step (:func:`subspace_jax.atomic.replacing`).

  Args:
    path: The file; its folder is made if missing.
    write: Writes the content to the binary file it is given.
  """
  with atomic.replacing(path) as f:
    write(f)


_MANIFEST_SCHEMA = {
    "type": "object",
    "required": ["sha256", "bytes"],
    "properties": {"sha256": {"type": "string", "pattern": "^[0-9a-f]{64}$"},
                   "bytes": {"type": "integer", "minimum": 0}},
}


def _manifest(path: pathlib.Path) -> pathlib.Path:
  return path.with_name(path.name + ".sha256.json")


def _file_digest(path: pathlib.Path) -> tuple[str, int]:
  """SHA-256 (hex) and size of a file, read in blocks."""
  digest, size = hashlib.sha256(), 0
  with open(path, "rb") as f:
    while block := f.read(1 << 20):
      digest.update(block)
      size += len(block)
  return digest.hexdigest(), size


def write_verified(path: pathlib.Path,
                   write: Callable[[BinaryIO], None]) -> None:
  """:func:`write_atomic`, then the file's manifest (its size and SHA-256)
  beside it, which :func:`damage` checks."""
  write_atomic(path, write)
  digest, size = _file_digest(path)
  text = json.dumps({"sha256": digest, "bytes": size})
  write_atomic(_manifest(path), lambda f: f.write(text.encode()))


def damage(path: pathlib.Path) -> str | None:
  """Why the cached file ``path`` cannot be used, or None if it is what
  :func:`write_verified` wrote (its size and SHA-256 match the manifest).

  Returns:
    ``"missing"`` if there is no such file; else a few words (``"its
    manifest is missing"``, ``"N bytes, not M"``, ``"SHA-256 mismatch"``).
  """
  if not path.is_file():
    return "missing"
  try:
    manifest = jsonio.read(_manifest(path), max_bytes=4096,
                           schema=_MANIFEST_SCHEMA)
  except FileNotFoundError:
    return "its manifest is missing"
  except (OSError, ValueError) as e:
    return f"its manifest cannot be read ({e})"
  try:
    digest, size = _file_digest(path)
  except OSError as e:
    return f"it cannot be read ({e.strerror or e})"
  if size != manifest["bytes"]:
    return f"{size} bytes, not the {manifest['bytes']} written (truncated?)"
  if digest != manifest["sha256"]:
    return "its SHA-256 is not the one written (damaged bytes)"
  return None
