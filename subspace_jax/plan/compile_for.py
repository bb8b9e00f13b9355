"""A run's train step compiled for a target, to plan its memory (--compile-for).

:func:`compile_for` builds the exact step that :func:`loop.train
<subspace_jax.run.loop.train>` would run for a :class:`RunConfig` (the
same model config, optimizer and sharded ``train.setup``), on a mesh of the
target's devices with the run's mesh sizes, and compiles it on abstract
inputs: nothing is allocated or trained, no data is read and no checkpoint
directory is touched. With ``tpu:TOPOLOGY`` the devices are compile-only
(libtpu, no TPU needed), so a 175B step can be planned on a laptop::

    report = plan.compile_for(cfg, "tpu:v5p:2x2x2")
    print("\\n".join(report.lines()))   # weights, state, peak, collectives
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from subspace_jax import models
from subspace_jax.plan import memory
from subspace_jax import sharding as shd
from subspace_jax.data import sources
from subspace_jax.train import step as train_lib
from subspace_jax.run.config import RunConfig

__all__ = ["compile_for"]


def _gradients(cfg: RunConfig, model_config, s: train_lib.Setup):
  """The differentiated tree of the step (abstract, sharded): the weights,
  or in model mode ``B`` and the leaves kept in full."""
  params = s.abstract_state.params
  if not cfg.optimizer.model_mode:
    return params
  views = models.for_config(model_config).views()
  subspace = cfg.optimizer.subspace(params.weights, views)
  return subspace.trainable(params)


def _first(devices: list, sizes) -> list:
  """The devices a mesh of ``sizes`` plans for: all of them when a size is
  -1, else the first ``prod(sizes)`` (``--mesh 1,1,1`` on a 4-chip topology
  plans a single chip, a 24 GB card's setting: no collectives)."""
  n = math.prod(sizes)
  return devices if -1 in sizes or n <= 0 else devices[:n]


def _abstract_batch(cfg: RunConfig, sharding) -> dict[str, jax.ShapeDtypeStruct]:
  """The run's batch on abstract arrays: inputs and targets, and the
  segment ids and loss mask of a fine-tuning source's packed examples."""
  keys = ["inputs", "targets"]
  if getattr(sources.source_from_spec(cfg.data), "examples", False):
    keys += ["segment_ids", "loss_mask"]
  return {k: jax.ShapeDtypeStruct((cfg.batch_size, cfg.seq_len), jnp.int32,
                                  sharding=sharding) for k in keys}


def compile_for(cfg: RunConfig, target: str, *, devices=None,
                capacity: int | None = None,
                compiler_options=None) -> memory.StepReport:
  """Compiles ``cfg``'s train step for ``target`` and reports its memory.

  Args:
    cfg: The run (model, optimizer, ``batch_size``, ``seq_len``, ``mesh``).
    target: ``cpu``, ``gpu`` or ``tpu:TOPOLOGY``
      (:func:`subspace_jax.plan.memory.target_devices`).
    devices: The target's devices, when the caller has them already.
    capacity: Bytes of one device's memory to plan against, instead of the
      device's own figure (``--memory-limit``).
    compiler_options: XLA options for this compile (e.g.
      :data:`subspace_jax.plan.memory.NO_LOOP_HOISTING` on a CPU).

  Returns:
    The :class:`~subspace_jax.plan.memory.StepReport` (per device).

  Raises:
    ValueError: One line, on a bad target, mesh, batch or rank.
  """
  if devices is None:
    devices = memory.target_devices(target)
  devices = _first(devices, cfg.mesh)
  mesh = shd.make_mesh(*cfg.mesh, devices=devices)
  shd.check_batch(cfg.batch_size, mesh, cfg.optimizer.grad_accum)
  model_config = cfg.model_config
  s = train_lib.setup(model_config, cfg.optimizer, mesh)
  train_lib.check_rank(s, cfg.optimizer)
  state = s.abstract_state
  return memory.step_report(
      s.train_step, state, _abstract_batch(cfg, s.batch_sharding),
      devices=devices, target=target, weights=state.params,
      optimizer_state=state.opt_state,
      gradients=_gradients(cfg, model_config, s), capacity=capacity,
      compiler_options=compiler_options)
