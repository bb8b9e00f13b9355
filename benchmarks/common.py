"""Shared helpers of the benchmark scripts: where results go, what ran them."""

from __future__ import annotations

import os
import pathlib
import platform

import jax

RESULTS = pathlib.Path(__file__).resolve().parent / "results"


def machine_line() -> str:
  """One line naming the machine and the versions that produced a result."""
  import optax
  dev = jax.devices()[0]
  return (
      f"Machine: {platform.machine()}, {os.cpu_count()} CPU cores, "
      f"JAX {jax.__version__} on {dev.platform} ({dev.device_kind}), "
      f"optax {optax.__version__}, Python {platform.python_version()}."
  )


def write(path, text: str) -> None:
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(text)
  print(f"wrote {path}")


def add_output_flags(parser, name: str, *, note: bool = True) -> None:
  """``--out`` (default ``results/NAME``) and, with ``note``, ``--note``."""
  if note:
    parser.add_argument("--note", default="",
                        help="free text for the results file (e.g. the load)")
  parser.add_argument("--out", default=str(RESULTS / name),
                      help="markdown file to write")
