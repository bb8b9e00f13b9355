"""Sharded init and update on 8 host devices (see conftest.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

import subspace_jax as sj


def _mesh():
  if jax.device_count() < 8:
    pytest.skip("needs XLA_FLAGS=--xla_force_host_platform_device_count=8")
  # Auto axes: shardings given to jax.jit and propagated by XLA (jax.jit
  # with shardings, what used to be pjit).
  return jax.make_mesh((2, 4), ("data", "model"), axis_types=(AxisType.Auto,) * 2)


def _spec(x):
  """Last axis over 'model', the one before over 'data', where they divide."""
  if x.ndim == 0:
    return P()
  axes = [None] * x.ndim
  if x.shape[-1] % 4 == 0:
    axes[-1] = "model"
  if x.ndim >= 2 and x.shape[-2] % 2 == 0:
    axes[-2] = "data"
  return P(*axes)


@pytest.mark.parametrize(
    "make",
    [
        lambda: sj.galore(rank=4, update_gap=2),
        lambda: sj.galore(rank=4, update_gap=2, svd="randomized"),
        lambda: sj.golore(rank=4, update_gap=2),
        lambda: sj.rso(rank=4, update_gap=2, eta=1.0),
    ],
    ids=["galore", "galore-randomized", "golore", "rso"],
)
def test_init_and_update_keep_given_shardings(make):
  mesh = _mesh()
  k = jax.random.key(0)
  params = {
      "w": jax.random.normal(k, (16, 32)),
      "stacked": jax.random.normal(k, (2, 24, 8)),
      "b": jnp.ones(8),
  }
  grads = jax.tree.map(lambda x: jax.random.normal(jax.random.key(1), x.shape), params)
  tx = make()
  shard = lambda x: NamedSharding(mesh, _spec(x))
  state_sh = jax.tree.map(shard, jax.eval_shape(tx.init, params))
  params_sh = jax.tree.map(shard, params)
  p = jax.device_put(params, params_sh)
  g = jax.device_put(grads, params_sh)

  state = jax.jit(tx.init, out_shardings=state_sh)(p)
  update = jax.jit(tx.update)  # no out_shardings: propagation must keep them
  ref_state = tx.init(params)
  for step in range(3):
    u, state = update(g, state, p)
    ref_u, ref_state = tx.update(grads, ref_state, params)
    for leaf, sh in zip(jax.tree.leaves(state), jax.tree.leaves(state_sh)):
      assert leaf.sharding.is_equivalent_to(sh, leaf.ndim), (step, leaf.shape, leaf.sharding, sh)
    for a, b in zip(jax.tree.leaves(u), jax.tree.leaves(ref_u)):
      # Sharded reductions add in another order: float32 rounding only.
      np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-4)
