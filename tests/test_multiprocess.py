"""Two local CPU processes (4 devices each) train one model on an 8-device mesh.

Each launch runs examples/pretrain_llama.py in two subprocesses that meet at
a localhost coordinator. The first launch saves a checkpoint, the second
resumes from it; both processes must finish and log the same losses.
"""

import json
import os
import pathlib
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from subspace_jax.cli import pretrain
from subspace_jax.train import checkpoint

ROOT = pathlib.Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "pretrain_llama.py"
TIMEOUT_S = 240


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _args(tmp: pathlib.Path, steps: int) -> list[str]:
  return [
      "--steps", str(steps), "--schedule-steps", "9", "--mesh", "2,2,2", "--batch-size", "8",
      "--seq-len", "32", "--rank", "8", "--update-gap", "3", "--log-every", "1",
      "--eval-every", "3", "--eval-batches", "2", "--checkpoint-every", "3",
      "--checkpoint-dir", str(tmp / "ckpt"), "--metrics", str(tmp / "m{process}.jsonl"),
      "--tensorboard", "none", "--no-progress"]


def _launch(tmp: pathlib.Path, steps: int) -> list[tuple[str, str]]:
  """Runs both processes to ``steps``; returns their (stdout, stderr)."""
  port = _free_port()
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS="--xla_force_host_platform_device_count=4")
  common = ["--coordinator", f"localhost:{port}", "--num-processes", "2",
            *_args(tmp, steps)]
  procs = [subprocess.Popen([sys.executable, str(EXAMPLE), *common, "--process-id", str(i)],
                            env=env, cwd=tmp, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
           for i in range(2)]
  deadline = time.monotonic() + TIMEOUT_S
  outputs = []
  try:
    for proc in procs:
      outputs.append(proc.communicate(
          timeout=max(1.0, deadline - time.monotonic())))
  finally:
    for proc in procs:
      if proc.poll() is None:
        proc.kill()
        proc.communicate()
  for i, (proc, (_, err)) in enumerate(zip(procs, outputs)):
    assert proc.returncode == 0, f"process {i} failed:\n{err[-3000:]}"
  return outputs


def _losses(path: pathlib.Path) -> list[tuple]:
  return [(r["step"], r["loss"], r["grad_norm"], r.get("eval_loss"))
          for r in map(json.loads, path.read_text().splitlines())]


def _single_process_run(tmp: pathlib.Path, steps: int) -> list[tuple]:
  """The same run in this process, on the 8 devices of conftest.py."""
  if jax.device_count() < 8:
    pytest.skip("needs 8 devices (tests/conftest.py sets XLA_FLAGS)")
  tmp.mkdir()
  pretrain.main(list(map(str, _args(tmp, steps))))
  return _losses(tmp / "m0.jsonl")


def test_two_processes_train_save_and_resume(tmp_path):
  reference = _single_process_run(tmp_path / "single", steps=9)
  first = _launch(tmp_path, steps=6)
  with checkpoint.Checkpointer(tmp_path / "ckpt") as ckpt:
    assert ckpt.all_steps() == [3, 6]
  second = _launch(tmp_path, steps=9)
  with checkpoint.Checkpointer(tmp_path / "ckpt") as ckpt:
    assert ckpt.all_steps() == [3, 6, 9]

  logs = [_losses(tmp_path / f"m{i}.jsonl") for i in range(2)]
  assert logs[0] == logs[1]
  assert [r[0] for r in logs[0]] == list(range(1, 10))
  assert logs[0][-1][1] < logs[0][0][1]
  # The processes together compute what one process does with all devices.
  np.testing.assert_allclose(np.array(logs[0], float), np.array(reference, float),
                             rtol=1e-4)
  for i in range(2):
    # stdout holds the summary alone (no Gloo connection lines).
    assert first[i][0].startswith(f"[process {i}] done: 6 steps (to step 6)")
    assert second[i][0].startswith(f"[process {i}] done: 3 steps (to step 9)")
    assert len(first[i][0].splitlines()) == len(second[i][0].splitlines()) == 1
  assert "resumed from step 6" in second[0][1]
