"""Shared helpers of the benchmark scripts: where results go, what ran them.

Every results file starts with its provenance (:func:`provenance`): the
machine and versions, the command and the commit it was measured on. A
results file may hold blocks for the README (:func:`readme_block`), which
``python -m benchmarks.report`` copies into the README between markers.
"""

from __future__ import annotations

import os
import pathlib
import platform
import shlex
import subprocess
import sys

RESULTS = pathlib.Path(__file__).resolve().parent / "results"
ROOT = RESULTS.parents[1]

# What a measured result depends on: uncommitted changes here make the
# commit line say so (results files themselves do not count).
_CODE = ("subspace_jax", "benchmarks", "examples", "pyproject.toml")


def machine_line() -> str:
  """One line naming the machine and the versions that produced a result."""
  import jax  # pylint: disable=import-outside-toplevel
  import optax  # pylint: disable=import-outside-toplevel
  dev = jax.devices()[0]
  return (
      f"Machine: {platform.machine()}, {os.cpu_count()} CPU cores, "
      f"JAX {jax.__version__} on {dev.platform} ({dev.device_kind}), "
      f"optax {optax.__version__}, Python {platform.python_version()}."
  )


def commit() -> str:
  """The checkout's commit (short hash), with ``+uncommitted`` when the
  code (not the results) differs from it; ``unknown`` outside git."""
  def git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=ROOT, capture_output=True,
                          text=True, check=True, timeout=30).stdout.strip()
  try:
    head = git("rev-parse", "--short=10", "HEAD")
    dirty = git("status", "--porcelain", "--untracked-files=no", "--", *_CODE,
                ":(exclude)benchmarks/results")
  except (OSError, subprocess.SubprocessError):
    return "unknown"
  return head + ("+uncommitted" if dirty else "")


def command_line(module: str, argv: list[str] | None = None) -> str:
  """``python -m benchmarks.NAME ARGS`` of this run (``argv``: the
  arguments, default the process's)."""
  argv = sys.argv[1:] if argv is None else argv
  return f"python -m {module}" + (" " + shlex.join(argv) if argv else "")


def provenance(command: str, *, commit_id: str | None = None) -> str:
  """The lines every results file starts with: machine, command, commit."""
  return (f"{machine_line()}\n\nCommand: `{command}`\n\n"
          f"Commit: `{commit_id or commit()}`\n")


def readme_block(key: str, text: str) -> str:
  """``text`` between the markers that ``benchmarks.report`` copies into
  the README's section ``key``. Relative links in ``text`` are relative to
  ``benchmarks/results/``."""
  return (f"<!-- begin readme:{key} -->\n{text.strip()}\n"
          f"<!-- end readme:{key} -->\n")


def write(path, text: str) -> None:
  """Writes ``text`` to ``path`` whole or not at all (a temporary file in
  the same directory, renamed into place)."""
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
  tmp.write_text(text, encoding="utf-8")
  os.replace(tmp, path)
  print(f"wrote {path}")


def add_output_flags(parser, name: str, *, note: bool = True) -> None:
  """``--out`` (default ``results/NAME``) and, with ``note``, ``--note``."""
  if note:
    parser.add_argument("--note", default="",
                        help="free text for the results file (e.g. the load)")
  parser.add_argument("--out", default=str(RESULTS / name),
                      help="markdown file to write")
