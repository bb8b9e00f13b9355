"""Tests of subspace_jax.models.generation.generate: the cached
loop against greedy decoding with the full forward pass, ragged batches,
stops, sampling, model-mode parameters and compilation per shape."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from reference_llama import numpy_forward
from subspace_jax import factored
from subspace_jax.models import generation, llama

CFG = llama.get_config("tiny", num_kv_heads=2, max_seq_len=96)


def _params(cfg, seed=0):
  """Weights scaled up so that greedy continuations vary (a random tiny
  model at init_std 0.02 would repeat one token)."""
  params = llama.ModelDef(cfg).init(seed)
  return jax.tree.map(lambda x: x * 20 if x.ndim >= 2 else x, params)


def _greedy_reference(cfg, params, prompt, n):
  """Greedy decoding with the float64 NumPy LLaMA: the whole sequence
  through the model for every new token."""
  seq = list(prompt)
  for _ in range(n):
    logits = numpy_forward(params, np.asarray([seq]), cfg)
    seq.append(int(np.argmax(logits[0, -1])))
  return seq


@pytest.mark.parametrize("scan", [False, True])
def test_cached_greedy_equals_the_reference_for_a_ragged_batch(scan):
  cfg = dataclasses.replace(CFG, scan_layers=scan)
  params = _params(cfg)
  prompts = [[5, 9, 2, 77, 31], [100], [7, 8, 9, 10, 11, 12, 13, 14, 15, 16]]
  got = generation.generate(cfg, params, prompts, 12)
  for prompt, out in zip(prompts, got):
    want = _greedy_reference(cfg, params, prompt, 12)
    assert out.tolist() == want
  # One prompt in, one array out; and the cache-free baseline agrees.
  single = generation.generate(cfg, params, prompts[0], 12)
  assert single.tolist() == got[0].tolist()
  plain = generation.generate(cfg, params, prompts, 12, use_cache=False)
  assert [p.tolist() for p in plain] == [g.tolist() for g in got]


def test_rows_stop_at_their_stop_id_and_keep_it():
  params = _params(CFG)
  prompts = [[5, 9, 2], [40, 41]]
  free = generation.generate(CFG, params, prompts, 10)
  stop = int(free[0][5])  # The third new token of row 0.
  got = generation.generate(CFG, params, prompts, 10, stop_ids=[stop, 255])
  first = free[0].tolist().index(stop, 3)
  assert got[0].tolist() == free[0][:first + 1].tolist()
  other = free[1].tolist()
  ends = [i for i, t in enumerate(other) if i >= 2 and t in (stop, 255)]
  assert got[1].tolist() == (other[:ends[0] + 1] if ends else other)


def test_sampling_is_reproducible_and_top_p_near_zero_is_greedy():
  params = _params(CFG)
  key = jax.random.key(3)
  a = generation.generate(CFG, params, [1, 2, 3], 16, temperature=1.0, key=key)
  b = generation.generate(CFG, params, [1, 2, 3], 16, temperature=1.0, key=key)
  c = generation.generate(CFG, params, [1, 2, 3], 16, temperature=1.0,
                     key=jax.random.key(4))
  greedy = generation.generate(CFG, params, [1, 2, 3], 16)
  assert a.tolist() == b.tolist() and a.tolist() != c.tolist()
  assert a.tolist() != greedy.tolist()
  narrow = generation.generate(CFG, params, [1, 2, 3], 16, temperature=1.0,
                          top_p=1e-6, key=key)
  assert narrow.tolist() == greedy.tolist()


def test_model_mode_kernels_generate_as_the_merged_weights():
  """Factored kernels (W and B, P drawn from the key) and the merged
  W + P·B give the same tokens."""
  cfg = dataclasses.replace(CFG, scan_layers=True)
  weights = _params(cfg)
  sub = factored.Subspace.for_params(weights, rank=8, update_gap=10,
                                     views=llama.views())
  params = sub.init(weights)
  low = jax.tree.map(
      lambda b: jax.random.normal(jax.random.key(1), b.shape, b.dtype) * 0.5,
      params.low)
  params = factored.FactoredParams(params.weights, low)
  state = factored.FactoredState(jnp.zeros([], jnp.int32),
                                 jax.random.key_data(jax.random.key(0)), (), ())
  keys = sub.keys(state)
  fact = sub.factored(params, sub.trainable(params), keys)
  merged = sub.merged_weights(params, state)
  a = generation.generate(cfg, fact, [3, 1, 4, 1, 5], 10)
  b = generation.generate(cfg, merged, [3, 1, 4, 1, 5], 10)
  plain = generation.generate(cfg, weights, [3, 1, 4, 1, 5], 10)
  assert a.tolist() == b.tolist() and a.tolist() != plain.tolist()


def test_one_compilation_per_shape_bucket():
  params = _params(CFG)
  generation._run.clear_cache()  # pylint: disable=protected-access
  for prompt in ([1, 2, 3], [1, 2, 3, 4, 5, 6, 7], [9] * 20):
    generation.generate(CFG, params, prompt, 5)
  # The three prompts round up to one 32-token bucket, the cache to 64.
  assert generation._run._cache_size() == 1  # pylint: disable=protected-access
  generation.generate(CFG, params, [9] * 40, 5)
  assert generation._run._cache_size() == 2  # pylint: disable=protected-access


@pytest.mark.parametrize("kwargs,words", [
    (dict(prompt_tokens=[]), "non-empty prompts"),
    (dict(max_new_tokens=0), "max_new_tokens must be an int >= 1"),
    (dict(temperature=0.5), "needs a key"),
    (dict(top_p=0.0), "top_p must be in"),
    (dict(prompt_tokens=[300]), r"prompt ids must be in \[0, 256\)"),
    (dict(max_new_tokens=95), "exceed the model's max_seq_len 96"),
])
def test_bad_arguments_are_refused(kwargs, words):
  args = dict(prompt_tokens=[1, 2], max_new_tokens=4)
  args.update(kwargs)
  with pytest.raises(ValueError, match=words):
    generation.generate(CFG, _params(CFG), args.pop("prompt_tokens"),
                   args.pop("max_new_tokens"), **args)
