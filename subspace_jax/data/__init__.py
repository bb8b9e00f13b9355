"""The input pipeline: sources of documents and fine-tuning examples,
tokenizers, encoding, packing, the grain pipelines and their caches.

Data flows one way: a source's documents (or records) are encoded by a
tokenizer into per-token arrays, packed into rows, and batched by the grain
pipeline (:func:`subspace_jax.data.pipeline.make_iterator`). Nothing here
knows the model or the optimizer.
"""
