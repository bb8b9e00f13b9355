"""Pretrain a LLaMA with AdamW, GaLore, GoLore or RSO.

The ``subspace-jax pretrain`` command, as a script. With no arguments it
trains the tiny model on the corpus shipped with the package (byte
tokenizer, no download) in well under a minute on a laptop CPU:

  python examples/pretrain_llama.py
  python examples/pretrain_llama.py --optimizer rso --subspace-mode model
  python examples/pretrain_llama.py --help

The same run from Python::

  from subspace_jax.run import RunConfig, train
  from subspace_jax.train.optimizer import OptimizerConfig
  summary = train(RunConfig(optimizer=OptimizerConfig(name="golore"),
                            steps=600, checkpoint_dir="runs/demo/ckpt"))
"""

import sys

from subspace_jax.cli import main

if __name__ == "__main__":
  main(["pretrain", *sys.argv[1:]])
