"""Pretrain a LLaMA with AdamW, GaLore, GoLore or RSO.

With no arguments this trains the tiny model on the corpus shipped with the
package (byte tokenizer, no download) and finishes in well under a minute
on a laptop CPU:

  python examples/pretrain_llama.py

Outputs go to runs/NAME/ (NAME defaults to MODEL_OPTIMIZER): checkpoints in
ckpt/, metrics in metrics.jsonl. Running the same command again resumes from
the newest checkpoint; a setting that would alter the run (the learning
rate, the seeds, the data...) must then be the saved one, unless
--allow-changes is given, and a second run in the same directory is refused
while the first one runs. The same script runs on GPUs and TPUs, on one or many
processes (--coordinator, --num-processes, --process-id, or the environment
that jax.distributed.initialize reads).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import sys
import tempfile
from typing import Any, Callable, Mapping

from subspace_jax import models
from subspace_jax.plan import memory
from subspace_jax.models.io import gguf
from subspace_jax.models.io import hf
from subspace_jax.cli import flags as cli
from subspace_jax.run import loop
from subspace_jax.plan import compile_for as plan
from subspace_jax.data import tokenizers as tok_lib
from subspace_jax.train.checkpoint import UnreadableCheckpointError


class _Parser(argparse.ArgumentParser):
  """Reports a bad argument in one line, without the usage text."""

  def error(self, message):
    _fail(message)


def _fail(message: str, code: int = 2):
  lines = [line for line in str(message).strip().splitlines() if line.strip()]
  prog = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else "pretrain_llama.py"
  print(f"{prog}: error: {lines[0] if lines else message}", file=sys.stderr)
  raise SystemExit(code)


def _mesh(text: str) -> tuple[int, int, int]:
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


_MESH = re.compile(r"-?\d+(,-?\d+)*")


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


def build_parser(*, description: str | None = None,
                 defaults: Mapping[str, Any] | None = None,
                 helps: Mapping[str, str] | None = None
                 ) -> argparse.ArgumentParser:
  """The command line; every option has a help line.

  Args:
    description: The first line of ``--help`` (default: this script's).
    defaults: Defaults to change, by argparse dest (``{"lr": 2e-5}``), for
      a command built on this one (``examples/finetune_llama.py``).
    helps: Help lines to replace, by dest.
  """
  p = _Parser(description=description or __doc__.splitlines()[0],
              formatter_class=cli.HelpFormatter)
  add = p.add_argument

  g = p.add_argument_group("model")
  cli.add_model_flags(g)
  # None: tiny, unless --init-from gives the model.
  p.set_defaults(model=None)
  model_flag = next(a for a in g._group_actions if a.dest == "model")  # pylint: disable=protected-access
  model_flag.help += " (default: tiny; not with --init-from)"
  g.add_argument(
      "--init-from", default=None, metavar="DIR",
      help="start from a Hugging Face LLaMA checkpoint (config.json and "
           "model.safetensors, or an index of several) or a LLaMA GGUF file "
           "(FILE.gguf, dequantized; needs pip install "
           "\"subspace_jax[gguf]\"): its config is the model and its weights "
           "the start (default: random weights); its tokenizer.model or "
           "tokenizer.json (a GGUF file's own tokenizer) is the tokenizer "
           "unless --tokenizer-model gives another. It loads with "
           "--scan-layers unless --no-scan-layers")
  g.add_argument(
      "--no-scan-layers", action="store_true",
      help="with --init-from: keep the layers unrolled (the checkpoint is "
           "loaded scanned by default: faster compiles, less memory)")
  g.add_argument(
      "--export-hf", default=None, metavar="DIR",
      help="when the run ends, write the trained model there as a Hugging "
           "Face LLaMA checkpoint that transformers loads (model mode: the "
           "merged W + P·B), with the tokenizer's files (default: none)")
  cli.add_optimizer_flags(p.add_argument_group("optimizer"))

  g = p.add_argument_group("data")
  add = g.add_argument
  add("--data", default="embedded",
      help="embedded (the corpus shipped with the package), files:GLOB (local "
           "UTF-8 text files, one document per file), paragraphs:GLOB (the "
           "same files, one document per blank-line separated block), "
           "tfds:NAME (a TFDS text dataset prepared as array_record, e.g. "
           "tfds:c4/en; needs tensorflow-datasets), jsonl:PATH (fine-tuning "
           "examples, one JSON object per line: {\"prompt\": ..., "
           "\"response\": ...}, learning the response, {\"messages\": "
           "[{\"role\": ..., \"content\": ...}, ...]}, a conversation in "
           "the tokenizer's chat template learning the assistant turns, or "
           "{\"text\": ...}, learning all of it; each example is packed "
           "whole beside others that it cannot attend to) or instructions "
           "(an instruction set made from the embedded corpus, in that form)")
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
      help="global batch size, in sequences, over all devices and processes")
  add("--seq-len", type=int, default=64, help="tokens per sequence")
  add("--data-workers", type=int, default=0,
      help="worker processes that read, tokenize and pack a tfds: source "
           "(0: a thread of the training process); embedded and files data "
           "are tokenized once and cached. A checkpoint's data position "
           "fits only the same number")

  g = p.add_argument_group("run")
  add = g.add_argument
  add("--name", default=None,
      help="run name: outputs go to runs/NAME (default: MODEL_OPTIMIZER); a "
           "new name starts a new run")
  add("--steps", type=int, default=600,
      help="train until this many steps are done (resumed steps included); "
           "0 evaluates the model as loaded (as --eval-only)")
  add("--eval-only", action="store_true",
      help="train nothing: report the held-out loss (and with --answers the "
           "exact-match accuracy) of the model as loaded (--steps 0)")
  add("--answers", type=int, default=0, metavar="N",
      help="greedy answers to the first N held-out prompts (prompt/response "
           "pairs or conversations) before and after training: their "
           "exact-match accuracy is reported beside the held-out loss and "
           "three are printed (-1: every one; 0: none)")
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
      help="no progress bar (evaluation and stop lines are still printed)")
  add("--max-bad-steps", type=int, default=10,
      help="stop (exit 1) after this many consecutive steps with a "
           "non-finite loss or gradient; each is skipped, leaving the state "
           "unchanged")

  g = p.add_argument_group(
      "planning memory (compile the step for a target; nothing is trained)")
  add = g.add_argument
  add("--compile-for", default=None, metavar="TARGET",
      help="compile this run's train step for TARGET and print its "
           "per-device memory (weights, optimizer state, temporaries, peak) "
           "and collective bytes, then exit: 0 if it fits, 3 if not. "
           "TARGET: cpu (this host), gpu (the attached GPU) or "
           "tpu:TOPOLOGY, e.g. tpu:v5p:2x2x1 (4 chips) or tpu:v5p:2x2x2 "
           "(8), compiled without a TPU (needs pip install "
           "\"subspace_jax[aot]\"); --mesh splits the target's devices "
           "(default: none, the run trains)")
  add("--memory-json", default=None, metavar="PATH",
      help="with --compile-for: also write the report as JSON to PATH "
           "(default: no file)")
  add("--memory-limit", type=float, default=None, metavar="GiB",
      help="with --compile-for: the memory of one device to plan against, "
           "in GiB (default: the device's own; none known for cpu)")

  g = p.add_argument_group("multi-process (default: from the environment)")
  add = g.add_argument
  add("--coordinator", default=None,
      help="HOST:PORT of process 0 (else $JAX_COORDINATOR_ADDRESS)")
  add("--num-processes", type=int, default=None, help="number of processes")
  add("--process-id", type=int, default=None, help="index of this process")
  p.set_defaults(**(defaults or {}))
  for action in p._actions:  # pylint: disable=protected-access
    action.help = (helps or {}).get(action.dest, action.help)
  return p


def parse_args(argv: list[str] | None = None,
               parser: argparse.ArgumentParser | None = None) -> argparse.Namespace:
  """Parses ``argv`` (default: the command line) with ``parser`` (default:
  :func:`build_parser`'s)."""
  argv = sys.argv[1:] if argv is None else argv
  return (parser or build_parser()).parse_args(_attach_negative_values(argv))


def run_config(args: argparse.Namespace) -> loop.RunConfig:
  """The :class:`RunConfig` of parsed arguments.

  Raises:
    ValueError: On an unknown model or optimizer, or another bad value.
  """
  if args.eval_only:
    args.steps = 0
  _check_flags(args)
  model = args.model or "tiny"
  tokenizer, tokenizer_model = _tokenizer(args)
  if args.rank is None:  # Hidden size / 4, as in the GaLore paper.
    hidden = (_hf_config(args.init_from).hidden_size if args.init_from
              else models.get_config(model).hidden_size)
    args.rank = max(1, hidden // 4)
  base = (os.path.basename(os.path.normpath(args.init_from))
          if args.init_from is not None else model)
  name = args.name or f"{base}_{args.optimizer}"
  _check_name(name, "--name" if args.name else "the run name")
  run_dir = os.path.join("runs", name)

  def output(value: str | None, leaf: str) -> str | None:
    return os.path.join(run_dir, leaf) if value is None else _optional(value)

  # Evaluating only (--steps 0) steps no schedule: any that fits --warmup.
  schedule = args.schedule_steps or args.steps or max(args.warmup or 0, 1)
  optimizer = cli.optimizer_config(args, schedule)
  scan = args.scan_layers or (args.init_from is not None
                              and not args.no_scan_layers)
  cfg = loop.RunConfig(
      model=model, init_from=args.init_from, export_hf=args.export_hf,
      answers=args.answers,
      tokenizer_model=tokenizer_model, scan_layers=scan, remat=args.remat,
      dtype=args.dtype, param_dtype=args.param_dtype, optimizer=optimizer,
      data=args.data, split=args.split, eval_split=args.eval_split,
      data_dir=args.data_dir, text_key=args.text_key, tokenizer=tokenizer,
      vocab_size=args.vocab_size, batch_size=args.batch_size,
      seq_len=args.seq_len, data_workers=args.data_workers, steps=args.steps, eval_every=args.eval_every,
      eval_batches=args.eval_batches, log_every=args.log_every,
      mesh=args.mesh, seed=args.seed,
      checkpoint_dir=output(args.checkpoint_dir, "ckpt"),
      checkpoint_every=args.checkpoint_every, keep=args.keep,
      resume=not args.no_resume,
      metrics_path=output(args.metrics, "metrics.jsonl"),
      tensorboard_dir=output(args.tensorboard, "tb"),
      progress=not args.no_progress, max_bad_steps=args.max_bad_steps,
      allow_changes=args.allow_changes, coordinator=args.coordinator,
      num_processes=args.num_processes, process_id=args.process_id)
  note = cli.warmup_note(args, schedule) if args.steps else None
  if note:
    print(note, file=sys.stderr, flush=True)
  return cfg


def _check_name(name: str, what: str) -> None:
  """Refuses a run name that is not a plain name: outputs go to
  runs/NAME, which must stay inside runs/."""
  if (not name or name in (".", "..") or "/" in name or "\0" in name
      or (os.sep != "/" and os.sep in name)
      or (os.altsep and os.altsep in name)
      or any(not c.isprintable() for c in name)):
    raise ValueError(f"{what} {name!r} is not a plain name (outputs go to "
                     "runs/NAME); use letters, digits and '.', '_' or '-', "
                     "without '/'")


def _check_flags(args: argparse.Namespace) -> None:
  """Refuses, naming the flags, what the library's configs would refuse in
  their own (Python) terms before RunConfig can check it.

  Raises:
    ValueError: On the first bad value.
  """
  if args.no_scan_layers and args.scan_layers:
    raise ValueError("--scan-layers and --no-scan-layers exclude each other")
  if args.init_from is not None and args.model is not None:
    raise ValueError("--model and --init-from exclude each other: the "
                     "checkpoint's config.json is the model")
  if args.model is not None and args.model not in models.CONFIGS:
    raise ValueError(f"--model: unknown model config {args.model!r}; known "
                     f"configs: {', '.join(models.CONFIGS)}")
  cli.check_optimizer_flags(args)


def _hf_config(path: str):
  try:
    return hf.read_config(path)
  except ValueError as e:
    raise ValueError(f"--init-from: {e}") from None


def _tokenizer(args: argparse.Namespace) -> tuple[str, str | None]:
  """``(--tokenizer, --tokenizer-model)`` with their defaults resolved: the
  kind of the tokenizer file, which --init-from's directory may give."""
  path = args.tokenizer_model
  if path is None and args.init_from is not None:
    if gguf.is_gguf(args.init_from):
      try:
        if gguf.has_tokenizer(args.init_from):
          path = args.init_from
      except (ValueError, ImportError) as e:
        raise type(e)(f"--init-from: {e}") from None
    elif any(os.path.isfile(os.path.join(args.init_from, name))
             for name, _ in tok_lib.TOKENIZER_FILES):
      path = args.init_from
  if path is None:
    return args.tokenizer or "byte", None
  try:
    kind, _ = tok_lib.tokenizer_file(path)
  except ValueError as e:
    raise ValueError(f"--tokenizer-model: {e}") from None
  return args.tokenizer or kind, path


def _exit_code(interrupted: str | None) -> int:
  """128 + the signal's number, as a shell reports a signalled program
  (a stop asked by another process counts as SIGTERM)."""
  try:
    return 128 + signal.Signals[interrupted]
  except KeyError:
    return 128 + signal.SIGTERM


def main(argv: list[str] | None = None, *,
         parser: argparse.ArgumentParser | None = None,
         configure: Callable[[argparse.Namespace], loop.RunConfig] = run_config
         ) -> dict:
  """Parses ``argv``, trains, and returns the run's summary.

  Args:
    argv: The arguments (default: the command line's).
    parser: The parser (default: :func:`build_parser`'s).
    configure: Makes the run's config of the parsed arguments (default:
      :func:`run_config`).

  Raises:
    SystemExit: 2 after a one-line error message on bad input; 1 after one
      when training stopped on non-finite steps, ran out of device memory
      or could not save a checkpoint or the export; 130 (SIGINT) or 143
      (SIGTERM) after a signal stopped the run, once its checkpoint is
      saved, so that ``train && next`` does not go on.
  """
  args = parse_args(argv, parser)
  if args.compile_for is not None:
    raise SystemExit(_compile_for(args, configure))
  try:
    summary = loop.train(configure(args))
  except (ValueError, ImportError, OSError, UnreadableCheckpointError) as e:
    _fail(str(e) or type(e).__name__)
  except (loop.NonFiniteError, loop.OutOfMemoryError, loop.ExportError,
          loop.CheckpointSaveError) as e:
    _fail(str(e), code=1)
  if summary["interrupted"]:
    raise SystemExit(_exit_code(summary["interrupted"]))
  return summary


def _compile_for(args: argparse.Namespace, configure) -> int:
  """--compile-for: prints (and with --memory-json writes) the report of the
  step compiled for the target; returns the exit code (0 fits, 3 not)."""
  if args.memory_limit is not None and not args.memory_limit > 0:
    _fail(f"--memory-limit {args.memory_limit} must be positive (GiB)")
  capacity = (None if args.memory_limit is None
              else int(args.memory_limit * memory.GiB))
  try:
    cfg = configure(args)
  except (ValueError, OSError) as e:
    _fail(str(e))
  try:
    devices = memory.target_devices(args.compile_for)
  except ValueError as e:
    _fail(f"--compile-for: {e}")
  try:
    report = plan.compile_for(cfg, args.compile_for, devices=devices,
                              capacity=capacity)
  except ValueError as e:
    _fail(str(e))
  for line in report.lines():
    print(line)
  if args.memory_json:
    _write_atomic(args.memory_json,
                  json.dumps(report.to_dict(), indent=1) + "\n")
  return 3 if report.fits is False else 0


def _write_atomic(path: str, text: str) -> None:
  """Writes ``text`` to a temporary file beside ``path``, then renames it."""
  folder = os.path.dirname(path) or "."
  fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.",
                             suffix=".tmp")
  try:
    with os.fdopen(fd, "w", encoding="utf-8") as f:
      f.write(text)
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.unlink(tmp)
    raise


def stdout_for_the_summary_only() -> None:
  """Sends what native libraries print on file descriptor 1 (Gloo's
  connection lines in multi-process runs) to stderr, and keeps Python's
  ``sys.stdout`` on the real standard output."""
  sys.stdout.flush()
  real = os.dup(1)
  os.dup2(2, 1)
  sys.stdout = os.fdopen(real, "w", buffering=1)


if __name__ == "__main__":
  stdout_for_the_summary_only()
  main()
