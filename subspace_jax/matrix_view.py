"""Which leaves are projected, and how an N-D leaf is seen as a matrix.

A leaf of shape ``batch + rows + cols`` is viewed as a stack of
``prod(rows) × prod(cols)`` matrices, one per index of the leading ``batch``
axes (the stacked layers of a scanned model: each slice gets its own
projection). :class:`MatrixView` says how many axes fall in each group.

The *side rule* picks which of the two matrix dimensions is projected:

* ``"lean"`` – project the larger dimension, so the projected gradient and the
  inner optimizer state are ``r × min(m, n)`` (ties: the rows). This is what
  ``optax.contrib.scale_by_galore`` does, and the default here.
* ``"std"`` – project the smaller dimension, so the state is
  ``r × max(m, n)`` (ties: the columns), as in the GaLore paper and its
  official code.
* ``"left"`` / ``"right"`` – always the rows / always the columns. For a Flax
  kernel ``(in, out)``, ``"left"`` projects the input dimension, as a layer
  computing ``y = x W + (x P) B`` does.

Internally the projected dimension is always moved to the rows, so every
projected gradient has shape ``batch + (rank, k)`` with ``k`` the kept
dimension, and the projection has shape ``batch + (d, rank)``.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp

__all__ = [
    "MatrixView",
    "LeafPlan",
    "ViewFn",
    "SIDES",
    "default_view",
    "views_by_path",
    "path_str",
    "plan_leaf",
]

SIDES = ("lean", "std", "left", "right")


class MatrixView(NamedTuple):
  """How a leaf is seen as a (stack of) matrices.

  Attributes:
    batch_dims: Number of leading axes that index independent matrices
      (e.g. 1 for the ``(layers, in, out)`` kernel of a scanned model).
    row_dims: Number of axes after the batch axes that form the rows; the
      remaining axes form the columns. For a Flax attention kernel
      ``(embed, heads, head_dim)`` use ``row_dims=1``; for its output kernel
      ``(heads, head_dim, embed)`` use ``row_dims=2``.
  """

  batch_dims: int = 0
  row_dims: int = 1


# (path, leaf) -> MatrixView, or None for "give this leaf to the inner
# transform in full".
ViewFn = Callable[[Any, jax.Array], "MatrixView | None"]


def default_view(path: Any, leaf: jax.Array) -> MatrixView | None:
  """Default rule: vectors and scalars stay full; for ``ndim >= 2`` the last
  two axes are the matrix and any leading axes are batch (stacked layers)."""
  del path
  if leaf.ndim < 2:
    return None
  return MatrixView(batch_dims=leaf.ndim - 2, row_dims=1)


def path_str(path: Any) -> str:
  """A ``/``-joined string for a ``jax.tree_util`` key path.

  The one path name of the package: dict keys, attribute (NamedTuple field)
  names and sequence indices joined by ``/`` (``opt_state/1/mu/embed/...``),
  as Orbax names a checkpoint's arrays. A path of plain strings and ints
  (``nnx.to_flat_state``) is joined the same way.
  """
  return jax.tree_util.keystr(tuple(path), simple=True, separator="/")


def views_by_path(
    rules: Sequence[tuple[str, MatrixView | None]],
    default: ViewFn = default_view,
) -> ViewFn:
  """A view function from ``(regex, view)`` rules on the leaf's path string.

  The first rule whose regex ``re.search``-es the path (keys joined by
  ``/``, see :func:`path_str`) decides; ``None`` keeps the leaf full. Leaves
  matching no rule go to ``default``.

  Example::

    views = sj.views_by_path([
        (r"embed|lm_head", None),                  # full Adam
        (r"attn/o/kernel", sj.MatrixView(0, 2)),   # (heads, hd, embed)
    ])
  """
  compiled = [(re.compile(pattern), view) for pattern, view in rules]

  def view_fn(path, leaf):
    s = path_str(path)
    for pattern, view in compiled:
      if pattern.search(s):
        return view
    return default(path, leaf)

  return view_fn


def _projects_rows(rows: int, cols: int, side: str) -> bool:
  if side == "left":
    return True
  if side == "right":
    return False
  if side == "lean":
    return rows >= cols
  if side == "std":
    return rows < cols
  raise ValueError(f"side must be one of {SIDES}, got {side!r}")


@dataclasses.dataclass(frozen=True)
class LeafPlan:
  """Static description of how one leaf is projected.

  Attributes:
    shape: The leaf's shape.
    batch_shape: Shape of the leading batch axes.
    rows: Rows of the matrix view.
    cols: Columns of the matrix view.
    transpose: True when the columns are the projected dimension.
    rank: Effective rank, ``min(rank, rows, cols)``.
    view: The leaf's :class:`MatrixView`.
  """

  shape: tuple[int, ...]
  batch_shape: tuple[int, ...]
  rows: int
  cols: int
  transpose: bool
  rank: int
  view: MatrixView = MatrixView()

  @property
  def dim(self) -> int:
    """Size of the projected dimension."""
    return self.cols if self.transpose else self.rows

  @property
  def kept(self) -> int:
    """Size of the dimension that is kept."""
    return self.rows if self.transpose else self.cols

  @property
  def low_shape(self) -> tuple[int, ...]:
    """Shape of the projected gradient (and of the inner state for it)."""
    return self.batch_shape + (self.rank, self.kept)

  @property
  def projection_shape(self) -> tuple[int, ...]:
    return self.batch_shape + (self.dim, self.rank)

  @property
  def num_matrices(self) -> int:
    return math.prod(self.batch_shape)

  def state_axes(
      self, names: Sequence[Any]
  ) -> tuple[tuple[Any, ...], tuple[Any, ...]]:
    """Per-axis names of the projected gradient and of the projection.

    Given the names of the leaf's axes (e.g. logical axis names for
    sharding), returns ``(low_names, projection_names)`` for arrays of shape
    :attr:`low_shape` and :attr:`projection_shape`. Both are named like the
    leaf's matrix view ``(dim, kept)``, the rank axis standing in for the
    dimension it shrinks: ``(dim's name, kept's name)`` for the ``r × kept``
    array and for the ``dim × r`` projection. So a sharding rule puts them
    on the mesh axes of the leaf itself (the rank axis where that divides
    it). Batch axes keep their names; a group of merged axes gets None.
    """
    b, r = self.view.batch_dims, self.view.row_dims
    if len(names) != len(self.shape):
      raise ValueError(f"{len(names)} axis names for shape {self.shape}")
    rows, cols = tuple(names[b : b + r]), tuple(names[b + r :])
    one = lambda group: group[0] if len(group) == 1 else None
    kept, proj = (rows, cols) if self.transpose else (cols, rows)
    batch = tuple(names[:b])
    matrix = batch + (one(proj), one(kept))
    return matrix, matrix

  def to_matrix(self, x: jax.Array) -> jax.Array:
    """``shape`` → ``batch + (dim, kept)``: the projected dimension first."""
    x = x.reshape(self.batch_shape + (self.rows, self.cols))
    return jnp.swapaxes(x, -1, -2) if self.transpose else x

  def from_matrix(self, x: jax.Array) -> jax.Array:
    """Inverse of :meth:`to_matrix`."""
    if self.transpose:
      x = jnp.swapaxes(x, -1, -2)
    return x.reshape(self.shape)


def plan_leaf(
    path: Any, leaf: jax.Array, view_fn: ViewFn, rank: int, side: str
) -> LeafPlan | None:
  """The :class:`LeafPlan` of one leaf, or None if it is not projected.

  The rank is clipped to the matrix: ``min(rank, rows, cols)`` (the rule
  ``optax.contrib.scale_by_galore`` uses).

  Raises:
    TypeError: for a leaf that is not a floating-point array.
    ValueError: for a view that does not fit the leaf.
  """
  dtype = jnp.result_type(leaf)
  if not jnp.issubdtype(dtype, jnp.floating):
    raise TypeError(
        f"leaf {path_str(path)!r} has dtype {dtype}: subspace transforms "
        "need floating-point parameters; keep integer leaves out of the "
        "optimized tree (e.g. with optax.partition or optax.masked)."
    )
  view = view_fn(path, leaf)
  if view is None:
    return None
  shape = tuple(leaf.shape)
  b, r = view.batch_dims, view.row_dims
  if b < 0 or r < 1 or b + r >= len(shape):
    raise ValueError(
        f"leaf {path_str(path)!r} of shape {shape}: {view} leaves no axis for "
        "rows or columns (need batch_dims >= 0, row_dims >= 1 and "
        "batch_dims + row_dims < ndim)."
    )
  rows = math.prod(shape[b : b + r])
  cols = math.prod(shape[b + r :])
  return LeafPlan(
      shape=shape,
      batch_shape=shape[:b],
      rows=rows,
      cols=cols,
      transpose=not _projects_rows(rows, cols, side),
      rank=min(rank, rows, cols),
      view=view,
  )
