"""Convergence: the seed counter-example and pretraining loss curves.

Two parts, run together by default (a few minutes on a 2-core laptop CPU):

counterexample
  The noisy quadratic of the GoLore paper (:mod:`subspace_jax.counterexample`)
  on which GaLore provably stalls: the true gradient norm ``‖∇f(X_t)‖`` of
  GaLore, GoLore, GoLore@x% (SVD projections for the first (1 − x)·T steps),
  RSO and the full-rank inner optimizer, with Adam and with SGD-momentum
  (MSGD) inside, for several noise levels σ. Writes
  ``results/counterexample.png`` (one panel per inner optimizer × σ, log y).

pretraining
  Loss curves of the same LLaMA (``tiny`` by default), data (the corpus
  embedded in the package, byte tokenizer, no download), seed, step count and
  hyper-parameters for AdamW, GaLore, GoLore, GoLore@x%, RSO (transform mode)
  and, when the training code has them, RSO and GoLore in model mode. Writes
  ``results/pretraining.png`` (train and eval loss vs step).

Both write their tables to ``results/convergence.md``, each into its own
section, so running one part keeps the other part's section.

Examples:
  python benchmarks/convergence.py                      # both parts
  python benchmarks/convergence.py counterexample --cx-steps 20000
  python -m benchmarks.convergence pretraining --model llama_60m --steps 300

matplotlib is needed for the figures (``pip install matplotlib``).
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib
import re
import shlex
import sys
import tempfile
import time

if __package__ in (None, ""):  # Run as `python benchmarks/convergence.py`.
  sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

import numpy as np  # pylint: disable=wrong-import-position
import optax  # pylint: disable=wrong-import-position

import subspace_jax as sj  # pylint: disable=wrong-import-position
from benchmarks import common  # pylint: disable=wrong-import-position
from subspace_jax import counterexample as cx  # pylint: disable=wrong-import-position
from subspace_jax.training import cli  # pylint: disable=wrong-import-position

PARTS = ("all", "counterexample", "pretraining")

# Counter-example methods, in plotting order: (key, label).
CX_METHODS = (
    ("galore", "GaLore"),
    ("golore", "GoLore"),
    ("golore_x", "GoLore@{x}%"),
    ("rso", "RSO"),
    ("full", "full-rank {inner}"),
)
INNERS = {
    "adam": ("Adam", optax.scale_by_adam),
    "msgd": ("MSGD", lambda: optax.trace(decay=0.9)),
}
# Pretraining methods: key -> (label, OptimizerConfig fields).
PT_METHODS = {
    "adamw": ("AdamW", {"name": "adamw"}),
    # AdamW at peak lr × scale: the step size the subspace methods apply to
    # the projected matrices (a second baseline; lr is set per run).
    "adamw_scaled": ("AdamW (lr × scale)", {"name": "adamw"}),
    "galore": ("GaLore", {"name": "galore"}),
    "golore": ("GoLore", {"name": "golore"}),
    "golore_x": ("GoLore@{x}%", {"name": "golore"}),  # svd_steps set per run
    "rso": ("RSO", {"name": "rso"}),
    # Transform mode on the input side of every kernel (model mode's with
    # side="left").
    "rso_left": ("RSO (side=left)", {"name": "rso", "side": "left"}),
    "golore_left": ("GoLore (side=left)", {"name": "golore", "side": "left"}),
    "rso_model": ("RSO (model mode)", {"name": "rso", "subspace_mode": "model"}),
    "golore_model": ("GoLore (model mode)",
                     {"name": "golore", "subspace_mode": "model"}),
}
COLORS = {
    "galore": "tab:red", "golore": "tab:blue", "golore_x": "tab:purple",
    "rso": "tab:green", "full": "black", "adamw": "black",
    "adamw_scaled": "tab:gray",
    "rso_model": "tab:olive", "golore_model": "tab:cyan",
    "rso_left": "tab:brown", "golore_left": "tab:pink",
}
# Values plotted on a log axis are clipped to this (full Adam on the
# counter-example reaches exactly 0 in float32).
LOG_FLOOR = 1e-8


# ----------------------------------------------------------------------------
# Output helpers
# ----------------------------------------------------------------------------


def _pyplot():
  """matplotlib.pyplot on the non-interactive Agg backend."""
  try:
    import matplotlib  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise SystemExit(
        "benchmarks/convergence.py needs matplotlib for its figures: "
        "pip install matplotlib") from e
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  return plt


def _command(argv: list[str]) -> str:
  return "python benchmarks/convergence.py" + (
      " " + shlex.join(argv) if argv else "")


def _fmt(x: float) -> str:
  if not math.isfinite(x):
    return str(x)
  if x == 0:
    return "0"
  return f"{x:.3g}" if 1e-3 <= abs(x) < 1e4 else f"{x:.2e}"


_HEADER = "# Convergence: counter-example and pretraining curves\n"


def update_section(path: pathlib.Path, name: str, body: str,
                   order=("counterexample", "pretraining")) -> None:
  """Writes ``body`` as section ``name`` of the markdown file ``path``,
  keeping the file's other sections."""
  sections = {}
  if path.exists():
    pattern = r"<!-- begin (\w+) -->\n(.*?)<!-- end \1 -->\n"
    sections = dict(re.findall(pattern, path.read_text(), flags=re.S))
  sections[name] = body.rstrip("\n") + "\n"
  text = _HEADER + "".join(
      f"\n<!-- begin {key} -->\n{sections[key]}<!-- end {key} -->\n"
      for key in sorted(sections, key=lambda k: (k not in order,
                                                  order.index(k) if k in order else 0, k)))
  common.write(path, text)


# ----------------------------------------------------------------------------
# Part 1: the counter-example
# ----------------------------------------------------------------------------


def _cx_transform(method: str, inner_name: str, args):
  inner = INNERS[inner_name][1]()
  kw = dict(rank=args.cx_rank, update_gap=args.cx_gap)
  svd_steps = int(round((1 - args.golore_pct / 100) * args.cx_steps))
  core = {
      "galore": lambda: sj.galore(inner, **kw),
      "golore": lambda: sj.golore(inner, seed=args.cx_seed, **kw),
      "golore_x": lambda: sj.golore(inner, seed=args.cx_seed,
                                    svd_steps=svd_steps, **kw),
      "rso": lambda: sj.rso(inner, seed=args.cx_seed, **kw),
      "full": lambda: inner,
  }[method]()
  return optax.chain(core, optax.scale_by_learning_rate(
      optax.cosine_decay_schedule(args.cx_lr, args.cx_steps)))


def run_counterexample(args, argv) -> None:
  t0 = time.perf_counter()
  sigmas = [float(s) for s in args.sigmas.split(",")]
  inners = args.inners.split(",")
  for name in inners:
    if name not in INNERS:
      raise SystemExit(f"--inners: unknown inner optimizer {name!r} "
                       f"(choose from {', '.join(INNERS)})")
  window = max(1, min(1000, args.cx_steps // 50))
  curves = {}   # (inner, sigma, method) -> norms
  initial = None
  for inner_name in inners:
    for sigma in sigmas:
      problem = cx.make_problem(n=args.cx_n, r=args.cx_rank, sigma=sigma)
      initial = float(np.linalg.norm(problem.b))
      for method, _ in CX_METHODS:
        t = time.perf_counter()
        norms = cx.run(problem, _cx_transform(method, inner_name, args),
                       args.cx_steps, seed=args.cx_seed)
        curves[inner_name, sigma, method] = norms
        print(f"counterexample {inner_name:>4} σ={sigma:<4} {method:>8}: "
              f"final ‖∇f‖ {norms[-window:].mean():.3e} "
              f"({time.perf_counter() - t:.1f} s)", flush=True)
  final = {k: float(v[-window:].mean()) for k, v in curves.items()}

  png = pathlib.Path(args.results_dir) / "counterexample.png"
  plot_counterexample(curves, inners, sigmas, initial, args, png)

  # Checks of what the example is meant to show.
  d_max = 1.0  # make_problem's default
  checks, ok_all = [], True
  for inner_name in inners:
    for sigma in sigmas:
      g = final[inner_name, sigma, "galore"]
      conv = {m: final[inner_name, sigma, m] for m in ("golore", "rso")}
      converged = all(v <= initial / 30 for v in conv.values())
      stalled = g >= 0.9 * initial
      if sigma > d_max:
        ok = converged and stalled
        what = (f"GaLore {'stalls' if stalled else 'does NOT stall'} "
                f"({g / initial:.0%} of ‖∇f(0)‖)")
      else:
        ok = converged
        what = (f"σ ≤ max D, so the noise does not dominate at the start: "
                f"GaLore stops at {g / initial:.0%} of ‖∇f(0)‖")
      ok_all &= ok
      checks.append(
          f"- {INNERS[inner_name][0]}, σ = {sigma}: {what}; GoLore / RSO "
          f"{'reach' if converged else 'do NOT reach'} ≤ ‖∇f(0)‖/30 "
          f"({_fmt(conv['golore'])} / {_fmt(conv['rso'])}) "
          f"{'✓' if ok else '✗'}")
  print("\n".join(checks))

  x = _fmt_pct(args.golore_pct)
  labels = {m: l.format(x=x, inner="optimizer") for m, l in CX_METHODS}
  tables = []
  for inner_name in inners:
    iname = INNERS[inner_name][0]
    head = (f"| inner {iname} | " + " | ".join(f"σ = {s}" for s in sigmas)
            + " |\n|---|" + "---|" * len(sigmas) + "\n")
    rows = "".join(
        f"| {labels[m].replace('optimizer', iname)} | "
        + " | ".join(_fmt(final[inner_name, s, m]) for s in sigmas) + " |\n"
        for m, _ in CX_METHODS)
    tables.append(head + rows)
  elapsed = time.perf_counter() - t0
  svd_steps = int(round((1 - args.golore_pct / 100) * args.cx_steps))
  body = (
      "## 1. The seed counter-example: GaLore stalls, GoLore and RSO converge\n\n"
      f"{common.machine_line()}\n\n"
      f"Command: `{_command(argv)}` ({elapsed:.0f} s for this part).\n\n"
      f"Problem (`subspace_jax.counterexample.make_problem`): n = {args.cx_n}, "
      f"r = {args.cx_rank}, D = diag(linspace(1, 0.5)), noise ξσC with ξ = ±1, "
      f"‖∇f(X₀)‖ = ‖D‖ = {initial:.3f}. Every method: rank {args.cx_rank}, "
      f"update_gap {args.cx_gap}, seed {args.cx_seed}, {args.cx_steps:,} "
      f"steps, step size {args.cx_lr:g} with cosine decay to 0; GoLore@{x}% "
      f"= SVD projections for steps < {svd_steps:,}, random after. MSGD = "
      "`optax.trace(decay=0.9)`; \"full\" = the inner optimizer on the whole "
      f"matrix. Table: true ‖∇f(X_t)‖, mean over the last {window:,} "
      "iterations.\n\n"
      + "\n".join(tables) + "\n"
      "Checks (GaLore stalls when σ > max D = 1; GoLore and RSO fall at least "
      "1.5 orders of magnitude):\n\n" + "\n".join(checks) + "\n\n"
      f"![counter-example]({png.name})\n\n"
      f"Figure: `{png.name}`, one panel per inner optimizer × σ, log y; "
      f"values below {LOG_FLOOR:g} are drawn at {LOG_FLOOR:g} (full Adam "
      "reaches 0 exactly in float32). Full MSGD levels off near 7e-6 only "
      "because of float32: its steps fall below the resolution of X ≈ −D "
      "(in float64 it reaches 1e-14).\n")
  if args.golore_pct and args.cx_steps:
    body += (
        f"\nGoLore@{x}% switches to random projections only when the cosine "
        f"step size is already below {_cos_frac(svd_steps, args.cx_steps):.0%} "
        "of its peak, so in this short problem it leaves the SVD phase's "
        "plateau only partly.\n")
  update_section(pathlib.Path(args.results_dir) / "convergence.md",
                 "counterexample", body)
  if not ok_all:
    print("warning: a counter-example check failed (see above)",
          file=sys.stderr)


def _cos_frac(step: int, total: int) -> float:
  return 0.5 * (1 + math.cos(math.pi * min(step, total) / total))


def _fmt_pct(p: float) -> str:
  return f"{p:g}"


def _subsample(n: int, points: int = 2000) -> np.ndarray:
  return np.unique(np.linspace(0, n - 1, min(n, points)).astype(int))


def plot_counterexample(curves, inners, sigmas, initial, args, path) -> None:
  plt = _pyplot()
  rows, cols = len(inners), len(sigmas)
  fig, axes = plt.subplots(rows, cols, figsize=(4.3 * cols, 3.4 * rows),
                           sharex=True, sharey=True, squeeze=False)
  x = _fmt_pct(args.golore_pct)
  for i, inner_name in enumerate(inners):
    iname = INNERS[inner_name][0]
    for j, sigma in enumerate(sigmas):
      ax = axes[i][j]
      for method, label in CX_METHODS:
        norms = curves[inner_name, sigma, method]
        idx = _subsample(len(norms))
        # GaLore thick and GoLore@x% dash-dotted on top: they share the SVD
        # plateau until the switch.
        ax.plot(idx + 1, np.maximum(norms[idx], LOG_FLOOR),
                color=COLORS[method], lw=2.6 if method == "galore" else 1.4,
                ls={"full": "--", "golore_x": "-."}.get(method, "-"),
                label=label.format(x=x, inner="inner optimizer"))
      ax.axhline(initial, color="gray", lw=0.6, ls=":")
      ax.set_yscale("log")
      ax.set_title(f"inner {iname}, σ = {sigma}", fontsize=10)
      ax.grid(True, which="major", alpha=0.3)
      if i == rows - 1:
        ax.set_xlabel("iteration")
      if j == 0:
        ax.set_ylabel("‖∇f(X_t)‖")
  handles, labels = axes[0][0].get_legend_handles_labels()
  fig.legend(handles, labels, loc="lower center", ncol=len(labels),
             frameon=False)
  fig.suptitle(
      f"Noisy quadratic (n={args.cx_n}, r={args.cx_rank}), update_gap "
      f"{args.cx_gap}, lr {args.cx_lr:g} cosine, {args.cx_steps:,} steps; "
      "dotted: ‖∇f(X₀)‖", fontsize=11)
  fig.tight_layout(rect=(0, 0.05, 1, 1))
  path.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(path, dpi=110)
  plt.close(fig)
  print(f"wrote {path}")


# ----------------------------------------------------------------------------
# Part 2: pretraining curves
# ----------------------------------------------------------------------------


def _optimizer_config(method: str, args):
  """The OptimizerConfig of ``method``: the optimizer flags, with the
  method's fields."""
  fields = dict(PT_METHODS[method][1])
  if method == "golore_x":
    fields["svd_steps"] = int(round((1 - args.golore_pct / 100) * args.steps))
  if method == "adamw_scaled":
    fields["learning_rate"] = args.lr * args.scale
  return cli.optimizer_config(args, args.steps, **fields)


def _read_metrics(path: pathlib.Path):
  train_steps, train_loss, eval_steps, eval_loss = [], [], [], []
  with open(path, encoding="utf-8") as f:
    for line in f:
      rec = json.loads(line)
      if rec.get("loss") is not None:
        train_steps.append(rec["step"])
        train_loss.append(rec["loss"])
      if rec.get("eval_loss") is not None:
        eval_steps.append(rec["step"])
        eval_loss.append(rec["eval_loss"])
  return (np.array(train_steps), np.array(train_loss),
          np.array(eval_steps), np.array(eval_loss))


def run_pretraining(args, argv) -> None:
  from subspace_jax.models import llama  # pylint: disable=import-outside-toplevel
  from subspace_jax.training import loop  # pylint: disable=import-outside-toplevel

  t0 = time.perf_counter()
  if args.rank is None:
    args.rank = max(1, llama.get_config(args.model).hidden_size // 4)
  if args.warmup is None:
    args.warmup = min(cli.WARMUP, args.steps)
  methods = args.methods.split(",")
  for m in methods:
    if m not in PT_METHODS:
      raise SystemExit(f"--methods: unknown method {m!r} "
                       f"(choose from {', '.join(PT_METHODS)})")
  x = _fmt_pct(args.golore_pct)
  label = lambda m: PT_METHODS[m][0].format(x=x)

  results = {}
  with tempfile.TemporaryDirectory(prefix="convergence_") as tmp:
    for m in methods:
      opt = _optimizer_config(m, args)
      metrics = pathlib.Path(tmp) / f"{m}.jsonl"
      cfg = loop.RunConfig(
          model=args.model, scan_layers=args.scan_layers, remat=args.remat,
          dtype=args.dtype, param_dtype=args.param_dtype, optimizer=opt,
          data="embedded",
          batch_size=args.batch_size, seq_len=args.seq_len, steps=args.steps,
          eval_every=args.eval_every, eval_batches=args.eval_batches,
          log_every=args.log_every, seed=args.seed, checkpoint_dir=None,
          metrics_path=str(metrics), progress=False)
      print(f"pretraining {m}: {args.model}, {args.steps} steps ...", flush=True)
      summary = loop.train(cfg)
      results[m] = dict(summary=summary, curves=_read_metrics(metrics),
                        svd_steps=opt.svd_steps)

  if not results:
    raise SystemExit("no pretraining run was made")
  png = pathlib.Path(args.results_dir) / "pretraining.png"
  plot_pretraining(results, label, args, png)

  # Table: gaps to AdamW at the same lr (and to AdamW at lr × scale).
  tail = max(1, args.steps // 20)
  bases = [b for b in ("adamw", "adamw_scaled") if b in results]

  def gap(ppl, base, m, pct_only=False):
    if m == base:
      return "—" if pct_only else "— | —"
    ppl0 = results[base]["summary"]["eval_ppl"]
    pct = f"{100 * (ppl / ppl0 - 1):+.1f}%"
    return pct if pct_only else f"{ppl - ppl0:+.3f} | {pct}"

  rows = []
  for m, r in results.items():
    s = r["summary"]
    loss, ppl = s["eval_loss"], s["eval_ppl"]
    train_tail = float(np.mean(r["curves"][1][-tail:]))
    cells = [label(m), f"{train_tail:.4f}", f"{loss:.4f}", f"{ppl:.3f}"]
    if "adamw" in bases:
      cells.append(gap(ppl, "adamw", m))
    if "adamw_scaled" in bases:
      cells.append(gap(ppl, "adamw_scaled", m, pct_only=True))
    rows.append("| " + " | ".join(cells) + " |\n")
  head = ["method", f"train loss (mean of last {tail} steps)", "eval loss",
          "eval perplexity"]
  if "adamw" in bases:
    head += ["Δppl vs AdamW", "Δppl % vs AdamW"]
  if "adamw_scaled" in bases:
    head += ["Δppl % vs AdamW (lr × scale)"]
  table = ("| " + " | ".join(head) + " |\n|" + "---|" * len(head) + "\n"
           + "".join(rows))
  elapsed = time.perf_counter() - t0
  model_cfg = loop.RunConfig(model=args.model,
                             seq_len=args.seq_len).model_config()
  svd_steps = int(round((1 - args.golore_pct / 100) * args.steps))
  random_refreshes = [k for k in range(0, args.steps, args.update_gap)
                      if k >= svd_steps]
  notes = []
  if "golore_x" in results and not random_refreshes:
    notes.append(f"- GoLore@{x}% makes no random projection here: no "
                 f"projection change (every {args.update_gap} steps) falls in "
                 f"steps ≥ {svd_steps}; it equals GaLore.")
  if "adamw_scaled" in results:
    notes.append(
        f"- AdamW (lr × scale) is AdamW at peak lr {args.lr * args.scale:g}: "
        f"the subspace methods multiply their projected-matrix updates by "
        f"scale = {args.scale:g}, so their matrices take steps of that size "
        "(embeddings, lm_head and norms still at the full lr); a second "
        "baseline, since at equal lr AdamW's matrix steps are 1/scale larger.")
  if any(m.endswith("_model") for m in results):
    notes.append(
        "- Model mode: the model differentiates B of W + P·B directly "
        "(`OptimizerConfig(subspace_mode=\"model\")`), on the same side of "
        "each kernel as transform mode (\"lean\": the larger dimension is "
        "projected, so B is r × min(m, n); for the MLP's gate/up kernels the "
        "output side); `--methods` with rso_left / golore_left runs transform "
        "mode on the input side of every kernel.")
  order = sorted(results, key=lambda m: results[m]["summary"]["eval_loss"])
  notes.append("- Final eval loss, best first: "
               + " < ".join(label(m) for m in order) + ".")
  body = (
      "## 2. Pretraining curves\n\n"
      f"{common.machine_line()}\n\n"
      f"Command: `{_command(argv)}` ({elapsed:.0f} s for this part).\n\n"
      f"Model `{args.model}` ({llama.param_count(model_cfg) / 1e6:.2f}M "
      f"parameters with the byte tokenizer's {model_cfg.vocab_size} ids), "
      "float32, the corpus "
      "embedded in the package (byte tokenizer, validation split for eval), "
      f"batch {args.batch_size} × {args.seq_len} tokens, {args.steps} steps, "
      f"data and weight seed {args.seed}, one run each. Same hyper-parameters "
      f"for every method: peak lr {args.lr:g}, {args.warmup} warm-up steps, "
      f"cosine decay to {args.min_lr_ratio:g}× peak, Adam β = (0.9, 0.999), "
      f"gradient clip {args.clip:g}, weight decay {args.weight_decay:g}; "
      f"subspace methods: rank {args.rank}, update_gap {args.update_gap}, "
      f"scale {args.scale:g}, projection seed {args.proj_seed}, attention and "
      "MLP kernels projected (embeddings, lm_head and norms in full); "
      f"GoLore@{x}%: svd_steps = {svd_steps} "
      "(new random projections at steps "
      f"{', '.join(map(str, random_refreshes)) or 'none'}). RSO "
      "without proximal term. Eval: mean loss over "
      f"{args.eval_batches} validation batches every {args.eval_every} steps; "
      "the table's is at the last step.\n\n"
      + table + ("\n" + "\n".join(notes) + "\n" if notes else "")
      + f"\n![pretraining]({png.name})\n\n"
      f"Figure: `{png.name}`; left: train loss per step (thin) and its "
      f"moving average over {_smooth_window(args.steps)} steps; right: eval "
      "loss.\n")
  update_section(pathlib.Path(args.results_dir) / "convergence.md",
                 "pretraining", body)
  for m, r in results.items():
    s = r["summary"]
    print(f"{label(m):>20}: eval loss {s['eval_loss']:.4f}, ppl "
          f"{s['eval_ppl']:.3f}, {s['wall_time_s']:.1f} s")


def _smooth_window(steps: int) -> int:
  return max(1, min(25, steps // 30))


def plot_pretraining(results, label, args, path) -> None:
  plt = _pyplot()
  fig, (ax_t, ax_e) = plt.subplots(1, 2, figsize=(12, 4.4))
  w = _smooth_window(args.steps)
  for m, r in results.items():
    steps, loss, esteps, eloss = r["curves"]
    color = COLORS.get(m)
    ls = {"adamw": "--", "adamw_scaled": ":", "golore_x": "-."}.get(
        m, "-." if m.endswith("_model") else "-")
    lw = 2.6 if m == "galore" else 1.5
    if len(loss):
      ax_t.plot(steps, loss, color=color, lw=0.4, alpha=0.25)
      if len(loss) >= w:
        smooth = np.convolve(loss, np.ones(w) / w, mode="valid")
        ax_t.plot(steps[w - 1:], smooth, color=color, lw=lw, ls=ls,
                  label=label(m))
    if len(eloss):
      ax_e.plot(esteps, eloss, color=color, lw=lw, ls=ls, marker="o", ms=3,
                label=label(m))
  for ax, what in ((ax_t, "train loss"), (ax_e, "eval loss")):
    ax.set_xlabel("step")
    ax.set_ylabel(what)
    ax.grid(True, alpha=0.3)
  # Zoom on the interesting part: skip the first 10% of the run.
  lows, highs = [], []
  for r in results.values():
    steps, loss, esteps, eloss = r["curves"]
    later = loss[steps > args.steps // 10]
    if later.size:
      lows.append(np.nanmin(later))
      highs.append(np.nanmax(later))
  if lows and np.all(np.isfinite(lows + highs)):
    lo, hi = min(lows), max(highs)
    ax_t.set_ylim(lo - 0.05 * (hi - lo), hi + 0.05 * (hi - lo))
  ax_e.legend(fontsize=8)
  fig.suptitle(
      f"{args.model} LLaMA on the embedded corpus: {args.steps} steps, lr "
      f"{args.lr:g}, rank {args.rank}, update_gap {args.update_gap}, scale "
      f"{args.scale:g}", fontsize=10)
  fig.tight_layout()
  path.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(path, dpi=110)
  plt.close(fig)
  print(f"wrote {path}")


# ----------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------


class _Formatter(argparse.RawDescriptionHelpFormatter, cli.HelpFormatter):
  """The epilog as written; each default shown once."""


def build_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
      description=__doc__.split("\n\n")[0],
      epilog=__doc__.split("\n\n", 1)[1],
      formatter_class=_Formatter)
  p.add_argument("part", nargs="?", default="all", choices=PARTS,
                 help="which part to run (default: all)")
  p.add_argument("--results-dir", default=str(common.RESULTS),
                 help="where convergence.md and the PNGs go "
                      "(default: benchmarks/results)")
  p.add_argument("--golore-pct", type=float, default=20.0,
                 help="x of GoLore@x%%: random projections for the last x%% "
                      "of the steps (default: 20)")

  g = p.add_argument_group("counter-example")
  g.add_argument("--cx-steps", type=int, default=50_000,
                 help="iterations per run (default: 50000)")
  g.add_argument("--sigmas", default="0.6,1.2,2.4",
                 help="comma-separated noise levels σ (default: 0.6,1.2,2.4)")
  g.add_argument("--inners", default="adam,msgd",
                 help="comma-separated inner optimizers: adam, msgd "
                      "(default: both)")
  g.add_argument("--cx-lr", type=float, default=1e-3,
                 help="peak step size, cosine decay to 0 (default: 1e-3)")
  g.add_argument("--cx-gap", type=int, default=50,
                 help="update_gap of every method (default: 50)")
  g.add_argument("--cx-n", type=int, default=10, help="matrix size n (default: 10)")
  g.add_argument("--cx-rank", type=int, default=2,
                 help="rank r, also the noise's rank (default: 2)")
  g.add_argument("--cx-seed", type=int, default=0,
                 help="seed of the noise signs and projections (default: 0)")

  g = p.add_argument_group("pretraining")
  cli.add_model_flags(g)
  g.add_argument("--methods",
                 default="adamw,adamw_scaled,galore,golore,golore_x,rso,"
                         "rso_model,golore_model",
                 help="comma-separated methods out of " + ", ".join(PT_METHODS)
                      + " (golore_x is GoLore@x%%; adamw_scaled is AdamW at "
                      "peak lr × --scale; *_left: transform mode projecting "
                      "the input side of every kernel; "
                      "default: all but *_left)")
  g.add_argument("--steps", type=int, default=600,
                 help="training steps of every run (default: 600)")
  # --methods sets each run's optimizer, subspace mode and SVD steps.
  cli.add_optimizer_flags(g, update_gap=50, omit=(
      "--optimizer", "--subspace-mode", "--svd-steps", "--schedule-steps"))
  g.add_argument("--batch-size", type=int, default=16, help="sequences per step (default: 16)")
  g.add_argument("--seq-len", type=int, default=64, help="tokens per sequence (default: 64)")
  g.add_argument("--eval-every", type=int, default=50,
                 help="evaluate every this many steps (default: 50)")
  g.add_argument("--eval-batches", type=int, default=8,
                 help="validation batches per evaluation (default: 8)")
  g.add_argument("--log-every", type=int, default=1,
                 help="record the train loss every this many steps (default: 1)")
  g.add_argument("--seed", type=int, default=0,
                 help="seed of the weights and the data order (default: 0)")
  return p


def main(argv: list[str] | None = None) -> None:
  argv = sys.argv[1:] if argv is None else list(argv)
  args = build_parser().parse_args(argv)
  _pyplot()  # Fail before any work if matplotlib is missing.
  if not 0 <= args.golore_pct <= 100:
    raise SystemExit("--golore-pct must be in [0, 100]")
  t0 = time.perf_counter()
  if args.part in ("all", "counterexample"):
    run_counterexample(args, argv)
  if args.part in ("all", "pretraining"):
    run_pretraining(args, argv)
  print(f"total {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
  main()
