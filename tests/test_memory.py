"""subspace_jax.memory against independent byte counts."""

import jax
import jax.numpy as jnp
import optax

import subspace_jax as sj
from subspace_jax import memory
from subspace_jax.models import llama
from subspace_jax.training import train


def _params():
  return {
      "tall": jax.ShapeDtypeStruct((512, 128), jnp.float32),
      "stacked": jax.ShapeDtypeStruct((4, 96, 256), jnp.bfloat16),
      "bias": jax.ShapeDtypeStruct((256,), jnp.float32),
  }


def test_estimate_matches_formula():
  p = _params()
  size = 512 * 128 * 4 + 4 * 96 * 256 * 2 + 256 * 4
  adam = memory.estimate(p, optax.scale_by_adam())
  assert adam.weights == adam.gradients == size
  assert adam.optimizer_state == 2 * size + 4  # mu, nu and an int32 count
  r = 16
  # Lean side: r × min(m, n) moments in each leaf's dtype.
  low = 2 * (r * 128 * 4 + 4 * r * 96 * 2) + 2 * 256 * 4
  counts = 4 + 2 * 4 + 8  # subspace count, two inner counts, a 2×uint32 key
  go = memory.estimate(p, sj.golore(rank=r))
  assert go.optimizer_state == low + counts
  ga = memory.estimate(p, sj.galore(rank=r))
  assert ga.optimizer_state == go.optimizer_state + 512 * r * 4 + 4 * 256 * r * 2
  assert go.total == 2 * size + go.optimizer_state


def test_estimate_on_llama_7b_allocates_nothing():
  model = train.ModelDef(llama.get_config("llama_7b"))
  params = jax.eval_shape(lambda: model.init(0))
  adam = memory.estimate(params, optax.scale_by_adam())
  go = memory.estimate(params, sj.golore(rank=1024, views=train.llama_views()))
  assert adam.weights == 4 * llama.param_count(model.config)
  assert adam.optimizer_state > 2 * adam.weights
  assert go.optimizer_state < 0.45 * adam.optimizer_state


def test_compiled_memory_of_a_known_function():
  x = jax.ShapeDtypeStruct((1000, 250), jnp.float32)
  m = memory.compiled(lambda a: a * 2.0, x)
  assert m.arguments == m.outputs == 1000 * 250 * 4
  donated = memory.compiled(lambda a: a * 2.0, x, jit_kwargs={"donate_argnums": 0})
  assert donated.aliased == 1000 * 250 * 4
  assert donated.peak == donated.arguments + donated.temporaries
