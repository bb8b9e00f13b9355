"""The optimizer of a train step: its settings, their defaults and checks,
and the optax chain they make.

:class:`OptimizerConfig` holds every setting (JSON-serializable) and checks
all of them when it is made; what each subspace method accepts is read from
:data:`subspace_jax.transform.METHODS`. :func:`make_optimizer` builds the
chain: global-norm clipping, the subspace transform (or Adam), decoupled
weight decay, the learning-rate schedule, and ``optax.MultiSteps`` around
them when gradients are accumulated.

Defaults by optimizer (:data:`DEFAULTS`: learning rate and scale) are those
the quality study found best on the default run
(``benchmarks/results/quality.md``); the side of the projection defaults to
each method's (:attr:`subspace_jax.transform.Method.side`).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import jax.numpy as jnp
import optax

import subspace_jax as sj
from subspace_jax import models
from subspace_jax.naming import setting

__all__ = [
    "DEFAULTS",
    "OPTIMIZERS",
    "SUBSPACE_MODES",
    "WARMUP",
    "OptimizerConfig",
    "default_warmup",
    "make_optimizer",
    "model_mode_methods",
]

OPTIMIZERS = ("adamw", *sj.transform.METHODS)
"""The built-in optimizers: AdamW and every subspace method."""
SUBSPACE_MODES = ("transform", "model")

WARMUP = 50
"""Default warm-up steps (a tenth of a shorter schedule:
:func:`default_warmup`)."""

DEFAULTS: dict[str, dict[str, float]] = {
    "adamw": {"learning_rate": 5e-3},
    "galore": {"learning_rate": 4e-2, "scale": 0.25},
    "golore": {"learning_rate": 8e-2, "scale": 0.25},
    "rso": {"learning_rate": 8e-2, "scale": 0.25},
}
"""Default peak learning rate and scale of each optimizer (pretraining from
scratch): the best of the quality study's sweeps on the default run. A
subspace method's updates of the projected matrices are multiplied by
``scale``; the learning rate applies to all, so ``learning_rate × scale``
is the step of those matrices and ``learning_rate`` that of the
embeddings, norms and output layer."""

FINETUNE_LEARNING_RATE = 2e-5
"""AdamW's default peak learning rate from a pretrained checkpoint (a usual
full fine-tuning rate of LLaMA-2 7B); a subspace method's default is this
over its scale, the same step of the projected matrices
(:func:`finetune_learning_rate`)."""


def default_warmup(total_steps: int) -> int:
  """:data:`WARMUP` steps, or a tenth of a schedule not longer than that (a
  warm-up as long as the run would leave no step at the peak)."""
  return WARMUP if total_steps > WARMUP else total_steps // 10


def finetune_learning_rate(name: str, scale: float | None = None) -> float:
  """The default peak learning rate of optimizer ``name`` from a pretrained
  checkpoint: :data:`FINETUNE_LEARNING_RATE` for AdamW, over ``scale``
  (default: the optimizer's) for a subspace method."""
  if name == "adamw":
    return FINETUNE_LEARNING_RATE
  if scale is None:
    scale = DEFAULTS.get(name, {}).get("scale", 1.0)
  return FINETUNE_LEARNING_RATE / scale


def model_mode_methods() -> tuple[str, ...]:
  """Methods that can run in model mode: their projection must not need
  the gradient (GaLore's SVD needs the full gradient model mode never
  builds)."""
  return tuple(n for n, m in sj.transform.METHODS.items() if m.model_mode)


def _number(value: Any) -> bool:
  return isinstance(value, (int, float)) and not isinstance(value, bool)


def _positive(field: str, value: Any) -> None:
  if not (_number(value) and math.isfinite(value) and value > 0):
    raise ValueError(f"{setting(field)} must be a finite number > 0, got "
                     f"{value}")


def _integer(field: str, value: Any, least: int) -> None:
  if not isinstance(value, int) or isinstance(value, bool) or value < least:
    raise ValueError(f"{setting(field)} must be an integer >= {least}, got "
                     f"{value}")


def _float_dtype(field: str, name: str | None) -> None:
  if name is None:
    return
  try:
    ok = jnp.issubdtype(jnp.dtype(name), jnp.floating)
  except TypeError:
    ok = False
  if not ok:
    raise ValueError(f"{setting(field)} {name!r} is not a float dtype; use "
                     "float32 or bfloat16")


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
  """Optimizer and schedule settings (all serializable), checked when made.

  A field left None takes its default when the config is made (so the
  saved settings of a run hold the values it used), except ``rank``, which
  needs the model (:meth:`with_model`; a run's config sets it).

  Attributes:
    name: "adamw" or a method of :data:`subspace_jax.transform.METHODS`.
    learning_rate: Peak learning rate (None: :data:`DEFAULTS`).
    warmup_steps: Linear warm-up steps from 0 (None:
      :func:`default_warmup` of the schedule).
    total_steps: Length of the cosine decay (including warm-up).
    min_lr_ratio: Final learning rate as a fraction of the peak.
    weight_decay: Decoupled weight decay on matrices (not on norm scales).
    b1: Adam's first-moment decay.
    b2: Adam's second-moment decay.
    eps: Adam's epsilon.
    clip_norm: Global gradient-norm clip (None: off).
    rank: Subspace rank (None: the model's hidden size / 4, as in the
      GaLore paper, once :meth:`with_model` is given the model).
    update_gap: Steps between projection changes.
    scale: Factor on the back-projected update (GaLore's alpha; None:
      :data:`DEFAULTS`).
    seed: Projection seed.
    svd_steps: GoLore's SVD phase (GoLore@x%), for a method with an SVD
      phase.
    eta: The proximal coefficient of a proximal method (RSO; None: off).
    side: Side rule of the projection (None: the method's
      :attr:`~subspace_jax.transform.Method.side`). In model mode it also
      says which side of each layer carries ``B`` ("lean": ``B`` is
      ``r × min(m, n)``; "left": the input side everywhere, which keeps
      every layer's activation saving; see :mod:`subspace_jax.factored`).
    svd: GaLore's SVD: "exact" or "randomized".
    moment_dtype: dtype name of the low-rank moments (None: the grads'); in
      model mode also of ``B`` (None: the weights').
    subspace_mode: "transform" (an optax transform on full gradients) or
      "model" (the model differentiates ``B`` of ``W + P·B`` directly, see
      :mod:`subspace_jax.factored`; the methods of
      :func:`model_mode_methods`).
    grad_accum: Micro-batches whose gradients are averaged into each
      update: the train step splits its batch into this many and computes
      their gradients one after another (:func:`subspace_jax.train.step.
      gradients`), so one step is still one update (schedules, the update
      gap and checkpoints count updates) and only one micro-batch's
      activations are held.
  """

  name: str = "adamw"
  learning_rate: float | None = None
  warmup_steps: int | None = None
  total_steps: int = 1000
  min_lr_ratio: float = 0.1
  weight_decay: float = 0.0
  b1: float = 0.9
  b2: float = 0.999
  eps: float = 1e-8
  clip_norm: float | None = 1.0
  rank: int | None = None
  update_gap: int = 200
  scale: float | None = None
  seed: int = 0
  svd_steps: int = 0
  eta: float | None = None
  side: str | None = None
  svd: str = "exact"
  moment_dtype: str | None = None
  subspace_mode: str = "transform"
  grad_accum: int = 1

  def __post_init__(self):
    known = ("adamw", *sj.transform.METHODS)  # The table as it is now.
    if self.name not in known:
      raise ValueError(f"{setting('optimizer.name')}: unknown optimizer "
                       f"{self.name!r}; choose one of {', '.join(known)}")
    defaults = DEFAULTS.get(self.name, {})
    resolved = {
        "learning_rate": defaults.get("learning_rate", 1e-3),
        "scale": defaults.get("scale", 1.0),
        "side": self.method.side if self.method else None,
    }
    for field, value in resolved.items():
      if getattr(self, field) is None:
        object.__setattr__(self, field, value)
    _integer("optimizer.total_steps", self.total_steps, 1)
    if self.warmup_steps is None:
      object.__setattr__(self, "warmup_steps", default_warmup(self.total_steps))
    self._check_schedule()
    self._check_method()

  def _check_schedule(self) -> None:
    _positive("optimizer.learning_rate", self.learning_rate)
    _integer("optimizer.warmup_steps", self.warmup_steps, 0)
    if self.warmup_steps > self.total_steps:
      raise ValueError(
          f"{setting('optimizer.warmup_steps')} {self.warmup_steps} is longer "
          f"than the {self.total_steps}-step schedule "
          f"({setting('optimizer.total_steps')}); use "
          f"{setting('optimizer.warmup_steps')} {self.total_steps} or less, "
          "or a longer schedule")
    ratio = self.min_lr_ratio
    if not (_number(ratio) and 0 <= ratio <= 1):
      raise ValueError(f"{setting('optimizer.min_lr_ratio')} must be in "
                       f"[0, 1], got {ratio}")
    decay = self.weight_decay
    if not (_number(decay) and math.isfinite(decay) and decay >= 0):
      raise ValueError(f"{setting('optimizer.weight_decay')} must be a finite "
                       f"number >= 0, got {decay}")
    if self.clip_norm is not None and self.clip_norm != 0:
      clip = self.clip_norm
      if not (_number(clip) and math.isfinite(clip) and clip > 0):
        raise ValueError(f"{setting('optimizer.clip_norm')} must be a finite "
                         f"number > 0 (or 0: no clipping), got {clip}")
    for field in ("b1", "b2"):
      value = getattr(self, field)
      if not (_number(value) and 0 <= value < 1):
        raise ValueError(f"{setting('optimizer.' + field)} must be in [0, 1), "
                         f"got {value}")
    if not (_number(self.eps) and math.isfinite(self.eps) and self.eps >= 0):
      raise ValueError(f"{setting('optimizer.eps')} must be a finite number "
                       f">= 0, got {self.eps}")
    _integer("optimizer.grad_accum", self.grad_accum, 1)

  def _check_method(self) -> None:
    """The subspace settings, against what the method accepts."""
    if self.rank is not None:
      _integer("optimizer.rank", self.rank, 1)
    _integer("optimizer.update_gap", self.update_gap, 1)
    _integer("optimizer.seed", self.seed, 0)
    _integer("optimizer.svd_steps", self.svd_steps, 0)
    _positive("optimizer.scale", self.scale)
    _float_dtype("optimizer.moment_dtype", self.moment_dtype)
    if self.subspace_mode not in SUBSPACE_MODES:
      raise ValueError(f"{setting('optimizer.subspace_mode')} must be one of "
                       f"{', '.join(SUBSPACE_MODES)}, got "
                       f"{self.subspace_mode!r}")
    if self.side is not None and self.side not in sj.matrix_view.SIDES:
      raise ValueError(f"{setting('optimizer.side')} must be one of "
                       f"{', '.join(sj.matrix_view.SIDES)}, got {self.side!r}")
    method, which = self.method, f"{setting('optimizer.name')} {self.name}"
    variants = method.svd_variants if method else {}
    if self.svd != "exact" and self.svd not in variants:
      raise ValueError(f"{setting('optimizer.svd')} must be "
                       f"{' or '.join(variants) or 'exact'} for {which}, got "
                       f"{self.svd!r}")
    if self.eta is not None:
      _positive("optimizer.eta", self.eta)
      if not (method and method.proximal):
        raise ValueError(f"{setting('optimizer.eta')} applies to the methods "
                         f"with a proximal term ({_having('proximal')}), not "
                         f"{which}; drop it")
    if self.svd_steps and not (method and method.svd_phase):
      raise ValueError(f"{setting('optimizer.svd_steps')} applies to the "
                       f"methods with an SVD phase ({_having('svd_phase')}), "
                       f"not {which}; drop it")
    if self.model_mode:
      if self.name not in model_mode_methods():
        raise ValueError(
            f"{setting('optimizer.subspace_mode')} model supports "
            f"{' and '.join(model_mode_methods())}, not {self.name}"
            + (": its SVD needs the full gradient, which model mode never "
               "builds" if variants else "")
            + f"; use {setting('optimizer.subspace_mode')} transform")
      if self.svd_steps:
        raise ValueError(
            f"{setting('optimizer.svd_steps')} needs the full gradient for "
            "its SVD phase, which model mode never builds; drop it or use "
            f"{setting('optimizer.subspace_mode')} transform")

  @property
  def model_mode(self) -> bool:
    """Whether the model differentiates the subspace variables directly."""
    return self.subspace_mode == "model"

  @property
  def method(self) -> sj.transform.Method | None:
    """The subspace method of :data:`subspace_jax.transform.METHODS` (None
    for adamw)."""
    return sj.transform.METHODS.get(self.name)

  def with_model(self, model_config: Any) -> OptimizerConfig:
    """This config with the rank's default (the hidden size / 4) set for
    the model of ``model_config``; itself when the rank is set."""
    if self.rank is not None:
      return self
    return dataclasses.replace(
        self, rank=max(1, model_config.hidden_size // 4))

  def _rank(self) -> int:
    if self.rank is None:
      raise ValueError(f"{setting('optimizer.rank')} is not set (with_model "
                       "gives it its default)")
    return self.rank

  def subspace(self, params, views: sj.matrix_view.ViewFn
               ) -> sj.factored.Subspace:
    """Model mode's factoring of ``params`` (arrays or abstract); ``views``
    is the model's (:attr:`subspace_jax.models.Model.views`)."""
    return sj.factored.Subspace.for_params(
        params, rank=self._rank(), update_gap=self.update_gap,
        projection=self.method.projection, seed=self.seed, side=self.side,
        views=views)

  def leaf_plans(self, params, views: sj.matrix_view.ViewFn) -> list | None:
    """The subspace transform's plan of every leaf of ``params`` (flatten
    order; None for a full leaf), or None for adamw."""
    if self.method is None:
      return None
    return sj.transform.leaf_plans(
        params, rank=self._rank(), side=self.side, views=views)[0]

  def schedule(self) -> optax.Schedule:
    """The learning rate by update: linear warm-up, then cosine decay."""
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=self.learning_rate,
        warmup_steps=min(self.warmup_steps, self.total_steps - 1),
        decay_steps=self.total_steps,
        end_value=self.learning_rate * self.min_lr_ratio,
    )


def _having(capability: str) -> str:
  return ", ".join(n for n, m in sj.transform.METHODS.items()
                   if getattr(m, capability)) or "none"


def make_optimizer(
    cfg: OptimizerConfig, model: models.Model, params=None, shardings=None,
) -> tuple[optax.GradientTransformation, Callable[[Any], list] | None]:
  """The optax chain for ``cfg`` and the leaf-plan function of its subspace
  transform (None for adamw), used to shard the low-rank state.

  Args:
    cfg: The optimizer settings (with its rank set for a subspace method).
    model: The model family (:data:`subspace_jax.models.MODELS`): its views
      say which weights are projected, its decay mask which are decayed.
    params: The (abstract) weights; model mode needs them to know which
      leaves are factored (its chain runs on the trainable tree,
      :meth:`subspace_jax.factored.Subspace.trainable`).
    shardings: The weights' ``NamedSharding`` objects (None: unsharded);
      the subspace transform follows them (its ``shardings`` option).
  """
  inner = optax.scale_by_adam(b1=cfg.b1, b2=cfg.b2, eps=cfg.eps)
  views = model.views()
  method = cfg.method
  if method is None:
    core = inner
  elif cfg.model_mode:
    if params is None:
      raise ValueError("model mode needs the weights to build its optimizer")
    core = sj.factored.scale_by_factored(
        inner, subspace=cfg.subspace(params, views), scale=cfg.scale,
        reset_inner=method.reset_inner, eta=cfg.eta)
  else:
    core = sj.transform.scale_by_method(
        cfg.name, inner, svd=cfg.svd, seed=cfg.seed, eta=cfg.eta,
        svd_steps=cfg.svd_steps, rank=cfg._rank(),  # pylint: disable=protected-access
        update_gap=cfg.update_gap, scale=cfg.scale, side=cfg.side,
        views=views, shardings=shardings,
        moment_dtype=jnp.dtype(cfg.moment_dtype) if cfg.moment_dtype else None)
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
