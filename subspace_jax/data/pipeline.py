"""Training data pipelines on grain: documents -> tokens -> packed batches.

Every source goes through the same steps: each document is encoded into
per-token arrays (:mod:`~subspace_jax.data.encoding`: ``"tokens"``, its
token ids with EOS appended, plus any extra per-token field an encoder
adds, such as a loss mask), the documents are concatenated, the stream is
cut into windows of ``seq_len + 1`` tokens, and the windows are batched as
``inputs = window[:-1]`` and ``targets = window[1:]``, int32 of shape
``(batch_size // process_count, seq_len)``. An extra field ``f`` comes out
as ``f = window_f[1:]``, aligned with ``targets`` (a loss mask applies to
the tokens being predicted). Windows run across document boundaries; the
EOS tokens mark them and the model attends across them.

Fine-tuning sources (``source.examples``: :class:`~subspace_jax.data.sources.Record`
examples) are packed otherwise, example by example, into rows of whole
examples that the model attends within (see
:mod:`~subspace_jax.data.packing`). The examples are packed once; the
rows are shuffled anew every epoch and batched as the windows of the
pre-tokenized pipeline below.

Two grain pipelines, chosen by the source's ``streaming``:

* **Pre-tokenized** (:class:`EmbeddedCorpus`, :class:`TextFiles`): the whole
  source is encoded once (cached on disk) into one stream, and window ``i``
  is ``stream[i * seq_len : i * seq_len + seq_len + 1]``: consecutive
  windows share one token, so every token is a target exactly once. A
  ``grain.MapDataset`` of window indices is shuffled anew every epoch
  (grain's index shuffle, seeded by ``seed + epoch``), cut into global
  batches (an epoch's remainder is dropped), and process ``p`` takes the
  ``p``-th contiguous slice of every global batch, so the global batch does
  not depend on the number of processes. A background thread gathers the
  next batches. The position is the number of batches taken, the same on
  every process.
* **Streamed** (:class:`TfdsText`): a ``grain.MapDataset`` of document
  indices is shuffled anew every epoch, repeated, and sharded by process
  (process ``p`` takes positions ``p, p + P, ...`` of the shuffled stream);
  each process reads and encodes its documents, packs them with grain's
  ``ConcatThenSplitIterDataset`` into windows of ``seq_len + 1`` tokens,
  batches and prefetches them. With ``workers > 0`` all of that runs in
  grain worker processes (``mp_prefetch``); with 0, in this process, a
  background thread reading ahead. The position is grain's iterator state.

Where the streamed pipeline differs from the hand-written one it replaces:

* Windows do not overlap: the first token of each window is an input only,
  never a target (1 token in ``seq_len + 1``; before, every token was a
  target once). grain's packer cuts the stream into independent windows;
  carrying one token from window to window would need a packer of our own.
* With ``workers = N > 0`` each worker packs its own share of the documents
  (positions ``w, w + N, ...`` of the process's stream) and batches are taken
  from the workers in turn, so the batches depend on ``N`` (they are the
  same for the same ``N``, and a saved position fits only the same ``N``).
* Documents whose text is not UTF-8 stop the pipeline with an error naming
  the document (they were decoded with U+FFFD replacements).

Usage::

    it = make_iterator("embedded", ByteTokenizer(), seq_len=128, batch_size=8)
    batch = next(it)                 # {"inputs": ..., "targets": ...}
    state = it.get_state()           # JSON-able
    it2 = make_iterator("embedded", ByteTokenizer(), seq_len=128, batch_size=8)
    it2.set_state(state)             # it2 now yields what it would have
    it.close(); it2.close()          # Stops prefetch threads and workers.
"""

from __future__ import annotations

import hashlib
import os
import signal
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import grain
import numpy as np

from subspace_jax.data.encoding import (Encoder, ExampleEncoder,
                                            TextEncoder, _brief,
                                            _cached_stream, _read_document,
                                            _ReadAndEncode, tokenize_documents)
from subspace_jax.data.packing import (PackingStats, _GatherRows, _pieces,
                                           pack_examples)
from subspace_jax.data.sources import (DataError, EmbeddedCorpus,
                                           Instructions, JsonlRecords, Record,
                                           Source, TextFiles, TfdsText,
                                           source_from_spec)
from subspace_jax.data.tokenizers import ByteTokenizer, Tokenizer

__all__ = ["DataError", "Source", "EmbeddedCorpus", "TextFiles", "TfdsText",
           "Record", "JsonlRecords", "Instructions", "source_from_spec",
           "BatchIterator", "make_iterator", "ByteTokenizer", "Tokenizer"]

Batch = dict[str, np.ndarray]

# Batches gathered ahead by the pre-tokenized pipeline's thread, and by each
# worker (or the thread) of the streamed one.
_BATCHES_AHEAD = 2
# Documents read and encoded ahead (per process or worker) when streaming.
_DOCS_AHEAD = 64
# A tokenizer makes at most this many tokens more than a document's UTF-8
# bytes (one per byte, with byte fallback; a SentencePiece dummy prefix);
# with the EOS token, the bound on tokens that the too-small check uses.
_TOKENS_OVER_BYTES = 3


# ----------------------------------------------------------------------------
# Windows and batches
# ----------------------------------------------------------------------------


def _to_batch(windows: Mapping[str, np.ndarray]) -> Batch:
    """Windows of ``seq_len + 1`` to inputs, targets and the extra fields
    (aligned with the targets); grain's packing features are dropped."""
    tokens = np.asarray(windows["tokens"], np.int32)
    batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}
    for key, value in windows.items():
        if key != "tokens" and not key.endswith(("_segment_ids", "_positions")):
            batch[key] = np.asarray(value)[:, 1:]
    return batch


class _GatherWindows:
    """A batch of window indices to its batch (pre-tokenized pipeline)."""

    def __init__(self, stream: Mapping[str, np.ndarray], seq_len: int):
        self._stream, self._seq_len = stream, seq_len
        self._offsets = np.arange(seq_len + 1)

    def __call__(self, index: np.ndarray) -> Batch:
        at = np.asarray(index)[:, None] * self._seq_len + self._offsets
        return _to_batch({k: v[at] for k, v in self._stream.items()})


def _is_full(window: Mapping[str, np.ndarray]) -> bool:
    """Whether a packed window is not padded (only the last window of a
    finite stream is)."""
    return bool(window["tokens_segment_ids"][-1] > 0)


def _worker_init(worker_index: int, worker_count: int) -> None:
    """In each grain worker: signals go to the training process, which
    stops the workers itself (a Ctrl-C reaches the whole process group, and
    a worker that died of it would fail the step that the run is finishing
    before it saves); and the worker ends if the training process is gone
    (killed, or ended by ``os._exit`` on a second signal)."""
    del worker_index, worker_count
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(0)  # pylint: disable=protected-access
    threading.Thread(target=watch, daemon=True, name="parent-watch").start()


def _absl_flags_parsed() -> None:
    """Marks absl's flags parsed (at their defaults) unless a program did:
    grain reads one of its absl flags when it starts worker processes, an
    error in a program that does not parse absl flags (this one)."""
    from absl import flags  # pylint: disable=import-outside-toplevel
    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def _signature(*parts: Any) -> str:
    return hashlib.sha256(repr(parts).encode()).hexdigest()[:12]


class BatchIterator:
    """Batches of a grain pipeline, with a JSON-able position.

    Made by :func:`make_iterator`. Close it (or use it as a context
    manager) to stop its prefetch thread and worker processes.

    Attributes:
        seq_len: Length of the rows.
        batch_size: Global batch size.
        local_batch_size: Rows this process yields per batch.
        steps_per_epoch: Batches per epoch (pre-tokenized data), else None.
        num_tokens: Tokens in the stream (pre-tokenized data), else None.
        packing: How the examples were packed (fine-tuning sources:
            :class:`~subspace_jax.data.packing.PackingStats`), else
            None.
    """

    packing: PackingStats | None = None

    def __init__(self, start: Callable[[int], grain.IterDataset], *,
                 signature: str, by_count: bool, seq_len: int,
                 batch_size: int, local_batch_size: int,
                 steps_per_epoch: int | None = None,
                 num_tokens: int | None = None):
        self._start, self._sig, self._by_count = start, signature, by_count
        self.seq_len, self.batch_size = seq_len, batch_size
        self.local_batch_size = local_batch_size
        self.steps_per_epoch, self.num_tokens = steps_per_epoch, num_tokens
        self._it = iter(start(0))
        self._taken = 0

    def __iter__(self) -> BatchIterator:
        return self

    def __next__(self) -> Batch:
        batch = next(self._it)
        self._taken += 1
        return batch

    def get_state(self) -> dict[str, Any]:
        """Returns the position as a small JSON-able dict."""
        if self._by_count:
            return {"batch": self._taken, "signature": self._sig}
        return {"grain": self._it.get_state(), "batch": self._taken,
                "signature": self._sig}

    def set_state(self, state: dict[str, Any]) -> None:
        """Moves to a position returned by :meth:`get_state`.

        Raises:
            DataError: If the state is malformed or from other settings.
        """
        key = "batch" if self._by_count else "grain"
        if not isinstance(state, dict) or {key, "signature"} - state.keys():
            raise DataError(f"iterator state must be a dict with keys "
                            f"{[key, 'signature']}, got {str(state)[:80]}; "
                            "pass what "
                            "get_state() returned")
        if state["signature"] != self._sig:
            raise DataError("iterator state was saved for different data or "
                            "settings (seq_len, batch_size, seed, shuffle, "
                            "processes, workers); restore it into an iterator "
                            "built the same way")
        count = state.get("batch", 0)  # Streamed states before it: none.
        if not isinstance(count, int) or isinstance(count, bool) or count < 0:
            raise DataError(f"iterator state 'batch' must be an int >= 0, "
                            f"got {str(count)[:40]}; pass what get_state() "
                            "returned")
        if self._by_count:
            try:
                it = iter(self._start(count))
            except Exception as e:  # pylint: disable=broad-except
                raise DataError(f"iterator state 'batch' {count} does not fit "
                                f"this pipeline ({_brief(e)}); pass what "
                                "get_state() returned") from None
            self._it.close()
            self._it, self._taken = it, count
            return
        try:
            self._it.set_state(state["grain"])
        except Exception as e:  # pylint: disable=broad-except
            raise DataError(f"iterator state does not fit this pipeline "
                            f"({_brief(e)}); pass what get_state() returned"
                            ) from None
        self._taken = count

    def close(self) -> None:
        """Stops the prefetch thread and the worker processes."""
        self._it.close()

    def __enter__(self) -> BatchIterator:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def _row_batches(num_rows: int, gather: Callable[[np.ndarray], Batch],
                 signature: tuple[Any, ...], *, seq_len: int, batch_size: int,
                 process_index: int, process_count: int, seed: int,
                 shuffle: bool, num_epochs: int | None, num_tokens: int
                 ) -> BatchIterator:
    """Rows ``0 .. num_rows - 1`` (``gather`` makes a batch of them),
    shuffled anew every epoch and cut into global batches (an epoch's
    remainder dropped); process ``p`` takes the ``p``-th slice of every
    global batch. The position is the number of batches taken."""
    steps = num_rows // batch_size
    local = batch_size // process_count
    rows = grain.MapDataset.range(num_rows)
    if shuffle:
        rows = rows.shuffle(seed=seed)
    # Global batch s is rows [s * B, (s + 1) * B) of its epoch; process p
    # takes its p-th slice of `local` rows.
    batches = rows[:steps * batch_size].batch(local)[process_index::process_count]
    batches = batches.repeat(num_epochs).map(gather)
    options = grain.ReadOptions(num_threads=1, prefetch_buffer_size=_BATCHES_AHEAD)

    def start(count: int) -> grain.IterDataset:
        return batches[count:].to_iter_dataset(options)

    sig = _signature(*signature, seq_len, batch_size, seed, shuffle)
    return BatchIterator(start, signature=sig, by_count=True, seq_len=seq_len,
                         batch_size=batch_size, local_batch_size=local,
                         steps_per_epoch=steps, num_tokens=num_tokens)


def _window_iterator(stream: Mapping[str, np.ndarray], *, seq_len: int,
                     batch_size: int, name: str, **common) -> BatchIterator:
    """The pre-tokenized pipeline (see the module docstring)."""
    num_tokens = len(stream["tokens"])
    num_windows = max(0, (num_tokens - 1) // seq_len)
    if num_windows < batch_size:
        raise DataError(
            f"{name} is too small: {num_tokens} tokens make {num_windows} "
            f"sequences of seq_len {seq_len}, fewer than one batch of "
            f"{batch_size}; lower batch_size or seq_len, or add data")
    return _row_batches(num_windows, _GatherWindows(stream, seq_len),
                        ("windows", num_tokens, sorted(stream)),
                        seq_len=seq_len, batch_size=batch_size,
                        num_tokens=num_tokens, **common)


# ----------------------------------------------------------------------------
# Packed examples
# ----------------------------------------------------------------------------


def _example_iterator(docs: Sequence[Any], encoder: Encoder, *, seq_len: int,
                      batch_size: int, pad_id: int, name: str, **common
                      ) -> BatchIterator:
    """The packed-examples pipeline (see the module docstring and
    :mod:`~subspace_jax.data.packing`)."""
    encode = _ReadAndEncode(docs, encoder, name)
    fields = [encode(i) for i in range(len(docs))]
    keys = sorted(fields[0]) if fields else ["tokens"]
    if any(sorted(f) != keys for f in fields):
        raise DataError(f"the encoder gave the examples of {name} different "
                        f"fields (not all {keys}); give every example the same")
    stream = {k: np.concatenate([f[k] for f in fields]) if fields
              else np.zeros(0, np.int32) for k in keys}
    starts, sizes = _pieces([len(f["tokens"]) for f in fields], seq_len)
    rows = pack_examples(sizes - 1, seq_len) if len(sizes) else []
    if len(rows) < batch_size:
        raise DataError(
            f"{name} is too small: its {len(docs)} examples pack into "
            f"{len(rows)} rows of seq_len {seq_len}, fewer than one batch of "
            f"{batch_size}; lower batch_size, or add data")
    it = _row_batches(len(rows), _GatherRows(stream, starts, sizes, rows,
                                             seq_len, pad_id),
                      ("examples", len(docs), len(sizes), len(rows),
                       len(stream["tokens"]), keys),
                      seq_len=seq_len, batch_size=batch_size,
                      num_tokens=len(stream["tokens"]), **common)
    it.packing = PackingStats(examples=len(docs), pieces=len(sizes),
                              rows=len(rows),
                              fill=float(np.sum(sizes - 1)) / (len(rows) * seq_len))
    return it


# ----------------------------------------------------------------------------
# Streamed documents
# ----------------------------------------------------------------------------


def _check_stream_size(docs: Sequence[Any], local: int, seq_len: int,
                       process_index: int, process_count: int, name: str) -> None:
    """Refuses texts whose share for this process cannot fill one batch.

    Each document gives at least one token, so only a share of fewer than
    ``need`` documents is read; its bound on tokens is UTF-8 bytes plus
    :data:`_TOKENS_OVER_BYTES` per document. Documents that are not text
    (a custom encoder's) are not checked.
    """
    need = local * (seq_len + 1)
    share = range(process_index, len(docs), process_count)
    if len(share) >= need:
        return
    bound = 0
    for i in share:
        doc = _read_document(docs, i, name)
        if not isinstance(doc, str):
            return
        bound += len(doc.encode("utf-8")) + _TOKENS_OVER_BYTES
    if bound < need:
        raise DataError(
            f"{name} is too small: the {len(share)} document(s) of process "
            f"{process_index} hold at most {bound} tokens, fewer than one "
            f"batch ({local} x {seq_len + 1}); lower batch_size or "
            "seq_len, or add data")


def _stream_iterator(docs: Sequence[Any], encoder: Encoder, *, seq_len: int,
                     batch_size: int, process_index: int, process_count: int,
                     seed: int, shuffle: bool, num_epochs: int | None,
                     workers: int, name: str) -> BatchIterator:
    """The streamed pipeline (see the module docstring)."""
    local = batch_size // process_count
    if len(docs) < process_count:
        raise DataError(f"{name} has {len(docs)} document(s), fewer than the "
                        f"{process_count} processes; add data or use fewer "
                        "processes")
    _check_stream_size(docs, local, seq_len, process_index, process_count, name)
    indices = grain.MapDataset.range(len(docs))
    if shuffle:
        indices = indices.shuffle(seed=seed)
    indices = indices.repeat(num_epochs)[process_index::process_count]
    read = grain.ReadOptions(num_threads=1, prefetch_buffer_size=_DOCS_AHEAD)
    fields = indices.map(_ReadAndEncode(docs, encoder, name)).to_iter_dataset(read)
    # The length of every field: the encoder's fields are only known from
    # a document, so the first is encoded here.
    keys = sorted(_ReadAndEncode(docs, encoder, name)(0))
    packed = grain.experimental.ConcatThenSplitIterDataset(
        fields, length_struct={k: seq_len + 1 for k in keys})
    pipeline = packed.filter(_is_full).batch(local, drop_remainder=True).map(_to_batch)
    if workers:
        _absl_flags_parsed()
        pipeline = pipeline.mp_prefetch(
            grain.MultiprocessingOptions(num_workers=workers,
                                         per_worker_buffer_size=_BATCHES_AHEAD),
            worker_init_fn=_worker_init)
    else:
        pipeline = grain.experimental.ThreadPrefetchIterDataset(
            pipeline, prefetch_buffer_size=_BATCHES_AHEAD)

    def start(count: int) -> grain.IterDataset:
        del count  # Positions are grain states.
        return pipeline

    sig = _signature("stream", len(docs), keys, seq_len, batch_size, seed,
                     shuffle, num_epochs, process_index, process_count, workers)
    return BatchIterator(start, signature=sig, by_count=False, seq_len=seq_len,
                         batch_size=batch_size, local_batch_size=local)


# ----------------------------------------------------------------------------
# Entry point
# ----------------------------------------------------------------------------


def _check_settings(seq_len: int, batch_size: int, num_epochs: int | None,
                    process_index: int, process_count: int, workers: int) -> None:
    if not isinstance(seq_len, (int, np.integer)) or seq_len < 1:
        raise DataError(f"seq_len must be an int >= 1, got {seq_len!r}")
    if not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise DataError(f"batch_size must be an int >= 1, got {batch_size!r}")
    if num_epochs is not None and num_epochs < 1:
        raise DataError(f"num_epochs must be >= 1 or None, got {num_epochs!r}")
    if not isinstance(workers, (int, np.integer)) or workers < 0:
        raise DataError(f"workers must be an int >= 0, got {workers!r}")
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
    workers: int = 0,
    encoder: Encoder | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
) -> BatchIterator:
    """Builds the batch iterator for a source.

    Args:
        source: :class:`EmbeddedCorpus`, :class:`TextFiles`, :class:`TfdsText`,
            :class:`JsonlRecords`, :class:`Instructions` (any
            :class:`Source`) or a spec string for :func:`source_from_spec`.
        tokenizer: Tokenizer; defaults to :class:`ByteTokenizer`.
        seq_len: Length of ``inputs`` and ``targets`` rows.
        batch_size: Global batch size; each process yields
            ``batch_size // process_count`` rows.
        seed: Shuffling seed (per-epoch permutations derive from it).
        shuffle: Shuffle every epoch; use ``False`` for evaluation.
        num_epochs: Stop after this many epochs; ``None`` runs forever.
        process_index: This process; defaults to ``jax.process_index()``.
        process_count: Number of processes; defaults to ``jax.process_count()``.
        workers: grain worker processes that read, encode, pack and batch a
            streamed source (0: a thread of this process). Pre-tokenized
            sources ignore it: their batches are gathered by a thread.
        encoder: Maps a document to its per-token fields (see
            :mod:`~subspace_jax.data.encoding`: :class:`TextEncoder`,
            the default, and :class:`ExampleEncoder`, that of fine-tuning
            sources); extra fields reach the batch.
        cache_dir: Cache for tokenized embedded/local data; defaults to
            :func:`~subspace_jax.cache.default_cache_dir`.

    Returns:
        A :class:`BatchIterator` of ``{"inputs", "targets", ...}`` int32
        arrays of shape ``(batch_size // process_count, seq_len)``; those of
        a fine-tuning source also hold ``"segment_ids"`` and ``"loss_mask"``.

    Raises:
        DataError: On settings or data that cannot work; the message says
            what to change.
    """
    if isinstance(source, str):
        source = source_from_spec(source)
    if not isinstance(source, Source):
        raise DataError(f"unsupported source {source!r}; use EmbeddedCorpus, "
                        "TextFiles, TfdsText or a spec string")
    tokenizer = tokenizer if tokenizer is not None else ByteTokenizer()
    if process_index is None and process_count is None:
        import jax  # pylint: disable=import-outside-toplevel
        process_index, process_count = jax.process_index(), jax.process_count()
    elif process_index is None or process_count is None:
        raise DataError("give both process_index and process_count, or neither "
                        "(then jax.process_index()/process_count() are used)")
    _check_settings(seq_len, batch_size, num_epochs, process_index,
                    process_count, workers)
    common = dict(seq_len=seq_len, batch_size=batch_size, seed=seed,
                  shuffle=shuffle, num_epochs=num_epochs,
                  process_index=process_index, process_count=process_count,
                  name=source.name)
    docs = source.open()
    if getattr(source, "examples", False):
        pad_id = getattr(tokenizer, "pad_id", None)
        return _example_iterator(
            docs, encoder or ExampleEncoder(tokenizer, max_tokens=seq_len + 1),
            pad_id=tokenizer.eos_id if pad_id is None else pad_id, **common)
    if source.streaming:
        return _stream_iterator(docs, encoder or TextEncoder(tokenizer),
                                workers=int(workers), **common)
    if encoder is None:
        stream = _cached_stream(docs, tokenizer, source.name, cache_dir)
    else:
        stream = tokenize_documents(docs, encoder, name=source.name)
    return _window_iterator(stream, **common)
