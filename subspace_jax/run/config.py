"""The settings of a pretraining run, and the checks of them.

:class:`RunConfig` holds every setting and round-trips through a JSON dict.
Settings that cannot work raise ``ValueError`` naming the command-line flag
to change (:func:`flag_name`); :func:`check_resume` compares this run's
settings with a checkpoint's (:data:`RESUME_SAFE_FIELDS` may change,
:data:`RESUME_ALTERING_FIELDS` only with ``allow_changes``).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

import subspace_jax as sj
from subspace_jax import models
from subspace_jax.models.io import hf
from subspace_jax.data import tokenizers as tok_lib
from subspace_jax.train import step as train_lib

__all__ = ["RunConfig", "RESUME_SAFE_FIELDS", "RESUME_ALTERING_FIELDS",
           "flag_name", "check_resume", "same_model", "check_rank",
           "check_batch"]

# Model settings kept outside RunConfig.model_overrides because they have
# their own fields; vocab_size always comes from the tokenizer.
_OWN_FIELDS = ("vocab_size", "scan_layers", "remat", "dtype", "param_dtype")

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
    "max_bad_steps", "data_workers", "export_hf", "answers",
    "coordinator", "num_processes", "process_id")
RESUME_ALTERING_FIELDS = (
    "model", "scan_layers", "param_dtype", "model_overrides", "optimizer",
    "data", "split", "text_key", "tokenizer", "tokenizer_model", "vocab_size",
    "batch_size", "seq_len", "seed", "init_from")

TOKENIZERS = ("byte", "sentencepiece", "huggingface")
"""Values of :attr:`RunConfig.tokenizer`."""

# LlamaConfig fields that are left out of the checkpoints' model key while
# they have these values, so checkpoints written before the fields existed
# still resume.
_KEY_DEFAULTS = {"num_kv_heads": None, "tie_embeddings": False}

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
    model: A key of :data:`subspace_jax.models.CONFIGS`.
    scan_layers: Stack the blocks and run them with ``nnx.scan``.
    remat: What the backward pass keeps of each block: a policy of
      :data:`subspace_jax.models.llama.REMAT_POLICIES` (True: "full").
    dtype: Compute dtype name (``"float32"`` or ``"bfloat16"``).
    param_dtype: Storage dtype name of the weights (the master weights).
    model_overrides: Other :class:`~subspace_jax.models.llama.LlamaConfig`
      fields to change (JSON values), e.g. ``{"num_layers": 4}``.
    optimizer: The optimizer; its ``total_steps`` is the schedule length.
    data: Source spec: ``"embedded"``, ``"files:GLOB"``, ``"tfds:NAME"``,
      or fine-tuning examples ``"jsonl:PATH"``, ``"instructions"``
      (:func:`~subspace_jax.data.sources.source_from_spec`).
    split: Training split.
    eval_split: Held-out split evaluated every ``eval_every`` steps (None:
      no evaluation).
    data_dir: TFDS data directory.
    text_key: TFDS text feature.
    tokenizer: ``"byte"``, ``"sentencepiece"`` (``tokenizer_model``, or
      else one trained on the training split and cached) or
      ``"huggingface"`` (the ``tokenizer.json`` of ``tokenizer_model``).
    tokenizer_model: An existing tokenizer: a SentencePiece ``.model``, a
      Hugging Face ``tokenizer.json`` or a directory holding one
      (:func:`~subspace_jax.data.tokenizers.load_tokenizer`); ``tokenizer``
      must be its kind. The model's vocabulary is then its own (or, with
      ``init_from``, the checkpoint's, which may be larger).
    vocab_size: SentencePiece vocabulary size when one is trained (the byte
      tokenizer's is 259).
    batch_size: Global batch size (sequences per step, all processes).
    seq_len: Tokens per sequence.
    data_workers: grain worker processes that read, tokenize and pack a
      streamed (TFDS) source; 0 reads it in a thread of this process.
    steps: Train until this many steps are done (resumed runs included);
      0 evaluates the loaded model only.
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
    init_from: A Hugging Face LLaMA checkpoint directory or a ``.gguf``
      file to start from (:func:`subspace_jax.models.io.hf.load`): its
      ``config.json`` (or GGUF metadata) is the model
      (``model`` is not used; ``scan_layers``, ``remat``, the dtypes and
      ``seq_len`` still apply) and its weights the starting point. A
      resumed run continues from its own checkpoint.
    export_hf: Directory to write the trained model to, as a Hugging Face
      checkpoint (:func:`subspace_jax.models.io.hf.save`), when the run ends
      (not when a signal stops it); with the tokenizer's files when it was
      loaded from ``tokenizer_model``.
    answers: Greedy answers to the first this many held-out questions
      (prompt/response pairs or conversations of the evaluation split; -1:
      all of them), before the first step and at the end: their
      exact-match accuracy is reported with the held-out loss, and three
      of them are printed (0: none).
    coordinator: ``host:port`` of process 0 for multi-process runs.
    num_processes: Number of processes.
    process_id: This process's index.

  Resuming with other settings: a resumed run compares its settings with
  those saved in the checkpoint (the ``"run"`` entry of :meth:`to_dict`).

  * Safe to change (:data:`RESUME_SAFE_FIELDS`): ``steps``, ``eval_every``,
    ``eval_batches``, ``eval_split``, ``log_every``, ``mesh``, ``dtype``,
    ``remat``, ``data_dir``, ``checkpoint_dir``, ``checkpoint_every``,
    ``keep``, ``resume``, ``allow_changes``, ``metrics_path``,
    ``tensorboard_dir``, ``progress``, ``max_bad_steps``, ``data_workers``,
    ``coordinator``, ``num_processes``, ``process_id``. They decide how far
    the run goes and how it is computed (``dtype`` and ``mesh`` only round
    differently), logged, evaluated and saved. A change is reported in one
    line. (A streamed source's saved data position fits only the same
    ``data_workers``: there a change needs ``allow_changes``, and the data
    start from their beginning.)
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
  remat: bool | str = "none"
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
  tokenizer_model: str | None = None
  vocab_size: int = 8000
  batch_size: int = 16
  seq_len: int = 64
  data_workers: int = 0
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
  init_from: str | None = None
  export_hf: str | None = None
  answers: int = 0
  coordinator: str | None = None
  num_processes: int | None = None
  process_id: int | None = None

  def __post_init__(self):
    object.__setattr__(self, "mesh", tuple(int(s) for s in self.mesh))
    object.__setattr__(self, "model_overrides", dict(self.model_overrides))
    object.__setattr__(self, "dtype", _dtype_name(self.dtype))
    object.__setattr__(self, "param_dtype", _dtype_name(self.param_dtype))
    positive = {"batch-size": self.batch_size, "seq-len": self.seq_len,
                "eval-batches": self.eval_batches,
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
    if self.steps < 0:
      raise ValueError(f"--steps must be >= 0 (0: evaluate only), got "
                       f"{self.steps}")
    if self.steps == 0 and not (self.eval_every and self.eval_split):
      raise ValueError("--steps 0 (--eval-only) evaluates the model and "
                       "needs an evaluation; drop --eval-split none and "
                       "--eval-every 0")
    if not isinstance(self.answers, int) or self.answers < -1:
      raise ValueError(f"--answers must be an integer >= -1 (-1: all, 0: "
                       f"none), got {self.answers}")
    if len(self.mesh) != 3:
      raise ValueError(f"--mesh needs three sizes DATA,FSDP,TENSOR, got "
                       f"{self.mesh}")
    _check_tokenizer(self.tokenizer, self.tokenizer_model)
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
    if self.tokenizer_model is not None:
      return _loaded_vocab_size(self.tokenizer_model)
    return self.vocab_size

  def model_config(self) -> Any:
    """The model: the named config with this run's changes.

    The vocabulary is the tokenizer's, and ``max_seq_len`` is raised to
    ``seq_len`` when shorter (it only bounds the input; RoPE has no table).
    With ``init_from`` the model is the checkpoint's ``config.json``.
    """
    if self.init_from is not None:
      base = hf.read_config(self.init_from)
      try:
        return hf.read_config(
            self.init_from, scan_layers=self.scan_layers, remat=self.remat,
            dtype=self.dtype, param_dtype=self.param_dtype,
            max_seq_len=max(base.max_seq_len, self.seq_len),
            **self.model_overrides)
      except ValueError as e:
        raise ValueError(f"--init-from: {e}") from None
    base = models.get_config(self.model)
    try:
      return models.get_config(
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
        if field.name in _KEY_DEFAULTS and value == _KEY_DEFAULTS[field.name]:
          continue
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

  :class:`~subspace_jax.train.step.OptimizerConfig` and the transforms
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
  _check_int("--data-workers", cfg.data_workers, 0)
  sizes = cfg.mesh
  if sizes.count(-1) > 1 or any(s == 0 or s < -1 for s in sizes):
    raise ValueError(f"--mesh sizes must be >= 1, or -1 for one of them (the "
                     f"rest of the devices), got {','.join(map(str, sizes))}")
  if (cfg.tokenizer == "sentencepiece" and cfg.tokenizer_model is None
      and cfg.vocab_size < _SPM_MIN_VOCAB):
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


def _check_tokenizer(kind: str, model: str | None) -> None:
  """Refuses a tokenizer kind that is unknown or not the kind of
  ``--tokenizer-model``."""
  if kind not in TOKENIZERS:
    raise ValueError(f"unknown tokenizer {kind!r}; choose "
                     f"{', '.join(TOKENIZERS)}")
  if model is None:
    if kind == "huggingface":
      raise ValueError("--tokenizer huggingface needs --tokenizer-model (a "
                       "tokenizer.json or a directory holding one)")
    return
  try:
    found, _ = tok_lib.tokenizer_file(model)
  except ValueError as e:
    raise ValueError(f"--tokenizer-model: {e}") from None
  if found != kind:
    raise ValueError(f"--tokenizer-model {model} is a {found} tokenizer, not "
                     f"--tokenizer {kind}; use --tokenizer {found} (or leave "
                     "--tokenizer out)")


@functools.lru_cache(maxsize=4)
def _loaded_vocab_size(path: str) -> int:
  try:
    return tok_lib.load_tokenizer(path).vocab_size
  except (ValueError, ImportError) as e:
    raise type(e)(f"--tokenizer-model: {e}") from None


def flag_name(path: str) -> str:
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
  if flat.get("tokenizer") == "byte" or flat.get("tokenizer_model"):
    flat.pop("vocab_size", None)  # The tokenizer has its own.
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


def same_model(saved: Mapping[str, Any], expected: Mapping[str, Any]) -> bool:
  """Whether the checkpointer would accept ``saved``'s model entry."""
  model = saved.get("model")
  return model is None or model == json.loads(json.dumps(expected["model"]))


def check_resume(cfg: RunConfig, saved: Mapping[str, Any] | None, step: int,
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
      text = f"{flag_name(path)} {_show(path, old)} -> {_show(path, new)}"
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
# Settings that do not fit the model or the mesh
# ----------------------------------------------------------------------------


def check_rank(setup: train_lib.Setup, opt: train_lib.OptimizerConfig) -> None:
  """Refuses a rank larger than a projected matrix's smaller dimension.

  The transforms would clip it silently (``min(rank, rows, cols)``); a run
  asked for rank r should know when some matrices cannot have it.

  Raises:
    ValueError: Naming the smallest projected matrix and its size.
  """
  params = setup.abstract_state.params
  if isinstance(params, sj.factored.FactoredParams):
    params = params.weights
  plans = setup.plans
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


def check_batch(cfg: RunConfig, mesh) -> None:
  """Refuses a batch size that the mesh or the processes cannot split.

  Raises:
    ValueError: Naming ``--batch-size`` or ``--mesh``.
  """
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
