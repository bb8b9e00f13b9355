"""Failures of the machine under a run, through the real CLI
(examples/pretrain_llama.py in subprocesses, one CPU device each): a full
disk during a save, an old checkpoint that cannot be deleted, a step that
does not fit in the device's memory.

Each ends in one line saying what failed and what to do, and leaves the last
good checkpoint as it was. The disk is filled by a limit on the size of the
files the run may write (``RLIMIT_FSIZE``: writes past it fail with EFBIG, as
they fail with ENOSPC on a full disk); an old checkpoint is made
undeletable with ``chattr +i`` (as root) or ``chmod`` (as another user).
"""

import os
import pathlib
import shutil
import subprocess
import warnings

import pytest

import clirun
from subspace_jax.train import checkpoint

ARGS = [*clirun.FAST, "--schedule-steps", "20", "--eval-every", "0",
        "--keep", "1"]
RUN = pathlib.Path("runs", "tiny_golore")
ENV: dict[str, str] = {}

# Runs the example with the size of the files it writes limited to $FSIZE
# bytes (SIGXFSZ ignored, so that a write past it fails with EFBIG).
_LIMITED = f'''
import os, resource, runpy, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
limit = int(os.environ["FSIZE"])
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
sys.argv = [{str(clirun.EXAMPLE)!r}] + sys.argv[1:]
runpy.run_path({str(clirun.EXAMPLE)!r}, run_name="__main__")
'''

# Runs the example with a train step that runs out of device memory at its
# third call, as XLA reports it.
_OOM = f'''
import runpy, sys
import jax
from subspace_jax.train import step as train

setup_of = train.setup
def setup(*args, **kwargs):
  made = setup_of(*args, **kwargs)
  step, calls = made.train_step, [0]
  def train_step(state, batch):
    calls[0] += 1
    if calls[0] == 3:
      raise jax.errors.JaxRuntimeError(
          "RESOURCE_EXHAUSTED: Out of memory while trying to allocate "
          "17179869184 bytes.")
    return step(state, batch)
  return made._replace(train_step=train_step) if hasattr(made, "_replace") \\
      else __import__("dataclasses").replace(made, train_step=train_step)
train.setup = setup
sys.argv = [{str(clirun.EXAMPLE)!r}] + sys.argv[1:]
runpy.run_path({str(clirun.EXAMPLE)!r}, run_name="__main__")
'''


@pytest.fixture(scope="module", autouse=True)
def _shared_compilation_cache(tmp_path_factory):
  """Every run after the first loads its compiled steps from a cache."""
  ENV.update(JAX_COMPILATION_CACHE_DIR=str(tmp_path_factory.mktemp("xla_cache")),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
             JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
  yield
  ENV.clear()


@pytest.fixture(scope="module")
def run_10(tmp_path_factory) -> pathlib.Path:
  """A run of 10 steps (checkpoint 10), part 1 of 20."""
  cwd = tmp_path_factory.mktemp("run_10")
  out = clirun.run([*ARGS, "--steps", "10"], cwd, extra_env=ENV)
  assert out.returncode == 0, out.stderr[-3000:]
  return cwd


@pytest.fixture
def copy_10(run_10, tmp_path) -> pathlib.Path:
  shutil.copytree(run_10 / "runs", tmp_path / "runs")
  return tmp_path


def _script(tmp_path, text) -> pathlib.Path:
  path = tmp_path / "driver.py"
  path.write_text(text)
  return path


def _error_line(out, code) -> str:
  """The run's last stderr line, once it is checked to be its one error
  line, with nothing of Orbax's or TensorStore's threads before it."""
  assert out.returncode == code, out.stderr[-3000:]
  lines = out.stderr.strip().splitlines()
  assert "Traceback" not in out.stderr and "Event loop" not in out.stderr, \
      out.stderr[-3000:]
  assert len(lines) <= 5, out.stderr[-3000:]  # Status lines and the error.
  assert lines[-1].startswith("pretrain_llama.py: error: "), lines[-1]
  return lines[-1]


def _steps(cwd) -> list[int]:
  with checkpoint.Checkpointer(cwd / RUN / "ckpt") as ckpt:
    return ckpt.all_steps()


def _restores(cwd, step) -> bool:
  """Whether ``step`` restores with matching checksums (no warning)."""
  import jax  # pylint: disable=import-outside-toplevel
  from subspace_jax import sharding as shd  # pylint: disable=import-outside-toplevel
  from subspace_jax.train import step as train  # pylint: disable=import-outside-toplevel
  cfg = clirun.run_config(ARGS)
  setup = train.setup(cfg.model_config, cfg.optimizer,
                      shd.make_mesh(1, 1, 1, devices=jax.devices()[:1]))
  with checkpoint.Checkpointer(cwd / RUN / "ckpt") as ckpt, \
      warnings.catch_warnings():
    warnings.simplefilter("error", checkpoint.CheckpointWarning)
    return ckpt.restore(setup.abstract_state, step=step).step == step


def test_a_full_disk_during_a_save_is_one_line(copy_10, tmp_path):
  """Files of at most 100 kB: the checkpoint's array file (about 420 kB)
  cannot be written. It printed 581 lines (84 "Event loop is closed"
  tracebacks) before the useful one, and exited 2."""
  cwd = copy_10
  out = clirun.run([*ARGS, "--steps", "20"], cwd,
                   script=_script(tmp_path, _LIMITED),
                   extra_env=dict(ENV, FSIZE="100000"))
  line = _error_line(out, 1)
  assert f"cannot save checkpoint step 20 in {cwd.resolve() / RUN / 'ckpt'} " \
      "(File too large); free space there or give another --checkpoint-dir; " \
      "the newest checkpoint, step 10, is intact" in line, line
  assert _steps(cwd) == [10] and _restores(cwd, 10)


def _undeletable(path: pathlib.Path):
  """Makes ``path`` (a directory) impossible to delete, or skips; returns
  the function that undoes it."""
  inner = path / "version" / "metadata"
  if os.geteuid() == 0:
    if shutil.which("chattr") is None or subprocess.run(
        ["chattr", "+i", str(inner)], capture_output=True).returncode:
      pytest.skip("chattr +i is not available here")
    return lambda: subprocess.run(["chattr", "-i", str(inner)], check=True)
  os.chmod(inner.parent, 0o555)
  return lambda: os.chmod(inner.parent, 0o755)


def test_an_old_step_that_cannot_be_deleted_is_a_note(copy_10):
  """--keep 1 deletes step 10 once 20 is saved; it cannot be: a warning
  line, and the run ends as usual with step 20 saved. It used to fail the
  final save after training, and lose it."""
  cwd = copy_10
  undo = _undeletable(cwd / RUN / "ckpt" / "10")
  try:
    out = clirun.run([*ARGS, "--steps", "20"], cwd, extra_env=ENV)
  finally:
    undo()
  assert out.returncode == 0, out.stderr[-3000:]
  assert "Traceback" not in out.stderr, out.stderr[-3000:]
  [note] = [l for l in out.stderr.splitlines() if l.startswith("warning:")]
  assert note.startswith("warning: could not delete checkpoint step 10 in ") \
      and "delete it by hand" in note, note
  assert "done: 10 steps (to step 20)" in out.stdout
  assert 20 in _steps(cwd) and _restores(cwd, 20)


def test_out_of_memory_in_a_step_is_one_line(copy_10, tmp_path):
  cwd = copy_10
  out = clirun.run([*ARGS, "--steps", "20"], cwd,
                   script=_script(tmp_path, _OOM), extra_env=ENV)
  line = _error_line(out, 1)
  assert "out of device memory (RESOURCE_EXHAUSTED: Out of memory while " \
      "trying to allocate 17179869184 bytes.)" in line, line
  assert "smaller --batch-size" in line and "--remat" in line, line
  assert "the newest checkpoint, step 10, is intact" in line, line
  assert _steps(cwd) == [10] and _restores(cwd, 10)


def test_metrics_lines_stay_whole_after_a_cut_short_one(tmp_path):
  """A record cut short (the disk filled while it was appended): the next
  record starts a line of its own instead of gluing onto it."""
  from subspace_jax.run import reporting  # pylint: disable=import-outside-toplevel
  path = tmp_path / "metrics.jsonl"
  path.write_text('{"step": 5, "loss": 1.0}\n{"step": 10, "lo')
  sink = reporting.MetricsSink(str(path), None)
  sink.write({"step": 15, "loss": 0.5})
  sink.close()
  assert path.read_text().splitlines() == [
      '{"step": 5, "loss": 1.0}', '{"step": 10, "lo', '{"step": 15, "loss": 0.5}']
