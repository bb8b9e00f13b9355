"""Model definitions for subspace_jax."""

from subspace_jax.models.llama import (
    CONFIGS,
    LOGICAL_AXIS_NAMES,
    Llama,
    LlamaConfig,
    apply,
    apply_rope,
    cross_entropy_loss,
    get_config,
    init,
    param_count,
    param_logical_axes,
    rope_cos_sin,
)

__all__ = [
    "CONFIGS",
    "LOGICAL_AXIS_NAMES",
    "Llama",
    "LlamaConfig",
    "apply",
    "apply_rope",
    "cross_entropy_loss",
    "get_config",
    "init",
    "param_count",
    "param_logical_axes",
    "rope_cos_sin",
]
