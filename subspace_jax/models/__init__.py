"""Model definitions for subspace_jax, and the registry the trainer reads.

A model is one module plus one :data:`MODELS` entry: the module defines the
network, a config dataclass with named configs, an adapter class applying
the network to plain-dict parameters (``init(seed)``, ``apply(params,
tokens)``, ``loss(params, batch)``, ``logical_axes``), and its optimizer
rules (which weights are projected, which are decayed), derived from the
weights' logical axis names.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

from subspace_jax.models import llama
from subspace_jax.models.llama import (
    LOGICAL_AXIS_NAMES,
    Llama,
    LlamaConfig,
    apply,
    apply_rope,
    cross_entropy_loss,
    forward,
    init,
    param_logical_axes,
    rope_cos_sin,
)

__all__ = [
    "CONFIGS",
    "LOGICAL_AXIS_NAMES",
    "MODELS",
    "Llama",
    "LlamaConfig",
    "Model",
    "apply",
    "apply_rope",
    "cross_entropy_loss",
    "for_config",
    "for_name",
    "forward",
    "get_config",
    "init",
    "param_count",
    "param_logical_axes",
    "rope_cos_sin",
]


@dataclasses.dataclass(frozen=True)
class Model:
  """What the trainer needs of one model family.

  Attributes:
    config_type: The family's config dataclass.
    configs: Named configs (``name -> config``).
    get_config: ``(name, **overrides) -> config``.
    model_def: The adapter class, ``model_def(config)``, with ``init``,
      ``apply``, ``loss`` and ``logical_axes``.
    views: ``() -> ViewFn``: which weights the subspace optimizers project.
    decay_mask: ``params -> bool tree``: which weights get weight decay.
    param_count: ``config -> int``.
  """

  config_type: type
  configs: Mapping[str, Any]
  get_config: Callable[..., Any]
  model_def: type
  views: Callable[[], Any]
  decay_mask: Callable[[Any], Any]
  param_count: Callable[[Any], int]


MODELS: dict[str, Model] = {
    "llama": Model(
        config_type=llama.LlamaConfig,
        configs=llama.CONFIGS,
        get_config=llama.get_config,
        model_def=llama.ModelDef,
        views=llama.views,
        decay_mask=llama.decay_mask,
        param_count=llama.param_count,
    ),
}
"""Every model family, by name."""


def for_config(config: Any) -> Model:
  """The :data:`MODELS` entry whose config type ``config`` is.

  Raises:
    TypeError: If no registered model has that config type.
  """
  for model in MODELS.values():
    if isinstance(config, model.config_type):
      return model
  raise TypeError(f"no model in subspace_jax.models.MODELS takes a "
                  f"{type(config).__name__} config")


CONFIGS: dict[str, Any] = {
    name: config for model in MODELS.values()
    for name, config in model.configs.items()}
"""Every named config of every family (names are unique across them)."""


def for_name(name: str) -> Model:
  """The :data:`MODELS` entry that has the named config ``name``.

  Raises:
    ValueError: If no family has it (the message lists the names).
  """
  for model in MODELS.values():
    if name in model.configs:
      return model
  raise ValueError(f"unknown model {name!r}; named configs: "
                   f"{', '.join(CONFIGS)}")


def get_config(name: str, **overrides) -> Any:
  """The named config of whichever family has it, with ``overrides``."""
  return for_name(name).get_config(name, **overrides)


def param_count(config: Any) -> int:
  """Number of parameters of the model of ``config``."""
  return for_config(config).param_count(config)
