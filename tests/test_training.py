"""subspace_jax.sharding and .train on the tiny LLaMA (8 CPU devices)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

import subspace_jax as sj
from subspace_jax import models
from subspace_jax.models import llama
from subspace_jax import sharding as shd
from subspace_jax.train import step as train


def _need8():
  if jax.device_count() < 8:
    pytest.skip("needs 8 devices (tests/conftest.py sets XLA_FLAGS)")


def test_make_mesh_sizes_and_errors():
  _need8()
  mesh = shd.make_mesh(data=-1, fsdp=2, tensor=2)
  assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
  assert dict(shd.make_mesh(data=1, fsdp=-1).shape) == {"data": 1, "fsdp": 8, "tensor": 1}
  with pytest.raises(ValueError, match="needs 16 devices"):
    shd.make_mesh(data=4, fsdp=4, tensor=1)
  with pytest.raises(ValueError, match="cannot be split"):
    shd.make_mesh(data=-1, fsdp=3)
  with pytest.raises(ValueError, match="positive"):
    shd.make_mesh(data=0)


def test_logical_spec_replicates_what_does_not_divide():
  _need8()
  mesh = shd.make_mesh(data=2, fsdp=2, tensor=2)
  assert shd.logical_spec(("embed", "mlp"), (64, 176), mesh) == P("fsdp", "tensor")
  assert shd.logical_spec(("embed", "mlp"), (63, 176), mesh) == P(None, "tensor")
  assert shd.logical_spec(("layers", "norm"), (2, 64), mesh) == P(None, None)
  # A mesh axis is used once: the second 'mlp' dimension is replicated.
  assert shd.logical_spec(("mlp", "mlp"), (8, 8), mesh) == P("tensor", None)
  # Axes of size 1 are dropped rather than named.
  mesh1 = shd.make_mesh(data=8)
  assert shd.logical_spec(("embed", "mlp"), (64, 176), mesh1) == P(None, None)


def test_low_rank_state_split_over_its_leafs_mesh_axes():
  _need8()
  mesh = shd.make_mesh(data=2, fsdp=2, tensor=2)
  s = train.setup(llama.get_config("tiny", scan_layers=True),
                  train.OptimizerConfig(name="galore", rank=8, update_gap=3), mesh)
  core = s.state_shardings.opt_state[1]  # chain: clip, galore, decay, lr
  up = "layers", "mlp", "up_proj", "kernel"
  pick = lambda tree: tree[up[0]][up[1]][up[2]][up[3]]
  # up_proj kernel (L, embed=64, mlp=176): lean projects mlp (176), keeps embed.
  assert s.abstract_state.opt_state[1].inner_low.mu[up[0]][up[1]][up[2]][up[3]].shape == (2, 8, 64)
  # The kept axis keeps its name (embed: fsdp), the rank axis takes the
  # projected one's (mlp: tensor): the leaf's two mesh axes, as the kernel.
  assert pick(core.inner_low.mu).spec == P(None, "tensor", "fsdp")  # (L, 8, 64)
  assert pick(core.projections).spec == P(None, "tensor", "fsdp")   # (L, 176, 8)
  # Full-rank leaves mirror their parameter's sharding, and ZeRO-1 splits
  # them over the data axis as well (embedding (256, 64): on the vocab).
  assert core.inner_full.mu["embed"]["embedding"].spec == P(("tensor", "data"), "fsdp")
  assert s.state_shardings.params["embed"]["embedding"].spec == P("tensor", "fsdp")
  assert core.count.spec == P()


def _device_bytes(tree) -> tuple[int, int, int]:
  """(total bytes, bytes on one device, bytes of leaves left whole: the
  scalars and keys, and the norm scales, which are never split)."""
  total = per_device = small = 0
  for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]:
    size = x.size * x.dtype.itemsize
    total += size
    per_device += math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize
    if x.size <= 4 or "norm" in jax.tree_util.keystr(path):
      small += size
  return total, per_device, small


@pytest.mark.parametrize("mesh_sizes, rank", [
    ((1, 8, 1), 8), ((1, 8, 1), 4), ((2, 2, 2), 8)], ids=["fsdp8", "fsdp8-r4", "2x2x2"])
@pytest.mark.parametrize("name", [
    "adamw", "galore", "golore", "rso", "golore:model", "rso:model"])
def test_every_state_leaf_is_split_like_the_weights(name, mesh_sizes, rank):
  """The weights (W, B) take 1/n of their bytes per device, n = fsdp ×
  tensor (the data axis replicates them), within 5%, besides the small
  leaves that stay whole; the optimizer state (moments, projections) is
  split at least as much, and adamw's, whose every moment mirrors a weight
  kept in full, over the data axis too (ZeRO-1). A rank the fsdp axis does
  not divide (4 on 8) moves that axis to another dimension."""
  _need8()
  mesh = shd.make_mesh(*mesh_sizes)
  name, _, mode = name.partition(":")
  opt = train.OptimizerConfig(name=name, rank=rank,
                              eta=1.0 if name == "rso" else None,
                              subspace_mode=mode or "transform")
  s = train.setup(llama.get_config("tiny", scan_layers=True), opt, mesh)
  n = mesh_sizes[1] * mesh_sizes[2]
  total, per_device, small = _device_bytes(s.abstract_state.params)
  split = (total - small) / n
  assert split + small <= per_device * 1.0001, (per_device, split, small)
  assert per_device <= 1.05 * split + small, (per_device, split, small)
  total, per_device, small = _device_bytes(s.abstract_state.opt_state)
  split = (total - small) / (n * (mesh_sizes[0] if name == "adamw" else 1))
  assert per_device <= 1.05 * split + small, (per_device, split, small)


def test_state_axes_come_from_roles_not_shapes():
  """At full rank a square kernel's moments have the kernel's own shape.
  Projected on the right (its columns), they are ``(r, rows)``: the rank axis
  stands for the columns and takes their mesh axis, so they are split as
  the kernel transposed, while adamw's moments of the same kernel, of the
  same shape, mirror the kernel. A rule by shape cannot tell them apart."""
  _need8()
  mesh = shd.make_mesh(data=2, fsdp=2, tensor=2)
  cfg = llama.get_config("tiny", scan_layers=True)
  q = lambda t: t["layers"]["attn"]["q_proj"]["kernel"]  # (L, embed, heads)
  opt = train.OptimizerConfig(name="galore", rank=64, side="right")
  galore = train.setup(cfg, opt, mesh)
  core = galore.state_shardings.opt_state[1]
  assert q(galore.abstract_state.opt_state[1].inner_low.mu).shape == (2, 64, 64)
  assert q(core.inner_low.mu).spec == P(None, "tensor", "fsdp")
  adamw = train.setup(cfg, train.OptimizerConfig(name="adamw"), mesh)
  # (ZeRO-1 adds the data axis to the moments of a weight kept in full.)
  assert q(adamw.state_shardings.opt_state[1].mu).spec == P(None, ("fsdp", "data"), "tensor")


@pytest.mark.parametrize(
    "name", ["adamw", "galore", "golore", "rso", "golore:model", "rso:model"])
def test_train_step_learns_and_keeps_shardings(name):
  _need8()
  mesh = shd.make_mesh(data=2, fsdp=2, tensor=2)
  name, _, mode = name.partition(":")
  opt = train.OptimizerConfig(name=name, rank=8, update_gap=4, learning_rate=1e-2,
                              warmup_steps=1, total_steps=30,
                              subspace_mode=mode or "transform")
  s = train.setup(llama.get_config("tiny"), opt, mesh)
  state = s.init(0)
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, 256, (8, 33)).astype(np.int32)
  batch = jax.device_put({"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}, s.batch_sharding)
  first = float(s.eval_step(state, batch))
  old = state
  losses = []
  for _ in range(12):
    state, metrics = s.train_step(state, batch)
    losses.append(float(metrics["loss"]))
  assert jax.tree.leaves(old.params)[0].is_deleted()  # donated
  assert losses[0] == pytest.approx(first, rel=1e-5)
  assert losses[-1] < 0.8 * losses[0], losses
  assert int(state.step) == 12
  for leaf, sh in zip(jax.tree.leaves(state), jax.tree.leaves(s.state_shardings)):
    assert leaf.sharding.is_equivalent_to(sh, leaf.ndim)


def test_weight_decay_skips_norm_scales():
  opt = train.OptimizerConfig(name="golore", rank=4, weight_decay=0.5, learning_rate=0.1,
                              warmup_steps=0, total_steps=10, clip_norm=None)
  tx, _ = train.make_optimizer(opt, models.MODELS["llama"])
  params = {"attn_norm": {"scale": jnp.ones((2, 8))}, "w": {"kernel": jnp.ones((8, 8))}}
  zeros = jax.tree.map(jnp.zeros_like, params)
  updates, _ = tx.update(zeros, tx.init(params), params)
  # Zero gradients: the only update is decay, -lr * wd * param, on matrices.
  np.testing.assert_allclose(updates["attn_norm"]["scale"], 0.0)
  np.testing.assert_allclose(updates["w"]["kernel"], -0.1 * 0.5, rtol=1e-6)


def test_optimizer_config_errors():
  with pytest.raises(ValueError, match="unknown optimizer 'sgd'.*adamw, galore, golore, rso"):
    train.OptimizerConfig(name="sgd")


def test_optimizer_config_reads_the_method_table(monkeypatch):
  import subspace_jax as sj
  # A preset added to the table: plain GoLore without model mode.
  monkeypatch.setitem(sj.transform.METHODS, "toy",
                      sj.transform.Method("stiefel"))
  opt = train.OptimizerConfig(name="toy", rank=2, update_gap=3, scale=1.0,
                              learning_rate=1.0, warmup_steps=0,
                              total_steps=10, clip_norm=None)
  tx, _ = train.make_optimizer(opt, models.MODELS["llama"])
  params = {"w": {"kernel": jnp.ones((8, 4))}}
  g = {"w": {"kernel": jnp.arange(32.0).reshape(8, 4)}}
  inner = optax.chain(sj.golore(rank=2, update_gap=3, side="lean"),
                      optax.scale_by_learning_rate(opt.schedule()))
  got, _ = tx.update(g, tx.init(params), params)
  want, _ = inner.update(g, inner.init(params), params)
  np.testing.assert_array_equal(got["w"]["kernel"], want["w"]["kernel"])
  # The table says the method has no proximal term and no SVD phase.
  with pytest.raises(ValueError, match="eta applies to"):
    train.OptimizerConfig(name="toy", eta=1.0)
  with pytest.raises(ValueError, match="svd_steps applies to"):
    train.OptimizerConfig(name="toy", svd_steps=2)
  with pytest.raises(ValueError, match="supports golore and rso, not toy"):
    train.OptimizerConfig(name="toy", subspace_mode="model")


def test_model_def_matches_nnx_model():
  cfg = llama.get_config("tiny")
  model = train.ModelDef(cfg)
  graphdef, state = llama.init(cfg, 3)
  params = model.init(3)
  tokens = jnp.asarray(np.random.default_rng(1).integers(0, 256, (2, 16)), jnp.int32)
  np.testing.assert_allclose(model.apply(params, tokens), llama.apply(graphdef, state, tokens), atol=1e-5)
  assert set(model.logical_axes) == {
      "/".join(str(getattr(k, "key", k)) for k in path)
      for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]
  }


@pytest.mark.parametrize("name", ["adamw", "galore", "rso", "rso:model"])
def test_non_finite_step_leaves_the_state_unchanged(name, monkeypatch):
  """A NaN loss (so NaN gradients) at step 3: the state after it equals the
  state before it, bit for bit, and the step says it was not finite. Step 3
  is a refresh of the transform's projection (gap 2) and the end of model
  mode's subproblem (gap 3), whose merge changes W in place: it must not
  run."""
  name, _, mode = name.partition(":")
  loss_of = train.ModelDef.loss
  monkeypatch.setattr(train.ModelDef, "loss", lambda self, p, b: loss_of(
      self, p, {"inputs": b["inputs"], "targets": b["targets"]}) * b["factor"][0, 0])
  opt = train.OptimizerConfig(name=name, rank=8, update_gap=3 if mode else 2,
                              learning_rate=1e-2, weight_decay=0.1,
                              warmup_steps=1, total_steps=10,
                              subspace_mode=mode or "transform")
  s = train.setup(llama.get_config("tiny"), opt,
                  shd.make_mesh(1, 1, 1, devices=jax.devices()[:1]))
  state = s.init(0)
  tokens = np.random.default_rng(0).integers(0, 256, (4, 17)).astype(np.int32)

  def batch(factor):
    return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
            "factor": np.full((4, 16), factor, np.float32)}

  for _ in range(2):
    state, metrics = s.train_step(state, batch(1.0))
    assert bool(metrics["finite"])
  before = jax.device_get(state)
  state, metrics = s.train_step(state, batch(np.nan))
  assert not bool(metrics["finite"]) and np.isnan(float(metrics["loss"]))
  for x, y in zip(jax.tree.leaves(before), jax.tree.leaves(jax.device_get(state))):
    np.testing.assert_array_equal(x, y)
  assert int(state.step) == 2
  state, metrics = s.train_step(state, batch(1.0))  # and training goes on
  assert bool(metrics["finite"]) and int(state.step) == 3
  assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(state.params))


@pytest.mark.parametrize("mode", ["transform", "model"])
def test_state_is_finite_finds_one_bad_array(mode):
  """The loop's last guard before a checkpoint: one NaN anywhere in the
  state (a moment, B, a weight) is found; integer leaves are not looked
  at."""
  opt = train.OptimizerConfig(name="rso", rank=8, subspace_mode=mode)
  s = train.setup(llama.get_config("tiny"), opt,
                  shd.make_mesh(1, 1, 1, devices=jax.devices()[:1]))
  state = s.init(0)
  assert bool(s.state_is_finite(state))
  leaves, treedef = jax.tree.flatten(state)
  floats = [i for i, x in enumerate(leaves)
            if jnp.issubdtype(x.dtype, jnp.inexact)]
  assert len(floats) > 10
  for i in (floats[0], floats[len(floats) // 2], floats[-1]):
    bad = list(leaves)
    bad[i] = bad[i].at[(0,) * bad[i].ndim].set(jnp.nan)
    assert not bool(s.state_is_finite(jax.tree.unflatten(treedef, bad))), i


def test_activations_are_split_by_batch_under_fsdp(monkeypatch):
  """Without constraints XLA splits the activations like the FSDP-sharded
  weights they meet (by features) and keeps the whole batch on every device;
  with them every device holds its share of the batch. XLA's own count of
  the compiled step's temporaries (measured: 5.9 MB against 31.0 MB)."""
  _need8()
  import contextlib
  from subspace_jax.models import constraints
  mesh = shd.make_mesh(1, 8, 1)
  cfg = llama.get_config("tiny", scan_layers=True, remat="full",
                         hidden_size=128, intermediate_size=256,
                         max_seq_len=128)
  batch = lambda s: {k: jax.ShapeDtypeStruct((16, 128), jnp.int32,
                                             sharding=s.batch_sharding)
                     for k in ("inputs", "targets")}
  temps = []
  for constrained in (True, False):
    if not constrained:
      monkeypatch.setattr(constraints, "activation_sharding",
                          lambda fn: contextlib.nullcontext())
    s = train.setup(cfg, train.OptimizerConfig(name="adamw"), mesh)
    temps.append(sj.memory.compiled(s.train_step, s.abstract_state,
                                    batch(s)).temporaries)
  assert temps[0] < 0.5 * temps[1], temps
