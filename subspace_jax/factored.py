"""Model-level subspace training: the model differentiates B, never W.

As an optax transform (:mod:`subspace_jax.transform`), RSO and GoLore shrink
the optimizer state only: the model still produces the full ``m × n``
gradient of every weight, and keeps every linear layer's input ``x``
(``s × m``) to compute it. In model mode each projected linear layer computes

    y = x·W + (x·P)·B          (rows projected: the transform's "left")
    y = x·W + (x·Bᵀ)·Qᵀ        (columns projected: "right")

with ``W`` (``m × n``) frozen for the length of a subproblem, ``P``
(``m × r``) or ``Q`` (``n × r``) a random projection regenerated from a
key, and ``B`` (``r × n``, or ``r × m``) the only trainable variable: the
kernel is ``W + P·B`` or ``W + (Q·B)ᵀ``. The backward pass never forms
``∂f/∂W``; ``∂f/∂B = Pᵀ ∂f/∂W`` (or ``Qᵀ (∂f/∂W)ᵀ``) is what the transform
computes with the same side, so the two modes take the same steps. Every
``update_gap`` steps the subproblem is merged, ``W ← W + P·B`` and
``B ← 0``, and the next step draws a new projection.

Which side of each leaf carries ``B`` is the transform's side rule
(:mod:`subspace_jax.matrix_view`; the default ``"lean"`` projects the larger
dimension, so ``B`` is ``r × min(m, n)``). The sides trade parameters for
activations: with the rows projected the backward pass keeps ``x·P``
(``s × r``) instead of ``x``, while ``∂B = (∂y·Q)ᵀ·x`` of the column side
needs ``x`` itself, so that layer's activation saving is lost (it still
never forms ``∂f/∂W``). In ``llama_7b`` the lean rule puts ``B`` on the input side
of q/k/v/o (4096 × 4096, a tie) and down_proj (11008 × 4096) and on the
output side of gate/up_proj (4096 × 11008): at rank 1024 that is 0.94B
``B`` parameters (and as many per inner moment) instead of 1.39B with
``side="left"``, which keeps the activation saving of every layer (gate
and up share their input, so lean keeps one ``s × 4096`` input per block
for the two).

Projections are never formed for a whole stacked leaf: a layer draws its own
``P`` where it uses it, from its key (:class:`Factored` carries the key of
each matrix), so in a scanned model each iteration of the layer loop draws
its layer's ``P`` and no ``(L, m, r)`` array lives through the step. With
rematerialization the backward pass draws it again (one Gaussian and one
QR, CholeskyQR for tall shapes, of ``d × r`` per projected kernel and layer,
in the forward and again in the backward pass: ``O(d r²)`` flops against the
layer's ``O(s d n)``); without it a
scanned model keeps each layer's ``P`` for the backward pass, like any
activation. The merge, too, goes one matrix at a time (:meth:`Subspace.update`).

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
  the model is applied to, gives each step's projection keys and merges.
* :func:`scale_by_factored` – the optimizer core over the trainable tree
  (``B`` leaves and the full leaves): the inner optimizer, RSO's reset and
  proximal term, and ``scale`` on the ``B`` updates.

Only random projections are supported. GaLore's (and GoLore@x%'s) SVD needs
the full gradient ``∂f/∂W`` at every refresh, the very buffer this mode
exists not to build; a step that computes it would have the memory peak of
transform mode, so for those use the transform.
"""

from __future__ import annotations

import dataclasses
import functools
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


@functools.partial(jax.tree_util.register_dataclass,
                   data_fields=("w", "b", "key"),
                   meta_fields=("projection", "transpose"))
@dataclasses.dataclass(frozen=True)
class Factored:
  """A projected kernel as a layer sees it: ``W`` and its subspace term
  kept apart, the projection given by its key (drawn where it is used).

  A pytree whose leaves are ``w``, ``b`` and ``key``; a scanned model slices
  all three along the layer axis, so each layer draws its own ``P`` inside
  the loop.

  Attributes:
    w: Frozen weights, ``batch + (m, n)``.
    b: Trainable subspace variable, ``batch + (r, k)``: ``k = n`` when the
      rows are projected (``W + P·B``, ``P`` ``m × r``), ``k = m`` when the
      columns are (``W + (Q·B)ᵀ``, ``Q`` ``n × r``).
    key: Raw ``uint32`` key data, ``batch + (2,)``: each matrix's projection
      key (:func:`subspace_jax.transform.matrix_keys`).
    projection: The sampler (a key of
      :data:`subspace_jax.projection.SAMPLERS`); static.
    transpose: True when the columns (the output side) are projected;
      static.
  """

  w: jax.Array
  b: jax.Array
  key: jax.Array
  projection: str = "scaled_stiefel"
  transpose: bool = False

  def draw(self) -> jax.Array:
    """The projection ``(d, r)`` of an unstacked kernel, in ``B``'s dtype
    (as the transform draws it, in the projected gradient's dtype)."""
    d = self.w.shape[-1] if self.transpose else self.w.shape[-2]
    return tf.draw(proj.SAMPLERS[self.projection],
                   jax.random.wrap_key_data(self.key), d, self.b.shape[-2],
                   self.b.dtype)


def dense(x: jax.Array, kernel, *, dtype=None,
          preferred_element_type=None) -> jax.Array:
  """``x @ kernel`` over the last axis of ``x``, for an array or a
  :class:`Factored` kernel: ``x·W + (x·P)·B`` (rows projected) or
  ``x·W + (x·Bᵀ)·Qᵀ`` (columns projected), ``P``/``Q`` drawn here from the
  kernel's key.

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
  p = kernel.draw().astype(dtype)
  if not kernel.transpose:
    low = jnp.matmul(x, p)  # [..., r], what backward keeps
    return mm(x, kernel.w) + mm(low, kernel.b)
  # ∂B = (∂y·Q)ᵀ·x: this side keeps x for the backward pass.
  low = jnp.matmul(x, kernel.b.astype(dtype).T)  # [..., r]
  return mm(x, kernel.w) + mm(low, p.T)


class FactoredParams(NamedTuple):
  """Parameters of a model trained in model mode.

  Attributes:
    weights: Every leaf at its full shape. Projected ones hold ``W``, frozen
      within a subproblem; the others are trained directly.
    low: ``B`` (``batch + (r, k)``, ``k`` the kept dimension) of each
      projected leaf, ``MaskedNode`` elsewhere; zero at the start of every
      subproblem.
  """

  weights: Any
  low: Any

  # Roles of the fields for sharding (subspace_jax.sharding).
  ROLES = {"weights": "params", "low": "low"}


@dataclasses.dataclass(frozen=True)
class Subspace:
  """Which leaves of a parameter tree are factored, and how.

  Build it with :meth:`for_params`. Leaf ``i`` (in ``jax.tree.flatten``
  order) of subproblem ``k`` uses the projection
  ``random_projection(projection_key(key, i, k), ...)``, the same one as
  :func:`subspace_jax.transform.scale_by_subspace` with the same ``side``;
  matrix ``j`` of a stacked leaf draws its own from
  ``fold_in(projection_key(key, i, k), j)``
  (:func:`subspace_jax.transform.matrix_keys`), inside the layer loop of a
  scanned model.

  Attributes:
    plans: One :class:`~subspace_jax.matrix_view.LeafPlan` (or None for a
      full leaf) per leaf; its ``transpose`` says which side is projected.
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
                 side: str = "lean",
                 views: Optional[mv.ViewFn] = None) -> Subspace:
    """The factoring of ``params`` (arrays or ``ShapeDtypeStruct``\\ s).

    Args:
      params: The model's parameter tree.
      rank: Rank ``r`` (clipped to each matrix).
      update_gap: Steps per subproblem.
      projection: A key of :data:`subspace_jax.projection.SAMPLERS` whose
        sampler is not ``stored`` (``"scaled_stiefel"``, ``"stiefel"``).
      seed: Seed of the projection key.
      side: Side rule (:mod:`subspace_jax.matrix_view`): ``"lean"`` (the
        default; ``B`` is ``r × min(m, n)``) or ``"left"`` (the input side
        everywhere, which keeps every layer's activation saving), or
        ``"std"``/``"right"``.
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
    if side not in mv.SIDES:
      raise ValueError(f"side must be one of {mv.SIDES}, got {side!r}")
    plans, treedef = tf.leaf_plans(params, rank=rank, side=side, views=views)
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

  def keys(self, opt_state) -> list:
    """This step's projection keys: for each projected leaf the raw key data
    of each of its matrices, ``batch + (2,)`` (None for full leaves).

    Args:
      opt_state: The optimizer state holding this subspace's
        :class:`FactoredState` (its counter and key choose ``P``).
    """
    state = factored_state(opt_state)
    key = jax.random.wrap_key_data(state.key)
    subproblem, _ = tf.subspace_schedule(state.count, self.update_gap)
    return [
        None if p is None else jax.random.key_data(tf.matrix_keys(
            tf.projection_key(key, i, subproblem), p))
        for i, p in enumerate(self.plans)
    ]

  def projections(self, params: FactoredParams, opt_state) -> list:
    """This step's projection of every leaf, ``batch + (d, r)`` (None for
    full leaves), for inspection: the step itself never forms them whole,
    each layer draws its own from :meth:`keys`.

    Args:
      params: The model-mode parameters.
      opt_state: As in :meth:`keys`.

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

  def factored(self, params: FactoredParams, trainable, keys):
    """The tree the model is applied to: a :class:`Factored` for projected
    leaves (``B`` from ``trainable``, the keys from :meth:`keys`),
    ``trainable``'s leaf elsewhere."""
    out = []
    for w, t, k, plan in zip(self._leaves(params.weights),
                             self._leaves(trainable), keys, self.plans):
      if plan is None:
        out.append(t)
      else:
        shape = plan.batch_shape + (plan.rows, plan.cols)
        out.append(Factored(w.reshape(shape), t, k, self.projection,
                            plan.transpose))
    return self.treedef.unflatten(out)

  def update(self, params: FactoredParams, trainable, keys,
             opt_state, new_opt_state,
             weight_decay: jax.Array | float = 0.0,
             finite: jax.Array | bool = True) -> FactoredParams:
    """Takes the new ``trainable`` tree, and merges at a subproblem's end.

    The frozen weights are changed in place, never copied: a weight-sized
    temporary per leaf is what a step in model mode cannot afford. So the
    step's own ``finite`` check is an argument here (a discarded step leaves
    ``W`` untouched) instead of a ``where(finite, new, old)`` after the fact,
    which would need the old and the new ``W`` at once.

    Args:
      params: The parameters before the step.
      trainable: The updated trainable tree.
      keys: The step's projection keys (from :meth:`keys`).
      opt_state: The optimizer state before the step.
      new_opt_state: The optimizer state after it. When its counter did not
        move (a wrapper skipped the update), the weights stay as they are.
      weight_decay: Factor ``c`` of a decoupled weight decay
        ``W ← W − c·W`` on the frozen weights (``learning_rate ×
        weight_decay``; ``B``'s share is decayed by the optimizer), so that
        ``W + P·B`` decays as a whole.
      finite: False when the step is to be discarded: the result is then
        ``params`` itself, ``W``, ``B`` and the full leaves.

    Returns:
      The parameters after the step: if the step ends a subproblem,
      ``W ← W + P·B`` (one matrix at a time, in place, see
      :meth:`_merge`) and ``B ← 0``.
    """
    count = factored_state(new_opt_state).count
    stepped = (count != factored_state(opt_state).count) & finite
    # The step ends a subproblem when the next one starts one.
    _, starts = tf.subspace_schedule(count, self.update_gap)
    merge = stepped & starts
    keep = lambda new, old: jnp.where(finite, new, old)
    weights, low = [], []
    for w, b, t, k, plan in zip(self._leaves(params.weights),
                                self._leaves(params.low),
                                self._leaves(trainable), keys, self.plans):
      if plan is None:
        weights.append(keep(t, w))
        low.append(_MASKED())
        continue
      if not _is_zero(weight_decay):
        # W − c·W, not W·(1 − c): 1 − c would be rounded to weight_decay's
        # float32 (3e-8 relative on every W, every step), while the
        # transform's decay rounds only the small c·X. Elementwise on the
        # donated W, so XLA updates it in place.
        c = jnp.where(stepped, weight_decay, 0).astype(w.dtype)
        w = w - c * w
      b = keep(t, b)
      # Zeroing B after the merge has read it (the barrier orders the two)
      # lets it happen in B's own buffer, not in a second B-sized one.
      w, b = jax.lax.optimization_barrier(
          (self._merge(w, b, k, plan, merge), b))
      weights.append(w)
      low.append(jnp.where(merge, jnp.zeros_like(b), b))
    return FactoredParams(weights=self.treedef.unflatten(weights),
                          low=self.treedef.unflatten(low))

  def merged_weights(self, params: FactoredParams, opt_state):
    """``W + P·B`` for every leaf: the plain weights of the current model
    (for export or a transform-mode run); ``opt_state`` as in
    :meth:`keys`. Stacked leaves are merged one matrix at a time."""
    out = []
    for w, b, k, plan in zip(self._leaves(params.weights),
                             self._leaves(params.low),
                             self.keys(opt_state), self.plans):
      out.append(w if plan is None else self._merge(w, b, k, plan, True))
    return self.treedef.unflatten(out)

  def _merge(self, w, b, keys, plan: mv.LeafPlan, merge) -> jax.Array:
    """``W + P·B`` (``W + (Q·B)ᵀ``) if ``merge``, else ``W``, in ``W``'s
    shape and dtype.

    A loop over the leaf's matrices that rewrites one slice of ``W`` per
    iteration, ``P`` drawn per matrix: the float32 (at least) product exists
    for one matrix only, and the loop carries ``W`` itself, so XLA updates
    the donated buffer in place. ``merge`` sets the trip count (zero when
    there is nothing to merge), instead of a ``lax.cond`` whose branches
    would each hand back a copy of ``W``.
    """
    acc = jnp.promote_types(w.dtype, jnp.float32)
    sampler = proj.SAMPLERS[self.projection]
    nb = plan.num_matrices
    stack = w.reshape((nb, plan.rows, plan.cols))
    b = b.reshape((nb,) + b.shape[-2:])
    keys = keys.reshape((nb, keys.shape[-1]))

    def one(i, stack):
      p = tf.draw(sampler, jax.random.wrap_key_data(keys[i]), plan.dim,
                  plan.rank, b.dtype).astype(acc)
      bi = b[i].astype(acc)
      # The operands in acc (exact for bf16 ones), not a bf16 dot with an
      # acc result: the XLA CPU runtime does not implement every such dot.
      # (Q·B)ᵀ as Bᵀ·Qᵀ, so the product comes out in W's own layout.
      delta = bi.T @ p.T if plan.transpose else p @ bi
      wi = jax.lax.dynamic_index_in_dim(stack, i, keepdims=False)
      return jax.lax.dynamic_update_index_in_dim(
          stack, (wi + delta).astype(w.dtype), i, 0)

    trips = jnp.where(merge, nb, 0)
    return jax.lax.fori_loop(0, trips, one, stack).reshape(plan.shape)


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

  # Roles of the fields for sharding (subspace_jax.sharding).
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
