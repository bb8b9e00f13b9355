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
