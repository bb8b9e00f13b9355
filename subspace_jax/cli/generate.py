"""``subspace-jax generate``: chat with, or complete text from, a LLaMA
checkpoint.

From a Hugging Face directory (an --export-hf of a fine-tuning run, say) or
a GGUF file, with the checkpoint's own tokenizer; the prompt goes through
the tokenizer's chat template when it has one (as a user message), else it
is continued as plain text:

  subspace-jax generate --init-from runs/tuned/hf --prompt "What is 2 + 3?"
  subspace-jax generate --init-from model.gguf --prompt "Once upon" --no-chat

The answer is printed on stdout; the token count and speed on stderr.
Greedy by default (--temperature 0); --temperature T --top-p P --seed S
sample. Generation keeps a key/value cache and stops at the tokenizer's
end-of-turn or EOS token (subspace_jax.models.generation.generate).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import jax

from subspace_jax.cli import flags
from subspace_jax.data import chat
from subspace_jax.data import tokenizers as tok_lib
from subspace_jax.models import generation
from subspace_jax.models.io import pretrained

__all__ = ["build_parser", "main", "prompt_ids"]


def build_parser() -> argparse.ArgumentParser:
  p = flags.Parser(prog=flags.prog(), description=__doc__.splitlines()[0],
                   formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  add = p.add_argument
  add("--init-from", required=True, metavar="PATH",
      help="a Hugging Face LLaMA directory or a LLaMA .gguf file")
  add("--prompt", required=True, help="the user's message (or the text to "
      "continue, with --no-chat)")
  add("--system", default=None,
      help="a system message before it (chat templates only)")
  add("--no-chat", action="store_true",
      help="continue --prompt as plain text, without the chat template")
  add("--tokenizer-model", default=None, metavar="PATH",
      help="the tokenizer (default: the checkpoint's own)")
  add("--max-new-tokens", type=int, default=128,
      help="the most tokens to generate")
  add("--temperature", type=float, default=0.0,
      help="0: greedy; above 0: sample from softmax(logits / T)")
  add("--top-p", type=float, default=1.0,
      help="sample from the most likely tokens holding this much probability")
  add("--seed", type=int, default=0, help="seed of the sampling")
  add("--dtype", default="float32", help="compute and weight dtype")
  add("--no-scan-layers", action="store_true",
      help="keep the layers unrolled (default: scanned, faster to compile)")
  return p


def _tokenizer(args):
  path = args.tokenizer_model or args.init_from
  try:
    return tok_lib.load_tokenizer(path)
  except (ValueError, ImportError) as e:
    raise ValueError(f"--tokenizer-model: {e} (the checkpoint needs a "
                     "tokenizer; give one with --tokenizer-model)") from None


def prompt_ids(args, tokenizer) -> tuple[list[int], bool]:
  """The prompt's ids, and whether the chat template made them."""
  if not args.no_chat and getattr(tokenizer, "chat_template", None):
    messages = [{"role": "user", "content": args.prompt}]
    if args.system is not None:
      messages.insert(0, {"role": "system", "content": args.system})
    return chat.prompt_ids(tokenizer, messages), True
  ids = tokenizer.encode(args.prompt)
  bos = getattr(tokenizer, "bos_id", None)
  if bos is not None and getattr(tokenizer, "add_bos", True) and ids[:1] != [bos]:
    ids = [bos, *ids]
  return ids, False


def main(argv: list[str] | None = None) -> str:
  """Parses ``argv``, generates, prints and returns the answer."""
  args = flags.parse(build_parser(), sys.argv[1:] if argv is None else argv)
  try:
    tokenizer = _tokenizer(args)
    ids, chatted = prompt_ids(args, tokenizer)
    t0 = time.perf_counter()
    config, params = pretrained.load(args.init_from, dtype=args.dtype,
                             param_dtype=args.dtype,
                             scan_layers=not args.no_scan_layers)
    loaded = time.perf_counter() - t0
    key = jax.random.key(args.seed)
    t0 = time.perf_counter()
    out = generation.generate(config, params, ids, args.max_new_tokens,
                         temperature=args.temperature, top_p=args.top_p,
                         key=key, stop_ids=tokenizer.stop_ids)
    took = time.perf_counter() - t0
  except (ValueError, ImportError, OSError) as e:
    flags.fail(str(e))
  new = [int(t) for t in out[len(ids):]]
  text = tokenizer.decode([t for t in new if t not in tokenizer.stop_ids])
  print(text)
  print(f"{len(new)} new tokens after a prompt of {len(ids)} "
        f"({'chat template' if chatted else 'plain text'}) in {took:.1f} s "
        f"({len(new) / took:.1f} tokens/s, compiling included); model "
        f"loaded in {loaded:.1f} s from {os.path.basename(args.init_from)}",
        file=sys.stderr)
  return text
