"""The noisy quadratic on which GaLore provably stalls (GoLore paper, §3).

``f(X) = ½‖A X‖² + ⟨B, X⟩`` for ``X ∈ R^{n×n}``, ``A = (I_{n−r} 0)``,
``B = diag(D, 0)``, observed through the stochastic gradient
``∇f(X) + ξ σ C`` with ``C = diag(0, I_r)`` and ``ξ = ±1`` each step.

The noise lives in the last ``r`` rows, where ``f`` does not depend on ``X``.
When ``σ`` exceeds the entries of ``D``, the top-r singular subspace of every
stochastic gradient is the noise subspace, so GaLore only ever moves those
rows and ``‖∇f‖`` stays at ``‖D‖``. A random (GoLore, RSO) projection is
unbiased and keeps making progress; with a decaying step size the gradient
norm falls like an SGD method's.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

__all__ = ["NoisyQuadratic", "make_problem", "run"]


class NoisyQuadratic(NamedTuple):
  """The problem's data: ``n``, ``r``, ``sigma``, ``B`` and ``C``."""

  n: int
  r: int
  sigma: float
  b: jax.Array
  c: jax.Array

  def grad(self, x: jax.Array) -> jax.Array:
    """Exact gradient ``AᵀA X + B`` (the last ``r`` rows of ``AᵀA X`` are 0)."""
    return x.at[self.n - self.r :].set(0.0) + self.b


def make_problem(
    n: int = 10, r: int = 2, sigma: float = 1.2, d_max: float = 1.0
) -> NoisyQuadratic:
  """The counter-example with ``D = diag(linspace(d_max, d_max / 2))``.

  ``sigma > d_max`` makes the noise subspace the top singular subspace.
  """
  if not 0 < r < n:
    raise ValueError(f"need 0 < r < n, got r={r}, n={n}")
  d = jnp.linspace(d_max, d_max / 2, n - r)
  b = jnp.zeros((n, n)).at[: n - r, : n - r].set(jnp.diag(d))
  c = jnp.zeros((n, n)).at[n - r :, n - r :].set(jnp.eye(r))
  return NoisyQuadratic(n, r, sigma, b, c)


def run(
    problem: NoisyQuadratic,
    tx: optax.GradientTransformation,
    steps: int,
    seed: int = 0,
) -> np.ndarray:
  """Runs ``tx`` from ``X = 0`` on noisy gradients; returns ``‖∇f(X_t)‖``.

  The signs ``ξ_t`` come from ``seed``; the whole run is one ``lax.scan``.
  """
  signs = jnp.where(
      jax.random.bernoulli(jax.random.key(seed), 0.5, (steps,)), 1.0, -1.0
  )
  x0 = jnp.zeros((problem.n, problem.n))

  @jax.jit
  def scan(x, state):
    def step(carry, xi):
      x, state = carry
      g = problem.grad(x) + xi * problem.sigma * problem.c
      updates, state = tx.update(g, state, x)
      x = optax.apply_updates(x, updates)
      return (x, state), jnp.linalg.norm(problem.grad(x))

    return jax.lax.scan(step, (x, state), signs)[1]

  return np.asarray(scan(x0, tx.init(x0)))
