"""GaLore vs GoLore vs RSO on the noisy quadratic where GaLore stalls.

Runs the three methods (same inner optimizer, seed and step sizes) on the
counter-example of the GoLore paper and prints the true gradient norm along
the way. Needs no data and runs in about half a minute on a laptop CPU.

  python examples/counterexample.py --steps 50000 --inner adam
"""

import argparse
import time

import numpy as np
import optax

import subspace_jax as sj
from subspace_jax import counterexample as cx


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=50_000, help="iterations per method")
  parser.add_argument("--inner", choices=["adam", "sgdm"], default="adam",
                      help="inner optimizer: Adam or SGD with momentum 0.9")
  parser.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (cosine decay)")
  parser.add_argument("--gap", type=int, default=50, help="update_gap of all methods")
  parser.add_argument("--n", type=int, default=10, help="matrix size n")
  parser.add_argument("--rank", type=int, default=2, help="rank r (also the noise rank)")
  parser.add_argument("--sigma", type=float, default=1.2, help="noise level (> 1 makes GaLore stall)")
  parser.add_argument("--seed", type=int, default=0, help="seed of the noise signs and projections")
  args = parser.parse_args(argv)

  problem = cx.make_problem(n=args.n, r=args.rank, sigma=args.sigma)
  inner = optax.scale_by_adam() if args.inner == "adam" else optax.trace(decay=0.9)
  methods = {
      "galore": sj.galore(inner, rank=args.rank, update_gap=args.gap),
      "golore": sj.golore(inner, rank=args.rank, update_gap=args.gap, seed=args.seed),
      "rso": sj.rso(inner, rank=args.rank, update_gap=args.gap, seed=args.seed),
  }
  marks = [0, args.steps // 100, args.steps // 10, args.steps // 2, args.steps - 1]
  print(f"‖∇f‖ at step {marks} (start: {np.linalg.norm(problem.b):.3f})")
  for name, core in methods.items():
    tx = optax.chain(core, optax.scale_by_learning_rate(
        optax.cosine_decay_schedule(args.lr, args.steps)))
    t = time.perf_counter()
    norms = cx.run(problem, tx, args.steps, seed=args.seed)
    print(f"{name:>7}: " + "  ".join(f"{norms[i]:.2e}" for i in marks)
          + f"   ({time.perf_counter() - t:.1f}s)", flush=True)


if __name__ == "__main__":
  main()
