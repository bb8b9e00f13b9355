"""Train state, optimizer factory and the sharded train/eval steps.

Parameters are a plain nested dict of arrays (``nnx.to_pure_dict`` of the
model's ``nnx.Param`` state), so the optimizer state, the shardings and the
checkpoints all see ordinary pytrees with readable paths
(``layers/attn/q_proj/kernel``). The model is rebuilt from them inside the
step with :class:`ModelDef`.

Data flows one way: batch → loss → grads → optimizer (clipping, subspace
transform, weight decay, learning rate) → params.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

import subspace_jax as sj
from subspace_jax import models
from subspace_jax.models import constraints
from subspace_jax.models import llama
from subspace_jax import sharding as shd

__all__ = [
    "OPTIMIZERS",
    "OptimizerConfig",
    "ModelDef",
    "TrainState",
    "Setup",
    "make_optimizer",
    "setup",
]

# The built-in optimizers: adamw and the methods of sj.transform.METHODS
# (the config reads that table when it checks a name, so an entry added to it
# later is accepted too).
OPTIMIZERS = ("adamw", *sj.transform.METHODS)
SUBSPACE_MODES = ("transform", "model")


def _optimizers() -> tuple[str, ...]:
  return ("adamw", *sj.transform.METHODS)


def _model_mode_methods() -> tuple[str, ...]:
  """Methods that can run in model mode: random projections only (GaLore's
  SVD needs the full gradient that model mode never builds)."""
  return tuple(n for n, m in sj.transform.METHODS.items() if m.model_mode)


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
  """Optimizer and schedule settings (all serializable).

  Attributes:
    name: "adamw" or a method of :data:`subspace_jax.transform.METHODS`.
    learning_rate: Peak learning rate.
    warmup_steps: Linear warm-up steps from 0.
    total_steps: Length of the cosine decay (including warm-up).
    min_lr_ratio: Final learning rate as a fraction of the peak.
    weight_decay: Decoupled weight decay on matrices (not on norm scales).
    b1: Adam's first-moment decay.
    b2: Adam's second-moment decay.
    eps: Adam's epsilon.
    clip_norm: Global gradient-norm clip (None: off).
    rank: Subspace rank (galore/golore/rso).
    update_gap: Steps between projection changes.
    scale: Factor on the back-projected update (GaLore's alpha).
    seed: Projection seed.
    svd_steps: GoLore's SVD phase (GoLore@x%).
    eta: RSO's proximal coefficient (None: off).
    side: Side rule of the projection (None: "lean"). In model mode it
      also says which side of each layer carries ``B`` ("lean": ``B`` is
      ``r × min(m, n)``; "left": the input side everywhere, which keeps
      every layer's activation saving; see :mod:`subspace_jax.factored`).
    svd: GaLore's SVD: "exact" or "randomized".
    moment_dtype: dtype name of the low-rank moments (None: the grads'); in
      model mode also of ``B`` (None: the weights').
    subspace_mode: "transform" (an optax transform on full gradients) or
      "model" (the model differentiates ``B`` of ``W + P·B`` directly, see
      :mod:`subspace_jax.factored`; golore and rso only).
  """

  name: str = "adamw"
  learning_rate: float = 1e-3
  warmup_steps: int = 100
  total_steps: int = 1000
  min_lr_ratio: float = 0.1
  weight_decay: float = 0.0
  b1: float = 0.9
  b2: float = 0.999
  eps: float = 1e-8
  clip_norm: float | None = 1.0
  rank: int = 128
  update_gap: int = 200
  scale: float = 0.25
  seed: int = 0
  svd_steps: int = 0
  eta: float | None = None
  side: str | None = None
  svd: str = "exact"
  moment_dtype: str | None = None
  subspace_mode: str = "transform"

  def __post_init__(self):
    if self.name not in _optimizers():
      raise ValueError(f"unknown optimizer {self.name!r}; choose one of "
                       f"{', '.join(_optimizers())}")
    if self.total_steps <= 0 or self.warmup_steps < 0:
      raise ValueError("total_steps must be > 0 and warmup_steps >= 0")
    if self.subspace_mode not in SUBSPACE_MODES:
      raise ValueError(f"unknown subspace mode {self.subspace_mode!r}; "
                       f"choose one of {', '.join(SUBSPACE_MODES)}")
    if self.model_mode:
      if self.name not in _model_mode_methods():
        raise ValueError(
            f"subspace mode 'model' supports "
            f"{' and '.join(_model_mode_methods())}, not "
            f"{self.name}: GaLore's SVD needs the full gradient, which model "
            "mode never builds; use subspace_mode='transform'")
      if self.svd_steps:
        raise ValueError("svd_steps (GoLore@x%) needs the full gradient for "
                         "its SVD phase; it is not available in model mode")

  @property
  def model_mode(self) -> bool:
    """Whether the model differentiates the subspace variables directly."""
    return self.subspace_mode == "model"

  @property
  def method(self) -> sj.transform.Method | None:
    """The subspace method of :data:`subspace_jax.transform.METHODS` (None
    for adamw)."""
    return sj.transform.METHODS.get(self.name)

  @property
  def effective_side(self) -> str:
    return self.side or "lean"

  def subspace(self, params, views: sj.matrix_view.ViewFn
               ) -> sj.factored.Subspace:
    """Model mode's factoring of ``params`` (arrays or abstract); ``views``
    is the model's (:attr:`subspace_jax.models.Model.views`)."""
    return sj.factored.Subspace.for_params(
        params, rank=self.rank, update_gap=self.update_gap,
        projection=self.method.projection, seed=self.seed,
        side=self.effective_side, views=views)

  def leaf_plans(self, params, views: sj.matrix_view.ViewFn) -> list | None:
    """The subspace transform's plan of every leaf of ``params`` (flatten
    order; None for a full leaf), or None for adamw."""
    if self.method is None:
      return None
    return sj.transform.leaf_plans(
        params, rank=self.rank, side=self.effective_side, views=views)[0]

  def schedule(self) -> optax.Schedule:
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=self.learning_rate,
        warmup_steps=min(self.warmup_steps, self.total_steps - 1),
        decay_steps=self.total_steps,
        end_value=self.learning_rate * self.min_lr_ratio,
    )


def make_optimizer(
    cfg: OptimizerConfig, model: models.Model, params=None,
) -> tuple[optax.GradientTransformation, Callable[[Any], list] | None]:
  """The optax chain for ``cfg`` and the leaf-plan function of its subspace
  transform (None for adamw), used to shard the low-rank state.

  Args:
    cfg: The optimizer settings.
    model: The model family (:data:`subspace_jax.models.MODELS`): its views
      say which weights are projected, its decay mask which are decayed.
    params: The (abstract) weights; model mode needs them to know which
      leaves are factored (its chain runs on the trainable tree,
      :meth:`subspace_jax.factored.Subspace.trainable`).
  """
  inner = optax.scale_by_adam(b1=cfg.b1, b2=cfg.b2, eps=cfg.eps)
  views = model.views()
  common = dict(
      rank=cfg.rank, update_gap=cfg.update_gap, scale=cfg.scale,
      side=cfg.effective_side, views=views,
      moment_dtype=jnp.dtype(cfg.moment_dtype) if cfg.moment_dtype else None,
  )
  method = cfg.method
  # Settings a method has no use for are ignored, not refused.
  eta = cfg.eta if method and method.proximal else None
  if method is None:
    core = inner
  elif cfg.model_mode:
    if params is None:
      raise ValueError("model mode needs the weights to build its optimizer")
    core = sj.factored.scale_by_factored(
        inner, subspace=cfg.subspace(params, views), scale=cfg.scale,
        reset_inner=method.reset_inner, eta=eta)
  else:
    core = sj.transform.scale_by_method(
        cfg.name, inner, svd=cfg.svd, seed=cfg.seed, eta=eta,
        svd_steps=cfg.svd_steps if method.svd_phase else 0, **common)
  plans = None if method is None else (lambda p: cfg.leaf_plans(p, views))
  parts = []
  if cfg.clip_norm:
    parts.append(optax.clip_by_global_norm(cfg.clip_norm))
  parts += [
      core,
      optax.add_decayed_weights(cfg.weight_decay, mask=model.decay_mask),
      optax.scale_by_learning_rate(cfg.schedule()),
  ]
  return optax.chain(*parts), plans


# The LLaMA adapter (init/apply/loss on plain-dict parameters); setup()
# takes each model's own through the registry.
ModelDef = llama.ModelDef


class TrainState(NamedTuple):
  """Everything a step changes: the checkpoint holds exactly this."""

  step: jax.Array
  params: Any
  opt_state: Any


@dataclasses.dataclass
class Setup:
  """A model, optimizer and mesh, with the jitted functions that use them.

  Attributes:
    model: The :class:`ModelDef`.
    tx: The optimizer.
    plans: The subspace plan of every weight (flatten order; None for a
      leaf kept in full), or None for adamw.
    mesh: The device mesh.
    state_shardings: NamedShardings of the :class:`TrainState`.
    batch_sharding: NamedSharding of a ``(batch, seq)`` array.
    abstract_state: ``ShapeDtypeStruct``\\ s (with shardings) of the state.
    init: ``seed -> TrainState``, created directly in its shardings.
    init_from: ``params -> TrainState``: the state that starts from these
      weights (a plain dict, e.g. from :func:`subspace_jax.models.io.hf.load`;
      donated), in its shardings.
    subspace: Model mode's :class:`~subspace_jax.factored.Subspace` (None
      in transform mode), to merge ``W + P·B`` for an export.
    train_step: ``(state, batch) -> (state, metrics)``, the state donated.
      A step whose loss or gradient norm is not finite returns the state
      unchanged (``step`` included) and ``metrics["finite"] = False``.
    eval_step: ``(state, batch) -> mean loss``.
    state_is_finite: ``state -> bool`` array: whether every float array of
      the state is finite (checked before a checkpoint is written).
  """

  model: ModelDef
  tx: optax.GradientTransformation
  plans: list | None
  mesh: Any
  state_shardings: Any
  batch_sharding: Any
  abstract_state: Any
  init: Callable
  init_from: Callable
  subspace: Any
  train_step: Callable
  eval_step: Callable
  state_is_finite: Callable


class _Mode(NamedTuple):
  """What differs between transform and model mode in :func:`setup`.

  Attributes:
    init: ``seed -> TrainState``.
    state_of: ``weights -> TrainState``: the state that starts from them.
    loss_and_grads: ``(state, batch) -> (loss, grads, trainable, keys)``;
      ``trainable`` is what the optimizer updates, ``keys`` model mode's
      projection keys (:meth:`subspace_jax.factored.Subspace.keys`).
    apply_updates: ``(state, trainable, updates, keys, opt_state, finite)
      -> params``, ``opt_state`` the optimizer's new state; when
      ``finite`` is False the result is ``state.params`` unchanged.
    eval_loss: ``(state, batch) -> loss``.
    params_shardings: ``abstract params -> their shardings``.
  """

  init: Callable
  state_of: Callable
  loss_and_grads: Callable
  apply_updates: Callable
  eval_loss: Callable
  params_shardings: Callable


def _transform_mode(model: ModelDef, tx, axes, mesh) -> _Mode:
  """The plain step: the optimizer updates the weights themselves."""

  def state_of(params):
    return TrainState(jnp.zeros([], jnp.int32), params, tx.init(params))

  def init(seed):
    return state_of(model.init(seed))

  def loss_and_grads(state, batch):
    loss, grads = jax.value_and_grad(model.loss)(state.params, batch)
    return loss, grads, state.params, None

  def apply_updates(state, params, updates, keys, opt_state, finite):
    del state, keys, opt_state
    # Fused with the update, elementwise on the donated weights: in place.
    return jax.tree.map(lambda n, o: jnp.where(finite, n, o),
                        optax.apply_updates(params, updates), params)

  def eval_loss(state, batch):
    return model.loss(state.params, batch)

  return _Mode(init, state_of, loss_and_grads, apply_updates, eval_loss,
               lambda abstract: shd.tree_shardings(abstract, axes, mesh))


def _model_mode(model: ModelDef, opt: OptimizerConfig, subspace, weights, tx,
                plans, axes, mesh) -> _Mode:
  """Model mode's step: the optimizer updates ``B`` and the full leaves."""
  low_dtype = jnp.dtype(opt.moment_dtype) if opt.moment_dtype else None
  schedule = opt.schedule()

  def state_of(weights):
    params = subspace.init(weights, low_dtype)
    return TrainState(jnp.zeros([], jnp.int32), params,
                      tx.init(subspace.trainable(params)))

  def init(seed):
    return state_of(model.init(seed))

  def loss_and_grads(state, batch):
    params = state.params
    # Keys, not projections: each layer draws its P inside the model (in
    # the scan body of a scanned one), so no (L, d, r) array lives through
    # the step.
    keys = subspace.keys(state.opt_state)
    trainable = subspace.trainable(params)
    loss_of = lambda t: model.loss(subspace.factored(params, t, keys), batch)
    loss, grads = jax.value_and_grad(loss_of)(trainable)
    return loss, grads, trainable, keys

  def apply_updates(state, trainable, updates, keys, opt_state, finite):
    trainable = optax.apply_updates(trainable, updates)
    decay = 0.0
    if opt.weight_decay:
      # lr × wd in the weights' precision, as optax's chain forms it, at the
      # optimizer's own count (the one the learning-rate schedule reads).
      acc = jnp.promote_types(model.config.param_dtype, jnp.float32)
      count = sj.factored.factored_state(state.opt_state).count
      decay = schedule(count).astype(acc) * opt.weight_decay
    # The frozen weights are gated by `finite` inside (merged and decayed
    # in place), not selected after: that would hold two copies of W.
    return subspace.update(state.params, trainable, keys, state.opt_state,
                           opt_state, decay, finite)

  def eval_loss(state, batch):
    params = state.params
    return model.loss(subspace.factored(
        params, subspace.trainable(params),
        subspace.keys(state.opt_state)), batch)

  def params_shardings(abstract):
    return shd.state_shardings(abstract, weights, axes, mesh, plans,
                               factored=True)

  return _Mode(init, state_of, loss_and_grads, apply_updates, eval_loss,
               params_shardings)


def setup(
    model_config: Any, opt: OptimizerConfig, mesh
) -> Setup:
  """Builds the sharded, jitted init/train/eval functions for one run.

  In model mode (``opt.subspace_mode == "model"``) the state's ``params``
  are :class:`~subspace_jax.factored.FactoredParams`: the step
  differentiates only ``B`` and the full leaves, and merges ``W ← W + P·B``
  at the end of every subproblem, inside the jitted step.
  """
  family = models.for_config(model_config)
  model = family.model_def(model_config)
  weights = jax.eval_shape(lambda: model.init(0))
  tx, plans = make_optimizer(opt, family, weights)
  schedule = opt.schedule()
  axes = model.logical_axes
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  subspace = None
  if opt.model_mode:
    subspace = opt.subspace(weights, family.views())
    mode = _model_mode(model, opt, subspace, weights, tx, plans, axes, mesh)
  else:
    mode = _transform_mode(model, tx, axes, mesh)
  (init, state_of, loss_and_grads, apply_updates, eval_loss,
   params_shardings) = mode

  def train_step(state: TrainState, batch):
    loss, grads, trainable, keys = loss_and_grads(state, batch)
    updates, opt_state = tx.update(grads, state.opt_state, trainable)
    grad_norm = optax.tree.norm(grads)
    # A step with a non-finite loss or gradient changes nothing, its step
    # counter included; the loop counts these (metrics["finite"]) and stops
    # after too many. The updates are not part of the test: whether they
    # are finite is known only once every new moment exists, and the state
    # could then not be updated in place (the old and the new optimizer
    # state would both be held: at 7B, rank 1024, 1.75 GiB per chip). From
    # a finite gradient the built-in optimizers make finite updates; a state
    # that still turns non-finite fails the next step's loss, and the loop
    # never checkpoints it (Setup.state_is_finite).
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    keep = lambda n, o: jnp.where(finite, n, o)
    params = apply_updates(state, trainable, updates, keys, opt_state, finite)
    new = TrainState(keep(state.step + 1, state.step), params,
                     jax.tree.map(keep, opt_state, state.opt_state))
    metrics = {"loss": loss, "grad_norm": grad_norm,
               "lr": schedule(state.step), "finite": finite}
    return new, metrics

  abstract = jax.eval_shape(lambda: init(0))
  state_sh = TrainState(
      step=replicated,
      params=params_shardings(abstract.params),
      opt_state=shd.state_shardings(
          abstract.opt_state, weights, axes, mesh, plans,
          factored=opt.model_mode),
  )
  batch_sh = shd.batch_sharding(mesh)
  abstract_state = jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
      abstract, state_sh,
  )
  return Setup(
      model=model,
      tx=tx,
      plans=plans(weights) if plans else None,
      mesh=mesh,
      state_shardings=state_sh,
      batch_sharding=batch_sh,
      abstract_state=abstract_state,
      init=jax.jit(init, static_argnums=0, out_shardings=state_sh),
      init_from=jax.jit(state_of, out_shardings=state_sh, donate_argnums=0),
      subspace=subspace,
      train_step=jax.jit(
          _with_activation_sharding(train_step, mesh),
          in_shardings=(state_sh, batch_sh),
          out_shardings=(state_sh, None),
          donate_argnums=0,
      ),
      eval_step=jax.jit(_with_activation_sharding(eval_loss, mesh),
                        in_shardings=(state_sh, batch_sh)),
      state_is_finite=jax.jit(_all_finite, in_shardings=(state_sh,)),
  )


def _all_finite(tree) -> jax.Array:
  """Whether every inexact array of ``tree`` is finite (one bool)."""
  leaves = [x for x in jax.tree.leaves(tree)
            if jnp.issubdtype(x.dtype, jnp.inexact)]
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]))


def _with_activation_sharding(fn: Callable, mesh) -> Callable:
  """``fn`` traced with the model's activations constrained to ``mesh``:
  batch over the data-parallel axes, heads, MLP and vocabulary features over
  the tensor axis (:mod:`subspace_jax.models.constraints`)."""
  def sharding(names, shape):
    return jax.sharding.NamedSharding(
        mesh, shd.logical_spec(names, shape, mesh))

  @functools.wraps(fn)
  def traced(*args):
    with constraints.activation_sharding(sharding):
      return fn(*args)

  return traced
