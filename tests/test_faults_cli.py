"""The CLI run as a user runs it: changed settings on resume, and two runs
in one directory.

Every run is a subprocess (tests/clirun.py) in its own directory, with the
default outputs (runs/tiny_golore/); a refused one stops before training, in
about two seconds.
"""

import json
import pathlib
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest

import clirun

RUN = pathlib.Path("runs", "tiny_golore")
LOCK = RUN / "ckpt" / "run.lock"


def _one_line_error(result):
  """The error line of a refused run (exit 2, one line, no traceback)."""
  assert result.returncode == 2, (result.returncode, result.stderr[-3000:])
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1, result.stderr
  assert lines[0].startswith("pretrain_llama.py: error: "), lines
  return lines[0]


def _steps(cwd):
  return [json.loads(line)["step"]
          for line in (cwd / RUN / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
  """A 10-step run, part 1 of a 20-step schedule, made once."""
  cwd = tmp_path_factory.mktemp("base")
  result = clirun.run(clirun.FAST + ["--steps", "10", "--schedule-steps", "20"], cwd)
  assert result.returncode == 0, result.stderr[-3000:]
  assert not (cwd / LOCK).exists()  # Released at the end.
  return cwd


def _copy(base, tmp_path):
  shutil.copytree(base / "runs", tmp_path / "runs")
  return tmp_path


def _resume_args(*extra):
  return clirun.FAST + ["--schedule-steps", "20", *extra]


def test_changed_settings_are_refused_naming_the_flags(base):
  line = _one_line_error(clirun.run(_resume_args("--steps", "10", "--lr", "0.003",
                                                 "--scale", "0.5"), base))
  assert "--lr 0.08 -> 0.003" in line and "--scale 0.25 -> 0.5" in line, line
  assert "another --checkpoint-dir for a new run" in line and "--allow-changes" in line, line
  # The data order's seed: refused as a setting, not by the data iterator.
  line = _one_line_error(clirun.run(_resume_args("--steps", "20", "--seed", "1"), base))
  assert "--seed 0 -> 1" in line and "iterator" not in line, line
  # More --steps without --schedule-steps would stretch the schedule.
  line = _one_line_error(clirun.run(clirun.FAST + ["--steps", "30"], base))
  assert "--schedule-steps 20 -> 30" in line and "--schedule-steps 20 to keep" in line, line
  assert _steps(base) == [5, 10]  # Nothing was run or written.


def test_more_steps_resume(base, tmp_path):
  cwd = _copy(base, tmp_path)
  result = clirun.run(_resume_args("--steps", "20", "--log-every", "10"), cwd)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "resumed from step 10" in result.stderr, result.stderr
  changed = [l for l in result.stderr.splitlines() if l.startswith("changed since step 10")]
  assert len(changed) == 1, result.stderr
  assert "--steps 10 -> 20" in changed[0] and "--log-every 5 -> 10" in changed[0], changed
  assert "done: 10 steps (to step 20)" in result.stdout, result.stdout
  assert _steps(cwd) == [5, 10, 20]


def test_allow_changes_accepts_them(base, tmp_path):
  cwd = _copy(base, tmp_path)
  changed = ["--steps", "12", "--lr", "0.003", "--seed", "1", "--eval-every", "0"]
  result = clirun.run(_resume_args(*changed, "--allow-changes"), cwd)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "resumed from step 10" in result.stderr, result.stderr
  assert "allowed by --allow-changes: --lr 0.08 -> 0.003, --seed 0 -> 1" in result.stderr
  # The new seed's data order cannot continue the old one's position.
  assert "the data starts from its beginning" in result.stderr, result.stderr
  assert "done: 2 steps (to step 12)" in result.stdout, result.stdout
  # The checkpoint now holds the new settings: the same command resumes.
  result = clirun.run(_resume_args(*changed), cwd)
  assert result.returncode == 0 and "resumed from step 12" in result.stderr, result.stderr


def _wait_for(predicate, proc, what, timeout=120):
  deadline = time.monotonic() + timeout
  while not predicate():
    if proc.poll() is not None:
      out, err = proc.communicate()
      pytest.fail(f"the first run ended before {what}:\n{err[-3000:]}")
    assert time.monotonic() < deadline, f"no {what} within {timeout} s"
    time.sleep(0.1)


def test_second_run_in_one_directory_is_refused(tmp_path):
  first = clirun.start(clirun.FAST + ["--steps", "100000", "--eval-every", "0",
                                      "--checkpoint-every", "100000"], tmp_path)
  try:
    _wait_for((tmp_path / LOCK).exists, first, "lock file")
    holder = json.loads((tmp_path / LOCK).read_text())
    assert holder["pid"] == first.pid
    line = _one_line_error(clirun.run(clirun.FAST + ["--steps", "20"], tmp_path))
    assert f"in use by another run (pid {first.pid} on {holder['host']}" in line, line
    assert "another --checkpoint-dir for a new run" in line and str(LOCK) in line, line
    metrics = tmp_path / RUN / "metrics.jsonl"
    _wait_for(lambda: metrics.exists() and metrics.read_text().count("\n") >= 1,
              first, "metrics line")
    first.send_signal(signal.SIGINT)
    out, err = first.communicate(timeout=120)
  finally:
    if first.poll() is None:
      first.kill()
      first.communicate()
  assert first.returncode == 128 + signal.SIGINT, err[-3000:]
  assert "interrupted by SIGINT" in out, out
  assert not (tmp_path / LOCK).exists()
  steps = _steps(tmp_path)
  assert steps == sorted(set(steps)), steps  # One run wrote the file.


def test_stale_lock_is_taken_over(tmp_path):
  gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                        capture_output=True, text=True, check=True)
  pid = int(gone.stdout)
  (tmp_path / LOCK).parent.mkdir(parents=True)
  # A lock from another host cannot be checked: it is respected.
  (tmp_path / LOCK).write_text(json.dumps({"host": "elsewhere", "pid": pid,
                                           "since": "2024-01-01 00:00:00"}))
  quick = clirun.FAST + ["--steps", "2", "--eval-every", "0"]
  line = _one_line_error(clirun.run(quick, tmp_path))
  assert f"pid {pid} on elsewhere" in line and f"delete {LOCK}" in line, line
  # One of this host, whose process is gone, is taken over.
  (tmp_path / LOCK).write_text(json.dumps({"host": socket.gethostname(), "pid": pid,
                                           "since": "2024-01-01 00:00:00"}))
  result = clirun.run(quick, tmp_path)
  assert result.returncode == 0, result.stderr[-3000:]
  assert f"took over the lock of a run that is gone (pid {pid}" in result.stderr
  assert not (tmp_path / LOCK).exists()


@pytest.mark.parametrize("name", ["../../x", "/tmp/elsewhere", "a/b", "..", "a\nb"])
def test_run_names_are_plain_names(tmp_path, name):
  """`--name ../../x` or an absolute path wrote outside runs/."""
  with pytest.raises(ValueError, match="is not a plain name"):
    clirun.run_config(["--name", name])


def test_a_run_name_with_a_path_exits_2_writing_nothing(tmp_path):
  work = tmp_path / "a" / "b"
  work.mkdir(parents=True)
  line = _one_line_error(clirun.run(["--name", "../../x", "--steps", "2"], work))
  assert "--name: the run name '../../x' is not a plain name" in line, line
  assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == [
      pathlib.Path("a"), pathlib.Path("a/b")]
