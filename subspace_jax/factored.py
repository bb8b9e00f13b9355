"""Model-level subspace training: the model differentiates B, never W.

As an optax transform (:mod:`subspace_jax.transform`), RSO and GoLore shrink
the optimizer state only: the model still produces the full ``m × n``
gradient of every weight, and keeps every linear layer's input ``x``
(``s × m``) to compute it. In model mode each projected linear layer computes

    y = x·W + (x·P)·B

with ``W`` (``m × n``) frozen for the length of a subproblem, ``P``
(``m × r``) a random projection regenerated from a key, and ``B``
(``r × n``) the only trainable variable. The backward pass needs ``x·P``
(``s × r``) instead of ``x`` and never forms ``∂f/∂W``; ``∂f/∂B = Pᵀ ∂f/∂W``
is what the transform computes, so the two modes take the same steps.
Every ``update_gap`` steps the subproblem is merged, ``W ← W + P·B`` and
``B ← 0``, and the next step draws a new ``P``.

The pieces:

* :class:`Factored` – the value a layer sees for a projected kernel, and
  :func:`dense`, the matmul that understands it (used by
  :mod:`subspace_jax.models.llama`).
* :class:`FactoredParams` – the train-state parameters: the full-shape
  weights and the ``B`` of each projected leaf.
* :class:`FactoredState` – the optimizer state: the step counter and the
  projection key, which define the subproblem and its ``P`` (never stored),
  and the inner optimizer's state. As in the transform, the optimizer's
  counter is the only one: the train step reads it to draw ``P`` and to know
  when to merge, so a wrapper that skips updates (``optax.MultiSteps``)
  keeps the subproblem as it is.
* :class:`Subspace` – which leaves are factored and how; it builds the tree
  the model is applied to, draws the projections and merges.
* :func:`scale_by_factored` – the optimizer core over the trainable tree
  (``B`` leaves and the full leaves): the inner optimizer, RSO's reset and
  proximal term, and ``scale`` on the ``B`` updates.

Only random projections are supported. GaLore's (and GoLore@x%'s) SVD needs
the full gradient ``∂f/∂W`` at every refresh, the very buffer this mode
exists not to build; a step that computes it would have the memory peak of
transform mode, so for those use the transform.

The projected side is always the input dimension (the transform's
``side="left"``): only ``x·P`` shrinks the saved activation. A right-side
factor ``x·A·Q`` would still need ``x`` to differentiate ``A``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

from subspace_jax import matrix_view as mv
from subspace_jax import projection as proj
from subspace_jax import transform as tf

__all__ = [
    "Factored",
    "dense",
    "FactoredParams",
    "FactoredState",
    "Subspace",
    "scale_by_factored",
    "factored_state",
]

_MASKED = optax.MaskedNode


class Factored(NamedTuple):
  """A projected kernel as a layer sees it: ``W + P·B`` kept apart.

  Attributes:
    w: Frozen weights, ``batch + (m, n)``.
    p: Projection, ``batch + (m, r)``.
    b: Trainable subspace variable, ``batch + (r, n)``.
  """

  w: jax.Array
  p: jax.Array
  b: jax.Array


def dense(x: jax.Array, kernel, *, dtype=None,
          preferred_element_type=None) -> jax.Array:
  """``x @ kernel`` over the last axis of ``x``, for an array or a
  :class:`Factored` kernel (then ``x·W + (x·P)·B``).

  Args:
    x: Inputs ``[..., m]``.
    kernel: An ``(m, n)`` array or a :class:`Factored` of one.
    dtype: Compute dtype the operands are cast to (None: ``x``'s).
    preferred_element_type: Accumulation/result dtype of the matmuls.
  """
  dtype = dtype or x.dtype
  x = x.astype(dtype)
  mm = lambda a, b: jnp.matmul(a, b.astype(dtype),
                               preferred_element_type=preferred_element_type)
  if not isinstance(kernel, Factored):
    return mm(x, kernel)
  low = jnp.matmul(x, kernel.p.astype(dtype))  # [..., r], what backward keeps
  return mm(x, kernel.w) + mm(low, kernel.b)


class FactoredParams(NamedTuple):
  """Parameters of a model trained in model mode.

  Attributes:
    weights: Every leaf at its full shape. Projected ones hold ``W``, frozen
      within a subproblem; the others are trained directly.
    low: ``B`` (``batch + (r, n)``) of each projected leaf, ``MaskedNode``
      elsewhere; zero at the start of every subproblem.
  """

  weights: Any
  low: Any

  # Roles of the fields for sharding (subspace_jax.training.sharding).
  ROLES = {"weights": "params", "low": "low"}


@dataclasses.dataclass(frozen=True)
class Subspace:
  """Which leaves of a parameter tree are factored, and how.

  Build it with :meth:`for_params`. Leaf ``i`` (in ``jax.tree.flatten``
  order) of subproblem ``k`` uses the projection
  ``random_projection(projection_key(key, i, k), ...)``, the same one as
  :func:`subspace_jax.transform.scale_by_subspace` with ``side="left"``.

  Attributes:
    plans: One :class:`~subspace_jax.matrix_view.LeafPlan` (or None for a
      full leaf) per leaf.
    treedef: The parameter tree's structure.
    projection: A sampler of :data:`subspace_jax.projection.SAMPLERS`
      that is not ``stored``: ``"scaled_stiefel"`` (RSO) or ``"stiefel"``
      (GoLore).
    update_gap: Steps per subproblem.
    seed: Seed of the projection key.
  """

  plans: tuple[Optional[mv.LeafPlan], ...]
  treedef: Any
  projection: str
  update_gap: int
  seed: int = 0

  @classmethod
  def for_params(cls, params, *, rank: int, update_gap: int,
                 projection: str = "scaled_stiefel", seed: int = 0,
                 views: Optional[mv.ViewFn] = None) -> Subspace:
    """The factoring of ``params`` (arrays or ``ShapeDtypeStruct``\\ s).

    Args:
      params: The model's parameter tree.
      rank: Rank ``r`` (clipped to each matrix).
      update_gap: Steps per subproblem.
      projection: A key of :data:`subspace_jax.projection.SAMPLERS` whose
        sampler is not ``stored`` (``"scaled_stiefel"``, ``"stiefel"``).
      seed: Seed of the projection key.
      views: Which leaves are factored, with the input axes as the rows
        (default :func:`~subspace_jax.default_view`: the last two axes).
    """
    tf._check_positive_int("rank", rank)
    tf._check_positive_int("update_gap", update_gap)
    tf._check_positive_int("seed", seed, allow_zero=True)
    sampler = proj.SAMPLERS.get(projection)
    if sampler is None or sampler.stored:
      random = tuple(k for k, s in proj.SAMPLERS.items() if not s.stored)
      raise ValueError(f"model mode needs a random projection, one of "
                       f"{random}; got {projection!r}")
    plans, treedef = tf.leaf_plans(params, rank=rank, side="left", views=views)
    return cls(tuple(plans), treedef, projection, update_gap, seed)

  def _leaves(self, tree) -> list:
    return self.treedef.flatten_up_to(tree)

  def init(self, weights, low_dtype=None) -> FactoredParams:
    """Model-mode parameters around ``weights``, with ``B = 0``.

    Args:
      weights: The parameter tree (the structure of :meth:`for_params`).
      low_dtype: dtype of ``B`` (None: each weight's own).
    """
    low = [
        _MASKED() if p is None
        else jnp.zeros(p.low_shape, low_dtype or x.dtype)
        for x, p in zip(self._leaves(weights), self.plans)
    ]
    return FactoredParams(weights=weights, low=self.treedef.unflatten(low))

  def projections(self, params: FactoredParams, opt_state) -> list:
    """This step's projection of every leaf (None for full leaves).

    Args:
      params: The model-mode parameters.
      opt_state: The optimizer state holding this subspace's
        :class:`FactoredState` (its counter and key choose ``P``).

    Each is drawn in its ``B``'s dtype, as the transform draws it in the
    dtype of the projected gradient: the same call, so the same bits.
    """
    state = factored_state(opt_state)
    key = jax.random.wrap_key_data(state.key)
    subproblem, _ = tf.subspace_schedule(state.count, self.update_gap)
    return [
        None if p is None else tf.random_projection(
            tf.projection_key(key, i, subproblem), p, self.projection, b.dtype)
        for i, (p, b) in enumerate(zip(self.plans, self._leaves(params.low)))
    ]

  def trainable(self, params: FactoredParams):
    """The tree that is differentiated: ``B`` for projected leaves, the
    weight itself for the others."""
    return self.treedef.unflatten([
        w if p is None else b
        for w, b, p in zip(self._leaves(params.weights),
                           self._leaves(params.low), self.plans)
    ])

  def factored(self, params: FactoredParams, trainable, projections):
    """The tree the model is applied to: a :class:`Factored` for projected
    leaves (``B`` from ``trainable``), ``trainable``'s leaf elsewhere."""
    out = []
    for w, t, p, plan in zip(self._leaves(params.weights),
                             self._leaves(trainable), projections, self.plans):
      if plan is None:
        out.append(t)
      else:
        shape = plan.batch_shape + (plan.rows, plan.cols)
        out.append(Factored(w.reshape(shape), p, t))
    return self.treedef.unflatten(out)

  def update(self, params: FactoredParams, trainable, projections,
             opt_state, new_opt_state,
             weight_decay: jax.Array | float = 0.0) -> FactoredParams:
    """Takes the new ``trainable`` tree, and merges at a subproblem's end.

    Args:
      params: The parameters before the step.
      trainable: The updated trainable tree.
      projections: The step's projections (from :meth:`projections`).
      opt_state: The optimizer state before the step.
      new_opt_state: The optimizer state after it. When its counter did not
        move (a wrapper skipped the update), the weights stay as they are.
      weight_decay: Factor ``c`` of a decoupled weight decay
        ``W ← W − c·W`` on the frozen weights (``learning_rate ×
        weight_decay``; ``B``'s share is decayed by the optimizer), so that
        ``W + P·B`` decays as a whole.

    Returns:
      The parameters after the step: if the step ends a subproblem,
      ``W ← W + P·B`` and ``B ← 0``.
    """
    count = factored_state(new_opt_state).count
    stepped = count != factored_state(opt_state).count
    # The step ends a subproblem when the next one starts one.
    _, starts = tf.subspace_schedule(count, self.update_gap)
    merge = stepped & starts
    if not _is_zero(weight_decay):
      weight_decay = jnp.where(stepped, weight_decay, 0)
    weights, low = [], []
    for w, t, p, plan in zip(self._leaves(params.weights),
                             self._leaves(trainable), projections, self.plans):
      if plan is None:
        weights.append(t)
        low.append(_MASKED())
        continue
      if not _is_zero(weight_decay):
        # W − c·W, not W·(1 − c): 1 − c would be rounded to weight_decay's
        # float32 (3e-8 relative on every W, every step), while the
        # transform's decay rounds only the small c·X.
        w = (w - weight_decay * w).astype(w.dtype)

      def merged(w=w, t=t, p=p, plan=plan):
        return _plus_pb(w, p, t, plan), jnp.zeros_like(t)

      w, t = jax.lax.cond(merge, merged, lambda w=w, t=t: (w, t))
      weights.append(w)
      low.append(t)
    return FactoredParams(weights=self.treedef.unflatten(weights),
                          low=self.treedef.unflatten(low))

  def merged_weights(self, params: FactoredParams, opt_state):
    """``W + P·B`` for every leaf: the plain weights of the current model
    (for export or a transform-mode run); ``opt_state`` as in
    :meth:`projections`."""
    out = []
    for w, b, p, plan in zip(self._leaves(params.weights),
                             self._leaves(params.low),
                             self.projections(params, opt_state), self.plans):
      if plan is None:
        out.append(w)
      else:
        out.append(_plus_pb(w, p, b, plan))
    return self.treedef.unflatten(out)


def _plus_pb(w, p, b, plan: mv.LeafPlan) -> jax.Array:
  """``W + P·B`` in float32 (at least), in ``W``'s shape and dtype."""
  delta = jnp.einsum("...dr,...rk->...dk", p, b,
                     preferred_element_type=jnp.promote_types(w.dtype,
                                                              jnp.float32))
  return (w + plan.from_matrix(delta)).astype(w.dtype)


def _is_zero(x) -> bool:
  return isinstance(x, (int, float)) and x == 0


class FactoredState(NamedTuple):
  """State of :func:`scale_by_factored`.

  Attributes:
    count: Updates taken (int32); the subproblem is
      ``count // update_gap``.
    key: Raw ``uint32`` data of the projection key (from the subspace's
      seed).
    inner_low: Inner state over the ``B`` gradients.
    inner_full: Inner state over the full leaves.
  """

  count: jax.Array
  key: jax.Array
  inner_low: Any
  inner_full: Any

  # Roles of the fields for sharding (subspace_jax.training.sharding).
  ROLES = {"inner_low": "low", "inner_full": "full"}


def scale_by_factored(
    inner: Optional[optax.GradientTransformation] = None,
    *,
    subspace: Subspace,
    scale: float | jax.Array = 1.0,
    reset_inner: bool = False,
    eta: float | jax.Array | None = None,
) -> optax.GradientTransformation:
  """The optimizer core of model mode, over the trainable tree.

  The trainable tree (:meth:`Subspace.trainable`) holds ``B`` for the
  factored leaves and the weight itself for the others. ``inner`` runs on
  the two groups separately, like the transform does.

  Args:
    inner: Gradient-scaling transformation (default
      ``optax.scale_by_adam()``); must not need ``params``.
    subspace: The factoring (gives which leaves are ``B`` and the schedule).
    scale: Factor on the ``B`` updates (the transform's ``scale``).
    reset_inner: Re-initialize the ``B`` leaves' inner state at the start of
      each subproblem (RSO).
    eta: RSO's proximal coefficient: adds ``B / eta`` to ``B``'s gradient.
      Needs ``params`` (the trainable tree) in ``update``. None: off.
  """
  if inner is None:
    inner = optax.scale_by_adam()
  tf.check_eta(eta)
  plans, treedef = subspace.plans, subspace.treedef

  def init_fn(params):
    key = jax.random.key_data(jax.random.key(subspace.seed))
    return FactoredState(jnp.zeros([], jnp.int32), key,
                         *tf.inner_init(inner, treedef, plans, params, params))

  def update_fn(updates, state, params=None):
    tf.require_params("scale_by_factored", eta, params)
    _, starts = tf.subspace_schedule(state.count, subspace.update_gap)
    if eta is not None:
      # B is the trainable leaf itself: no anchor, no Gram factor.
      updates = treedef.unflatten([
          g if p is None else tf.proximal(g, b.astype(g.dtype), eta)
          for g, b, p in zip(treedef.flatten_up_to(updates),
                             treedef.flatten_up_to(params), plans)
      ])
    low, full, inner_low, inner_full = tf.inner_update(
        inner, treedef, plans, updates, updates, state.inner_low,
        state.inner_full, reset=starts if reset_inner else None)
    out = [f if p is None else (scale * l).astype(l.dtype)
           for l, f, p in zip(treedef.flatten_up_to(low),
                              treedef.flatten_up_to(full), plans)]
    return treedef.unflatten(out), FactoredState(
        optax.safe_int32_increment(state.count), state.key, inner_low,
        inner_full)

  return optax.GradientTransformation(init_fn, update_fn)


def factored_state(opt_state) -> FactoredState:
  """The one :class:`FactoredState` inside an optimizer state (a chain's,
  or a wrapper's such as ``optax.MultiSteps``)."""
  found = [s for s in jax.tree.leaves(
      opt_state, is_leaf=lambda x: isinstance(x, FactoredState))
           if isinstance(s, FactoredState)]
  if len(found) != 1:
    raise ValueError(f"expected one FactoredState in the optimizer state "
                     f"(from scale_by_factored), found {len(found)}")
  return found[0]
