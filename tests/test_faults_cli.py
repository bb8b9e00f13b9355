"""The CLI run as a user runs it: changed settings on resume.

Every run is a subprocess (tests/clirun.py) in its own directory, with the
default outputs (runs/tiny_golore/); a refused one stops before training, in
about two seconds.
"""

import json
import pathlib
import shutil

import pytest

import clirun

RUN = pathlib.Path("runs", "tiny_golore")


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
  return cwd


def _copy(base, tmp_path):
  shutil.copytree(base / "runs", tmp_path / "runs")
  return tmp_path


def _resume_args(*extra):
  return clirun.FAST + ["--schedule-steps", "20", *extra]


def test_changed_settings_are_refused_naming_the_flags(base):
  line = _one_line_error(clirun.run(_resume_args("--steps", "10", "--lr", "0.003",
                                                 "--scale", "0.5"), base))
  assert "--lr 0.01 -> 0.003" in line and "--scale 0.25 -> 0.5" in line, line
  assert "--name NEW" in line and "--allow-changes" in line, line
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
  assert "allowed by --allow-changes: --lr 0.01 -> 0.003, --seed 0 -> 1" in result.stderr
  # The new seed's data order cannot continue the old one's position.
  assert "the data starts from its beginning" in result.stderr, result.stderr
  assert "done: 2 steps (to step 12)" in result.stdout, result.stdout
  # The checkpoint now holds the new settings: the same command resumes.
  result = clirun.run(_resume_args(*changed), cwd)
  assert result.returncode == 0 and "resumed from step 12" in result.stderr, result.stderr
