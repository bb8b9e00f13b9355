"""The train state and the sharded train/eval steps.

Parameters are a plain nested dict of arrays (``nnx.to_pure_dict`` of the
model's ``nnx.Param`` state), so the optimizer state, the shardings and the
checkpoints all see ordinary pytrees with readable paths
(``layers/attn/q_proj/kernel``). The model is rebuilt from them inside the
step with :class:`ModelDef`.

Data flows one way: batch → loss → grads → optimizer (clipping, subspace
transform, weight decay, learning rate; :mod:`~subspace_jax.train.optimizer`)
→ params. :func:`train_step` and :func:`eval_step` are pure functions of a
:class:`Mode` (what transform and model mode do differently) and the state;
:func:`setup` jits them with the run's shardings.
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
from subspace_jax.naming import setting
from subspace_jax.train.optimizer import (OPTIMIZERS, OptimizerConfig,
                                          make_optimizer)

__all__ = [
    "OPTIMIZERS",
    "Mode",
    "ModelDef",
    "OptimizerConfig",
    "Setup",
    "TrainState",
    "check_rank",
    "eval_step",
    "make_optimizer",
    "model_mode",
    "setup",
    "train_step",
    "transform_mode",
]

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


class Mode(NamedTuple):
  """What differs between transform and model mode in a step.

  Attributes:
    init: ``seed -> TrainState``.
    state_of: ``weights -> TrainState``: the state that starts from them.
    inputs: ``state -> (trainable, keys)``: what the optimizer updates, and
      model mode's projection keys
      (:meth:`subspace_jax.factored.Subspace.keys`; None in transform mode).
    loss_and_grads: ``(state, trainable, keys, batch) -> (loss, grads)``,
      the gradient of the trainable tree.
    apply_updates: ``(state, trainable, updates, keys, opt_state, finite)
      -> params``, ``opt_state`` the optimizer's new state; when
      ``finite`` is False the result is ``state.params`` unchanged.
    eval_loss: ``(state, batch) -> loss``.
    params_shardings: ``abstract params -> their shardings``.
  """

  init: Callable
  state_of: Callable
  inputs: Callable
  loss_and_grads: Callable
  apply_updates: Callable
  eval_loss: Callable
  params_shardings: Callable


def transform_mode(model: ModelDef, tx, axes, mesh) -> Mode:
  """The plain step: the optimizer updates the weights themselves."""

  def state_of(params):
    return TrainState(jnp.zeros([], jnp.int32), params, tx.init(params))

  def init(seed):
    return state_of(model.init(seed))

  def loss_and_grads(state, trainable, keys, batch):
    del state, keys
    return jax.value_and_grad(model.loss)(trainable, batch)

  def apply_updates(state, params, updates, keys, opt_state, finite):
    del state, keys, opt_state
    # Fused with the update, elementwise on the donated weights: in place.
    return jax.tree.map(lambda n, o: jnp.where(finite, n, o),
                        optax.apply_updates(params, updates), params)

  def eval_loss(state, batch):
    return model.loss(state.params, batch)

  return Mode(init, state_of, lambda state: (state.params, None),
              loss_and_grads, apply_updates, eval_loss,
              lambda abstract: shd.tree_shardings(abstract, axes, mesh))


def model_mode(model: ModelDef, opt: OptimizerConfig, subspace, weights, tx,
               plans, axes, mesh) -> Mode:
  """Model mode's step: the optimizer updates ``B`` and the full leaves."""
  low_dtype = jnp.dtype(opt.moment_dtype) if opt.moment_dtype else None
  schedule = opt.schedule()

  def state_of(weights):
    params = subspace.init(weights, low_dtype)
    return TrainState(jnp.zeros([], jnp.int32), params,
                      tx.init(subspace.trainable(params)))

  def init(seed):
    return state_of(model.init(seed))

  def inputs(state):
    # Keys, not projections: each layer draws its P inside the model (in
    # the scan body of a scanned one), so no (L, d, r) array lives through
    # the step.
    return (subspace.trainable(state.params),
            subspace.keys(state.opt_state))

  def loss_and_grads(state, trainable, keys, batch):
    loss_of = lambda t: model.loss(
        subspace.factored(state.params, t, keys), batch)
    return jax.value_and_grad(loss_of)(trainable)

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
    return model.loss(subspace.factored(state.params, *inputs(state)), batch)

  def params_shardings(abstract):
    return shd.state_shardings(abstract, weights, axes, mesh, plans,
                               factored=True)

  return Mode(init, state_of, inputs, loss_and_grads, apply_updates,
              eval_loss, params_shardings)


def _micro_batches(batch, n: int):
  """``batch`` (arrays ``[batch, ...]``) as ``n`` micro-batches stacked on
  a new leading axis. Micro-batch ``j`` is rows ``j, j + n, j + 2n, ...``:
  each device's rows of the batch hold its share of every micro-batch, so
  splitting moves no data between devices."""
  def split(x):
    if x.shape[0] % n:
      raise ValueError(f"a batch of {x.shape[0]} rows does not split into "
                       f"{n} micro-batches")
    return x.reshape(x.shape[0] // n, n, *x.shape[1:]).swapaxes(0, 1)
  return jax.tree.map(split, batch)


def gradients(mode: Mode, state: TrainState, trainable, keys, batch,
              grad_accum: int = 1):
  """The mean loss and gradient of ``batch``, computed on ``grad_accum``
  micro-batches one after another (a scan that holds one micro-batch's
  activations and the sum of the gradients)."""
  if grad_accum == 1:
    return mode.loss_and_grads(state, trainable, keys, batch)

  def add(total, micro):
    loss, grads = mode.loss_and_grads(state, trainable, keys, micro)
    return jax.tree.map(jnp.add, total, (loss, grads)), None

  zeros = jax.tree.map(jnp.zeros_like, (jnp.zeros([], jnp.float32), trainable))
  (loss, grads), _ = jax.lax.scan(add, zeros, _micro_batches(batch, grad_accum))
  return jax.tree.map(lambda x: x / grad_accum, (loss, grads))


def train_step(mode: Mode, tx: optax.GradientTransformation,
               schedule: optax.Schedule, state: TrainState, batch,
               grad_accum: int = 1) -> tuple[TrainState, dict]:
  """One update: ``(state, batch) -> (new state, metrics)``.

  The batch's gradients (averaged over ``grad_accum`` micro-batches) go
  through the optimizer ``tx``. A step with a non-finite loss or gradient
  changes nothing, its step counter included: the new state is the old
  one and ``metrics["finite"]`` is False (the loop counts these and stops
  after too many). The updates are not part of the test: whether they are
  finite is known only once every new moment exists, and the state could
  then not be updated in place (the old and the new optimizer state would
  both be held: at 7B, rank 1024, 1.75 GiB per chip). From a finite
  gradient the built-in optimizers make finite updates; a state that still
  turns non-finite fails the next step's loss, and the loop never
  checkpoints it (:attr:`Setup.state_is_finite`).
  """
  trainable, keys = mode.inputs(state)
  loss, grads = gradients(mode, state, trainable, keys, batch, grad_accum)
  updates, opt_state = tx.update(grads, state.opt_state, trainable)
  grad_norm = optax.tree.norm(grads)
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
  keep = lambda n, o: jnp.where(finite, n, o)
  params = mode.apply_updates(state, trainable, updates, keys, opt_state,
                              finite)
  new = TrainState(keep(state.step + 1, state.step), params,
                   jax.tree.map(keep, opt_state, state.opt_state))
  metrics = {"loss": loss, "grad_norm": grad_norm,
             "lr": schedule(state.step), "finite": finite}
  return new, metrics


def eval_step(mode: Mode, state: TrainState, batch) -> jax.Array:
  """The mean loss of ``batch`` under ``state``'s weights."""
  return mode.eval_loss(state, batch)


def setup(
    model_config: Any, opt: OptimizerConfig, mesh
) -> Setup:
  """Builds the sharded, jitted init/train/eval functions for one run.

  In model mode (``opt.subspace_mode == "model"``) the state's ``params``
  are :class:`~subspace_jax.factored.FactoredParams`: the step
  differentiates only ``B`` and the full leaves, and merges ``W ← W + P·B``
  at the end of every subproblem, inside the jitted step. An unset rank
  takes its default for the model (:meth:`OptimizerConfig.with_model`).
  """
  opt = opt.with_model(model_config)
  family = models.for_config(model_config)
  model = family.model_def(model_config)
  weights = jax.eval_shape(lambda: model.init(0))
  axes = model.logical_axes
  # The transform follows the weights' sharding (model mode's B does so
  # through its own layers).
  tx, plans = make_optimizer(opt, family, weights,
                             shd.tree_shardings(weights, axes, mesh))
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  subspace = None
  if opt.model_mode:
    subspace = opt.subspace(weights, family.views())
    mode = model_mode(model, opt, subspace, weights, tx, plans, axes, mesh)
  else:
    mode = transform_mode(model, tx, axes, mesh)

  abstract = jax.eval_shape(lambda: mode.init(0))
  state_sh = TrainState(
      step=replicated,
      params=mode.params_shardings(abstract.params),
      opt_state=shd.state_shardings(
          abstract.opt_state, weights, axes, mesh, plans,
          factored=opt.model_mode),
  )
  batch_sh = shd.batch_sharding(mesh)
  abstract_state = jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
      abstract, state_sh,
  )
  step = functools.partial(train_step, mode, tx, opt.schedule(),
                           grad_accum=opt.grad_accum)
  return Setup(
      model=model,
      tx=tx,
      plans=plans(weights) if plans else None,
      mesh=mesh,
      state_shardings=state_sh,
      batch_sharding=batch_sh,
      abstract_state=abstract_state,
      init=jax.jit(mode.init, static_argnums=0, out_shardings=state_sh),
      init_from=jax.jit(mode.state_of, out_shardings=state_sh,
                        donate_argnums=0),
      subspace=subspace,
      train_step=jax.jit(
          _with_activation_sharding(step, mesh),
          in_shardings=(state_sh, batch_sh),
          out_shardings=(state_sh, None),
          donate_argnums=0,
      ),
      eval_step=jax.jit(
          _with_activation_sharding(functools.partial(eval_step, mode), mesh),
          in_shardings=(state_sh, batch_sh)),
      state_is_finite=jax.jit(_all_finite, in_shardings=(state_sh,)),
  )


def check_rank(setup: Setup, opt: OptimizerConfig) -> None:
  """Refuses a rank larger than a projected matrix's smaller dimension.

  The transforms would clip it silently (``min(rank, rows, cols)``); a run
  asked for rank r should know when some matrices cannot have it.

  Raises:
    ValueError: Naming the smallest projected matrix and its size.
  """
  params = setup.abstract_state.params
  if isinstance(params, sj.factored.FactoredParams):
    params = params.weights
  plans = setup.plans
  if plans is None:
    return
  paths = [sj.matrix_view.path_str(p)
           for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
  projected = [(min(p.rows, p.cols), path, p)
               for path, p in zip(paths, plans) if p is not None]
  if not projected:
    return
  smallest, path, plan = min(projected, key=lambda t: t[0])
  if opt.rank > smallest:
    raise ValueError(
        f"{setting('optimizer.rank')} {opt.rank} is larger than projected "
        f"matrix {path!r} ({plan.rows} x {plan.cols}) allows; use "
        f"{setting('optimizer.rank')} {smallest} or less")


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
