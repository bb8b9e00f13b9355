"""The seed counter-example: GaLore stalls where GoLore and RSO converge.

The noisy quadratic of the GoLore paper (:mod:`subspace_jax.counterexample`),
on which GaLore provably stalls: the true gradient norm ``‖∇f(X_t)‖`` of
GaLore, GoLore, GoLore@x% (SVD projections for the first (1 − x)·T steps),
RSO and the full-rank inner optimizer, with Adam and with SGD-momentum
(MSGD) inside, for several noise levels σ. Writes ``results/counterexample.md``
and ``results/counterexample.png`` (one panel per inner optimizer × σ, log
y). Half a minute on a 2-core CPU. (Pretraining quality is
``benchmarks/quality.py``'s.)

Examples:
  python -m benchmarks.counterexample
  python -m benchmarks.counterexample --cx-steps 20000 --sigmas 1.2

matplotlib is needed for the figure (``pip install matplotlib``).
"""

from __future__ import annotations

import argparse
import math
import pathlib
import sys
import time


import numpy as np  # pylint: disable=wrong-import-position
import optax  # pylint: disable=wrong-import-position

import subspace_jax as sj  # pylint: disable=wrong-import-position
from benchmarks import common  # pylint: disable=wrong-import-position
from subspace_jax import counterexample as cx  # pylint: disable=wrong-import-position

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
COLORS = {
    "galore": "tab:red", "golore": "tab:blue", "golore_x": "tab:purple",
    "rso": "tab:green", "full": "black",
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
        "benchmarks/counterexample.py needs matplotlib for its figure: "
        "pip install matplotlib") from e
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  return plt


def _fmt(x: float) -> str:
  if not math.isfinite(x):
    return str(x)
  if x == 0:
    return "0"
  return f"{x:.3g}" if 1e-3 <= abs(x) < 1e4 else f"{x:.2e}"


# ----------------------------------------------------------------------------
# The counter-example
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
      "# The seed counter-example: GaLore stalls, GoLore and RSO converge\n\n"
      + common.provenance(common.command_line("benchmarks.counterexample", argv))
      + f"\n{elapsed:.0f} s.\n\n"
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
  body += "\n" + common.readme_block("counterexample", _summary(
      final, inners, sigmas, initial, args, png))
  common.write(pathlib.Path(args.results_dir) / "counterexample.md", body)
  if not ok_all:
    print("warning: a counter-example check failed (see above)",
          file=sys.stderr)


def _summary(final, inners, sigmas, initial, args, png) -> str:
  """The README's lines: where GaLore stalls and how far below the random
  methods go, from the figures of this run."""
  noisy = [s for s in sigmas if s > 1.0]  # σ > max D: the noise dominates.
  if not noisy:
    return f"![counter-example]({png.name})"
  galore = [final[i, s, "galore"] for i in inners for s in noisy]
  rnd = [initial / final[i, s, m] for i in inners for s in noisy
         for m in ("golore", "rso")]
  span = lambda lo, hi, f: f"{lo:{f}}" if f"{lo:{f}}" == f"{hi:{f}}" else f"{lo:{f}}–{hi:{f}}"
  return (
      f"On the noisy quadratic of the GoLore paper (n = {args.cx_n}, r = "
      f"{args.cx_rank}, {args.cx_steps:,} steps, Adam and MSGD inside) GaLore "
      f"stalls at {span(min(galore), max(galore), '.3g')} (its starting "
      f"gradient norm is {initial:.3g}) for σ ≥ {min(noisy):g}, while GoLore "
      f"and RSO fall {span(min(rnd), max(rnd), '.0f')}× below it:\n\n"
      f"![counter-example]({png.name})")


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
# Command line
# ----------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
      description=__doc__.split("\n\n")[0],
      epilog=__doc__.split("\n\n", 1)[1],
      formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--results-dir", default=str(common.RESULTS),
                 help="where counterexample.md and .png go "
                      "(default: benchmarks/results)")
  p.add_argument("--golore-pct", type=float, default=20.0,
                 help="x of GoLore@x%%: random projections for the last x%% "
                      "of the steps (default: 20)")
  g = p.add_argument_group("the problem and the runs")
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
  return p


def main(argv: list[str] | None = None) -> None:
  argv = sys.argv[1:] if argv is None else list(argv)
  args = build_parser().parse_args(argv)
  _pyplot()  # Fail before any work if matplotlib is missing.
  if not 0 <= args.golore_pct <= 100:
    raise SystemExit("--golore-pct must be in [0, 100]")
  run_counterexample(args, argv)


if __name__ == "__main__":
  main()
