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


def _fsdp_mesh():
  if jax.device_count() < 8:
    pytest.skip("needs XLA_FLAGS=--xla_force_host_platform_device_count=8")
  return jax.make_mesh((8,), ("fsdp",), axis_types=(AxisType.Auto,))


@pytest.mark.parametrize("make", [sj.golore, sj.rso], ids=["golore", "rso"])
def test_transform_under_fsdp_moves_only_rank_sized_arrays(make):
  """With the parameters' shardings, a leaf split along its projected
  dimension exchanges per matrix one reduction of ``PᵀG`` (``r × k``) and
  one gather of the update (``r × k``), and a leaf split along the dimension
  it keeps exchanges nothing; the updates are those of the unsharded
  transform. Without the shardings XLA split each draw of ``P`` into small
  collectives and all-reduced the back-projection (``d × k``, in float32)."""
  mesh = _fsdp_mesh()
  layers, r = 3, 8
  params = {
      "rows": jax.random.normal(jax.random.key(0), (layers, 64, 24)),  # P on 64, split
      "cols": jax.random.normal(jax.random.key(1), (layers, 16, 80)),  # P on 80, 16 split
      "b": jnp.ones(24),
  }
  spec = {"rows": P(None, "fsdp", None), "cols": P(None, "fsdp", None), "b": P()}
  shardings = jax.tree.map(lambda s: NamedSharding(mesh, s), spec)
  grads = jax.tree.map(lambda x: jax.random.normal(jax.random.key(2), x.shape), params)
  # "lean": the larger dimension is projected (64 and 80 above).
  tx = make(rank=r, update_gap=2, side="lean", shardings=shardings)
  ref = make(rank=r, update_gap=2, side="lean")
  update = jax.jit(tx.update)
  abstract = jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
      grads, shardings)
  hlo = update.lower(abstract, jax.eval_shape(tx.init, params)).compile()
  c = sj.memory.collective_bytes(hlo, num_devices=8)
  moved = {k: v for k, v in c.by_kind.items() if v.count}
  assert set(moved) <= {"all-reduce", "reduce-scatter", "all-gather"}, moved
  assert c.by_kind["all-gather"].count == layers, moved
  reduced = c.by_kind["all-reduce"].count + c.by_kind["reduce-scatter"].count
  assert reduced == layers, moved
  assert c.bytes == 2 * layers * r * 24 * 4, moved
  state, ref_state = tx.init(params), ref.init(params)
  g = jax.device_put(grads, shardings)
  for _ in range(3):
    u, state = update(g, state)
    ref_u, ref_state = ref.update(grads, ref_state)
    for a, b in zip(jax.tree.leaves(u), jax.tree.leaves(ref_u)):
      np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    for leaf, sh in zip(jax.tree.leaves(u), jax.tree.leaves(shardings)):
      assert leaf.sharding.is_equivalent_to(sh, leaf.ndim)


def test_transform_shardings_must_name_a_mesh():
  params = {"w": jnp.ones((8, 4))}
  tx = sj.golore(rank=2, shardings={"w": P("fsdp", None)})
  with pytest.raises(TypeError, match="NamedSharding"):
    tx.update(params, tx.init(params))
