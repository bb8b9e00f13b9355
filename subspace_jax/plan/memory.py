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
* :func:`target_devices` – the devices of a compile target: ``cpu``,
  ``gpu`` (attached) or ``tpu:TOPOLOGY`` (compile-only, with libtpu: no TPU
  needed); :func:`step_report` compiles a step for them and reports its
  per-device memory against the device's, or the compiler's "does not fit"
  figure; :func:`collective_bytes` counts the bytes of its collectives
  (loop bodies times their trip counts) in the compiled HLO.

Example::

  params = jax.eval_shape(model_init)          # ShapeDtypeStructs
  print(sj.memory.estimate(params, sj.golore(rank=128)))
  print(sj.memory.train_step_breakdown(loss_fn, params, tx, batch))
"""

from __future__ import annotations

import contextlib
import importlib.util
import math
import os
import re
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
    "memory_of",
    "TARGET_FORMS",
    "HBM_BY_DEVICE_KIND",
    "target_devices",
    "device_capacity",
    "does_not_fit",
    "COLLECTIVES",
    "Collective",
    "Collectives",
    "collective_bytes",
    "StepReport",
    "step_report",
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
  return memory_of(lowered.compile(
      compiler_options=dict(compiler_options) if compiler_options else None))


def memory_of(executable) -> CompiledMemory:
  """The :class:`CompiledMemory` of a compiled function (the result of
  ``jax.jit(f).lower(...).compile()``).

  Raises:
    RuntimeError: If the backend reports no memory analysis.
  """
  stats = executable.memory_analysis()
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
      e.g. a :class:`~subspace_jax.train.step.TrainState`).
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
  return _split(mem, weights, optimizer_state, grad_bytes)


def _split(mem: CompiledMemory, weights, optimizer_state,
           grad_bytes: int) -> Breakdown:
  """:class:`Breakdown` of ``mem`` by the trees that are its arguments."""
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


# ----------------------------------------------------------------------------
# Targets: the devices a step is compiled for
# ----------------------------------------------------------------------------

TARGET_FORMS = "cpu, gpu or tpu:TOPOLOGY (e.g. tpu:v5p:2x2x1, 4 chips)"
"""The forms of a target name, as error messages list them."""

HBM_BY_DEVICE_KIND: dict[str, int] = {
    "TPU v4": 32 * GiB,
    # v5p: the figure libtpu itself gives as "available HBM" when it refuses
    # a program (95.74G), a little above the 95 GiB of the data sheet.
    "TPU v5": int(95.74 * GiB),
    "TPU v5 lite": 16 * GiB,
    "TPU v6 lite": 32 * GiB,
}
"""Memory of one chip by ``device.device_kind``, for compile-only devices
(which report no ``memory_stats()``): a table of data-sheet figures, not a
measurement."""


def target_devices(target: str) -> list:
  """The devices of a compile target.

  * ``cpu``: this host's CPU devices (as many as ``jax.devices("cpu")``).
  * ``gpu``: the attached GPUs. XLA cannot compile for a GPU it does not
    see, so this needs one.
  * ``tpu:TOPOLOGY`` (e.g. ``tpu:v5p:2x2x1``, 4 chips; ``tpu:v5p:2x2x2``,
    8): compile-only TPU devices of that slice, from
    ``jax.experimental.topologies.get_topology_desc``. No TPU is needed, only
    libtpu (``pip install "subspace_jax[aot]"``).

  Raises:
    ValueError: One line, on an unknown form, a missing GPU, missing libtpu
      or a topology libtpu does not know.
  """
  kind, _, rest = target.partition(":")
  if target == "cpu":
    return jax.devices("cpu")
  if target == "gpu":
    try:
      return jax.devices("gpu")
    except RuntimeError:
      raise ValueError(
          "target gpu needs an attached GPU, and JAX sees none (a GPU "
          "program cannot be compiled without one); use tpu:TOPOLOGY or "
          "cpu") from None
  if kind == "tpu" and rest:
    return _tpu_devices(rest)
  raise ValueError(f"unknown target {target!r}; use {TARGET_FORMS}")


@contextlib.contextmanager
def _quiet_libtpu(topology: str):
  """Sets, while libtpu loads, the variables whose absence makes it warn on
  a machine without TPUs (``TPU_ACCELERATOR_TYPE``, ``TPU_WORKER_HOSTNAMES``:
  the topology name alone decides the devices), and lets several processes
  load it at once (compile-only devices open no chip, so libtpu's
  one-process lock file, which refuses a second test worker, is not
  needed). Values already in the environment are kept."""
  generation = topology.split(":")[0]
  values = {"TPU_WORKER_HOSTNAMES": "localhost",
            "TPU_ACCELERATOR_TYPE": f"{generation}-8",
            "TPU_SKIP_MDS_QUERY": "1",
            "ALLOW_MULTIPLE_LIBTPU_LOAD": "1"}
  saved = {k: os.environ.get(k) for k in values}
  for k, v in values.items():
    os.environ.setdefault(k, v)
  try:
    yield
  finally:
    for k, v in saved.items():
      if v is None:
        os.environ.pop(k, None)


def _tpu_devices(topology: str) -> list:
  """Compile-only devices of a TPU slice (see :func:`target_devices`)."""
  if importlib.util.find_spec("libtpu") is None:
    raise ValueError(f"target tpu:{topology} needs libtpu, which is not "
                     'installed: pip install "subspace_jax[aot]"')
  from jax.experimental import topologies  # pylint: disable=import-outside-toplevel
  with _quiet_libtpu(topology):
    try:
      desc = topologies.get_topology_desc(platform="tpu",
                                          topology_name=topology)
    except (jax.errors.JaxRuntimeError, RuntimeError, ValueError) as e:
      first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
      raise ValueError(f"libtpu could not make the TPU topology "
                       f"{topology!r} ({first}); use e.g. tpu:v5p:2x2x1"
                       ) from None
  return list(desc.devices)


def device_capacity(device) -> tuple[int | None, str | None]:
  """Bytes of memory of one device and where the figure comes from.

  Returns:
    ``(bytes, "device")`` from ``device.memory_stats()["bytes_limit"]``
    where the device reports it (GPUs; a real TPU), else
    ``(bytes, "table")`` from :data:`HBM_BY_DEVICE_KIND` (compile-only TPU
    devices), else ``(None, None)`` (CPUs).
  """
  try:
    stats = device.memory_stats()
  except Exception:  # pylint: disable=broad-except
    stats = None  # Compile-only devices refuse (INVALID_ARGUMENT).
  if stats and stats.get("bytes_limit"):
    return int(stats["bytes_limit"]), "device"
  if device.device_kind in HBM_BY_DEVICE_KIND:
    return HBM_BY_DEVICE_KIND[device.device_kind], "table"
  return None, None


# ----------------------------------------------------------------------------
# A program that does not fit
# ----------------------------------------------------------------------------

_UNITS = {"": 1, "B": 1, "K": 1024, "M": 1024**2, "G": GiB, "T": 1024**4}
_REQUIRED = re.compile(
    r"memory required[^()]*\(([\d.]+)\s*([KMGT]?)i?B?\)\s*exceeds available"
    r"[^()]*\(([\d.]+)\s*([KMGT]?)i?B?\)")


def does_not_fit(message: str) -> tuple[int, int] | None:
  """The required and the available bytes in the compiler's refusal of a
  program too large for the device, or None if ``message`` is not one.

  libtpu says (jax 0.10, libtpu 0.0.42) ``RESOURCE_EXHAUSTED: Ran out of
  memory on HBM, the total memory required for HLO temporaries (180.00G)
  exceeds available HBM (95.74G).``; ``G`` is taken as GiB.

  Example:
    >>> does_not_fit("RESOURCE_EXHAUSTED: ... the total memory required for "
    ...              "HLO temporaries (1.50G) exceeds available HBM (1.00G).")
    (1610612736, 1073741824)
  """
  if "RESOURCE_EXHAUSTED" not in message:
    return None
  m = _REQUIRED.search(message)
  if m is None:
    return None
  need, unit, have, have_unit = m.groups()
  return (int(float(need) * _UNITS[unit]), int(float(have) * _UNITS[have_unit]))


# ----------------------------------------------------------------------------
# Collective bytes of a compiled step
# ----------------------------------------------------------------------------

COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all",
               "collective-permute")
"""The collective operations :func:`collective_bytes` counts."""

# An asynchronous pair is counted at its -done, whose result is the
# collective's; an async-start/-done wrapper is counted through the
# collective inside the computation it calls.
_OPS = {**{op: op for op in COLLECTIVES},
        **{f"{op}-done": op for op in COLLECTIVES}, "ragged-all-to-all": "all-to-all"}

_BYTES = {"pred": 1, "s4": 1, "u4": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2,
          "f16": 2, "bf16": 2, "s32": 4, "u32": 4, "f32": 4, "s64": 8,
          "u64": 8, "f64": 8, "c64": 8, "c128": 16}
_ARRAY = re.compile(r"\b([a-z]+[0-9a-z]*)\[([\d,]*)\]")
_HEADER = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s*\(.*\{\s*$")
_CALLS = re.compile(
    r"\b(calls|to_apply|body|condition|true_computation|false_computation)"
    r"=%?([\w.\-]+)")
_BRANCHES = re.compile(r"branch_computations=\{([^}]*)\}")
_TRIP = re.compile(r'"known_trip_count":\{"n":"(\d+)"\}')
# An integer scalar constant, with or without a layout (TPU: ``{:T(128)}``).
_CONSTANT = re.compile(r"= s(?:32|64)\[\](?:\{[^}]*\})? constant\((\d+)\)")


def _array_bytes(shape: str) -> int:
  """Bytes of an HLO shape (an array or a tuple of arrays; 4-bit types
  counted as a byte)."""
  total = 0
  for dtype, dims in _ARRAY.findall(shape):
    size = 1 if dtype.startswith("f8") else _BYTES.get(dtype, 0)
    total += size * math.prod(int(d) for d in dims.split(",") if d)
  return total


def _group_size(line: str, num_devices: int | None) -> int | None:
  """Devices in each replica group of a collective, from its
  ``replica_groups`` in any of XLA's three spellings."""
  m = re.search(r"replica_groups=mesh\[([^\]]*)\]\s*\{([^}]*)\}", line)
  if m:
    sizes = dict(re.findall(r"'([^']+)'=(\d+)", m.group(1)))
    names = re.findall(r"'([^']+)'", m.group(2))
    if all(n in sizes for n in names):
      return math.prod(int(sizes[n]) for n in names)
    return None
  m = re.search(r"replica_groups=\[([\d,]+)\]<=", line)
  if m:
    return int(m.group(1).split(",")[-1])
  m = re.search(r"replica_groups=\{\{([\d,]*)\}", line)
  if m:
    return len(m.group(1).split(","))
  return num_devices if "replica_groups={}" in line else None


def _split_instruction(line: str) -> tuple[str, str, str] | None:
  """``(name, result shape, opcode)`` of an HLO instruction line."""
  m = re.match(r"\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*", line)
  if m is None:
    return None
  rest, depth = line[m.end():], 0
  if rest.startswith("("):  # A tuple shape: up to its closing parenthesis.
    for i, ch in enumerate(rest):
      depth += {"(": 1, ")": -1}.get(ch, 0)
      if depth == 0:
        break
    shape, rest = rest[:i + 1], rest[i + 1:]
  else:
    shape, _, rest = rest.partition(" ")
  op = re.match(r"\s*([a-z][\w\-]*)\(", rest)
  return (m.group(1), shape, op.group(1)) if op else None


class Collective(NamedTuple):
  """One kind of collective in a step, per device.

  Attributes:
    count: Operations executed per step (an operation in a loop body counts
      once per iteration).
    bytes: Their arrays' bytes: the full array reduced (all-reduce,
      reduce-scatter), gathered (all-gather) or sent (all-to-all,
      collective-permute), each as one device holds it in full.
    wire: What a ring algorithm sends from each device for them: 2(n−1)/n
      of the array for an all-reduce over n devices, (n−1)/n for an
      all-gather, reduce-scatter or all-to-all, all of it for a permute.
      An estimate: the TPU and GPU libraries choose their own algorithms.
  """

  count: int
  bytes: int
  wire: int


class Collectives(NamedTuple):
  """:func:`collective_bytes` of a compiled step.

  Attributes:
    by_kind: A :class:`Collective` for each name in :data:`COLLECTIVES`
      (zeros for those absent).
    unknown_trip_counts: While loops whose trip count could not be read
      (their bodies are counted once).
  """

  by_kind: dict[str, Collective]
  unknown_trip_counts: int

  @property
  def bytes(self) -> int:
    return sum(c.bytes for c in self.by_kind.values())

  @property
  def wire(self) -> int:
    return sum(c.wire for c in self.by_kind.values())

  def to_dict(self) -> dict[str, Any]:
    return {"by_kind": {k: c._asdict() for k, c in self.by_kind.items()},
            "bytes": self.bytes, "wire": self.wire,
            "unknown_trip_counts": self.unknown_trip_counts}


def _op_bytes(kind: str, result: int, n: int | None) -> tuple[int, int]:
  """``(bytes, wire)`` of one collective (see :class:`Collective`); with an
  unknown group size the wire is taken as the whole array."""
  full = result * n if kind == "reduce-scatter" and n else result
  if n is None or kind == "collective-permute":
    return full, full
  share = full * (n - 1) // n
  return full, 2 * share if kind == "all-reduce" else share


def _parse_hlo(text: str, num_devices: int | None):
  """Per computation: its collectives ``(kind, bytes, wire)``, its calls
  ``(callee, trip count or None, condition)`` and its integer constants;
  and the entry computation's name."""
  comps, entry, current = {}, None, None
  for line in text.splitlines():
    if not line.startswith(" "):
      m = _HEADER.match(line)
      current = m.group(1) if m else None
      if m:
        comps[current] = ([], [], [])
        entry = current if line.startswith("ENTRY") else entry
      continue
    parts = _split_instruction(line) if current else None
    if parts is None:
      continue
    ops, calls, constants = comps[current]
    _, shape, op = parts
    constants.extend(_CONSTANT.findall(line))
    if op in _OPS:
      ops.append((_OPS[op], *_op_bytes(_OPS[op], _array_bytes(shape),
                                       _group_size(line, num_devices))))
    if op in ("async-done", "async-update"):
      continue  # The same wrapped computation as its async-start.
    found = dict(_CALLS.findall(line))
    for key, callee in found.items():
      trip = 1
      if op == "while" and key == "body":
        m = _TRIP.search(line)
        trip = int(m.group(1)) if m else None
      calls.append((callee, trip, found.get("condition")))
    for branches in _BRANCHES.findall(line):
      calls.extend((b.strip().lstrip("%"), 1, None)
                   for b in branches.split(",") if b.strip())
  return comps, entry


def _trip_from_condition(constants: list[str]) -> int | None:
  """A loop's trip count from the one integer constant of its condition
  (``i < N`` from 0 in steps of 1, as a scan is lowered); None when there
  is not exactly one."""
  values = set(constants)
  return int(values.pop()) if len(values) == 1 else None


def collective_bytes(executable, *, num_devices: int | None = None
                     ) -> Collectives:
  """The collectives one device executes in a compiled step, and their bytes.

  Reads the optimized HLO of ``executable``: every all-reduce, all-gather,
  reduce-scatter, all-to-all and collective-permute (synchronous, or an
  asynchronous start/done pair counted once), in every computation reached
  from the entry. An operation inside a while loop's body counts once per
  iteration: the trip count is XLA's ``known_trip_count`` of the loop, or,
  failing that, the one integer constant of its condition (a scan's
  ``i < N``); loops with neither are counted once and reported in
  ``unknown_trip_counts``. Both branches of a conditional are counted.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> f = jax.jit(lambda x: x * 2)
    >>> c = collective_bytes(f.lower(jnp.ones(4)).compile())
    >>> c.bytes, c.by_kind["all-reduce"].count
    (0, 0)

  Args:
    executable: ``jax.jit(f).lower(...).compile()``, or its ``as_text()``.
    num_devices: The group size of a collective over all devices
      (``replica_groups={}``); default: unknown (its wire bytes are then
      taken as its array's).

  Returns:
    :class:`Collectives` (per device, per step).
  """
  text = executable if isinstance(executable, str) else executable.as_text()
  comps, entry = _parse_hlo(text, num_devices)
  memo: dict[str, dict[str, list[int]]] = {}
  unknown = [0]

  def totals(name: str) -> dict[str, list[int]]:
    if name in memo:
      return memo[name]
    out = {k: [0, 0, 0] for k in COLLECTIVES}
    ops, calls, _ = comps.get(name, ([], [], []))
    for kind, full, wire in ops:
      for i, v in enumerate((1, full, wire)):
        out[kind][i] += v
    for callee, trip, condition in calls:
      if trip is None:
        trip = _trip_from_condition(comps.get(condition, ([], [], []))[2])
      if trip is None:
        unknown[0] += 1
      for kind, values in totals(callee).items():
        for i, v in enumerate(values):
          out[kind][i] += v * (trip or 1)
    memo[name] = out
    return out

  if entry is None:
    raise ValueError("no ENTRY computation in this HLO text")
  result = totals(entry)
  return Collectives({k: Collective(*v) for k, v in result.items()},
                     unknown[0])


# ----------------------------------------------------------------------------
# A step compiled for a target
# ----------------------------------------------------------------------------


def _readable(n: int) -> str:
  return f"{n / GiB:.2f} GiB" if n >= GiB / 10 else f"{n / 1024**2:.2f} MiB"


class StepReport(NamedTuple):
  """Per-device memory and collectives of a train step compiled for a target.

  Attributes:
    target: The target's name (:func:`target_devices`).
    devices: How many devices the step is compiled for.
    device_kind: ``device.device_kind`` of the first.
    capacity: Bytes of memory of one device, or None where unknown (CPU).
    capacity_source: ``"device"`` (its ``memory_stats()``), ``"table"``
      (:data:`HBM_BY_DEVICE_KIND`), ``"compiler"`` (the compiler's refusal),
      ``"given"`` (the caller's figure) or None.
    breakdown: The :class:`Breakdown`, or None when the compiler refused
      the program for not fitting.
    required: Bytes one device needs: the breakdown's peak, or the
      compiler's figure when it refused.
    collectives: :func:`collective_bytes` of the compiled step (None when
      refused).
  """

  target: str
  devices: int
  device_kind: str
  capacity: int | None
  capacity_source: str | None
  breakdown: Breakdown | None
  required: int
  collectives: Collectives | None

  @property
  def fits(self) -> bool | None:
    """False when refused or over ``capacity``; None when that is unknown."""
    if self.breakdown is None:
      return False
    return None if self.capacity is None else self.required <= self.capacity

  def to_dict(self) -> dict[str, Any]:
    """A JSON-ready dict: bytes as integers."""
    b = self.breakdown
    return {
        "target": self.target, "devices": self.devices,
        "device_kind": self.device_kind, "capacity": self.capacity,
        "capacity_source": self.capacity_source, "fits": self.fits,
        "required": self.required,
        "breakdown": None if b is None else {
            **{k: v for k, v in b._asdict().items() if k != "compiled"},
            "activations": b.activations, "compiled": b.compiled._asdict()},
        "collectives": (None if self.collectives is None
                        else self.collectives.to_dict()),
    }

  def lines(self) -> list[str]:
    """The report in a few readable lines (GiB; MiB below 0.1 GiB)."""
    g = _readable
    cap = ("memory unknown" if self.capacity is None else
           f"{g(self.capacity)} each ({self.capacity_source})")
    out = [f"{self.target}: {self.devices} x {self.device_kind}, {cap}"]
    b = self.breakdown
    if b is None:
      return out + [f"does not fit: needs {g(self.required)} per device "
                    "(the compiler's figure)"]
    out.append(f"per device: weights {g(b.weights)}, optimizer state "
               f"{g(b.optimizer_state)}, temporaries {g(b.temporaries)} (of "
               f"which gradients {g(b.gradients)}), other {g(b.other)}")
    verdict = {True: "fits", False: "does not fit", None: "capacity unknown"}
    out.append(f"peak {g(b.peak)} per device: {verdict[self.fits]}")
    c = self.collectives
    parts = [f"{k} {v.count} x, {g(v.bytes)}" for k, v in c.by_kind.items()
             if v.count]
    out.append(f"collectives per step: {'; '.join(parts) or 'none'} (ring "
               f"estimate sent per device: {g(c.wire)})")
    return out


def step_report(step: Callable, *args: Any, devices, target: str,
                weights: Any, optimizer_state: Any, gradients: Any = None,
                capacity: int | None = None,
                compiler_options: Mapping[str, Any] | None = None
                ) -> StepReport:
  """Compiles a jitted train step for abstract ``args`` placed on
  ``devices`` (see :func:`target_devices`) and reports its memory.

  A program that the compiler refuses for not fitting (libtpu does so) is
  reported as such, with the compiler's required figure, not raised.

  Args:
    step: The jitted step (its shardings name the devices).
    *args: Its arguments, ``jax.ShapeDtypeStruct``\\ s with shardings.
    devices: The devices it is compiled for.
    target: The target's name, for the report.
    weights, optimizer_state, gradients: As in :func:`breakdown`.
    capacity: Bytes of one device's memory, instead of the device's own
      figure (e.g. to plan for a smaller device, or on a CPU).
    compiler_options: XLA options for this compile.
  """
  first = list(devices)[0]
  source = "given" if capacity is not None else None
  if capacity is None:
    capacity, source = device_capacity(first)
  report = lambda **kw: StepReport(target, len(devices), first.device_kind,
                                   **kw)
  try:
    executable = step.lower(*args).compile(
        compiler_options=dict(compiler_options) if compiler_options else None)
  except jax.errors.JaxRuntimeError as e:
    refused = does_not_fit(str(e))
    if refused is None:
      raise
    return report(capacity=capacity if source == "given" else refused[1],
                  capacity_source=source if source == "given" else "compiler",
                  breakdown=None, required=refused[0], collectives=None)
  if gradients is None:
    gradients = weights
  b = _split(memory_of(executable), weights, optimizer_state,
             tree_bytes(gradients, per_device=True))
  return report(capacity=capacity, capacity_source=source, breakdown=b,
                required=b.peak,
                collectives=collective_bytes(executable,
                                             num_devices=len(devices)))
