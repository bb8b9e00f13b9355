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


@pytest.mark.parametrize("m, n", [(40, 60), (60, 40)], ids=["d<k", "d>k"])
def test_gram_singular_vectors_span_numpy_top_vectors(m, n):
  """The TPU's exact refresh (eigenvectors of the smaller Gram matrix; here
  with the CPU's eigh in place of the TPU's Jacobi solver) against NumPy's
  float64 SVD: the same top-5 subspace, orthonormal columns, each column's
  largest entry positive. Tolerance 1e-4: float32 eigenvectors of a Gram
  matrix whose top singular values are 0.8**i apart."""
  g, u, _ = _decaying(m, n, decay=0.8)
  p = np.asarray(proj.gram_singular_vectors(jnp.asarray(g, jnp.float32), 5))
  np.testing.assert_allclose(p @ p.T, u[:, :5] @ u[:, :5].T, atol=1e-4)
  np.testing.assert_allclose(p.T @ p, np.eye(5), atol=1e-5)
  # Column by column, the singular vectors themselves (up to sign).
  np.testing.assert_allclose(np.abs(p.T @ u[:, :5]), np.eye(5), atol=1e-4)
  peak = p[np.argmax(np.abs(p), axis=0), np.arange(5)]
  assert np.all(peak > 0)


def test_exact_svd_takes_the_jacobi_solver_only_on_a_tpu():
  """The TPU branch of the exact refresh is the Gram matrix's Jacobi eigh
  (one custom call); the CPU's is LAPACK's SVD."""
  g = jax.ShapeDtypeStruct((12, 8), jnp.float32)
  lowered = jax.jit(lambda g: proj.svd_subspace(g, 3)).lower(g)
  text = lowered.as_text()
  assert "lapack" in text.lower() or "svd" in text.lower()
  assert "Eigh" not in text
  jaxpr = str(jax.make_jaxpr(lambda g: proj.svd_subspace(g, 3))(g))
  assert "JACOBI" in jaxpr.upper() and "platform_index" in jaxpr


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


# --- The Stiefel sampler's parts: Gaussian draws and the Q factor. ---------

# (m, r) covering every path of stiefel: one CholeskyQR round (m >= 4r),
# two rounds (2r <= m < 4r), Householder QR (near-square), and rank 1.
_STIEFEL_SHAPES = [(512, 128), (1376, 128), (64, 16), (256, 128), (48, 20),
                   (40, 32), (64, 64), (9, 2), (7, 1), (1, 1)]


def _np_haar_q(z):
  """Q of z = QR with diag(R) > 0, by NumPy's float64 Householder QR."""
  q, r = np.linalg.qr(np.asarray(z, np.float64))
  return q * np.where(np.diag(r) < 0, -1.0, 1.0)[None, :]


def test_gaussian_is_standard_normal():
  z = np.asarray(proj._gaussian(jax.random.key(0), 1000, 301), np.float64)
  assert z.shape == (1000, 301) and np.all(np.isfinite(z))
  x = z.ravel()
  n = x.size
  assert abs(x.mean()) < 5 / np.sqrt(n)
  assert abs(x.var() - 1) < 5 * np.sqrt(2 / n)
  assert abs(np.mean(x**4) - 3) < 5 * np.sqrt(96 / n)
  # Kolmogorov-Smirnov distance to the normal CDF (1% critical value).
  from math import erf, sqrt
  xs = np.sort(x[:20000])
  cdf = np.array([0.5 * (1 + erf(v / sqrt(2))) for v in xs])
  ks = np.max(np.abs(cdf - np.arange(1, xs.size + 1) / xs.size))
  assert ks < 1.63 / np.sqrt(xs.size), ks
  # The two words of each hash fill column j and column j + ceil(r/2): they
  # must be uncorrelated, as must different keys' draws.
  h = (301 + 1) // 2
  corr = np.corrcoef(z[:, :150].ravel(), z[:, h:h + 150].ravel())[0, 1]
  assert abs(corr) < 5 / np.sqrt(150_000), corr
  z2 = np.asarray(proj._gaussian(jax.random.key(1), 1000, 301), np.float64)
  assert abs(np.corrcoef(x, z2.ravel())[0, 1]) < 5 / np.sqrt(n)


def test_gaussian_is_a_function_of_the_key():
  k = jax.random.fold_in(jax.random.key(3), 7)
  a = proj._gaussian(k, 30, 5)
  np.testing.assert_array_equal(a, jax.jit(proj._gaussian, static_argnums=(1, 2))(k, 30, 5))
  assert not np.allclose(a, proj._gaussian(jax.random.fold_in(k, 1), 30, 5))
  # Other key implementations fall back to jax.random.normal.
  rbg = jax.random.key(0, impl="rbg")
  np.testing.assert_array_equal(
      proj._gaussian(rbg, 30, 5), jax.random.normal(rbg, (30, 5), jnp.float32))


@pytest.mark.parametrize("m,r", _STIEFEL_SHAPES)
def test_stiefel_is_orthonormal_and_the_qr_of_its_gaussian(m, r):
  """Every path returns the positive-diagonal QR's Q of the same Gaussian."""
  for seed in range(3):
    key = jax.random.fold_in(jax.random.key(seed), m * 1000 + r)
    p = np.asarray(jax.jit(proj.stiefel, static_argnums=(1, 2))(key, m, r), np.float64)
    assert p.shape == (m, r)
    np.testing.assert_allclose(p.T @ p, np.eye(r), atol=1e-5)
    np.testing.assert_allclose(p, _np_haar_q(proj._gaussian(key, m, r)), atol=1e-5)


def test_cholesky_qr_rounds_by_shape():
  passes = proj._cholesky_qr_passes
  assert passes(512, 128) == 1 and passes(1376, 128) == 1
  assert passes(256, 128) == 2 and passes(300, 128) == 2
  for m, r in [(128, 128), (129, 128), (255, 128), (40, 32), (9, 2), (2, 2)]:
    assert passes(m, r) == 0, (m, r)  # Householder QR
  assert passes(1, 1) == 1 and passes(10**4, 1) == 1


def test_near_square_stiefel_survives_ill_conditioned_gaussians():
  """The Householder fallback: a near-square Gaussian can be so badly
  conditioned that CholeskyQR, even two rounds, loses orthogonality."""
  m = r = 16
  keys = jax.random.split(jax.random.key(11), 20000)
  z = np.asarray(jax.vmap(lambda k: proj._gaussian(k, m, r))(keys), np.float64)
  conds = np.linalg.cond(z)
  worst = np.argsort(conds)[::-1][:3]
  assert conds[worst[0]] > 1e6  # the square Gaussian's heavy tail
  broken = 0
  for i in worst:
    cq2 = np.asarray(proj._cholesky_qr(jnp.asarray(z[i], jnp.float32), 2), np.float64)
    broken += not np.allclose(cq2.T @ cq2, np.eye(r), atol=1e-5)
    p = np.asarray(proj.stiefel(keys[i], m, r), np.float64)
    np.testing.assert_allclose(p.T @ p, np.eye(r), atol=1e-5)
    # The same computation as the fallback's (an ill-conditioned Z's Q is
    # only defined to about cond(Z)·eps, so no float64 reference here).
    hq = proj._householder_q(jnp.asarray(z[i], jnp.float32))
    np.testing.assert_allclose(p, np.asarray(hq), atol=1e-6)
  assert broken  # so CholeskyQR here would fail this test


def test_cholesky_qr_matches_householder_on_tall_gaussians():
  for (m, r), rounds in [((512, 128), 1), ((200, 100), 2), ((4096, 512), 1)]:
    z = proj._gaussian(jax.random.key(m + r), m, r)
    q = np.asarray(proj._cholesky_qr(z, rounds), np.float64)
    np.testing.assert_allclose(q.T @ q, np.eye(r), atol=1e-5)
    np.testing.assert_allclose(q, _np_haar_q(z), atol=1e-5)
    np.testing.assert_allclose(q, np.asarray(proj._householder_q(z)), atol=1e-5)


def test_stiefel_other_keys_and_dtype():
  for key in (jax.random.PRNGKey(0), jax.random.key(0, impl="rbg")):
    p = np.asarray(proj.stiefel(key, 40, 6), np.float64)
    np.testing.assert_allclose(p.T @ p, np.eye(6), atol=1e-5)
  p = proj.stiefel(jax.random.key(0), 40, 6, dtype=jnp.bfloat16)
  assert p.dtype == jnp.bfloat16
  np.testing.assert_allclose(
      np.asarray(p, np.float32), proj.stiefel(jax.random.key(0), 40, 6), atol=1e-2)
  with pytest.raises(ValueError, match="rank"):
    proj.stiefel(jax.random.key(0), 4, 5)


def test_threefry_matches_jax():
  from jax.extend.random import threefry_2x32
  for seed, n in [(0, 10), (123, 4096), (2**31 + 5, 6)]:
    kd = jax.random.key_data(jax.random.key(seed))
    count = jnp.arange(2 * n, dtype=jnp.uint32)
    a, b = proj._threefry2x32(kd[0], kd[1], count[:n], count[n:])
    np.testing.assert_array_equal(
        np.concatenate([a, b]), np.asarray(threefry_2x32(kd, count)))
  # _gaussian's bits are those hashes: column j and j + h of row i come from
  # the counter pair (i·h + j, m·h + i·h + j).
  key = jax.random.key(5)
  m, r = 6, 5
  h = 3
  count = jnp.arange(2 * m * h, dtype=jnp.uint32)
  bits = np.asarray(threefry_2x32(jax.random.key_data(key), count)).reshape(2, m, h)
  bits = np.concatenate([bits[0], bits[1]], axis=1)[:, :r]
  u = ((bits >> 9).astype(np.float64) * 2 + 1) * 2.0**-23 - 1
  np.testing.assert_allclose(
      proj._gaussian(key, m, r), np.sqrt(2) * _np_erfinv(u), rtol=2e-5, atol=2e-6)


def _np_erfinv(u):
  """erf⁻¹ by Newton's method on math.erf (float64, independent of JAX)."""
  from math import erf, exp, pi, sqrt
  out = []
  for v in np.ravel(u):
    x = 0.0
    for _ in range(100):
      step = (erf(x) - v) / (2 / sqrt(pi) * exp(-x * x))
      x -= step
      if abs(step) < 1e-15:
        break
    out.append(x)
  return np.reshape(out, np.shape(u))
