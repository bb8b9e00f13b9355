"""Multi-process start-up and the exchanges between processes.

A run with several processes starts them with :func:`initialize_distributed`;
the processes then agree on small host values (a data position, an error
message, a stop request) with :func:`allgather_json` and :func:`any_process`.
With one process both return at once, without communication.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import numpy as np
from subspace_jax.naming import setting

__all__ = ["initialize_distributed", "allgather_json", "any_process"]


def initialize_distributed(coordinator: str | None = None,
                           num_processes: int | None = None,
                           process_id: int | None = None) -> bool:
  """Starts multi-process JAX when asked to; returns whether it runs.

  Asked to means: any argument given, or ``JAX_COORDINATOR_ADDRESS`` set.
  Arguments left None are filled in by ``jax.distributed.initialize`` from
  the environment (``JAX_COORDINATOR_ADDRESS``, or the process count and
  index of a SLURM, Open MPI, Kubernetes or Cloud TPU job). CPU processes
  exchange data over TCP with gloo.

  Raises:
    ValueError: If JAX cannot start that way (one line, from JAX's message).
  """
  if jax.distributed.is_initialized():
    return True
  asked = (coordinator, num_processes, process_id) != (None, None, None)
  if not asked and not os.environ.get("JAX_COORDINATOR_ADDRESS"):
    return False
  if not os.environ.get("JAX_CPU_COLLECTIVES_IMPLEMENTATION"):
    # The default since jax 0.5; older versions had no CPU collectives.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  try:
    jax.distributed.initialize(coordinator, num_processes, process_id)
  except (RuntimeError, ValueError, TypeError) as e:
    first = (str(e).strip().splitlines() or [type(e).__name__])[0]
    raise ValueError(f"cannot start multi-process JAX ({first}); give "
                     f"{setting('coordinator')} HOST:PORT, "
                     f"{setting('num_processes')} and {setting('process_id')}, "
                     "before JAX is used") from None
  return True


def allgather_json(value: Any) -> list[Any]:
  """``[value of process 0, value of process 1, ...]`` for JSON-able values."""
  if jax.process_count() == 1:
    return [value]
  from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
  raw = np.frombuffer(json.dumps(value).encode(), np.uint8)
  lengths = multihost_utils.process_allgather(np.int32(raw.size))
  padded = np.zeros(int(np.max(lengths)), np.uint8)
  padded[:raw.size] = raw
  rows = multihost_utils.process_allgather(padded)
  return [json.loads(bytes(row[:n])) for row, n in zip(rows, lengths)]


def any_process(flag: bool) -> bool:
  """Whether ``flag`` is set on any process; all processes must call this
  at the same points when there are several."""
  if jax.process_count() == 1:
    return bool(flag)
  from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
  flags = multihost_utils.process_allgather(np.int32(bool(flag)))
  return bool(np.any(flags))
