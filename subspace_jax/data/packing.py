"""Fine-tuning examples packed into rows of whole examples.

A fine-tuning source's examples (:class:`~subspace_jax.data.sources.Record`,
which :class:`~subspace_jax.data.encoding.ExampleEncoder` makes
``[BOS] + prompt + response + [EOS]`` with a ``"loss_mask"`` on the
response) are packed example by example rather than cut into windows: an
example of ``n`` tokens gives ``n - 1`` (input, target) pairs, and whole
examples share a row side by side with ``"segment_ids"`` 1, 2, ... (0 and a
zero loss mask on the padding at the end of the row), so that the model
attends within each example only (:class:`_GatherRows`). An example is
never split, unless it is longer than a row (more than ``seq_len + 1``
tokens: the encoder refuses such a prompt/response pair, naming its file
and line; a longer text is cut into pieces of ``seq_len + 1`` tokens that
share one token, so each of its tokens is a target once, and each piece is
packed as an example: :func:`_pieces`). The pieces fill the rows best-fit
decreasing (:func:`pack_examples`). The examples are packed once; the
pipeline (:mod:`~subspace_jax.data.pipeline`) shuffles the rows anew every
epoch and batches them as the windows of pre-tokenized data.

Usage::

    pack_examples([6, 4, 4, 3], capacity=8)    # [[0], [1, 2], [3]]
"""

from __future__ import annotations

import bisect
from collections.abc import Mapping, Sequence
from typing import NamedTuple

import numpy as np

__all__ = ["PackingStats", "pack_examples"]


class PackingStats(NamedTuple):
    """How a fine-tuning source's examples were packed.

    Attributes:
        examples: Examples read.
        pieces: Pieces packed (an example longer than a row gives several).
        rows: Rows of ``seq_len`` they fill.
        fill: Fraction of the rows' positions that hold a (input, target)
            pair of an example rather than padding.
    """

    examples: int
    pieces: int
    rows: int
    fill: float


def pack_examples(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Packs items of the given lengths into as few rows as it can.

    Best-fit decreasing: the items, longest first (ties by index), each go
    to the fullest row that still has room, or to a new row. Every item is
    in exactly one row, whole; rows are ordered by their smallest item
    index, items in a row by index.

    Args:
        lengths: Each item's length, ``0 < length <= capacity``.
        capacity: The length of a row.

    Returns:
        The item indices of every row.

    Raises:
        ValueError: If an item does not fit a row.
    """
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (room left, row), sorted.
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        n = int(lengths[i])
        if not 0 < n <= capacity:
            raise ValueError(f"item {i} has length {n}, not in [1, {capacity}]")
        k = bisect.bisect_left(free, (n, -1))
        if k < len(free):
            room, row = free.pop(k)
            rows[row].append(i)
        else:
            room, row = capacity, len(rows)
            rows.append([i])
        if room > n:
            bisect.insort(free, (room - n, row))
    return sorted((sorted(row) for row in rows), key=lambda row: row[0])


def _pieces(lengths: Sequence[int], seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """The pieces examples of these token counts are packed as: an example
    of at most ``seq_len + 1`` tokens is one piece; a longer one is cut into
    pieces of ``seq_len + 1`` tokens that share one token with the next (so
    each of its targets is in one piece), the last one shorter. Pieces of one
    token (no target) are left out.

    Returns:
        The pieces' first tokens (offsets in the concatenated examples) and
        their token counts, in example order.
    """
    starts, sizes, offset = [], [], 0
    for n in lengths:
        for first in range(0, max(n - 1, 0), seq_len):
            starts.append(offset + first)
            sizes.append(min(seq_len + 1, n - first))
        offset += n
    return np.asarray(starts, np.int64), np.asarray(sizes, np.int64)


class _GatherRows:
    """A batch of row indices to its batch of packed examples."""

    def __init__(self, stream: Mapping[str, np.ndarray], starts: np.ndarray,
                 sizes: np.ndarray, rows: list[list[int]], seq_len: int,
                 pad_id: int):
        self._stream, self._starts, self._sizes = stream, starts, sizes
        self._offsets = np.cumsum([0] + [len(r) for r in rows])
        self._pieces = np.asarray([p for r in rows for p in r], np.int64)
        self._seq_len, self._pad_id = seq_len, pad_id

    def __call__(self, index: np.ndarray) -> dict[str, np.ndarray]:
        shape = (len(index), self._seq_len)
        tokens = self._stream["tokens"]
        extra = {k: v for k, v in self._stream.items() if k != "tokens"}
        batch = {"inputs": np.full(shape, self._pad_id, np.int32),
                 "targets": np.full(shape, self._pad_id, np.int32),
                 "segment_ids": np.zeros(shape, np.int32),
                 **{k: np.zeros(shape, v.dtype) for k, v in extra.items()}}
        for b, row in enumerate(np.asarray(index)):
            at = 0
            pieces = self._pieces[self._offsets[row]:self._offsets[row + 1]]
            for segment, piece in enumerate(pieces, 1):
                start, pairs = self._starts[piece], self._sizes[piece] - 1
                span = slice(at, at + pairs)
                batch["inputs"][b, span] = tokens[start:start + pairs]
                batch["targets"][b, span] = tokens[start + 1:start + 1 + pairs]
                batch["segment_ids"][b, span] = segment
                for key, value in extra.items():
                    batch[key][b, span] = value[start + 1:start + 1 + pairs]
                at += pairs
        return batch
