"""Documents encoded into per-token arrays: the first step of the pipelines.

An encoder is any picklable callable from a document to a mapping of 1-D
arrays of one length, one value per token, with a ``"tokens"`` entry:
:class:`TextEncoder` (the default) makes a text its token ids with EOS
appended; :class:`ExampleEncoder` makes a fine-tuning
:class:`~subspace_jax.data.sources.Record`
``[BOS] + prompt + response + [EOS]`` with a ``"loss_mask"`` on the
response. Every extra field travels through packing and batching into the
batch (see :mod:`~subspace_jax.data.pipeline`).

:func:`tokenize_documents` encodes a whole source and concatenates each
field over its documents (the pre-tokenized pipeline's stream, cached on
disk by :func:`_cached_stream`); :class:`_ReadAndEncode` encodes one
document by its index, as the streamed pipeline's grain workers do. Both
check what the encoder returns, and a document that cannot be read or
encoded is a DataError naming it.

Usage::

    stream = tokenize_documents(["Hello.", "World."], ByteTokenizer())
    stream["tokens"]                 # Both documents' ids, EOS after each.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from subspace_jax import cache
from subspace_jax.data.sources import DataError, Record
from subspace_jax.data.tokenizers import Tokenizer

__all__ = ["Encoder", "TextEncoder", "ExampleEncoder", "tokenize_documents"]

Encoder = Callable[[Any], Mapping[str, Any]]

_PROGRESS_EVERY = 10_000


class TextEncoder:
    """The default encoder: a text to ``{"tokens": ids + [EOS]}`` (int32).

    An encoder is any picklable callable from a document to a mapping of
    per-token arrays with a ``"tokens"`` entry; other entries (of the same
    length) travel through packing and batching into the batch (see the
    module docstring). Pickled into grain's worker processes.

    The ids go into one array without a Python list of them where the
    tokenizer has ``encode_array`` (the byte tokenizer: a list of ints takes
    about 36 bytes per id, a 50 MB document 1.8 GB).

    Args:
        tokenizer: The tokenizer.
        dtype: The ids' dtype (int32; :func:`tokenize_documents` asks for
            uint16 when the vocabulary fits).
    """

    def __init__(self, tokenizer: Tokenizer, dtype: Any = np.int32):
        self.tokenizer, self.dtype = tokenizer, np.dtype(dtype)

    def __call__(self, text: str) -> dict[str, np.ndarray]:
        encode_array = getattr(self.tokenizer, "encode_array", None)
        ids = encode_array(text) if encode_array else self.tokenizer.encode(text)
        out = np.empty(len(ids) + 1, self.dtype)
        out[:-1] = ids
        out[-1] = self.tokenizer.eos_id
        return {"tokens": out}


class ExampleEncoder:
    """A fine-tuning :class:`~subspace_jax.data.sources.Record` to
    ``{"tokens", "loss_mask"}`` (int32 arrays), as LLaMA checkpoints expect
    their input.

    A prompt/response pair is ``[BOS] + prompt + response + [EOS]``, its
    ``loss_mask`` 1 on the response and EOS and 0 on BOS and the prompt; a
    text is ``[BOS] + text + [EOS]``, every token but BOS masked in. BOS and
    EOS are the tokenizer's own ids (no BOS if it has none, if its
    ``add_bos`` is False, as ``tokenizer_config.json``'s ``add_bos_token``
    says, or if the prompt already starts with it). A conversation
    (``messages``) is its chat template's rendering, learned on the
    assistant turns (:func:`subspace_jax.data.chat.encode_conversation`). The prompt and
    the response are tokenized apart, so the response starts on a token
    boundary (a SentencePiece tokenizer then starts it with a word, as it
    starts the prompt).

    Args:
        tokenizer: The tokenizer.
        max_tokens: Refuse a prompt/response pair of more tokens than this
            with a DataError naming its record (None: no limit; the pipeline
            gives ``seq_len + 1``, the most a row holds). Texts may be
            longer: the pipeline cuts them.
    """

    def __init__(self, tokenizer: Tokenizer, max_tokens: int | None = None):
        self.tokenizer, self.max_tokens = tokenizer, max_tokens

    def __call__(self, record: Record) -> dict[str, np.ndarray]:
        tok = self.tokenizer
        if record.messages is not None:
            return self._conversation(record)
        bos = ([] if getattr(tok, "bos_id", None) is None
               or not getattr(tok, "add_bos", True) else [tok.bos_id])
        if record.text is not None:
            read, learned = bos, [*tok.encode(record.text), tok.eos_id]
        else:
            prompt = tok.encode(record.prompt)
            if bos and prompt[:1] == bos:  # The prompt starts with it.
                bos = []
            read = [*bos, *prompt]
            learned = [*tok.encode(record.response), tok.eos_id]
            n = len(read) + len(learned)
            if self.max_tokens is not None and n > self.max_tokens:
                raise DataError(
                    f"{record.where}: the example is {n} tokens long (BOS and "
                    f"EOS included), more than the {self.max_tokens} of a row "
                    f"(seq_len + 1); raise seq_len to {n - 1} or more, or "
                    "shorten or drop the example")
        return {"tokens": np.asarray([*read, *learned], np.int32),
                "loss_mask": np.asarray([0] * len(read) + [1] * len(learned),
                                        np.int32)}

    def _conversation(self, record: Record) -> dict[str, np.ndarray]:
        from subspace_jax.data import chat  # pylint: disable=import-outside-toplevel
        try:
            ids, mask = chat.encode_conversation(self.tokenizer,
                                                 record.conversation)
        except chat.ChatError as e:
            raise DataError(f"{record.where}: {e}") from None
        n = len(ids)
        if self.max_tokens is not None and n > self.max_tokens:
            raise DataError(
                f"{record.where}: the conversation is {n} tokens long, more "
                f"than the {self.max_tokens} of a row (seq_len + 1); raise "
                f"seq_len to {n - 1} or more, or shorten or drop it")
        return {"tokens": np.asarray(ids, np.int32),
                "loss_mask": np.asarray(mask, np.int32)}


def _check_fields(fields: Any, index: int, name: str) -> dict[str, np.ndarray]:
    """An encoder's output as 1-D arrays of one length, or a DataError."""
    if not isinstance(fields, Mapping) or "tokens" not in fields:
        raise DataError(f"the encoder returned {type(fields).__name__} for "
                        f"document {index} of {name}, not a mapping with "
                        "'tokens'")
    out = {k: np.asarray(v) for k, v in fields.items()}
    length = len(out["tokens"])
    for key, value in out.items():
        if value.ndim != 1 or len(value) != length:
            raise DataError(f"field {key!r} of document {index} of {name} has "
                            f"shape {value.shape}, not ({length},) like its "
                            "tokens; give every field one value per token")
    if length == 0:
        raise DataError(f"document {index} of {name} encodes to no token; the "
                        "encoder must give at least one (EOS)")
    return out


def _read_document(docs: Sequence[Any], index: int, name: str) -> Any:
    """``docs[index]``; a failure is a DataError naming the document."""
    try:
        return docs[index]
    except DataError:
        raise
    except Exception as e:  # pylint: disable=broad-except
        raise DataError(f"cannot read document {index} of {name} "
                        f"({_brief(e)}); repair or rebuild the data") from None


class _ReadAndEncode:
    """A document index to its checked fields; errors name the document."""

    def __init__(self, docs: Sequence[Any], encoder: Encoder, name: str):
        self._docs, self._encoder, self._name = docs, encoder, name

    def __call__(self, index: int) -> dict[str, np.ndarray]:
        index = int(index)
        doc = _read_document(self._docs, index, self._name)
        try:
            fields = self._encoder(doc)
        except DataError:
            raise
        except Exception as e:  # pylint: disable=broad-except
            raise DataError(f"cannot encode document {index} of {self._name} "
                            f"({_brief(e)}); fix or remove it") from None
        return _check_fields(fields, index, self._name)


def _brief(error: BaseException, limit: int = 200) -> str:
    lines = str(error).strip().splitlines()
    text = f"{type(error).__name__}: {lines[0] if lines else ''}"
    return text if len(text) <= limit else text[:limit - 3] + "..."


def tokenize_documents(docs: Sequence[Any], encoder: Encoder | Tokenizer, *,
                       name: str = "data",
                       progress_every: int = _PROGRESS_EVERY) -> dict[str, np.ndarray]:
    """Encodes ``docs`` and concatenates each field over them.

    Args:
        docs: The documents.
        encoder: An encoder, or a tokenizer (then :class:`TextEncoder`).
        name: The data's name in error messages.
        progress_every: Print progress every this many documents (0: never).

    Returns:
        ``{"tokens": ..., **extra fields}``, 1-D arrays (tokens uint16 if
        the vocabulary fits, else int32).

    Raises:
        DataError: If a document cannot be encoded.
    """
    tokenizer = encoder if isinstance(encoder, Tokenizer) else None
    # Ids stored as uint16 as they come when the vocabulary fits (half the
    # memory of int32 while the documents are gathered).
    small = tokenizer is not None and tokenizer.vocab_size <= 1 << 16
    encode = _ReadAndEncode(
        docs, TextEncoder(tokenizer, np.uint16 if small else np.int32)
        if tokenizer else encoder, name)
    parts: dict[str, list[np.ndarray]] = {}
    for k in range(len(docs)):
        for key, value in encode(k).items():
            parts.setdefault(key, []).append(value)
        if progress_every and (k + 1) % progress_every == 0:
            print(f"Tokenized {k + 1}/{len(docs)} documents", flush=True)
    if not parts:
        return {"tokens": np.zeros(0, np.int32)}
    if len(docs) == 1:  # No copy of a single (maybe very long) document.
        return {key: values[0] for key, values in parts.items()}
    return {key: np.concatenate(values) for key, values in parts.items()}


def _cached_stream(docs: Sequence[str], tokenizer: Tokenizer, name: str,
                   cache_dir: str | os.PathLike[str] | None) -> dict[str, np.ndarray]:
    """:func:`tokenize_documents` with the tokenizer, cached on disk by
    content hash (when the tokenizer has a fingerprint).

    A cached file is used only if it is what was written (its size and
    SHA-256, :func:`~subspace_jax.cache.damage`) and holds ids of
    the tokenizer's vocabulary; a damaged one is made again, with a line on
    stderr naming it.
    """
    fingerprint = getattr(tokenizer, "fingerprint", None)
    if fingerprint is None:  # Unknown tokenizer: we cannot key a cache on it.
        return tokenize_documents(docs, tokenizer, name=name)
    key = cache.content_key(f"tokens-v2|{fingerprint}", docs)
    path = cache.cache_path(cache_dir, "tokens", f"{key[:24]}.npy")
    why = cache.damage(path)
    if why is None:
        tokens, why = _load_tokens(path, tokenizer.vocab_size)
        if why is None:
            return {"tokens": tokens}
    if why != "missing":
        print(f"warning: token cache {path} is damaged ({why}); rebuilding it",
              file=sys.stderr, flush=True)
    tokens = tokenize_documents(docs, tokenizer, name=name)["tokens"]
    cache.write_verified(path, lambda f: np.save(f, tokens))
    return {"tokens": tokens}


def _load_tokens(path, vocab_size: int) -> tuple[np.ndarray | None, str | None]:
    """The cached ids (memory-mapped), or why they cannot be used."""
    try:
        tokens = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as e:
        return None, f"not a NumPy array file ({_brief(e)})"
    if tokens.ndim != 1 or not np.issubdtype(tokens.dtype, np.integer):
        return None, f"holds {tokens.dtype} {tokens.shape}, not a list of ids"
    if len(tokens) and (int(tokens.min()) < 0 or int(tokens.max()) >= vocab_size):
        return None, (f"ids outside the vocabulary of {vocab_size} "
                      f"({int(tokens.min())}..{int(tokens.max())})")
    return tokens, None
