"""Fine-tuning figures of the offline default: held-out loss before and after.

Runs the command ``python examples/finetune_llama.py`` with its defaults (the
tiny random demo LLaMA written as a Hugging Face checkpoint, the instruction
set made from the embedded corpus, byte tokens; no download) once per
optimizer: AdamW, GaLore, GoLore and RSO, and GoLore and RSO in model mode,
each in this process. The held-out loss (on the response tokens of the
validation examples, all of them) is measured before training, on the demo
model as loaded, with the run's own evaluation step, and after, by the run.
Writes ``results/finetune.md``.

Examples:
  python -m benchmarks.finetune
  python -m benchmarks.finetune --steps 400 --methods adamw,rso_model
"""

from __future__ import annotations

import argparse
import json
import pathlib
import shlex
import sys
import tempfile
import time

if __package__ in (None, ""):  # Run as `python benchmarks/finetune.py`.
  sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

import jax  # pylint: disable=wrong-import-position
import numpy as np  # pylint: disable=wrong-import-position

from benchmarks import common  # pylint: disable=wrong-import-position
from subspace_jax import models  # pylint: disable=wrong-import-position
from subspace_jax.models import hf  # pylint: disable=wrong-import-position
from subspace_jax.training import inputs, train  # pylint: disable=wrong-import-position
from subspace_jax.training import sharding as shd  # pylint: disable=wrong-import-position

EXAMPLES = pathlib.Path(__file__).resolve().parent.parent / "examples"
sys.path.insert(0, str(EXAMPLES))
import finetune_llama  # pylint: disable=wrong-import-position,wrong-import-order  # noqa: E402

# Method -> (label, flags).
METHODS = {
    "adamw": ("AdamW", ["--optimizer", "adamw"]),
    "galore": ("GaLore", ["--optimizer", "galore"]),
    "golore": ("GoLore", ["--optimizer", "golore"]),
    "rso": ("RSO", ["--optimizer", "rso"]),
    "golore_model": ("GoLore, model mode",
                     ["--optimizer", "golore", "--subspace-mode", "model"]),
    "rso_model": ("RSO, model mode",
                  ["--optimizer", "rso", "--subspace-mode", "model"]),
}


def _loss_before(cfg) -> tuple[float, int, object]:
  """The held-out loss of the run's starting model, over the whole
  validation split once, as the run's evaluation computes it; and the
  number of batches that is, and the training data's packing."""
  tokenizer = inputs.make_tokenizer(cfg)
  train_iter, eval_iter, _ = inputs.make_iterators(cfg, tokenizer)
  packing = train_iter.packing
  train_iter.close()
  batches = eval_iter.steps_per_epoch
  mesh = shd.make_mesh(*cfg.mesh)
  model = cfg.model_config()
  setup = train.setup(model, cfg.optimizer, mesh)
  _, params = hf.load(cfg.init_from, mesh=mesh, **{
      f: getattr(model, f) for f in ("scan_layers", "remat", "dtype",
                                     "param_dtype", "max_seq_len")})
  state = setup.init_from(params)
  losses = []
  for _ in range(batches):
    batch = {k: jax.make_array_from_process_local_data(setup.batch_sharding, v)
             for k, v in next(eval_iter).items()}
    losses.append(setup.eval_step(state, batch))
  eval_iter.close()
  return float(np.mean(jax.device_get(losses))), batches, packing


def _records(path: pathlib.Path) -> list[dict]:
  return [json.loads(line) for line in path.read_text().splitlines()]


def run(args, argv) -> None:
  t0 = time.perf_counter()
  methods = args.methods.split(",")
  for m in methods:
    if m not in METHODS:
      raise SystemExit(f"--methods: unknown method {m!r} (choose from "
                       f"{', '.join(METHODS)})")
  common_flags = ["--checkpoint-dir", "none", "--tensorboard", "none",
                  "--no-progress", "--steps", str(args.steps)]
  parser = finetune_llama.build_parser()
  cfg = finetune_llama.run_config(parser.parse_args(
      common_flags + METHODS["adamw"][1]))
  before, eval_batches, packing = _loss_before(cfg)
  print(f"held-out loss before fine-tuning: {before:.4f} "
        f"({eval_batches} batches)", flush=True)
  common_flags += ["--eval-batches", str(eval_batches)]
  results = {}
  with tempfile.TemporaryDirectory(prefix="finetune_") as tmp:
    for m in methods:
      metrics = pathlib.Path(tmp) / f"{m}.jsonl"
      print(f"fine-tuning with {METHODS[m][0]} ...", flush=True)
      summary = finetune_llama.main(common_flags + METHODS[m][1] + [
          "--metrics", str(metrics), "--name", f"bench_{m}"])
      results[m] = (summary, _records(metrics))
  _write(args, argv, cfg, before, eval_batches, packing, results,
         time.perf_counter() - t0)


def _write(args, argv, cfg, before, eval_batches, packing, results,
           elapsed) -> None:
  rows = []
  for m, (summary, records) in results.items():
    rows.append(
        f"| {METHODS[m][0]} | {before:.4f} | **{summary['eval_loss']:.4f}** | "
        f"{records[0]['loss']:.4f} | {records[-1]['loss']:.4f} | "
        f"{summary['wall_time_s']:.0f} |\n")
  model = cfg.model_config()
  opt = cfg.optimizer
  log = cfg.log_every
  order = sorted(results, key=lambda m: results[m][0]["eval_loss"])
  body = (
      "# Fine-tuning the offline default\n\n"
      f"{common.machine_line()}\n\n"
      f"Command: `python -m benchmarks.finetune{' ' if argv else ''}"
      f"{shlex.join(argv)}` ({elapsed:.0f} s; {args.note or 'one run each'}).\n\n"
      "Each run is `python examples/finetune_llama.py --optimizer NAME` "
      "with the script's defaults: the demo LLaMA "
      f"({models.param_count(model) / 1e6:.2f}M parameters: hidden "
      f"{model.hidden_size}, {model.num_layers} layers, {model.num_heads} "
      f"heads sharing {model.kv_heads} key/value heads, vocabulary "
      f"{model.vocab_size}, random weights of seed 0, loaded from the Hugging "
      "Face checkpoint the script writes) fine-tuned on the built-in "
      f"instructions (`--data instructions`: {packing.examples:,} training "
      "examples made from the embedded corpus, prompt/response pairs of "
      "three kinds: capitals, which book, continue the text; byte tokens, "
      f"BOS + prompt + response + EOS), packed whole into {packing.rows:,} "
      f"rows of {cfg.seq_len} tokens ({packing.fill:.0%} of the positions "
      f"used), batch {cfg.batch_size} rows, {cfg.steps} steps. Loss on the "
      f"response tokens and EOS only. Peak lr {opt.learning_rate:g} (the "
      f"demo's default), {opt.warmup_steps} warm-up steps, cosine decay to "
      f"{opt.min_lr_ratio:g}× peak, clip {opt.clip_norm:g}; subspace methods: "
      f"rank {opt.rank}, a new projection every {opt.update_gap} steps, scale "
      f"{opt.scale:g}.\n\n"
      f"Held-out loss: mean over the whole validation split ({eval_batches} "
      "batches: the last 5% of the examples, packed the same way), before "
      "(the demo model as loaded, through the run's evaluation step) and "
      f"after the {cfg.steps} steps. Train loss: mean over the first and the "
      f"last {log} steps. Wall time: the whole run, compiling included, on "
      "a shared machine.\n\n"
      "| optimizer | held-out loss before | after | train loss, first "
      f"{log} steps | last {log} steps | wall s |\n"
      "|---|---|---|---|---|---|\n" + "".join(rows) + "\n"
      "Final held-out loss, best first: "
      + " < ".join(METHODS[m][0] for m in order) + " (one run each, one "
      "seed).\n")
  common.write(args.out, body)


def build_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                              epilog=__doc__.split("\n\n", 1)[1],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--methods", default=",".join(METHODS),
                 help="comma-separated methods out of " + ", ".join(METHODS)
                      + " (default: all)")
  p.add_argument("--steps", type=int, default=finetune_llama.DEFAULTS["steps"],
                 help="steps of every run (default: the script's, %(default)s)")
  common.add_output_flags(p, "finetune.md")
  return p


def main(argv: list[str] | None = None) -> None:
  argv = sys.argv[1:] if argv is None else list(argv)
  run(build_parser().parse_args(argv), argv)


if __name__ == "__main__":
  main()
