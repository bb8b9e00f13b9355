"""Samplers of rank-r subspaces: pure, jit-able functions.

Every sampler returns an ``(m, r)`` matrix ``P`` whose columns span the
subspace; a gradient ``G`` of shape ``(m, n)`` is projected as ``Pᵀ G``
(``(r, n)``) and an update ``U`` is mapped back as ``P U``.

* :func:`svd_subspace` – the top-r left singular vectors (GaLore).
* :func:`randomized_subspace` – the same subspace, approximately, by a
  randomized range finder with power iterations, optionally warm-started from
  the previous projection (much cheaper than a full SVD for large matrices).
* :func:`stiefel` – a uniform (Haar) sample on the Stiefel manifold St(m, r)
  (GoLore).
* :func:`scaled_stiefel` – ``sqrt(m / r) · stiefel``, so that
  ``PᵀP = (m / r) I`` and ``E[P Pᵀ] = I`` (RSO).

All computation happens in float32 (float64 when a float64 result is asked
for, so that a float64 ``P`` is orthonormal to float64 accuracy); the result
is cast to ``dtype`` (float32 by default).

:data:`SAMPLERS` is the one table of projection kinds the optimizers use: for
each, how ``P`` is made, whether it is kept in the optimizer state or
regenerated from its key, and its Gram factor. A new kind is one entry.
:func:`projection_key` gives the key of one leaf's projection in one
subspace.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "Sampler",
    "SAMPLERS",
    "projection_key",
    "svd_subspace",
    "gram_singular_vectors",
    "randomized_subspace",
    "stiefel",
    "scaled_stiefel",
    "captured_energy",
]


def _check_matrix(g: jax.Array, rank: int) -> None:
  if g.ndim != 2:
    raise ValueError(f"expected a matrix, got shape {g.shape}")
  if not 0 < rank <= g.shape[0]:
    raise ValueError(
        f"rank must be in [1, {g.shape[0]}] for a {g.shape} matrix, got {rank}"
    )


def svd_subspace(
    g: jax.Array, rank: int, *, right: bool = False, dtype=jnp.float32
) -> jax.Array:
  """Top-``rank`` singular vectors of ``g`` by an exact (thin) SVD.

  The algorithm is the backend's: on a CPU or a GPU the library SVD
  (LAPACK, cuSOLVER); on a TPU, whose SVD (QDWH polar decomposition and
  spectral divide and conquer, written in JAX) takes the TPU compiler over
  ten minutes per call, the eigenvectors of the smaller Gram matrix by the
  compiler's own Jacobi solver (:func:`gram_singular_vectors`: seconds to
  compile). Both span the top-``rank`` singular subspace; their signs and
  float32 rounding differ.

  Args:
    g: An ``(m, n)`` matrix, any float dtype (the SVD runs in float32).
    rank: Number of singular vectors, ``1 <= rank <= min(m, n)``.
    right: Return the right singular vectors (``(n, rank)``) instead of the
      left ones (``(m, rank)``). They are taken from the SVD of ``g`` itself,
      not of ``gᵀ``, so their signs are those of ``jnp.linalg.svd(g)``.
    dtype: dtype of the result.

  Returns:
    A matrix with ``rank`` orthonormal columns.
  """
  _check_matrix(g.T if right else g, rank)

  def library(g):
    u, _, vh = jnp.linalg.svd(g, full_matrices=False)
    return vh[:rank].T if right else u[:, :rank]

  def jacobi(g):
    return gram_singular_vectors(g.T if right else g, rank, _jacobi_eigh)

  vecs = jax.lax.platform_dependent(g.astype(jnp.float32), tpu=jacobi,
                                    default=library)
  return vecs.astype(dtype)


def _jacobi_eigh(c: jax.Array) -> tuple[jax.Array, jax.Array]:
  """``(eigenvectors, eigenvalues)`` of a symmetric ``c``, ascending, by
  the Jacobi solver XLA's TPU compiler builds in (one custom call)."""
  return jax.lax.linalg.eigh(
      c, sort_eigenvalues=True,
      implementation=jax.lax.linalg.EighImplementation.JACOBI)


def gram_singular_vectors(a: jax.Array, rank: int, eigh=None) -> jax.Array:
  """Top-``rank`` left singular vectors of ``a`` (``d × k``, float32) from
  the eigendecomposition of its smaller Gram matrix.

  With ``d <= k`` they are the top eigenvectors of ``a aᵀ`` (``d × d``).
  Otherwise ``aᵀ a = V Σ² Vᵀ`` (``k × k``) gives them as ``a V_r Σ_r⁻¹``,
  made orthonormal to float32 accuracy by one CholeskyQR round (it only
  corrects rounding: the columns are orthogonal already). Squaring ``a``
  squares its condition number: a direction whose singular value is below
  about ``3e-4 σ₁`` is found to float32 accuracy relative to ``σ₁²``, not
  ``σ₁``; a gradient of rank below ``rank`` gives a non-finite result
  (which a refresh does not keep). Each column's largest entry is made
  positive.

  Args:
    a: A ``(d, k)`` float32 matrix.
    rank: Number of vectors, ``1 <= rank <= min(d, k)``.
    eigh: ``c -> (vectors, values)``, ascending, of a symmetric matrix
      (default ``jnp.linalg.eigh``; :func:`svd_subspace` passes the TPU's
      Jacobi solver).

  Returns:
    A ``(d, rank)`` matrix with orthonormal columns.
  """
  eigh = eigh or (lambda c: jnp.linalg.eigh(c)[::-1])
  d, k = a.shape
  dot = lambda x, y, dims: jax.lax.dot_general(
      x, y, (dims, ((), ())), precision=_HIGHEST)
  if d <= k:
    vecs, _ = eigh(dot(a, a, ((1,), (1,))))              # a aᵀ
    u = vecs[:, ::-1][:, :rank]
  else:
    vecs, values = eigh(dot(a, a, ((0,), (0,))))         # aᵀ a
    top = vecs[:, ::-1][:, :rank]
    sigma = jnp.sqrt(jnp.maximum(values[::-1][:rank], 0.0))
    u = _cholesky_qr(dot(a, top, ((1,), (0,))) / sigma[None, :], 1)
  peak = jnp.take_along_axis(u, jnp.argmax(jnp.abs(u), axis=0)[None], axis=0)
  return u * jnp.where(peak < 0, -1.0, 1.0)


def _orthonormalize(y: jax.Array) -> jax.Array:
  q, _ = jnp.linalg.qr(y)
  return q


def randomized_subspace(
    g: jax.Array,
    rank: int,
    key: jax.Array,
    *,
    init: jax.Array | None = None,
    oversample: int = 8,
    power_iters: int = 2,
    dtype=jnp.float32,
) -> jax.Array:
  """Approximate top-``rank`` left singular subspace of ``g``.

  A randomized range finder (Halko, Martinsson & Tropp 2011, arXiv 0909.4061,
  Alg. 4.4): ``Q = orth(G Ω)`` for a Gaussian ``Ω`` with ``rank + oversample``
  columns, refined by ``power_iters`` rounds of ``Q ← orth(G orth(Gᵀ Q))``;
  the top ``rank`` directions inside ``span(Q)`` then come from the small
  eigenproblem of ``(QᵀG)(QᵀG)ᵀ``. The cost is a few ``m × n × (r + p)``
  matrix products instead of a full SVD.

  With ``init`` (the previous projection, ``(m, rank)``), the starting block is
  ``[init, G Ω_p]``: the previous subspace plus ``oversample`` random
  directions, which is where a slowly changing gradient subspace is found
  fastest. Each returned column's sign is chosen to agree with ``init``'s
  column (else: its largest entry is positive), so the result does not flip
  with rounding and inner-optimizer moments stay meaningful across refreshes.

  Args:
    g: An ``(m, n)`` matrix, any float dtype (computation in float32).
    rank: Subspace dimension, ``1 <= rank <= m``.
    key: A ``jax.random`` key for the Gaussian test matrix.
    init: Optional ``(m, rank)`` warm start.
    oversample: Extra columns of the sketch (clipped so the sketch has at most
      ``min(m, n)`` columns).
    power_iters: Rounds of subspace iteration (more: more accurate, slower).
    dtype: dtype of the result.

  Returns:
    An ``(m, rank)`` matrix with orthonormal columns.
  """
  _check_matrix(g, rank)
  m, n = g.shape
  g = g.astype(jnp.float32)
  width = max(rank, min(rank + oversample, m, n))
  if init is None:
    omega = jax.random.normal(key, (n, width), jnp.float32)
    y = g @ omega
  else:
    if init.shape != (m, rank):
      raise ValueError(f"init must have shape {(m, rank)}, got {init.shape}")
    extra = width - rank
    omega = jax.random.normal(key, (n, extra), jnp.float32)
    y = jnp.concatenate([init.astype(jnp.float32), g @ omega], axis=1)
  q = _orthonormalize(y)
  for _ in range(power_iters):
    q = _orthonormalize(g @ _orthonormalize(g.T @ q))
  b = q.T @ g  # (width, n)
  # eigh returns ascending eigenvalues: the last `rank` vectors are the top.
  _, vecs = jnp.linalg.eigh(b @ b.T)
  p = q @ vecs[:, ::-1][:, :rank]
  # Eigenvector signs are arbitrary (and flip with rounding); the inner
  # optimizer's moments are not sign-invariant across refreshes. Align each
  # column with the warm start, else make its largest entry positive.
  if init is not None:
    s = jnp.sum(p * init.astype(jnp.float32), axis=0)
  else:
    s = jnp.take_along_axis(p, jnp.argmax(jnp.abs(p), axis=0)[None], axis=0)[0]
  p = p * jnp.where(s < 0, -1.0, 1.0)[None, :]
  return p.astype(dtype)


_HIGHEST = jax.lax.Precision.HIGHEST


# Threefry-2x32 (Salmon et al., "Parallel random numbers: as easy as 1, 2,
# 3", SC 2011): rotation distances of rounds 0-3 and 4-7, key-schedule parity.
_THREEFRY_ROTATIONS = ((13, 15, 26, 6), (17, 29, 16, 24))
_THREEFRY_PARITY = 0x1BD11BDA


def _threefry2x32(k0, k1, x0, x1):
  """Threefry-2x32 with 20 rounds on uint32 arrays: the same bits as
  ``jax.extend.random.threefry_2x32``.

  Written unrolled with array ops, so that XLA fuses the 20 rounds into one
  loop over the elements; JAX's own CPU lowering of the hash keeps the rounds
  in a rolled ``while`` loop, about 1.7× slower.
  """
  ks = (k0, k1, k0 ^ k1 ^ jnp.uint32(_THREEFRY_PARITY))
  x0, x1 = x0 + ks[0], x1 + ks[1]
  for group in range(5):
    for d in _THREEFRY_ROTATIONS[group % 2]:
      x0 = x0 + x1
      x1 = (x1 << jnp.uint32(d)) | (x1 >> jnp.uint32(32 - d))
      x1 = x1 ^ x0
    x0 = x0 + ks[(group + 1) % 3]
    x1 = x1 + ks[(group + 2) % 3] + jnp.uint32(group + 1)
  return x0, x1


def _gaussian(key: jax.Array, m: int, rank: int) -> jax.Array:
  """An ``(m, rank)`` float32 matrix of i.i.d. standard normals from ``key``.

  For a threefry key (JAX's default) the bits are the Threefry-2x32 hashes of
  the counter pairs ``(i, i + m·h)``, ``i < m·h``, ``h = ceil(rank / 2)``, and
  both 32-bit words of each hash are used (the first fills columns ``:h``,
  the second columns ``h:``): half the hashing of ``jax.random.normal``,
  which (with the default partitionable threefry) spends one hash per word.
  Each word's top 23 bits pick the midpoint of one of ``2²³`` equal cells of
  ``(-1, 1)`` (a symmetric grid that never reaches ±1), mapped to a normal by
  ``√2 · erfinv``, as ``jax.random.normal`` does. Other key implementations
  use ``jax.random.normal``.
  """
  if str(jax.random.key_impl(key)) != "threefry2x32":
    return jax.random.normal(key, (m, rank), jnp.float32)
  h = (rank + 1) // 2
  if 2 * m * h >= 2**32:
    raise ValueError(f"{m}×{rank} is too large for 32-bit counters")
  k0, k1 = jax.random.key_data(key)
  count = jax.lax.iota(jnp.uint32, m * h).reshape(m, h)
  bits = jnp.concatenate(
      _threefry2x32(k0, k1, count, count + jnp.uint32(m * h)), axis=1
  )[:, :rank]
  # (2k + 1)·2⁻²³ − 1 for k = top 23 bits: exact in float32.
  u = (bits >> 9).astype(jnp.float32) * (2.0**-22) + (2.0**-23 - 1.0)
  return jnp.float32(np.sqrt(2.0)) * jax.lax.erf_inv(u)


def _cholesky_qr(z: jax.Array, passes: int) -> jax.Array:
  """Q of ``z = QR`` with ``diag(R) > 0`` by ``passes`` rounds of CholeskyQR.

  One round: ``L = chol(ZᵀZ)`` and ``Z ← Z L⁻ᵀ``; ``Lᵀ`` is the ``R`` of the
  QR with a positive diagonal, so the result is that QR's ``Q``. Its loss of
  orthogonality is about ``κ(Z)² · ε``; a second round (CholeskyQR2) brings a
  ``Z`` with ``κ(Z) ≲ ε^-½`` to Householder accuracy. Only matrix products
  and ``r × r`` factorizations: much faster than Householder QR for a tall
  ``Z``.
  """
  for _ in range(passes):
    gram = jax.lax.dot_general(
        z, z, (((0,), (0,)), ((), ())), precision=_HIGHEST
    )
    chol = jnp.linalg.cholesky(gram)
    chol_inv = jax.scipy.linalg.solve_triangular(
        chol, jnp.eye(z.shape[1], dtype=z.dtype), lower=True
    )
    z = jax.lax.dot_general(
        z, chol_inv, (((1,), (1,)), ((), ())), precision=_HIGHEST
    )
  return z


def _householder_q(z: jax.Array) -> jax.Array:
  """Q of ``z = QR`` with ``diag(R) >= 0`` by Householder QR (LAPACK)."""
  q, r = jnp.linalg.qr(z)
  signs = jnp.where(jnp.diagonal(r) < 0, -1.0, 1.0)
  return q * signs[None, :]


def _cholesky_qr_passes(m: int, rank: int) -> int:
  """CholeskyQR rounds that make an ``m × rank`` Gaussian orthonormal to
  float32 accuracy, or 0 where only Householder QR is safe.

  An ``m × r`` Gaussian has ``κ ≈ (√m + √r) / (√m − √r)``: about 3 for
  ``m = 4r`` (one round: ``‖QᵀQ − I‖ ≲ 2e-6``) and 6 for ``m = 2r`` (two
  rounds). Its chance of a far larger ``κ`` falls like ``κ^-(m − r + 1)``,
  so near-square shapes (``m < 2r`` or ``m − r < 8``), whose ``κ`` is large
  and heavy-tailed, take Householder QR.
  """
  if rank == 1:
    return 1  # z / ‖z‖: exact for any m
  if m - rank < 8 or m < 2 * rank:
    return 0
  return 1 if m >= 4 * rank else 2


def stiefel(key: jax.Array, m: int, rank: int, *, dtype=jnp.float32) -> jax.Array:
  """A uniform (Haar) sample from the Stiefel manifold St(m, rank).

  Built as the Q factor of the QR decomposition of a Gaussian ``Z`` (m × r)
  with the signs fixed so that ``R`` has a positive diagonal. This has the
  same distribution as the polar factor ``Z (ZᵀZ)^{-1/2}`` used in the GoLore
  paper: for any orthogonal ``H``, ``HZ`` has the law of ``Z`` and both maps
  satisfy ``f(HZ) = H f(Z)``, so both laws are left-orthogonally invariant,
  and the uniform law is the only such law on St(m, r).

  The Q factor is computed by CholeskyQR (``R = chol(ZᵀZ)ᵀ``, ``Q = Z R⁻¹``,
  once for ``m ≥ 4r``, twice for ``2r ≤ m < 4r``): ``R`` is then exactly the
  positive-diagonal ``R``, so this is the same ``Q`` to float32 rounding
  (``‖QᵀQ − I‖`` about 1e-6, as with Householder QR) at a fraction of the
  cost, since a tall Gaussian is well conditioned. Near-square shapes (``m < 2r`` or
  ``m − r < 8``), whose Gaussian may be ill-conditioned, use Householder QR.
  ``Z`` comes from :func:`_gaussian` (Threefry bits, ``√2 · erfinv``), not
  from ``jax.random.normal``: the same law, different draws.

  Args:
    key: A ``jax.random`` key.
    m: Ambient dimension.
    rank: Number of orthonormal columns, ``1 <= rank <= m``.
    dtype: dtype of the result.

  Returns:
    An ``(m, rank)`` matrix ``P`` with ``PᵀP = I``.
  """
  if not 0 < rank <= m:
    raise ValueError(f"rank must be in [1, {m}], got {rank}")
  with jax.named_scope("stiefel"):  # groups its ops in profiles
    z = _gaussian(key, m, rank).astype(jnp.promote_types(dtype, jnp.float32))
    passes = _cholesky_qr_passes(m, rank)
    q = _cholesky_qr(z, passes) if passes else _householder_q(z)
  return q.astype(dtype)


def scaled_stiefel(
    key: jax.Array, m: int, rank: int, *, dtype=jnp.float32
) -> jax.Array:
  """RSO's random projection: ``sqrt(m / rank)`` times a Stiefel sample.

  ``PᵀP = (m / rank) I`` and ``E[P Pᵀ] = I``, so ``P Pᵀ G`` is an unbiased
  estimate of ``G``.

  Args:
    key: A ``jax.random`` key.
    m: Ambient dimension.
    rank: Number of columns, ``1 <= rank <= m``.
    dtype: dtype of the result.

  Returns:
    An ``(m, rank)`` matrix.
  """
  p = stiefel(key, m, rank, dtype=jnp.promote_types(dtype, jnp.float32))
  return (p * float(np.sqrt(m / rank))).astype(dtype)  # a weak scalar


def captured_energy(p: jax.Array, g: jax.Array) -> jax.Array:
  """Fraction ``‖PᵀG‖² / ‖G‖²`` of ``g``'s energy inside ``span(p)``.

  ``p`` must have orthonormal columns.
  """
  g = g.astype(jnp.float32)
  return jnp.sum(jnp.square(p.astype(jnp.float32).T @ g)) / jnp.sum(
      jnp.square(g)
  )


def projection_key(key: jax.Array, leaf_index, subspace_index) -> jax.Array:
  """The key of one leaf's projection in one subspace (a typed key).

  ``fold_in(fold_in(key, leaf_index), subspace_index)``: the same in
  transform and model mode, so both draw the same projections.
  """
  return jax.random.fold_in(jax.random.fold_in(key, leaf_index), subspace_index)


def _orthonormal_gram(m: int, rank: int) -> float:
  del m, rank
  return 1.0


def _scaled_gram(m: int, rank: int) -> float:
  return m / rank


@dataclasses.dataclass(frozen=True)
class Sampler:
  """How one kind of projection is made.

  Attributes:
    make: ``make(key, m, rank, *, dtype, g=None, init=None, transposed=False,
      **options) -> P`` with ``P`` of shape ``(m, rank)``. ``g`` is the
      ``(m, n)`` gradient matrix (given only to ``stored`` kinds), ``init``
      the previous projection, ``transposed`` whether ``g`` is the transpose
      of the leaf's matrix (so an SVD can take the signs of the untransposed
      one), and ``options`` the sampler's extra settings (``oversample``,
      ``power_iters``); a sampler ignores what it does not use.
    stored: True: ``P`` is a function of the gradient, recomputed at each
      refresh and kept in the optimizer state between refreshes. False:
      ``P`` depends only on ``(key, m, rank)`` and is regenerated from the
      key at every step, never stored (so model mode can use it).
    gram: ``gram(m, rank) -> c`` with ``PᵀP = c·I`` (1 for orthonormal
      columns).
  """

  make: Callable[..., jax.Array]
  stored: bool
  gram: Callable[[int, int], float] = _orthonormal_gram


# Each sampler's ``make`` adapts one function above to the common signature
# ``make(key, m, rank, *, dtype, g=None, init=None, transposed=False)``.


def _make_svd(key, m, rank, *, dtype, g=None, transposed=False, **_):
  del key, m
  if transposed:
    # Right singular vectors of the untransposed matrix: the signs then
    # match optax and the paper's code.
    return svd_subspace(g.T, rank, right=True, dtype=dtype)
  return svd_subspace(g, rank, dtype=dtype)


def _make_randomized(key, m, rank, *, dtype, g=None, init=None,
                     oversample=8, power_iters=2, **_):
  del m
  return randomized_subspace(g, rank, key, init=init, oversample=oversample,
                             power_iters=power_iters, dtype=dtype)


def _make_stiefel(key, m, rank, *, dtype, **_):
  return stiefel(key, m, rank, dtype=dtype)


def _make_scaled_stiefel(key, m, rank, *, dtype, **_):
  return scaled_stiefel(key, m, rank, dtype=dtype)


SAMPLERS: dict[str, Sampler] = {
    # Exact top-r left singular vectors of the gradient.
    "svd": Sampler(_make_svd, stored=True),
    # Fast approximate top-r subspace, warm-started from the previous P.
    "randomized": Sampler(_make_randomized, stored=True),
    # Uniform on St(m, r).
    "stiefel": Sampler(_make_stiefel, stored=False),
    # sqrt(m / r) · stiefel: PᵀP = (m / r) I, E[P Pᵀ] = I.
    "scaled_stiefel": Sampler(_make_scaled_stiefel, stored=False,
                              gram=_scaled_gram),
}
