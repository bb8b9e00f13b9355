"""Model-level subspace training (subspace_jax.factored and model mode).

The transform is the reference: model mode must take the same steps as
``sj.rso``/``sj.golore`` with the same ``side`` (the same projections, from
the same key, leaf and layer indices), while its compiled gradient never
contains a full ``m × n`` weight gradient.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

import subspace_jax as sj
from subspace_jax import factored as fc
from subspace_jax.models import llama
from subspace_jax import sharding as shd
from subspace_jax.train import step as train


def _mesh1():
  return shd.make_mesh(1, 1, 1, devices=jax.devices()[:1])


def _batches(n, seq=16, batch=4, seed=0):
  tokens = np.random.default_rng(seed).integers(0, 256, (n, batch, seq + 1), np.int32)
  return [{"inputs": t[:, :-1], "targets": t[:, 1:]} for t in tokens]


def _opt(name, mode, **kw):
  base = dict(name=name, rank=8, update_gap=3, learning_rate=1e-2,
              warmup_steps=2, total_steps=10, clip_norm=None,
              subspace_mode=mode)
  base.update(kw)
  return train.OptimizerConfig(**base)


# Float64 rounding (u = 1.1e-16) on gradient terms of size S <= 1, amplified
# by Adam's 1/(sqrt(v_hat) + eps) <= 1/eps = 1e8 (a gradient entry near zero,
# as right after RSO's reset), moves an inner update by at most u*S/eps = 1e-8
# and a weight by lr * scale * r * max|P| * 1e-8 <= 1e-2 * 1 * 8 * 1 * 1e-8
# = 8e-10 per step: 6.4e-9 over the 8 steps. Measured: at most 1.3e-14 with
# side lean (each layer's P drawn alone in model mode, batched in the
# transform: the same P to float64 rounding), 1.6e-13 with side left when
# both drew the whole stack's. In float32 the same bound is 1e-1
# (u = 6e-8), so float32 runs cannot be compared this way: a different
# (equally valid) draw of P once put a near-zero entry in a fresh Adam
# state and moved a weight by 2.6e-5, and the old Householder sampler did
# 1.4e-4 with another seed.
_MODE_ATOL = 1e-8


_CASES = {"rso-eta": ("rso", dict(eta=2.0)),
          "rso-decay": ("rso", dict(weight_decay=0.1)),
          "golore-decay": ("golore", dict(weight_decay=0.1, scale=0.5))}


# The default side (lean, which projects the input side of q/k/v/o/down
# and the output side of gate/up) in every case, scanned and unrolled
# layers in turn; side left everywhere once (each case is ~25 s).
@pytest.mark.parametrize("case, scan, side", [
    ("rso-eta", True, "lean"), ("rso-decay", False, "lean"),
    ("golore-decay", True, "lean"), ("golore-decay", False, "left")],
    ids=lambda v: {False: "layers", True: "scan"}.get(v, v))
def test_model_mode_takes_the_transform_steps(case, scan, side):
  """8 float64 steps with update_gap 3: two merges and a third subproblem.
  With side "lean" the tiny model's gate/up kernels (64 × 176) carry B on
  their output side (W + (Q·B)ᵀ), the others on their input side."""
  name, extra = _CASES[case]
  extra = dict(extra, side=side)
  with jax.enable_x64(True):
    model = llama.get_config("tiny", scan_layers=scan, dtype="float64",
                             param_dtype="float64")
    mesh = _mesh1()
    ref = train.setup(model, _opt(name, "transform", **extra), mesh)
    mod = train.setup(model, _opt(name, "model", **extra), mesh)
    s_ref, s_mod = ref.init(0), mod.init(0)
    assert all(x.dtype == jnp.float64 for x in jax.tree.leaves(s_ref.params))
    subspace = _opt(name, "model", **extra).subspace(s_ref.params, llama.views())
    sides = {p.transpose for p in subspace.plans if p is not None}
    assert sides == ({False} if side == "left" else {False, True})
    for i, batch in enumerate(_batches(8)):
      s_ref, m_ref = ref.train_step(s_ref, batch)
      s_mod, m_mod = mod.train_step(s_mod, batch)
      np.testing.assert_allclose(m_mod["loss"], m_ref["loss"], rtol=1e-12)
      merged = subspace.merged_weights(s_mod.params, s_mod.opt_state)
      for a, b in zip(jax.tree.leaves(merged), jax.tree.leaves(s_ref.params)):
        np.testing.assert_allclose(a, b, rtol=0, atol=_MODE_ATOL,
                                   err_msg=f"step {i}")
      # Right after a merge B is zero and the weights are the merged ones.
      if (i + 1) % 3 == 0:
        assert all(not jnp.any(b) for b in jax.tree.leaves(s_mod.params.low))
    assert int(fc.factored_state(s_mod.opt_state).count) == 8
    # The run moved: the comparison is not between two unchanged models.
    start = jax.tree.leaves(ref.init(0).params)
    moved = max(float(jnp.max(jnp.abs(a - b)))
                for a, b in zip(jax.tree.leaves(s_ref.params), start))
    assert moved > 1e-2


def _eqns(jaxpr, *, into_loops: bool = True):
  """Every equation of ``jaxpr`` and of its sub-jaxprs; with ``into_loops``
  False the bodies of scan, while and cond are not entered (the loop
  equation itself is still given)."""
  for eqn in jaxpr.eqns:
    yield eqn
    if not into_loops and eqn.primitive.name in ("scan", "while", "cond"):
      continue
    for p in eqn.params.values():
      for sub in p if isinstance(p, (list, tuple)) else [p]:
        inner = getattr(sub, "jaxpr", sub)
        if isinstance(inner, jax.extend.core.Jaxpr):
          yield from _eqns(inner, into_loops=into_loops)


def _dot_shapes(jaxpr) -> set[tuple[int, ...]]:
  """Output shapes of every dot_general in ``jaxpr`` and its sub-jaxprs."""
  return {tuple(v.aval.shape) for eqn in _eqns(jaxpr)
          if eqn.primitive.name == "dot_general" for v in eqn.outvars}


@pytest.mark.parametrize("scan", [False, True], ids=["layers", "scan"])
def test_model_mode_gradient_has_no_full_weight_gradient(scan):
  cfg = llama.get_config("tiny", scan_layers=scan, remat=scan)
  model = train.ModelDef(cfg)
  weights = jax.eval_shape(lambda: model.init(0))
  subspace = _opt("rso", "model").subspace(weights, llama.views())
  batch = _batches(1)[0]
  full_shapes = {p.shape[-2:] for p in subspace.plans if p is not None}
  full_shapes |= {s[::-1] for s in full_shapes}

  def model_grad(params):
    opt_state = fc.scale_by_factored(subspace=subspace).init(
        subspace.trainable(params))
    keys = subspace.keys(opt_state)
    loss = lambda t: model.loss(subspace.factored(params, t, keys), batch)
    return jax.grad(loss)(subspace.trainable(params))

  def full_grad(weights):
    return jax.grad(model.loss)(weights, batch)

  params = jax.eval_shape(lambda: subspace.init(model.init(0)))
  in_model = _dot_shapes(jax.make_jaxpr(model_grad)(params).jaxpr)
  in_full = _dot_shapes(jax.make_jaxpr(full_grad)(weights).jaxpr)
  # The check can fail: the ordinary gradient does form every W gradient.
  assert full_shapes <= {s[-2:] for s in in_full}
  assert not full_shapes & {s[-2:] for s in in_model}, sorted(in_model)
  # Gradients of B are r × n, one per factored kernel.
  grads = jax.eval_shape(model_grad, params)
  for g, plan in zip(jax.tree.leaves(grads, is_leaf=lambda x: x is None),
                     subspace.plans):
    if plan is not None:
      assert g.shape == plan.low_shape


def _loop_free_shapes(jaxpr) -> set[tuple[int, ...]]:
  """Shapes of the values of ``jaxpr`` outside its loops and conds: what
  can live through the whole step, not one iteration (the bodies of scan,
  while and cond are not entered, those of jit and remat are)."""
  return {tuple(v.aval.shape) for eqn in _eqns(jaxpr, into_loops=False)
          for v in eqn.outvars if hasattr(v.aval, "shape")}


@pytest.mark.parametrize("side", ["left", "lean"])
def test_scanned_model_mode_draws_each_layers_projection_in_the_loop(side):
  """No (L, d, r) projection of a stacked leaf exists outside the layer
  scan (nor in the merge's loop): each layer draws its own P inside. The
  check can fail: the projections of the whole stack did exist before."""
  cfg = llama.get_config("tiny", scan_layers=True, remat=True)
  s = train.setup(cfg, _opt("rso", "model", side=side), _mesh1())
  subspace = _opt("rso", "model", side=side).subspace(
      s.abstract_state.params.weights, llama.views())
  stacked = {p.projection_shape for p in subspace.plans
             if p is not None and p.batch_shape}
  assert stacked and all(len(x) == 3 for x in stacked)
  batch = {k: jax.ShapeDtypeStruct((2, 16), jnp.int32)
           for k in ("inputs", "targets")}
  shapes = _loop_free_shapes(
      jax.make_jaxpr(s.train_step)(s.abstract_state, batch).jaxpr)
  assert not stacked & shapes, sorted(stacked & shapes)
  # The check sees inside the step: the stacked B and W are there.
  assert {p.low_shape for p in subspace.plans if p is not None} <= shapes


def test_model_mode_compiled_step_needs_less_scratch_memory():
  """XLA's own accounting of the whole train step. With global-norm
  clipping every gradient must exist before the first update, so the
  transform step holds the W gradients (fp32, m × n) and model mode only the
  B gradients (r × n). Activations are negligible at 2 × 16 tokens."""
  cfg = llama.get_config("tiny", hidden_size=128, intermediate_size=512,
                         num_layers=2)
  mesh = _mesh1()
  batch = {k: jax.ShapeDtypeStruct((2, 16), jnp.int32)
           for k in ("inputs", "targets")}
  mem = {}
  for mode in ("transform", "model"):
    s = train.setup(cfg, _opt("rso", mode, rank=4, clip_norm=1.0), mesh)
    mem[mode] = sj.memory.compiled(s.train_step, s.abstract_state, batch)
  weights = jax.eval_shape(lambda: train.ModelDef(cfg).init(0))
  plans = _opt("rso", "model").leaf_plans(weights, llama.views())
  w_grads = sum(4 * np.prod(p.shape) for p in plans if p is not None)
  saved = mem["transform"].temporaries - mem["model"].temporaries
  # Measured: 1.04 MB saved of 2.1 MB of W gradients (XLA frees some early).
  assert saved >= 0.25 * w_grads, (mem, w_grads)


def test_step_holds_no_copy_of_a_stacked_weight():
  """The merge W + P·B and the weight decay change the frozen weights in
  place, and a discarded step never needs the old and the new W at once.

  Compiled (XLA CPU, loop hoisting off as for the memory tables) with 4 and
  8 scanned layers, with weight decay: the step's temporaries may grow with
  depth by B's gradients and the saved block inputs (0.57 MiB measured),
  not by a copy of any stacked weight leaf, which would add at least one
  leaf's growth (1.38 MiB: a 4 × 256 × 704 bf16 stack). A merge through
  ``lax.cond``/``lax.map`` and a ``where(finite, new W, old W)`` grew them
  by 7.5 MiB."""

  def temporaries(layers):
    cfg = llama.LlamaConfig(
        vocab_size=256, hidden_size=256, intermediate_size=704, num_heads=4,
        num_layers=layers, max_seq_len=64, dtype=jnp.bfloat16,
        param_dtype=jnp.bfloat16, scan_layers=True, remat="full")
    s = train.setup(cfg, _opt("rso", "model", rank=32, weight_decay=0.1),
                    _mesh1())
    tokens = jax.ShapeDtypeStruct((1, 64), jnp.int32,
                                  sharding=s.batch_sharding)
    mem = sj.memory.compiled(s.train_step, s.abstract_state,
                             {"inputs": tokens, "targets": tokens},
                             compiler_options=sj.memory.NO_LOOP_HOISTING)
    largest = max(x.size * x.dtype.itemsize
                  for x in jax.tree.leaves(s.abstract_state.params.weights))
    return mem.temporaries, largest

  (small, w_small), (large, w_large) = temporaries(4), temporaries(8)
  assert large - small < w_large - w_small, (small, large, w_large)


def test_merge_and_dense():
  rng = np.random.default_rng(0)
  w = jnp.asarray(rng.normal(size=(3, 12, 5)), jnp.float32)
  u = jnp.asarray(rng.normal(size=(5, 12)), jnp.float32)
  params = {"k": w, "u": u, "v": jnp.ones(5)}
  sub = fc.Subspace.for_params(params, rank=4, update_gap=2, seed=3)
  fp = sub.init(params)
  # Lean sides: k (12 × 5) projects its rows, B 4 × 5; u (5 × 12) its
  # columns, B 4 × 5 too (r × min(m, n)).
  assert [p.transpose for p in sub.plans[:2]] == [False, True]
  assert fp.low["k"].shape == (3, 4, 5) and not jnp.any(fp.low["k"])
  assert fp.low["u"].shape == (4, 5)
  # The optimizer state's counter says where the step is: 0, 1, 2 updates.
  st = [fc.scale_by_factored(subspace=sub).init(sub.trainable(fp))]
  st += [st[0]._replace(count=jnp.int32(c)) for c in (1, 2)]
  proj, keys = sub.projections(fp, st[0]), sub.keys(st[0])
  assert keys[0].shape == (3, 2) and keys[0].dtype == jnp.uint32
  # P is the transform's projection of leaf 0 (RSO: P^T P = (12/4) I).
  key = jax.random.key(3)
  want = sj.transform.random_projection(
      sj.transform.projection_key(key, 0, 0), sub.plans[0], "scaled_stiefel")
  np.testing.assert_array_equal(proj[0], want)
  np.testing.assert_allclose(proj[0][1].T @ proj[0][1], 3 * np.eye(4), atol=1e-5)

  b = jnp.asarray(rng.normal(size=(3, 4, 5)), jnp.float32)
  c = jnp.asarray(rng.normal(size=(4, 5)), jnp.float32)
  trained = {"k": b, "u": c, "v": 2 * jnp.ones(5)}
  x = jnp.asarray(rng.normal(size=(7, 12)), jnp.float32)
  f = sub.factored(fp, trained, keys)
  # Layer 1 alone (as a scan body sees it) draws layer 1's P of the stack,
  # to float32 rounding of one draw against a batched one.
  layer = jax.tree.map(lambda a: a[1], f["k"])
  np.testing.assert_allclose(layer.draw(), proj[0][1], rtol=0, atol=1e-6)
  np.testing.assert_allclose(fc.dense(x, layer),
                             x @ (w[1] + proj[0][1] @ b[1]), rtol=1e-5, atol=1e-5)
  # The output side: x·U + (x·Cᵀ)·Qᵀ = x·(U + (Q·C)ᵀ), Q 12 × 4.
  np.testing.assert_allclose(fc.dense(x[:, :5], f["u"]),
                             x[:, :5] @ (u + (proj[1] @ c).T),
                             rtol=1e-5, atol=1e-5)

  # Step 0 of a 2-step subproblem: no merge, W frozen, B and v taken.
  fp1 = sub.update(fp, trained, keys, st[0], st[1], weight_decay=0.1)
  np.testing.assert_allclose(fp1.weights["k"], 0.9 * w, rtol=1e-6)
  np.testing.assert_array_equal(fp1.low["k"], b)
  np.testing.assert_array_equal(fp1.weights["v"], trained["v"])
  # Step 1 ends it: W <- W + P B (U <- U + (Q C)ᵀ), B <- 0, and the next P
  # is a new one.
  fp2 = sub.update(fp1, trained, keys, st[1], st[2])
  np.testing.assert_allclose(
      fp2.weights["k"], 0.9 * w + jnp.einsum("bdr,brk->bdk", proj[0], b),
      rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(fp2.weights["u"], 0.9 * u + (proj[1] @ c).T,
                             rtol=1e-5, atol=1e-5)
  assert not jnp.any(fp2.low["k"]) and not jnp.any(fp2.low["u"])
  assert not np.allclose(sub.projections(fp2, st[2])[0], proj[0])
  np.testing.assert_allclose(sub.merged_weights(fp2, st[2])["k"],
                             fp2.weights["k"])
  # An update a wrapper skipped (the counter did not move): nothing changes,
  # not even the decay, and no merge although the subproblem would end.
  fp3 = sub.update(fp1, trained, keys, st[1], st[1], weight_decay=0.1)
  np.testing.assert_array_equal(fp3.weights["k"], fp1.weights["k"])
  np.testing.assert_array_equal(fp3.low["k"], b)


def test_model_mode_under_multisteps_takes_the_large_batch_steps():
  """optax.MultiSteps (gradient accumulation) wraps model mode's optimizer:
  the subproblem, its P and the merges follow the updates taken, not the
  micro-steps, because the optimizer's counter is the only one. Two
  half-batches per update equal one full batch per update, to float32
  rounding of the gradient mean (a few ulp on updates of size ~1e-2)."""
  rng = np.random.default_rng(0)
  params = {"w": jnp.asarray(rng.normal(size=(12, 6)), jnp.float32),
            "v": jnp.ones(6, jnp.float32)}
  target = jnp.asarray(rng.normal(size=(12, 6)), jnp.float32)
  xs = jnp.asarray(rng.normal(size=(3, 8, 12)), jnp.float32)
  sub = fc.Subspace.for_params(params, rank=3, update_gap=2, seed=1)

  def loss(tree, x):
    y = fc.dense(x, tree["w"]) * tree["v"]
    return jnp.mean((y - x @ target) ** 2)

  def run(tx, batches):
    fp = sub.init(params)
    opt_state = tx.init(sub.trainable(fp))
    out = []
    for x in batches:
      keys = sub.keys(opt_state)
      trainable = sub.trainable(fp)
      grads = jax.grad(lambda t: loss(sub.factored(fp, t, keys), x))(trainable)
      updates, new_state = tx.update(grads, opt_state, trainable)
      trainable = optax.apply_updates(trainable, updates)
      fp = sub.update(fp, trainable, keys, opt_state, new_state, 1e-2)
      opt_state = new_state
      out.append(sub.merged_weights(fp, opt_state))
    return out, opt_state

  core = lambda: optax.chain(
      fc.scale_by_factored(optax.identity(), subspace=sub, scale=0.5),
      optax.scale(-0.1))
  big, _ = run(core(), list(xs))
  halves = [h for x in xs for h in (x[:4], x[4:])]
  small, state = run(optax.MultiSteps(core(), every_k_schedule=2), halves)
  assert int(fc.factored_state(state).count) == 3
  for i, want in enumerate(big):
    got = small[2 * i + 1]
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
      np.testing.assert_allclose(a, b, rtol=0, atol=1e-6, err_msg=f"update {i}")
  # The check can fail: the run moved, and each update is a different one.
  assert float(jnp.max(jnp.abs(big[-1]["w"] - params["w"]))) > 1e-2
  assert float(jnp.max(jnp.abs(big[1]["w"] - big[0]["w"]))) > 1e-3


def test_bf16_model_mode_learns():
  cfg = llama.get_config("tiny", dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
  s = train.setup(cfg, _opt("rso", "model", update_gap=4, total_steps=30,
                            learning_rate=3e-2), _mesh1())
  state = s.init(0)
  low = [x for x in jax.tree.leaves(state.params.low)]
  assert low and all(x.dtype == jnp.bfloat16 for x in low)
  batch = _batches(1, seq=32, batch=8)[0]
  losses = []
  for _ in range(16):
    state, m = s.train_step(state, batch)
    losses.append(float(m["loss"]))
  assert np.isfinite(losses).all() and losses[-1] < 0.8 * losses[0], losses
  for x in jax.tree.leaves(state.params.weights):
    assert x.dtype == jnp.bfloat16
  # The factored forward equals the merged model's, to bf16 rounding.
  sub = _opt("rso", "model", update_gap=4).subspace(state.params.weights,
                                                        llama.views())
  via_factors = s.eval_step(state, batch)
  merged = s.model.loss(sub.merged_weights(state.params, state.opt_state),
                        batch)
  np.testing.assert_allclose(via_factors, merged, rtol=2e-2)


def test_b_and_its_moments_are_split_like_w():
  if jax.device_count() < 8:
    pytest.skip("needs 8 host devices")
  mesh = shd.make_mesh(data=2, fsdp=2, tensor=2)
  cfg = llama.get_config("tiny", scan_layers=True)
  s = train.setup(cfg, _opt("rso", "model", side="lean"), mesh)
  up = lambda t: t["layers"]["mlp"]["up_proj"]["kernel"]
  down = lambda t: t["layers"]["mlp"]["down_proj"]["kernel"]
  params = s.state_shardings.params
  # Lean sides: up_proj (L, embed, mlp) projects its output side, so B is
  # (L, r, embed): kept axis 'embed' -> fsdp, the rank axis stands for 'mlp'
  # -> tensor, W's own two mesh axes; down_proj (L, mlp, embed) projects its
  # input side, B (L, r, embed) too.
  assert up(s.abstract_state.params.low).shape == (2, 8, 64)
  assert up(params.low).spec == P(None, "tensor", "fsdp")
  assert down(params.low).spec == P(None, "tensor", "fsdp")
  assert up(params.weights).spec == P(None, "fsdp", "tensor")
  core = s.state_shardings.opt_state[0]  # chain: core, decay, lr (no clip)
  assert up(core.inner_low.mu).spec == P(None, "tensor", "fsdp")
  # Leaves kept in full have their moments split over the data axis too
  # (ZeRO-1), on top of their weight's axes.
  assert core.inner_full.mu["embed"]["embedding"].spec == P(("tensor", "data"), "fsdp")
  assert core.key.spec == P() and core.count.spec == P()
  # side "left": B on every input side, up_proj's is (L, r, mlp): kept axis
  # 'mlp' -> tensor, rank for 'embed' -> fsdp.
  s = train.setup(cfg, _opt("rso", "model", side="left"), mesh)
  assert up(s.abstract_state.params.low).shape == (2, 8, 176)
  assert up(s.state_shardings.params.low).spec == P(None, "fsdp", "tensor")
  core = s.state_shardings.opt_state[0]
  assert up(core.inner_low.mu).spec == P(None, "fsdp", "tensor")


@pytest.mark.parametrize("kw, match", [
    (dict(name="galore"), "its SVD needs the full gradient"),
    (dict(name="adamw"), "supports golore and rso"),
    (dict(name="golore", svd_steps=5), "svd_steps"),
    (dict(name="rso", subspace_mode="layer"), "subspace_mode must be one of"),
])
def test_model_mode_config_errors(kw, match):
  kw = {"subspace_mode": "model", **kw}
  with pytest.raises(ValueError, match=match):
    train.OptimizerConfig(**kw)


def test_subspace_errors():
  with pytest.raises(ValueError, match="random projection"):
    fc.Subspace.for_params({"w": jnp.ones((4, 4))}, rank=2, update_gap=2,
                           projection="svd")
  with pytest.raises(ValueError, match="rank"):
    fc.Subspace.for_params({"w": jnp.ones((4, 4))}, rank=0, update_gap=2)
