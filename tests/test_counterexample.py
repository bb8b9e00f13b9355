"""The seed counter-example: GaLore stalls under gradient noise; GoLore and
RSO converge (GoLore paper, §3)."""

import jax.numpy as jnp
import numpy as np
import optax
import pytest

import subspace_jax as sj
from subspace_jax import counterexample as cx

STEPS, GAP, LR = 50_000, 50, 1e-3


@pytest.fixture(scope="module")
def problem():
  return cx.make_problem(n=10, r=2, sigma=1.2)


def _norms(problem, method, inner):
  core = {
      "galore": lambda: sj.galore(inner, rank=problem.r, update_gap=GAP),
      "golore": lambda: sj.golore(inner, rank=problem.r, update_gap=GAP, seed=0),
      "rso": lambda: sj.rso(inner, rank=problem.r, update_gap=GAP, seed=0),
  }[method]()
  tx = optax.chain(core, optax.scale_by_learning_rate(optax.cosine_decay_schedule(LR, STEPS)))
  return cx.run(problem, tx, STEPS, seed=0)


def test_noise_subspace_dominates_the_gradient(problem):
  """Premise of the example: the top-r singular values are the noise's."""
  g = np.asarray(problem.grad(jnp.zeros((10, 10))) + problem.sigma * problem.c)
  s = np.linalg.svd(g, compute_uv=False)
  assert np.all(s[: problem.r] == pytest.approx(problem.sigma))
  assert s[problem.r] < problem.sigma


@pytest.mark.parametrize("inner_name", ["adam", "sgd_momentum"])
def test_galore_stalls_golore_and_rso_converge(problem, inner_name):
  inner = optax.scale_by_adam() if inner_name == "adam" else optax.trace(decay=0.9)
  initial = float(np.linalg.norm(problem.b))  # ‖∇f(0)‖ = ‖D‖
  galore = _norms(problem, "galore", inner)
  # GaLore only ever moves the noise rows: ‖∇f‖ never falls below 90% of ‖D‖.
  assert galore.min() >= 0.9 * initial
  for method in ("golore", "rso"):
    norms = _norms(problem, method, inner)
    assert np.all(np.isfinite(norms)), method
    final = norms[-1000:].mean()
    # At least 1.5 orders of magnitude below the start (and below GaLore).
    assert final <= initial / 30, (method, final)
    assert galore[-1000:].mean() / final >= 30, (method, final)
