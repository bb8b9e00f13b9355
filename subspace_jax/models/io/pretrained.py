"""Any pretrained checkpoint this library reads, by what the path is: a
Hugging Face directory (:mod:`~subspace_jax.models.io.hf`) or a ``.gguf``
file (:mod:`~subspace_jax.models.io.gguf`, dequantized)."""

from __future__ import annotations

import os
from typing import Any

from subspace_jax.models import llama
from subspace_jax.models.io import gguf, hf

__all__ = ["is_gguf", "load", "read_config"]


def is_gguf(path: str | os.PathLike[str]) -> bool:
  """Whether ``path`` names a GGUF file (by its suffix)."""
  return str(path).lower().endswith(gguf.SUFFIX)


def read_config(path: str | os.PathLike[str],
                **overrides: Any) -> llama.LlamaConfig:
  """:func:`gguf.read_config <subspace_jax.models.io.gguf.read_config>` of a
  ``.gguf`` file, else :func:`hf.read_config
  <subspace_jax.models.io.hf.read_config>` of a directory."""
  reader = gguf.read_config if is_gguf(path) else hf.read_config
  return reader(path, **overrides)


def load(path: str | os.PathLike[str], mesh: Any = None, **overrides: Any):
  """``(config, params)`` by :func:`gguf.load
  <subspace_jax.models.io.gguf.load>` of a ``.gguf`` file, else by
  :func:`hf.load <subspace_jax.models.io.hf.load>` of a directory."""
  loader = gguf.load if is_gguf(path) else hf.load
  return loader(path, mesh=mesh, **overrides)
