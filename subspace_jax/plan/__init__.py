"""Memory before training: the optimizer state's exact bytes, a step's
compiled memory and collectives, compile targets (cpu, gpu, compile-only
TPU) and a run's step compiled for one (``--compile-for``)."""
