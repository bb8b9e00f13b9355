"""A training run from its settings: the run configuration and its checks,
the loop (data, steps, evaluation, logging, checkpoints, export), the run
lock, multi-process start-up and reporting."""
