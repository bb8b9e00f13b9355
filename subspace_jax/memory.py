"""Memory accounting before training: nothing is allocated.

* :func:`estimate` – bytes of weights, one full gradient and the optimizer
  state of ``tx`` for ``params``. The state size is exact: it is read off
  ``jax.eval_shape(tx.init, params)``.
* :func:`compiled` – what XLA reserves for a jitted function on abstract
  inputs (``jax.ShapeDtypeStruct``), from ``compiled.memory_analysis()``:
  arguments, outputs, temporaries (activations, workspaces) and aliasing
  (donated buffers reused as outputs).

Example::

  params = jax.eval_shape(model_init)          # ShapeDtypeStructs
  print(sj.memory.estimate(params, sj.golore(rank=128)))
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import optax

__all__ = ["tree_bytes", "Estimate", "estimate", "CompiledMemory", "compiled"]

GiB = 1024**3


def tree_bytes(tree) -> int:
  """Total bytes of the array (or ``ShapeDtypeStruct``) leaves of ``tree``."""
  return sum(
      int(x.size) * jax.numpy.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree)
  )


class Estimate(NamedTuple):
  """Bytes of one training step's persistent buffers.

  Attributes:
    weights: The parameters.
    gradients: One full gradient (same shapes and dtypes as the parameters).
    optimizer_state: ``tx``'s state, exactly.
  """

  weights: int
  gradients: int
  optimizer_state: int

  @property
  def total(self) -> int:
    return self.weights + self.gradients + self.optimizer_state

  def __str__(self) -> str:
    g = lambda b: f"{b / GiB:.3f} GiB"
    return (
        f"weights {g(self.weights)}, gradients {g(self.gradients)}, optimizer "
        f"state {g(self.optimizer_state)}, total {g(self.total)}"
    )


def estimate(params, tx: optax.GradientTransformation) -> Estimate:
  """Weights, gradient and optimizer-state bytes of ``tx`` on ``params``.

  Args:
    params: Arrays or ``jax.ShapeDtypeStruct``\\ s (e.g. from
      ``jax.eval_shape``): nothing is allocated.
    tx: The optimizer.
  """
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
  state = jax.eval_shape(tx.init, abstract)
  size = tree_bytes(abstract)
  return Estimate(weights=size, gradients=size, optimizer_state=tree_bytes(state))


class CompiledMemory(NamedTuple):
  """XLA's memory analysis of one compiled function (bytes).

  ``peak`` is ``arguments + outputs + temporaries − aliased``: what must be
  live at once, counting donated inputs that are reused as outputs once.
  """

  arguments: int
  outputs: int
  temporaries: int
  aliased: int
  code: int

  @property
  def peak(self) -> int:
    return self.arguments + self.outputs + self.temporaries - self.aliased


def compiled(fn: Callable, *args: Any, jit_kwargs: dict | None = None,
             **kwargs: Any) -> CompiledMemory:
  """Compiles ``fn`` for (abstract) arguments and returns its memory analysis.

  Args:
    fn: A function, or an already jitted one (its shardings and donation are
      then used as they are).
    *args: Arrays or ``jax.ShapeDtypeStruct``\\ s.
    jit_kwargs: Options for ``jax.jit`` when ``fn`` is not jitted yet
      (e.g. ``donate_argnums``).
    **kwargs: Keyword arguments of ``fn``.
  """
  jitted = fn if hasattr(fn, "lower") else jax.jit(fn, **(jit_kwargs or {}))
  stats = jitted.lower(*args, **kwargs).compile().memory_analysis()
  if stats is None:
    raise RuntimeError("this backend reports no memory analysis")
  return CompiledMemory(
      arguments=int(stats.argument_size_in_bytes),
      outputs=int(stats.output_size_in_bytes),
      temporaries=int(stats.temp_size_in_bytes),
      aliased=int(stats.alias_size_in_bytes),
      code=int(stats.generated_code_size_in_bytes),
  )
