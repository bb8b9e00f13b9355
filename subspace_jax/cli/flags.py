"""Every flag of the ``subspace-jax`` command line, and the setting it sets.

The flags are declared here once, in groups (:func:`add_model_flags`,
:func:`add_optimizer_flags`, :func:`add_data_flags`, :func:`add_run_flags`,
:func:`add_plan_flags`, :func:`add_process_flags`); :data:`FLAGS` maps each
setting (a :class:`~subspace_jax.run.config.RunConfig` field, or
``optimizer.FIELD``) to its flag, so that the library's messages name the
flag while the command line runs (:func:`names`). A flag's default of None
leaves the setting's own default (the library's, resolved once, where the
setting is defined). Bad values are the configs' to refuse; the parser only
turns text into types.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import sys
from typing import Any, Iterator, Mapping

from subspace_jax import models
from subspace_jax import naming
from subspace_jax.models import llama
from subspace_jax.train import optimizer as opt_lib

__all__ = [
    "FLAGS",
    "HelpFormatter",
    "Parser",
    "add_data_flags",
    "add_model_flags",
    "add_optimizer_flags",
    "add_plan_flags",
    "add_process_flags",
    "add_run_flags",
    "fail",
    "flag_of",
    "names",
    "optimizer_config",
    "parse",
    "prog",
]

# Setting -> flag, where the flag is not "--" + the field with dashes.
FLAGS: dict[str, str] = {
    "metrics_path": "--metrics", "tensorboard_dir": "--tensorboard",
    "optimizer.name": "--optimizer", "optimizer.learning_rate": "--lr",
    "optimizer.warmup_steps": "--warmup",
    "optimizer.total_steps": "--schedule-steps",
    "optimizer.clip_norm": "--clip", "optimizer.seed": "--proj-seed",
    "compile_for": "--compile-for",
}
# On/off settings whose flag turns them off.
_OFF_FLAGS = {"resume": "--no-resume", "progress": "--no-progress"}
# Settings no flag sets: a message names them as the library does.
_NO_FLAG = ("optimizer.b1", "optimizer.b2", "optimizer.eps", "model_overrides")


def flag_of(field: str, value: Any = None) -> str:
  """The command line's name of setting ``field`` (``"batch_size"`` ->
  ``"--batch-size"``); ``value`` picks the flag that sets it so, for the
  on/off settings whose flag turns them off."""
  if field in _OFF_FLAGS:
    return _OFF_FLAGS[field] if value in (None, False) else f"{field} (on by default)"
  if field in FLAGS:
    return FLAGS[field]
  if field in _NO_FLAG:
    return field
  return "--" + field.rpartition(".")[2].replace("_", "-")


@contextlib.contextmanager
def names() -> Iterator[None]:
  """Within the block, the library's messages name settings by their
  flags."""
  with naming.use_names(flag_of):
    yield


# ----------------------------------------------------------------------------
# The parser
# ----------------------------------------------------------------------------

_PROG = [None]


def prog() -> str:
  """The command's name in messages: the script run, or
  ``subspace-jax COMMAND``."""
  if _PROG[0]:
    return _PROG[0]
  return os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else "subspace-jax"


@contextlib.contextmanager
def named(name: str) -> Iterator[None]:
  """Within the block, :func:`prog` is ``name``."""
  previous, _PROG[0] = _PROG[0], name
  try:
    yield
  finally:
    _PROG[0] = previous


def fail(message: str, code: int = 2):
  """Prints ``PROG: error: MESSAGE`` (its first line) on stderr and exits
  with ``code`` (2: bad input)."""
  lines = [line for line in str(message).strip().splitlines() if line.strip()]
  print(f"{prog()}: error: {lines[0] if lines else message}", file=sys.stderr)
  raise SystemExit(code)


class Parser(argparse.ArgumentParser):
  """Reports a bad argument in one line, without the usage text."""

  def error(self, message):
    fail(message)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
  """Shows each default once, and none for on/off flags or flags whose help
  says its default."""

  def _get_help_string(self, action):
    if "default" in (action.help or "") or action.nargs == 0:
      return action.help
    return super()._get_help_string(action)


_MESH = re.compile(r"-?\d+(,-?\d+)*")


def _mesh(text: str) -> tuple[int, ...]:
  try:
    sizes = tuple(int(s) for s in text.split(","))
  except ValueError:
    sizes = ()
  if len(sizes) != 3:
    raise argparse.ArgumentTypeError(
        f"{text!r} is not DATA,FSDP,TENSOR (three integers, e.g. -1,1,1)")
  return sizes


def _optional(text: str) -> str | None:
  return None if text.lower() in ("", "none") else text


def _is_negative_value(text: str) -> bool:
  """Whether ``text`` is a negative number or mesh ("-1e-3", "-inf", "-1,1,1")."""
  if not text.startswith("-") or text.startswith("--"):
    return False
  try:
    float(text)
  except ValueError:
    return _MESH.fullmatch(text) is not None
  return True


def _attach_negative_values(argv: list[str]) -> list[str]:
  """``--mesh -1,1,1`` as ``--mesh=-1,1,1``, ``--lr -1e-3`` as
  ``--lr=-1e-3``: argparse would take a value that starts with '-' for an
  option (and then refuse the flag for a missing value)."""
  out, i = [], 0
  while i < len(argv):
    arg = argv[i]
    if (arg.startswith("--") and "=" not in arg and i + 1 < len(argv)
        and _is_negative_value(argv[i + 1])):
      out.append(f"{arg}={argv[i + 1]}")
      i += 2
    else:
      out.append(arg)
      i += 1
  return out


def parse(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
  """``parser.parse_args(argv)``, with negative values attached to their
  flags."""
  return parser.parse_args(_attach_negative_values(list(argv)))


def customize(parser: argparse.ArgumentParser,
              defaults: Mapping[str, Any] | None = None,
              helps: Mapping[str, str] | None = None) -> None:
  """Changes defaults and help lines by argparse dest (for a command built
  on another: fine-tuning's defaults on pretraining's flags)."""
  parser.set_defaults(**(defaults or {}))
  for action in parser._actions:  # pylint: disable=protected-access
    action.help = (helps or {}).get(action.dest, action.help)


# ----------------------------------------------------------------------------
# The flags
# ----------------------------------------------------------------------------


def add_model_flags(group: Any) -> None:
  """``--model --init-from --scan-layers --no-scan-layers --remat --dtype
  --param-dtype --export-hf``."""
  add = group.add_argument
  add("--model", default=None,
      help="model size: " + ", ".join(models.CONFIGS)
      + " (default: tiny; not with --init-from)")
  add("--init-from", default=None, metavar="PATH",
      help="start from a Hugging Face LLaMA checkpoint (config.json and "
           "model.safetensors, or an index of several) or a LLaMA GGUF file "
           "(FILE.gguf, dequantized; needs pip install "
           "\"subspace_jax[gguf]\"): its config is the model and its weights "
           "the start (default: random weights); its tokenizer.model or "
           "tokenizer.json (a GGUF file's own tokenizer) is the tokenizer "
           "unless --tokenizer-model gives another. It loads with "
           "--scan-layers unless --no-scan-layers")
  add("--scan-layers", action="store_true",
      help="stack the layers and run them with a scan (faster compiles; "
           "the default with --init-from)")
  add("--no-scan-layers", action="store_true",
      help="with --init-from: keep the layers unrolled")
  add("--remat", nargs="?", const="full", default="none",
      choices=list(llama.REMAT_POLICIES), metavar="POLICY",
      help="what the backward pass keeps of each block: none (everything, "
           "the default), full (only its input: the least memory; the flag "
           "alone), dots (the projections' outputs), names (the attention "
           "output and the MLP's hidden product)")
  add("--dtype", default="float32", help="compute dtype: bfloat16 or float32")
  add("--param-dtype", default="float32",
      help="dtype of the stored (master) weights: float32 or bfloat16")
  add("--export-hf", default=None, metavar="DIR",
      help="when the run ends, write the trained model there as a Hugging "
           "Face LLaMA checkpoint that transformers loads (model mode: the "
           "merged W + P·B), with the tokenizer's files and chat template "
           "(default: none)")


def _defaults_text() -> str:
  return "; ".join(
      f"{name} {d['learning_rate']:g}" for name, d in opt_lib.DEFAULTS.items())


def add_optimizer_flags(group: Any) -> None:
  """The optimizer's flags (``--optimizer --lr --warmup ...``)."""
  add = group.add_argument
  add("--optimizer", default="golore",
      help="optimizer: " + ", ".join(opt_lib.OPTIMIZERS))
  add("--lr", type=float, default=None,
      help="peak learning rate (default: the optimizer's, "
           f"{_defaults_text()}; from an --init-from checkpoint "
           f"{opt_lib.FINETUNE_LEARNING_RATE:g}, over --scale for the "
           "subspace methods)")
  add("--warmup", type=int, default=None,
      help=f"linear warm-up steps (default: {opt_lib.WARMUP}, or a tenth of "
           "a schedule that is not longer)")
  add("--schedule-steps", type=int, default=None,
      help="length of the warm-up + cosine schedule (default: --steps); keep "
           "it fixed to extend a run in several parts")
  add("--min-lr-ratio", type=float, default=0.1,
      help="final learning rate as a fraction of the peak")
  add("--weight-decay", type=float, default=0.0,
      help="decoupled weight decay of the matrices")
  add("--clip", type=float, default=1.0,
      help="clip the global gradient norm to this (0: no clipping)")
  add("--grad-accum", type=int, default=1,
      help="average the gradients of this many micro-batches (of "
           "--batch-size / N sequences, one after another) into each update")
  add("--rank", type=int, default=None,
      help="rank of the projected gradients (default: hidden size / 4, as in "
           "the GaLore paper)")
  add("--update-gap", type=int, default=200,
      help="steps between projection changes")
  add("--scale", type=float, default=None,
      help="factor on the low-rank updates (GaLore's alpha; default: the "
           "optimizer's, " + "; ".join(
               f"{n} {d['scale']:g}" for n, d in opt_lib.DEFAULTS.items()
               if "scale" in d) + ")")
  add("--proj-seed", type=int, default=0, help="seed of the random projections")
  add("--svd-steps", type=int, default=0,
      help="GoLore: use SVD projections for the first this many steps")
  add("--eta", type=float, default=None,
      help="RSO: proximal coefficient of each subproblem (default: none)")
  add("--side", default=None,
      help="projected side of each matrix: lean (the larger: the smaller "
           "state), std (the smaller: a random projection keeps more of the "
           "gradient), left or right (default: the method's, std for golore "
           "and rso, lean for galore; in model mode left keeps B on the "
           "input side of every layer, which keeps every activation saving)")
  add("--subspace-mode", default="transform",
      help="transform: an optax transform of full gradients (any optimizer); "
           "model: golore/rso layers compute x·W + (x·P)·B and only B is "
           "differentiated (no full weight gradients, smaller activations)")
  add("--svd", default="exact", help="GaLore's SVD: exact or randomized")
  add("--moment-dtype", default=None,
      help="dtype of the low-rank moments (default: the gradients')")


def add_data_flags(group: Any) -> None:
  """``--data --split --tokenizer --batch-size --seq-len ...``."""
  add = group.add_argument
  add("--data", default="embedded",
      help="embedded (the corpus shipped with the package), files:GLOB (local "
           "UTF-8 text files, one document per file), paragraphs:GLOB (the "
           "same files, one document per blank-line separated block), "
           "tfds:NAME (a TFDS text dataset prepared as array_record, e.g. "
           "tfds:c4/en; needs tensorflow-datasets), jsonl:PATH (fine-tuning "
           "examples, one JSON object per line: {\"prompt\": ..., "
           "\"response\": ...}, learning the response, {\"messages\": [...]}, "
           "a conversation in the tokenizer's chat template, learning the "
           "assistant turns, or {\"text\": ...}, learning all of it; each "
           "example is packed whole beside others that it cannot attend to) "
           "or instructions (an instruction set made from the embedded "
           "corpus, in that form)")
  add("--data-dir", default=None, help="TFDS data directory")
  add("--text-key", default="text", help="TFDS text feature")
  add("--split", default="train",
      help="training split: train, validation (the last 5%% of the "
           "documents or examples) or all for every source but TFDS, any "
           "TFDS split there; all needs --eval-split none")
  add("--eval-split", type=_optional, default="validation",
      help="held-out split to evaluate on ('none': no evaluation); it may "
           "not overlap --split")
  add("--tokenizer", default=None,
      help="byte, sentencepiece (--tokenizer-model's, else one trained on the "
           "training data and cached) or huggingface (--tokenizer-model's "
           "tokenizer.json); default: the kind of --tokenizer-model, else "
           "byte")
  add("--tokenizer-model", default=None, metavar="PATH",
      help="an existing tokenizer: a SentencePiece .model, a Hugging Face "
           "tokenizer.json or a directory holding one, with BOS/EOS/pad from "
           "a tokenizer_config.json beside it (default: --init-from's, if it "
           "has one)")
  add("--vocab-size", type=int, default=8000,
      help="vocabulary size of a SentencePiece model trained here (the "
           "model's vocabulary is the tokenizer's)")
  add("--batch-size", type=int, default=16,
      help="global batch size, in sequences, over all devices and processes "
           "(of each update: with --grad-accum N, N micro-batches of a Nth)")
  add("--seq-len", type=int, default=64, help="tokens per sequence")
  add("--data-workers", type=int, default=0,
      help="worker processes that read, tokenize and pack a tfds: source "
           "(0: a thread of the training process); embedded and files data "
           "are tokenized once and cached. A checkpoint's data position "
           "fits only the same number")


def add_run_flags(group: Any) -> None:
  """``--name --steps --eval-every --checkpoint-dir --mesh --seed ...``."""
  add = group.add_argument
  add("--name", default=None,
      help="run name: outputs go to runs/NAME (default: "
           "MODEL_OPTIMIZER[_model]); a new name starts a new run")
  add("--steps", type=int, default=600,
      help="train until this many steps (updates) are done, resumed steps "
           "included; 0 evaluates the model as loaded (as --eval-only)")
  add("--eval-only", action="store_true",
      help="train nothing: report the held-out loss (and with --answers the "
           "exact-match accuracy) of the model as loaded")
  add("--answers", type=int, default=0, metavar="N",
      help="greedy answers to the first N held-out prompts (prompt/response "
           "pairs or conversations) before and after training: exact-match "
           "accuracy, three of them printed (-1: all; 0: none)")
  add("--eval-every", type=int, default=100,
      help="evaluate every this many steps and at the end (0: never)")
  add("--eval-batches", type=int, default=8, help="batches per evaluation")
  add("--log-every", type=int, default=10,
      help="fetch and log the metrics every this many steps")
  add("--mesh", type=_mesh, default="-1,1,1",
      help="device mesh DATA,FSDP,TENSOR; one size may be -1 (the rest)")
  add("--seed", type=int, default=0, help="seed of the weights and data order")
  add("--checkpoint-dir", default=None,
      help="checkpoint directory (default: runs/NAME/ckpt; 'none': no "
           "checkpoints)")
  add("--checkpoint-every", type=int, default=200,
      help="save a checkpoint every this many steps (and at the end)")
  add("--keep", type=int, default=3, help="number of checkpoints kept")
  add("--no-resume", action="store_true",
      help="do not resume; refuse to start if the checkpoint directory "
           "already holds checkpoints")
  add("--allow-changes", action="store_true",
      help="resume even if settings that alter the run (learning rate, "
           "schedule, seeds, data, batch...) differ from the checkpoint's; "
           "without it they are refused (more --steps, and the logging, "
           "evaluation, checkpoint, mesh and output settings may always "
           "change)")
  add("--metrics", default=None,
      help="JSONL file the metrics are appended to (default: "
           "runs/NAME/metrics.jsonl; 'none': no file); '{process}' in it "
           "gives every process its own file")
  add("--tensorboard", default=None,
      help="TensorBoard directory (default: runs/NAME/tb), written only if "
           "tensorboardX or torch is installed")
  add("--no-progress", action="store_true",
      help="no progress bar (evaluation and stop lines are still printed; "
           "where stderr is not a terminal the progress is a plain line "
           "every --log-every steps)")
  add("--max-bad-steps", type=int, default=10,
      help="stop (exit 1) after this many consecutive steps with a "
           "non-finite loss or gradient; each is skipped, leaving the state "
           "unchanged")


def add_plan_flags(group: Any) -> None:
  """``--compile-for --memory-json --memory-limit``."""
  add = group.add_argument
  add("--compile-for", default=None, metavar="TARGET",
      help="compile this run's train step for TARGET and print its "
           "per-device memory (weights, optimizer state, temporaries, peak) "
           "and collective bytes, then exit: 0 if it fits, 3 if not. "
           "TARGET: cpu (this host), gpu (the attached GPU) or "
           "tpu:TOPOLOGY, e.g. tpu:v5p:2x2x1 (4 chips) or tpu:v5p:2x2x2 "
           "(8), compiled without a TPU (needs libtpu: pip install "
           "\"jax[tpu]\" at the installed jax version); --mesh splits the "
           "target's devices (default: none, the run trains)")
  add("--memory-json", default=None, metavar="PATH",
      help="with --compile-for: also write the report as JSON to PATH "
           "(default: no file)")
  add("--memory-limit", type=float, default=None, metavar="GiB",
      help="with --compile-for: the memory of one device to plan against, "
           "in GiB (default: the device's own; none known for cpu)")


def add_process_flags(group: Any) -> None:
  """``--coordinator --num-processes --process-id``."""
  add = group.add_argument
  add("--coordinator", default=None,
      help="HOST:PORT of process 0 (else $JAX_COORDINATOR_ADDRESS)")
  add("--num-processes", type=int, default=None, help="number of processes")
  add("--process-id", type=int, default=None, help="index of this process")


# Optimizer flag (argparse dest) -> OptimizerConfig field, taken as is.
_OPTIMIZER_FIELDS = {
    "optimizer": "name", "lr": "learning_rate", "warmup": "warmup_steps",
    "min_lr_ratio": "min_lr_ratio", "weight_decay": "weight_decay",
    "rank": "rank", "update_gap": "update_gap", "scale": "scale",
    "proj_seed": "seed", "svd_steps": "svd_steps", "eta": "eta",
    "side": "side", "svd": "svd", "moment_dtype": "moment_dtype",
    "subspace_mode": "subspace_mode", "grad_accum": "grad_accum",
}


def optimizer_config(args: argparse.Namespace, total_steps: int,
                     **fields: Any) -> opt_lib.OptimizerConfig:
  """The :class:`~subspace_jax.train.optimizer.OptimizerConfig` of parsed
  flags (declared by :func:`add_optimizer_flags`); flags left at None take
  the config's defaults.

  Args:
    args: The parsed flags.
    total_steps: The schedule's length (``--schedule-steps``, else the run's
      steps).
    **fields: OptimizerConfig fields that replace the flags' values.

  Raises:
    ValueError: On a value the config refuses, naming its flag.
  """
  kwargs = {field: getattr(args, dest)
            for dest, field in _OPTIMIZER_FIELDS.items() if hasattr(args, dest)}
  kwargs.update(total_steps=total_steps, clip_norm=args.clip or None)
  kwargs.update(fields)
  return opt_lib.OptimizerConfig(**kwargs)
