"""Chat with, or complete text from, a LLaMA checkpoint.

The ``subspace-jax generate`` command, as a script:

  python examples/generate.py --init-from runs/tuned/hf --prompt "What is 2 + 3?"
  python examples/generate.py --init-from model.gguf --prompt "Once upon" --no-chat
"""

import sys

from subspace_jax.cli import main

if __name__ == "__main__":
  main(["generate", *sys.argv[1:]])
