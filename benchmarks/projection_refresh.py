"""Projection refresh: full SVD vs the fast randomized subspace.

For each matrix shape this times, alternately in one process after a
warm-up, the jitted exact SVD projection (:func:`svd_subspace`; its cost does
not depend on the rank, so it is timed once per shape) and, for every rank,
the randomized range finder (:func:`randomized_subspace`) started cold and
warm. It reports the speed-ups and the captured-energy ratio
``‖PᵀG‖² / ‖UᵣᵀG‖²`` of the fast projections (1 = the exact top-r energy).

The test matrix has a power-law spectrum (``s_i = (i + 1)^-alpha``) plus a
small Gaussian floor, like a gradient. Writes a markdown table to
``benchmarks/results/projection_refresh.md``.

OpenBLAS (which runs JAX's CPU LAPACK calls, the SVD included) is limited to
one thread unless ``OPENBLAS_NUM_THREADS`` is already set: on a small shared
machine its spinning worker threads fight XLA's and other processes' threads
and make the SVD several times slower and erratic (a 2048×5461 SVD: 9 s with
one thread, 64–73 s with the default, on 2 busy cores).

Example:
  python benchmarks/projection_refresh.py --shapes 4096x11008 --ranks 512
"""

from __future__ import annotations

import os

# Before NumPy or JAX load OpenBLAS (see the module docstring).
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse  # pylint: disable=wrong-import-position
import shlex  # pylint: disable=wrong-import-position
import sys  # pylint: disable=wrong-import-position
import time  # pylint: disable=wrong-import-position


import jax  # pylint: disable=wrong-import-position
import jax.numpy as jnp  # pylint: disable=wrong-import-position
import numpy as np  # pylint: disable=wrong-import-position

from benchmarks import common  # pylint: disable=wrong-import-position
from subspace_jax import projection as proj  # pylint: disable=wrong-import-position

DEFAULT_SHAPES = "2048x5461,4096x11008"
DEFAULT_RANKS = "128,256,512,1024"


def test_matrix(m: int, n: int, alpha: float, seed: int = 0) -> jax.Array:
  """``U diag(s) Vᵀ`` with ``min(m, n, 1024)`` power-law terms plus noise."""
  k = min(m, n, 1024)
  ku, kv, kn = jax.random.split(jax.random.key(seed), 3)
  u = jax.random.normal(ku, (m, k)) / np.sqrt(m)
  v = jax.random.normal(kv, (n, k)) / np.sqrt(n)
  s = (1.0 + jnp.arange(k)) ** -alpha
  noise = 1e-3 * jax.random.normal(kn, (m, n)) / np.sqrt(max(m, n))
  return (u * s) @ v.T + noise


def _time(fn, *args) -> float:
  t = time.perf_counter()
  jax.block_until_ready(fn(*args))
  return time.perf_counter() - t


def parse_shapes(text: str) -> list[tuple[int, int]]:
  """``"2048x5461,4096x11008"`` -> ``[(2048, 5461), (4096, 11008)]``."""
  return [tuple(int(x) for x in s.lower().split("x")) for s in text.split(",")]


def parse_ranks(text: str) -> list[int]:
  return [int(r) for r in text.split(",")]


def bench_shape(m, n, ranks, repeats, alpha, oversample, power_iters,
                log=print) -> list[dict]:
  """Times one shape: the full SVD once per round, every fast variant too.

  Each of ``repeats`` rounds runs the full SVD, then the cold and the warm
  fast refresh of every rank (alternating, so drifts in the machine's load
  hit all alike); the minimum over rounds is reported.

  Returns:
    One row (a dict) per rank that is below ``min(m, n)``.
  """
  ranks = [r for r in ranks if r < min(m, n)]
  g = jax.block_until_ready(test_matrix(m, n, alpha))
  full = min(m, n)
  exact = jax.jit(lambda g: proj.svd_subspace(g, full))
  cold = {
      r: jax.jit(lambda g, k, r=r: proj.randomized_subspace(
          g, r, k, oversample=oversample, power_iters=power_iters))
      for r in ranks
  }
  warm = {
      r: jax.jit(lambda g, k, init, r=r: proj.randomized_subspace(
          g, r, k, init=init, oversample=oversample, power_iters=power_iters))
      for r in ranks
  }
  key = jax.random.key(1)
  # Warm-up (compilation) and the reference: ‖U_iᵀ G‖² = s_i², cumulated.
  t0 = time.perf_counter()
  u = jax.block_until_ready(exact(g))
  log(f"{m}x{n}: first full SVD (with compilation) {time.perf_counter() - t0:.1f}s")
  top_u = u[:, :max(ranks)] if ranks else u[:, :1]
  top = np.cumsum(np.asarray(jnp.sum(jnp.square(top_u.T @ g), axis=1), np.float64))
  # Warm start: the exact subspace of a perturbed matrix (as at a refresh,
  # where the previous projection came from the previous gradient).
  g_prev = g + 0.3 * jnp.linalg.norm(g) / np.sqrt(m * n) * jax.random.normal(
      jax.random.key(7), g.shape
  )
  u_prev = jax.block_until_ready(exact(g_prev))
  del g_prev
  inits = {r: u_prev[:, :r] for r in ranks}
  out = {}
  for r in ranks:
    out[r] = (
        jax.block_until_ready(cold[r](g, key)),
        jax.block_until_ready(warm[r](g, key, inits[r])),
    )

  t_exact, t_cold, t_warm = [], {r: [] for r in ranks}, {r: [] for r in ranks}
  for i in range(repeats):
    t_exact.append(_time(exact, g))
    for r in ranks:
      t_cold[r].append(_time(cold[r], g, key))
      t_warm[r].append(_time(warm[r], g, key, inits[r]))
    log(f"{m}x{n}: round {i + 1}/{repeats}: full SVD {t_exact[-1]:.2f}s, "
        + ", ".join(f"r={r} {t_cold[r][-1]:.2f}/{t_warm[r][-1]:.2f}s"
                    for r in ranks))

  def energy(p, r):
    return float(jnp.sum(jnp.square(p.T @ g))) / top[r - 1]

  rows = []
  for r in ranks:
    rows.append({
        "shape": f"{m}x{n}",
        "rank": r,
        "svd_s": min(t_exact),
        "fast_s": min(t_cold[r]),
        "warm_s": min(t_warm[r]),
        "speedup": min(t_exact) / min(t_cold[r]),
        "speedup_warm": min(t_exact) / min(t_warm[r]),
        "energy": energy(out[r][0], r),
        "energy_warm": energy(out[r][1], r),
    })
  return rows


def bench(m, n, rank, repeats, alpha, oversample, power_iters) -> dict:
  """One (shape, rank) row (see :func:`bench_shape`)."""
  return bench_shape(m, n, [rank], repeats, alpha, oversample, power_iters)[0]


def run(shapes, ranks, repeats, alpha, oversample, power_iters,
        log=print) -> list[dict]:
  """All rows for ``shapes`` × ``ranks``."""
  rows = []
  for m, n in shapes:
    rows += bench_shape(m, n, ranks, repeats, alpha, oversample, power_iters,
                        log=log)
  return rows


def format_row(r: dict) -> str:
  return (
      f"{r['shape']:>11} r={r['rank']:<5} svd {r['svd_s']:7.2f}s  "
      f"fast {r['fast_s']:6.2f}s ({r['speedup']:5.1f}x, energy "
      f"{r['energy']:.4f})  warm {r['warm_s']:6.2f}s "
      f"({r['speedup_warm']:5.1f}x, energy {r['energy_warm']:.4f})"
  )


def describe(repeats, alpha, oversample, power_iters) -> str:
  """The paragraph that says how the table was made."""
  return (
      f"Spectrum s_i = (i+1)^-{alpha} (1024 terms) + 1e-3 noise; fast = "
      f"randomized range finder, oversample {oversample}, {power_iters} power "
      "iterations; warm = started from the exact subspace of a perturbed "
      "matrix (G + 0.3·rms(G)·noise). Captured energy = ‖PᵀG‖² / ‖UᵣᵀG‖² "
      "(1 = the exact top-r subspace). The full SVD (`svd_subspace`, one "
      "jitted float32 thin SVD) does not depend on the rank: it is timed once "
      f"per shape per round. Times: minimum of {repeats} rounds after a "
      "warm-up, each round running the full SVD then every fast variant. "
      f"OPENBLAS_NUM_THREADS={os.environ.get('OPENBLAS_NUM_THREADS')}."
  )


def table(rows: list[dict]) -> str:
  """Markdown table of :func:`run`'s rows."""
  header = (
      "| shape | rank | full SVD (s) | fast cold (s) | speed-up | captured "
      "energy | fast warm (s) | speed-up | captured energy |\n"
      "|---|---|---|---|---|---|---|---|---|\n"
  )
  return header + "".join(
      f"| {r['shape']} | {r['rank']} | {r['svd_s']:.2f} | {r['fast_s']:.2f} | "
      f"{r['speedup']:.1f}× | {r['energy']:.4f} | {r['warm_s']:.2f} | "
      f"{r['speedup_warm']:.1f}× | {r['energy_warm']:.4f} |\n"
      for r in rows
  )


def target_line(rows: list[dict], shape="4096x11008", rank=512) -> str:
  """Whether the fast refresh meets ≥ 10× at ≥ 0.99 captured energy."""
  for r in rows:
    if r["shape"] == shape and r["rank"] == rank:
      ok = lambda s, e: "met" if s >= 10 and e >= 0.99 else "NOT met"
      return (
          f"Target (fast refresh ≥ 10× faster than the full SVD at {shape}, "
          f"rank {rank}, with ≥ 0.99 captured energy): cold "
          f"{r['speedup']:.1f}× at {r['energy']:.4f} ({ok(r['speedup'], r['energy'])}), "
          f"warm {r['speedup_warm']:.1f}× at {r['energy_warm']:.4f} "
          f"({ok(r['speedup_warm'], r['energy_warm'])})."
      )
  return f"Target row ({shape}, rank {rank}) not measured."


def readme_text(rows: list[dict], shape="4096x11008", rank=512) -> str:
  """The README's sentence: the target row's speed-ups and energy."""
  for r in rows:
    if r["shape"] == shape and r["rank"] == rank:
      m, n = shape.split("x")
      return (
          f"The projection refresh alone ([results/projection_refresh.md]"
          f"(projection_refresh.md)): at {m}×{n} rank {rank} the randomized "
          f"subspace is {r['speedup']:.0f}× faster than the full SVD "
          f"({r['speedup_warm']:.0f}× warm-started) and captures "
          f"{r['energy']:.4f} of its energy.")
  return f"The projection refresh alone: {shape} rank {rank} not measured."


def _command_line() -> str:
  env = f"OPENBLAS_NUM_THREADS={os.environ.get('OPENBLAS_NUM_THREADS')} "
  if __package__:
    return env + "python -m benchmarks.projection_refresh " + shlex.join(sys.argv[1:])
  return env + "python benchmarks/projection_refresh.py " + shlex.join(sys.argv[1:])


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--shapes", default=DEFAULT_SHAPES,
                      help="comma-separated MxN matrix shapes")
  parser.add_argument("--ranks", default=DEFAULT_RANKS,
                      help="comma-separated ranks")
  parser.add_argument("--repeats", type=int, default=2,
                      help="timed rounds (the minimum is reported)")
  parser.add_argument("--alpha", type=float, default=1.0,
                      help="power-law exponent of the test spectrum")
  parser.add_argument("--oversample", type=int, default=8,
                      help="extra sketch columns of the fast method")
  parser.add_argument("--power-iters", type=int, default=2,
                      help="subspace iterations of the fast method")
  common.add_output_flags(parser, "projection_refresh.md")
  args = parser.parse_args(argv)
  code = common.commit()  # before the run: later edits do not count

  rows = run(parse_shapes(args.shapes), parse_ranks(args.ranks), args.repeats,
             args.alpha, args.oversample, args.power_iters)
  for row in rows:
    print(format_row(row), flush=True)
  text = (
      "# Projection refresh: full SVD vs fast randomized subspace\n\n"
      + common.provenance(_command_line(), commit_id=code) + "\n"
      + (f"{args.note}\n\n" if args.note else "")
      + describe(args.repeats, args.alpha, args.oversample, args.power_iters)
      + "\n\n" + table(rows) + "\n" + target_line(rows) + "\n\n"
      + common.readme_block("projection_refresh", readme_text(rows))
  )
  common.write(args.out, text)


if __name__ == "__main__":
  main()
