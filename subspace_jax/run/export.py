"""What an exported Hugging Face directory needs beside the weights: the
chat template and the generation config.

:func:`~subspace_jax.run.loop.train` writes the weights and
``config.json`` (:func:`subspace_jax.models.io.hf.save`) and copies the
tokenizer's files; :func:`add_chat_files` then adds ``chat_template.jinja``
and ``generation_config.json`` from the tokenizer's directory or the
``--init-from`` checkpoint (a ``generation_config.json`` made from the
tokenizer's ids when neither has one), so that transformers'
``apply_chat_template`` and ``generate`` work on the export as on the
source. Each file is written under a temporary name and renamed into
place.
"""

from __future__ import annotations

import json
import os
import pathlib
from typing import Any

from subspace_jax import atomic

__all__ = ["CHAT_FILES", "add_chat_files"]

CHAT_FILES = ("chat_template.jinja", "generation_config.json")


def add_chat_files(out_dir: str | os.PathLike[str], tokenizer: Any,
                   init_from: str | None) -> list[str]:
  """Adds :data:`CHAT_FILES` to an exported directory.

  Args:
    out_dir: The export.
    tokenizer: The run's tokenizer (its ``model_path``'s directory is
      looked in first).
    init_from: The checkpoint the run started from (a directory is looked
      in next).

  Returns:
    The names of the files written.
  """
  out = pathlib.Path(out_dir)
  places = []
  model_path = getattr(tokenizer, "model_path", None)
  if model_path is not None:
    places.append(pathlib.Path(model_path).parent)
  if init_from is not None and os.path.isdir(init_from):
    places.append(pathlib.Path(init_from))
  written = []
  for name in CHAT_FILES:
    found = next((p / name for p in places if (p / name).is_file()), None)
    if found is not None:
      data = found.read_bytes()
    elif name == "generation_config.json":
      stops = list(getattr(tokenizer, "stop_ids", None) or [tokenizer.eos_id])
      content = {"_from_model_config": False,
                 "bos_token_id": getattr(tokenizer, "bos_id", None),
                 "eos_token_id": stops[0] if len(stops) == 1 else stops,
                 "pad_token_id": getattr(tokenizer, "pad_id", None)}
      data = (json.dumps({k: v for k, v in content.items() if v is not None},
                         indent=2) + "\n").encode()
    elif getattr(tokenizer, "chat_template", None):
      data = tokenizer.chat_template.encode("utf-8")
    else:
      continue
    atomic.write_bytes(out / name, data)
    written.append(name)
  return written
