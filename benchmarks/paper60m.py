"""The GaLore and RSO papers' LLaMA-60M pretraining, and a time-budgeted form.

The preset is the papers' setting (GaLore, Zhao et al. 2024, Table 2; RSO,
Chen et al. 2025, Table 3): LLaMA-60M (hidden 512, 8 layers, 8 heads, MLP
1376), C4 (English), sequences of 256 tokens, batch 512, 10,000 steps with
1,000 warm-up steps and cosine decay to 0.1 × the peak, bfloat16; subspace
methods at rank 128, a new subspace every 200 steps, scale 0.25, peak lr
0.01; AdamW at 0.001. Their held-out perplexities are printed beside ours
(the papers use the T5 tokenizer; here a SentencePiece model of 32,000 ids
trained on the first documents of C4's training split, so the figures are
comparable in size, not digit for digit). C4 must be prepared with TFDS
beforehand (nothing is downloaded at run time; see the README):

  python -m benchmarks.paper60m --data tfds:c4/en:3.1.0 \\
      --data-dir ~/tensorflow_datasets               # one GPU: hours

``--minutes N`` is the form a lent GPU runs in N minutes: the same model,
optimizers and hyper-parameters on a batch of 64 × 256 tokens of the corpus
embedded in the package (byte tokens, no download), every method for the
same number of steps, as many as fit N minutes by a calibration of each
method's step time (compile included). It reports tokens/s (and MFU on a
known GPU) and the held-out loss curves against AdamW on the same data:

  python -m benchmarks.paper60m --minutes 8

Runs are appended to ``results/paper60m_runs.jsonl`` and reported in
``results/paper60m.md`` (the quality study's format, one seed per method,
as in the papers). On a CPU, ``--model tiny --batch-size 8 --seq-len 32``
tries the same path in a minute.
"""

from __future__ import annotations

import argparse
import pathlib
import time
from typing import Any, Mapping


from benchmarks import common  # pylint: disable=wrong-import-position
from benchmarks import quality  # pylint: disable=wrong-import-position

# key -> (label, OptimizerConfig fields, peak lr), as the papers ran them.
METHODS: dict[str, tuple[str, dict[str, Any], float]] = {
    "adamw": ("AdamW", {"name": "adamw"}, 1e-3),
    "galore": ("GaLore", {"name": "galore", "side": "std"}, 1e-2),
    "golore": ("GoLore", {"name": "golore", "side": "std"}, 1e-2),
    "rso": ("RSO", {"name": "rso", "side": "std"}, 1e-2),
}
# Held-out perplexity of LLaMA-60M on C4 after 10K steps in the papers.
PUBLISHED = {"adamw": 34.06, "galore": 34.88, "rso": 34.55}

PRESET = dict(model="llama_60m", seq_len=256, batch_size=512, steps=10_000,
              warmup=1_000, rank=128, update_gap=200, scale=0.25,
              dtype="bfloat16", eval_every=1_000, eval_batches=20)
"""The papers' setting (C4; ``--data`` and ``--data-dir`` say where)."""

BUDGET_BATCH = 64
"""``--minutes``: sequences per step (the embedded corpus is small)."""


def run_config(settings: Mapping[str, Any], method: str, steps: int, seed: int):
  """The :class:`RunConfig` of ``method`` under ``settings``."""
  from subspace_jax.cli import flags as cli  # pylint: disable=import-outside-toplevel
  from subspace_jax.run import loop  # pylint: disable=import-outside-toplevel
  _, fields, lr = METHODS[method]
  parser = argparse.ArgumentParser()
  cli.add_model_flags(parser)
  cli.add_optimizer_flags(parser)
  args = parser.parse_args(["--model", settings["model"]])
  args.warmup = min(settings["warmup"], max(0, steps - 1))
  opt = cli.optimizer_config(
      args, steps, **dict(fields, learning_rate=lr, seed=seed,
                          rank=settings["rank"],
                          update_gap=settings["update_gap"],
                          scale=settings["scale"]))
  tfds = settings["data"].startswith("tfds:")
  return loop.RunConfig(
      model=settings["model"], data=settings["data"],
      data_dir=settings.get("data_dir"),
      tokenizer="sentencepiece" if tfds else "byte",
      vocab_size=32_000, seq_len=settings["seq_len"],
      batch_size=settings["batch_size"], steps=steps, seed=seed,
      dtype=settings["dtype"], optimizer=opt,
      eval_every=min(settings["eval_every"], steps),
      eval_batches=settings["eval_batches"],
      log_every=max(1, min(50, steps // 20)), data_workers=4 if tfds else 0,
      checkpoint_dir=None, tensorboard_dir=None, progress=False)


def calibrate(settings: Mapping[str, Any], methods: list[str]) -> dict[str, tuple[float, float]]:
  """``method -> (compile seconds, seconds per step)`` of each method's
  train step on random tokens (the run's model, batch and dtype)."""
  import jax  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  from subspace_jax import sharding as shd  # pylint: disable=import-outside-toplevel
  from subspace_jax.train import step as train  # pylint: disable=import-outside-toplevel
  out = {}
  mesh = shd.make_mesh(-1, 1, 1)
  for method in methods:
    cfg = run_config(settings, method, steps=1000, seed=0)
    model_config = cfg.model_config
    s = train.setup(model_config, cfg.optimizer, mesh)
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, model_config.vocab_size,
                          (cfg.batch_size, cfg.seq_len + 1), dtype=np.int32)
    batch = jax.device_put({"inputs": tokens[:, :-1], "targets": tokens[:, 1:]},
                           s.batch_sharding)
    t0 = time.perf_counter()
    state = s.init(0)
    state, metrics = s.train_step(state, batch)
    jax.block_until_ready(metrics)
    compile_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(3):
      state, metrics = s.train_step(state, batch)
    jax.block_until_ready(metrics)
    out[method] = (compile_s, (time.perf_counter() - t0) / 3)
    del state
  return out


def budget_steps(costs: Mapping[str, tuple[float, float]], minutes: float,
                 eval_fraction: float = 0.1) -> int:
  """The common step count that lets every method run in ``minutes``: what
  is left after compiling each twice (calibration and run) and a share
  for evaluation, over the sum of the step times."""
  left = minutes * 60 * (1 - eval_fraction) - 2 * sum(c for c, _ in costs.values())
  return max(10, int(left / sum(t for _, t in costs.values())))


def mfu(tokens_per_s: float | None, params: int) -> str:
  """6·N·tokens/s over the device's dense bf16 peak, where it is known."""
  import jax  # pylint: disable=import-outside-toplevel
  from benchmarks import speed  # pylint: disable=import-outside-toplevel
  kind = jax.devices()[0].device_kind
  peak = next((p16 for key, (p16, _) in speed.PEAK_FLOPS.items() if key in kind),
              None)
  if not tokens_per_s or peak is None:
    return "n/a"
  return f"{6 * params * tokens_per_s / peak:.1%}"


def build_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
      description=__doc__.splitlines()[0],
      formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
  p.add_argument("--minutes", type=float, default=None,
                 help="the time-budgeted form: all methods in this many "
                      "minutes on the embedded corpus (default: the preset)")
  p.add_argument("--data", default=None,
                 help="data spec (default: the embedded corpus with "
                      "--minutes, else tfds:c4/en:3.1.0)")
  p.add_argument("--data-dir", default=None, help="TFDS data directory")
  p.add_argument("--methods", default=",".join(METHODS),
                 help=f"comma-separated, of {', '.join(METHODS)}")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--model", default=None, help="replace the model (a CPU try)")
  p.add_argument("--batch-size", type=int, default=None, help="replace the "
                                                              "batch")
  p.add_argument("--seq-len", type=int, default=None, help="replace the "
                                                           "sequence length")
  p.add_argument("--steps", type=int, default=None, help="replace the steps")
  p.add_argument("--out", default=str(common.RESULTS / "paper60m.md"),
                 help="the report; the runs go beside it as NAME_runs.jsonl")
  return p


def settings_of(args) -> dict[str, Any]:
  s = dict(PRESET)
  if args.minutes is not None:
    s.update(batch_size=BUDGET_BATCH, eval_batches=8)
  s["data"] = args.data or ("embedded" if args.minutes is not None
                            else "tfds:c4/en:3.1.0")
  s["data_dir"] = args.data_dir
  for key in ("model", "batch_size", "seq_len", "steps"):
    if getattr(args, key) is not None:
      s[key] = getattr(args, key)
  if args.model is not None:  # The papers' r/d = 128/512.
    from subspace_jax import models  # pylint: disable=import-outside-toplevel
    s["rank"] = max(1, models.get_config(args.model).hidden_size // 4)
  return s


def main(argv: list[str] | None = None) -> None:
  args = build_parser().parse_args(argv)
  methods = args.methods.split(",")
  if set(methods) - set(METHODS):
    raise SystemExit(f"--methods: choose from {', '.join(METHODS)}")
  import jax  # pylint: disable=import-outside-toplevel
  from subspace_jax import models  # pylint: disable=import-outside-toplevel
  s = settings_of(args)
  if jax.devices()[0].platform == "cpu":
    s["dtype"] = "float32"  # The CPU computes bf16 matmuls slowly.
  steps = s["steps"]
  costs = None
  if args.minutes is not None and args.steps is None:
    costs = calibrate(s, methods)
    steps = budget_steps(costs, args.minutes)
    print(f"paper60m: {steps} steps per method fit {args.minutes:g} minutes "
          "(step times: " + ", ".join(f"{m} {1e3 * t:.0f} ms"
                                      for m, (_, t) in costs.items()) + ")",
          flush=True)
  out = pathlib.Path(args.out)
  records = quality.Records(out.with_name(f"{out.stem}_runs.jsonl"))
  command = common.command_line("benchmarks.paper60m", argv)
  code = common.commit()
  rows = []
  for method in methods:
    cfg = run_config(s, method, steps, args.seed)
    key = dict(setting="paper60m" if args.minutes is None else "paper60m-budget",
               model=s["model"], seq_len=s["seq_len"], batch_size=s["batch_size"],
               steps=steps, variant=method, lr=cfg.optimizer.learning_rate,
               seed=args.seed, rank=s["rank"], update_gap=s["update_gap"],
               scale=s["scale"], stage=jax.devices()[0].device_kind)
    print(f"paper60m: {method}, {steps} steps ...", flush=True)
    rec = dict(key, **quality.train_and_measure(cfg), commit=code,
               command=command, data=s["data"], dtype=s["dtype"])
    records.add(rec)
    rows.append((method, rec, models.param_count(cfg.model_config)))
  write_report(out, rows, s, steps, command, code, costs)


def write_report(out, rows, s, steps, command, code, costs) -> None:
  import jax  # pylint: disable=import-outside-toplevel
  dev = jax.devices()[0]
  base = next((r for m, r, _ in rows if m == "adamw"), None)
  preset = rows and rows[0][1]["setting"] == "paper60m"
  lines = ["| method | peak lr | held-out perplexity | vs AdamW | "
           + ("published (C4, 10K steps) | " if preset else "")
           + "tokens/s | MFU | wall (s) |",
           "|---|---|---|---|" + ("---|" if preset else "") + "---|---|---|"]
  for method, rec, params in rows:
    vs = ("—" if base is None or method == "adamw"
          else f"{100 * (rec['eval_ppl'] / base['eval_ppl'] - 1):+.1f} %")
    tps = rec["tokens_per_s"]
    cells = [METHODS[method][0], f"{rec['lr']:g}", f"{rec['eval_ppl']:.2f}", vs]
    if preset:
      cells.append(str(PUBLISHED.get(method, "—")))
    cells += [f"{tps:,.0f}" if tps else "—", mfu(tps, params),
              f"{rec['wall_s']:.0f}"]
    lines.append("| " + " | ".join(cells) + " |")
  calib = ("" if not costs else "Calibration (compile s, step "
                                "ms): " + ", ".join(
      f"{m} ({c:.0f}, {1e3 * t:.0f})" for m, (c, t) in costs.items()) + ".\n\n")
  text = (
      "# LLaMA-60M, the papers' "
      f"setting\n\n{common.provenance(command, commit_id=code)}\nDevice: "
      f"{dev.platform} ({dev.device_kind}). Model `{s['model']}`, data "
      f"`{s['data']}`, {steps} steps of {s['batch_size']} × {s['seq_len']} "
      f"tokens, {s['dtype']}, warm-up {min(s['warmup'], steps - 1)}, rank "
      f"{s['rank']}, gap {s['update_gap']}, scale {s['scale']:g}, seed "
      f"{rows[0][1]['seed'] if rows else 0}. Held-out: {s['eval_batches']} "
      "validation batches.\n\n" + calib + "\n".join(lines) + "\n")
  png = out.with_name(f"{out.stem}.png")
  results = [(m, quality.Result(METHODS[m][0], r["lr"], [r], [base] if base else []))
             for m, r, _ in rows]
  if quality.plot(results, png, "LLaMA-60M setting: loss curves"):
    text += f"\n![curves]({png.name})\n"
  common.write(out, text)


if __name__ == "__main__":
  main()
