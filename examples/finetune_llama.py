"""Fine-tune a pretrained LLaMA with AdamW, GaLore, GoLore or RSO.

From a Hugging Face checkpoint or a GGUF file (its tokenizer too) on a
JSON Lines file:

  python examples/finetune_llama.py --init-from path/to/llama \\
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
under a minute on a laptop CPU:

  python examples/finetune_llama.py

Everything else is examples/pretrain_llama.py's: outputs in runs/NAME/
(checkpoints, metrics.jsonl), resuming by running the same command again,
evaluation on the last 5% of the examples (--eval-split), every optimizer
and --subspace-mode, --export-hf, --compile-for and several processes.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile

import pretrain_llama  # Its sibling: the same command line, other defaults.

from subspace_jax.models import llama
from subspace_jax.models.io import hf
from subspace_jax.data import cache
from subspace_jax.run.reporting import info
from subspace_jax.data.tokenizers import ByteTokenizer

# The offline default model: the tiny LLaMA with grouped-query attention
# and the byte tokenizer's vocabulary, random weights of seed 0.
DEMO_CONFIG = llama.get_config("tiny", vocab_size=ByteTokenizer.vocab_size,
                               num_kv_heads=2, max_seq_len=256)
DEMO_NAME = "tiny-random-llama-v1"

# Learning rates: for a pretrained checkpoint (a usual full fine-tuning
# rate for LLaMA-2 7B), and for the random demo model (pretraining's).
PRETRAINED_LR = 2e-5
DEMO_LR = 0.01

# The defaults that differ from pretrain_llama.py's: those of the offline
# demo (a 7B run gives its own, see the README).
DEFAULTS = {"data": "instructions", "lr": None, "steps": 200,
            "seq_len": 256, "batch_size": 8, "update_gap": 50,
            "eval_every": 100, "eval_batches": 4, "checkpoint_every": 100,
            "answers": 32}

HELPS = {
    "init_from": "the Hugging Face LLaMA checkpoint to fine-tune (config.json "
                 "and model.safetensors, or an index of several); its "
                 "tokenizer.model or tokenizer.json is the tokenizer unless "
                 "--tokenizer-model gives another (default: a tiny random "
                 "LLaMA written on the fly and cached, with the byte "
                 "tokenizer: a demo that needs no download)",
    "lr": f"peak learning rate (default: from a checkpoint of --init-from "
          f"{PRETRAINED_LR:g} for adamw and {PRETRAINED_LR:g} / --scale for "
          "the subspace methods, whose updates --scale multiplies (8e-05 at "
          f"the default scale); {DEMO_LR:g} for the random demo model or a "
          "--model)",
}


def pretrained_lr(optimizer: str, scale: float) -> float:
  """The default peak learning rate from a pretrained checkpoint: AdamW's
  :data:`PRETRAINED_LR`, and for the subspace methods (whose updates
  ``--scale`` multiplies) the same step size, ``PRETRAINED_LR / scale``."""
  return PRETRAINED_LR if optimizer == "adamw" else PRETRAINED_LR / scale


def build_parser() -> argparse.ArgumentParser:
  """pretrain_llama.py's command line with the fine-tuning defaults."""
  return pretrain_llama.build_parser(description=__doc__.splitlines()[0],
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


def run_config(args: argparse.Namespace):
  """The run's config: pretrain_llama.py's, with the demo model when
  neither --init-from nor --model is given, and the learning rate's
  default resolved."""
  pretrained = args.init_from is not None
  if not pretrained and args.model is None:
    if args.tokenizer_model is not None:
      raise ValueError("--tokenizer-model needs --init-from (or --model): "
                       "the demo model is made for the byte tokenizer")
    args.init_from = demo_checkpoint()
  if args.lr is None:
    args.lr = (pretrained_lr(args.optimizer, args.scale) if pretrained
               else DEMO_LR)
  return pretrain_llama.run_config(args)


def main(argv: list[str] | None = None) -> dict:
  """Parses ``argv``, fine-tunes, and returns the run's summary (exit codes
  as :func:`pretrain_llama.main`)."""
  return pretrain_llama.main(argv, parser=build_parser(), configure=run_config)


if __name__ == "__main__":
  pretrain_llama.stdout_for_the_summary_only()
  main()
