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

Both choices are data: :data:`METHODS` holds one :class:`Method` per
preset (its projection kind, the reset, whether ``eta`` and ``svd_steps``
apply, whether model mode can run it) and
:data:`subspace_jax.projection.SAMPLERS` one sampler per projection kind
(how ``P`` is made, whether it is stored, its Gram factor). A new preset is
one entry and a thin constructor calling :func:`scale_by_method`; a new
kind of projection is one entry.

Random projections are never stored: they are regenerated at every step from
``projection_key(key, leaf_index, subspace_index)`` where
``subspace_index = count // update_gap`` (:func:`subspace_schedule`), and
matrix ``j`` of a stacked leaf from ``fold_in`` of that key and ``j``
(:func:`matrix_keys`, so model mode can draw each layer's alone); a
GoLore/RSO state therefore holds a key and a counter instead of an ``m × r``
matrix per leaf.

Learning rate and weight decay are chained after, in full space::

  tx = optax.chain(
      sj.golore(rank=128, update_gap=200),
      optax.add_decayed_weights(0.1),
      optax.scale_by_learning_rate(optax.cosine_decay_schedule(1e-3, 10_000)),
  )
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Mapping, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

from subspace_jax import matrix_view as mv
from subspace_jax import projection as proj

__all__ = [
    "SubspaceState",
    "scale_by_subspace",
    "scale_by_method",
    "galore",
    "golore",
    "rso",
    "Method",
    "METHODS",
    "PROJECTIONS",
    "leaf_plans",
    "projection_key",
    "random_projection",
    "matrix_keys",
    "subspace_schedule",
]

# The built-in projection kinds (see subspace_jax.projection.SAMPLERS, which
# is what the transforms read, so a kind added there is accepted too).
PROJECTIONS = tuple(proj.SAMPLERS)
projection_key = proj.projection_key
# Subspace index of the initial projection (count // update_gap never is).
_INIT_SUBSPACE = 2**32 - 1
# The projection of GoLore@x%'s SVD phase, and that of the initial stored
# projection (a random orthonormal start).
_SVD_PHASE = "svd"
_INIT_KIND = "stiefel"

_MASKED = optax.MaskedNode


@dataclasses.dataclass(frozen=True)
class Method:
  """A subspace method: the settings of :func:`scale_by_subspace` it fixes.

  Attributes:
    projection: Kind of projection, a key of
      :data:`subspace_jax.projection.SAMPLERS`.
    reset_inner: Re-initialize the inner state of the projected leaves at
      every new subspace (a fresh subproblem).
    proximal: Whether the proximal coefficient ``eta`` applies.
    svd_phase: Whether ``svd_steps`` (exact SVD projections first) applies.
    model_mode: Whether the method can run in model mode
      (:mod:`subspace_jax.factored`): its projection must not need the
      gradient.
    svd_variants: Projection kind for each value of the ``svd`` option
      (empty: the option does not apply and ``projection`` is used).
    side: The default side rule (:mod:`subspace_jax.matrix_view`). "std"
      for the random methods: a random projection keeps ``r/d`` of the
      gradient along the projected dimension ``d``, so projecting the
      smaller one keeps more (the quality study,
      ``benchmarks/results/quality.md``); "lean" for GaLore, whose SVD
      keeps the same energy on either side, with the smaller state.
  """

  projection: str
  reset_inner: bool = False
  proximal: bool = False
  svd_phase: bool = False
  model_mode: bool = False
  svd_variants: Mapping[str, str] = dataclasses.field(default_factory=dict)
  side: str = "lean"

  def projection_for(self, svd: str = "exact") -> str:
    """The projection kind with the ``svd`` option ``svd``."""
    if not self.svd_variants:
      return self.projection
    if svd not in self.svd_variants:
      choices = " or ".join(map(repr, self.svd_variants))
      raise ValueError(f"svd must be {choices}, got {svd!r}")
    return self.svd_variants[svd]


METHODS: dict[str, Method] = {
    "galore": Method(
        "svd", svd_variants={"exact": "svd", "randomized": "randomized"}
    ),
    "golore": Method("stiefel", svd_phase=True, model_mode=True, side="std"),
    "rso": Method(
        "scaled_stiefel", reset_inner=True, proximal=True, model_mode=True,
        side="std",
    ),
}


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

  # What each tree field holds, per leaf, for sharding
  # (subspace_jax.sharding); the other fields are replicated.
  ROLES = {"projections": "projection", "anchors": "low",
           "inner_low": "low", "inner_full": "full"}


def subspace_schedule(count, update_gap: int) -> tuple[jax.Array, jax.Array]:
  """Where step ``count`` falls in the schedule of subspaces.

  Returns:
    ``(index, starts)``: the subspace index ``count // update_gap`` and
    whether ``count`` is the first step of its subspace.
  """
  return count // update_gap, count % update_gap == 0


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


def matrix_keys(key: jax.Array, plan: mv.LeafPlan) -> jax.Array:
  """The key of each matrix of a leaf from the leaf's key: ``key`` itself for
  a plain matrix, ``fold_in(key, j)`` for matrix ``j`` (flat index over the
  batch axes) of a stacked leaf, in an array of shape ``batch_shape``.

  Each matrix's key depends only on its own index, so a scanned model can
  draw layer ``j``'s projection inside its loop from this array's slice, the
  same as the stacked leaf's (model mode, :mod:`subspace_jax.factored`).
  """
  if not plan.batch_shape:
    return key
  ids = jnp.arange(plan.num_matrices, dtype=jnp.uint32)
  keys = jax.vmap(lambda j: jax.random.fold_in(key, j))(ids)
  return keys.reshape(plan.batch_shape)


def draw(sampler: proj.Sampler, key, dim: int, rank: int, dtype) -> jax.Array:
  """``sampler``'s ``(dim, rank)`` projection of one matrix from that
  matrix's key (see :func:`matrix_keys`): the one call both transform and
  model mode draw with."""
  return sampler.make(key, dim, rank, dtype=dtype)


def _regenerated(sampler: proj.Sampler, key, plan: mv.LeafPlan, dtype):
  """``sampler``'s projection ``batch + (d, r)`` of a leaf from its key; each
  matrix of a stacked leaf gets its own key (:func:`matrix_keys`)."""
  one = lambda k: draw(sampler, k, plan.dim, plan.rank, dtype)
  if not plan.batch_shape:
    return one(key)
  # One matrix at a time (``lax.map``, not ``vmap``): a stacked leaf's
  # sampling temporaries (random bits, float32 Gaussians, the QR) are then
  # one matrix's, not every layer's at once.
  keys = matrix_keys(key, plan).reshape(-1)
  return jax.lax.map(one, keys).reshape(plan.projection_shape)


def random_projection(
    key: jax.Array, plan: mv.LeafPlan, kind: str, dtype=jnp.float32
) -> jax.Array:
  """The projection ``batch + (d, r)`` of a leaf, regenerated from its key.

  ``kind`` names a sampler of :data:`~subspace_jax.projection.SAMPLERS` that
  is not ``stored``. Each matrix of a stacked leaf gets its own key
  (:func:`matrix_keys`: ``fold_in(key, j)`` for matrix ``j``).
  """
  sampler = proj.SAMPLERS[kind]
  if sampler.stored:
    raise ValueError(f"a {kind!r} projection is made from the gradient, not "
                     "regenerated from a key")
  return _regenerated(sampler, key, plan, dtype)


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


# --- the inner core, shared with model mode (subspace_jax.factored) ----------


def check_eta(eta) -> None:
  """Refuses a proximal coefficient that is not ``> 0`` (None: off)."""
  if eta is not None and not isinstance(eta, jax.Array) and not eta > 0:
    raise ValueError(f"eta must be > 0 (or None to turn it off), got {eta}")


def require_params(name: str, eta, params) -> None:
  """Refuses an ``update`` without ``params`` when the proximal term is on."""
  if eta is not None and params is None:
    raise ValueError(f"{name} with eta needs `params` in update()")


def proximal(low, displacement, eta, gram=1.0):
  """``low + B / eta``, the gradient of the subproblem with ``‖B‖² / (2 eta)``,
  for ``B = displacement / gram`` (``PᵀP = gram · I``)."""
  return low + displacement / (gram * eta)


def split_low_full(treedef, plans, low, full):
  """Two trees of ``treedef``: ``low``'s leaves at the projected leaves
  (``plans[i]`` not None) and ``full``'s at the others, ``MaskedNode``
  elsewhere."""
  lows, fulls = treedef.flatten_up_to(low), treedef.flatten_up_to(full)
  return (
      treedef.unflatten(
          [l if p is not None else _MASKED() for l, p in zip(lows, plans)]),
      treedef.unflatten(
          [_MASKED() if p is not None else f for f, p in zip(fulls, plans)]),
  )


def inner_init(inner, treedef, plans, low, full):
  """``(inner_low, inner_full)``: ``inner``'s states over the two groups."""
  low_tree, full_tree = split_low_full(treedef, plans, low, full)
  return inner.init(low_tree), inner.init(full_tree)


def inner_update(inner, treedef, plans, low, full, inner_low, inner_full, *,
                 reset=None):
  """``inner`` on the projected group and, separately, on the full one.

  Args:
    inner: The inner gradient transformation.
    treedef: The parameters' tree structure.
    plans: One plan (None: full leaf) per leaf.
    low: Tree whose projected leaves are the low-rank gradients.
    full: Tree whose full leaves are the full gradients.
    inner_low: ``inner``'s state over the low-rank group.
    inner_full: ``inner``'s state over the full group.
    reset: None, or a traced bool: where true, ``inner_low`` is
      re-initialized first (a new subproblem).

  Returns:
    ``(low_updates, full_updates, inner_low, inner_full)``; the update trees
    hold ``MaskedNode`` at the other group's leaves.
  """
  low_tree, full_tree = split_low_full(treedef, plans, low, full)
  if reset is not None:
    fresh = inner.init(low_tree)
    inner_low = jax.tree.map(
        lambda f, o: jnp.where(reset, f, o), fresh, inner_low
    )
  low_updates, inner_low = inner.update(low_tree, inner_low, None)
  full_updates, inner_full = inner.update(full_tree, inner_full, None)
  return low_updates, full_updates, inner_low, inner_full


# --- scale_by_subspace ------------------------------------------------------


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


@dataclasses.dataclass(frozen=True, eq=False)
class _Settings:
  """The checked settings of one :func:`scale_by_subspace`."""

  inner: optax.GradientTransformation
  rank: int
  update_gap: int
  scale: Any
  sampler: proj.Sampler
  svd_steps: int
  reset_inner: bool
  eta: Any
  seed: int
  side: str
  views: Optional[mv.ViewFn]
  moment_dtype: Any
  options: Mapping[str, Any]
  name: str
  shardings: Any = None

  @property
  def stores(self) -> bool:
    """Whether the state keeps a projection per leaf."""
    return self.sampler.stored or self.svd_steps > 0

  def plans(self, tree):
    return leaf_plans(tree, rank=self.rank, side=self.side, views=self.views)

  def leaf_specs(self, treedef, plans) -> list[Optional[_Specs]]:
    """The :class:`_Specs` of every leaf (None: unconstrained)."""
    if self.shardings is None:
      return [None] * len(plans)
    try:
      flat = treedef.flatten_up_to(self.shardings)
    except (ValueError, TypeError) as e:
      raise ValueError(f"{self.name}: shardings must have the structure of "
                       f"the parameters ({e})") from None
    return [None if p is None else _leaf_specs(p, s)
            for p, s in zip(plans, flat)]

  def low_dtype(self, leaf):
    if self.moment_dtype is not None:
      return jnp.dtype(self.moment_dtype)
    return leaf.dtype


def _acc(dtype):
  """Accumulation dtype: float32 at least (float64 stays float64)."""
  return jnp.promote_types(dtype, jnp.float32)


# --- where a leaf's arrays live on the mesh ---------------------------------

_FREE = jax.sharding.PartitionSpec.UNCONSTRAINED


def _axis_size(mesh, entry) -> int:
  if entry is None or entry is _FREE:
    return 1
  names = (entry,) if isinstance(entry, str) else tuple(entry)
  return math.prod(mesh.shape[n] for n in names)


class _Specs(NamedTuple):
  """Where one projected leaf's matrices live on its mesh, as
  ``PartitionSpec`` entries (mesh axes, None for replicated,
  ``UNCONSTRAINED`` for XLA's choice) of one matrix of the stack.

  Attributes:
    mesh: The leaf's mesh.
    rows, cols: The leaf's own rows and columns (its matrix view).
    dim, kept: The projected and the kept dimension (rows and columns,
      or the other way round).
    rank: The rank axis of a projected ``r × kept`` array: the projected
      dimension's mesh axes where they divide the rank (as
      ``training.sharding`` shards the optimizer state), else XLA's choice.
    stored: The rank axis of a stored projection ``d × r``: the kept
      dimension's mesh axes where they divide the rank (as
      ``training.sharding`` shards it, its ``d`` as the projected
      dimension), else XLA's choice.
  """

  mesh: Any
  rows: Any
  cols: Any
  dim: Any
  kept: Any
  rank: Any
  stored: Any


def _leaf_specs(plan: mv.LeafPlan, sharding) -> Optional[_Specs]:
  """The :class:`_Specs` of a leaf from its sharding (None: none given)."""
  if sharding is None:
    return None
  if not isinstance(sharding, jax.sharding.NamedSharding):
    raise TypeError(
        "shardings must hold a jax.sharding.NamedSharding (or None) for "
        f"each leaf, got {type(sharding).__name__}: a PartitionSpec alone "
        "names no mesh")
  spec = tuple(sharding.spec) + (None,) * (len(plan.shape) - len(sharding.spec))
  b, r = plan.view.batch_dims, plan.view.row_dims

  def group(entries):
    if len(entries) == 1:
      return entries[0]
    # Several axes merged into one: where they are split is XLA's choice.
    return None if all(e is None for e in entries) else _FREE

  rows, cols = group(spec[b:b + r]), group(spec[b + r:])
  dim, kept = (cols, rows) if plan.transpose else (rows, cols)
  on_rank = lambda e: (e if e is not _FREE
                       and plan.rank % _axis_size(sharding.mesh, e) == 0
                       else _FREE)
  return _Specs(sharding.mesh, rows, cols, dim, kept, on_rank(dim),
                on_rank(kept))


def _put(x, specs: Optional[_Specs], *fields: Optional[str]):
  """``x`` (one matrix) constrained to the leaf's mesh, each axis as the
  field of ``specs`` it names (``"dim"``, ``"kept"``, ...; None:
  replicated); ``x`` itself without specs."""
  if specs is None:
    return x
  entries = [None if f is None else getattr(specs, f) for f in fields]
  return jax.lax.with_sharding_constraint(
      x, jax.sharding.NamedSharding(specs.mesh,
                                    jax.sharding.PartitionSpec(*entries)))


def _each_matrix(plan: mv.LeafPlan, fn, *stacks):
  """``fn`` on each matrix of a leaf: once for a plain matrix, in a loop
  (``lax.map``) over a stacked leaf's matrices, the ``stacks`` (each with
  the leaf's batch axes first, or None) sliced along them."""
  if not plan.batch_shape:
    return fn(*stacks)
  nb, nbatch = plan.num_matrices, len(plan.batch_shape)
  flat = [None if s is None else s.reshape((nb,) + s.shape[nbatch:])
          for s in stacks]
  out = jax.lax.map(lambda xs: fn(*xs), tuple(flat))
  return jax.tree.map(lambda o: o.reshape(plan.batch_shape + o.shape[1:]), out)


def _matrices(plan: mv.LeafPlan, x):
  """``x`` (the leaf's shape) as ``batch + (rows, cols)``, in the leaf's
  own layout (no transpose)."""
  return x.reshape(plan.batch_shape + (plan.rows, plan.cols))


def _project_one(plan: mv.LeafPlan, p, m, dtype):
  """``Pᵀ M`` (``r × kept``) of one matrix ``m`` in the leaf's layout."""
  spec = "dr,kd->rk" if plan.transpose else "dr,dk->rk"
  return jnp.einsum(spec, p, m, preferred_element_type=dtype)


def _back_one(plan: mv.LeafPlan, p, u, dtype):
  """``P U`` of one matrix, in the leaf's layout (``(P U)ᵀ`` when the
  columns are projected), computed in ``dtype``."""
  spec = "dr,rk->kd" if plan.transpose else "dr,rk->dk"
  return jnp.einsum(spec, p, u, preferred_element_type=dtype)


class _Leaf(NamedTuple):
  """One projected leaf in one update: its plan, specs and what makes its
  projection (``keys``: matrix keys of a regenerated one; ``stored``: the
  projections kept in the state, after this step's refresh)."""

  plan: mv.LeafPlan
  specs: Optional[_Specs]
  keys: Any
  stored: Any


def _projection(st: _Settings, leaf: _Leaf, source, dtype):
  """One matrix's projection ``(d, r)`` from its ``source`` (its key, or its
  stored projection), split along the projected dimension as the gradient
  is.

  A regenerated projection is drawn whole on every device (a few matrix
  products on replicated data: no collective), then each device keeps its
  rows; drawn under the gradient's sharding, the draw was split into
  thousands of small collectives. A stored one is gathered to that layout.
  """
  if leaf.stored is None:
    p = _put(draw(st.sampler, source, leaf.plan.dim, leaf.plan.rank, dtype),
             leaf.specs, None, None)
  else:
    p = source
  return _put(p, leaf.specs, "dim", None)


def _sources(leaf: _Leaf):
  return leaf.keys if leaf.stored is None else leaf.stored


def _refresh(st: _Settings, plan, specs, key, count, starts, g, old):
  """New stored projection: recomputed at a new subspace, else ``old``.

  The gradient of each matrix is gathered whole for its SVD (on every
  device: the refresh's collectives are its gradients' size).
  """
  keys = key
  if plan.batch_shape:
    keys = jax.random.split(key, plan.num_matrices).reshape(plan.batch_shape)

  def from_gradient(sampler):
    def one(g, old, k):
      gm = _put(g.T if plan.transpose else g, specs, None, None)
      new = sampler.make(k, plan.dim, plan.rank, dtype=old.dtype, g=gm,
                         init=_put(old, specs, None, None),
                         transposed=plan.transpose, **st.options)
      return _put(new, specs, "dim", "stored")
    return _each_matrix(plan, one, _matrices(plan, g), old, keys)

  def recompute():
    if st.sampler.stored:
      new = from_gradient(st.sampler)
    else:  # a random projection after an SVD phase (GoLore@x%)
      new = jax.lax.cond(
          count < st.svd_steps,
          lambda: from_gradient(proj.SAMPLERS[_SVD_PHASE]),
          lambda: _each_matrix(plan, lambda k: _put(
              _put(draw(st.sampler, k, plan.dim, plan.rank, old.dtype), specs,
                   None, None), specs, "dim", "stored"),
              matrix_keys(key, plan)),
      )
    # A non-finite gradient must not leave a NaN projection for the next
    # update_gap steps: keep the previous one instead.
    return jnp.where(jnp.all(jnp.isfinite(new)), new, old)

  return jax.lax.cond(starts, recompute, lambda: old)


def _leaf_forward(st: _Settings, leaf: _Leaf, g, old_anchor, x, starts):
  """One leaf's step into the subspace: ``(anchor or MaskedNode, low-rank
  gradient)``.

  One matrix at a time: its projection is made, used and dropped, so no
  projection of every layer lives through the step. The projected
  gradient ``Pᵀ G`` is formed in the moments' dtype (the partial sums of a
  gradient split along the projected dimension are reduced in it, as the
  gradients themselves are); with RSO's proximal term it and ``Pᵀ X`` are
  formed in float32 (at least).
  """
  plan, specs = leaf.plan, leaf.specs
  low_dtype = st.low_dtype(g)
  dtype = _acc(g.dtype) if st.eta is not None else jnp.promote_types(
      g.dtype, low_dtype)

  def one(source, g, x):
    p = _projection(st, leaf, source, low_dtype)
    low = _put(_project_one(plan, p, g, dtype), specs, "rank", "kept")
    if x is None:
      return low, None
    ptx = _project_one(plan, p, x, old_anchor.dtype)
    return low, _put(ptx, specs, "rank", "kept")

  xm = None if x is None else _matrices(plan, x)
  low, ptx = _each_matrix(plan, one, _sources(leaf), _matrices(plan, g), xm)
  anchor = _MASKED()
  if st.eta is not None:
    anchor = jnp.where(starts, ptx, old_anchor)
    # B = (PᵀP)⁻¹ Pᵀ(X − X₀), PᵀX₀ being the anchor.
    gram = st.sampler.gram(plan.dim, plan.rank)
    low = proximal(low, ptx - anchor, st.eta, gram)
  return anchor, low.astype(low_dtype)


def _leaf_back(st: _Settings, leaf: _Leaf, u, g):
  """``scale · P U`` in the leaf's shape and ``g``'s dtype, one matrix at a
  time (a regenerated projection is drawn again: the step never holds
  every layer's), each split as the gradient is."""
  plan, specs = leaf.plan, leaf.specs

  def one(source, u):
    p = _projection(st, leaf, source, st.low_dtype(g))
    back = _back_one(plan, p, _put(u, specs, None, "kept"), _acc(g.dtype))
    return _put((st.scale * back).astype(g.dtype), specs, "rows", "cols")

  return _each_matrix(plan, one, _sources(leaf), u).reshape(plan.shape)


def _unzip(treedef, tree, n: int) -> tuple:
  """``n`` trees of ``treedef`` from a tree of ``n``-tuples at its leaves."""
  rows = treedef.flatten_up_to(tree)
  cols = list(zip(*rows)) if rows else [()] * n
  return tuple(treedef.unflatten(list(c)) for c in cols)


def _leaf_init(st: _Settings, key, i, plan, x):
  """``(stored projection, anchor)`` of one leaf at init (or MaskedNodes)."""
  if plan is None:
    return _MASKED(), _MASKED()
  p = _MASKED()
  if st.stores:
    # A random orthonormal start: the first step replaces it; it is what
    # stays if that step's gradient is not finite, and the warm start of
    # the randomized SVD.
    k = projection_key(key, i, _INIT_SUBSPACE)
    p = _regenerated(proj.SAMPLERS[_INIT_KIND], k, plan, st.low_dtype(x))
  anchor = _MASKED()
  if st.eta is not None:
    anchor = jnp.zeros(plan.low_shape, _acc(x.dtype))
  return p, anchor


def _init(st: _Settings, params) -> SubspaceState:
  """``init`` of :func:`scale_by_subspace`."""
  plans, treedef = st.plans(params)
  key = jax.random.key(st.seed)
  zeros = treedef.unflatten([
      None if p is None else jnp.zeros(p.low_shape, st.low_dtype(x))
      for x, p in zip(treedef.flatten_up_to(params), plans)
  ])
  inner_low, inner_full = inner_init(st.inner, treedef, plans, zeros, params)
  low_tree, _ = split_low_full(treedef, plans, zeros, params)
  try:
    jax.eval_shape(lambda t, s: st.inner.update(t, s, None), low_tree,
                   inner_low)
  except (ValueError, TypeError) as e:
    if "param" not in str(e).lower():
      raise
    raise ValueError(_PARAMS_ERROR.format(name=st.name)) from e
  ids = treedef.unflatten(range(treedef.num_leaves))
  per_leaf = jax.tree.map(functools.partial(_leaf_init, st, key), ids,
                          treedef.unflatten(plans), params)
  projections, anchors = _unzip(treedef, per_leaf, 2)
  return SubspaceState(
      count=jnp.zeros([], jnp.int32), key=jax.random.key_data(key),
      projections=projections, anchors=anchors, inner_low=inner_low,
      inner_full=inner_full,
  )


def _update(st: _Settings, updates, state: SubspaceState, params=None):
  """``update`` of :func:`scale_by_subspace`: project every leaf, run the
  inner core, back-project."""
  require_params(st.name, st.eta, params)
  plans, treedef = st.plans(updates)
  specs = st.leaf_specs(treedef, plans)
  index, starts = subspace_schedule(state.count, st.update_gap)
  key = jax.random.wrap_key_data(state.key)
  flat = treedef.flatten_up_to
  gs = flat(updates)
  xs = flat(params) if st.eta is not None else [None] * len(plans)
  leaves, stored, anchors, lows = [], [], [], []
  for i, (plan, spec, g, old, old_anchor, x) in enumerate(zip(
      plans, specs, gs, flat(state.projections), flat(state.anchors), xs)):
    if plan is None:
      leaves.append(None)
      stored.append(_MASKED())
      anchors.append(_MASKED())
      lows.append(None)
      continue
    k = projection_key(key, i, index)
    if st.stores:
      p = _refresh(st, plan, spec, k, state.count, starts, g, old)
      leaf = _Leaf(plan, spec, None, p)
    else:
      p, leaf = _MASKED(), _Leaf(plan, spec, matrix_keys(k, plan), None)
    anchor, low = _leaf_forward(st, leaf, g, old_anchor, x, starts)
    leaves.append(leaf)
    stored.append(p)
    anchors.append(anchor)
    lows.append(low)
  low_up, full_up, inner_low, inner_full = inner_update(
      st.inner, treedef, plans, treedef.unflatten(lows), updates,
      state.inner_low, state.inner_full,
      reset=starts if st.reset_inner else None,
  )
  out = [f if leaf is None else _leaf_back(st, leaf, u, g)
         for leaf, u, f, g in zip(leaves, flat(low_up), flat(full_up), gs)]
  return treedef.unflatten(out), SubspaceState(
      count=optax.safe_int32_increment(state.count), key=state.key,
      projections=treedef.unflatten(stored),
      anchors=treedef.unflatten(anchors), inner_low=inner_low,
      inner_full=inner_full,
  )


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
    shardings: Any = None,
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
    projection: A key of :data:`subspace_jax.projection.SAMPLERS` (the
      built-in ones are :data:`PROJECTIONS`).
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
    shardings: The parameters' shardings under a mesh: a tree of the
      parameters' structure holding a ``jax.sharding.NamedSharding`` (or
      None) per leaf, e.g. those ``jax.jit`` gives the weights. With them
      every projection, projected gradient and back-projection follows its
      gradient's sharding (see :func:`golore`). None (the default): no
      constraint, XLA's propagation decides.
    name: Name used in error messages.

  Returns:
    An ``optax.GradientTransformation`` whose state is a
    :class:`SubspaceState`.
  """
  _check_positive_int("rank", rank)
  _check_positive_int("update_gap", update_gap)
  _check_positive_int("svd_steps", svd_steps, allow_zero=True)
  _check_positive_int("seed", seed, allow_zero=True)
  if projection not in proj.SAMPLERS:
    raise ValueError(f"projection must be one of {tuple(proj.SAMPLERS)}, got "
                     f"{projection!r}")
  if side not in mv.SIDES:
    raise ValueError(f"side must be one of {mv.SIDES}, got {side!r}")
  sampler = proj.SAMPLERS[projection]
  if svd_steps and sampler.stored:
    raise ValueError("svd_steps only applies to a random projection")
  check_eta(eta)
  st = _Settings(
      inner=optax.scale_by_adam() if inner is None else inner, rank=rank,
      update_gap=update_gap, scale=scale, sampler=sampler,
      svd_steps=svd_steps, reset_inner=reset_inner, eta=eta, seed=seed,
      side=side, views=views, moment_dtype=moment_dtype,
      options=dict(oversample=oversample, power_iters=power_iters), name=name,
      shardings=shardings,
  )
  return optax.GradientTransformation(
      functools.partial(_init, st), functools.partial(_update, st))


def scale_by_method(
    method: str,
    inner: Optional[optax.GradientTransformation] = None,
    *,
    svd: str = "exact",
    svd_steps: int = 0,
    eta: float | jax.Array | None = None,
    side: str | None = None,
    **kwargs,
) -> optax.GradientTransformation:
  """:func:`scale_by_subspace` with the settings of ``METHODS[method]``.

  Args:
    method: A key of :data:`METHODS`.
    inner: The inner transformation (default Adam).
    svd: The ``svd`` option (for a method with ``svd_variants``).
    svd_steps: The SVD phase (for a method with ``svd_phase``).
    eta: The proximal coefficient (for a ``proximal`` method).
    side: The side rule (None: the method's :attr:`Method.side`).
    **kwargs: The other arguments of :func:`scale_by_subspace`.
  """
  m = METHODS[method]
  if eta is not None and not m.proximal:
    raise ValueError(f"{method} has no proximal term (eta)")
  if svd_steps and not m.svd_phase:
    raise ValueError(f"{method} has no SVD phase (svd_steps)")
  return scale_by_subspace(
      inner, projection=m.projection_for(svd), svd_steps=svd_steps,
      reset_inner=m.reset_inner, eta=eta, name=method,
      side=m.side if side is None else side, **kwargs,
  )


def galore(
    inner: Optional[optax.GradientTransformation] = None,
    *,
    rank: int,
    update_gap: int = 200,
    scale: float | jax.Array = 1.0,
    side: str | None = None,
    svd: str = "exact",
    views: Optional[mv.ViewFn] = None,
    moment_dtype: Any = None,
    seed: int = 0,
    oversample: int = 8,
    power_iters: int = 2,
    shardings: Any = None,
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
    side: ``"lean"`` (the default, None; project the larger dimension, as
      ``optax.contrib.scale_by_galore``: the smaller state, and the same
      energy as ``"std"``), ``"std"`` (the paper's rule), ``"left"`` or
      ``"right"``.
    svd: ``"exact"`` (full SVD in float32) or ``"randomized"`` (a fast
      warm-started range finder: a few matrix products instead of an SVD).
    views: Which leaves are projected and how (see ``views_by_path``).
    moment_dtype: dtype of projected gradients, inner moments and stored
      projections (None: the gradient's dtype).
    seed: Seed for the randomized SVD and the initial projection.
    oversample: Extra columns of the randomized sketch.
    power_iters: Power iterations of the randomized SVD.
    shardings: The parameters' ``NamedSharding`` objects under a mesh (a tree
      like the parameters; None: no constraints). The stored projections
      keep their own sharding and are gathered, one matrix at a time, to
      the rows of the gradient each device holds; a refresh gathers each
      gradient matrix whole for its SVD.

  References:
    Zhao et al., GaLore: Memory-Efficient LLM Training by Gradient Low-Rank
    Projection, ICML 2024, arXiv 2403.03507.
  """
  return scale_by_method(
      "galore", inner, svd=svd, rank=rank, update_gap=update_gap,
      scale=scale, side=side, views=views, moment_dtype=moment_dtype,
      seed=seed, oversample=oversample, power_iters=power_iters,
      shardings=shardings,
  )


def golore(
    inner: Optional[optax.GradientTransformation] = None,
    *,
    rank: int,
    update_gap: int = 200,
    scale: float | jax.Array = 1.0,
    seed: int = 0,
    svd_steps: int = 0,
    side: str | None = None,
    views: Optional[mv.ViewFn] = None,
    moment_dtype: Any = None,
    shardings: Any = None,
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
    side: Side rule (see :func:`galore`; default, None: ``"std"``, the
      smaller dimension projected, which keeps the larger fraction
      ``r / min(m, n)`` of a random projection's gradient; ``"lean"`` keeps
      the smaller state ``r × min(m, n)``).
    views: Which leaves are projected and how.
    moment_dtype: dtype of projected gradients and inner moments.
    shardings: The parameters' ``NamedSharding`` objects under a mesh (a tree
      like the parameters, e.g. FSDP's; None: no constraints). Each
      matrix's ``P`` is then drawn whole on every device (no collective)
      and split along the projected dimension as its gradient is, the
      projected gradient is reduced over that dimension's mesh axes into
      the state's sharding (a reduce-scatter of ``r × k``), and the update
      is gathered along the rank only (``r × k``) before ``P U`` is formed
      in the gradient's own sharding.

  References:
    He, Li, Hu, Chen, Yuan, Subspace Optimization for Large Language Models
    with Convergence Guarantees, ICML 2025, arXiv 2410.11289.
  """
  return scale_by_method(
      "golore", inner, svd_steps=svd_steps, rank=rank, update_gap=update_gap,
      scale=scale, seed=seed, side=side, views=views,
      moment_dtype=moment_dtype, shardings=shardings,
  )


def rso(
    inner: Optional[optax.GradientTransformation] = None,
    *,
    rank: int,
    update_gap: int = 200,
    scale: float | jax.Array = 1.0,
    seed: int = 0,
    eta: float | jax.Array | None = None,
    side: str | None = None,
    views: Optional[mv.ViewFn] = None,
    moment_dtype: Any = None,
    shardings: Any = None,
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
    side: Side rule (default, None: ``"std"``, as for :func:`golore`).
    views: Which leaves are projected and how.
    moment_dtype: dtype of projected gradients and inner moments.
    shardings: The parameters' ``NamedSharding`` objects under a mesh (None: no
      constraints); see :func:`golore`.

  References:
    Chen, Zhang, Liu, Yuan, Wen, A Memory Efficient Randomized Subspace
    Optimization Method for Training Large Language Models, ICML 2025,
    arXiv 2502.07222.
  """
  return scale_by_method(
      "rso", inner, eta=eta, rank=rank, update_gap=update_gap, scale=scale,
      seed=seed, side=side, views=views, moment_dtype=moment_dtype,
      shardings=shardings,
  )
