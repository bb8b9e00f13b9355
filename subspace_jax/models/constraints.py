"""Sharding constraints on a model's activations, set by the trainer.

A model names the axes of its large activations with logical names
(``("batch", None, "heads", None)``) through :func:`constrain`. Outside
:func:`activation_sharding` that is a no-op, so the model runs anywhere; the
trainer enters it while tracing a sharded step, with the function that maps
names onto its mesh. Without such constraints XLA's sharding propagation may
split an activation like the weight it meets (by features) and keep the
whole batch on every device.
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Any, Callable, Iterator, Sequence

import jax

__all__ = ["activation_sharding", "constrain"]

# (logical names, shape) -> a jax.sharding.Sharding, or None: unconstrained.
ShardingFn = Callable[[Sequence[Any], Sequence[int]], Any]

_CURRENT: contextvars.ContextVar[ShardingFn | None] = contextvars.ContextVar(
    "activation_sharding", default=None)


@contextlib.contextmanager
def activation_sharding(fn: ShardingFn | None) -> Iterator[None]:
  """Within the block, :func:`constrain` shards activations with ``fn``."""
  token = _CURRENT.set(fn)
  try:
    yield
  finally:
    _CURRENT.reset(token)


def constrain(x: jax.Array, names: Sequence[Any]) -> jax.Array:
  """``x`` constrained to the sharding of its logical axis ``names`` (one
  per axis of ``x``), or ``x`` itself outside :func:`activation_sharding`."""
  fn = _CURRENT.get()
  if fn is None:
    return x
  if len(names) != x.ndim:
    raise ValueError(f"{len(names)} axis names for an activation of shape "
                     f"{x.shape}")
  return jax.lax.with_sharding_constraint(x, fn(names, x.shape))
