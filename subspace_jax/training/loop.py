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
``JAX_COORDINATOR_ADDRESS`` environment), build the mesh, take the lock of
the checkpoint directory (a ``run.lock`` file naming the host and process,
so that a second run there is refused; a lock left by a process of this host
that is gone is taken over), build the tokenizer and the model, check the
settings against them, resume from the newest checkpoint (state and data
position, once its settings are found to fit this run's, see
:class:`RunConfig`) or initialize, then step. Every
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
import re
import signal
import socket
import sys
import tempfile
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

__all__ = ["RunConfig", "NonFiniteError", "RESUME_SAFE_FIELDS",
           "RESUME_ALTERING_FIELDS", "initialize_distributed", "check_rank",
           "train"]

# Model settings kept outside RunConfig.model_overrides because they have
# their own fields; vocab_size always comes from the tokenizer.
_OWN_FIELDS = ("vocab_size", "scan_layers", "remat", "dtype", "param_dtype")
# Documents of the training split used to train a SentencePiece model on a
# files/TFDS source (the embedded corpus is used whole).
_SPM_SAMPLE_DOCS = 20_000
# The smallest vocabulary SentencePieceTokenizer.train accepts.
_SPM_MIN_VOCAB = 300
# Splits of the embedded corpus and of local files (TFDS names its own).
_LOCAL_SPLITS = ("train", "validation", "all")

# What a resumed run may change (see RunConfig). Safe: how the run is
# computed, logged, evaluated and saved, not what it trains. Altering: the
# rest; "optimizer" stands for every OptimizerConfig field.
RESUME_SAFE_FIELDS = (
    "steps", "eval_every", "eval_batches", "eval_split", "log_every", "mesh",
    "dtype", "remat", "data_dir", "checkpoint_dir", "checkpoint_every", "keep",
    "resume", "allow_changes", "metrics_path", "tensorboard_dir", "progress",
    "max_bad_steps",
    "coordinator", "num_processes", "process_id")
RESUME_ALTERING_FIELDS = (
    "model", "scan_layers", "param_dtype", "model_overrides", "optimizer",
    "data", "split", "text_key", "tokenizer", "vocab_size", "batch_size",
    "seq_len", "seed")

# Command-line flags of the fields whose flag is not "--" + the name with
# dashes; optimizer fields are "optimizer.NAME". Fields without a flag keep
# their name.
_FLAGS = {
    "model_overrides": "model_overrides", "metrics_path": "--metrics",
    "tensorboard_dir": "--tensorboard", "resume": "--no-resume",
    "progress": "--no-progress", "optimizer.name": "--optimizer",
    "optimizer.learning_rate": "--lr", "optimizer.warmup_steps": "--warmup",
    "optimizer.total_steps": "--schedule-steps", "optimizer.clip_norm": "--clip",
    "optimizer.seed": "--proj-seed", "optimizer.b1": "optimizer.b1",
    "optimizer.b2": "optimizer.b2", "optimizer.eps": "optimizer.eps",
}
# On/off flags that turn a field off.
_INVERTED = ("resume", "progress")
# The file, in the checkpoint directory, that names the run using it.
_LOCK_FILE = "run.lock"


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
    allow_changes: Resume even if settings that alter the run differ from
      the checkpoint's (see below).
    metrics_path: JSONL file the metrics are appended to (None: none).
      Written by process 0; a ``{process}`` in the path makes every process
      write its own file.
    tensorboard_dir: TensorBoard log directory, used when ``tensorboardX`` or
      ``torch.utils.tensorboard`` can be imported (None: none).
    progress: Show a progress bar on stderr (process 0).
    max_bad_steps: Stop with :class:`NonFiniteError` after this many
      consecutive steps whose loss or gradient is not finite (each one is
      skipped: it leaves the state unchanged).
    coordinator: ``host:port`` of process 0 for multi-process runs.
    num_processes: Number of processes.
    process_id: This process's index.

  Resuming with other settings: a resumed run compares its settings with
  those saved in the checkpoint (the ``"run"`` entry of :meth:`to_dict`).

  * Safe to change (:data:`RESUME_SAFE_FIELDS`): ``steps``, ``eval_every``,
    ``eval_batches``, ``eval_split``, ``log_every``, ``mesh``, ``dtype``,
    ``remat``, ``data_dir``, ``checkpoint_dir``, ``checkpoint_every``,
    ``keep``, ``resume``, ``allow_changes``, ``metrics_path``,
    ``tensorboard_dir``, ``progress``, ``coordinator``, ``num_processes``,
    ``process_id``. They decide how far the run goes and how it is computed
    (``dtype`` and ``mesh`` only round differently), logged, evaluated and
    saved. A change is reported in one line.
  * Altering the run (:data:`RESUME_ALTERING_FIELDS`): ``model``,
    ``scan_layers``, ``param_dtype``, ``model_overrides``, every
    ``optimizer`` field, ``data``, ``split``, ``text_key``, ``tokenizer``,
    ``vocab_size`` (with the SentencePiece tokenizer only), ``batch_size``,
    ``seq_len``, ``seed``. They decide what is trained. A change is refused,
    naming each setting with its saved and new value, unless
    ``allow_changes`` is set; then the data starts again from its beginning
    if its saved position does not fit the new data settings.

  The schedule length is ``optimizer.total_steps``, not ``steps``. The
  command line's ``--schedule-steps`` defaults to ``--steps``, so raising
  ``--steps`` alone would stretch the schedule mid-run (the learning rate
  would jump) and is refused; giving ``--schedule-steps`` of the saved run
  extends the run on its own schedule. The model and the kind of optimizer
  (:meth:`model_key`) are checked by the checkpointer, which refuses a
  change even with ``allow_changes``, as it refuses any change of the
  state's shapes (``rank``, ``side``).
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
  allow_changes: bool = False
  metrics_path: str | None = None
  tensorboard_dir: str | None = None
  progress: bool = True
  max_bad_steps: int = 10
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
                "checkpoint-every": self.checkpoint_every,
                "max-bad-steps": self.max_bad_steps}
    for flag, value in positive.items():
      if value < 1:
        raise ValueError(f"--{flag} must be >= 1, got {value}")
    for flag, name in (("--dtype", self.dtype), ("--param-dtype", self.param_dtype),
                       ("--moment-dtype", self.optimizer.moment_dtype)):
      _check_float_dtype(flag, name)
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
    _check_optimizer(self.optimizer, self.steps)
    _check_run(self)
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
# Settings that cannot work, and settings changed since a checkpoint
# ----------------------------------------------------------------------------


def _is_number(value: Any) -> bool:
  return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_positive(flag: str, value: Any) -> None:
  if not (_is_number(value) and math.isfinite(value) and value > 0):
    raise ValueError(f"{flag} must be a finite number > 0, got {value}")


def _check_int(flag: str, value: Any, least: int) -> None:
  if not isinstance(value, int) or isinstance(value, bool) or value < least:
    raise ValueError(f"{flag} must be an integer >= {least}, got {value}")


def _check_optimizer(opt: train_lib.OptimizerConfig, steps: int) -> None:
  """Refuses optimizer settings that cannot work or would be ignored.

  :class:`~subspace_jax.training.train.OptimizerConfig` and the transforms
  check some of these too, in their own (Python) terms; these messages name
  the command-line flags.
  """
  _check_positive("--lr", opt.learning_rate)
  schedule = opt.total_steps
  if opt.warmup_steps > schedule:
    raise ValueError(
        f"--warmup {opt.warmup_steps} is longer than the {schedule}-step "
        f"schedule (--schedule-steps, default --steps); use --warmup "
        f"{schedule} or less, or a longer schedule")
  ratio = opt.min_lr_ratio
  if not (_is_number(ratio) and 0 <= ratio <= 1):
    raise ValueError(f"--min-lr-ratio must be in [0, 1], got {ratio}")
  decay = opt.weight_decay
  if not (_is_number(decay) and math.isfinite(decay) and decay >= 0):
    raise ValueError(f"--weight-decay must be a finite number >= 0, got {decay}")
  if opt.clip_norm is not None and opt.clip_norm != 0:
    if not (_is_number(opt.clip_norm) and math.isfinite(opt.clip_norm)
            and opt.clip_norm > 0):
      raise ValueError(f"--clip must be a finite number > 0 (or 0: no "
                       f"clipping), got {opt.clip_norm}")
  for name in ("b1", "b2"):
    value = getattr(opt, name)
    if not (_is_number(value) and 0 <= value < 1):
      raise ValueError(f"optimizer.{name} must be in [0, 1), got {value}")
  if not (_is_number(opt.eps) and math.isfinite(opt.eps) and opt.eps >= 0):
    raise ValueError(f"optimizer.eps must be a finite number >= 0, got {opt.eps}")
  _check_int("--rank", opt.rank, 1)
  _check_int("--update-gap", opt.update_gap, 1)
  _check_int("--proj-seed", opt.seed, 0)
  _check_int("--svd-steps", opt.svd_steps, 0)
  _check_positive("--scale", opt.scale)
  if opt.eta is not None:
    _check_positive("--eta", opt.eta)
    if not (opt.name == "rso" or (opt.name == "golore" and opt.model_mode)):
      raise ValueError(f"--eta applies to --optimizer rso (and golore with "
                       f"--subspace-mode model), not {opt.name}; drop it")
  if opt.svd_steps:
    if opt.name != "golore":
      raise ValueError(f"--svd-steps applies to --optimizer golore, not "
                       f"{opt.name}; drop it")
    length = max(schedule, steps)
    if opt.svd_steps > length:
      raise ValueError(
          f"--svd-steps {opt.svd_steps} is more than the {length} steps of "
          f"the run, which would never use a random projection; use at most "
          f"{length}, or --optimizer galore for SVD projections throughout")
  sides = sj.matrix_view.SIDES
  if opt.side is not None and opt.side not in sides:
    raise ValueError(f"--side must be one of {', '.join(sides)}, got "
                     f"{opt.side!r}")
  if opt.svd not in ("exact", "randomized"):
    raise ValueError(f"--svd must be exact or randomized, got {opt.svd!r}")


def _check_run(cfg: RunConfig) -> None:
  """Refuses run settings (other than the optimizer's) that cannot work."""
  _check_int("--seed", cfg.seed, 0)
  sizes = cfg.mesh
  if sizes.count(-1) > 1 or any(s == 0 or s < -1 for s in sizes):
    raise ValueError(f"--mesh sizes must be >= 1, or -1 for one of them (the "
                     f"rest of the devices), got {','.join(map(str, sizes))}")
  if cfg.tokenizer == "sentencepiece" and cfg.vocab_size < _SPM_MIN_VOCAB:
    raise ValueError(f"--vocab-size must be >= {_SPM_MIN_VOCAB} for the "
                     f"SentencePiece tokenizer, got {cfg.vocab_size}")
  evaluates = bool(cfg.eval_every and cfg.eval_split)
  if cfg.data.partition(":")[0] != "tfds":
    splits = [("--split", cfg.split)]
    if evaluates:
      splits.append(("--eval-split", cfg.eval_split))
    for flag, split in splits:
      if split not in _LOCAL_SPLITS:
        raise ValueError(f"{flag} must be train, validation or all for "
                         f"--data {cfg.data}, got {split!r}")
  if evaluates and cfg.split == "all":
    raise ValueError(
        f"--split all trains on every document, so --eval-split "
        f"{cfg.eval_split} would evaluate on training documents; add "
        "--eval-split none (no evaluation), or train on --split train")
  if evaluates and cfg.eval_split == cfg.split:
    raise ValueError(
        f"--split and --eval-split are both {cfg.split!r}, so the evaluation "
        "would measure training documents; use another --eval-split, or "
        "--eval-split none")


def _flag(path: str) -> str:
  """The command-line flag of a field path ("seq_len", "optimizer.rank")."""
  if path in _FLAGS:
    return _FLAGS[path]
  return "--" + path.rpartition(".")[2].replace("_", "-")


def _show(path: str, value: Any) -> str:
  """A saved or new value as the command line spells it."""
  if path in _INVERTED and isinstance(value, bool):
    value = not value
  if value is None:
    return "0" if path == "optimizer.clip_norm" else "none"
  if isinstance(value, bool):
    return "on" if value else "off"
  if isinstance(value, (list, tuple)):
    return ",".join(map(str, value))
  if isinstance(value, dict):
    return json.dumps(value, sort_keys=True)
  return str(value)


def _flat_settings(run: Mapping[str, Any]) -> dict[str, Any]:
  """``run`` with the optimizer's fields as "optimizer.NAME" entries."""
  flat = {}
  for key, value in run.items():
    if key == "optimizer" and isinstance(value, Mapping):
      flat.update({f"optimizer.{k}": v for k, v in value.items()})
    else:
      flat[key] = value
  if flat.get("tokenizer") == "byte":
    flat.pop("vocab_size", None)  # The byte tokenizer has its own.
  return flat


def _settings_changes(saved_run: Mapping[str, Any], run: Mapping[str, Any]
                     ) -> list[tuple[str, Any, Any, bool]]:
  """How the ``"run"`` entries of two :meth:`RunConfig.to_dict` differ.

  Args:
    saved_run: The checkpoint's entry.
    run: This run's entry.

  Returns:
    ``(field path, saved value, new value, safe)`` of every field that
    differs, in field order; optimizer fields are ``"optimizer.NAME"``.
    Fields that one of them lacks (an older version's checkpoint) and
    ``allow_changes`` are left out.
  """
  saved, now = _flat_settings(saved_run), _flat_settings(run)
  return [(path, saved[path], value, path in RESUME_SAFE_FIELDS)
          for path, value in now.items()
          if path in saved and saved[path] != value
          and path != "allow_changes"]  # Only says how to resume.


def _same_model(saved: Mapping[str, Any], expected: Mapping[str, Any]) -> bool:
  """Whether the checkpointer would accept ``saved``'s model entry."""
  model = saved.get("model")
  return model is None or model == json.loads(json.dumps(expected["model"]))


def _check_resume(cfg: RunConfig, saved: Mapping[str, Any] | None, step: int,
                  directory: str) -> str:
  """Compares the settings saved at ``step`` with ``cfg``'s.

  Returns:
    The info line listing the accepted changes ("" if none).

  Raises:
    ValueError: If a setting that alters the run changed and
      ``cfg.allow_changes`` is off, naming each such flag.
  """
  if not isinstance(saved, Mapping) or not isinstance(saved.get("run"), Mapping):
    return ""
  changes = _settings_changes(saved["run"], cfg.to_dict()["run"])

  def listed(items):
    parts = []
    for path, old, new, _ in items:
      text = f"{_flag(path)} {_show(path, old)} -> {_show(path, new)}"
      if path == "optimizer.total_steps":
        text += (f" (it defaults to --steps; give --schedule-steps "
                 f"{_show(path, old)} to keep the saved schedule)")
      parts.append(text)
    return ", ".join(parts)

  safe = [c for c in changes if c[3]]
  altering = [c for c in changes if not c[3]]
  if altering and not cfg.allow_changes:
    raise ValueError(
        f"checkpoint step {step} in {directory} was made with other settings "
        f"(saved -> now: {listed(altering)}); use --name NEW (or another "
        "--checkpoint-dir) for a new run, or --allow-changes to resume with "
        "the new settings")
  parts = []
  if safe:
    parts.append(f"changed since step {step} (saved -> now): {listed(safe)}")
  if altering:
    parts.append(f"allowed by --allow-changes: {listed(altering)}")
  return "; ".join(parts)


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


# Python argument names in the data pipeline's messages, and their flags.
_DATA_WORDS = ((re.compile(r"split='all'"), "--split all with --eval-split none"),
               (re.compile(r"\bbatch_size\b"), "--batch-size"),
               (re.compile(r"\bseq_len\b"), "--seq-len"))


def _data_error(error: data_lib.DataError) -> data_lib.DataError:
  """``error`` with the data pipeline's argument names as flags."""
  text = str(error)
  for pattern, flag in _DATA_WORDS:
    text = pattern.sub(flag, text)
  return data_lib.DataError(text)


def _make_tokenizer(cfg: RunConfig):
  if cfg.tokenizer == "byte":
    return tok_lib.ByteTokenizer()
  corpus = None  # The embedded corpus's training split, get_tokenizer's default.
  try:
    source = _source(cfg, cfg.split)
    if hasattr(source, "open"):
      docs = source.open()
      corpus = [docs[i] for i in range(min(len(docs), _SPM_SAMPLE_DOCS))]
    elif not isinstance(source, data_lib.EmbeddedCorpus):
      corpus = source.documents()[:_SPM_SAMPLE_DOCS]
  except data_lib.DataError as e:
    raise _data_error(e) from None
  return tok_lib.get_tokenizer("sentencepiece", vocab_size=cfg.vocab_size,
                               corpus=corpus)


def _make_iterators(cfg: RunConfig, tokenizer):
  """The training iterator, and the evaluation iterator with its starting
  state (None, None without evaluation)."""
  iter_args = dict(seq_len=cfg.seq_len, batch_size=cfg.batch_size)
  try:
    train_iter = data_lib.make_iterator(_source(cfg, cfg.split), tokenizer,
                                        seed=cfg.seed, **iter_args)
    eval_iter = eval_start = None
    if cfg.eval_every and cfg.eval_split:
      eval_iter = data_lib.make_iterator(_source(cfg, cfg.eval_split),
                                         tokenizer, shuffle=False, **iter_args)
      eval_start = eval_iter.get_state()
  except data_lib.DataError as e:
    raise _data_error(e) from None
  return train_iter, eval_iter, eval_start


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
# One run per directory
# ----------------------------------------------------------------------------


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True  # Another user's process.
  return True


class _RunLock:
  """A lock file that names the run (host and pid) using a directory.

  Taken by creating the file with its content in one step (a hard link of a
  finished temporary file), so a reader never sees it half written. A lock
  of a process that is gone on this host is stale and taken over; a lock
  from another host cannot be checked and is always respected.
  """

  def __init__(self, path: str):
    self.path = path
    self._me = {"host": socket.gethostname(), "pid": os.getpid(),
                "since": time.strftime("%Y-%m-%d %H:%M:%S")}

  def _create(self) -> bool:
    """Creates the lock file; False if it exists."""
    folder = os.path.dirname(self.path) or "."
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{_LOCK_FILE}.")
    try:
      with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(self._me, f)
      try:
        os.link(tmp, self.path)
      except FileExistsError:
        return False
      except OSError:  # No hard links here: create it exclusively instead.
        try:
          fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
          return False
        with os.fdopen(fd, "w", encoding="utf-8") as f:
          json.dump(self._me, f)
      return True
    finally:
      os.unlink(tmp)

  def _holder(self) -> dict[str, Any] | None:
    """The lock file's content; None if there is no lock file, {} if it
    cannot be read."""
    try:
      with open(self.path, encoding="utf-8") as f:
        holder = json.load(f)
    except FileNotFoundError:
      return None
    except (OSError, ValueError):
      return {}
    ok = (isinstance(holder, dict) and isinstance(holder.get("pid"), int)
          and isinstance(holder.get("host"), str))
    return holder if ok else {}

  def _is_stale(self, holder: Mapping[str, Any]) -> bool:
    return (holder.get("host") == self._me["host"]
            and holder.get("pid") != self._me["pid"]
            and not _pid_alive(holder["pid"]))

  def acquire(self) -> str | None:
    """Takes the lock.

    Returns:
      An info line if a stale lock was taken over, else None.

    Raises:
      ValueError: If another run holds it, naming that run.
    """
    taken_over = None
    for _ in range(3):
      if self._create():
        if taken_over is None:
          return None
        return (f"took over the lock of a run that is gone (pid "
                f"{taken_over['pid']} on {taken_over['host']}, since "
                f"{taken_over.get('since', '?')}): {self.path}")
      holder = self._holder()
      if holder is None:
        continue  # Released in between: try again.
      if not holder or not self._is_stale(holder):
        break
      if self._holder() == holder:  # Not taken over by another run meanwhile.
        try:
          os.unlink(self.path)
        except FileNotFoundError:
          pass
      taken_over = holder
    else:
      holder = self._holder() or {}
    directory = os.path.dirname(self.path) or "."
    who = (f"pid {holder['pid']} on {holder['host']}, since "
           f"{holder.get('since', '?')}" if holder else "its lock file cannot "
           "be read")
    raise ValueError(
        f"{directory} is in use by another run ({who}); wait for it to end, "
        "or use --name NEW (or another --checkpoint-dir) for a new run; if no "
        f"run is using it, delete {self.path}")

  def release(self) -> None:
    """Deletes the lock file if it is still this process's."""
    holder = self._holder()
    if holder and holder.get("host") == self._me["host"] and (
        holder.get("pid") == self._me["pid"]):
      try:
        os.unlink(self.path)
      except OSError:
        pass


def _lock_path(cfg: RunConfig) -> str | None:
  """The run's lock file: in the checkpoint directory, else next to the
  metrics file; None for neither or for a remote (URL) checkpoint path."""
  if cfg.checkpoint_dir:
    if "://" in cfg.checkpoint_dir:
      return None
    return os.path.join(cfg.checkpoint_dir, _LOCK_FILE)
  if cfg.metrics_path:
    return cfg.metrics_path.replace("{process}", "0") + ".lock"
  return None


def _take_lock(cfg: RunConfig) -> _RunLock | None:
  """Process 0 takes the run's lock; all processes raise if it is held.

  Raises:
    ValueError: If another run holds the lock (one line naming it).
  """
  path = _lock_path(cfg)
  if path is None:
    return None
  lock = error = note = None
  if jax.process_index() == 0:
    lock = _RunLock(path)
    try:
      note = lock.acquire()
    except ValueError as e:
      lock, error = None, str(e)
    except OSError as e:
      lock, error = None, (f"cannot create the lock file {path} "
                           f"({e.strerror or e}); check the directory's "
                           "permissions or use another --checkpoint-dir")
  error = _allgather_json(error)[0]  # Every process stops if process 0 must.
  if error:
    raise ValueError(error)
  if note:
    _info(note)
  return lock


# ----------------------------------------------------------------------------
# Output: progress bar, JSONL, TensorBoard
# ----------------------------------------------------------------------------


def _format_eta(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class _Progress:
  """A one-line progress bar on stderr: tqdm if installed, else ``\\r``.

  The bar (and its ETA) starts with :meth:`start`, once the first step has
  compiled and run, so the compile time does not count in the rate. Lines
  written with :meth:`write` (evaluations, the stop) are shown whether or
  not the bar is.
  """

  def __init__(self, total: int, enabled: bool):
    self._enabled, self._total = enabled, total
    self._step = self._start = 0
    self._t0: float | None = None
    self._postfix = ""
    self._width = 0  # Of the last line written, to blank it out.
    self._bar = None

  def start(self, step: int) -> None:
    """Starts the clock at ``step`` (steps before it are not timed)."""
    self._t0, self._start, self._step = time.perf_counter(), step, step
    if not self._enabled:
      return
    try:
      from tqdm import tqdm  # pylint: disable=import-outside-toplevel
    except ImportError:
      return
    self._bar = tqdm(total=self._total, initial=step, file=sys.stderr,
                     unit="step", dynamic_ncols=True, smoothing=0.1)

  def update(self, step: int, loss: float | None = None,
             tokens_per_s: float | None = None) -> None:
    if not self._enabled or self._t0 is None:
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
    """Prints ``line`` on stderr above the bar (process 0 only)."""
    if jax.process_index() != 0:
      return
    if self._bar is not None:
      self._bar.write(line, file=sys.stderr)
    elif self._width:
      sys.stderr.write(f"\r{line.ljust(self._width)}\n")
    else:
      sys.stderr.write(line + "\n")
    sys.stderr.flush()

  def close(self) -> None:
    if self._bar is not None:
      self._bar.close()
    elif self._width:
      sys.stderr.write("\n")
      sys.stderr.flush()
    self._bar, self._width = None, 0


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

  A second signal ends the process at once (exit code 128 + its number),
  without a checkpoint. The previous handlers come back on exit. Handlers can only be set from the main
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
    name = signal.Signals(signum).name
    if self.signal_name is not None:
      # A second signal: exit at once. Raising KeyboardInterrupt here could
      # land inside a compile or a background thread (seen to end in a
      # segfault); exiting loses nothing that was committed: Orbax renames
      # a checkpoint into place only when it is complete, and the metrics
      # file is flushed line by line.
      sys.stderr.write(f"\nsecond {name}: stopped at once, without saving\n")
      sys.stderr.flush()
      os._exit(128 + signum)  # pylint: disable=protected-access
    self.signal_name = name

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
  if latest is None:
    return setup.init(cfg.seed), 0
  # The settings first, from the newest checkpoint's config alone (quick);
  # another model is left to the checkpointer, which names it as such.
  expected, changes = cfg.to_dict(), None
  saved = ckpt.saved_config(latest)
  if saved is not None and _same_model(saved, expected):
    changes = _check_resume(cfg, saved, latest, ckpt.directory)
  restored = _restore_quietly(ckpt, setup.abstract_state, expected)
  if changes is None or restored.step != latest:  # Fell back to an older one.
    changes = _check_resume(cfg, restored.config, restored.step, ckpt.directory)
  data_note = _restore_data_state(cfg, train_iter, restored)
  _info(f"resumed from step {restored.step} ({ckpt.directory})")
  for line in (changes, data_note):
    if line:
      _info(line)
  return restored.state, restored.step


def _restore_data_state(cfg, iterator, restored) -> str | None:
  """Moves ``iterator`` to the checkpoint's data position.

  Returns:
    An info line if, with ``allow_changes``, the position does not fit the
    data any more and the data starts from its beginning; else None.

  Raises:
    ValueError: If the position does not fit and changes are not allowed.
  """
  try:
    _set_data_state(iterator, restored.data_state)
  except data_lib.DataError:
    if not cfg.allow_changes:
      raise ValueError(
          f"the data position saved at step {restored.step} does not fit the "
          "data of this run (have the files of --data changed?); use "
          "--allow-changes to start the data from its beginning, or another "
          "--checkpoint-dir") from None
    return (f"the data position saved at step {restored.step} does not fit "
            "this run's data: the data starts from its beginning")
  return None


def _restore_quietly(ckpt, abstract_state, expected):
  """``ckpt.restore``, its warnings (a fallback past a corrupt step, ...)
  printed as one ``warning: ...`` line each, not in Python's two-line
  format."""
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always", CheckpointWarning)
    restored = ckpt.restore(abstract_state, expected_config=expected)
  for w in caught:
    if issubclass(w.category, CheckpointWarning):
      _info(f"warning: {w.message}")
    else:
      warnings.showwarning(w.message, w.category, w.filename, w.lineno)
  return restored


def train(cfg: RunConfig) -> dict[str, Any]:
  """Runs (or resumes) a pretraining run; see the module docstring.

  Args:
    cfg: The run's settings.

  Returns:
    A summary: ``step`` (steps done), ``start_step``, ``train_loss`` (mean
    over the last logging window), ``eval_loss``, ``eval_ppl``,
    ``tokens_per_s`` (after the first, compiling, step; evaluation and
    checkpointing excluded), ``wall_time_s``, ``interrupted`` (the signal's
    name or None), ``checkpoint_step`` (the newest saved, or None),
    ``eval_step`` (the step ``eval_loss`` is from) and ``nonfinite_steps``
    (steps skipped because their loss or gradient was not finite).

  Raises:
    ValueError: On settings or data that cannot work (one-line message).
    NonFiniteError: After ``max_bad_steps`` consecutive non-finite steps.
  """
  t_begin = time.perf_counter()
  initialize_distributed(cfg.coordinator, cfg.num_processes, cfg.process_id)

  mesh = shd.make_mesh(*cfg.mesh)
  _check_batch(cfg, mesh)
  lock = _take_lock(cfg)
  try:
    return _train(cfg, mesh, t_begin)
  finally:
    if lock is not None:
      lock.release()


def _train(cfg: RunConfig, mesh, t_begin: float) -> dict[str, Any]:
  """:func:`train` once the mesh is made and the run's lock is held."""
  tokenizer = _make_tokenizer(cfg)
  model_config = cfg.model_config()
  if tokenizer.vocab_size != model_config.vocab_size:
    raise ValueError(f"the tokenizer has {tokenizer.vocab_size} ids, not "
                     f"{model_config.vocab_size}; set --vocab-size "
                     f"{tokenizer.vocab_size}")
  setup = train_lib.setup(model_config, cfg.optimizer, mesh)
  check_rank(setup.abstract_state.params, cfg.optimizer)

  train_iter, eval_iter, eval_start = _make_iterators(cfg, tokenizer)

  ckpt = None
  if cfg.checkpoint_dir:
    ckpt = Checkpointer(cfg.checkpoint_dir, save_interval_steps=cfg.checkpoint_every,
                        max_to_keep=cfg.keep)
  sink = progress = None
  stop = _StopRequest()  # From here on a signal stops the run cleanly.
  try:
    stop.__enter__()
    state, start = _restore_or_init(cfg, setup, ckpt, train_iter)
    if start == 0:
      _info(f"{cfg.model}: {llama.param_count(model_config) / 1e6:.2f}M parameters, "
          f"{cfg.optimizer.name}"
          f"{' (model mode)' if cfg.optimizer.model_mode else ''}, "
          f"mesh {dict(mesh.shape)} on "
          f"{jax.device_count()} {jax.devices()[0].platform} device(s), "
          f"{jax.process_count()} process(es)")
    sink = _MetricsSink(cfg)
    progress = _Progress(cfg.steps, cfg.progress and jax.process_index() == 0)
    _info(f"compiling the train step (step {start + 1}) ...")
    summary = _run(cfg, setup, state, start, train_iter, eval_iter, eval_start,
                   ckpt, sink, progress, stop)
  finally:
    stop.__exit__()
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


class NonFiniteError(RuntimeError):
  """Too many consecutive steps had a non-finite loss or gradient."""


class _Health:
  """Counts the steps that were skipped as non-finite.

  The step's ``finite`` flags stay on the device until the loop syncs (at
  logging, checkpoint and stop points, or every ``max_bad_steps`` steps),
  so there is no host round trip per step.
  """

  def __init__(self, max_bad_steps: int):
    self.max_bad_steps = max_bad_steps
    self.pending: list[jax.Array] = []
    self.run = self.total = 0  # Consecutive and all non-finite steps.

  def due(self) -> bool:
    """Whether the pending flags could complete a stopping streak."""
    return self.run + len(self.pending) >= self.max_bad_steps

  def check(self, step: int) -> None:
    """Books the pending flags; raises once ``max_bad_steps`` in a row
    were non-finite."""
    for ok in jax.device_get(self.pending):
      self.run = 0 if ok else self.run + 1
      self.total += not ok
    self.pending.clear()
    if self.run >= self.max_bad_steps:
      raise NonFiniteError(
          f"stopped at step {step}: the last {self.run} steps had a "
          "non-finite loss or gradient and were skipped (the state is the "
          f"one before them, and no checkpoint was written after them); "
          "lower --lr, check the data, or resume from an earlier "
          "checkpoint")


def _run(cfg, setup, state, start, train_iter, eval_iter, eval_start, ckpt,
         sink, progress, stop) -> dict[str, Any]:
  """The step loop proper; returns the summary (without wall time)."""
  config_dict = cfg.to_dict()
  tokens_per_step = cfg.batch_size * cfg.seq_len
  single = jax.process_count() == 1
  summary = {"step": start, "start_step": start, "train_loss": None,
             "eval_loss": None, "eval_ppl": None, "eval_step": None,
             "tokens_per_s": None, "interrupted": None,
             "checkpoint_step": None, "nonfinite_steps": 0}
  losses: list[jax.Array] = []    # Step losses since the last record.
  health = _Health(cfg.max_bad_steps)
  timed = _Timer()

  def eval_due(step: int) -> bool:
    return eval_iter is not None and (step % cfg.eval_every == 0 or step == cfg.steps)

  def evaluate(step: int) -> tuple[float, float]:
    loss, ppl = _evaluate(setup, state.params, eval_iter, eval_start, cfg)
    summary.update(eval_loss=loss, eval_ppl=ppl, eval_step=step)
    progress.write(f"step {step}: eval loss {loss:.4f}, perplexity {ppl:.2f}")
    return loss, ppl

  step = start
  for step in range(start + 1, cfg.steps + 1):
    batch = _global_batch(next(train_iter), setup, cfg)
    state, metrics = setup.train_step(state, batch)
    losses.append(metrics["loss"])
    health.pending.append(metrics["finite"])
    if step == start + 1:  # The compiling step is not timed.
      jax.block_until_ready(metrics)
      timed.restart()
      progress.start(step)
    else:
      timed.pending += 1
    do_eval = eval_due(step)
    do_save = ckpt is not None and step % cfg.checkpoint_every == 0
    do_log = step % cfg.log_every == 0 or step == cfg.steps or do_eval
    # Processes must agree on stopping, so they poll at the same steps.
    stopping = (do_log or single) and stop.agreed()
    if not (do_log or do_save or stopping or health.due()):
      progress.update(step)
      continue
    jax.block_until_ready(metrics)
    tps = timed.book(tokens_per_step)
    health.check(step)  # Raises after too many non-finite steps.
    summary["nonfinite_steps"] = health.total
    if do_log or stopping:
      record = _record(step, losses, metrics, tps, health)
      losses.clear()
      summary["train_loss"] = record["loss"]
      if do_eval and not stopping:
        record["eval_loss"], record["eval_ppl"] = evaluate(step)
      sink.write(record)
      progress.update(step, record["loss"], tps)
    else:
      progress.update(step)
    # A state reached through non-finite steps is the one before them:
    # saving it again would only push good checkpoints out of --keep.
    saved = False
    if (ckpt is not None and (do_save or stopping or step == cfg.steps)
        and health.run == 0):
      saved = ckpt.save(step, state, data_state=_data_state(train_iter),
                        config=config_dict, force=stopping or step == cfg.steps)
      if saved:
        summary["checkpoint_step"] = step
    timed.restart()  # Evaluating, logging and saving are not timed.
    if stopping:
      summary["interrupted"] = stop.signal_name or "a signal to another process"
      progress.write(f"stopped at step {step} by {summary['interrupted']}"
                     + ("; checkpoint saved" if saved else ""))
      break
  summary["step"] = step
  if ckpt is not None and summary["checkpoint_step"] is None:
    summary["checkpoint_step"] = ckpt.latest_step()
  summary["tokens_per_s"] = timed.total_rate(tokens_per_step)
  if eval_iter is not None and summary["eval_loss"] is None and not summary["interrupted"]:
    evaluate(step)
  return summary


def _record(step, losses, metrics, tps, health) -> dict[str, Any]:
  """The metrics record of a logging step: the mean loss of the window's
  finite steps (None if it had none)."""
  fetched, last = jax.device_get((losses, metrics))
  finite = [float(l) for l in fetched if math.isfinite(l)]
  return {"step": step, "loss": float(np.mean(finite)) if finite else None,
          "grad_norm": float(last["grad_norm"]), "lr": float(last["lr"]),
          "tokens_per_s": tps, "nonfinite_steps": health.total}


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
    stale = s["eval_step"] is not None and s["eval_step"] != s["step"]
    parts.append(f"eval loss {s['eval_loss']:.4f} (perplexity {s['eval_ppl']:.2f}"
                 + (f", at step {s['eval_step']})" if stale else ")"))
  if s.get("nonfinite_steps"):
    parts.append(f"{s['nonfinite_steps']} non-finite step(s) skipped")
  if s["tokens_per_s"]:
    parts.append(f"{s['tokens_per_s']:,.0f} tokens/s")
  parts.append(f"{s['wall_time_s']:.1f} s")
  if s["interrupted"]:
    parts.append(f"interrupted by {s['interrupted']}")
  prefix = "" if jax.process_count() == 1 else f"[process {jax.process_index()}] "
  print(prefix + "done: " + ", ".join(parts), flush=True)
