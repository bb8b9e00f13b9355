"""Memory accounting before training: nothing is allocated.

* :func:`estimate` – bytes of weights, one full gradient and the optimizer
  state of ``tx`` for ``params``. The state size is exact: it is read off
  ``jax.eval_shape(tx.init, params)``.
* :func:`compiled` – what XLA reserves for a jitted function on abstract
  inputs (``jax.ShapeDtypeStruct``), from ``compiled.memory_analysis()``:
  arguments, outputs, temporaries (activations, workspaces) and aliasing
  (donated buffers reused as outputs).
* :func:`breakdown` – a compiled train step's peak split into weights,
  gradients, optimizer state, other temporaries and the rest;
  :func:`train_step_breakdown` builds the step from a loss, parameters and
  an optimizer first.

Example::

  params = jax.eval_shape(model_init)          # ShapeDtypeStructs
  print(sj.memory.estimate(params, sj.golore(rank=128)))
  print(sj.memory.train_step_breakdown(loss_fn, params, tx, batch))
"""

from __future__ import annotations

import math
from typing import Any, Callable, Mapping, NamedTuple

import jax
import optax

__all__ = [
    "GiB",
    "NO_LOOP_HOISTING",
    "tree_bytes",
    "Estimate",
    "estimate",
    "CompiledMemory",
    "compiled",
    "Breakdown",
    "breakdown",
    "train_step_breakdown",
]

GiB = 1024**3

NO_LOOP_HOISTING: dict[str, str] = {
    "xla_disable_hlo_passes": "while-loop-invariant-code-motion"
}
"""``compiler_options`` that keep loop-invariant code inside while loops.

On the CPU backend (jax 0.10) a bfloat16 matmul is computed in float32, and
XLA then hoists the float32 copy of every loop-invariant weight out of a
scanned model's layer loop: the compiled step holds a float32 copy of all
stacked weights (2x their bf16 size) that a GPU compile never makes. With
these options the conversion stays in the loop, one layer at a time. Use
them to read CPU numbers as a stand-in for an accelerator's; they change no
result, only the schedule.
"""


def _leaf_bytes(x, per_device: bool) -> int:
  shape = tuple(x.shape)
  sharding = getattr(x, "sharding", None) if per_device else None
  if sharding is not None:
    shape = tuple(sharding.shard_shape(shape))
  return math.prod(shape) * jax.numpy.dtype(x.dtype).itemsize


def tree_bytes(tree, *, per_device: bool = False) -> int:
  """Total bytes of the array (or ``ShapeDtypeStruct``) leaves of ``tree``.

  Args:
    tree: A pytree of arrays or ``jax.ShapeDtypeStruct``\\ s.
    per_device: Count each leaf's shard on one device (from its
      ``sharding``, when it has one) instead of the whole array.
  """
  return sum(_leaf_bytes(x, per_device) for x in jax.tree.leaves(tree))


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
  """XLA's memory analysis of one compiled function (bytes, per device).

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
             compiler_options: Mapping[str, Any] | None = None,
             **kwargs: Any) -> CompiledMemory:
  """Compiles ``fn`` for (abstract) arguments and returns its memory analysis.

  Args:
    fn: A function, or an already jitted one (its shardings and donation are
      then used as they are).
    *args: Arrays or ``jax.ShapeDtypeStruct``\\ s.
    jit_kwargs: Options for ``jax.jit`` when ``fn`` is not jitted yet
      (e.g. ``donate_argnums``).
    compiler_options: XLA options for this compile only (e.g.
      :data:`NO_LOOP_HOISTING`).
    **kwargs: Keyword arguments of ``fn``.
  """
  jitted = fn if hasattr(fn, "lower") else jax.jit(fn, **(jit_kwargs or {}))
  lowered = jitted.lower(*args, **kwargs)
  stats = lowered.compile(
      compiler_options=dict(compiler_options) if compiler_options else None
  ).memory_analysis()
  if stats is None:
    raise RuntimeError("this backend reports no memory analysis")
  return CompiledMemory(
      arguments=int(stats.argument_size_in_bytes),
      outputs=int(stats.output_size_in_bytes),
      temporaries=int(stats.temp_size_in_bytes),
      aliased=int(stats.alias_size_in_bytes),
      code=int(stats.generated_code_size_in_bytes),
  )


class Breakdown(NamedTuple):
  """A compiled train step's memory, split by what holds it (bytes/device).

  ``weights + optimizer_state + temporaries + other == peak`` exactly;
  ``gradients`` is a part of ``temporaries``, not an extra term.

  Attributes:
    weights: The parameters (inputs of the step), from their shapes.
    gradients: The differentiated leaves' size: one gradient of each.
      Analytic, and counted inside ``temporaries`` (see :func:`breakdown`).
    optimizer_state: The optimizer state (inputs of the step), from its
      shapes.
    temporaries: XLA's temporaries: gradients, saved activations and
      workspaces, as buffer assignment packs them.
    other: The rest of the peak: the remaining arguments (batch, step
      counter) and the outputs not written into donated buffers (metrics;
      a whole new state when the step does not donate it), and XLA's index
      table of the output tuple (8 bytes an output).
    peak: ``arguments + outputs + temporaries − aliased`` of the compile
      (:attr:`CompiledMemory.peak`).
    compiled: XLA's raw numbers.
  """

  weights: int
  gradients: int
  optimizer_state: int
  temporaries: int
  other: int
  peak: int
  compiled: CompiledMemory

  @property
  def activations(self) -> int:
    """``temporaries − gradients`` (floored at 0): activations kept for the
    backward pass, workspaces, copies."""
    return max(self.temporaries - self.gradients, 0)

  def __str__(self) -> str:
    g = lambda b: f"{b / GiB:.3f} GiB"
    return (
        f"weights {g(self.weights)}, optimizer state "
        f"{g(self.optimizer_state)}, temporaries {g(self.temporaries)} "
        f"(gradients {g(self.gradients)}, other {g(self.activations)}), "
        f"other {g(self.other)}, peak {g(self.peak)}"
    )


def breakdown(
    step: Callable,
    *args: Any,
    weights: Any = None,
    optimizer_state: Any = None,
    gradients: Any = None,
    jit_kwargs: dict | None = None,
    compiler_options: Mapping[str, Any] | None = None,
    **kwargs: Any,
) -> Breakdown:
  """The memory of one train step, before training, by what holds it.

  ``step`` is compiled for ``args`` (abstract ``jax.ShapeDtypeStruct``\\ s
  are enough: nothing is allocated, so a 7B model can be measured on a small
  machine) and XLA's memory analysis is split:

  * ``weights`` and ``optimizer_state`` are arguments of the step: their
    bytes are exact, from shapes and dtypes (per device, from each leaf's
    ``sharding`` when it has one, like XLA's numbers).
  * Gradients are not arguments: they live and die inside the one compiled
    step, among XLA's temporaries, which buffer assignment packs together
    with activations and workspaces; the memory analysis gives only their
    total. ``gradients`` is therefore the analytic size of one gradient of
    every differentiated leaf, reported as the part of ``temporaries`` they
    need if they are all live at once (true whenever the update needs all of
    them, e.g. a global-norm clip). XLA may fuse some away; then
    :attr:`Breakdown.activations` understates the rest.
  * ``temporaries`` is XLA's number as it is; ``other`` is what remains of
    the peak (batch, counters, outputs that do not reuse a donated buffer).

  Example:
    >>> import jax, jax.numpy as jnp, optax
    >>> from subspace_jax import memory
    >>> params = {"w": jax.ShapeDtypeStruct((256, 128), jnp.float32)}
    >>> tx = optax.adam(1e-3)
    >>> opt_state = jax.eval_shape(tx.init, params)
    >>> x = jax.ShapeDtypeStruct((32, 256), jnp.float32)
    >>> def step(params, opt_state, x):
    ...   loss = lambda p: jnp.mean(jnp.tanh(x @ p["w"]) ** 2)
    ...   grads = jax.grad(loss)(params)
    ...   updates, opt_state = tx.update(grads, opt_state, params)
    ...   return optax.apply_updates(params, updates), opt_state
    >>> b = memory.breakdown(step, params, opt_state, x, weights=params,
    ...                      optimizer_state=opt_state,
    ...                      jit_kwargs={"donate_argnums": (0, 1)})
    >>> b.weights, b.gradients  # 256 * 128 float32
    (131072, 131072)
    >>> b.weights + b.optimizer_state + b.temporaries + b.other == b.peak
    True

  Args:
    step: The train step: a function, or an already jitted one (its
      shardings and donation are then used as they are). Donate the state,
      as a real train step does, or ``other`` holds a second copy of it.
    *args: The step's arguments, arrays or ``jax.ShapeDtypeStruct``\\ s.
    weights: The parameter tree among ``args`` (default: ``args[0].params``,
      e.g. a :class:`~subspace_jax.training.train.TrainState`).
    optimizer_state: The optimizer state among ``args`` (default:
      ``args[0].opt_state``).
    gradients: The differentiated tree (default: ``weights``), or its size
      in bytes. Pass it when only part of the weights is differentiated
      (e.g. model-level subspace training differentiates ``B`` only).
    jit_kwargs: Options for ``jax.jit`` when ``step`` is not jitted yet.
    compiler_options: XLA options for this compile (e.g.
      :data:`NO_LOOP_HOISTING` on a CPU).
    **kwargs: Keyword arguments of ``step``.

  Returns:
    A :class:`Breakdown` (bytes per device).

  Raises:
    ValueError: If ``weights`` or ``optimizer_state`` is not given and
      ``args[0]`` has no ``params``/``opt_state`` attribute.
  """
  first = args[0] if args else None
  if weights is None:
    if not hasattr(first, "params"):
      raise ValueError("pass weights=... (the first argument has no .params)")
    weights = first.params
  if optimizer_state is None:
    if not hasattr(first, "opt_state"):
      raise ValueError(
          "pass optimizer_state=... (the first argument has no .opt_state)"
      )
    optimizer_state = first.opt_state
  if gradients is None:
    gradients = weights
  grad_bytes = (
      int(gradients) if isinstance(gradients, int)
      else tree_bytes(gradients, per_device=True)
  )
  mem = compiled(step, *args, jit_kwargs=jit_kwargs,
                 compiler_options=compiler_options, **kwargs)
  w = tree_bytes(weights, per_device=True)
  s = tree_bytes(optimizer_state, per_device=True)
  return Breakdown(
      weights=w,
      gradients=grad_bytes,
      optimizer_state=s,
      temporaries=mem.temporaries,
      other=mem.peak - w - s - mem.temporaries,
      peak=mem.peak,
      compiled=mem,
  )


def train_step_breakdown(
    loss_fn: Callable,
    params: Any,
    tx: optax.GradientTransformation,
    *batch: Any,
    compiler_options: Mapping[str, Any] | None = None,
) -> Breakdown:
  """:func:`breakdown` of the plain train step of ``loss_fn`` and ``tx``.

  The step is ``grads = grad(loss_fn)(params, *batch)``,
  ``tx.update(grads, opt_state, params)``, ``optax.apply_updates``, jitted
  with the parameters and the optimizer state donated. Shardings of
  ``params`` and ``batch`` (when they have them) are used as they are; the
  optimizer state's are left to XLA.

  Example:
    >>> import jax, jax.numpy as jnp, optax
    >>> import subspace_jax as sj
    >>> params = {"w": jax.ShapeDtypeStruct((512, 256), jnp.float32)}
    >>> batch = jax.ShapeDtypeStruct((8, 512), jnp.float32)
    >>> loss = lambda p, x: jnp.mean((x @ p["w"]) ** 2)
    >>> adam = sj.memory.train_step_breakdown(loss, params, optax.adam(1e-3),
    ...                                       batch)
    >>> adam.optimizer_state == 2 * 512 * 256 * 4 + 4  # mu, nu, count
    True
    >>> low = sj.memory.train_step_breakdown(
    ...     loss, params, sj.golore(rank=16), batch)
    >>> low.optimizer_state < adam.optimizer_state / 10
    True

  Args:
    loss_fn: ``(params, *batch) -> scalar loss``.
    params: The parameters (arrays or ``jax.ShapeDtypeStruct``\\ s).
    tx: The optimizer.
    *batch: The other arguments of ``loss_fn``.
    compiler_options: XLA options for this compile.
  """
  abstract = lambda x: jax.ShapeDtypeStruct(
      x.shape, x.dtype, sharding=getattr(x, "sharding", None))
  params = jax.tree.map(abstract, params)
  batch = jax.tree.map(abstract, batch)
  opt_state = jax.eval_shape(tx.init, params)

  def step(params, opt_state, *batch):
    loss, grads = jax.value_and_grad(loss_fn)(params, *batch)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  return breakdown(
      step, params, opt_state, *batch, weights=params,
      optimizer_state=opt_state, jit_kwargs={"donate_argnums": (0, 1)},
      compiler_options=compiler_options,
  )
