"""Speed of the input pipeline (subspace_jax/data/pipeline.py).

Two tables, written to ``benchmarks/results/input_pipeline.md``:

* ``pipeline``: tokens/s of the streamed pipeline alone (read, tokenize,
  pack into ``seq_len + 1`` windows, batch: the code a ``tfds:`` source
  runs), with 0, 1 and 2 grain worker processes, for the byte tokenizer and
  a 32,000-piece SentencePiece tokenizer. The documents are the embedded
  corpus held in memory (so reading costs nothing and the figure is the
  tokenizing and packing). Timed over ``--batches`` batches after the
  first (which starts the workers).
* ``train``: the wall time of ``--steps`` train steps fed by that pipeline
  (SentencePiece, one worker) over the same steps fed one pre-made batch,
  for the ``tiny`` and ``llama_60m`` models on one CPU device. The two are
  run alternately ``--reps`` times after a warm-up; the ratio is of their
  medians. Each batch goes to the device the same way in both.

The SentencePiece model: ``--spm-model PATH``, else the 32,000-piece
LLaMA-style model that the ``mistral-common`` wheel ships
(``mistral_common/data/tokenizer.model.v1``) when that package is
installed (``pip install mistral-common``, or unzip the file from
``pip download --no-deps mistral-common``). The embedded corpus is too
small to train a 32k model (SentencePiece stops at about 5,700 pieces).

Example:
  python -m benchmarks.input_pipeline --spm-model /tmp/tokenizer.model.v1
"""

from __future__ import annotations

import argparse
import importlib.util
import pathlib
import statistics
import time

import jax

from benchmarks import common
from subspace_jax.models import llama
from subspace_jax.data import pipeline as data
from subspace_jax import sharding as shd
from subspace_jax.train import step as train_lib
from subspace_jax.data.tokenizers import ByteTokenizer, SentencePieceTokenizer


class StreamedCorpus:
  """The embedded corpus as a streamed source (tokenized as it is read)."""

  streaming = True
  name = "embedded (streamed)"

  def open(self):
    return data.EmbeddedCorpus(split="all").documents()


def spm_path(given: str | None) -> pathlib.Path:
  if given:
    return pathlib.Path(given)
  spec = importlib.util.find_spec("mistral_common")
  if spec is None or not spec.submodule_search_locations:
    raise SystemExit("no 32k SentencePiece model: give --spm-model PATH or "
                     "pip install mistral-common")
  return pathlib.Path(spec.submodule_search_locations[0]) / "data" / "tokenizer.model.v1"


def iterator(tokenizer, args, workers: int, batch_size: int, seq_len: int):
  return data.make_iterator(StreamedCorpus(), tokenizer, seq_len=seq_len,
                            batch_size=batch_size, seed=0, workers=workers,
                            process_index=0, process_count=1)


def pipeline_rate(tokenizer, args, workers: int) -> float:
  """Tokens/s of the pipeline alone (inputs tokens per second)."""
  with iterator(tokenizer, args, workers, args.batch_size, args.seq_len) as it:
    next(it)  # Starts the workers.
    t0 = time.perf_counter()
    for _ in range(args.batches):
      next(it)
    elapsed = time.perf_counter() - t0
  return args.batches * args.batch_size * args.seq_len / elapsed


def train_ratio(model: str, tokenizer, args) -> tuple[float, float, float]:
  """Median seconds of ``args.steps`` steps fed by the pipeline, by a
  pre-made batch, and their ratio."""
  longest = max(llama.get_config(model).max_seq_len, args.train_seq)
  cfg = llama.get_config(model, vocab_size=tokenizer.vocab_size, max_seq_len=longest)
  mesh = shd.make_mesh(devices=jax.devices()[:1])
  opt = train_lib.OptimizerConfig(name="golore", rank=16, update_gap=200,
                                  warmup_steps=10, total_steps=10**6)
  setup = train_lib.setup(cfg, opt, mesh)
  state = setup.init(0)
  shape = (args.train_batch, args.train_seq)

  def put(batch):
    return {k: jax.make_array_from_process_local_data(setup.batch_sharding, v, shape)
            for k, v in batch.items() if k in ("inputs", "targets")}

  def run(next_batch) -> float:
    nonlocal state
    t0 = time.perf_counter()
    for _ in range(args.steps):
      state, metrics = setup.train_step(state, put(next_batch()))
    jax.block_until_ready((state, metrics))
    return time.perf_counter() - t0

  with iterator(tokenizer, args, 1, args.train_batch, args.train_seq) as it:
    premade = next(it)
    for _ in range(3):  # Compiles; the worker fills its buffer.
      state, _ = setup.train_step(state, put(next(it)))
    jax.block_until_ready(state)
    fed, fixed = [], []
    for _ in range(args.reps):
      fed.append(run(lambda: next(it)))
      fixed.append(run(lambda: premade))
  a, b = statistics.median(fed), statistics.median(fixed)
  return a, b, a / b


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--spm-model", default=None, help="a 32k SentencePiece .model")
  p.add_argument("--batch-size", type=int, default=64,
                 help="batch of the pipeline table")
  p.add_argument("--seq-len", type=int, default=256)
  p.add_argument("--batches", type=int, default=40)
  p.add_argument("--workers", default="0,1,2")
  p.add_argument("--models", default="tiny,llama_60m")
  p.add_argument("--train-batch", type=int, default=8)
  p.add_argument("--train-seq", type=int, default=256)
  p.add_argument("--steps", type=int, default=20)
  p.add_argument("--reps", type=int, default=5)
  common.add_output_flags(p, "input_pipeline.md")
  args = p.parse_args(argv)
  code = common.commit()  # before the run: later edits do not count

  spm = SentencePieceTokenizer(spm_path(args.spm_model))
  tokenizers = {"byte": ByteTokenizer(), f"SentencePiece {spm.vocab_size}": spm}
  workers = [int(w) for w in args.workers.split(",")]
  lines = ["# Input pipeline speed", "",
           common.provenance(common.command_line("benchmarks.input_pipeline",
                                                 argv), commit_id=code)]
  if args.note:
    lines += [args.note, ""]
  lines += [f"Streamed pipeline alone: "
           f"tokens/s of batches {args.batch_size} x {args.seq_len}, "
           f"{args.batches} batches after the first.", ""]
  lines += ["| tokenizer | " + " | ".join(f"{w} workers" for w in workers) + " |",
            "|---|" + "---:|" * len(workers)]
  for name, tok in tokenizers.items():
    rates = []
    for w in workers:
      rates.append(pipeline_rate(tok, args, w))
      print(f"{name}, {w} workers: {rates[-1]:,.0f} tokens/s", flush=True)
    lines.append(f"| {name} | " + " | ".join(f"{r:,.0f}" for r in rates) + " |")
  lines += ["", f"Train steps fed by the pipeline (SentencePiece {spm.vocab_size}, "
            f"1 worker) over the same steps fed one pre-made batch: {args.steps} "
            f"steps of batch {args.train_batch} x {args.train_seq}, GoLore rank "
            f"16, median of {args.reps} alternated runs (target <= 1.03).", "",
            "| model | pipeline (s) | pre-made batch (s) | ratio |",
            "|---|---:|---:|---:|"]
  for model in args.models.split(","):
    a, b, ratio = train_ratio(model, spm, args)
    print(f"{model}: {a:.3f} s vs {b:.3f} s: {ratio:.3f}x", flush=True)
    lines.append(f"| {model} | {a:.3f} | {b:.3f} | {ratio:.3f} |")
  common.write(args.out, "\n".join(lines) + "\n")


if __name__ == "__main__":
  main()
