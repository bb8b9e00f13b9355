"""``subspace-jax pretrain``: train a LLaMA with AdamW, GaLore, GoLore or RSO.

With no flags this trains the tiny model on the corpus shipped with the
package (byte tokenizer, no download) and finishes in well under a minute
on a laptop CPU. Outputs go to runs/NAME/ (NAME defaults to
MODEL_OPTIMIZER, with _model in model mode): checkpoints in ckpt/, metrics
in metrics.jsonl. Running the same command again resumes from the newest
checkpoint; a setting that would alter the run (the learning rate, the
seeds, the data...) must then be the saved one, unless --allow-changes is
given, and a second run in the same directory is refused while the first
one runs. The same command runs on GPUs and TPUs, on one or many processes
(--coordinator, --num-processes, --process-id, or the environment that
jax.distributed.initialize reads); --compile-for TARGET plans its memory
instead of training.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from typing import Any, Callable, Mapping

from subspace_jax import atomic
from subspace_jax.cli import flags
from subspace_jax.data import tokenizers as tok_lib
from subspace_jax.models.io import gguf
from subspace_jax.plan import compile_for as compile_lib
from subspace_jax.plan import memory
from subspace_jax.run import loop
from subspace_jax.run.config import RunConfig, check_name
from subspace_jax.train import optimizer as opt_lib
from subspace_jax.train.checkpoint import UnreadableCheckpointError

__all__ = ["build_parser", "main", "run_config"]


def build_parser(*, description: str | None = None,
                 defaults: Mapping[str, Any] | None = None,
                 helps: Mapping[str, str] | None = None
                 ) -> argparse.ArgumentParser:
  """The command line; every option has a help line.

  Args:
    description: The first line of ``--help`` (default: this module's).
    defaults: Defaults to change, by argparse dest (``{"steps": 200}``), for
      a command built on this one (``subspace-jax finetune``).
    helps: Help lines to replace, by dest.
  """
  p = flags.Parser(prog=flags.prog(),
                   description=description or __doc__.splitlines()[0],
                   formatter_class=flags.HelpFormatter)
  flags.add_model_flags(p.add_argument_group("model"))
  flags.add_optimizer_flags(p.add_argument_group("optimizer"))
  flags.add_data_flags(p.add_argument_group("data"))
  flags.add_run_flags(p.add_argument_group("run"))
  flags.add_plan_flags(p.add_argument_group(
      "planning memory (compile the step for a target; nothing is trained)"))
  flags.add_process_flags(p.add_argument_group(
      "multi-process (default: from the environment)"))
  flags.customize(p, defaults, helps)
  return p


def run_config(args: argparse.Namespace) -> RunConfig:
  """The :class:`RunConfig` of parsed flags.

  Raises:
    ValueError: On a value the configs refuse (naming its flag, inside
      :func:`flags.names`).
  """
  if args.eval_only:
    args.steps = 0
  if args.no_scan_layers and args.scan_layers:
    raise ValueError("--scan-layers and --no-scan-layers exclude each other")
  tokenizer, tokenizer_model = _tokenizer(args)
  pretrained = args.init_from is not None
  base = (os.path.basename(os.path.normpath(args.init_from)) if pretrained
          else args.model or "tiny")
  name = args.name or "_".join(
      [base, args.optimizer] + (["model"] if args.subspace_mode == "model"
                                else []))
  try:
    check_name(name)
  except ValueError as e:
    raise ValueError(f"--name: {e}" if args.name else str(e)) from None
  run_dir = os.path.join("runs", name)

  def output(value: str | None, leaf: str) -> str | None:
    return os.path.join(run_dir, leaf) if value is None else flags._optional(value)  # pylint: disable=protected-access

  # Evaluating only (--steps 0) steps no schedule: any that fits --warmup
  # (a negative --steps is refused by RunConfig, naming it).
  schedule = args.schedule_steps or (
      args.steps if args.steps > 0 else max(args.warmup or 0, 1))
  lr = args.lr
  if lr is None and pretrained:
    lr = opt_lib.finetune_learning_rate(args.optimizer, args.scale)
  optimizer = flags.optimizer_config(args, schedule, learning_rate=lr)
  scan = args.scan_layers or (pretrained and not args.no_scan_layers)
  cfg = RunConfig(
      model=args.model, init_from=args.init_from, export_hf=args.export_hf,
      answers=args.answers, tokenizer_model=tokenizer_model,
      scan_layers=scan, remat=args.remat, dtype=args.dtype,
      param_dtype=args.param_dtype, optimizer=optimizer, data=args.data,
      split=args.split, eval_split=args.eval_split, data_dir=args.data_dir,
      text_key=args.text_key, tokenizer=tokenizer,
      vocab_size=args.vocab_size, batch_size=args.batch_size,
      seq_len=args.seq_len, data_workers=args.data_workers,
      steps=args.steps, eval_every=args.eval_every,
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
  if (args.warmup is None and args.steps
      and cfg.optimizer.warmup_steps != opt_lib.WARMUP):
    print(f"--warmup: {cfg.optimizer.warmup_steps} steps, a tenth of the "
          f"{schedule}-step schedule (the default {opt_lib.WARMUP} would warm "
          "up the whole run; give --warmup to choose)", file=sys.stderr,
          flush=True)
  return cfg


def _tokenizer(args: argparse.Namespace) -> tuple[str, str | None]:
  """``(--tokenizer, --tokenizer-model)`` with their defaults resolved: the
  kind of the tokenizer file, which --init-from's directory (or GGUF file)
  may give."""
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
         configure: Callable[[argparse.Namespace], RunConfig] = run_config
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
  argv = sys.argv[1:] if argv is None else argv
  args = flags.parse(parser or build_parser(), argv)
  with flags.names():
    if args.compile_for is not None:
      raise SystemExit(_compile_for(args, configure))
    try:
      summary = loop.train(configure(args))
    except (ValueError, ImportError, OSError, UnreadableCheckpointError) as e:
      flags.fail(str(e) or type(e).__name__)
    except (loop.NonFiniteError, loop.OutOfMemoryError, loop.ExportError,
            loop.CheckpointSaveError) as e:
      flags.fail(str(e), code=1)
  if summary["interrupted"]:
    raise SystemExit(_exit_code(summary["interrupted"]))
  return summary


def _compile_for(args: argparse.Namespace, configure) -> int:
  """--compile-for: prints (and with --memory-json writes) the report of the
  step compiled for the target; returns the exit code (0 fits, 3 not)."""
  if args.memory_limit is not None and not args.memory_limit > 0:
    flags.fail(f"--memory-limit {args.memory_limit} must be positive (GiB)")
  capacity = (None if args.memory_limit is None
              else int(args.memory_limit * memory.GiB))
  try:
    cfg = configure(args)
  except (ValueError, OSError) as e:
    flags.fail(str(e))
  try:
    devices = memory.target_devices(args.compile_for)
  except ValueError as e:
    flags.fail(f"--compile-for: {e}")
  try:
    report = compile_lib.compile_for(cfg, args.compile_for, devices=devices,
                                     capacity=capacity)
  except ValueError as e:
    flags.fail(str(e))
  for line in report.lines():
    print(line)
  if args.memory_json:
    atomic.write_text(args.memory_json,
                      json.dumps(report.to_dict(), indent=1) + "\n")
  return 3 if report.fits is False else 0
