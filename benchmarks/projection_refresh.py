"""Projection refresh: full SVD vs the fast randomized subspace.

For each (shape, rank) this times, alternately in one process after a
warm-up, the jitted exact top-r SVD projection and the randomized range
finder (cold and warm-started), and reports the speed ratio and the captured
energy ratio ``‖PᵀG‖² / ‖UᵣᵀG‖²`` of the fast projection.

The test matrix has a power-law spectrum (``s_i = (i + 1)^-alpha``) plus a
small Gaussian floor, like a gradient. Writes a markdown table to
``benchmarks/results/projection_refresh.md``.

Example:
  python benchmarks/projection_refresh.py --shapes 4096x11008 --ranks 512
"""

from __future__ import annotations

import argparse
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import common
from subspace_jax import projection as proj


def test_matrix(m: int, n: int, alpha: float, seed: int = 0) -> jax.Array:
  """``U diag(s) Vᵀ`` with ``min(m, n, 1024)`` power-law terms plus noise."""
  k = min(m, n, 1024)
  ku, kv, kn = jax.random.split(jax.random.key(seed), 3)
  u = jax.random.normal(ku, (m, k)) / np.sqrt(m)
  v = jax.random.normal(kv, (n, k)) / np.sqrt(n)
  s = (1.0 + jnp.arange(k)) ** -alpha
  noise = 1e-3 * jax.random.normal(kn, (m, n)) / np.sqrt(max(m, n))
  return (u * s) @ v.T + noise


def _time(fn, *args):
  t = time.perf_counter()
  jax.block_until_ready(fn(*args))
  return time.perf_counter() - t


def bench(m, n, rank, repeats, alpha, oversample, power_iters):
  g = jax.block_until_ready(test_matrix(m, n, alpha))
  exact = jax.jit(lambda g: proj.svd_subspace(g, rank))
  fast = jax.jit(
      lambda g, k, init: proj.randomized_subspace(
          g, rank, k, init=init, oversample=oversample, power_iters=power_iters
      )
  )
  fast_cold = jax.jit(
      lambda g, k: proj.randomized_subspace(
          g, rank, k, oversample=oversample, power_iters=power_iters
      )
  )
  key = jax.random.key(1)
  # Warm-up (compilation) and the reference subspace.
  p_exact = jax.block_until_ready(exact(g))
  p_cold = jax.block_until_ready(fast_cold(g, key))
  # Warm start: the exact subspace of a perturbed matrix (as at a refresh,
  # where the previous projection came from the previous gradient).
  g_prev = g + 0.3 * jnp.linalg.norm(g) / np.sqrt(m * n) * jax.random.normal(
      jax.random.key(7), g.shape
  )
  init = jax.block_until_ready(exact(g_prev))
  p_warm = jax.block_until_ready(fast(g, key, init))

  t_exact, t_cold, t_warm = [], [], []
  for _ in range(repeats):  # alternate, so drifts hit all three alike
    t_exact.append(_time(exact, g))
    t_cold.append(_time(fast_cold, g, key))
    t_warm.append(_time(fast, g, key, init))
  top = float(jnp.sum(jnp.square(p_exact.T @ g)))
  energy = lambda p: float(jnp.sum(jnp.square(p.T @ g))) / top
  return {
      "shape": f"{m}x{n}",
      "rank": rank,
      "svd_s": min(t_exact),
      "fast_s": min(t_cold),
      "warm_s": min(t_warm),
      "speedup": min(t_exact) / min(t_cold),
      "speedup_warm": min(t_exact) / min(t_warm),
      "energy": energy(p_cold),
      "energy_warm": energy(p_warm),
  }


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--shapes", default="2048x5461,4096x11008",
                      help="comma-separated MxN matrix shapes")
  parser.add_argument("--ranks", default="128,512,1024",
                      help="comma-separated ranks")
  parser.add_argument("--repeats", type=int, default=2,
                      help="timed runs per method (the minimum is reported)")
  parser.add_argument("--alpha", type=float, default=1.0,
                      help="power-law exponent of the test spectrum")
  parser.add_argument("--oversample", type=int, default=8,
                      help="extra sketch columns of the fast method")
  parser.add_argument("--power-iters", type=int, default=2,
                      help="subspace iterations of the fast method")
  parser.add_argument("--out", default=str(common.RESULTS / "projection_refresh.md"),
                      help="markdown table to write")
  args = parser.parse_args(argv)

  rows = []
  for shape in args.shapes.split(","):
    m, n = (int(x) for x in shape.lower().split("x"))
    for rank in (int(r) for r in args.ranks.split(",")):
      if rank >= min(m, n):
        continue
      row = bench(m, n, rank, args.repeats, args.alpha, args.oversample,
                  args.power_iters)
      print(
          f"{row['shape']:>11} r={rank:<5} svd {row['svd_s']:7.2f}s  "
          f"fast {row['fast_s']:6.2f}s ({row['speedup']:5.1f}x, energy "
          f"{row['energy']:.4f})  warm {row['warm_s']:6.2f}s "
          f"({row['speedup_warm']:5.1f}x, energy {row['energy_warm']:.4f})",
          flush=True,
      )
      rows.append(row)

  header = (
      "| shape | rank | full SVD (s) | fast (s) | speed-up | captured energy "
      "| warm fast (s) | speed-up | captured energy |\n"
      "|---|---|---|---|---|---|---|---|---|\n"
  )
  body = "".join(
      f"| {r['shape']} | {r['rank']} | {r['svd_s']:.2f} | {r['fast_s']:.2f} | "
      f"{r['speedup']:.1f}× | {r['energy']:.4f} | {r['warm_s']:.2f} | "
      f"{r['speedup_warm']:.1f}× | {r['energy_warm']:.4f} |\n"
      for r in rows
  )
  text = (
      "# Projection refresh: full SVD vs fast randomized subspace\n\n"
      f"{common.machine_line()}\n\n"
      f"Spectrum s_i = (i+1)^-{args.alpha} (1024 terms) + 1e-3 noise; fast = "
      f"randomized range finder, oversample {args.oversample}, "
      f"{args.power_iters} power iterations; warm = started from the exact "
      "subspace of a perturbed matrix. Captured energy = ‖PᵀG‖² / ‖UᵣᵀG‖². "
      f"Times: minimum of {args.repeats} alternating runs after warm-up.\n\n"
      + header + body
  )
  common.write(args.out, text)


if __name__ == "__main__":
  main()
