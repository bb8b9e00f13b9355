"""Chat templates: conversations rendered as a tokenizer's model expects.

A chat model's tokenizer carries a Jinja template (``chat_template.jinja``,
``tokenizer_config.json``'s ``chat_template`` or a GGUF file's
``tokenizer.chat_template``) that turns a list of messages into the text
the model was trained on. It is rendered here as transformers renders it
(a sandboxed Jinja environment with ``trim_blocks`` and ``lstrip_blocks``,
``raise_exception``, ``strftime_now`` and a ``tojson`` filter), through
the ``jinja2`` package (``pip install "subspace_jax[chat]"``).

* :func:`render`: the text of a conversation;
* :func:`turns`: the text cut into what the model reads and what it
  writes (the assistant turns), for a loss on the assistant turns only;
* :func:`encode_text`: text to ids with the tokenizer's BOS and EOS
  written in it (``<s>``, ``<|im_end|>``) as their ids;
* :func:`encode_conversation`: a conversation's ids and loss mask;
* :func:`prompt_ids`: the ids that ask for the next assistant turn.

Usage::

    text = render(tok.chat_template, [{"role": "user", "content": "Hi"}],
                  add_generation_prompt=True, bos_token="<s>")
"""

from __future__ import annotations

import datetime
import functools
import json
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["render", "turns", "encode_text", "encode_conversation",
           "prompt_ids", "ChatError"]

Message = Mapping[str, str]


class ChatError(ValueError):
  """A conversation or template that cannot be rendered."""


def _raise(message: str):
  raise ChatError(message)


@functools.lru_cache(maxsize=8)
def _compiled(template: str):
  try:
    import jinja2  # pylint: disable=import-outside-toplevel
    from jinja2 import sandbox  # pylint: disable=import-outside-toplevel
  except ImportError:
    raise ImportError('chat templates need the jinja2 package: pip install '
                      '"subspace_jax[chat]" (or pip install jinja2)') from None
  env = sandbox.ImmutableSandboxedEnvironment(
      trim_blocks=True, lstrip_blocks=True,
      extensions=["jinja2.ext.loopcontrols"])
  env.filters["tojson"] = lambda x, indent=None, ensure_ascii=False, **kw: (
      json.dumps(x, indent=indent, ensure_ascii=ensure_ascii, **kw))
  env.globals["raise_exception"] = _raise
  env.globals["strftime_now"] = (
      lambda fmt: datetime.datetime.now().strftime(fmt))
  try:
    return env.from_string(template)
  except jinja2.TemplateError as e:
    raise ChatError(f"the chat template is not valid Jinja ({e})") from None


def render(template: str, messages: Sequence[Message], *,
           add_generation_prompt: bool = False, bos_token: str = "",
           eos_token: str = "", **variables: Any) -> str:
  """The text of ``messages`` in ``template``.

  Args:
    template: The Jinja chat template.
    messages: ``{"role": ..., "content": ...}`` mappings.
    add_generation_prompt: End with what starts an assistant turn.
    bos_token: The tokenizer's BOS text (templates may write it).
    eos_token: The tokenizer's EOS text.
    **variables: Other template variables.

  Raises:
    ChatError: If the template is not valid Jinja or fails on these
      messages (its own ``raise_exception`` included).
  """
  import jinja2  # pylint: disable=import-outside-toplevel
  compiled = _compiled(template)
  try:
    return compiled.render(messages=[dict(m) for m in messages],
                           add_generation_prompt=add_generation_prompt,
                           bos_token=bos_token, eos_token=eos_token,
                           **variables)
  except ChatError:
    raise
  except (jinja2.TemplateError, TypeError, ValueError, KeyError) as e:
    lines = str(e).strip().splitlines() or [type(e).__name__]
    raise ChatError(f"the chat template failed ({lines[0]})") from None


def turns(template: str, messages: Sequence[Message],
          **specials: str) -> list[tuple[str, bool]]:
  """The rendered conversation as ``(text, learned)`` pieces, in order:
  each assistant turn (its content and whatever closes it, as the
  template writes it) is learned, the rest only read.

  A turn is found as the difference between the conversation rendered up
  to it with the generation prompt and rendered through it, so the
  template must render each conversation as the prefixes of its turns
  (every usual template does).

  Args:
    template: The chat template.
    messages: The conversation; it needs at least one ``assistant``
      message.
    **specials: ``bos_token`` and ``eos_token`` (see :func:`render`).

  Raises:
    ChatError: If there is no assistant message or the template does not
      render prefixes.
  """
  assistant = [k for k, m in enumerate(messages) if m["role"] == "assistant"]
  if not assistant:
    raise ChatError("the conversation has no 'assistant' message to learn")
  full = render(template, messages, **specials)
  pieces, at = [], 0
  for k in assistant:
    ask = render(template, messages[:k], add_generation_prompt=True,
                 **specials)
    through = render(template, messages[:k + 1], **specials)
    if not (through.startswith(ask) and full.startswith(through)
            and len(ask) >= at):
      raise ChatError(
          f"the chat template does not render message {k + 1} as a "
          "continuation of the messages before it, so its assistant turn "
          "cannot be found; use prompt/response pairs instead")
    pieces += [(full[at:len(ask)], False), (full[len(ask):len(through)], True)]
    at = len(through)
  pieces.append((full[at:], False))
  return [(text, learned) for text, learned in pieces if text]


def encode_text(tokenizer: Any, text: str) -> list[int]:
  """``tokenizer.encode(text)``, with the texts of the tokenizer's BOS and
  EOS tokens (as a chat template writes them) mapped to their ids: a
  SentencePiece model would spell ``<s>`` out in pieces, a Hugging Face
  tokenizer already matches its special tokens."""
  piece = getattr(tokenizer, "piece", None)
  specials = {}
  if piece is not None:
    for i in (getattr(tokenizer, "bos_id", None), tokenizer.eos_id):
      if i is not None:
        specials[piece(i)] = i
  specials = {k: v for k, v in specials.items() if k}
  ids: list[int] = []
  rest = text
  while rest:
    found = [(rest.find(s), s) for s in specials if s in rest]
    if not found:
      ids += tokenizer.encode(rest)
      break
    at, s = min(found)
    if at:
      ids += tokenizer.encode(rest[:at])
    ids.append(specials[s])
    rest = rest[at + len(s):]
  return ids


def _specials(tokenizer: Any) -> dict[str, str]:
  piece = getattr(tokenizer, "piece", None)
  out = {}
  for role in ("bos", "eos"):
    i = getattr(tokenizer, f"{role}_id", None)
    out[f"{role}_token"] = piece(i) if piece is not None and i is not None else ""
  return out


def _with_bos(tokenizer: Any, ids: list[int]) -> list[int]:
  """``ids`` with BOS in front if the tokenizer adds one and the text did
  not start with it already."""
  bos = getattr(tokenizer, "bos_id", None)
  if bos is None or not getattr(tokenizer, "add_bos", True):
    return ids
  return ids if ids[:1] == [bos] else [bos, *ids]


def encode_conversation(tokenizer: Any, messages: Sequence[Message]
                        ) -> tuple[list[int], list[int]]:
  """A conversation's ids and loss mask (1 on the assistant turns).

  The conversation is the tokenizer's chat template's rendering, each
  piece of :func:`turns` encoded apart (a learned turn starts on a token
  boundary); BOS goes in front only if the tokenizer adds one and the
  template did not write it. No EOS is added: the template closes the
  turns (its end-of-turn token is among the tokenizer's ``stop_ids``).

  Raises:
    ChatError: If the tokenizer has no chat template, or it fails.
  """
  template = getattr(tokenizer, "chat_template", None)
  if not template:
    raise ChatError("the tokenizer has no chat template; give a tokenizer "
                    "that has one (chat_template.jinja or tokenizer_config."
                    "json's chat_template), or use prompt/response pairs")
  ids: list[int] = []
  mask: list[int] = []
  for text, learned in turns(template, messages, **_specials(tokenizer)):
    part = encode_text(tokenizer, text)
    ids += part
    mask += [int(learned)] * len(part)
  with_bos = _with_bos(tokenizer, ids)
  return with_bos, [0] * (len(with_bos) - len(ids)) + mask


def prompt_ids(tokenizer: Any, messages: Sequence[Message]) -> list[int]:
  """The ids that ask the model for the next assistant turn after
  ``messages`` (the chat template with its generation prompt), BOS as in
  :func:`encode_conversation`.

  Raises:
    ChatError: If the tokenizer has no chat template, or it fails.
  """
  template = getattr(tokenizer, "chat_template", None)
  if not template:
    raise ChatError("the tokenizer has no chat template")
  text = render(template, messages, add_generation_prompt=True,
                **_specials(tokenizer))
  return _with_bos(tokenizer, encode_text(tokenizer, text))
