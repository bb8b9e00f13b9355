"""subspace_jax.transform: galore, golore and rso as optax transforms."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import subspace_jax as sj
from subspace_jax import transform as tr
from subspace_jax.matrix_view import MatrixView

MATRIX_ONLY = lambda path, x: MatrixView() if x.ndim == 2 else None


def _grads(params, t, dtype=None):
  """Deterministic gradients with a spread of column scales."""
  def one(i, x):
    g = jax.random.normal(jax.random.key(1000 * t + i), x.shape)
    g = g * (1.0 + jnp.arange(x.shape[-1])) if x.ndim else g
    return g.astype(dtype or x.dtype)
  leaves, treedef = jax.tree.flatten(params)
  return treedef.unflatten([one(i, x) for i, x in enumerate(leaves)])


def _params():
  k = jax.random.key(0)
  return {
      "tall": jax.random.normal(k, (16, 10)),   # rows projected (lean)
      "wide": jax.random.normal(k, (6, 12)),    # columns projected (lean)
      "bias": jnp.ones(5),
      "scalar": jnp.asarray(0.5),
  }


def _run(tx, params, steps, jit=True, dtype=None, with_params=False):
  state = tx.init(params)
  update = jax.jit(tx.update) if jit else tx.update
  out = []
  for t in range(steps):
    u, state = update(_grads(params, t, dtype), state, params if with_params else None)
    out.append(u)
  return out, state


def _max_diff(a, b):
  return max(float(jnp.max(jnp.abs(x.astype(jnp.float32) - y.astype(jnp.float32))))
             for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


# --- GaLore against optax.contrib --------------------------------------------

@pytest.mark.parametrize("scale", [1.0, 0.25])
def test_galore_lean_equals_optax_contrib_galore(scale):
  params = _params()
  ref = optax.contrib.scale_by_galore(rank=3, update_proj_gap=4, scale=scale)
  mine = sj.galore(rank=3, update_gap=4, scale=scale, views=MATRIX_ONLY)
  ours, _ = _run(mine, params, 13)
  theirs, _ = _run(ref, params, 13)  # 4 refreshes: steps 0, 4, 8, 12
  for t, (a, b) in enumerate(zip(ours, theirs)):
    assert _max_diff(a, b) < 1e-5, t


def test_galore_inner_sgd_equals_optax_contrib():
  params = _params()
  inner = optax.trace(decay=0.9)
  ours, _ = _run(sj.galore(inner, rank=2, update_gap=3, views=MATRIX_ONLY), params, 8)
  theirs, _ = _run(optax.contrib.scale_by_galore(rank=2, update_proj_gap=3, base_optimizer=inner), params, 8)
  assert max(_max_diff(a, b) for a, b in zip(ours, theirs)) < 1e-5


def test_galore_update_is_projection_of_adam_in_subspace():
  """One step, independent NumPy check: U = P · adam(PᵀG), P = top-r of G."""
  g = np.asarray(_grads({"w": jnp.zeros((12, 7))}, 0)["w"], np.float64)
  u, _ = _run(sj.galore(rank=3, update_gap=5), {"w": jnp.zeros((12, 7))}, 1)
  left, _, _ = np.linalg.svd(g)
  p = left[:, :3]
  low = p.T @ g
  # Adam's first step: m̂ = g, v̂ = g², update = g / (|g| + eps).
  expected = p @ (low / (np.abs(low) + 1e-8))
  np.testing.assert_allclose(np.asarray(u[0]["w"]), expected, atol=1e-4)


# --- side rules and state shapes ---------------------------------------------

def test_side_rules_shape_the_state():
  params = {"w": jnp.zeros((16, 6))}
  def low_shape(side):
    st = sj.galore(rank=4, update_gap=2, side=side).init(params)
    return st.inner_low.mu["w"].shape, st.projections["w"].shape
  assert low_shape("lean") == ((4, 6), (16, 4))   # project the larger dim
  assert low_shape("std") == ((4, 16), (6, 4))    # project the smaller dim
  assert low_shape("left") == ((4, 6), (16, 4))
  assert low_shape("right") == ((4, 16), (6, 4))


def test_rank_is_clipped_to_the_matrix():
  st = sj.golore(rank=50, update_gap=2, side="lean").init({"w": jnp.zeros((8, 5))})
  assert st.inner_low.mu["w"].shape == (5, 5)


def _bytes(tree):
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


def test_random_methods_store_no_projection():
  params = {"a": jnp.zeros((64, 32)), "b": jnp.zeros((3, 40, 24)), "v": jnp.zeros(7)}
  ga = sj.galore(rank=8, update_gap=2).init(params)
  go = sj.golore(rank=8, update_gap=2, side="lean").init(params)
  rs = sj.rso(rank=8, update_gap=2, side="lean").init(params)
  p_bytes = (64 * 8 + 3 * 40 * 8) * 4
  assert _bytes(ga.projections) == p_bytes
  for st in (go, rs):
    assert jax.tree.leaves(st.projections) == []
    assert _bytes(st) == _bytes(ga) - p_bytes
  # GoLore@x% keeps the SVD-phase projection, like GaLore.
  assert _bytes(sj.golore(rank=8, update_gap=2, svd_steps=4, side="lean"
                          ).init(params).projections) == p_bytes


# --- random projections --------------------------------------------------------

def test_golore_update_uses_regenerated_stiefel_projection():
  params = {"w": jnp.zeros((20, 9))}
  tx = sj.golore(optax.identity(), rank=3, update_gap=2, seed=7, side="lean")
  us, _ = _run(tx, params, 5)
  plan = tr.leaf_plans(params, rank=3)[0][0]
  key = jax.random.key(7)
  for t, u in enumerate(us):
    p = np.asarray(tr.random_projection(tr.projection_key(key, 0, t // 2), plan, "stiefel"))
    np.testing.assert_allclose(p.T @ p, np.eye(3), atol=1e-5)
    g = np.asarray(_grads(params, t)["w"])
    np.testing.assert_allclose(np.asarray(u["w"]), p @ p.T @ g, atol=1e-4)
  # Different subspaces for different indices and seeds.
  p0 = tr.random_projection(tr.projection_key(key, 0, 0), plan, "stiefel")
  p1 = tr.random_projection(tr.projection_key(key, 0, 1), plan, "stiefel")
  assert float(jnp.max(jnp.abs(p0 - p1))) > 0.1


def test_golore_keeps_inner_state_rso_resets_it():
  params = {"w": jnp.zeros((10, 6))}
  _, go = _run(sj.golore(rank=2, update_gap=3), params, 7)
  _, rs = _run(sj.rso(rank=2, update_gap=3), params, 7)
  assert int(go.inner_low.count) == 7
  assert int(rs.inner_low.count) == 7 % 3  # restarted at step 6
  assert int(rs.inner_full.count) == 7     # full leaves are never reset


def _numpy_adam(g, m, v, k, b1=0.9, b2=0.999, eps=1e-8):
  m = b1 * m + (1 - b1) * g
  v = b2 * v + (1 - b2) * g * g
  return (m / (1 - b1**k)) / (np.sqrt(v / (1 - b2**k)) + eps), m, v


@pytest.mark.parametrize("eta", [None, 0.5])
def test_rso_matches_numpy_subproblem_solver(eta):
  """RSO as the paper states it, in NumPy: B from 0 with a fresh Adam for
  each subproblem, gradient Pᵀ∇f(X + PB) + B/η, merge X ← X + PB."""
  rng = np.random.default_rng(0)
  a = rng.standard_normal((14, 14)) / 4
  target = rng.standard_normal((14, 8))
  grad = lambda x: a.T @ (a @ x - target)
  lr, gap, r, steps = 0.05, 4, 3, 13
  tx = optax.chain(sj.rso(rank=r, update_gap=gap, seed=3, eta=eta, side="lean"),
                   optax.scale_by_learning_rate(lr))
  x = jnp.zeros((14, 8))
  state = tx.init(x)
  update = jax.jit(tx.update)
  for _ in range(steps):
    u, state = update(jnp.asarray(grad(np.asarray(x)), jnp.float32), state, x)
    x = optax.apply_updates(x, u)

  plan = tr.leaf_plans(x, rank=r)[0][0]
  key = jax.random.key(3)
  x_ref = np.zeros((14, 8))
  for k in range(0, steps, gap):
    p = np.asarray(tr.random_projection(tr.projection_key(key, 0, k // gap), plan, "scaled_stiefel"), np.float64)
    np.testing.assert_allclose(p.T @ p, (14 / r) * np.eye(r), atol=1e-5)
    b = np.zeros((r, 8)); m = np.zeros_like(b); v = np.zeros_like(b)
    for j in range(min(gap, steps - k)):
      gb = p.T @ grad(x_ref + p @ b) + (b / eta if eta else 0.0)
      step, m, v = _numpy_adam(gb, m, v, j + 1)
      b = b - lr * step
    x_ref = x_ref + p @ b
  np.testing.assert_allclose(np.asarray(x), x_ref, atol=2e-4)


def test_golore_svd_steps_switches_from_svd_to_random():
  params = {"w": jnp.zeros((12, 8))}
  go, _ = _run(sj.golore(rank=2, update_gap=2, svd_steps=4, side="lean"), params, 8)
  ga, _ = _run(sj.galore(rank=2, update_gap=2), params, 8)
  for t in range(4):
    assert _max_diff(go[t], ga[t]) < 1e-5, t     # the SVD phase is GaLore
  assert min(_max_diff(go[t], ga[t]) for t in range(4, 8)) > 1e-2


# --- leaves, views, dtypes ----------------------------------------------------

def test_mixed_tree_full_leaves_get_plain_inner():
  params = _params()
  us, _ = _run(sj.golore(rank=3, update_gap=4), params, 3)
  ref, _ = _run(optax.scale_by_adam(), {"bias": params["bias"], "scalar": params["scalar"]}, 3)
  # _grads keys by leaf index: recompute the reference on the same grads.
  state = optax.scale_by_adam().init(params)
  for t in range(3):
    full, state = optax.scale_by_adam().update(_grads(params, t), state)
    for name in ("bias", "scalar"):
      np.testing.assert_allclose(us[t][name], full[name], rtol=1e-6)
  assert us[0]["tall"].shape == (16, 10)


def test_stacked_leaf_each_slice_gets_its_own_projection():
  stacked = {"w": jax.random.normal(jax.random.key(1), (3, 12, 8))}
  us, _ = _run(sj.galore(rank=2, update_gap=3), stacked, 5)
  g_all = [_grads(stacked, t)["w"] for t in range(5)]
  for l in range(3):
    tx = sj.galore(rank=2, update_gap=3)
    st = tx.init({"w": stacked["w"][l]})
    for t in range(5):
      u, st = tx.update({"w": g_all[t][l]}, st)
      np.testing.assert_allclose(us[t]["w"][l], u["w"], atol=1e-5)
  # Random projections differ between slices.
  st = sj.golore(rank=2, update_gap=3).init(stacked)
  plan = tr.leaf_plans(stacked, rank=2)[0][0]
  p = tr.random_projection(tr.projection_key(jax.random.key(0), 0, 0), plan, "stiefel")
  assert p.shape == (3, 12, 2)
  assert float(jnp.max(jnp.abs(p[0] - p[1]))) > 0.1


def _largest_of_dtype(jaxpr, dtype) -> int:
  """Size of the largest array of ``dtype`` made anywhere in ``jaxpr``,
  inside loops and branches too."""
  largest = 0
  for eqn in jaxpr.eqns:
    for v in eqn.outvars:
      aval = v.aval
      if getattr(aval, "dtype", None) == dtype:
        largest = max(largest, int(np.prod(aval.shape)))
    for param in eqn.params.values():
      for sub in param if isinstance(param, (tuple, list)) else (param,):
        inner = getattr(sub, "jaxpr", sub)
        if hasattr(inner, "eqns"):
          largest = max(largest, _largest_of_dtype(inner, dtype))
  return largest


@pytest.mark.parametrize("make", [sj.golore, sj.rso])
def test_stacked_leaf_projections_are_drawn_one_matrix_at_a_time(make):
  """The random bits of a stacked leaf's projections are one matrix's at a
  time (a loop over the matrices), never every layer's at once: drawn
  batched, a 7B step held all 32 layers' bits, Gaussians and QR in float32
  (12.6 GiB of its temporaries on the TPU compiler)."""
  layers, m, n, r = 6, 40, 24, 4
  tx = make(rank=r, update_gap=3)
  grads = {"w": jnp.ones((layers, m, n), jnp.bfloat16)}
  jaxpr = jax.make_jaxpr(tx.update)(grads, tx.init(grads)).jaxpr
  assert 0 < _largest_of_dtype(jaxpr, jnp.dtype(jnp.uint32)) <= m * r


def test_nd_attention_leaves_through_matrix_views():
  q = jax.random.normal(jax.random.key(2), (16, 4, 5))   # (embed, heads, hd)
  o = jax.random.normal(jax.random.key(3), (4, 5, 16))   # (heads, hd, embed)
  views = sj.views_by_path([(r"^q$", MatrixView(0, 1)), (r"^o$", MatrixView(0, 2))])
  us, _ = _run(sj.galore(rank=3, update_gap=2, views=views), {"q": q, "o": o}, 4)
  flat = {"q": q.reshape(16, 20), "o": o.reshape(20, 16)}
  tx = sj.galore(rank=3, update_gap=2)
  st = tx.init(flat)
  for t in range(4):
    g = _grads({"q": q, "o": o}, t)
    u, st = tx.update(jax.tree.map(lambda a, b: a.reshape(b.shape), g, flat), st)
    np.testing.assert_allclose(us[t]["q"], u["q"].reshape(q.shape), atol=1e-5)
    np.testing.assert_allclose(us[t]["o"], u["o"].reshape(o.shape), atol=1e-5)


def test_view_that_does_not_fit_is_rejected():
  bad = sj.views_by_path([("w", MatrixView(1, 1))])
  with pytest.raises(ValueError, match="leaves no axis"):
    sj.galore(rank=2, views=bad).init({"w": jnp.zeros((4, 5))})


def test_views_by_path_excludes_embeddings():
  params = {"embed": jnp.zeros((50, 8)), "w": jnp.zeros((8, 8))}
  st = sj.golore(rank=2, views=sj.views_by_path([("embed", None)])).init(params)
  assert st.inner_full.mu["embed"].shape == (50, 8)
  assert st.inner_low.mu["w"].shape == (2, 8)


@pytest.mark.parametrize("make", [sj.galore, sj.golore, sj.rso])
def test_bf16_params_and_float32_moments(make):
  params = jax.tree.map(lambda x: x.astype(jnp.bfloat16), _params())
  tx = make(rank=3, update_gap=2, moment_dtype=jnp.float32)
  us, st = _run(tx, params, 4, dtype=jnp.bfloat16, with_params=True)
  assert all(u.dtype == jnp.bfloat16 for u in jax.tree.leaves(us[-1]))
  assert st.inner_low.mu["tall"].dtype == jnp.float32
  assert all(bool(jnp.all(jnp.isfinite(u))) for u in jax.tree.leaves(us))
  # Same as the float32 run on the same (bf16-rounded) gradients, to bf16 precision.
  p32 = jax.tree.map(lambda x: x.astype(jnp.float32), params)
  tx32 = make(rank=3, update_gap=2)
  st32 = tx32.init(p32)
  for t in range(4):
    g = jax.tree.map(lambda x: x.astype(jnp.float32), _grads(params, t, jnp.bfloat16))
    u32, st32 = tx32.update(g, st32, p32)
    assert _max_diff(us[t], u32) < 0.1 * max(1.0, float(max(jnp.max(jnp.abs(x)) for x in jax.tree.leaves(u32))))


def test_jit_and_eager_agree():
  params = _params()
  for tx in (sj.galore(rank=3, update_gap=2), sj.golore(rank=3, update_gap=2), sj.rso(rank=3, update_gap=2, eta=1.0)):
    a, _ = _run(tx, params, 3, jit=True, with_params=True)
    b, _ = _run(tx, params, 3, jit=False, with_params=True)
    assert max(_max_diff(x, y) for x, y in zip(a, b)) < 1e-5


# --- composition with optax wrappers ------------------------------------------

def test_multisteps_one_projected_step_per_accumulated_batch():
  params = _params()
  k = 3
  acc = optax.MultiSteps(sj.galore(rank=2, update_gap=2), every_k_schedule=k)
  plain = sj.galore(rank=2, update_gap=2)
  sa, sp = acc.init(params), plain.init(params)
  acc_update = jax.jit(acc.update)
  for step in range(4):
    micro = [_grads(params, 10 * step + i) for i in range(k)]
    for g in micro:
      ua, sa = acc_update(g, sa, params)
    mean = jax.tree.map(lambda *g: sum(g) / k, *micro)
    up, sp = plain.update(mean, sp)
    assert _max_diff(ua, up) < 1e-4, step
  assert int(sa.inner_opt_state.count) == 4


def test_inject_hyperparams_learning_rate_injectable():
  def make(learning_rate):
    return optax.chain(sj.golore(rank=2, update_gap=2), optax.scale_by_learning_rate(learning_rate))
  tx = optax.inject_hyperparams(make)(learning_rate=0.1)
  params = _params()
  st = tx.init(params)
  u1, _ = jax.jit(tx.update)(_grads(params, 0), st)
  st.hyperparams["learning_rate"] = jnp.asarray(0.2)
  u2, _ = jax.jit(tx.update)(_grads(params, 0), st)
  for a, b in zip(jax.tree.leaves(u1), jax.tree.leaves(u2)):
    np.testing.assert_allclose(2 * a, b, rtol=1e-5, atol=1e-7)


def test_inject_hyperparams_rank_and_gap_must_be_static():
  static = ("rank", "update_gap", "seed", "svd_steps")
  tx = optax.inject_hyperparams(sj.golore, static_args=static)(rank=2, update_gap=3, scale=0.5)
  params = _params()
  u, st = jax.jit(tx.update)(_grads(params, 0), tx.init(params))
  ref, _ = sj.golore(rank=2, update_gap=3, scale=0.5).update(_grads(params, 0), sj.golore(rank=2, update_gap=3).init(params))
  assert _max_diff(u, ref) < 1e-6
  with pytest.raises(TypeError, match="static_args"):
    optax.inject_hyperparams(sj.golore)(rank=2, update_gap=3).init(params)


def test_apply_if_finite_skips_a_nan_step():
  params = _params()
  tx = optax.apply_if_finite(sj.galore(rank=2, update_gap=2), max_consecutive_errors=5)
  st = tx.init(params)
  u, st = tx.update(_grads(params, 0), st)
  bad = jax.tree.map(lambda g: g * jnp.nan, _grads(params, 1))
  u, st = tx.update(bad, st)
  assert all(float(jnp.max(jnp.abs(x))) == 0 for x in jax.tree.leaves(u))
  u, st = tx.update(_grads(params, 2), st)
  assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(u))
  assert int(st.inner_state.count) == 2


def test_partition_and_masked():
  params = _params()
  labels = {"tall": "low", "wide": "low", "bias": "adam", "scalar": "adam"}
  tx = optax.partition({"low": sj.golore(rank=2, update_gap=2), "adam": optax.scale_by_adam()}, labels)
  us, _ = _run(tx, params, 3)
  sub = {"tall": params["tall"], "wide": params["wide"]}
  alone = sj.golore(rank=2, update_gap=2)
  st = alone.init(sub)
  for t in range(3):
    g = _grads(params, t)
    u, st = alone.update({"tall": g["tall"], "wide": g["wide"]}, st)
    assert _max_diff({"tall": us[t]["tall"], "wide": us[t]["wide"]}, u) < 1e-6
  masked = optax.masked(sj.galore(rank=2, update_gap=2), {"tall": True, "wide": False, "bias": False, "scalar": False})
  um, _ = _run(masked, params, 2)
  np.testing.assert_allclose(um[1]["wide"], _grads(params, 1)["wide"])


# --- bad input ------------------------------------------------------------------

@pytest.mark.parametrize("make", [sj.galore, sj.golore, sj.rso])
def test_bad_rank_and_gap(make):
  with pytest.raises(ValueError, match="rank must be > 0"):
    make(rank=0)
  with pytest.raises(ValueError, match="update_gap must be > 0"):
    make(rank=2, update_gap=0)
  with pytest.raises(TypeError, match="rank must be a Python int"):
    make(rank=2.5)
  with pytest.raises(ValueError, match="side"):
    make(rank=2, side="middle")


def test_bad_options():
  with pytest.raises(ValueError, match="svd"):
    sj.galore(rank=2, svd="qr")
  with pytest.raises(ValueError, match="eta"):
    sj.rso(rank=2, eta=0.0)
  with pytest.raises(ValueError, match="svd_steps"):
    sj.golore(rank=2, svd_steps=-1)


def test_non_float_leaf_is_rejected_with_its_path():
  with pytest.raises(TypeError, match="'step'.*int32"):
    sj.golore(rank=2).init({"w": jnp.zeros((4, 4)), "step": jnp.zeros((), jnp.int32)})


def test_inner_that_needs_params_is_rejected_with_the_fix():
  with pytest.raises(ValueError, match="add_decayed_weights"):
    sj.galore(optax.adamw(1e-3), rank=2).init(_params())


def test_rso_eta_needs_params():
  tx = sj.rso(rank=2, eta=1.0)
  st = tx.init(_params())
  with pytest.raises(ValueError, match="params"):
    tx.update(_grads(_params(), 0), st)


def test_nonfinite_gradient_at_refresh_keeps_previous_projection():
  params = {"w": jnp.zeros((12, 6))}
  for svd in ("exact", "randomized"):
    tx = sj.galore(rank=2, update_gap=3, svd=svd)
    st = tx.init(params)
    for t in range(3):
      _, st = tx.update(_grads(params, t), st)
    before = st.projections["w"]
    bad = {"w": _grads(params, 3)["w"].at[0, 0].set(jnp.nan)}  # step 3: refresh
    _, st = jax.jit(tx.update)(bad, st)
    assert bool(jnp.all(jnp.isfinite(st.projections["w"])))
    np.testing.assert_array_equal(st.projections["w"], before)
  # A NaN first gradient leaves the (orthonormal) initial projection.
  st = sj.galore(rank=2, update_gap=3).init(params)
  _, st2 = sj.galore(rank=2, update_gap=3).update({"w": jnp.full((12, 6), jnp.nan)}, st)
  np.testing.assert_array_equal(st2.projections["w"], st.projections["w"])


def test_float64_gradients_are_projected_in_float64():
  with jax.enable_x64(True):
    g = {"w": jax.random.normal(jax.random.key(0), (8, 16), jnp.float64)}
    tx = sj.galore(optax.identity(), rank=4, side="std")
    u, state = tx.update(g, tx.init(g))
    p = state.projections["w"]
    assert u["w"].dtype == jnp.float64
    # In float32 this error is ~1e-7.
    np.testing.assert_allclose(u["w"], p @ (p.T @ g["w"]), rtol=0, atol=1e-13)


# --- the tables: a new sampler and a new method are one entry each -------------

def _first_columns(key, m, rank, *, dtype, **_):
  del key
  return jnp.eye(m, rank, dtype=dtype)


def test_a_sampler_and_a_method_added_to_the_tables_are_used(monkeypatch):
  from subspace_jax import projection as proj
  monkeypatch.setitem(proj.SAMPLERS, "first_columns",
                      proj.Sampler(_first_columns, stored=False))
  monkeypatch.setitem(tr.METHODS, "toy",
                      tr.Method("first_columns", reset_inner=True))
  params = {"w": jnp.zeros((6, 4)), "b": jnp.zeros(3)}
  tx = tr.scale_by_method("toy", optax.scale_by_adam(), rank=2,
                          update_gap=3, side="left", views=MATRIX_ONLY)
  state = tx.init(params)
  assert jax.tree.leaves(state.projections) == []   # regenerated, not stored
  update = jax.jit(tx.update)
  for t in range(4):
    g = _grads(params, t)
    u, state = update(g, state)
  # P = the first two columns of I: the inner runs on the first two rows of
  # the gradient, and the update has nothing on the other rows.
  np.testing.assert_array_equal(u["w"][2:], 0.0)
  assert np.all(np.abs(np.asarray(u["w"][:2])) > 0)
  # The method's reset: Adam restarted at step 3.
  assert int(state.inner_low.count) == 1
  assert int(state.inner_full.count) == 4
  # Through random_projection and model mode's Subspace as well.
  plan = tr.leaf_plans(params, rank=2, side="left", views=MATRIX_ONLY)[0][1]
  np.testing.assert_array_equal(
      tr.random_projection(jax.random.key(0), plan, "first_columns"),
      jnp.eye(6, 2))
  sub = sj.factored.Subspace.for_params(params, rank=2, update_gap=3,
                                        projection="first_columns",
                                        views=MATRIX_ONLY)
  fp = sub.init(params)
  opt_state = sj.factored.scale_by_factored(subspace=sub).init(
      sub.trainable(fp))
  np.testing.assert_array_equal(sub.projections(fp, opt_state)[1],
                                jnp.eye(6, 2))


def test_subspace_schedule():
  index, starts = tr.subspace_schedule(jnp.arange(7), 3)
  np.testing.assert_array_equal(index, [0, 0, 0, 1, 1, 1, 2])
  np.testing.assert_array_equal(starts, [1, 0, 0, 1, 0, 0, 1])
