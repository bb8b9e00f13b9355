"""examples/pretrain_llama.py and subspace_jax.run.loop, end to end.

The runs use the tiny model on the embedded corpus and the 8 host devices of
conftest.py (a data-parallel mesh of 8), a few seconds of compiling each.
"""

import dataclasses
import json
import math
import os
import pathlib
import re
import signal
import subprocess
import sys
import time
import types

import jax
import numpy as np
import pytest

from subspace_jax.train import checkpoint
from subspace_jax.data import pipeline as data
from subspace_jax.run import loop
from subspace_jax.run import reporting
from subspace_jax.train import step as train
from subspace_jax import sharding as shd
from subspace_jax.cli import flags, pretrain

ROOT = pathlib.Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "pretrain_llama.py"



def _parse(argv):
  """The parsed flags of ``subspace-jax pretrain ARGV``."""
  return flags.parse(pretrain.build_parser(), list(map(str, argv)))


def _run_config(argv):
  with flags.names():
    return pretrain.run_config(_parse(argv))

# 20 steps: log every 5, evaluate every 10, checkpoint every 10; GoLore
# changes its subspace every 5 steps, so a resume at step 10 crosses one.
SMALL = ["--batch-size", "8", "--seq-len", "32", "--rank", "8",
         "--update-gap", "5", "--warmup", "5", "--lr", "0.01",
         "--log-every", "5", "--eval-every", "10", "--eval-batches", "2",
         "--checkpoint-every", "10", "--no-progress", "--tensorboard", "none"]


def _need8():
  if jax.device_count() < 8:
    pytest.skip("needs 8 devices (tests/conftest.py sets XLA_FLAGS)")


def _args(run_dir, *extra):
  return SMALL + ["--checkpoint-dir", str(run_dir / "ckpt"),
                  "--metrics", str(run_dir / "metrics.jsonl"), *extra]


def _records(path):
  return [json.loads(line) for line in pathlib.Path(path).read_text().splitlines()]


def _final_state(run_dir, argv):
  """The newest checkpoint of a run made with ``argv``."""
  cfg = _run_config(argv)
  setup = train.setup(cfg.model_config, cfg.optimizer, shd.make_mesh(*cfg.mesh))
  with checkpoint.Checkpointer(run_dir / "ckpt") as ckpt:
    return ckpt.restore(setup.abstract_state)


class _FakeSummaryWriter:
  """Stands in for tensorboardX.SummaryWriter (not installed for the tests)."""

  made = []

  def __init__(self, logdir):
    self.logdir, self.scalars, self.closed = logdir, [], False
    self.made.append(self)

  def add_scalar(self, tag, value, step):
    self.scalars.append((tag, value, step))

  def flush(self):
    pass

  def close(self):
    self.closed = True


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
  """One uninterrupted 20-step run: its directory, argv and summary."""
  _need8()
  run_dir = tmp_path_factory.mktemp("full")
  argv = _args(run_dir, "--steps", "20")
  fake = types.ModuleType("tensorboardX")
  fake.SummaryWriter = _FakeSummaryWriter
  handlers = [signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)]
  with pytest.MonkeyPatch.context() as mp:
    mp.setitem(sys.modules, "tensorboardX", fake)
    summary = pretrain.main(argv + ["--tensorboard", str(run_dir / "tb")])
  assert handlers == [signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)]
  return run_dir, argv, summary


def test_run_logs_learns_and_checkpoints(full_run):
  run_dir, _, summary = full_run
  records = _records(run_dir / "metrics.jsonl")
  assert [r["step"] for r in records] == [5, 10, 15, 20]
  losses = [r["loss"] for r in records]
  assert all(math.isfinite(l) for l in losses)
  assert losses[-1] < losses[0] - 0.5, losses
  assert [("eval_loss" in r) for r in records] == [False, True, False, True]
  assert records[-1]["eval_ppl"] == pytest.approx(math.exp(records[-1]["eval_loss"]))
  assert all(r["tokens_per_s"] > 0 for r in records)
  with checkpoint.Checkpointer(run_dir / "ckpt") as ckpt:
    assert ckpt.all_steps() == [10, 20]
  assert summary["step"] == 20 and summary["start_step"] == 0
  assert summary["train_loss"] == losses[-1]
  assert summary["eval_loss"] == records[-1]["eval_loss"]
  assert summary["tokens_per_s"] > 0 and summary["interrupted"] is None
  (writer,) = _FakeSummaryWriter.made
  assert writer.logdir == str(run_dir / "tb") and writer.closed
  assert ("loss", losses[-1], 20) in writer.scalars
  assert ("eval_loss", records[1]["eval_loss"], 10) in writer.scalars


def test_resume_matches_uninterrupted_run(full_run, tmp_path):
  full_dir, full_argv, _ = full_run
  # The same run in two parts: 10 steps, then on to 20 (same schedule).
  first = pretrain.main(_args(tmp_path, "--steps", "10", "--schedule-steps", "20"))
  second = pretrain.main(_args(tmp_path, "--steps", "20"))
  assert first["step"] == 10 and second["start_step"] == 10 and second["step"] == 20
  full, parts = _records(full_dir / "metrics.jsonl"), _records(tmp_path / "metrics.jsonl")
  assert [r["step"] for r in parts] == [5, 10, 15, 20]  # appended, not rewritten
  for a, b in zip(full, parts):
    assert (a["loss"], a["grad_norm"], a["lr"]) == (b["loss"], b["grad_norm"], b["lr"])
    assert a.get("eval_loss") == b.get("eval_loss")
  want, got = _final_state(full_dir, full_argv), _final_state(tmp_path, _args(tmp_path))
  assert want.step == got.step == 20
  assert want.data_state == got.data_state
  for x, y in zip(jax.tree.leaves(want.state), jax.tree.leaves(got.state)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_run_config_round_trips_through_json():
  cfg = _run_config(
      ["--model", "tiny", "--scan-layers", "--dtype", "bfloat16", "--mesh", "2,2,2",
       "--optimizer", "rso", "--eta", "0.5", "--eval-split", "none"])
  d = json.loads(json.dumps(cfg.to_dict()))
  assert loop.RunConfig.from_dict(d) == cfg
  assert d["model"]["scan_layers"] is True and d["model"]["vocab_size"] == 259
  # Compute-only settings are not part of the model's identity.
  assert "dtype" not in d["model"] and "remat" not in d["model"]
  assert cfg.eval_split is None and cfg.optimizer.eta == 0.5
  assert _parse(["--mesh", "-1,2,1"]).mesh == (-1, 2, 1)


def _bad_cases(tmp):
  empty = tmp / "empty"
  empty.mkdir()
  (empty / "a.txt").write_text("  \n\n")
  (tmp / "one.txt").write_text("A single document.\n")
  return {
      "model": (["--model", "llama_9b"], ["unknown model 'llama_9b'", "llama_60m"]),
      "optimizer": (["--optimizer", "sgd"], ["unknown optimizer", "golore"]),
      "batch": (["--batch-size", "12"], ["--batch-size 12", "data-parallel size 8"]),
      "mesh": (["--mesh", "16,1,1"], ["needs 16 devices", "8 are available", "--mesh"]),
      "mesh_format": (["--mesh", "2,2"], ["DATA,FSDP,TENSOR"]),
      "rank": (["--rank", "100"], ["--rank 100", "64 x 64", "--rank 64"]),
      "empty_data": (["--data", f"files:{empty}/*.txt"], ["no non-empty document"]),
      "missing_data": (["--data", f"files:{tmp}/nothing/*.txt"], ["matches nothing"]),
      "steps": (["--steps", "-1"], ["--steps must be an integer >= 0, got -1"]),
      "dtype": (["--dtype", "int8"], ["--dtype 'int8' is not a float dtype"]),
      "moment_dtype": (["--moment-dtype", "foo"], ["--moment-dtype 'foo'"]),
      # Settings that ran (or failed naming no flag) before they were checked.
      "clip": (["--clip", "-1"], ["--clip must be", "-1.0", "(or 0: no clipping)"]),
      "lr_inf": (["--lr", "inf"], ["--lr must be a finite number > 0, got inf"]),
      "lr_nan": (["--lr", "nan"], ["--lr must be a finite number > 0, got nan"]),
      "lr_negative": (["--lr", "-1e-3"], ["--lr must be a finite number > 0, got -0.001"]),
      "min_lr_ratio": (["--min-lr-ratio", "2"], ["--min-lr-ratio must be in [0, 1], got 2.0"]),
      "warmup": (["--warmup", "6"], ["--warmup 6 is longer than the 5-step schedule",
                                     "--schedule-steps"]),
      "weight_decay": (["--weight-decay", "-0.1"], ["--weight-decay must be", "-0.1"]),
      "scale": (["--scale", "0"], ["--scale must be a finite number > 0, got 0.0"]),
      "scale_nan": (["--scale", "nan"], ["--scale must be a finite number > 0, got nan"]),
      "eta": (["--optimizer", "rso", "--eta", "0"], ["--eta must be a finite number > 0"]),
      "eta_unused": (["--eta", "0.5"], ["--eta applies to the methods with a proximal term (rso), not --optimizer golore"]),
      "update_gap": (["--update-gap", "0"], ["--update-gap must be an integer >= 1, got 0"]),
      "rank_zero": (["--rank", "0"], ["--rank must be an integer >= 1, got 0"]),
      "svd_steps": (["--svd-steps", "6"], ["--svd-steps 6 is more than the 5 steps"]),
      "svd_steps_unused": (["--optimizer", "rso", "--svd-steps", "2"],
                           ["--svd-steps applies to the methods with an SVD phase (golore), not --optimizer rso"]),
      "proj_seed": (["--proj-seed", "-1"], ["--proj-seed must be an integer >= 0"]),
      "seed": (["--seed", "-1"], ["--seed must be an integer >= 0"]),
      "side": (["--side", "up"], ["--side must be one of lean, std, left, right"]),
      "svd": (["--optimizer", "galore", "--svd", "fast"], ["--svd must be exact or randomized"]),
      "subspace_mode": (["--subspace-mode", "layer"], ["--subspace-mode must be one of"]),
      "model_mode_galore": (["--subspace-mode", "model", "--optimizer", "galore"],
                            ["--subspace-mode model supports golore and rso, not galore",
                             "--subspace-mode transform"]),
      "model_mode_svd_steps": (["--subspace-mode", "model", "--svd-steps", "2"],
                               ["--svd-steps needs the full gradient", "--subspace-mode"]),
      "mesh_zero": (["--mesh", "0,8,1"], ["--mesh sizes must be >= 1", "0,8,1"]),
      "vocab": (["--tokenizer", "sentencepiece", "--vocab-size", "10"],
                ["--vocab-size must be >= 300"]),
      "split": (["--split", "test"], ["--split must be train, validation or all"]),
      "split_all": (["--split", "all"], ["--split all", "training documents",
                                         "set --eval-split none"]),
      "eval_split_same": (["--eval-split", "train"], ["--split and --eval-split are both",
                                                      "use another --eval-split, or none"]),
      "few_docs": (["--data", f"files:{tmp}/one.txt"],
                   ["too few", "--split all with --eval-split none"]),
      "too_small": (["--seq-len", "60000"], ["too small", "--seq-len 60000",
                                              "lower --batch-size or --seq-len"]),
  }


@pytest.mark.parametrize("case", [
    "model", "optimizer", "batch", "mesh", "mesh_format", "rank", "empty_data",
    "missing_data", "steps", "dtype", "moment_dtype", "clip", "lr_inf", "lr_nan",
    "lr_negative", "min_lr_ratio", "warmup", "weight_decay", "scale", "scale_nan",
    "eta", "eta_unused", "update_gap", "rank_zero", "svd_steps", "svd_steps_unused",
    "proj_seed", "seed", "side", "svd", "subspace_mode", "model_mode_galore",
    "model_mode_svd_steps", "mesh_zero", "vocab", "split",
    "split_all", "eval_split_same", "few_docs", "too_small"])
def test_bad_input_is_one_line_exit_2(case, tmp_path, capsys):
  _need8()
  argv, fragments = _bad_cases(tmp_path)[case]
  with pytest.raises(SystemExit) as exc:
    pretrain.main(_args(tmp_path / "run", "--steps", "5", *argv))
  assert exc.value.code == 2
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and "error: " in err and "Traceback" not in err, err
  for fragment in fragments:
    assert fragment in err, err
  # Flags, not the library's Python argument names.
  assert not re.search(r"\b(split=|seq_len|batch_size|update_gap|svd_steps|subspace_mode)",
                       err), err
  assert not (tmp_path / "run" / "metrics.jsonl").exists()


@pytest.mark.parametrize("batch, fragment", [
    (16, "--batch-size 16 is not divisible by the 3 processes"),
    (24, "data-parallel size 8 (data x fsdp of --mesh) is not a multiple of the 3 processes"),
])
def test_batch_must_split_over_processes(batch, fragment, tmp_path, capsys, monkeypatch):
  _need8()
  monkeypatch.setattr(jax, "process_count", lambda: 3)
  with pytest.raises(SystemExit) as exc:
    pretrain.main(_args(tmp_path, "--steps", "5", "--batch-size", str(batch)))
  assert exc.value.code == 2
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and fragment in err, err


def test_checkpoint_of_another_model_is_refused(full_run, tmp_path, capsys):
  full_dir, _, _ = full_run
  argv = SMALL + ["--checkpoint-dir", str(full_dir / "ckpt"),
                  "--metrics", str(tmp_path / "m.jsonl"), "--steps", "30"]
  for other in (["--model", "llama_60m"], ["--scan-layers"], ["--optimizer", "rso"]):
    with pytest.raises(SystemExit) as exc:
      pretrain.main(argv + other)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "another model" in err and "--checkpoint-dir" in err, err
  # Nothing was written, nothing was lost.
  with checkpoint.Checkpointer(full_dir / "ckpt") as ckpt:
    assert ckpt.all_steps() == [10, 20]
  assert not (tmp_path / "m.jsonl").exists() or not _records(tmp_path / "m.jsonl")


def test_no_resume_refuses_a_used_checkpoint_dir(full_run, capsys):
  full_dir, full_argv, _ = full_run
  with pytest.raises(SystemExit) as exc:
    pretrain.main(full_argv + ["--no-resume"])
  assert exc.value.code == 2
  assert "already holds checkpoints (newest: step 20)" in capsys.readouterr().err


def test_help_lists_every_option(capsys):
  with pytest.raises(SystemExit) as exc:
    pretrain.main(["--help"])
  assert exc.value.code == 0
  out = capsys.readouterr().out
  required = """--model --scan-layers --remat --dtype --param-dtype --optimizer --lr
      --warmup --min-lr-ratio --weight-decay --clip --rank --update-gap --scale
      --proj-seed --svd-steps --eta --side --svd --data --data-dir --text-key
      --eval-split --tokenizer --vocab-size --batch-size --seq-len --data-workers --steps
      --eval-every --eval-batches --log-every --mesh --seed --checkpoint-dir
      --checkpoint-every --keep --no-resume --metrics --coordinator
      --num-processes --process-id""".split()
  actions = [a for a in pretrain.build_parser()._actions if a.option_strings]
  flags = {s for a in actions for s in a.option_strings}
  assert set(required) <= flags
  for action in actions:
    assert action.help, action.option_strings
    assert action.option_strings[-1] in out
  for choice in ("tiny", "llama_60m", "llama_7b", "adamw", "galore", "golore", "rso"):
    assert choice in out


def test_help_documents_every_data_form(capsys):
  with pytest.raises(data.DataError) as exc:
    data.source_from_spec("nonsense")
  offered = str(exc.value).partition("; use ")[2]  # "'embedded', 'files:GLOB', ..."
  forms = re.findall(r"'([a-z]+(?::[A-Z]+)?)'", offered)
  assert {"embedded", "files:GLOB", "paragraphs:GLOB", "tfds:NAME"} <= set(forms), forms
  with pytest.raises(SystemExit):
    pretrain.main(["--help"])
  out = " ".join(capsys.readouterr().out.split())
  for form in forms:
    assert form in out, form


def test_every_setting_is_safe_or_altering_and_has_its_flag():
  fields = {f.name for f in dataclasses.fields(loop.RunConfig)}
  safe, altering = set(loop.RESUME_SAFE_FIELDS), set(loop.RESUME_ALTERING_FIELDS)
  assert not safe & altering and safe | altering == fields
  known = {s for a in pretrain.build_parser()._actions for s in a.option_strings}  # pylint: disable=protected-access
  paths = [f for f in fields if f != "optimizer"] + [
      f"optimizer.{f.name}" for f in dataclasses.fields(train.OptimizerConfig)]
  for path in paths:
    flag = flags.flag_of(path).split(" ")[0]
    # A setting without a flag is named as the library names it.
    assert flag in known or flag == path, (path, flag)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_saves_a_checkpoint_then_exits_128_plus_signal(sig, tmp_path):
  metrics, ckpt_dir = tmp_path / "metrics.jsonl", tmp_path / "ckpt"
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS="--xla_force_host_platform_device_count=1")
  cmd = [sys.executable, str(EXAMPLE), "--steps", "100000", "--batch-size", "4",
         "--seq-len", "32", "--rank", "8", "--log-every", "2", "--eval-every", "0",
         "--checkpoint-every", "100000", "--checkpoint-dir", str(ckpt_dir),
         "--metrics", str(metrics), "--tensorboard", "none", "--no-progress"]
  proc = subprocess.Popen(cmd, env=env, cwd=tmp_path, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)
  try:
    deadline = time.monotonic() + 120
    while not (metrics.exists() and metrics.read_text().count("\n") >= 1):
      assert proc.poll() is None, proc.communicate()
      assert time.monotonic() < deadline, "no metrics line within 120 s"
      time.sleep(0.2)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
  finally:
    if proc.poll() is None:
      proc.kill()
      proc.communicate()
  # Saved, then a non-zero exit (128 + the signal), so `train && next` stops.
  assert proc.returncode == 128 + sig, err
  assert "Traceback" not in err, err
  assert f"interrupted by {sig.name}" in out, out
  assert f"by {sig.name}; checkpoint saved" in err, err
  records = _records(metrics)
  last = records[-1]["step"]
  assert 2 <= last < 100000
  with checkpoint.Checkpointer(ckpt_dir) as ckpt:
    assert ckpt.all_steps() == [last]


def test_summary_says_when_the_eval_loss_is_stale(capsys):
  """An evaluation older than the last step (a stopped run) is dated."""
  summary = {"step": 13, "start_step": 0, "train_loss": 2.0, "eval_loss": 2.5,
             "eval_ppl": 12.18, "eval_step": 10, "tokens_per_s": None,
             "wall_time_s": 1.0, "interrupted": "SIGINT", "nonfinite_steps": 2}
  reporting.print_summary(summary)
  line = capsys.readouterr().out
  assert "eval loss 2.5000 (perplexity 12.18, at step 10)" in line, line
  assert "2 non-finite step(s) skipped" in line and "interrupted by SIGINT" in line
  reporting.print_summary(dict(summary, eval_step=13, nonfinite_steps=0))
  line = capsys.readouterr().out
  assert "(perplexity 12.18)," in line and "non-finite" not in line, line


def test_eta_counts_from_the_first_step_not_the_compile(capsys, monkeypatch):
  """A 100 s compile, then 9 steps in 9 s: 90 steps left is 1:30, not 16:30."""
  monkeypatch.setitem(sys.modules, "tqdm", None)  # the plain '\r' bar
  clock = iter([100.0, 109.0])  # the run started at t = 0
  monkeypatch.setattr(reporting.time, "perf_counter", lambda: next(clock))
  bar = reporting.Progress(total=100, enabled=True)
  bar.update(1, loss=5.0)                         # before start: nothing
  assert capsys.readouterr().err == ""
  bar.start(1)                                    # t = 100: step 1 done
  bar.update(10, loss=4.0)                        # t = 109
  err = capsys.readouterr().err
  assert "step 10/100 loss 4.0000 ETA 0:01:30" in err, err
