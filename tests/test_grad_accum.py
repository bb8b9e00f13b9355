"""Gradient accumulation (``OptimizerConfig.grad_accum``): a step on ``n``
micro-batches is the step on the whole batch, in both modes."""

import jax
import numpy as np
import pytest

from subspace_jax import sharding as shd
from subspace_jax.models import llama
from subspace_jax.train import optimizer as opt_lib
from subspace_jax.train import step as train


@pytest.mark.parametrize("name,mode", [("golore", "transform"),
                                       ("rso", "model")])
def test_accumulated_step_is_the_whole_batch_step(name, mode):
  """The loss is a mean over equally many tokens per row, so the mean of
  the micro-batches' losses and gradients is the whole batch's: the same
  loss, gradient norm and weights after three updates (one of them a
  subspace refresh), up to float32 summation order: relative 1e-5 on the
  loss and norm; on the weights, Adam turns a gradient's rounding error δ
  into an update error of at most lr·δ/eps, so eps is 1e-3 here (not 1e-8,
  which would let a 1e-12 rounding of a near-zero gradient move a weight
  by 1e-6) and the weights agree to 1e-6 of their scale, while a wrong
  mean (a micro-batch lost, a sum for a mean) moves them by about lr. The mesh splits the batch's rows, as each
  micro-batch's, over its data axes.."""
  mesh = shd.make_mesh(data=2, fsdp=-1)
  config = llama.get_config("tiny")
  rng = np.random.default_rng(0)
  rows = 2 * jax.device_count()
  tokens = rng.integers(0, 256, (rows, 17)).astype(np.int32)
  results = []
  for accum in (1, 2):
    opt = opt_lib.OptimizerConfig(
        name=name, rank=8, update_gap=2, learning_rate=1e-2, warmup_steps=1,
        total_steps=10, subspace_mode=mode, grad_accum=accum, eps=1e-3)
    s = train.setup(config, opt, mesh)
    batch = jax.device_put({"inputs": tokens[:, :-1], "targets": tokens[:, 1:]},
                           s.batch_sharding)
    state, metrics = s.init(0), []
    for _ in range(3):
      state, m = s.train_step(state, batch)
      metrics.append((float(m["loss"]), float(m["grad_norm"])))
    results.append((metrics, jax.device_get(state.params)))
  (m1, p1), (m2, p2) = results
  np.testing.assert_allclose(m2, m1, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p2)):
    np.testing.assert_allclose(b, a, rtol=0, atol=1e-6 + 1e-5 * np.abs(a).max())


def test_a_batch_that_does_not_split_is_refused():
  mesh = shd.make_mesh(data=-1)
  with pytest.raises(ValueError, match="batch_size 6 is not divisible by optimizer.grad_accum 4"):
    shd.check_batch(6, mesh, 4)
  with pytest.raises(ValueError, match="micro-batch of 3"):
    shd.check_batch(6, mesh, 2)
  shd.check_batch(4 * jax.device_count(), mesh, 4)


def test_micro_batch_j_is_every_nth_row_from_j():
  """Micro-batch j holds rows j, j + n, ...: under a data-parallel split of
  the rows each device holds its share of every micro-batch."""
  batch = {"inputs": np.arange(8 * 3).reshape(8, 3)}
  micro = train._micro_batches(batch, 2)["inputs"]  # pylint: disable=protected-access
  assert micro.shape == (2, 4, 3)
  np.testing.assert_array_equal(micro[0], batch["inputs"][0::2])
  np.testing.assert_array_equal(micro[1], batch["inputs"][1::2])
