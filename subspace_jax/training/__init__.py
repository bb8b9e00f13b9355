"""Training utilities: data pipeline, tokenizers and (later) the training loop."""
