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
import re
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx

import subspace_jax as sj
from subspace_jax.models import llama
from subspace_jax.training import sharding as shd

__all__ = [
    "OPTIMIZERS",
    "OptimizerConfig",
    "ModelDef",
    "TrainState",
    "Setup",
    "make_optimizer",
    "llama_views",
    "setup",
]

OPTIMIZERS = ("adamw", "galore", "golore", "rso")

# Which LLaMA weights are projected: attention and MLP kernels; embeddings,
# lm_head and norm scales go to the inner optimizer in full (as the GaLore and
# RSO papers do).
_FULL_RANK = r"embed|lm_head|norm"


def llama_views() -> sj.matrix_view.ViewFn:
  """The ``views`` rule for :mod:`subspace_jax.models.llama` parameters."""
  return sj.views_by_path([(_FULL_RANK, None)])


def _decay_mask(params):
  """Weight decay on matrices, not on norm scales (stacked ones are 2-D)."""
  return jax.tree_util.tree_map_with_path(
      lambda path, x: x.ndim >= 2
      and "norm" not in sj.matrix_view.path_str(path),
      params,
  )


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
  """Optimizer and schedule settings (all serializable).

  Attributes:
    name: One of :data:`OPTIMIZERS`.
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
    side: Side rule of the projection.
    svd: GaLore's SVD: "exact" or "randomized".
    moment_dtype: dtype name of the low-rank moments (None: the grads').
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
  side: str = "lean"
  svd: str = "exact"
  moment_dtype: str | None = None

  def __post_init__(self):
    if self.name not in OPTIMIZERS:
      raise ValueError(
          f"unknown optimizer {self.name!r}; choose one of {', '.join(OPTIMIZERS)}"
      )
    if self.total_steps <= 0 or self.warmup_steps < 0:
      raise ValueError("total_steps must be > 0 and warmup_steps >= 0")

  def leaf_plans(self, params) -> list | None:
    """The subspace transform's plan of every leaf of ``params`` (flatten
    order; None for a full leaf), or None for adamw."""
    if self.name == "adamw":
      return None
    return sj.transform.leaf_plans(
        params, rank=self.rank, side=self.side, views=llama_views()
    )[0]

  def schedule(self) -> optax.Schedule:
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=self.learning_rate,
        warmup_steps=min(self.warmup_steps, self.total_steps - 1),
        decay_steps=self.total_steps,
        end_value=self.learning_rate * self.min_lr_ratio,
    )


def make_optimizer(
    cfg: OptimizerConfig,
) -> tuple[optax.GradientTransformation, Callable[[Any], list] | None]:
  """The optax chain for ``cfg`` and the leaf-plan function of its subspace
  transform (None for adamw), used to shard the low-rank state."""
  inner = optax.scale_by_adam(b1=cfg.b1, b2=cfg.b2, eps=cfg.eps)
  views = llama_views()
  common = dict(
      rank=cfg.rank, update_gap=cfg.update_gap, scale=cfg.scale,
      side=cfg.side, views=views,
      moment_dtype=jnp.dtype(cfg.moment_dtype) if cfg.moment_dtype else None,
  )
  if cfg.name == "adamw":
    core, plans = inner, None
  else:
    if cfg.name == "galore":
      core = sj.galore(inner, svd=cfg.svd, seed=cfg.seed, **common)
    elif cfg.name == "golore":
      core = sj.golore(inner, seed=cfg.seed, svd_steps=cfg.svd_steps, **common)
    else:
      core = sj.rso(inner, seed=cfg.seed, eta=cfg.eta, **common)
    plans = cfg.leaf_plans
  parts = []
  if cfg.clip_norm:
    parts.append(optax.clip_by_global_norm(cfg.clip_norm))
  parts += [
      core,
      optax.add_decayed_weights(cfg.weight_decay, mask=_decay_mask),
      optax.scale_by_learning_rate(cfg.schedule()),
  ]
  return optax.chain(*parts), plans


class ModelDef:
  """A LLaMA's structure, applied to plain-dict parameters."""

  def __init__(self, config: llama.LlamaConfig):
    self.config = config
    graphdef, abstract = nnx.eval_shape(
        lambda: nnx.split(llama.Llama(config, rngs=nnx.Rngs(0)), nnx.Param)
    )
    self.graphdef = graphdef
    self._treedef = jax.tree.structure(abstract)
    self.logical_axes = llama.param_logical_axes(abstract)

  def init(self, seed: int) -> dict:
    """Fresh parameters (a plain nested dict)."""
    return nnx.to_pure_dict(llama.init(self.config, seed)[1])

  def apply(self, params: dict, tokens: jax.Array) -> jax.Array:
    state = jax.tree.unflatten(self._treedef, jax.tree.leaves(params))
    return llama.apply(self.graphdef, state, tokens)

  def loss(self, params: dict, batch: dict) -> jax.Array:
    logits = self.apply(params, batch["inputs"])
    return llama.cross_entropy_loss(logits, batch["targets"])


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
    mesh: The device mesh.
    state_shardings: NamedShardings of the :class:`TrainState`.
    batch_sharding: NamedSharding of a ``(batch, seq)`` array.
    abstract_state: ``ShapeDtypeStruct``\\ s (with shardings) of the state.
    init: ``seed -> TrainState``, created directly in its shardings.
    train_step: ``(state, batch) -> (state, metrics)``, the state donated.
    eval_step: ``(params, batch) -> mean loss``.
  """

  model: ModelDef
  tx: optax.GradientTransformation
  mesh: Any
  state_shardings: Any
  batch_sharding: Any
  abstract_state: Any
  init: Callable
  train_step: Callable
  eval_step: Callable


def setup(
    model_config: llama.LlamaConfig, opt: OptimizerConfig, mesh
) -> Setup:
  """Builds the sharded, jitted init/train/eval functions for one run."""
  model = ModelDef(model_config)
  tx, plans = make_optimizer(opt)

  def init(seed):
    params = model.init(seed)
    return TrainState(jnp.zeros([], jnp.int32), params, tx.init(params))

  abstract = jax.eval_shape(lambda: init(0))
  state_sh = TrainState(
      step=jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()),
      params=shd.tree_shardings(abstract.params, model.logical_axes, mesh),
      opt_state=shd.state_shardings(
          abstract.opt_state, abstract.params, model.logical_axes, mesh, plans
      ),
  )
  batch_sh = shd.batch_sharding(mesh)
  schedule = opt.schedule()

  def train_step(state: TrainState, batch):
    loss, grads = jax.value_and_grad(model.loss)(state.params, batch)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {
        "loss": loss,
        "grad_norm": optax.tree.norm(grads),
        "lr": schedule(state.step),
    }
    return TrainState(state.step + 1, params, opt_state), metrics

  abstract_state = jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
      abstract, state_sh,
  )
  return Setup(
      model=model,
      tx=tx,
      mesh=mesh,
      state_shardings=state_sh,
      batch_sharding=batch_sh,
      abstract_state=abstract_state,
      init=jax.jit(init, static_argnums=0, out_shardings=state_sh),
      train_step=jax.jit(
          train_step,
          in_shardings=(state_sh, batch_sh),
          out_shardings=(state_sh, None),
          donate_argnums=0,
      ),
      eval_step=jax.jit(
          model.loss, in_shardings=(state_sh.params, batch_sh)
      ),
  )
