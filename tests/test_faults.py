"""Fault injection through the real CLI: non-finite steps, signals, output.

Each test runs examples/pretrain_llama.py (the tiny model, one CPU device)
in a subprocess. Non-finite gradients are injected by a driver script that
wraps the example: it multiplies the loss of chosen training steps by NaN
(the library has no test hook for this). Checkpoint damage and settings
changes have their own modules (test_faults_checkpoint.py,
test_faults_cli.py).
"""

import json
import math
import signal
import time

import jax
import numpy as np

import clirun
from subspace_jax.train import checkpoint
from subspace_jax.train import step as train
from subspace_jax import sharding as shd

# Runs the example with the loss of training steps $POISON_STEPS (1-based,
# comma-separated) multiplied by NaN: their gradients are all NaN.
_DRIVER = f'''
import os, runpy, sys
import jax.numpy as jnp
import numpy as np
from subspace_jax.run import loop
from subspace_jax.train import step as train

bad = {{int(s) for s in os.environ["POISON_STEPS"].split(",") if s}}
loss_of = train.ModelDef.loss
def loss(self, params, batch):
  value = loss_of(self, params, {{k: v for k, v in batch.items() if k != "poison"}})
  return value * jnp.mean(batch["poison"]) if "poison" in batch else value
train.ModelDef.loss = loss

evaluating, steps = [False], [0]
evaluate = loop._evaluate
def _evaluate(*args, **kwargs):
  evaluating[0] = True
  try:
    return evaluate(*args, **kwargs)
  finally:
    evaluating[0] = False
loop._evaluate = _evaluate

global_batch = loop._global_batch
def _global_batch(local, setup, cfg):
  if not evaluating[0]:
    steps[0] += 1
    factor = np.nan if steps[0] in bad else 1.0
    local = dict(local, poison=np.full(local["inputs"].shape, factor, np.float32))
  return global_batch(local, setup, cfg)
loop._global_batch = _global_batch

sys.argv = [{str(clirun.EXAMPLE)!r}] + sys.argv[1:]
runpy.run_path({str(clirun.EXAMPLE)!r}, run_name="__main__")
'''


def _driver(tmp_path):
  path = tmp_path / "poisoned_run.py"
  path.write_text(_DRIVER)
  return path


def _records(run_dir):
  return [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _restore(run_dir, args):
  """The newest checkpoint of a run made with the example's ``args``."""
  cfg = clirun.run_config(args)
  setup = train.setup(cfg.model_config, cfg.optimizer, shd.make_mesh(
      1, 1, 1, devices=jax.devices()[:1]))
  with checkpoint.Checkpointer(run_dir / "ckpt") as ckpt:
    return ckpt.all_steps(), ckpt.restore(setup.abstract_state)


def test_one_non_finite_step_is_skipped_and_counted(tmp_path):
  args = clirun.FAST + ["--steps", "20"]
  result = clirun.run(args, tmp_path, script=_driver(tmp_path),
                      extra_env={"POISON_STEPS": "7"})
  assert result.returncode == 0, result.stderr[-3000:]
  records = _records(tmp_path / "runs" / "tiny_golore")
  assert [r["nonfinite_steps"] for r in records] == [0, 1, 1, 1]
  assert all(math.isfinite(r["loss"]) for r in records)
  # stdout holds the summary alone; evaluations are printed without a bar.
  (line,) = result.stdout.splitlines()
  assert line.startswith("done: 20 steps") and "1 non-finite step(s) skipped" in line
  assert "step 10: eval loss" in result.stderr and "step 20: eval loss" in result.stderr
  steps, restored = _restore(tmp_path / "runs" / "tiny_golore", args)
  assert steps == [10, 20]
  # 20 batches, 19 applied updates: the skipped step left step and state.
  assert int(restored.state.step) == 19
  assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(restored.state.params))


def test_consecutive_non_finite_steps_stop_without_a_poisoned_checkpoint(tmp_path):
  args = clirun.FAST + ["--steps", "40", "--max-bad-steps", "4"]
  poison = ",".join(str(s) for s in range(12, 41))
  result = clirun.run(args, tmp_path, script=_driver(tmp_path),
                      extra_env={"POISON_STEPS": poison})
  assert result.returncode == 1, result.stderr[-3000:]
  last = result.stderr.strip().splitlines()[-1]
  assert "error: stopped at step 15: the last 4 steps had a non-finite" in last, last
  assert "Traceback" not in result.stderr
  steps, restored = _restore(tmp_path / "runs" / "tiny_golore", args)
  assert steps == [10]  # Nothing after the streak began.
  assert int(restored.state.step) == 10
  assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(restored.state.params))


def test_bad_learning_rate_never_trains_nan_to_the_end(tmp_path):
  """A step whose update is not finite is skipped too (lr 1e30: inf·0)."""
  result = clirun.run(clirun.FAST + ["--steps", "40", "--lr", "1e30",
                                     "--max-bad-steps", "3"], tmp_path)
  assert result.returncode == 1, result.stderr[-3000:]
  assert "non-finite" in result.stderr.strip().splitlines()[-1]


def test_two_sigints_while_compiling_stop_at_once(tmp_path):
  proc = clirun.start(clirun.FAST + ["--steps", "1000", "--model", "llama_60m",
                                     "--batch-size", "2"], tmp_path)
  try:
    line, deadline = "", time.monotonic() + 120
    while "compiling the train step" not in line:
      line = proc.stderr.readline()
      assert line and time.monotonic() < deadline, proc.communicate()
    proc.send_signal(signal.SIGINT)
    time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    t0 = time.monotonic()
    out, err = proc.communicate(timeout=60)
    elapsed = time.monotonic() - t0
  finally:
    if proc.poll() is None:
      proc.kill()
      proc.communicate()
  assert proc.returncode == 128 + signal.SIGINT, err
  assert "second SIGINT: stopped at once" in err and "Traceback" not in err, err
  assert elapsed < 10, elapsed  # The compile alone takes longer.
  ckpt_dir = tmp_path / "runs" / "llama_60m_golore" / "ckpt"
  with checkpoint.Checkpointer(ckpt_dir) as ckpt:
    assert ckpt.all_steps() == []
  # The lock of the stopped run is stale: the next run takes it over.
  again = clirun.run(clirun.FAST + ["--steps", "2", "--model", "llama_60m",
                                    "--batch-size", "2", "--eval-every", "0"],
                     tmp_path)
  assert again.returncode == 0, again.stderr[-3000:]
  assert "took over the lock" in again.stderr
