"""The data of a run: its tokenizer, its iterators and their positions.

Data-pipeline errors come out as :class:`~subspace_jax.data.pipeline.DataError`
with the pipeline's argument names replaced by the run's command-line flags.
"""

from __future__ import annotations

import re
from typing import Any, Sequence

import jax

from subspace_jax.data import pipeline as data_lib
from subspace_jax.data import tokenizers as tok_lib
from subspace_jax.run.config import RunConfig
from subspace_jax.run.reporting import info
from subspace_jax.naming import setting

__all__ = ["make_tokenizer", "make_iterators", "data_state", "set_data_state",
           "held_out_records"]

# Documents of the training split used to train a SentencePiece model on a
# files/TFDS source (the embedded corpus is used whole).
_SPM_SAMPLE_DOCS = 20_000

# Python argument names in the data pipeline's messages, and the settings
# they are (named when the message is made: the command line names flags).
_DATA_WORDS = ((re.compile(r"split='all'"), lambda: f"{setting('split')} all "
                f"with {setting('eval_split')} none"),
               (re.compile(r"\bbatch_size\b"), lambda: setting("batch_size")),
               (re.compile(r"\bseq_len\b"), lambda: setting("seq_len")),
               (re.compile(r"\bworkers\b"), lambda: setting("data_workers")))


def _data_error(error: data_lib.DataError) -> data_lib.DataError:
  """``error`` with the data pipeline's argument names as the run's."""
  text = str(error)
  for pattern, name in _DATA_WORDS:
    text = pattern.sub(name(), text)
  return data_lib.DataError(text)


def make_tokenizer(cfg: RunConfig) -> tok_lib.Tokenizer:
  """The run's tokenizer: ``--tokenizer-model``'s, or else a SentencePiece
  model is trained (or found in the cache) on the first documents of the
  training split."""
  if cfg.tokenizer_model is not None:
    return tok_lib.load_tokenizer(cfg.tokenizer_model)
  if cfg.tokenizer == "byte":
    return tok_lib.ByteTokenizer()
  corpus = None  # The embedded corpus's training split, get_tokenizer's default.
  try:
    source = _source(cfg, cfg.split)
    if not isinstance(source, data_lib.EmbeddedCorpus):
      docs = source.open()
      corpus = [_text(docs[i]) for i in range(min(len(docs), _SPM_SAMPLE_DOCS))]
  except data_lib.DataError as e:
    raise _data_error(e) from None
  return tok_lib.get_tokenizer("sentencepiece", vocab_size=cfg.vocab_size,
                               corpus=corpus)


def _text(doc) -> str:
  """A document's text (a fine-tuning record's prompt and response)."""
  return doc.joined if isinstance(doc, data_lib.Record) else doc


def make_iterators(cfg: RunConfig, tokenizer):
  """The training iterator, and the evaluation iterator with its starting
  state (None, None without evaluation). The training data of a streamed
  source is read in ``--data-workers`` processes; evaluation reads its few
  batches in this process (restarting workers at every evaluation would
  cost more)."""
  iter_args = dict(seq_len=cfg.seq_len, batch_size=cfg.batch_size)
  try:
    train_iter = data_lib.make_iterator(_source(cfg, cfg.split), tokenizer,
                                        seed=cfg.seed, workers=cfg.data_workers,
                                        **iter_args)
    eval_iter = eval_start = None
    if cfg.eval_every and cfg.eval_split:
      eval_iter = data_lib.make_iterator(_source(cfg, cfg.eval_split),
                                         tokenizer, shuffle=False, **iter_args)
      eval_start = eval_iter.get_state()
  except data_lib.DataError as e:
    raise _data_error(e) from None
  if train_iter.packing is not None:
    pack = train_iter.packing
    cut = (f" (texts longer than a row cut into {pack.pieces:,} pieces)"
           if pack.pieces != pack.examples else "")
    info(f"packed {pack.examples:,} examples{cut} into {pack.rows:,} rows of "
         f"{cfg.seq_len} tokens, {pack.fill:.0%} of the positions filled")
  return train_iter, eval_iter, eval_start


def held_out_records(cfg: RunConfig) -> list:
  """The fine-tuning records of the evaluation split (none for a source
  of texts, or without an evaluation split)."""
  if not cfg.eval_split:
    return []
  try:
    source = _source(cfg, cfg.eval_split)
    if not getattr(source, "examples", False):
      return []
    return list(source.open())
  except data_lib.DataError as e:
    raise _data_error(e) from None


def _source(cfg: RunConfig, split: str) -> data_lib.Source:
  return data_lib.source_from_spec(cfg.data, split=split,
                                   data_dir=cfg.data_dir, text_key=cfg.text_key)


def data_state(iterator) -> dict[str, Any]:
  """This process's data position, as the checkpoint saves it (each
  process saves its own)."""
  return iterator.get_state()


def set_data_state(iterator, states: Sequence[Any] | None,
                   step: int | None = None) -> None:
  """Moves ``iterator`` to this process's position in ``states`` (every
  process's, as restored from a checkpoint of ``step``).

  A position counts the batches taken (``"batch"``); one batch is taken per
  step, so a position past ``step`` cannot have been saved at that step.

  Raises:
    ValueError: If there is no position, positions of another number of
      processes that differ, or a position past ``step``.
    DataError: If the position does not fit the iterator's data.
  """
  if not states:
    raise ValueError("the checkpoint has no data position; use another "
                     f"{setting('checkpoint_dir')}")
  if len(states) == jax.process_count():
    state = states[jax.process_index()]
  elif all(s == states[0] for s in states):
    state = states[0]  # Same for all: any process count works.
  else:
    raise ValueError("the checkpoint's data position was saved by "
                     f"{len(states)} processes; resume with "
                     f"{setting('num_processes')} {len(states)}")
  batch = state.get("batch") if isinstance(state, dict) else None
  if (step is not None and isinstance(batch, int)
      and not isinstance(batch, bool) and batch > step):
    raise ValueError(
        f"the data position saved at step {step} is at batch {batch}, past "
        "the batches a run of that many steps takes (the checkpoint is "
        f"damaged or was edited); use another {setting('checkpoint_dir')}")
  iterator.set_state(state)
