"""Held-out answers: what a fine-tuned model writes, and how often it is
exactly right.

The held-out split of prompt/response data (or of conversations, whose
last assistant message is the answer) is a set of questions with known
answers. :func:`questions` makes them (the prompt as the training data
reads it: BOS as the encoder adds it, a conversation through the chat
template with its generation prompt); :func:`answer` has the model write
its greedy answers (:func:`subspace_jax.models.generation.generate`,
batched, stopping at the tokenizer's stop ids); :func:`exact_match`
compares an answer with the reference (surrounding whitespace ignored).

Usage::

    qs = questions(records, tokenizer, limit=64)
    got = answer(config, params, tokenizer, qs)
    accuracy = sum(exact_match(a, q.reference) for a, q in zip(got, qs)) / len(qs)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

from subspace_jax.data import chat
from subspace_jax.data.sources import Record

__all__ = ["Question", "questions", "answer", "exact_match", "Scored",
           "score"]

# Tokens an answer may run past its reference's length before it is cut.
_SLACK = 8
_BATCH = 16


class Question(NamedTuple):
  """A held-out prompt and its reference answer.

  Attributes:
    where: The record it comes from (``"train.jsonl:12"``).
    prompt: The prompt as text (a conversation's last user message).
    ids: The prompt's token ids, as the model reads them.
    reference: The answer the data gives.
    budget: The most tokens an answer gets (the reference's and a few).
  """

  where: str
  prompt: str
  ids: list[int]
  reference: str
  budget: int


def _with_bos(tokenizer: Any, ids: list[int]) -> list[int]:
  bos = getattr(tokenizer, "bos_id", None)
  if bos is None or not getattr(tokenizer, "add_bos", True) or ids[:1] == [bos]:
    return ids
  return [bos, *ids]


def questions(records: Sequence[Record], tokenizer: Any,
              limit: int | None = None) -> list[Question]:
  """The questions of ``records`` (texts have none), in order, at most
  ``limit`` (None: all).

  Raises:
    ChatError: If a conversation needs a chat template the tokenizer lacks.
  """
  out = []
  for r in records:
    if limit is not None and len(out) >= limit:
      break
    if r.messages is not None:
      turns = r.conversation
      last = max(k for k, m in enumerate(turns) if m["role"] == "assistant")
      ids = chat.prompt_ids(tokenizer, turns[:last])
      reference = turns[last]["content"]
      users = [m["content"] for m in turns[:last] if m["role"] == "user"]
      prompt = users[-1] if users else ""
    elif r.prompt is not None:
      ids = _with_bos(tokenizer, tokenizer.encode(r.prompt))
      reference, prompt = r.response, r.prompt
    else:
      continue
    budget = len(tokenizer.encode(reference)) + _SLACK
    out.append(Question(r.where, prompt, ids, reference, budget))
  return out


def answer(config: Any, params: Any, tokenizer: Any,
           qs: Sequence[Question], *, batch_size: int = _BATCH) -> list[str]:
  """The model's greedy answers to ``qs`` (decoded, stop ids dropped).

  Questions of similar prompt lengths are batched together; each batch
  generates up to its longest budget, each row stopping at the
  tokenizer's ``stop_ids``.
  """
  from subspace_jax.models import generation  # pylint: disable=import-outside-toplevel
  stops = tuple(getattr(tokenizer, "stop_ids", None) or (tokenizer.eos_id,))
  order = sorted(range(len(qs)), key=lambda i: len(qs[i].ids))
  out: list[str] = [""] * len(qs)
  for start in range(0, len(order), batch_size):
    chunk = order[start:start + batch_size]
    budget = max(qs[i].budget for i in chunk)
    longest = max(len(qs[i].ids) for i in chunk)
    budget = max(1, min(budget, config.max_seq_len - longest))
    got = generation.generate(config, params, [qs[i].ids for i in chunk],
                              budget, stop_ids=stops)
    for i, tokens in zip(chunk, got):
      new = [int(t) for t in tokens[len(qs[i].ids):] if int(t) not in stops]
      out[i] = tokenizer.decode(new)
  return out


def exact_match(got: str, reference: str) -> bool:
  """Whether an answer is the reference, surrounding whitespace aside."""
  return got.strip() == reference.strip()


class Scored(NamedTuple):
  """Answers to held-out questions and their exact-match accuracy."""

  questions: list[Question]
  answers: list[str]
  correct: int

  @property
  def accuracy(self) -> float:
    return self.correct / max(len(self.questions), 1)

  def lines(self, shown: int = 3, width: int = 100) -> list[str]:
    """A summary line and the first ``shown`` questions with answers."""
    out = [f"exact match {self.correct}/{len(self.questions)} "
           f"({self.accuracy:.1%}) of the held-out answers"]
    for q, a in list(zip(self.questions, self.answers))[:shown]:
      mark = "right" if exact_match(a, q.reference) else "wrong"
      out.append(f"  {q.where}: {_short(q.prompt, width)!r} -> "
                 f"{_short(a, width)!r} ({mark}; reference "
                 f"{_short(q.reference, width)!r})")
    return out


def _short(text: str, width: int) -> str:
  text = " ".join(text.split())
  return text if len(text) <= width else text[:width - 3] + "..."


def score(config: Any, params: Any, tokenizer: Any,
          qs: Sequence[Question]) -> Scored:
  """:func:`answer` the questions and count the exact matches."""
  got = answer(config, params, tokenizer, qs)
  return Scored(list(qs), got,
                sum(exact_match(a, q.reference) for a, q in zip(got, qs)))
