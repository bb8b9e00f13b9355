"""The ``subspace-jax`` command line."""
