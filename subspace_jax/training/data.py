"""Training data pipeline: documents -> tokens -> packed (inputs, targets).

Every source goes through the same steps: tokenize each document, append EOS,
concatenate, cut the token stream into windows of ``seq_len + 1`` tokens with
stride ``seq_len`` (so every token is a target exactly once), and batch the
windows as ``inputs = window[:-1]`` and ``targets = window[1:]``, both int32 of
shape ``(batch_size // process_count, seq_len)``.

Sources (defined in :mod:`subspace_jax.training.sources`, importable from
here too):

* :class:`EmbeddedCorpus`: public-domain English novels shipped with the
  package (no download), with a held-out validation split.
* :class:`TextFiles`: local UTF-8 text files matched by a glob.
* :class:`TfdsText`: any TFDS text dataset (e.g. ``c4/en``), read through
  ``tfds`` random-access data sources (array_record; TensorFlow not needed).

The first two are small enough to tokenize once into a NumPy array (cached on
disk) and are served by :class:`PackedIterator`; TFDS datasets are tokenized
on the fly by :class:`StreamingIterator`. Both iterators are infinite unless
``num_epochs`` is set, reshuffle with a seeded permutation every epoch, shard
the data across processes, and have a small JSON-able state::

    it = make_iterator("embedded", ByteTokenizer(), seq_len=128, batch_size=8)
    batch = next(it)                 # {"inputs": ..., "targets": ...}
    state = it.get_state()           # e.g. {"epoch": 0, "step": 1, ...}
    it2 = make_iterator("embedded", ByteTokenizer(), seq_len=128, batch_size=8)
    it2.set_state(state)             # it2 now yields what it would have
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from subspace_jax.training import cache
from subspace_jax.training.sources import (DataError, EmbeddedCorpus, Source,
                                           TextFiles, TfdsText,
                                           source_from_spec)
from subspace_jax.training.tokenizer import ByteTokenizer, Tokenizer

__all__ = ["DataError", "Source", "EmbeddedCorpus", "TextFiles", "TfdsText",
           "source_from_spec", "tokenize_documents", "PackedIterator",
           "StreamingIterator", "make_iterator", "ByteTokenizer", "Tokenizer"]

Batch = dict[str, np.ndarray]

_PROGRESS_EVERY = 10_000


# ----------------------------------------------------------------------------
# Tokenizing and packing
# ----------------------------------------------------------------------------


def tokenize_documents(docs: Sequence[str], tokenizer: Tokenizer, *,
                       progress_every: int = _PROGRESS_EVERY) -> np.ndarray:
    """Tokenizes ``docs``, appends EOS to each, and concatenates them.

    Args:
        docs: The documents.
        tokenizer: The tokenizer.
        progress_every: Print progress every this many documents (0: never).

    Returns:
        A 1-D array (uint16 if the vocabulary fits, else int32).
    """
    dtype = np.uint16 if tokenizer.vocab_size <= 1 << 16 else np.int32
    parts = []
    for k, doc in enumerate(docs, 1):
        parts.append(np.asarray(tokenizer.encode(doc) + [tokenizer.eos_id], dtype))
        if progress_every and k % progress_every == 0:
            print(f"Tokenized {k}/{len(docs)} documents", flush=True)
    return np.concatenate(parts) if parts else np.zeros(0, dtype)


def _cached_tokens(docs: Sequence[str], tokenizer: Tokenizer,
                   cache_dir: str | os.PathLike[str] | None) -> np.ndarray:
    """Like :func:`tokenize_documents`, cached on disk by content hash."""
    fingerprint = getattr(tokenizer, "fingerprint", None)
    if fingerprint is None:  # Unknown tokenizer: we cannot key a cache on it.
        return tokenize_documents(docs, tokenizer)
    key = cache.content_key(f"tokens-v1|{fingerprint}", docs)
    path = cache.cache_path(cache_dir, "tokens", f"{key[:24]}.npy")
    if path.is_file():
        return np.load(path, mmap_mode="r")
    tokens = tokenize_documents(docs, tokenizer)
    cache.write_atomic(path, lambda f: np.save(f, tokens), suffix=".tmp.npy")
    return tokens


def _signature(*parts: Any) -> str:
    return hashlib.sha256(repr(parts).encode()).hexdigest()[:12]


def _check_state(state: Any, keys: tuple[str, ...], signature: str) -> None:
    if not isinstance(state, dict) or any(k not in state for k in keys):
        raise DataError(f"iterator state must be a dict with keys {list(keys)}, "
                        f"got {state!r}; pass what get_state() returned")
    if state["signature"] != signature:
        raise DataError("iterator state was saved for different data or "
                        "settings (seq_len, batch_size, seed, shuffle, "
                        "processes); restore it into an iterator built the "
                        "same way")
    for k in keys[:-1]:
        if not isinstance(state[k], int) or state[k] < 0:
            raise DataError(f"iterator state {k!r} must be an int >= 0, got "
                            f"{state[k]!r}; pass what get_state() returned")


class PackedIterator:
    """Batches from a pre-tokenized token stream, in seeded shuffled order.

    Window ``i`` is ``tokens[i * seq_len : i * seq_len + seq_len + 1]``. Each
    epoch draws a permutation of all windows from ``(seed, epoch)``; global
    batch ``s`` is permutation entries ``[s * batch_size, (s + 1) *
    batch_size)`` (the remainder is dropped) and process ``p`` yields the
    ``p``-th contiguous slice of it, so the processes together see each
    window once per epoch and the global batch does not depend on the number
    of processes.

    The state is ``{"epoch", "step", "signature"}``.

    Args:
        tokens: 1-D token stream (documents with EOS, concatenated).
        seq_len: Sequence length of ``inputs`` and ``targets``.
        batch_size: Global batch size (over all processes).
        seed: Shuffling seed.
        shuffle: Shuffle windows every epoch (else keep stream order).
        num_epochs: Stop after this many epochs; ``None`` runs forever.
        process_index: This process, in ``[0, process_count)``.
        process_count: Number of processes sharing the data.
        name: Source name used in error messages.

    Raises:
        DataError: If the stream holds fewer windows than one global batch.
    """

    def __init__(self, tokens: np.ndarray, *, seq_len: int, batch_size: int,
                 seed: int = 0, shuffle: bool = True,
                 num_epochs: int | None = None, process_index: int = 0,
                 process_count: int = 1, name: str = "data"):
        _check_settings(seq_len, batch_size, num_epochs, process_index, process_count)
        self._tokens = tokens
        self.seq_len = seq_len
        self.batch_size = batch_size
        self.local_batch_size = batch_size // process_count
        self._seed, self._shuffle, self._num_epochs = seed, shuffle, num_epochs
        self._process_index = process_index
        self.num_tokens = int(len(tokens))
        self.num_sequences = max(0, (self.num_tokens - 1) // seq_len)
        self.steps_per_epoch = self.num_sequences // batch_size
        if self.steps_per_epoch == 0:
            raise DataError(
                f"{name} is too small: {self.num_tokens} tokens make "
                f"{self.num_sequences} sequences of seq_len {seq_len}, fewer "
                f"than one batch of {batch_size}; lower batch_size or seq_len, "
                "or add data")
        self._sig = _signature("packed", self.num_tokens, seq_len, batch_size,
                               seed, shuffle)
        self._epoch, self._step = 0, 0
        self._order: tuple[int, np.ndarray] | None = None
        self._offsets = np.arange(seq_len + 1)

    def __iter__(self) -> PackedIterator:
        return self

    def _permutation(self, epoch: int) -> np.ndarray:
        if self._order is None or self._order[0] != epoch:
            if self._shuffle:
                rng = np.random.default_rng([self._seed, epoch])
                order = rng.permutation(self.num_sequences)
            else:
                order = np.arange(self.num_sequences)
            self._order = (epoch, order)
        return self._order[1]

    def __next__(self) -> Batch:
        if self._num_epochs is not None and self._epoch >= self._num_epochs:
            raise StopIteration
        start = self._step * self.batch_size + self._process_index * self.local_batch_size
        index = self._permutation(self._epoch)[start:start + self.local_batch_size]
        windows = np.asarray(self._tokens[index[:, None] * self.seq_len + self._offsets],
                             dtype=np.int32)
        self._step += 1
        if self._step == self.steps_per_epoch:
            self._epoch, self._step = self._epoch + 1, 0
        return {"inputs": windows[:, :-1], "targets": windows[:, 1:]}

    def get_state(self) -> dict[str, Any]:
        """Returns the position as a small JSON-able dict."""
        return {"epoch": self._epoch, "step": self._step, "signature": self._sig}

    def set_state(self, state: dict[str, Any]) -> None:
        """Moves to a position returned by :meth:`get_state`.

        Raises:
            DataError: If the state is malformed or from other settings.
        """
        _check_state(state, ("epoch", "step", "signature"), self._sig)
        if state["step"] >= self.steps_per_epoch:
            raise DataError(f"iterator state step {state['step']} is past the "
                            f"{self.steps_per_epoch} steps of an epoch; pass "
                            "what get_state() returned")
        self._epoch, self._step = state["epoch"], state["step"]


class _DocOrder:
    """A seeded permutation of ``range(n)`` in ``O(n / block)`` memory.

    Contiguous blocks of ``block`` indices are permuted, then the indices
    inside each block; the permutation of a block is drawn when first used.
    """

    def __init__(self, n: int, seed: int, epoch: int, shuffle: bool,
                 block: int = 1 << 16):
        self._block, self._shuffle = block, shuffle
        self._key = (seed, epoch)
        num_blocks = -(-n // block)
        rng = np.random.default_rng([seed, epoch, 1])
        self._blocks = rng.permutation(num_blocks) if shuffle else np.arange(num_blocks)
        # Only the last block may be short; find where it landed.
        self._short_at = int(np.flatnonzero(self._blocks == num_blocks - 1)[0])
        self._short_len = n - (num_blocks - 1) * block
        self._inner: tuple[int, np.ndarray] = (-1, np.zeros(0, np.int64))

    def __getitem__(self, j: int) -> int:
        if not self._shuffle:
            return j
        b, at, short = self._block, self._short_at, self._short_len
        if j < at * b:
            pos, off = divmod(j, b)
        elif j < at * b + short:
            pos, off = at, j - at * b
        else:
            pos, off = divmod(j - at * b - short, b)
            pos += at + 1
        block_id = int(self._blocks[pos])
        if self._inner[0] != block_id:
            size = short if block_id == len(self._blocks) - 1 else b
            rng = np.random.default_rng([*self._key, 2, block_id])
            self._inner = (block_id, rng.permutation(size))
        return block_id * b + int(self._inner[1][off])


class StreamingIterator:
    """Batches from documents tokenized on the fly (for large datasets).

    Each epoch visits the documents in a seeded permutation drawn from
    ``(seed, epoch)``; process ``p`` takes permutation positions ``p, p + P,
    p + 2P, ...`` (``P`` processes, ``len(docs) // P`` documents each), so
    the processes read disjoint documents that together cover the data once
    per epoch. Each process packs its own documents (EOS appended) into
    windows of ``seq_len + 1`` tokens with stride ``seq_len``, the stream
    running on across epoch boundaries. As processes get different numbers
    of tokens per epoch, multi-process training should use the default
    ``num_epochs=None`` (run forever) and stop by step count.

    The state is ``{"epoch", "doc", "offset", "signature"}``: the next window
    starts at token ``offset`` of this process's document ``doc`` of epoch
    ``epoch``.

    Args:
        docs: Random-access documents (a list, or :meth:`TfdsText.open`).
        tokenizer: The tokenizer.
        seq_len: Sequence length of ``inputs`` and ``targets``.
        batch_size: Global batch size (over all processes).
        seed: Shuffling seed.
        shuffle: Shuffle documents every epoch (else keep their order).
        num_epochs: Stop after this many epochs; ``None`` runs forever.
        process_index: This process, in ``[0, process_count)``.
        process_count: Number of processes sharing the data.
        name: Source name used in error messages.

    Raises:
        DataError: If there are fewer documents than processes; later, from
            ``next``, if the documents are too few for one batch.
    """

    def __init__(self, docs: Sequence[str], tokenizer: Tokenizer, *,
                 seq_len: int, batch_size: int, seed: int = 0,
                 shuffle: bool = True, num_epochs: int | None = None,
                 process_index: int = 0, process_count: int = 1,
                 name: str = "data"):
        _check_settings(seq_len, batch_size, num_epochs, process_index, process_count)
        self._docs, self._tokenizer, self._name = docs, tokenizer, name
        self.seq_len = seq_len
        self.batch_size = batch_size
        self.local_batch_size = batch_size // process_count
        self._seed, self._shuffle, self._num_epochs = seed, shuffle, num_epochs
        self._p, self._num_p = process_index, process_count
        self.docs_per_epoch = len(docs) // process_count
        if self.docs_per_epoch == 0:
            raise DataError(f"{name} has {len(docs)} document(s), fewer than the "
                            f"{process_count} processes; add data or use fewer "
                            "processes")
        self._sig = _signature("stream", len(docs), seq_len, batch_size, seed,
                               shuffle, process_index, process_count)
        self._pos = (0, 0, 0)  # (epoch, doc, offset)
        self._orders: dict[int, _DocOrder] = {}
        self._cache: dict[tuple[int, int], np.ndarray] = {}

    def __iter__(self) -> StreamingIterator:
        return self

    def _doc_tokens(self, epoch: int, doc: int) -> np.ndarray:
        key = (epoch, doc)
        if key not in self._cache:
            if epoch not in self._orders:
                self._orders = {e: o for e, o in self._orders.items() if e >= self._pos[0]}
                self._orders[epoch] = _DocOrder(len(self._docs), self._seed,
                                                epoch, self._shuffle)
            index = self._orders[epoch][self._p + self._num_p * doc]
            ids = self._tokenizer.encode(self._docs[index]) + [self._tokenizer.eos_id]
            self._cache[key] = np.asarray(ids, np.int32)
        return self._cache[key]

    def _read(self, pos: tuple[int, int, int], count: int,
              start_epoch: int) -> tuple[list[np.ndarray], tuple[int, int, int]]:
        """Reads ``count`` tokens from ``pos``; returns them and the end."""
        epoch, doc, offset = pos
        parts = []
        while count > 0:
            if self._num_epochs is not None and epoch >= self._num_epochs:
                raise StopIteration
            if epoch >= start_epoch + 2:
                raise DataError(
                    f"{self._name} is too small: one epoch of this process's "
                    f"{self.docs_per_epoch} documents has fewer tokens than one "
                    f"batch ({self.local_batch_size} x {self.seq_len}); lower "
                    "batch_size or seq_len, or add data")
            tokens = self._doc_tokens(epoch, doc)
            if offset >= len(tokens):  # Only a hand-made state gets here.
                raise DataError(f"iterator state offset {offset} is past the end "
                                "of its document; pass what get_state() returned")
            part = tokens[offset:offset + count]
            parts.append(part)
            count -= len(part)
            offset += len(part)
            if offset == len(tokens):
                epoch, doc, offset = epoch, doc + 1, 0
                if doc == self.docs_per_epoch:
                    epoch, doc = epoch + 1, 0
        return parts, (epoch, doc, offset)

    def __next__(self) -> Batch:
        pos, rows = self._pos, []
        start_epoch = pos[0]
        try:
            for _ in range(self.local_batch_size):
                parts, pos = self._read(pos, self.seq_len, start_epoch)
                last, _ = self._read(pos, 1, start_epoch)
                rows.append(np.concatenate(parts + last))
        except StopIteration:
            if self._pos == (0, 0, 0):
                raise DataError(
                    f"{self._name} is too small: {self._num_epochs} epoch(s) "
                    "hold fewer tokens than one batch; lower batch_size or "
                    "seq_len, raise num_epochs, or add data") from None
            raise
        self._pos = pos
        self._cache = {k: v for k, v in self._cache.items() if k >= pos[:2]}
        windows = np.stack(rows)
        return {"inputs": windows[:, :-1], "targets": windows[:, 1:]}

    def get_state(self) -> dict[str, Any]:
        """Returns the position as a small JSON-able dict."""
        epoch, doc, offset = self._pos
        return {"epoch": epoch, "doc": doc, "offset": offset, "signature": self._sig}

    def set_state(self, state: dict[str, Any]) -> None:
        """Moves to a position returned by :meth:`get_state`.

        Raises:
            DataError: If the state is malformed or from other settings.
        """
        _check_state(state, ("epoch", "doc", "offset", "signature"), self._sig)
        if state["doc"] >= self.docs_per_epoch:
            raise DataError(f"iterator state doc {state['doc']} is past the "
                            f"{self.docs_per_epoch} documents of an epoch; pass "
                            "what get_state() returned")
        self._pos = (state["epoch"], state["doc"], state["offset"])
        self._cache = {}


# ----------------------------------------------------------------------------
# Entry point
# ----------------------------------------------------------------------------


def _check_settings(seq_len: int, batch_size: int, num_epochs: int | None,
                    process_index: int, process_count: int) -> None:
    if not isinstance(seq_len, (int, np.integer)) or seq_len < 1:
        raise DataError(f"seq_len must be an int >= 1, got {seq_len!r}")
    if not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise DataError(f"batch_size must be an int >= 1, got {batch_size!r}")
    if num_epochs is not None and num_epochs < 1:
        raise DataError(f"num_epochs must be >= 1 or None, got {num_epochs!r}")
    if process_count < 1 or not 0 <= process_index < process_count:
        raise DataError(f"process_index must be in [0, process_count), got "
                        f"{process_index} of {process_count}")
    if batch_size % process_count:
        raise DataError(f"batch_size {batch_size} is not divisible by the "
                        f"{process_count} processes; use a multiple of "
                        f"{process_count}")


def make_iterator(
    source: Source | str,
    tokenizer: Tokenizer | None = None,
    *,
    seq_len: int,
    batch_size: int,
    seed: int = 0,
    shuffle: bool = True,
    num_epochs: int | None = None,
    process_index: int | None = None,
    process_count: int | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
) -> PackedIterator | StreamingIterator:
    """Builds the batch iterator for a source.

    Args:
        source: :class:`EmbeddedCorpus`, :class:`TextFiles`, :class:`TfdsText`
            or a spec string for :func:`source_from_spec`.
        tokenizer: Tokenizer; defaults to :class:`ByteTokenizer`.
        seq_len: Length of ``inputs`` and ``targets`` rows.
        batch_size: Global batch size; each process yields
            ``batch_size // process_count`` rows.
        seed: Shuffling seed (per-epoch permutations derive from it).
        shuffle: Shuffle every epoch; use ``False`` for evaluation.
        num_epochs: Stop after this many epochs; ``None`` runs forever.
        process_index: This process; defaults to ``jax.process_index()``.
        process_count: Number of processes; defaults to ``jax.process_count()``.
        cache_dir: Cache for tokenized embedded/local data; defaults to
            :func:`~subspace_jax.training.cache.default_cache_dir`.

    Returns:
        An iterator of ``{"inputs", "targets"}`` int32 arrays of shape
        ``(batch_size // process_count, seq_len)`` with ``get_state`` and
        ``set_state``.

    Raises:
        DataError: On settings or data that cannot work; the message says
            what to change.
    """
    if isinstance(source, str):
        source = source_from_spec(source)
    tokenizer = tokenizer if tokenizer is not None else ByteTokenizer()
    if process_index is None and process_count is None:
        import jax  # pylint: disable=import-outside-toplevel
        process_index, process_count = jax.process_index(), jax.process_count()
    elif process_index is None or process_count is None:
        raise DataError("give both process_index and process_count, or neither "
                        "(then jax.process_index()/process_count() are used)")
    _check_settings(seq_len, batch_size, num_epochs, process_index, process_count)
    common = dict(seq_len=seq_len, batch_size=batch_size, seed=seed,
                  shuffle=shuffle, num_epochs=num_epochs,
                  process_index=process_index, process_count=process_count,
                  name=source.name)
    if not isinstance(source, Source):
        raise DataError(f"unsupported source {source!r}; use EmbeddedCorpus, "
                        "TextFiles, TfdsText or a spec string")
    if source.streaming:
        return StreamingIterator(source.open(), tokenizer, **common)
    tokens = _cached_tokens(source.open(), tokenizer, cache_dir)
    return PackedIterator(tokens, **common)
