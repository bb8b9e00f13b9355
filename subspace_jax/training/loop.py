"""The pretraining loop: data, sharded steps, evaluation, logging, checkpoints.

:class:`RunConfig` holds every setting of a run and round-trips through a
JSON dict; :func:`train` runs it::

    from subspace_jax.training import loop, train
    cfg = loop.RunConfig(model="tiny", steps=200,
                         optimizer=train.OptimizerConfig(name="golore", rank=16),
                         checkpoint_dir="runs/demo/ckpt",
                         metrics_path="runs/demo/metrics.jsonl")
    summary = loop.train(cfg)   # {"train_loss": ..., "eval_loss": ..., ...}

What a run does, in order: start multi-process JAX if asked (flags or the
``JAX_COORDINATOR_ADDRESS`` environment), build the mesh, the tokenizer and
the model, check the settings against them, resume from the newest
checkpoint (state and data position) or initialize, then step. Every
``log_every`` steps the metrics are fetched and appended to the JSONL file;
every ``eval_every`` steps the held-out loss is measured; every
``checkpoint_every`` steps a checkpoint is written in the background. SIGINT
and SIGTERM stop the run after the current step with a checkpoint, so the
same call resumes it. Files are only ever appended to or added: an error or
an interruption never truncates what a run has written.

Errors in the settings or the data raise ``ValueError`` (the data pipeline's
``DataError`` is one) with a one-line message that names the option to
change (as its command-line flag, e.g. ``--batch-size``).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pathlib
import signal
import sys
import threading
import time
import warnings
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

import subspace_jax as sj
from subspace_jax.models import llama
from subspace_jax.training import data as data_lib
from subspace_jax.training.checkpoint import Checkpointer, CheckpointWarning
from subspace_jax.training import sharding as shd
from subspace_jax.training import tokenizer as tok_lib
from subspace_jax.training import train as train_lib

__all__ = ["RunConfig", "initialize_distributed", "check_rank", "train"]

# Model settings kept outside RunConfig.model_overrides because they have
# their own fields; vocab_size always comes from the tokenizer.
_OWN_FIELDS = ("vocab_size", "scan_layers", "remat", "dtype", "param_dtype")
# Documents of the training split used to train a SentencePiece model on a
# files/TFDS source (the embedded corpus is used whole).
_SPM_SAMPLE_DOCS = 20_000


def _dtype_name(value: Any) -> str:
  return np.dtype(value).name if not isinstance(value, str) else value


def _check_float_dtype(flag: str, name: str | None) -> None:
  if name is None:
    return
  try:
    ok = jnp.issubdtype(jnp.dtype(name), jnp.floating)
  except TypeError:
    ok = False
  if not ok:
    raise ValueError(f"{flag} {name!r} is not a float dtype; use float32 or "
                     "bfloat16")


@dataclasses.dataclass(frozen=True)
class RunConfig:
  """Every setting of a pretraining run.

  Attributes:
    model: A key of :data:`subspace_jax.models.llama.CONFIGS`.
    scan_layers: Stack the blocks and run them with ``nnx.scan``.
    remat: Recompute each block's activations in the backward pass.
    dtype: Compute dtype name (``"float32"`` or ``"bfloat16"``).
    param_dtype: Storage dtype name of the weights (the master weights).
    model_overrides: Other :class:`~subspace_jax.models.llama.LlamaConfig`
      fields to change (JSON values), e.g. ``{"num_layers": 4}``.
    optimizer: The optimizer; its ``total_steps`` is the schedule length.
    data: Source spec: ``"embedded"``, ``"files:GLOB"``, ``"tfds:NAME"``.
    split: Training split.
    eval_split: Held-out split evaluated every ``eval_every`` steps (None:
      no evaluation).
    data_dir: TFDS data directory.
    text_key: TFDS text feature.
    tokenizer: ``"byte"`` or ``"sentencepiece"`` (trained on the training
      split, cached).
    vocab_size: SentencePiece vocabulary size (the byte tokenizer's is 259).
    batch_size: Global batch size (sequences per step, all processes).
    seq_len: Tokens per sequence.
    steps: Train until this many steps are done (resumed runs included).
    eval_every: Evaluate every this many steps and at the end (0: never).
    eval_batches: Batches per evaluation.
    log_every: Fetch, print and append metrics every this many steps.
    mesh: ``(data, fsdp, tensor)`` mesh sizes; one may be -1 (the rest).
    seed: Seed of the parameters and of the data order.
    checkpoint_dir: Where checkpoints go (None: no checkpoints).
    checkpoint_every: Save every this many steps, and at the end.
    keep: Number of checkpoints kept.
    resume: Continue from the newest checkpoint in ``checkpoint_dir``. If
      False and the directory already holds checkpoints, the run refuses to
      start rather than mix two runs there.
    metrics_path: JSONL file the metrics are appended to (None: none).
      Written by process 0; a ``{process}`` in the path makes every process
      write its own file.
    tensorboard_dir: TensorBoard log directory, used when ``tensorboardX`` or
      ``torch.utils.tensorboard`` can be imported (None: none).
    progress: Show a progress bar on stderr (process 0).
    coordinator: ``host:port`` of process 0 for multi-process runs.
    num_processes: Number of processes.
    process_id: This process's index.
  """

  model: str = "tiny"
  scan_layers: bool = False
  remat: bool = False
  dtype: str = "float32"
  param_dtype: str = "float32"
  model_overrides: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  optimizer: train_lib.OptimizerConfig = dataclasses.field(
      default_factory=train_lib.OptimizerConfig)
  data: str = "embedded"
  split: str = "train"
  eval_split: str | None = "validation"
  data_dir: str | None = None
  text_key: str = "text"
  tokenizer: str = "byte"
  vocab_size: int = 8000
  batch_size: int = 16
  seq_len: int = 64
  steps: int = 1000
  eval_every: int = 100
  eval_batches: int = 8
  log_every: int = 10
  mesh: tuple[int, int, int] = (-1, 1, 1)
  seed: int = 0
  checkpoint_dir: str | None = None
  checkpoint_every: int = 1000
  keep: int = 3
  resume: bool = True
  metrics_path: str | None = None
  tensorboard_dir: str | None = None
  progress: bool = True
  coordinator: str | None = None
  num_processes: int | None = None
  process_id: int | None = None

  def __post_init__(self):
    object.__setattr__(self, "mesh", tuple(int(s) for s in self.mesh))
    object.__setattr__(self, "model_overrides", dict(self.model_overrides))
    object.__setattr__(self, "dtype", _dtype_name(self.dtype))
    object.__setattr__(self, "param_dtype", _dtype_name(self.param_dtype))
    positive = {"batch-size": self.batch_size, "seq-len": self.seq_len,
                "steps": self.steps, "eval-batches": self.eval_batches,
                "log-every": self.log_every, "keep": self.keep,
                "checkpoint-every": self.checkpoint_every}
    for flag, value in positive.items():
      if value < 1:
        raise ValueError(f"--{flag} must be >= 1, got {value}")
    for flag, name in (("--dtype", self.dtype), ("--param-dtype", self.param_dtype),
                       ("--moment-dtype", self.optimizer.moment_dtype)):
      _check_float_dtype(flag, name)
    if not self.optimizer.learning_rate > 0:
      raise ValueError(f"--lr must be > 0, got {self.optimizer.learning_rate}")
    if self.eval_every < 0:
      raise ValueError(f"--eval-every must be >= 0, got {self.eval_every}")
    if len(self.mesh) != 3:
      raise ValueError(f"--mesh needs three sizes DATA,FSDP,TENSOR, got "
                       f"{self.mesh}")
    if self.tokenizer not in ("byte", "sentencepiece"):
      raise ValueError(f"unknown tokenizer {self.tokenizer!r}; choose byte or "
                       "sentencepiece")
    own = sorted(set(self.model_overrides) & set(_OWN_FIELDS))
    if own:
      raise ValueError(f"model_overrides may not set {own}: vocab_size comes "
                       "from the tokenizer and the others are RunConfig fields")
    self.model_config()  # Unknown model, bad override or dtype: fail now.

  # -- the model ------------------------------------------------------------

  @property
  def tokenizer_vocab_size(self) -> int:
    """The vocabulary size the tokenizer will have (the model's too)."""
    if self.tokenizer == "byte":
      return tok_lib.ByteTokenizer.vocab_size
    return self.vocab_size

  def model_config(self) -> llama.LlamaConfig:
    """The model: the named config with this run's changes.

    The vocabulary is the tokenizer's, and ``max_seq_len`` is raised to
    ``seq_len`` when shorter (it only bounds the input; RoPE has no table).
    """
    base = llama.get_config(self.model)
    try:
      return llama.get_config(
          self.model, vocab_size=self.tokenizer_vocab_size,
          scan_layers=self.scan_layers, remat=self.remat, dtype=self.dtype,
          param_dtype=self.param_dtype,
          max_seq_len=max(base.max_seq_len, self.seq_len),
          **self.model_overrides)
    except TypeError as e:
      raise ValueError(f"bad model override ({e}); use LlamaConfig "
                       "fields") from None

  def model_key(self) -> dict[str, Any]:
    """What a checkpoint must match to be resumed: the model's parameters
    and the optimizer whose state it holds. Compute-only settings (dtype,
    remat, max_seq_len) are left out, so they may change between a run and
    its resumption."""
    cfg = self.model_config()
    key = {"name": self.model, "tokenizer": self.tokenizer,
           "optimizer": self.optimizer.name,
           "subspace_mode": self.optimizer.subspace_mode}
    for field in dataclasses.fields(cfg):
      if field.name not in ("dtype", "remat", "max_seq_len"):
        value = getattr(cfg, field.name)
        key[field.name] = _dtype_name(value) if field.name == "param_dtype" else value
    return key

  # -- (de)serialization ------------------------------------------------------

  def to_dict(self) -> dict[str, Any]:
    """A JSON-able dict; ``from_dict`` inverts it.

    Its ``"model"`` entry is :meth:`model_key`, which the checkpointer
    compares on resume; the fields themselves are under ``"run"``.
    """
    run = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
    run["optimizer"] = dataclasses.asdict(self.optimizer)
    run["mesh"] = list(self.mesh)
    return {"model": self.model_key(), "run": json.loads(json.dumps(run))}

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> RunConfig:
    """The config that :meth:`to_dict` wrote (unknown keys are refused)."""
    run = dict(d["run"])
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(run) - names)
    if unknown:
      raise ValueError(f"unknown RunConfig field(s) {unknown}")
    run["optimizer"] = train_lib.OptimizerConfig(**run.get("optimizer", {}))
    run["mesh"] = tuple(run.get("mesh", (-1, 1, 1)))
    return cls(**run)


# ----------------------------------------------------------------------------
# Setup helpers
# ----------------------------------------------------------------------------


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
                     "--coordinator HOST:PORT, --num-processes and "
                     "--process-id, before JAX is used") from None
  return True


def check_rank(params: Any, opt: train_lib.OptimizerConfig) -> None:
  """Refuses a rank larger than a projected matrix's smaller dimension.

  The transforms would clip it silently (``min(rank, rows, cols)``); a run
  asked for rank r should know when some matrices cannot have it.

  Raises:
    ValueError: Naming the smallest projected matrix and its size.
  """
  if isinstance(params, sj.factored.FactoredParams):
    params = params.weights
  plans = opt.leaf_plans(params)
  if plans is None:
    return
  paths = [sj.matrix_view.path_str(p)
           for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
  projected = [(min(p.rows, p.cols), path, p)
               for path, p in zip(paths, plans) if p is not None]
  if not projected:
    return
  smallest, path, plan = min(projected, key=lambda t: t[0])
  if opt.rank > smallest:
    raise ValueError(
        f"--rank {opt.rank} is larger than projected matrix {path!r} "
        f"({plan.rows} x {plan.cols}) allows; use --rank {smallest} or less")


def _check_batch(cfg: RunConfig, mesh) -> None:
  dp = mesh.shape["data"] * mesh.shape["fsdp"]
  if cfg.batch_size % dp:
    raise ValueError(
        f"--batch-size {cfg.batch_size} is not divisible by the data-parallel "
        f"size {dp} (data x fsdp of the mesh {dict(mesh.shape)}); use a "
        f"multiple of {dp} or change --mesh")
  procs = jax.process_count()
  if cfg.batch_size % procs:
    raise ValueError(f"--batch-size {cfg.batch_size} is not divisible by the "
                     f"{procs} processes; use a multiple of {procs}")
  if dp % procs:
    raise ValueError(
        f"the data-parallel size {dp} (data x fsdp of --mesh) is not a "
        f"multiple of the {procs} processes, so the processes cannot each "
        "feed their own share of the batch; change --mesh")


def _make_tokenizer(cfg: RunConfig):
  if cfg.tokenizer == "byte":
    return tok_lib.ByteTokenizer()
  source = _source(cfg, cfg.split)
  corpus = None  # The embedded corpus's training split, get_tokenizer's default.
  if hasattr(source, "open"):
    docs = source.open()
    corpus = [docs[i] for i in range(min(len(docs), _SPM_SAMPLE_DOCS))]
  elif not isinstance(source, data_lib.EmbeddedCorpus):
    corpus = source.documents()[:_SPM_SAMPLE_DOCS]
  return tok_lib.get_tokenizer("sentencepiece", vocab_size=cfg.vocab_size,
                               corpus=corpus)


def _source(cfg: RunConfig, split: str):
  return data_lib.source_from_spec(cfg.data, split=split,
                                   data_dir=cfg.data_dir, text_key=cfg.text_key)


def _global_batch(local: Mapping[str, np.ndarray], setup: train_lib.Setup,
                  cfg: RunConfig) -> dict[str, jax.Array]:
  """This process's rows as one array over the whole mesh."""
  shape = (cfg.batch_size, cfg.seq_len)
  return {k: jax.make_array_from_process_local_data(setup.batch_sharding, v, shape)
          for k, v in local.items()}


def _allgather_json(value: Any) -> list[Any]:
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


def _data_state(iterator) -> dict[str, Any]:
  """The data position of every process (they differ for streamed data)."""
  return {"processes": _allgather_json(iterator.get_state())}


def _set_data_state(iterator, saved: Mapping[str, Any] | None) -> None:
  states = (saved or {}).get("processes")
  if not states:
    raise ValueError("the checkpoint has no data position; use another "
                     "--checkpoint-dir")
  if len(states) == jax.process_count():
    iterator.set_state(states[jax.process_index()])
  elif all(s == states[0] for s in states):
    iterator.set_state(states[0])  # Same for all: any process count works.
  else:
    raise ValueError(f"the checkpoint's data position was saved by "
                     f"{len(states)} processes; resume with --num-processes "
                     f"{len(states)}")


# ----------------------------------------------------------------------------
# Output: progress bar, JSONL, TensorBoard
# ----------------------------------------------------------------------------


def _format_eta(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class _Progress:
  """A one-line progress bar on stderr: tqdm if installed, else ``\\r``."""

  def __init__(self, start: int, total: int, enabled: bool):
    self._enabled, self._total, self._step = enabled, total, start
    self._t0, self._start, self._postfix = time.perf_counter(), start, ""
    self._width = 0  # Of the last line written, to blank it out.
    self._bar = None
    if enabled:
      try:
        from tqdm import tqdm  # pylint: disable=import-outside-toplevel
      except ImportError:
        pass
      else:
        self._bar = tqdm(total=total, initial=start, file=sys.stderr,
                         unit="step", dynamic_ncols=True, smoothing=0.1)

  def update(self, step: int, loss: float | None = None,
             tokens_per_s: float | None = None) -> None:
    if not self._enabled:
      return
    if loss is not None:
      self._postfix = f"loss {loss:.4f}" + (
          f", {tokens_per_s:,.0f} tok/s" if tokens_per_s else "")
    if self._bar is not None:
      if loss is not None:
        self._bar.set_postfix_str(self._postfix, refresh=False)
      self._bar.update(step - self._step)
    elif loss is not None or step == self._total:
      done = step - self._start
      rate = done / max(time.perf_counter() - self._t0, 1e-9)
      eta = _format_eta((self._total - step) / rate) if done else "?"
      text = f"step {step}/{self._total} {self._postfix} ETA {eta}"
      sys.stderr.write(f"\r{text.ljust(self._width)}")
      sys.stderr.flush()
      self._width = len(text)
    self._step = step

  def write(self, line: str) -> None:
    if not self._enabled:
      return
    if self._bar is not None:
      self._bar.write(line, file=sys.stderr)
    else:
      sys.stderr.write(f"\r{line.ljust(self._width)}\n")
      sys.stderr.flush()

  def close(self) -> None:
    if self._bar is not None:
      self._bar.close()
    elif self._enabled:
      sys.stderr.write("\n")
      sys.stderr.flush()


def _tensorboard_writer(logdir: str):
  """A SummaryWriter from tensorboardX or torch, or None if neither imports."""
  for module in ("tensorboardX", "torch.utils.tensorboard"):
    try:
      writer_cls = __import__(module, fromlist=["SummaryWriter"]).SummaryWriter
    except ImportError:
      continue
    return writer_cls(logdir)
  return None


class _MetricsSink:
  """Appends metric records to a JSONL file and TensorBoard, if set."""

  def __init__(self, cfg: RunConfig):
    index, path = jax.process_index(), cfg.metrics_path
    self._file = self._tb = None
    if path and ("{process}" in path or index == 0):
      path = pathlib.Path(path.replace("{process}", str(index)))
      path.parent.mkdir(parents=True, exist_ok=True)
      self._file = open(path, "a", encoding="utf-8")  # Append, never truncate.
    if cfg.tensorboard_dir and index == 0:
      self._tb = _tensorboard_writer(cfg.tensorboard_dir)

  def write(self, record: dict[str, Any]) -> None:
    if self._file is not None:
      self._file.write(json.dumps(record) + "\n")
      self._file.flush()
    if self._tb is not None:
      for key, value in record.items():
        if key != "step" and value is not None:
          self._tb.add_scalar(key, value, record["step"])
      self._tb.flush()

  def close(self) -> None:
    if self._file is not None:
      self._file.close()
    if self._tb is not None:
      self._tb.close()


# ----------------------------------------------------------------------------
# Stopping on SIGINT / SIGTERM
# ----------------------------------------------------------------------------


class _StopRequest:
  """Turns SIGINT/SIGTERM into a flag that the loop polls.

  A second signal raises KeyboardInterrupt (stop now, no checkpoint). The
  previous handlers come back on exit. Handlers can only be set from the main
  thread; elsewhere signals keep their usual effect.
  """

  def __init__(self):
    self.signal_name: str | None = None
    self._previous: dict[int, Any] = {}

  def __enter__(self) -> _StopRequest:
    if threading.current_thread() is threading.main_thread():
      for sig in (signal.SIGINT, signal.SIGTERM):
        self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def _handle(self, signum, frame) -> None:
    del frame
    if self.signal_name is not None:
      raise KeyboardInterrupt
    self.signal_name = signal.Signals(signum).name

  def __exit__(self, *exc_info) -> None:
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)

  def agreed(self) -> bool:
    """Whether any process was signalled; all processes must call this at
    the same steps when there are several."""
    if jax.process_count() == 1:
      return self.signal_name is not None
    from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
    flags = multihost_utils.process_allgather(np.int32(self.signal_name is not None))
    return bool(np.any(flags))


# ----------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------


def _evaluate(setup, params, iterator, start_state, cfg) -> tuple[float, float]:
  """Mean loss and perplexity over the first ``eval_batches`` batches."""
  iterator.set_state(start_state)
  losses = [setup.eval_step(params, _global_batch(next(iterator), setup, cfg))
            for _ in range(cfg.eval_batches)]
  loss = float(np.mean(jax.device_get(losses)))
  return loss, math.inf if loss > 700 else math.exp(loss)  # NaN stays NaN.


def _info(line: str) -> None:
  """Prints a status line on stderr, from process 0 only."""
  if jax.process_index() == 0:
    print(line, file=sys.stderr, flush=True)


def _restore_or_init(cfg, setup, ckpt, train_iter) -> tuple[Any, int]:
  """The state to start from and its step."""
  latest = ckpt.latest_step() if ckpt is not None else None
  if latest is not None and not cfg.resume:
    raise ValueError(
        f"{cfg.checkpoint_dir} already holds checkpoints (newest: step "
        f"{latest}) and resuming is off; use another --checkpoint-dir or drop "
        "--no-resume")
  if latest is not None:
    # The checkpointer's warnings (a fallback past a corrupt step, ...) as
    # one "warning: ..." line each, not in Python's two-line format.
    with warnings.catch_warnings(record=True) as caught:
      warnings.simplefilter("always", CheckpointWarning)
      restored = ckpt.restore(setup.abstract_state, expected_config=cfg.to_dict())
    for w in caught:
      if issubclass(w.category, CheckpointWarning):
        _info(f"warning: {w.message}")
      else:
        warnings.showwarning(w.message, w.category, w.filename, w.lineno)
    _set_data_state(train_iter, restored.data_state)
    _info(f"resumed from step {restored.step} ({ckpt.directory})")
    return restored.state, restored.step
  return setup.init(cfg.seed), 0


def train(cfg: RunConfig) -> dict[str, Any]:
  """Runs (or resumes) a pretraining run; see the module docstring.

  Args:
    cfg: The run's settings.

  Returns:
    A summary: ``step`` (steps done), ``start_step``, ``train_loss`` (mean
    over the last logging window), ``eval_loss``, ``eval_ppl``,
    ``tokens_per_s`` (after the first, compiling, step; evaluation and
    checkpointing excluded), ``wall_time_s``, ``interrupted`` (the signal's
    name or None) and ``checkpoint_step`` (the newest saved, or None).

  Raises:
    ValueError: On settings or data that cannot work (one-line message).
  """
  t_begin = time.perf_counter()
  initialize_distributed(cfg.coordinator, cfg.num_processes, cfg.process_id)

  mesh = shd.make_mesh(*cfg.mesh)
  _check_batch(cfg, mesh)
  tokenizer = _make_tokenizer(cfg)
  model_config = cfg.model_config()
  if tokenizer.vocab_size != model_config.vocab_size:
    raise ValueError(f"the tokenizer has {tokenizer.vocab_size} ids, not "
                     f"{model_config.vocab_size}; set --vocab-size "
                     f"{tokenizer.vocab_size}")
  setup = train_lib.setup(model_config, cfg.optimizer, mesh)
  check_rank(setup.abstract_state.params, cfg.optimizer)

  iter_args = dict(seq_len=cfg.seq_len, batch_size=cfg.batch_size)
  train_iter = data_lib.make_iterator(_source(cfg, cfg.split), tokenizer,
                                      seed=cfg.seed, **iter_args)
  eval_iter = eval_start = None
  if cfg.eval_every and cfg.eval_split:
    eval_iter = data_lib.make_iterator(_source(cfg, cfg.eval_split), tokenizer,
                                       shuffle=False, **iter_args)
    eval_start = eval_iter.get_state()

  ckpt = None
  if cfg.checkpoint_dir:
    ckpt = Checkpointer(cfg.checkpoint_dir, save_interval_steps=cfg.checkpoint_every,
                        max_to_keep=cfg.keep)
  sink = progress = None
  try:
    state, start = _restore_or_init(cfg, setup, ckpt, train_iter)
    if start == 0:
      _info(f"{cfg.model}: {llama.param_count(model_config) / 1e6:.2f}M parameters, "
          f"{cfg.optimizer.name}"
          f"{' (model mode)' if cfg.optimizer.model_mode else ''}, "
          f"mesh {dict(mesh.shape)} on "
          f"{jax.device_count()} {jax.devices()[0].platform} device(s), "
          f"{jax.process_count()} process(es)")
    sink = _MetricsSink(cfg)
    progress = _Progress(start, cfg.steps, cfg.progress and jax.process_index() == 0)
    summary = _run(cfg, setup, state, start, train_iter, eval_iter, eval_start,
                   ckpt, sink, progress)
  finally:
    if progress is not None:
      progress.close()
    if sink is not None:
      sink.close()
    if ckpt is not None:
      ckpt.wait_until_finished()
      ckpt.close()
  summary["wall_time_s"] = time.perf_counter() - t_begin
  _print_summary(summary)
  return summary


def _run(cfg, setup, state, start, train_iter, eval_iter, eval_start, ckpt,
         sink, progress) -> dict[str, Any]:
  """The step loop proper; returns the summary (without wall time)."""
  config_dict = cfg.to_dict()
  tokens_per_step = cfg.batch_size * cfg.seq_len
  single = jax.process_count() == 1
  summary = {"step": start, "start_step": start, "train_loss": None,
             "eval_loss": None, "eval_ppl": None, "tokens_per_s": None,
             "interrupted": None, "checkpoint_step": None}
  losses: list[jax.Array] = []    # Step losses since the last record.
  timed = _Timer()

  def eval_due(step: int) -> bool:
    return eval_iter is not None and (step % cfg.eval_every == 0 or step == cfg.steps)

  with _StopRequest() as stop:
    step = start
    for step in range(start + 1, cfg.steps + 1):
      batch = _global_batch(next(train_iter), setup, cfg)
      state, metrics = setup.train_step(state, batch)
      losses.append(metrics["loss"])
      if step == start + 1:  # The compiling step is not timed.
        jax.block_until_ready(metrics)
        timed.restart()
      else:
        timed.pending += 1
      do_eval = eval_due(step)
      do_save = ckpt is not None and step % cfg.checkpoint_every == 0
      do_log = step % cfg.log_every == 0 or step == cfg.steps or do_eval
      # Processes must agree on stopping, so they poll at the same steps.
      stopping = (do_log or single) and stop.agreed()
      if not (do_log or do_save or stopping):
        progress.update(step)
        continue
      jax.block_until_ready(metrics)
      tps = timed.book(tokens_per_step)
      if do_log or stopping:
        fetched, last = jax.device_get((losses, metrics))
        losses.clear()
        record = {"step": step, "loss": float(np.mean(fetched)),
                  "grad_norm": float(last["grad_norm"]), "lr": float(last["lr"]),
                  "tokens_per_s": tps}
        summary["train_loss"] = record["loss"]
        if do_eval and not stopping:
          loss, ppl = _evaluate(setup, state.params, eval_iter, eval_start, cfg)
          record.update(eval_loss=loss, eval_ppl=ppl)
          summary.update(eval_loss=loss, eval_ppl=ppl)
          progress.write(f"step {step}: eval loss {loss:.4f}, perplexity {ppl:.2f}")
        sink.write(record)
        progress.update(step, record["loss"], tps)
      else:
        progress.update(step)
      if ckpt is not None and (do_save or stopping or step == cfg.steps):
        if ckpt.save(step, state, data_state=_data_state(train_iter),
                     config=config_dict, force=stopping or step == cfg.steps):
          summary["checkpoint_step"] = step
      timed.restart()  # Evaluating, logging and saving are not timed.
      if stopping:
        summary["interrupted"] = stop.signal_name or "a signal to another process"
        progress.write(f"stopped at step {step} by {summary['interrupted']}"
                       + ("; checkpoint saved" if ckpt is not None else ""))
        break
    summary["step"] = step
  if ckpt is not None and summary["checkpoint_step"] is None:
    summary["checkpoint_step"] = ckpt.latest_step()
  summary["tokens_per_s"] = timed.total_rate(tokens_per_step)
  if eval_iter is not None and summary["eval_loss"] is None and not summary["interrupted"]:
    summary["eval_loss"], summary["eval_ppl"] = _evaluate(
        setup, state.params, eval_iter, eval_start, cfg)
  return summary


class _Timer:
  """Training time between sync points, for tokens/s.

  ``pending`` counts the steps dispatched since the last :meth:`restart`;
  :meth:`book`, called once they are finished, adds their time.
  """

  def __init__(self):
    self.pending = 0
    self._mark: float | None = None
    self._total_s, self._total_steps = 0.0, 0
    self._window_s, self._window_steps = 0.0, 0

  def restart(self) -> None:
    self._mark, self.pending = time.perf_counter(), 0

  def book(self, tokens_per_step: int) -> float | None:
    """Books the pending steps; returns tokens/s since the previous call."""
    if self._mark is not None and self.pending:
      elapsed = time.perf_counter() - self._mark
      self._total_s += elapsed
      self._total_steps += self.pending
      self._window_s += elapsed
      self._window_steps += self.pending
    self.pending = 0
    if not self._window_steps:
      return None
    rate = self._window_steps * tokens_per_step / self._window_s
    self._window_s, self._window_steps = 0.0, 0
    return rate

  def total_rate(self, tokens_per_step: int) -> float | None:
    if not self._total_steps:
      return None
    return self._total_steps * tokens_per_step / self._total_s


def _print_summary(s: Mapping[str, Any]) -> None:
  parts = [f"{s['step'] - s['start_step']} steps (to step {s['step']})"]
  if s["train_loss"] is not None:
    parts.append(f"train loss {s['train_loss']:.4f}")
  if s["eval_loss"] is not None:
    parts.append(f"eval loss {s['eval_loss']:.4f} (perplexity {s['eval_ppl']:.2f})")
  if s["tokens_per_s"]:
    parts.append(f"{s['tokens_per_s']:,.0f} tokens/s")
  parts.append(f"{s['wall_time_s']:.1f} s")
  if s["interrupted"]:
    parts.append(f"interrupted by {s['interrupted']}")
  prefix = "" if jax.process_count() == 1 else f"[process {jax.process_index()}] "
  print(prefix + "done: " + ", ".join(parts), flush=True)
