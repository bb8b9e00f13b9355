"""Damaged and interrupted checkpoints, as a user meets them: the CLI
(examples/pretrain_llama.py) in subprocesses, one CPU device each.

* A checkpoint whose array file has flipped bytes (it still decodes, to
  other values) or was truncated: the rerun falls back to the step before,
  says so in one warning line and nothing else, and ends exactly where an
  uninterrupted run ends.
* Every checkpoint damaged: exit code 2, and the one-line error is the last
  thing on stderr.
* ``kill -9`` during training and during a save, then a rerun: it resumes
  from an intact step and its final checkpoint is bit-identical to an
  uninterrupted run's.

All runs share ``--schedule-steps 30``, so a run of 20 steps continued to 30
follows the same learning-rate schedule as one of 30.
"""

import hashlib
import json
import math
import pathlib
import shutil
import time
import warnings

import jax
import numpy as np
import pytest

import clirun
from subspace_jax.train import checkpoint
from subspace_jax.train import step as train
from subspace_jax import sharding as shd


ARGS = [*clirun.FAST, "--schedule-steps", "30"]
RUN = pathlib.Path("runs", "tiny_golore")  # Under the working directory.
# The runs' environment: a compilation cache that all of them share.
ENV: dict[str, str] = {}


@pytest.fixture(scope="module", autouse=True)
def _shared_compilation_cache(tmp_path_factory):
  """Lets every run after the first load its compiled steps from a
  persistent cache instead of compiling them (about 9 of a run's 14 CPU
  seconds)."""
  ENV.update(JAX_COMPILATION_CACHE_DIR=str(tmp_path_factory.mktemp("xla_cache")),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
             JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
  yield
  ENV.clear()


def _run(cwd, steps):
  return clirun.run([*ARGS, "--steps", str(steps)], cwd, extra_env=ENV)


def _final_state(cwd, step=None) -> checkpoint.Restored:
  """The newest checkpoint (or ``step``) of the run in ``cwd``, restored
  onto this test session's devices; it must carry checksums, and they must
  match."""
  cfg = clirun.run_config(ARGS)
  setup = train.setup(cfg.model_config, cfg.optimizer, shd.make_mesh(*cfg.mesh))
  with checkpoint.Checkpointer(cwd / RUN / "ckpt") as ckpt, warnings.catch_warnings():
    warnings.simplefilter("error", checkpoint.CheckpointWarning)
    restored = ckpt.restore(setup.abstract_state, step=step)
  return restored._replace(state=jax.device_get(restored.state))


def _assert_same_run(got: checkpoint.Restored, want: checkpoint.Restored):
  assert got.step == want.step and got.data_state == want.data_state
  assert jax.tree.structure(got.state) == jax.tree.structure(want.state)
  for a, b in zip(jax.tree.leaves(got.state), jax.tree.leaves(want.state)):
    assert a.dtype == b.dtype
    np.testing.assert_array_equal(a, b)


def _records(cwd) -> list[dict]:
  path = cwd / RUN / "metrics.jsonl"
  if not path.exists():
    return []
  return [json.loads(line) for line in path.read_text().splitlines() if line.endswith("}")]


def _array_file(step_dir: pathlib.Path) -> pathlib.Path:
  """The largest OCDBT data file of the step's state: the array chunks."""
  files = [p for p in (step_dir / "state").rglob("*") if p.is_file() and p.parent.name == "d"]
  return max(files, key=lambda p: p.stat().st_size)


def _flip(step_dir: pathlib.Path):
  path = _array_file(step_dir)
  data = bytearray(path.read_bytes())
  middle = len(data) // 2
  data[middle:middle + 64] = bytes(b ^ 0xFF for b in data[middle:middle + 64])
  path.write_bytes(bytes(data))


def _truncate(step_dir: pathlib.Path):
  path = _array_file(step_dir)
  with open(path, "r+b") as f:
    f.truncate(path.stat().st_size // 2)


def _warnings(stderr: str) -> list[str]:
  return [line for line in stderr.splitlines()
          if "warning" in line.lower() or "corrupt" in line.lower()]


# Lines a healthy resume prints anyway: the compile notice, evaluations, a taken-over
# lock of a killed run, Orbax's note that it removes a half-written save.
_EXPECTED = ("compiling the train step", "took over the lock", ": eval loss ",
             "Removing existing directory since it is not finalized")


def _assert_quiet(stderr: str, most: int):
  assert "Traceback" not in stderr and "tensorstore" not in stderr.lower()
  assert "Exception" not in stderr and "Event loop" not in stderr
  lines = [l for l in stderr.splitlines() if not any(e in l for e in _EXPECTED)]
  assert len(lines) <= most, stderr[-3000:]


@pytest.fixture(scope="module")
def run_30(tmp_path_factory) -> pathlib.Path:
  """A run of 30 steps that nothing disturbed: checkpoints 10, 20, 30."""
  cwd = tmp_path_factory.mktemp("run_30")
  out = _run(cwd, 30)
  assert out.returncode == 0, out.stderr[-3000:]
  assert sorted(p.name for p in (cwd / RUN / "ckpt").iterdir()) == ["10", "20", "30"]
  return cwd


@pytest.fixture(scope="module")
def uninterrupted(run_30) -> checkpoint.Restored:
  """Its final checkpoint (step 30)."""
  return _final_state(run_30)


@pytest.fixture
def first_20(run_30, tmp_path) -> pathlib.Path:
  """A copy of that run as it was after 20 steps: what a run of 20 steps
  leaves (the same checkpoints 10 and 20; the schedule is the same)."""
  shutil.copytree(run_30 / "runs", tmp_path / "runs")
  shutil.rmtree(tmp_path / RUN / "ckpt" / "30")
  (tmp_path / RUN / "metrics.jsonl").unlink()  # Only the rerun's, then.
  return tmp_path


@pytest.mark.parametrize("damage", [_flip, _truncate], ids=["flipped", "truncated"])
def test_damaged_newest_checkpoint_falls_back(first_20, uninterrupted, damage):
  cwd = first_20
  damage(cwd / RUN / "ckpt" / "20")
  out = _run(cwd, 30)
  assert out.returncode == 0, out.stderr[-3000:]
  [line] = _warnings(out.stderr)
  assert line.startswith("warning: checkpoint step(s) 20 in ")
  assert line.endswith("; restored step 10 instead")
  if damage is _flip:  # Decodes fine; only the checksum tells.
    assert "checksum mismatch" in line
  assert f"resumed from step 10 ({cwd.resolve() / RUN / 'ckpt'})" in out.stderr
  _assert_quiet(out.stderr, most=3)
  records = _records(cwd)
  assert [r["step"] for r in records] == [15, 20, 25, 30]
  assert all(math.isfinite(r["loss"]) for r in records)
  assert math.isfinite(records[-1]["eval_loss"])
  _assert_same_run(_final_state(cwd), uninterrupted)
  # The damaged step 20 was replaced by the re-trained one (it used to stay,
  # and every later run fell back past it again).
  assert _final_state(cwd, step=20).step == 20


def test_every_checkpoint_damaged_ends_with_one_error_line(first_20):
  cwd = first_20
  _truncate(cwd / RUN / "ckpt" / "20")
  _flip(cwd / RUN / "ckpt" / "10")
  out = _run(cwd, 30)
  assert out.returncode == 2
  lines = out.stderr.strip().splitlines()
  assert lines[-1].startswith("pretrain_llama.py: error: no readable checkpoint in ")
  assert "step(s) 20, 10 are corrupt" in lines[-1]
  _assert_quiet(out.stderr, most=9)
  assert not _warnings(out.stderr.replace(lines[-1], ""))  # No fallback line.


def _wait(proc, condition, timeout=120.0, poll=0.001):
  """Polls ``condition()`` until true; False if ``proc`` exits or time runs
  out first."""
  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline:
    if condition():
      return True
    if proc.poll() is not None:
      return False
    time.sleep(poll)
  return False


def _kill9(proc):
  proc.kill()  # SIGKILL: no handler, no cleanup.
  proc.communicate(timeout=60)
  assert proc.returncode == -9


def test_kill_9_in_training_and_in_a_save_then_resume_exactly(uninterrupted, tmp_path):
  """Kills the run twice, then lets it finish.

  1. During training: once the step-15 metrics are written (after the
     step-10 save began; whether it committed is up to timing).
  2. During a save: at the first sight of Orbax's temporary directory of
     step 20, i.e. mid-write (if the poll misses it, right after).

  Guaranteed and checked: the final run exits 0, never resumes from a step
  left half-written, and its step-30 checkpoint equals the uninterrupted
  run's bit for bit (state, data position).
  """
  ckpt = tmp_path / RUN / "ckpt"
  argv = [*ARGS, "--steps", "30"]

  proc = clirun.start(argv, tmp_path, extra_env=ENV)
  assert _wait(proc, lambda: any(r["step"] >= 15 for r in _records(tmp_path))), \
      proc.communicate()[1][-3000:]
  _kill9(proc)

  seen = len(_records(tmp_path))
  tmp_dirs = lambda: [p for p in ckpt.glob("20.orbax-checkpoint-tmp*")]
  proc = clirun.start(argv, tmp_path, extra_env=ENV)
  assert _wait(proc, lambda: len(_records(tmp_path)) > seen
               and any(r["step"] == 20 for r in _records(tmp_path)[seen:]))
  caught_mid_save = _wait(proc, tmp_dirs, timeout=30)
  _kill9(proc)
  half_written = bool(tmp_dirs())
  committed = sorted(int(p.name) for p in ckpt.iterdir() if p.name.isdigit())

  out = clirun.run(argv, tmp_path, extra_env=ENV)
  assert out.returncode == 0, out.stderr[-3000:]
  _assert_quiet(out.stderr, most=3)
  [resumed] = [line for line in out.stderr.splitlines() if line.startswith("resumed from step")]
  if committed:
    assert resumed.startswith(f"resumed from step {committed[-1]} ")
  if half_written:
    assert 20 not in committed and resumed.startswith("resumed from step 10 ")
  print(f"kill in save: caught mid-save={caught_mid_save}, temp dir left="
        f"{half_written}, committed={committed}; {resumed}")
  _assert_same_run(_final_state(tmp_path), uninterrupted)


def _data_file(cwd, step) -> pathlib.Path:
  return cwd / RUN / "ckpt" / str(step) / "data" / "process_0-of-1.json"


def test_an_edited_data_position_falls_back(first_20, uninterrupted):
  """The data position used to be outside the checksums: an edited one
  resumed silently on other data."""
  cwd = first_20
  path = _data_file(cwd, 20)
  record = json.loads(path.read_text())
  assert record["position"]["batch"] == 20
  record["position"]["batch"] = 12
  path.write_text(json.dumps(record))
  out = _run(cwd, 30)
  assert out.returncode == 0, out.stderr[-3000:]
  [line] = _warnings(out.stderr)
  assert "step(s) 20 " in line and "data position process_0-of-1.json: " \
      "checksum mismatch" in line and line.endswith("restored step 10 instead")
  _assert_same_run(_final_state(cwd), uninterrupted)


def test_a_data_position_past_its_step_is_one_line(first_20):
  """A position past the step with a matching checksum (written by hand):
  a one-line error, where an absurd position ended in a bare StopIteration."""
  cwd = first_20
  path = _data_file(cwd, 20)
  record = json.loads(path.read_text())
  record["position"]["batch"] = 10**30
  body = {k: v for k, v in record.items() if k != "sha256"}
  record["sha256"] = hashlib.sha256(json.dumps(
      body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
  path.write_text(json.dumps(record))
  out = _run(cwd, 30)
  assert out.returncode == 2, out.stderr[-3000:]
  last = out.stderr.strip().splitlines()[-1]
  assert last.startswith("pretrain_llama.py: error: the data position saved "
                         "at step 20 is at batch 10000000000000000000000000000"
                         "00, past the batches"), last
  assert "Traceback" not in out.stderr and "StopIteration" not in out.stderr
