"""Runs examples/pretrain_llama.py in a subprocess, as a user runs it.

Fault-injection tests use it: a real process can be killed, signalled and
given damaged files, which an in-process call of ``main()`` cannot show.
Each run uses one CPU device and one BLAS thread (the test session's 8 fake
devices are not passed on).
"""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "pretrain_llama.py"

# A tiny run that compiles and steps in a few seconds: GoLore, rank 8, a new
# subspace every 5 steps, evaluation and checkpoints every 10.
FAST = ["--batch-size", "4", "--seq-len", "32", "--rank", "8",
        "--update-gap", "5", "--warmup", "2", "--log-every", "5",
        "--eval-every", "10", "--eval-batches", "1",
        "--checkpoint-every", "10", "--no-progress", "--tensorboard", "none"]


def env(**extra: str) -> dict[str, str]:
  """The environment of a CLI subprocess: one CPU device, unbuffered."""
  out = dict(os.environ, JAX_PLATFORMS="cpu", OPENBLAS_NUM_THREADS="1",
             PYTHONUNBUFFERED="1",
             XLA_FLAGS="--xla_force_host_platform_device_count=1")
  out.update(extra)
  return out


def command(args: list[str], script: pathlib.Path | str = EXAMPLE) -> list[str]:
  return [sys.executable, str(script), *map(str, args)]


def run(args: list[str], cwd: pathlib.Path, *, timeout: float = 300,
        script: pathlib.Path | str = EXAMPLE,
        extra_env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
  """Runs the CLI to completion; returns its exit code, stdout and stderr."""
  return subprocess.run(command(args, script), cwd=cwd, env=env(**(extra_env or {})),
                        capture_output=True, text=True, timeout=timeout,
                        stdin=subprocess.DEVNULL, check=False)


def start(args: list[str], cwd: pathlib.Path, *,
          script: pathlib.Path | str = EXAMPLE,
          extra_env: dict[str, str] | None = None) -> subprocess.Popen:
  """Starts the CLI; the caller signals, waits for or kills it."""
  return subprocess.Popen(command(args, script), cwd=cwd, env=env(**(extra_env or {})),
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          stdin=subprocess.DEVNULL, text=True)


def run_config(args: list[str], command: str = "pretrain"):
  """The :class:`~subspace_jax.run.config.RunConfig` that ``subspace-jax
  COMMAND ARGS`` would run (parsed in this process; nothing runs)."""
  from subspace_jax.cli import finetune, flags, pretrain  # pylint: disable=import-outside-toplevel
  module = {"pretrain": pretrain, "finetune": finetune}[command]
  with flags.names():
    return module.run_config(flags.parse(module.build_parser(),
                                         list(map(str, args))))
