"""A training run from its settings: the run configuration and its checks,
the loop (data, steps, evaluation, logging, checkpoints, export), the run
lock, multi-process start-up and reporting::

    from subspace_jax.run import RunConfig, train
    summary = train(RunConfig(model="tiny", steps=200))
"""

from subspace_jax.run.config import RunConfig
from subspace_jax.run.loop import train

__all__ = ["RunConfig", "train"]
