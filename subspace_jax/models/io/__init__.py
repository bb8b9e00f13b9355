"""Pretrained checkpoints in and out: Hugging Face directories
(:mod:`~subspace_jax.models.io.hf`, safetensors files through
:mod:`~subspace_jax.models.io.safetensors`) and GGUF files
(:mod:`~subspace_jax.models.io.gguf`)."""
