"""GaLore, GoLore and RSO as composable ``optax.GradientTransformation``\\ s.

One generic transform, :func:`scale_by_subspace`, does the work: for every
projected leaf (see :mod:`subspace_jax.matrix_view`) it maps the gradient
``G`` (``d × k`` after the view) to ``R = Pᵀ G`` (``r × k``), hands the
projected gradients to an inner gradient-scaling transformation (Adam by
default), and maps the inner update ``U`` back to ``scale · P U``. Leaves
that are not projected go to the inner transformation in full. The three
public constructors only choose how ``P`` is made and what happens when it
changes:

=========  ==========================================  ====================
method     projection                                  inner state at a new P
=========  ==========================================  ====================
galore     top-r singular vectors of the gradient      kept
golore     uniform on the Stiefel manifold             kept
rso        ``sqrt(d/r)`` × uniform Stiefel             reset (new subproblem)
=========  ==========================================  ====================

Random projections are never stored: they are regenerated at every step from
``fold_in(fold_in(key, leaf_index), subspace_index)`` where
``subspace_index = count // update_gap``; a GoLore/RSO state therefore holds
a key and a counter instead of an ``m × r`` matrix per leaf.

Learning rate and weight decay are chained after, in full space::

  tx = optax.chain(
      sj.golore(rank=128, update_gap=200),
      optax.add_decayed_weights(0.1),
      optax.scale_by_learning_rate(optax.cosine_decay_schedule(1e-3, 10_000)),
  )
"""

from __future__ import annotations

from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

from subspace_jax import matrix_view as mv
from subspace_jax import projection as proj

__all__ = [
    "SubspaceState",
    "scale_by_subspace",
    "galore",
    "golore",
    "rso",
    "PROJECTIONS",
    "leaf_plans",
    "projection_key",
    "random_projection",
]

# How a projection is made.
#   svd:            exact top-r left singular vectors (stored in the state)
#   randomized:     fast approximate top-r subspace, warm-started (stored)
#   stiefel:        uniform on St(d, r), regenerated from the key
#   scaled_stiefel: sqrt(d / r) * stiefel, regenerated from the key
PROJECTIONS = ("svd", "randomized", "stiefel", "scaled_stiefel")
_RANDOM = ("stiefel", "scaled_stiefel")
# Subspace index of the initial projection (count // update_gap never is).
_INIT_SUBSPACE = 2**32 - 1

_MASKED = optax.MaskedNode


class SubspaceState(NamedTuple):
  """State of :func:`scale_by_subspace`.

  Every field but ``count`` and ``key`` is a pytree with the structure of the
  parameters, holding ``optax.MaskedNode()`` where a leaf has no entry.

  Attributes:
    count: Number of updates taken (int32). The current subspace is
      ``count // update_gap``.
    key: Raw ``uint32`` data of the projection key (from ``seed``).
    projections: Stored projections ``batch + (d, r)`` of the projected
      leaves, only for SVD-based projections (GaLore, GoLore's SVD phase).
    anchors: ``Pᵀ X`` at the start of the current subproblem (float32 at
      least, ``batch + (r, k)``), only for RSO's proximal term; with it the
      subproblem variable is ``B = (PᵀP)⁻¹ (PᵀX − anchor)`` and no full-size
      copy of the weights is kept.
    inner_low: Inner state over the projected gradients (``batch + (r, k)``).
    inner_full: Inner state over the leaves that are not projected.
  """

  count: jax.Array
  key: jax.Array
  projections: Any
  anchors: Any
  inner_low: Any
  inner_full: Any


def leaf_plans(
    tree, *, rank: int, side: str = "lean", views: Optional[mv.ViewFn] = None
) -> tuple[list[Optional[mv.LeafPlan]], Any]:
  """The :class:`~subspace_jax.matrix_view.LeafPlan` of every leaf of ``tree``.

  Returns:
    ``(plans, treedef)``: one plan (or None for a full leaf) per leaf, in
    ``jax.tree.flatten`` order, and the tree structure.
  """
  view_fn = views or mv.default_view
  with_path, treedef = jax.tree_util.tree_flatten_with_path(tree)
  plans = [mv.plan_leaf(p, x, view_fn, rank, side) for p, x in with_path]
  return plans, treedef


def projection_key(key: jax.Array, leaf_index, subspace_index) -> jax.Array:
  """The key of one leaf's projection in one subspace (a typed key)."""
  return jax.random.fold_in(jax.random.fold_in(key, leaf_index), subspace_index)


def _over_batch(fn, plan: mv.LeafPlan, g, old, key):
  """``fn(g, old, key)`` on each matrix of a stacked leaf, one key each.

  The matrices are done one after another (``lax.map``), not batched: an SVD
  already uses the whole machine, one at a time needs one workspace, and a
  batched LAPACK SVD inside the refresh ``cond`` was seen to hang a
  multi-device CPU train step (jax 0.10).
  """
  if not plan.batch_shape:
    return fn(g, old, key)
  nb = plan.num_matrices
  flat = lambda a: a.reshape((nb,) + a.shape[len(plan.batch_shape):])
  out = jax.lax.map(lambda a: fn(*a), (flat(g), flat(old), jax.random.split(key, nb)))
  return out.reshape(plan.batch_shape + out.shape[1:])


def random_projection(
    key: jax.Array, plan: mv.LeafPlan, kind: str, dtype=jnp.float32
) -> jax.Array:
  """The random projection ``batch + (d, r)`` of a leaf, from its key.

  Each matrix of a stacked leaf gets its own key (``jax.random.split``).
  """
  sampler = {"stiefel": proj.stiefel, "scaled_stiefel": proj.scaled_stiefel}[
      kind
  ]
  one = lambda k: sampler(k, plan.dim, plan.rank, dtype=dtype)
  if not plan.batch_shape:
    return one(key)
  keys = jax.random.split(key, plan.num_matrices)
  out = jax.vmap(one)(keys)
  return out.reshape(plan.projection_shape)


def _check_positive_int(name: str, value, *, allow_zero: bool = False) -> None:
  if not isinstance(value, int) or isinstance(value, bool):
    raise TypeError(
        f"{name} must be a Python int, got {type(value).__name__}; it fixes "
        "array shapes or the schedule, so it cannot be traced (with "
        f"optax.inject_hyperparams, list {name!r} in static_args)."
    )
  if value < 0 or (value == 0 and not allow_zero):
    bound = ">= 0" if allow_zero else "> 0"
    raise ValueError(f"{name} must be {bound}, got {value}")


_PARAMS_ERROR = """\
the inner transformation needs `params` (as optax.adamw, lamb or lars do), but \
it runs on projected r×k gradients that have no parameters. Pass a \
gradient-only inner transform and chain weight decay and the learning rate \
after, in full space:

  optax.chain(
      sj.{name}(optax.scale_by_adam(), rank=...),
      optax.add_decayed_weights(weight_decay),
      optax.scale_by_learning_rate(learning_rate),
  )"""


def scale_by_subspace(
    inner: Optional[optax.GradientTransformation] = None,
    *,
    rank: int,
    update_gap: int = 200,
    scale: float | jax.Array = 1.0,
    projection: str = "svd",
    svd_steps: int = 0,
    reset_inner: bool = False,
    eta: float | jax.Array | None = None,
    seed: int = 0,
    side: str = "lean",
    views: Optional[mv.ViewFn] = None,
    moment_dtype: Any = None,
    oversample: int = 8,
    power_iters: int = 2,
    name: str = "scale_by_subspace",
) -> optax.GradientTransformation:
  """Runs ``inner`` on rank-``rank`` projections of the matrix gradients.

  The generic transform behind :func:`galore`, :func:`golore` and
  :func:`rso`; see those for the algorithms.

  Args:
    inner: Gradient-scaling transformation run on the projected gradients of
      matrix leaves and on the full gradients of the other leaves (separately,
      so a global-norm inside ``inner`` sees each group alone). It must not
      need ``params``. Default: ``optax.scale_by_adam()``.
    rank: Target rank ``r``; clipped to ``min(rows, cols)`` of each matrix.
    update_gap: Steps between projection changes (``count % update_gap == 0``
      starts a new subspace).
    scale: Factor on the back-projected update (GaLore's alpha).
    projection: One of :data:`PROJECTIONS`.
    svd_steps: With a random ``projection``, use exact SVD projections for
      steps ``< svd_steps`` first (GoLore@x%: ``svd_steps = (1 - x) T``).
    reset_inner: Re-initialize the inner state of the projected leaves
      whenever the subspace changes (RSO's fresh subproblem).
    eta: Proximal coefficient: adds ``B / eta`` to the projected gradient,
      where ``B`` is the displacement since the subspace last changed, in
      subspace coordinates. Needs ``params`` in ``update``. None: off.
    seed: Seed of the projection key.
    side: Side rule, one of ``"lean"``, ``"std"``, ``"left"``, ``"right"``
      (see :mod:`subspace_jax.matrix_view`).
    views: ``(path, leaf) -> MatrixView | None`` choosing projected leaves
      and their matrix views; default :func:`~subspace_jax.default_view`.
    moment_dtype: dtype of the projected gradients (so of the inner moments
      and of stored projections). None: each gradient's own dtype.
    oversample: Extra sketch columns of the ``"randomized"`` projection.
    power_iters: Subspace iterations of the ``"randomized"`` projection.
    name: Name used in error messages.

  Returns:
    An ``optax.GradientTransformation`` whose state is a
    :class:`SubspaceState`.
  """
  _check_positive_int("rank", rank)
  _check_positive_int("update_gap", update_gap)
  _check_positive_int("svd_steps", svd_steps, allow_zero=True)
  _check_positive_int("seed", seed, allow_zero=True)
  if projection not in PROJECTIONS:
    raise ValueError(f"projection must be one of {PROJECTIONS}, got {projection!r}")
  if side not in mv.SIDES:
    raise ValueError(f"side must be one of {mv.SIDES}, got {side!r}")
  if svd_steps and projection not in _RANDOM:
    raise ValueError("svd_steps only applies to a random projection")
  if eta is not None and not isinstance(eta, jax.Array) and not eta > 0:
    raise ValueError(f"eta must be > 0 (or None to turn it off), got {eta}")
  if inner is None:
    inner = optax.scale_by_adam()
  stores_projection = projection not in _RANDOM or svd_steps > 0

  def plans_of(tree):
    return leaf_plans(tree, rank=rank, side=side, views=views)

  def low_dtype(leaf):
    return jnp.dtype(moment_dtype) if moment_dtype is not None else leaf.dtype

  def split(leaves, plans, treedef, low):
    """Two trees: projected leaves (from ``low``) and full leaves."""
    lows = [l if p is not None else _MASKED() for l, p in zip(low, plans)]
    fulls = [_MASKED() if p is not None else x for x, p in zip(leaves, plans)]
    return treedef.unflatten(lows), treedef.unflatten(fulls)

  def init_fn(params):
    leaves = jax.tree.leaves(params)
    plans, treedef = plans_of(params)
    key = jax.random.key(seed)
    zeros_low = [
        jnp.zeros(p.low_shape, low_dtype(x)) if p is not None else None
        for x, p in zip(leaves, plans)
    ]
    low_tree, full_tree = split(leaves, plans, treedef, zeros_low)
    inner_low = inner.init(low_tree)
    try:
      jax.eval_shape(lambda t, s: inner.update(t, s, None), low_tree, inner_low)
    except (ValueError, TypeError) as e:
      if "param" not in str(e).lower():
        raise
      raise ValueError(_PARAMS_ERROR.format(name=name)) from e

    projections = []
    for i, (x, p) in enumerate(zip(leaves, plans)):
      if p is None or not stores_projection:
        projections.append(_MASKED())
      else:
        # A random orthonormal start: the first step replaces it; it is what
        # stays if that step's gradient is not finite, and the warm start of
        # the randomized SVD.
        k = projection_key(key, i, _INIT_SUBSPACE)
        projections.append(random_projection(k, p, "stiefel", low_dtype(x)))
    anchors = [
        jnp.zeros(p.low_shape, jnp.promote_types(x.dtype, jnp.float32))
        if (p is not None and eta is not None)
        else _MASKED()
        for x, p in zip(leaves, plans)
    ]
    return SubspaceState(
        count=jnp.zeros([], jnp.int32),
        key=jax.random.key_data(key),
        projections=treedef.unflatten(projections),
        anchors=treedef.unflatten(anchors),
        inner_low=inner_low,
        inner_full=inner.init(full_tree),
    )

  def stored_projection(i, plan, g, old, key, count, refresh):
    """New stored projection: recomputed at a refresh, else ``old``."""
    dtype = old.dtype

    def exact(g, old, k):
      # For a projected column space, take the right singular vectors of the
      # untransposed matrix (the signs then match optax and the paper's code).
      if plan.transpose:
        return proj.svd_subspace(g.T, plan.rank, right=True, dtype=dtype)
      return proj.svd_subspace(g, plan.rank, dtype=dtype)

    def randomized(g, old, k):
      return proj.randomized_subspace(
          g, plan.rank, k, init=old, oversample=oversample,
          power_iters=power_iters, dtype=dtype,
      )

    def recompute():
      k = projection_key(key, i, count // update_gap)
      if projection == "svd":
        new = _over_batch(exact, plan, g, old, k)
      elif projection == "randomized":
        new = _over_batch(randomized, plan, g, old, k)
      else:  # random projection after an SVD phase (GoLore@x%)
        new = jax.lax.cond(
            count < svd_steps,
            lambda: _over_batch(exact, plan, g, old, k),
            lambda: random_projection(k, plan, projection, dtype),
        )
      # A non-finite gradient must not leave a NaN projection for the next
      # update_gap steps: keep the previous one instead.
      ok = jnp.all(jnp.isfinite(new))
      return jnp.where(ok, new, old)

    return jax.lax.cond(refresh, recompute, lambda: old)

  def update_fn(updates, state, params=None):
    if eta is not None and params is None:
      raise ValueError(f"{name} with eta needs `params` in update()")
    leaves = jax.tree.leaves(updates)
    plans, treedef = plans_of(updates)
    count = state.count
    refresh = count % update_gap == 0
    subspace = count // update_gap
    key = jax.random.wrap_key_data(state.key)
    old_projections = treedef.flatten_up_to(state.projections)
    old_anchors = treedef.flatten_up_to(state.anchors)
    param_leaves = jax.tree.leaves(params) if eta is not None else None

    projections, anchors, lows, new_projections = [], [], [], []
    for i, (g, plan) in enumerate(zip(leaves, plans)):
      if plan is None:
        projections.append(None)
        lows.append(None)
        new_projections.append(_MASKED())
        anchors.append(_MASKED())
        continue
      gm = plan.to_matrix(g)
      dtype = low_dtype(g)
      if stores_projection:
        p = stored_projection(
            i, plan, gm, old_projections[i], key, count, refresh
        )
        new_projections.append(p)
      else:
        p = random_projection(
            projection_key(key, i, subspace), plan, projection, dtype
        )
        new_projections.append(_MASKED())
      projections.append(p)
      # Accumulate in float32 at least (float64 stays float64).
      acc = jnp.promote_types(g.dtype, jnp.float32)
      low = jnp.einsum("...dr,...dk->...rk", p, gm, preferred_element_type=acc)
      if eta is not None:
        xm = plan.to_matrix(param_leaves[i])
        ptx = jnp.einsum(
            "...dr,...dk->...rk", p, xm,
            preferred_element_type=old_anchors[i].dtype,
        )
        anchor = jnp.where(refresh, ptx, old_anchors[i])
        # B = (PᵀP)⁻¹ Pᵀ(X − X₀); PᵀP = (d/r)·I for scaled projections.
        gram = plan.dim / plan.rank if projection == "scaled_stiefel" else 1.0
        low = low + (ptx - anchor) / (gram * eta)
        anchors.append(anchor)
      else:
        anchors.append(_MASKED())
      lows.append(low.astype(dtype))

    low_tree, full_tree = split(leaves, plans, treedef, lows)
    inner_low = state.inner_low
    if reset_inner:
      fresh = inner.init(low_tree)
      inner_low = jax.tree.map(
          lambda f, o: jnp.where(refresh, f, o), fresh, inner_low
      )
    low_updates, inner_low = inner.update(low_tree, inner_low, None)
    full_updates, inner_full = inner.update(full_tree, state.inner_full, None)

    out = []
    for g, plan, p, u, f in zip(
        leaves, plans, projections, treedef.flatten_up_to(low_updates),
        treedef.flatten_up_to(full_updates),
    ):
      if plan is None:
        out.append(f)
        continue
      acc = jnp.promote_types(g.dtype, jnp.float32)
      back = jnp.einsum("...dr,...rk->...dk", p, u, preferred_element_type=acc)
      out.append((scale * plan.from_matrix(back)).astype(g.dtype))

    new_state = SubspaceState(
        count=optax.safe_int32_increment(count),
        key=state.key,
        projections=treedef.unflatten(new_projections),
        anchors=treedef.unflatten(anchors),
        inner_low=inner_low,
        inner_full=inner_full,
    )
    return treedef.unflatten(out), new_state

  return optax.GradientTransformation(init_fn, update_fn)


def galore(
    inner: Optional[optax.GradientTransformation] = None,
    *,
    rank: int,
    update_gap: int = 200,
    scale: float | jax.Array = 1.0,
    side: str = "lean",
    svd: str = "exact",
    views: Optional[mv.ViewFn] = None,
    moment_dtype: Any = None,
    seed: int = 0,
    oversample: int = 8,
    power_iters: int = 2,
) -> optax.GradientTransformation:
  """GaLore: the inner optimizer runs on the top-r singular subspace.

  Every ``update_gap`` steps the projection of each matrix leaf becomes the
  top-``rank`` singular vectors of its current gradient (stored in the state);
  the inner state is kept across changes, as the official code does.

  Example:
    >>> import jax.numpy as jnp, optax, subspace_jax as sj
    >>> tx = optax.chain(sj.galore(rank=2, update_gap=10),
    ...                  optax.scale_by_learning_rate(1e-2))
    >>> params = {"w": jnp.ones((8, 4)), "b": jnp.zeros(4)}
    >>> state = tx.init(params)
    >>> updates, state = tx.update(params, state)
    >>> updates["w"].shape
    (8, 4)

  Args:
    inner: Gradient-scaling transform in the subspace (default
      ``optax.scale_by_adam()``); must not need ``params``.
    rank: Subspace rank (clipped to each matrix).
    update_gap: Steps between SVDs.
    scale: Factor on the back-projected update (the paper's alpha).
    side: ``"lean"`` (default; project the larger dimension, as
      ``optax.contrib.scale_by_galore``), ``"std"`` (the paper's rule),
      ``"left"`` or ``"right"``.
    svd: ``"exact"`` (full SVD in float32) or ``"randomized"`` (a fast
      warm-started range finder: a few matrix products instead of an SVD).
    views: Which leaves are projected and how (see ``views_by_path``).
    moment_dtype: dtype of projected gradients, inner moments and stored
      projections (None: the gradient's dtype).
    seed: Seed for the randomized SVD and the initial projection.
    oversample: Extra columns of the randomized sketch.
    power_iters: Power iterations of the randomized SVD.

  References:
    Zhao et al., GaLore: Memory-Efficient LLM Training by Gradient Low-Rank
    Projection, ICML 2024, arXiv 2403.03507.
  """
  if svd not in ("exact", "randomized"):
    raise ValueError(f"svd must be 'exact' or 'randomized', got {svd!r}")
  return scale_by_subspace(
      inner, rank=rank, update_gap=update_gap, scale=scale,
      projection="svd" if svd == "exact" else "randomized", side=side,
      views=views, moment_dtype=moment_dtype, seed=seed,
      oversample=oversample, power_iters=power_iters, name="galore",
  )


def golore(
    inner: Optional[optax.GradientTransformation] = None,
    *,
    rank: int,
    update_gap: int = 200,
    scale: float | jax.Array = 1.0,
    seed: int = 0,
    svd_steps: int = 0,
    side: str = "lean",
    views: Optional[mv.ViewFn] = None,
    moment_dtype: Any = None,
) -> optax.GradientTransformation:
  """GoLore: the subspace is sampled uniformly on the Stiefel manifold.

  The random projection is unbiased (``E[P Pᵀ] = (r/d) I``), which makes the
  method converge under gradient noise where GaLore's SVD locks onto the
  noise. Projections are regenerated from ``(seed, leaf, subspace index)``,
  never stored, except in the SVD phase of GoLore@x% (``svd_steps > 0``),
  which keeps one per leaf like GaLore. The inner state is kept across
  changes.

  Example:
    >>> import jax, jax.numpy as jnp, optax, subspace_jax as sj
    >>> tx = optax.chain(sj.golore(rank=2, update_gap=10, seed=0),
    ...                  optax.scale_by_learning_rate(1e-2))
    >>> params = {"w": jnp.ones((8, 4))}
    >>> updates, state = tx.update(params, tx.init(params))

  Args:
    inner: Gradient-scaling transform in the subspace (default Adam).
    rank: Subspace rank (clipped to each matrix).
    update_gap: Steps between new samples.
    scale: Factor on the back-projected update.
    seed: Seed of the projections.
    svd_steps: Use GaLore's SVD projection for steps ``< svd_steps`` first
      (GoLore@x% with ``T`` steps: ``svd_steps = (1 - x) T``).
    side: Side rule (see :func:`galore`).
    views: Which leaves are projected and how.
    moment_dtype: dtype of projected gradients and inner moments.

  References:
    He, Li, Hu, Chen, Yuan, Subspace Optimization for Large Language Models
    with Convergence Guarantees, ICML 2025, arXiv 2410.11289.
  """
  return scale_by_subspace(
      inner, rank=rank, update_gap=update_gap, scale=scale,
      projection="stiefel", svd_steps=svd_steps, seed=seed, side=side,
      views=views, moment_dtype=moment_dtype, name="golore",
  )


def rso(
    inner: Optional[optax.GradientTransformation] = None,
    *,
    rank: int,
    update_gap: int = 200,
    scale: float | jax.Array = 1.0,
    seed: int = 0,
    eta: float | jax.Array | None = None,
    side: str = "lean",
    views: Optional[mv.ViewFn] = None,
    moment_dtype: Any = None,
) -> optax.GradientTransformation:
  """RSO: a sequence of random rank-r subproblems ``min_B f(X + P B)``.

  Each block of ``update_gap`` steps optimizes ``B`` (``r × k``) from ``B = 0``
  with a fresh inner state, for a new random ``P`` with ``PᵀP = (d/r) I``
  (so ``E[P Pᵀ] = I``); the update applied to the weights is ``P ΔB``, so the
  weights always equal ``X + P B`` and the merge is implicit. With ``eta``,
  the subproblem has the proximal term ``‖B‖² / (2 eta)``: its gradient is
  ``Pᵀ∇f + B / eta``, with ``B`` recovered from the current weights as
  ``(PᵀP)⁻¹ (PᵀX − PᵀX₀)`` (``PᵀX₀`` is kept, ``r × k``, not ``X₀``); this
  needs ``params`` in ``update`` and, when weight decay is chained, counts its
  projected part in ``B``.

  Example:
    >>> import jax.numpy as jnp, optax, subspace_jax as sj
    >>> tx = optax.chain(sj.rso(rank=2, update_gap=10, eta=1.0),
    ...                  optax.scale_by_learning_rate(1e-2))
    >>> params = {"w": jnp.ones((8, 4))}
    >>> updates, state = tx.update(params, tx.init(params), params)

  Args:
    inner: Optimizer of the subproblems (default Adam), restarted at each.
    rank: Subspace rank (clipped to each matrix).
    update_gap: Steps per subproblem.
    scale: Factor on the back-projected update.
    seed: Seed of the projections.
    eta: Proximal coefficient (None: no proximal term).
    side: Side rule (see :func:`galore`).
    views: Which leaves are projected and how.
    moment_dtype: dtype of projected gradients and inner moments.

  References:
    Chen, Zhang, Liu, Yuan, Wen, A Memory Efficient Randomized Subspace
    Optimization Method for Training Large Language Models, ICML 2025,
    arXiv 2502.07222.
  """
  return scale_by_subspace(
      inner, rank=rank, update_gap=update_gap, scale=scale,
      projection="scaled_stiefel", reset_inner=True, eta=eta, seed=seed,
      side=side, views=views, moment_dtype=moment_dtype, name="rso",
  )
