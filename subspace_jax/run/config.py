"""The settings of a training run, and the checks of them.

:class:`RunConfig` holds every setting, checks them all when it is made
(settings that cannot work raise ``ValueError`` naming the setting to
change, :func:`subspace_jax.naming.setting`), resolves the model once
(:attr:`RunConfig.model_config`) and round-trips through a JSON dict.
:mod:`~subspace_jax.run.resume` compares a run's settings with a
checkpoint's.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from typing import Any, Mapping

import numpy as np

from subspace_jax import models
from subspace_jax.data import tokenizers as tok_lib
from subspace_jax.models.io import pretrained
from subspace_jax.naming import setting
from subspace_jax.train import optimizer as opt_lib

__all__ = ["RunConfig", "RESUME_SAFE_FIELDS", "RESUME_ALTERING_FIELDS",
           "TOKENIZERS", "check_name"]

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

DEFAULT_MODEL = "tiny"


def _dtype_name(value: Any) -> str:
  return np.dtype(value).name if not isinstance(value, str) else value


def _integer(field: str, value: Any, least: int) -> None:
  if not isinstance(value, int) or isinstance(value, bool) or value < least:
    raise ValueError(f"{setting(field)} must be an integer >= {least}, got "
                     f"{value}")


def check_name(name: str) -> None:
  """Refuses a run name that is not a plain name (a run's outputs go to a
  folder of that name, which must stay inside its parent)."""
  if (not name or name in (".", "..") or "/" in name or "\0" in name
      or "\\" in name or any(not c.isprintable() for c in name)):
    raise ValueError(f"the run name {name!r} is not a plain name; use "
                     "letters, digits and '.', '_' or '-', without '/'")


@dataclasses.dataclass(frozen=True)
class RunConfig:
  """Every setting of a pretraining run.

  Attributes:
    model: A key of :data:`subspace_jax.models.CONFIGS` (None: ``tiny``,
      or with ``init_from`` the checkpoint's model; not both).
    scan_layers: Stack the blocks and run them with ``nnx.scan``.
    remat: What the backward pass keeps of each block: a policy of
      :data:`subspace_jax.models.llama.REMAT_POLICIES` (True: "full").
    dtype: Compute dtype name (``"float32"`` or ``"bfloat16"``).
    param_dtype: Storage dtype name of the weights (the master weights).
    model_overrides: Other :class:`~subspace_jax.models.llama.LlamaConfig`
      fields to change (JSON values), e.g. ``{"num_layers": 4}``.
    optimizer: The optimizer; its ``total_steps`` is the schedule length.
      An unset rank becomes the model's hidden size / 4.
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
      file to start from (:func:`subspace_jax.models.io.pretrained.load`): its
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
  command line's schedule length defaults to its steps, so raising the
  steps alone there would stretch the schedule mid-run (the learning rate
  would jump) and is refused; giving the saved run's schedule length
  extends the run on its own schedule. The model and the kind of optimizer
  (:meth:`model_key`) are checked by the checkpointer, which refuses a
  change even with ``allow_changes``, as it refuses any change of the
  state's shapes (``rank``, ``side``).
  """

  model: str | None = None
  scan_layers: bool = False
  remat: bool | str = "none"
  dtype: str = "float32"
  param_dtype: str = "float32"
  model_overrides: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  optimizer: opt_lib.OptimizerConfig = dataclasses.field(
      default_factory=opt_lib.OptimizerConfig)
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
    if self.model is not None and self.init_from is not None:
      raise ValueError(f"{setting('model')} and {setting('init_from')} "
                       "exclude each other: the checkpoint is the model")
    if self.model is None and self.init_from is None:
      object.__setattr__(self, "model", DEFAULT_MODEL)
    for field in ("batch_size", "seq_len", "eval_batches", "log_every", "keep",
                  "checkpoint_every", "max_bad_steps"):
      _integer(field, getattr(self, field), 1)
    for field in ("steps", "eval_every", "seed", "data_workers"):
      _integer(field, getattr(self, field), 0)
    for field in ("dtype", "param_dtype"):
      opt_lib._float_dtype(field, getattr(self, field))  # pylint: disable=protected-access
    if self.steps == 0 and not (self.eval_every and self.eval_split):
      raise ValueError(
          f"{setting('steps')} 0 evaluates the model and needs an "
          f"evaluation; set {setting('eval_split')} and "
          f"{setting('eval_every')}")
    if not isinstance(self.answers, int) or self.answers < -1:
      raise ValueError(f"{setting('answers')} must be an integer >= -1 (-1: "
                       f"all, 0: none), got {self.answers}")
    self._check_mesh()
    _check_tokenizer(self.tokenizer, self.tokenizer_model)
    own = sorted(set(self.model_overrides) & set(_OWN_FIELDS))
    if own:
      raise ValueError(f"model_overrides may not set {own}: vocab_size comes "
                       "from the tokenizer and the others are RunConfig fields")
    self._check_data()
    # The model once (an unknown model, a bad override or checkpoint fails
    # here), then the optimizer's defaults that need it.
    object.__setattr__(self, "optimizer",
                       self.optimizer.with_model(self.model_config))
    self._check_svd_steps()

  def _check_mesh(self) -> None:
    sizes = self.mesh
    if len(sizes) != 3:
      raise ValueError(f"{setting('mesh')} needs three sizes DATA,FSDP,TENSOR, "
                       f"got {sizes}")
    if sizes.count(-1) > 1 or any(s == 0 or s < -1 for s in sizes):
      raise ValueError(f"{setting('mesh')} sizes must be >= 1, or -1 for one "
                       "of them (the rest of the devices), got "
                       f"{','.join(map(str, sizes))}")

  def _check_data(self) -> None:
    if (self.tokenizer == "sentencepiece" and self.tokenizer_model is None
        and self.vocab_size < _SPM_MIN_VOCAB):
      raise ValueError(f"{setting('vocab_size')} must be >= {_SPM_MIN_VOCAB} "
                       "for the SentencePiece tokenizer, got "
                       f"{self.vocab_size}")
    evaluates = bool(self.eval_every and self.eval_split)
    if self.data.partition(":")[0] != "tfds":
      splits = [("split", self.split)]
      if evaluates:
        splits.append(("eval_split", self.eval_split))
      for field, split in splits:
        if split not in _LOCAL_SPLITS:
          raise ValueError(f"{setting(field)} must be train, validation or "
                           f"all for {setting('data')} {self.data}, got "
                           f"{split!r}")
    if evaluates and self.split == "all":
      raise ValueError(
          f"{setting('split')} all trains on every document, so "
          f"{setting('eval_split')} {self.eval_split} would evaluate on "
          f"training documents; set {setting('eval_split')} none (no "
          f"evaluation), or train on {setting('split')} train")
    if evaluates and self.eval_split == self.split:
      raise ValueError(
          f"{setting('split')} and {setting('eval_split')} are both "
          f"{self.split!r}, so the evaluation would measure training "
          f"documents; use another {setting('eval_split')}, or none")

  def _check_svd_steps(self) -> None:
    opt = self.optimizer
    length = max(opt.total_steps, self.steps)
    if opt.svd_steps > length:
      raise ValueError(
          f"{setting('optimizer.svd_steps')} {opt.svd_steps} is more than the "
          f"{length} steps of the run, which would never use a random "
          f"projection; use at most {length}, or "
          f"{setting('optimizer.name')} galore for SVD projections throughout")

  # -- the model ------------------------------------------------------------

  @property
  def model_name(self) -> str:
    """The named config trained (``init_from``'s checkpoint aside)."""
    return self.model or DEFAULT_MODEL

  @property
  def tokenizer_vocab_size(self) -> int:
    """The vocabulary size the tokenizer will have (the model's too)."""
    if self.tokenizer == "byte":
      return tok_lib.ByteTokenizer.vocab_size
    if self.tokenizer_model is not None:
      return _loaded_vocab_size(self.tokenizer_model)
    return self.vocab_size

  @functools.cached_property
  def model_config(self) -> Any:
    """The model, resolved once: the named config with this run's changes,
    or with ``init_from`` the checkpoint's config.

    The vocabulary is the tokenizer's, and ``max_seq_len`` is raised to
    ``seq_len`` when shorter (it only bounds the input; RoPE has no table).
    """
    own = dict(scan_layers=self.scan_layers, remat=self.remat,
               dtype=self.dtype, param_dtype=self.param_dtype)
    if self.init_from is not None:
      try:
        base = pretrained.read_config(self.init_from)
        return pretrained.read_config(
            self.init_from, max_seq_len=max(base.max_seq_len, self.seq_len),
            **own, **self.model_overrides)
      except ValueError as e:
        raise ValueError(f"{setting('init_from')}: {e}") from None
    base = models.get_config(self.model_name)
    try:
      return models.get_config(
          self.model_name, vocab_size=self.tokenizer_vocab_size,
          max_seq_len=max(base.max_seq_len, self.seq_len), **own,
          **self.model_overrides)
    except TypeError as e:
      raise ValueError(f"bad model override ({e}); use LlamaConfig "
                       "fields") from None

  def model_key(self) -> dict[str, Any]:
    """What a checkpoint must match to be resumed: the model's parameters
    and the optimizer whose state it holds. Compute-only settings (dtype,
    remat, max_seq_len) are left out, so they may change between a run and
    its resumption."""
    cfg = self.model_config
    key = {"name": self.model_name, "tokenizer": self.tokenizer,
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
    if run.get("model") is not None and run.get("init_from") is not None:
      run["model"] = None  # Saved before a checkpoint's run named no model.
    unknown = sorted(set(run) - names)
    if unknown:
      raise ValueError(f"unknown RunConfig field(s) {unknown}")
    run["optimizer"] = opt_lib.OptimizerConfig(**run.get("optimizer", {}))
    run["mesh"] = tuple(run.get("mesh", (-1, 1, 1)))
    return cls(**run)



def _check_tokenizer(kind: str, model: str | None) -> None:
  """Refuses a tokenizer kind that is unknown or not the kind of
  ``--tokenizer-model``."""
  if kind not in TOKENIZERS:
    raise ValueError(f"{setting('tokenizer')}: unknown tokenizer {kind!r}; "
                     f"choose {', '.join(TOKENIZERS)}")
  if model is None:
    if kind == "huggingface":
      raise ValueError(f"{setting('tokenizer')} huggingface needs "
                       f"{setting('tokenizer_model')} (a tokenizer.json or a "
                       "directory holding one)")
    return
  try:
    found, _ = tok_lib.tokenizer_file(model)
  except ValueError as e:
    raise ValueError(f"{setting('tokenizer_model')}: {e}") from None
  if found != kind:
    raise ValueError(f"{setting('tokenizer_model')} {model} is a {found} "
                     f"tokenizer, not {setting('tokenizer')} {kind}; use "
                     f"{setting('tokenizer')} {found} (or leave it out)")


@functools.lru_cache(maxsize=4)
def _loaded_vocab_size(path: str) -> int:
  try:
    return tok_lib.load_tokenizer(path).vocab_size
  except (ValueError, ImportError) as e:
    raise type(e)(f"{setting('tokenizer_model')}: {e}") from None
