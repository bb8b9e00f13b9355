"""``python -m subspace_jax COMMAND ...``: the ``subspace-jax`` command."""

from subspace_jax.cli import main

main()
