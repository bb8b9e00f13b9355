"""``subspace-jax finetune``: fine-tune a pretrained LLaMA with AdamW, GaLore,
GoLore or RSO.

From a Hugging Face checkpoint or a GGUF file (its tokenizer too) on a
JSON Lines file:

  subspace-jax finetune --init-from path/to/llama \\
      --data jsonl:train.jsonl --seq-len 2048 --export-hf runs/tuned

Each line of the file is one example: {"prompt": ..., "response": ...} (the
model reads the prompt and learns the response: the loss is on the response
tokens and EOS only), {"messages": [{"role": "user", "content": ...},
{"role": "assistant", "content": ...}]} (a conversation in the tokenizer's
chat template, learned on the assistant turns) or {"text": ...} (continued
pretraining: the loss is on all of it). A pair is BOS + tokens + EOS with
the tokenizer's own ids (no BOS if its tokenizer_config.json says
add_bos_token false), and examples are packed whole into rows of --seq-len,
side by side, each attending only to itself. A bad line stops the run
before it starts, with one line naming the file and line (exit code 2).
Greedy answers to 32 held-out prompts are scored (exact match) and three
printed before and after training (--answers); --eval-only reports the
loaded model's held-out loss and answers.

With no arguments this needs no download: it fine-tunes a tiny random
LLaMA, written on the fly as a Hugging Face checkpoint (and cached), on an
instruction set made from the corpus shipped with the package, in well
under a minute on a laptop CPU.

Everything else is ``subspace-jax pretrain``'s: outputs in runs/NAME/
(checkpoints, metrics.jsonl), resuming by running the same command again,
evaluation on the last 5% of the examples (--eval-split), every optimizer
and --subspace-mode, --export-hf, --compile-for and several processes.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile

from subspace_jax.cli import pretrain
from subspace_jax import cache
from subspace_jax.data.tokenizers import ByteTokenizer
from subspace_jax.models import llama
from subspace_jax.models.io import hf
from subspace_jax.run.config import RunConfig
from subspace_jax.run.reporting import info
from subspace_jax.train import optimizer as opt_lib

__all__ = ["DEMO_CONFIG", "build_parser", "demo_checkpoint", "main",
           "run_config"]

# The offline default model: the tiny LLaMA with grouped-query attention
# and the byte tokenizer's vocabulary, random weights of seed 0.
DEMO_CONFIG = llama.get_config("tiny", vocab_size=ByteTokenizer.vocab_size,
                               num_kv_heads=2, max_seq_len=256)
DEMO_NAME = "tiny-random-llama-v1"

# The defaults that differ from pretrain's: those of the offline demo (a
# 7B run gives its own, see the README).
DEFAULTS = {"data": "instructions", "steps": 200, "seq_len": 256,
            "batch_size": 8, "update_gap": 50, "eval_every": 100,
            "eval_batches": 4, "checkpoint_every": 100, "answers": 32}

HELPS = {
    "init_from": "the Hugging Face LLaMA checkpoint (config.json and "
                 "model.safetensors, or an index of several) or LLaMA GGUF "
                 "file to fine-tune; its tokenizer is the tokenizer unless "
                 "--tokenizer-model gives another (default: a tiny random "
                 "LLaMA written on the fly and cached, with the byte "
                 "tokenizer: a demo that needs no download, trained at the "
                 "pretraining learning rates)",
}


def build_parser() -> argparse.ArgumentParser:
  """pretrain's command line with the fine-tuning defaults."""
  return pretrain.build_parser(description=__doc__.splitlines()[0],
                               defaults=DEFAULTS, helps=HELPS)


def demo_checkpoint(cache_dir: str | None = None) -> str:
  """The directory of the offline demo model (:data:`DEMO_CONFIG`, random
  weights of seed 0) as a Hugging Face checkpoint, written the first time
  into the cache (one process: it is a single-process demo)."""
  path = cache.cache_path(cache_dir, "finetune", DEMO_NAME)
  if not (path / "config.json").is_file():
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=path.parent, prefix=f".{DEMO_NAME}-")
    tok = ByteTokenizer()
    hf.save(tmp, DEMO_CONFIG, llama.ModelDef(DEMO_CONFIG).init(0),
            extra_config={"bos_token_id": tok.bos_id,
                          "eos_token_id": tok.eos_id,
                          "pad_token_id": tok.pad_id})
    try:
      os.rename(tmp, path)  # In one step; another run may have been first.
    except OSError:
      shutil.rmtree(tmp, ignore_errors=True)
    info(f"wrote the demo model (random weights) to {path}")
  return str(path)


def run_config(args: argparse.Namespace) -> RunConfig:
  """The run's config: pretrain's, with the demo model when neither
  --init-from nor --model is given (a random model: its learning rate is
  pretraining's)."""
  if args.init_from is None and args.model is None:
    if args.tokenizer_model is not None:
      raise ValueError("--tokenizer-model needs --init-from (or --model): "
                       "the demo model is made for the byte tokenizer")
    args.init_from = demo_checkpoint()
    if args.lr is None:
      args.lr = opt_lib.OptimizerConfig(
          name=args.optimizer, scale=args.scale).learning_rate
  return pretrain.run_config(args)


def main(argv: list[str] | None = None) -> dict:
  """Parses ``argv``, fine-tunes, and returns the run's summary (exit codes
  as :func:`subspace_jax.cli.pretrain.main`)."""
  return pretrain.main(argv, parser=build_parser(), configure=run_config)
