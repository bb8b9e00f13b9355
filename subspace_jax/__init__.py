"""subspace_jax: memory-efficient LLM training by low-rank subspace optimization.

GaLore, GoLore and RSO as composable ``optax.GradientTransformation``\\ s::

  import optax, subspace_jax as sj
  tx = optax.chain(
      sj.golore(rank=128, update_gap=200),
      optax.add_decayed_weights(0.1),
      optax.scale_by_learning_rate(1e-3),
  )
"""

import importlib.metadata

from subspace_jax import libtpu

libtpu.skip_runtime()  # Before JAX starts its backends (see libtpu.py).

# pylint: disable=wrong-import-position
from subspace_jax import factored, matrix_view, projection, transform
from subspace_jax.plan import memory
from subspace_jax.matrix_view import MatrixView, default_view, views_by_path
from subspace_jax.transform import (
    SubspaceState,
    galore,
    golore,
    rso,
    scale_by_subspace,
)

try:
  __version__ = importlib.metadata.version("subspace_jax")
except importlib.metadata.PackageNotFoundError:  # Run from a source tree.
  __version__ = "unknown"

__all__ = [
    "MatrixView",
    "SubspaceState",
    "default_view",
    "factored",
    "galore",
    "golore",
    "matrix_view",
    "memory",
    "projection",
    "rso",
    "scale_by_subspace",
    "transform",
    "views_by_path",
]
