"""Samplers of subspace_jax.projection against independent computations."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from subspace_jax import projection as proj


def _decaying(m, n, seed=0, decay=0.9):
  """A random matrix with singular values decay**i (NumPy, independent)."""
  rng = np.random.default_rng(seed)
  u, _ = np.linalg.qr(rng.standard_normal((m, min(m, n))))
  v, _ = np.linalg.qr(rng.standard_normal((n, min(m, n))))
  s = decay ** np.arange(min(m, n))
  return (u * s) @ v.T, u, s


def test_svd_subspace_spans_numpy_top_vectors():
  g, u, _ = _decaying(40, 60)
  p = np.asarray(proj.svd_subspace(jnp.asarray(g), 5))
  # Same subspace as NumPy's top-5 left singular vectors: P Pᵀ == U₅ U₅ᵀ.
  np.testing.assert_allclose(p @ p.T, u[:, :5] @ u[:, :5].T, atol=1e-4)
  q = np.asarray(proj.svd_subspace(jnp.asarray(g.T), 5, right=True))
  np.testing.assert_allclose(q @ q.T, u[:, :5] @ u[:, :5].T, atol=1e-4)


def test_svd_subspace_bf16_input_runs_in_float32():
  g, u, _ = _decaying(32, 48)
  p = proj.svd_subspace(jnp.asarray(g, jnp.bfloat16), 4)
  assert p.dtype == jnp.float32
  p = np.asarray(p)
  # bf16 rounding of g only perturbs the subspace slightly.
  np.testing.assert_allclose(p @ p.T, u[:, :4] @ u[:, :4].T, atol=5e-2)


@pytest.mark.parametrize("warm", [False, True])
def test_randomized_subspace_captures_99_percent_of_top_energy(warm):
  g, u, s = _decaying(300, 500, decay=0.97)
  r = 20
  exact = np.sum(s[:r] ** 2)  # ‖UᵣᵀG‖² from the construction
  init = None
  if warm:  # the previous subspace: the exact one, slightly perturbed
    rng = np.random.default_rng(1)
    init, _ = np.linalg.qr(u[:, :r] + 0.3 * rng.standard_normal((300, r)) / 17)
    init = jnp.asarray(init, jnp.float32)
  p = proj.randomized_subspace(
      jnp.asarray(g, jnp.float32), r, jax.random.key(0), init=init
  )
  p = np.asarray(p)
  np.testing.assert_allclose(p.T @ p, np.eye(r), atol=1e-4)
  captured = np.sum((p.T @ g) ** 2)
  assert captured >= 0.99 * exact, captured / exact


def test_randomized_subspace_rejects_bad_init_and_rank():
  g = jnp.ones((10, 12))
  with pytest.raises(ValueError, match="init must have shape"):
    proj.randomized_subspace(g, 3, jax.random.key(0), init=jnp.ones((10, 2)))
  with pytest.raises(ValueError, match="rank"):
    proj.randomized_subspace(g, 0, jax.random.key(0))
  with pytest.raises(ValueError, match="rank"):
    proj.svd_subspace(g, 11)


def _samples(sampler, m, r, n_samples, seed=0):
  keys = jax.random.split(jax.random.key(seed), n_samples)
  return np.asarray(jax.vmap(lambda k: sampler(k, m, r))(keys), np.float64)


def test_stiefel_orthonormal():
  p = _samples(proj.stiefel, 50, 7, 16)
  gram = np.einsum("sdr,sdq->srq", p, p)
  np.testing.assert_allclose(gram, np.broadcast_to(np.eye(7), gram.shape), atol=1e-5)


def test_stiefel_is_unbiased():
  """E[PPᵀ] = (r/m) I and E‖PPᵀG − G‖² = (1 − r/m)‖G‖² (GoLore, Lemma 5).

  Tolerances are 5 Monte-Carlo standard errors, estimated from the samples.
  """
  m, r, n_samples = 12, 3, 20000
  p = _samples(proj.stiefel, m, r, n_samples)
  ppt = np.einsum("sdr,ser->sde", p, p)
  mean = ppt.mean(0)
  se = ppt.std(0) / np.sqrt(n_samples)
  assert np.all(np.abs(mean - (r / m) * np.eye(m)) <= 5 * se + 1e-12)

  g = np.random.default_rng(0).standard_normal((m, 9))
  err = np.sum((np.einsum("sde,ek->sdk", ppt, g) - g) ** 2, axis=(1, 2))
  expected = (1 - r / m) * np.sum(g**2)
  assert abs(err.mean() - expected) <= 5 * err.std() / np.sqrt(n_samples)


def test_stiefel_matches_polar_construction_in_distribution():
  """QR-with-signs and the polar factor Z(ZᵀZ)^-1/2 give the same law.

  Compared through the distribution of |P₀₀| (first entry), which is the
  same for both only if they are both Haar: two-sample KS test at 1%.
  """
  m, r, n = 6, 2, 4000
  a = _samples(proj.stiefel, m, r, n, seed=1)[:, 0, 0]
  z = np.random.default_rng(2).standard_normal((n, m, r))
  w, v = np.linalg.eigh(np.einsum("sdr,sdq->srq", z, z))
  inv_sqrt = np.einsum("srk,sk,sqk->srq", v, w**-0.5, v)
  b = np.einsum("sdr,srq->sdq", z, inv_sqrt)[:, 0, 0]
  # Two-sample Kolmogorov-Smirnov statistic vs its 1% critical value.
  xs = np.sort(np.concatenate([a, b]))
  cdf = lambda s: np.searchsorted(np.sort(s), xs, side="right") / len(s)
  ks = np.max(np.abs(cdf(a) - cdf(b)))
  assert ks < 1.63 * np.sqrt(2 / n), ks


def test_scaled_stiefel_gram_and_unbiased():
  m, r, n_samples = 10, 2, 20000
  p = _samples(proj.scaled_stiefel, m, r, n_samples)
  gram = np.einsum("sdr,sdq->srq", p, p)
  np.testing.assert_allclose(gram, np.broadcast_to((m / r) * np.eye(r), gram.shape), rtol=1e-5, atol=1e-5)
  ppt = np.einsum("sdr,ser->sde", p, p)
  se = ppt.std(0) / np.sqrt(n_samples)
  assert np.all(np.abs(ppt.mean(0) - np.eye(m)) <= 5 * se + 1e-12)


def test_captured_energy():
  g, u, s = _decaying(20, 30)
  e = float(proj.captured_energy(jnp.asarray(u[:, :3], jnp.float32), jnp.asarray(g, jnp.float32)))
  np.testing.assert_allclose(e, np.sum(s[:3] ** 2) / np.sum(s**2), rtol=1e-5)


def test_randomized_subspace_signs_follow_the_warm_start():
  g, u, _ = _decaying(60, 40, decay=0.8)
  init = jnp.asarray(-u[:, :4], jnp.float32)  # the exact subspace, negated
  p = np.asarray(proj.randomized_subspace(jnp.asarray(g, jnp.float32), 4, jax.random.key(0), init=init))
  np.testing.assert_allclose(p, np.asarray(init), atol=1e-3)
  # Cold start: the largest entry of every column is positive.
  q = np.asarray(proj.randomized_subspace(jnp.asarray(g, jnp.float32), 4, jax.random.key(1)))
  assert np.all(q[np.argmax(np.abs(q), axis=0), np.arange(4)] > 0)
