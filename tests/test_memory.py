"""subspace_jax.plan.memory against independent byte counts."""

import doctest

import jax
import jax.numpy as jnp
import optax
import pytest

import subspace_jax as sj
from subspace_jax.plan import memory
from subspace_jax.models import llama
from subspace_jax import sharding as shd
from subspace_jax.train import step as train


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
  go = memory.estimate(p, sj.golore(rank=r, side="lean"))
  assert go.optimizer_state == low + counts
  # Std side (GoLore's default): r × max(m, n).
  std = 2 * (r * 512 * 4 + 4 * r * 256 * 2) + 2 * 256 * 4
  assert memory.estimate(p, sj.golore(rank=r)).optimizer_state == std + counts
  ga = memory.estimate(p, sj.galore(rank=r, side="lean"))
  assert ga.optimizer_state == go.optimizer_state + 512 * r * 4 + 4 * 256 * r * 2
  assert go.total == 2 * size + go.optimizer_state


def test_estimate_on_llama_7b_allocates_nothing():
  model = train.ModelDef(llama.get_config("llama_7b"))
  params = jax.eval_shape(lambda: model.init(0))
  adam = memory.estimate(params, optax.scale_by_adam())
  go = memory.estimate(params, sj.golore(rank=1024, views=llama.views()))
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


# --- breakdown -------------------------------------------------------------

def _mlp_step(tx):
  def loss(p, x):
    return jnp.mean(jnp.tanh(jnp.tanh(x @ p["w1"]) @ p["w2"]) ** 2)

  def step(params, opt_state, x):
    grads = jax.grad(loss)(params, x)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  return step


def test_breakdown_of_a_donated_step_adds_up():
  params = {
      "w1": jax.ShapeDtypeStruct((384, 512), jnp.float32),
      "w2": jax.ShapeDtypeStruct((512, 128), jnp.float32),
  }
  x = jax.ShapeDtypeStruct((64, 384), jnp.float32)
  tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(1e-3))
  opt_state = jax.eval_shape(tx.init, params)
  b = memory.breakdown(
      _mlp_step(tx), params, opt_state, x, weights=params,
      optimizer_state=opt_state, jit_kwargs={"donate_argnums": (0, 1)})
  size = (384 * 512 + 512 * 128) * 4
  assert b.weights == b.gradients == size
  assert b.optimizer_state == 2 * size + 4  # mu, nu, adam's count; clip has none
  assert b.compiled.arguments == size + b.optimizer_state + 64 * 384 * 4
  # Every output reuses a donated buffer; XLA adds the output tuple's
  # index table (one 8-byte pointer per output). What is left: the batch.
  table = 8 * len(jax.tree.leaves((params, opt_state)))
  assert b.compiled.aliased == size + b.optimizer_state
  assert b.compiled.outputs == b.compiled.aliased + table
  assert b.other == 64 * 384 * 4 + table
  assert b.weights + b.optimizer_state + b.temporaries + b.other == b.peak
  # The clip needs every gradient before any update: all live at once.
  assert b.temporaries >= b.gradients
  assert b.activations == b.temporaries - b.gradients

  # Without donation the new state is a second copy, counted in `other`.
  kept = memory.breakdown(_mlp_step(tx), params, opt_state, x, weights=params,
                          optimizer_state=opt_state)
  assert kept.other == b.other + size + b.optimizer_state
  assert kept.peak == b.peak + size + b.optimizer_state - (
      b.temporaries - kept.temporaries)


def test_breakdown_needs_to_know_the_weights():
  x = jax.ShapeDtypeStruct((8,), jnp.float32)
  with pytest.raises(ValueError, match="weights="):
    memory.breakdown(lambda a: a, x)
  b = memory.breakdown(lambda a: a * 2, x, weights=x, optimizer_state={},
                       gradients=12)
  assert (b.weights, b.gradients, b.optimizer_state) == (32, 12, 0)


@pytest.mark.parametrize("name", ["adamw", "rso"])
def test_breakdown_of_the_sharded_train_step(name):
  """Per-device bytes on an 8-way FSDP mesh match XLA's argument size."""
  if jax.device_count() < 8:
    pytest.skip("needs 8 host devices (conftest.py)")
  config = llama.get_config("tiny")
  opt = train.OptimizerConfig(name=name, rank=8)
  mesh = shd.make_mesh(data=1, fsdp=8)
  s = train.setup(config, opt, mesh)
  tokens = jax.ShapeDtypeStruct((8, 16), jnp.int32, sharding=s.batch_sharding)
  batch = {"inputs": tokens, "targets": tokens}
  b = memory.breakdown(s.train_step, s.abstract_state, batch)

  total = 4 * llama.param_count(config)
  assert memory.tree_bytes(s.abstract_state.params) == total
  # FSDP splits the 'embed' axis of every matrix 8 ways; norm scales are
  # replicated (2 per layer + the final one, 64 floats each).
  norms = (2 * config.num_layers + 1) * 64 * 4
  assert b.weights == (total - norms) // 8 + norms
  assert b.gradients == b.weights
  est = memory.estimate(s.abstract_state.params, s.tx)
  assert b.optimizer_state < est.optimizer_state
  # Arguments: the state (params, optimizer state, int32 step) and this
  # device's part of the batch (one row of 16 tokens, inputs and targets).
  assert b.compiled.arguments == b.weights + b.optimizer_state + 4 + 2 * 16 * 4
  # Not in donated buffers: batch, step; loss, grad_norm, lr (float32) and
  # the step's finite flag (a bool byte); the output tuple's index table
  # (8 bytes an output).
  outputs = len(jax.tree.leaves(s.abstract_state)) + 4
  assert b.other == 2 * 16 * 4 + 4 + 3 * 4 + 1 + 8 * outputs
  assert b.temporaries >= b.gradients
  assert b.weights + b.optimizer_state + b.temporaries + b.other == b.peak


def test_train_step_breakdown_of_a_llama():
  model = train.ModelDef(llama.get_config("tiny", scan_layers=True))
  params = jax.eval_shape(lambda: model.init(0))
  tokens = jax.ShapeDtypeStruct((4, 32), jnp.int32)
  batch = {"inputs": tokens, "targets": tokens}
  clip = optax.clip_by_global_norm(1.0)
  adam = memory.train_step_breakdown(
      model.loss, params, optax.chain(clip, optax.scale_by_adam()), batch)
  rso = memory.train_step_breakdown(
      model.loss, params,
      optax.chain(clip, sj.rso(rank=8, views=llama.views())), batch,
      compiler_options=memory.NO_LOOP_HOISTING)
  size = 4 * llama.param_count(model.config)
  for b, tx in ((adam, optax.scale_by_adam()),
                (rso, sj.rso(rank=8, views=llama.views()))):
    assert b.weights == b.gradients == size
    assert b.optimizer_state == memory.estimate(params, tx).optimizer_state
    # The batch, the loss and the output tuple's table (8 bytes an output).
    outputs = len(jax.tree.leaves((params, jax.eval_shape(tx.init, params))))
    assert b.other == 2 * 4 * 32 * 4 + 4 + 8 * (outputs + 1)
    assert b.temporaries >= b.gradients
  assert rso.optimizer_state < adam.optimizer_state



def test_docstring_examples():
  result = doctest.testmod(memory, optionflags=doctest.ELLIPSIS)
  assert result.attempted >= 10 and result.failed == 0
