"""The benchmarks' bookkeeping: README sections regenerated from the results,
the quality study's plan (sweeps that grow past an edge, seeds at the best
rate) and its statistics."""

import json
import math
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from benchmarks import quality
from benchmarks import report

ROOT = pathlib.Path(__file__).resolve().parents[1]

_PROVENANCE = "Machine: x\n\nCommand: `python -m benchmarks.x`\n\nCommit: `abc`\n"


def test_readme_matches_the_results():
  """`python -m benchmarks.report --check`: every README section equals its
  block in benchmarks/results, and every results file names its machine,
  command and commit."""
  assert report.run(check=True) == []


def _tree(tmp_path, results_text, page_text):
  results = tmp_path / "benchmarks" / "results"
  results.mkdir(parents=True)
  (results / "r.md").write_text(results_text)
  (tmp_path / "README.md").write_text(page_text)
  return results


def test_report_fills_checks_and_relinks(tmp_path):
  block = ("<!-- begin readme:k -->\n| a | 1.5 |\n\n![f](fig.png) "
           "[x](r.md) [web](https://e.org) [here](#top)\n<!-- end readme:k -->\n")
  page = ("intro\n<!-- begin results:k (generated) -->\nstale 9.9\n"
          "<!-- end results:k -->\nend\n")
  results = _tree(tmp_path, "# R\n\n" + _PROVENANCE + block, page)
  problems = report.run(check=True, root=tmp_path, results=results)
  assert len(problems) == 1 and "README.md: out of date (k)" in problems[0]
  assert "stale 9.9" in (tmp_path / "README.md").read_text()  # --check writes nothing

  assert report.run(check=False, root=tmp_path, results=results) == []
  text = (tmp_path / "README.md").read_text()
  assert "stale" not in text and "| a | 1.5 |" in text
  assert text.startswith("intro\n") and text.endswith("end\n")
  # Links relative to the results folder become relative to the page.
  assert "(benchmarks/results/fig.png)" in text
  assert "(benchmarks/results/r.md)" in text
  assert "(https://e.org)" in text and "(#top)" in text
  assert report.run(check=True, root=tmp_path, results=results) == []


def test_report_names_what_is_missing(tmp_path):
  block = "<!-- begin readme:k -->\nx\n<!-- end readme:k -->\n"
  page = "<!-- begin results:other -->\n<!-- end results:other -->\n"
  results = _tree(tmp_path, "# R\n\nMachine: m\n\nCommand: `c`\n\n" + block, page)
  problems = report.run(check=True, root=tmp_path, results=results)
  assert any("results:other has no block" in p for p in problems)
  assert any("r.md (no Commit line)" in p for p in problems)
  assert any("block readme:k is shown nowhere" in p for p in problems)


def test_report_refuses_a_key_in_two_files(tmp_path):
  block = "<!-- begin readme:k -->\nx\n<!-- end readme:k -->\n"
  results = _tree(tmp_path, _PROVENANCE + block, "")
  (results / "s.md").write_text(_PROVENANCE + block)
  with pytest.raises(ValueError, match="'k' is in both r.md and s.md"):
    report.run(check=True, root=tmp_path, results=results)


# ----------------------------------------------------------------------------
# The device check (benchmarks/gpu.py) with tiny settings
# ----------------------------------------------------------------------------


def test_device_check_runs_every_part_with_tiny_settings(tmp_path):
  """`python -m benchmarks.gpu --tiny`: every part of what a lent GPU runs
  (tests, speed, compiled against real peaks, the 60M study), on the CPU."""
  out = tmp_path / "gpu.md"
  # One CPU device, as a one-GPU machine has (the suite's fake 8 would
  # split the 60M study's batch of 4).
  flags = " ".join(f for f in os.environ.get("XLA_FLAGS", "").split()
                   if not f.startswith("--xla_force_host_platform_device_count"))
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=flags)
  if not flags:  # XLA reads a blank value as a file name.
    del env["XLA_FLAGS"]
  result = subprocess.run(
      [sys.executable, "-m", "benchmarks.gpu", "--tiny", "--minutes", "30",
       "--optimizers", "adamw,rso-model", "--out", str(out)],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
  assert result.returncode == 0, result.stderr[-2000:]
  text = out.read_text()
  for line in ("Machine:", "Command: `python -m benchmarks.gpu --tiny",
               "Commit:", "Device: cpu"):
    assert line in text
  assert "1 passed" in text                                  # tests
  assert "| adamw | " in text and "| rso-model | " in text   # speed
  assert "| tiny | rso_model | 16 | 2 × 32 |" in text          # memory
  assert "| RSO |" in text                                   # paper60m
  for bad in ("skipped", "failed", "Failed", "Not run", "stopped"):
    assert bad not in text, text
  assert (tmp_path / "paper60m.md").exists()


# ----------------------------------------------------------------------------
# The quality study's plan
# ----------------------------------------------------------------------------

_SETTING = quality.Setting("tiny", seq_len=16, batch_size=4, steps=10,
                           variants=("adamw", "golore_std"), seeds=3,
                           grid_points=3)
_SETTINGS = {"t": _SETTING}


def _finish(records, tasks, loss_of):
  for t in tasks:
    loss = loss_of(t)
    records.add(dict(t, eval_loss=loss, eval_ppl=math.exp(min(loss, 700)),
                     train_loss=loss, rank_used=16))


def _sweep_lrs(todo, variant):
  return sorted(t["lr"] for t in todo if t["variant"] == variant and t["seed"] == 0)


def test_sweep_grows_past_an_edge_then_seeds_the_best(tmp_path):
  records = quality.Records(tmp_path / "runs.jsonl")
  todo = quality.plan(records, _SETTINGS, ["sweep", "seeds"])
  assert _sweep_lrs(todo, "adamw") == [1.25e-3, 2.5e-3, 5e-3]
  assert _sweep_lrs(todo, "golore_std") == [1e-2, 2e-2, 4e-2]
  assert all(t["seed"] == 0 for t in todo)  # Seeds wait for the sweep.
  # AdamW's loss is lowest at 3e-3 (inside its grid), GoLore's at 0.1:
  # the latter's grid must grow upwards, twice.
  loss = lambda t: (abs(math.log(t["lr"] / (3e-3 if t["variant"] == "adamw"
                                            else 0.1))) + 1)
  _finish(records, todo, loss)
  todo = quality.plan(records, _SETTINGS, ["sweep", "seeds"])
  assert _sweep_lrs(todo, "golore_std") == [8e-2]
  assert sorted((t["lr"], t["seed"]) for t in todo if t["variant"] == "adamw") == [
      (2.5e-3, 1), (2.5e-3, 2)]
  _finish(records, todo, loss)
  todo = quality.plan(records, _SETTINGS, ["sweep", "seeds"])
  assert _sweep_lrs(todo, "golore_std") == [0.16]
  _finish(records, todo, loss)
  todo = quality.plan(records, _SETTINGS, ["sweep", "seeds"])
  assert {(t["variant"], t["lr"], t["seed"]) for t in todo} == {
      ("golore_std", 8e-2, 1), ("golore_std", 8e-2, 2)}
  _finish(records, todo, loss)
  assert quality.plan(records, _SETTINGS, ["sweep", "seeds"]) == []
  # The runs file resumes: a new Records sees every run.
  again = quality.Records(tmp_path / "runs.jsonl")
  assert quality.plan(again, _SETTINGS, ["sweep", "seeds"]) == []
  assert quality.best_lr(again, "t", "golore_std", _SETTING) == 8e-2


def test_a_diverged_edge_does_not_grow_the_grid(tmp_path):
  records = quality.Records(tmp_path / "runs.jsonl")
  todo = [t for t in quality.plan(records, _SETTINGS, ["sweep"])
          if t["variant"] == "golore_std"]
  _finish(records, todo, lambda t: math.inf)
  assert not [t for t in quality.plan(records, _SETTINGS, ["sweep"])
              if t["variant"] == "golore_std"]


def test_deltas_are_paired_by_seed():
  runs = [{"seed": s, "eval_ppl": p} for s, p in [(0, 6.0), (1, 6.6), (2, 5.7)]]
  base = [{"seed": s, "eval_ppl": p} for s, p in [(2, 6.0), (0, 5.0), (1, 6.0)]]
  got = quality.Result("x", 1e-2, runs, base).deltas()
  want = 100 * (np.array([6.0, 6.6, 5.7]) / np.array([5.0, 6.0, 6.0]) - 1)
  np.testing.assert_allclose(got, want, rtol=1e-12)
  mean, std = quality._stats(got)  # pylint: disable=protected-access
  assert mean == pytest.approx(np.mean(want)) and std == pytest.approx(np.std(want, ddof=1))


def test_a_damaged_runs_file_line_is_skipped(tmp_path, capsys):
  path = tmp_path / "runs.jsonl"
  t = quality._task("t", "adamw", 1e-3, 0, "sweep", _SETTING)  # pylint: disable=protected-access
  path.write_text(json.dumps(dict(t, eval_loss=1.0)) + "\n{not json\n")
  records = quality.Records(path)
  assert records.loss(t) == 1.0
  assert "skipping damaged line 2" in capsys.readouterr().err


# ----------------------------------------------------------------------------
# benchmarks/memory.py: tables copied from an earlier results file
# ----------------------------------------------------------------------------


def test_memory_earlier_sections_keeps_only_tables_not_measured(monkeypatch):
  """`--earlier COMMIT`: the earlier file's tables whose titles this run did
  not measure, one heading level down, under a heading naming the commit;
  the sections every run writes itself are never copied."""
  from benchmarks import memory as bench  # pylint: disable=import-outside-toplevel
  old = ("# Title\n\nCommand: `python -m benchmarks.memory --x`\n\n"
         "## A\n\n| a |\n\n## B\n\n| b |\n\n## Targets\n\n- t\n\n"
         "## Notes\n\n- n\n")
  seen = []

  def fake_run(cmd, **kwargs):
    seen.append(cmd)
    return subprocess.CompletedProcess(cmd, 0, stdout=old, stderr="")

  monkeypatch.setattr(bench.subprocess, "run", fake_run)
  text = bench.earlier_sections("abc1234", {"## B"})
  assert seen == [["git", "show", "abc1234:benchmarks/results/memory.md"]]
  assert text.startswith("## Earlier measurements (commit `abc1234`, not re-run)")
  assert "`python -m benchmarks.memory --x`" in text
  assert "### A\n\n| a |\n" in text
  for gone in ("| b |", "Targets", "Notes", "\n## A"):
    assert gone not in text
  assert bench.earlier_sections("abc1234", {"## A", "## B"}) == ""
