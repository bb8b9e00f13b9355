"""Fine-tune a pretrained LLaMA with AdamW, GaLore, GoLore or RSO.

The ``subspace-jax finetune`` command, as a script. With no arguments it
fine-tunes a tiny random LLaMA (written on the fly, no download) on an
instruction set made from the embedded corpus; from a real checkpoint:

  python examples/finetune_llama.py --init-from path/to/llama-or.gguf \\
      --data jsonl:train.jsonl --seq-len 2048 --export-hf runs/tuned

``--help`` lists every flag; the data formats are in the README.
"""

import sys

from subspace_jax.cli import main

if __name__ == "__main__":
  main(["finetune", *sys.argv[1:]])
