"""libtpu installed on a machine without TPU chips.

libtpu (``pip install "jax[tpu]"``) gives compile-only TPU devices, with
which ``--compile-for tpu:TOPOLOGY`` plans a step's TPU memory anywhere
(:func:`subspace_jax.plan.memory.target_devices`). Installed, it also makes
JAX start the TPU runtime in every program, which on a machine without TPU
chips fails and prints several lines of errors. :func:`skip_runtime` (run
when ``subspace_jax`` is imported) stops that: with no TPU chip attached,
no ``JAX_PLATFORMS`` given and JAX's backends not started yet, JAX leaves
the TPU runtime out (the platform stays known: its start fails quietly).
Compile-only TPU devices do not need it and still work. A program that never imports ``subspace_jax`` is not changed (run it
with ``JAX_PLATFORMS=cpu``).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os

__all__ = ["skip_runtime"]


def skip_runtime() -> bool:
  """Leaves JAX's TPU runtime out where libtpu is installed but no TPU chip
  is attached; returns whether it did. Uses JAX internals; where they
  differ (another JAX version), it does nothing."""
  if os.environ.get("JAX_PLATFORMS") or importlib.util.find_spec("libtpu") is None:
    return False
  try:
    from jax._src import hardware_utils  # pylint: disable=import-outside-toplevel
    from jax._src import xla_bridge  # pylint: disable=import-outside-toplevel
    if hardware_utils.num_available_tpu_chips_and_device_id()[0]:
      return False
    if xla_bridge.backends_are_initialized():
      return False
    factories = xla_bridge._backend_factories  # pylint: disable=protected-access
    registration = factories.get("tpu")
    if registration is None:
      return False
    # The platform stays registered (modules register TPU lowerings for it,
    # and compile-only devices need it); only its start fails, quietly.
    factories["tpu"] = dataclasses.replace(
        registration, factory=_no_chip, fail_quietly=True)
    return True
  except (ImportError, AttributeError, TypeError):
    return False


def _no_chip():
  raise RuntimeError("no TPU chip is attached (left out by subspace_jax)")
