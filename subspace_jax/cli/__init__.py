"""The ``subspace-jax`` command line.

  subspace-jax pretrain [FLAGS]   train a LLaMA from scratch (the tiny model
                                  on the embedded corpus by default)
  subspace-jax finetune [FLAGS]   fine-tune a pretrained LLaMA (a Hugging
                                  Face directory or a GGUF file)
  subspace-jax plan --target T [FLAGS]
                                  compile a run's train step for a target
                                  and print its memory (pretrain's flags)
  subspace-jax generate --init-from PATH --prompt TEXT
                                  chat with, or complete text from, a model
  subspace-jax convert FILE.gguf DIR
                                  write a GGUF file as a Hugging Face
                                  directory

``subspace-jax COMMAND --help`` lists a command's flags. Errors are one line
on stderr, ``subspace-jax COMMAND: error: ...``, with exit code 2 for bad
input and 1 for a failure while training; a run stopped by a signal exits
with 128 + its number after saving its checkpoint.
"""

from __future__ import annotations

import os
import sys

from subspace_jax.cli import flags

__all__ = ["COMMANDS", "main"]

COMMANDS = ("pretrain", "finetune", "plan", "generate", "convert")


def _plan(argv: list[str]) -> None:
  from subspace_jax.cli import pretrain  # pylint: disable=import-outside-toplevel
  parser = pretrain.build_parser(
      description="compile a run's train step for a target and print its "
                  "per-device memory and collectives (nothing is trained)")
  parser.add_argument("--target", required=True,
                      help="cpu, gpu or tpu:TOPOLOGY (as --compile-for)")
  args = flags.parse(parser, argv)
  args.compile_for = args.target
  with flags.names():
    raise SystemExit(pretrain._compile_for(args, pretrain.run_config))  # pylint: disable=protected-access


def _convert(argv: list[str]) -> None:
  from subspace_jax.models.io import gguf  # pylint: disable=import-outside-toplevel
  parser = flags.Parser(
      prog=flags.prog(),
      description="write a LLaMA GGUF file as a Hugging Face directory "
                  "(dequantized weights, config, tokenizer, chat template)")
  parser.add_argument("gguf", help="the .gguf file")
  parser.add_argument("out", help="the directory to create (new or empty)")
  parser.add_argument("--dtype", default="float32",
                      help="dtype of the saved weights (default: float32)")
  args = flags.parse(parser, argv)
  try:
    out = gguf.to_hf(args.gguf, args.out, dtype=args.dtype)
  except (ValueError, ImportError, OSError) as e:
    flags.fail(str(e))
  print(out)


def main(argv: list[str] | None = None) -> None:
  """``subspace-jax COMMAND ...`` (the console script)."""
  argv = sys.argv[1:] if argv is None else list(argv)
  if not argv or argv[0] in ("-h", "--help"):
    print(__doc__.strip().replace("``", ""))
    raise SystemExit(0 if argv else 2)
  command, rest = argv[0], argv[1:]
  if command not in COMMANDS:
    with flags.named("subspace-jax"):
      flags.fail(f"unknown command {command!r}; choose one of "
                 f"{', '.join(COMMANDS)}")
  script = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else ""
  name = (f"subspace-jax {command}" if script in ("subspace-jax", "__main__.py", "")
          else script)
  with flags.named(name):
    stdout_for_the_summary_only()
    if command in ("pretrain", "finetune"):
      from subspace_jax.cli import finetune, pretrain  # pylint: disable=import-outside-toplevel
      (pretrain if command == "pretrain" else finetune).main(rest)
    elif command == "plan":
      _plan(rest)
    elif command == "generate":
      from subspace_jax.cli import generate  # pylint: disable=import-outside-toplevel
      generate.main(rest)
    else:
      _convert(rest)


def stdout_for_the_summary_only() -> None:
  """Sends what native libraries print on file descriptor 1 (Gloo's
  connection lines in multi-process runs) to stderr, and keeps Python's
  ``sys.stdout`` on the real standard output."""
  sys.stdout.flush()
  real = os.dup(1)
  os.dup2(2, 1)
  sys.stdout = os.fdopen(real, "w", buffering=1)
