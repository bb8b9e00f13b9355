"""Official PyTorch GaLore (``galore-torch``) vs ``sj.galore``, step by step.

Both frameworks train the same small MLP (``tanh`` layers; by default
``24→64→64→10``: a wide ``24×64`` kernel, a square ``64×64`` one and a tall
``64×10`` one, so both projection sides are exercised, plus three bias
vectors) from the same float32 initial weights on the same numpy batches.
PyTorch runs ``galore_torch.GaLoreAdamW`` with two parameter groups (the
matrices with ``rank``, ``update_proj_gap``, ``scale``, ``proj_type='std'``;
the biases plain AdamW); JAX runs ``sj.galore(inner, side="std")`` chained
with weight decay and the learning rate in full space. After every update the
script takes the maximum ``|Δθ|`` over all parameters between the two runs,
and at every projection refresh it compares the projections themselves.

What the official code does (galore-torch 1.0, ``adamw.py`` and
``galore_projector.py``), and how the JAX chain matches it:

* Side (``proj_type='std'``): a gradient with ``rows >= cols`` is multiplied
  on the right by ``Vhᵣᵀ`` (the columns, the smaller or equal dimension, are
  projected), one with ``rows < cols`` on the left by ``Uᵣᵀ``. This is
  ``side="std"`` (ties: the columns). ``U, s, Vh = torch.linalg.svd(G)`` of
  the untransposed gradient in float32 (a float64 gradient is cast to float32
  for the SVD), so the signs are LAPACK's; ``sj.galore`` also takes the right
  singular vectors of the untransposed gradient.
* Refresh: at optimizer steps ``0, gap, 2·gap, …`` (the step counter before
  its increment), from the current gradient; Adam's moments are kept. Same in
  ``sj.galore`` (``count % update_gap == 0``).
* Adam: ``m, v`` updated in the projected space;
  ``update = lr·√(1−β₂ᵗ)/(1−β₁ᵗ) · m / (√v + eps)``, then back-projected and
  multiplied by ``scale``. So eps enters *before* the bias correction:
  compared with ``optax.scale_by_adam`` (``m̂ / (√v̂ + eps)``) the official
  eps is ``eps / √(1−β₂ᵗ)`` in optax terms, ~31.6·eps at step 1 with
  β₂ = 0.999. No chain of stock optax transforms reproduces that, so the
  script also runs a small inner transform of its own, ``official_adam``,
  with eps where the official code puts it.
* Weight decay: applied after the update, to the *updated* weights:
  ``θ ← (θ − lr·u)(1 − lr·wd)``, while ``optax.add_decayed_weights`` then
  ``optax.scale_by_learning_rate`` gives ``θ − lr·u − lr·wd·θ``. The two
  differ by ``lr²·wd·u``; prepending ``optax.scale(1 − lr·wd)`` to the optax
  decay gives the official order exactly.

Three JAX chains are run against one PyTorch run, so each difference is
shown separately, and one or two controls:

* ``optax``: ``sj.galore(optax.scale_by_adam(b1, b2, eps), side="std")``,
  ``add_decayed_weights(wd)``, ``scale_by_learning_rate(lr)`` (the chain the
  design notes give);
* ``+eps``: the same with ``official_adam`` as the inner transform;
* ``exact``: ``+eps`` with ``optax.scale(1 − lr·wd)`` before the decay: the
  official update, formula for formula;
* ``signs`` (control): ``exact`` against a second PyTorch run, with both
  SVDs made to follow one sign rule (each singular vector flipped so that
  its largest-magnitude entry is positive): galore-torch's projector class
  and ``subspace_jax.projection.svd_subspace`` are swapped for sign-fixing
  wrappers for that run only (nothing in ``subspace_jax`` is edited);
* ``signs64`` (control, float64 runs only): ``signs`` with both SVDs in
  float64 instead of float32.

What is found (results file, "Reading"): ``exact`` matches the official code
to float32 SVD precision up to the first refresh, and then differs by the
size of a few updates. The cause is the sign convention of the SVD: on the
*same* gradient, PyTorch's LAPACK (MKL) and JAX's return some singular
vectors with opposite signs (in the default problem mostly the left singular
vectors of the wide matrix). At the first projection a flip cancels (the moments are zero and
Adam is odd in its input), but GaLore keeps Adam's moments across a refresh,
so a flipped vector turns the kept moments against the new projected
gradient. The ``signs`` control removes all of it: the runs then agree over
every refresh to the level of the first window, which is the float32 SVD
difference of the two LAPACK builds amplified by Adam's sign-like first step
(the float64 run does everything in float64 except the SVD, which both codes
do in float32, and keeps that residual; ``signs64`` removes it). What
``signs64`` leaves, ~1e-9, is ``sj.galore`` itself: its two projection
einsums use ``preferred_element_type=jnp.float32``, so with float64
parameters they are computed in float32 (the script measures this on an
identity inner transform; no effect for float32 or bfloat16 parameters).

Dependencies (optional, not in the default install; the ``bench`` extra):
  python -m pip install torch==2.13.0
  python -m pip install --no-deps galore-torch==1.0
or pass ``--install`` and the script runs them. ``--no-deps`` because
galore-torch declares ``transformers`` and ``bitsandbytes`` (hundreds of MB,
CUDA libraries) but ``GaLoreAdamW`` needs neither: the script imports
``galore_torch.adamw`` without the package ``__init__`` (which imports the
8-bit and Adafactor optimizers, i.e. bitsandbytes and transformers), and,
when transformers is not installed, gives ``adamw.py`` a stand-in for the
one thing it takes from it (``transformers.utils.versions.require_version``,
a ``torch>=1.5`` check). ``torch==2.13.0`` resolves to a CPU build on this
project's machines. Elsewhere PyPI's Linux wheel of torch brings several GB
of CUDA packages; any torch >= 1.5 works, and ``--torch-requirement`` takes
other pip arguments, e.g.
``--torch-requirement "torch --index-url https://download.pytorch.org/whl/cpu"``.

The default run (250 updates, 4 refreshes after the first projection,
float32 and float64) takes about a minute on 2 CPU cores; PyTorch runs on
``--threads`` (1) threads.

Writes ``benchmarks/results/torch_galore.md``.

Example:
  python -m benchmarks.torch_galore --steps 250 --update-gap 50 --rank 8
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.metadata
import importlib.util
import shlex
import subprocess
import sys
import types
from typing import Any, NamedTuple


import jax
import jax.numpy as jnp
import numpy as np
import optax

from benchmarks import common
import subspace_jax as sj
from subspace_jax import projection as sj_projection

TORCH_REQUIREMENT = "torch==2.13.0"
GALORE_REQUIREMENT = "galore-torch==1.0"
# JAX chains / controls; "signs64" only in a float64 run.
VARIANTS = ("optax", "+eps", "exact", "signs")


# --------------------------------------------------------------------------
# Importing (and optionally installing) torch and galore-torch.


def _pip_commands(need_torch: bool, need_galore: bool, torch_req: str):
  cmds = []
  if need_torch:
    cmds.append([sys.executable, "-m", "pip", "install", *shlex.split(torch_req)])
  if need_galore:
    cmds.append(
        [sys.executable, "-m", "pip", "install", "--no-deps", GALORE_REQUIREMENT]
    )
  return cmds


def _load_galore_adamw():
  """``GaLoreAdamW`` without the package ``__init__`` (see the docstring)."""
  spec = importlib.util.find_spec("galore_torch")
  if spec is None or not spec.submodule_search_locations:
    raise ImportError("galore_torch is not installed")
  pkg = sys.modules.get("galore_torch")
  if pkg is None:
    # A bare package object: its submodules import, its __init__ does not run.
    pkg = types.ModuleType("galore_torch")
    pkg.__path__ = list(spec.submodule_search_locations)
    pkg.__package__ = "galore_torch"
    sys.modules["galore_torch"] = pkg
  stubs = []
  if (
      "transformers" not in sys.modules
      and importlib.util.find_spec("transformers") is None
  ):
    # adamw.py imports transformers only for require_version("torch>=1.5.0").
    def require_version(requirement, hint=None):
      del requirement, hint

    for name in ("transformers", "transformers.utils",
                 "transformers.utils.versions"):
      mod = types.ModuleType(name)
      mod.__path__ = []
      sys.modules[name] = mod
      stubs.append(name)
    sys.modules["transformers.utils.versions"].require_version = require_version
  try:
    adamw = importlib.import_module("galore_torch.adamw")
  finally:
    for name in stubs:
      sys.modules.pop(name, None)
  return adamw.AdamW


def import_torch_galore(install: bool, torch_req: str):
  """``(torch, GaLoreAdamW)``, installing them first with ``install``."""
  need_torch = importlib.util.find_spec("torch") is None
  need_galore = importlib.util.find_spec("galore_torch") is None
  if need_torch or need_galore:
    cmds = _pip_commands(need_torch, need_galore, torch_req)
    if not install:
      lines = "\n".join("  " + shlex.join(c) for c in cmds)
      raise SystemExit(
          "This benchmark needs PyTorch and galore-torch (optional, not part "
          "of the default install). Install them with\n"
          f"{lines}\n"
          "or rerun with --install. (--no-deps: galore-torch's declared "
          "transformers/bitsandbytes dependencies are not needed for "
          "GaLoreAdamW.)"
      )
    for cmd in cmds:
      print("+", " ".join(cmd), flush=True)
      subprocess.check_call(cmd)
    importlib.invalidate_caches()
  import torch  # pylint: disable=g-import-not-at-top

  return torch, _load_galore_adamw()


# --------------------------------------------------------------------------
# The problem: a small tanh MLP, fixed batches, fixed initial weights.


def make_problem(dims, steps, batch, seed):
  """Initial weights, inputs and targets of ``steps`` batches (float64)."""
  rng = np.random.default_rng(seed)
  params = {}
  for i, (m, n) in enumerate(zip(dims[:-1], dims[1:]), start=1):
    params[f"w{i}"] = rng.normal(size=(m, n)) / np.sqrt(m)
    params[f"b{i}"] = 0.1 * rng.normal(size=(n,))
  # Targets from a random teacher of the same form, plus noise.
  teacher = [rng.normal(size=(m, n)) / np.sqrt(m)
             for m, n in zip(dims[:-1], dims[1:])]
  xs = rng.normal(size=(steps, batch, dims[0]))
  h = xs
  for k, a in enumerate(teacher):
    h = h @ a
    if k < len(teacher) - 1:
      h = np.tanh(h)
  ys = h + 0.1 * rng.normal(size=h.shape)
  return params, xs, ys


def _forward(params, x, tanh, nlayers):
  h = x
  for i in range(1, nlayers + 1):
    h = h @ params[f"w{i}"] + params[f"b{i}"]
    if i < nlayers:
      h = tanh(h)
  return h


# --------------------------------------------------------------------------
# PyTorch run.


def run_torch(torch, adamw_cls, problem, args, dtype_name):
  params0, xs, ys = problem
  dtype = {"float32": torch.float32, "float64": torch.float64}[dtype_name]
  torch.manual_seed(args.seed)
  torch.use_deterministic_algorithms(True)
  torch.set_num_threads(args.threads)
  nlayers = len(args.dims) - 1
  params = {
      k: torch.tensor(v, dtype=dtype).requires_grad_(True)
      for k, v in params0.items()
  }
  mats = [params[f"w{i}"] for i in range(1, nlayers + 1)]
  vecs = [params[f"b{i}"] for i in range(1, nlayers + 1)]
  opt = adamw_cls(
      [
          {"params": mats, "rank": args.rank,
           "update_proj_gap": args.update_gap, "scale": args.scale,
           "proj_type": "std"},
          {"params": vecs},
      ],
      lr=args.lr, betas=(args.b1, args.b2), eps=args.eps,
      weight_decay=args.weight_decay, no_deprecation_warning=True,
  )
  out = {"params": [], "grads": [], "loss": [], "proj": {}}
  for t in range(args.steps):
    x = torch.tensor(xs[t], dtype=dtype)
    y = torch.tensor(ys[t], dtype=dtype)
    opt.zero_grad(set_to_none=True)
    loss = ((_forward(params, x, torch.tanh, nlayers) - y) ** 2).mean()
    loss.backward()
    out["grads"].append({k: p.grad.detach().numpy().copy()
                         for k, p in params.items()})
    opt.step()
    out["loss"].append(float(loss.detach()))
    out["params"].append({k: p.detach().numpy().copy()
                          for k, p in params.items()})
    if t % args.update_gap == 0:
      proj = {}
      for i, p in enumerate(mats, start=1):
        q = opt.state[p]["projector"].ortho_matrix.detach().numpy().copy()
        # 'right' (rows >= cols): Vhᵣ, r×n; 'left': Uᵣ, m×r. As d×r here.
        proj[f"w{i}"] = q.T if p.shape[0] >= p.shape[1] else q
      out["proj"][t] = proj
  return out


# --------------------------------------------------------------------------
# JAX run.


class OfficialAdamState(NamedTuple):
  count: jax.Array
  mu: Any
  nu: Any


def official_adam(b1: float, b2: float, eps: float):
  """Adam with eps where galore-torch's AdamW puts it.

  ``m / (√v + eps) · √(1 − β₂ᵗ) / (1 − β₁ᵗ)`` (bias correction after eps), a
  gradient-only transform for ``sj.galore``'s ``inner``.
  """

  def init_fn(params):
    return OfficialAdamState(
        count=jnp.zeros([], jnp.int32),
        mu=jax.tree.map(jnp.zeros_like, params),
        nu=jax.tree.map(jnp.zeros_like, params),
    )

  def update_fn(updates, state, params=None):
    del params
    count = optax.safe_int32_increment(state.count)
    mu = jax.tree.map(lambda m, g: b1 * m + (1 - b1) * g, state.mu, updates)
    nu = jax.tree.map(lambda v, g: b2 * v + (1 - b2) * g * g, state.nu, updates)

    def one(m, v):
      t = count.astype(m.dtype)
      factor = jnp.sqrt(1 - b2**t) / (1 - b1**t)
      return m / (jnp.sqrt(v) + eps) * factor

    return jax.tree.map(one, mu, nu), OfficialAdamState(count, mu, nu)

  return optax.GradientTransformation(init_fn, update_fn)


def make_chain(variant: str, args) -> optax.GradientTransformation:
  if variant == "optax":
    inner = optax.scale_by_adam(b1=args.b1, b2=args.b2, eps=args.eps)
  else:
    inner = official_adam(args.b1, args.b2, args.eps)
  parts = [
      sj.galore(inner, rank=args.rank, update_gap=args.update_gap,
                scale=args.scale, side="std"),
  ]
  if variant in ("exact", "signs"):
    # θ ← (θ − lr·u)(1 − lr·wd)  ==  θ − lr·((1 − lr·wd)·u + wd·θ)
    parts.append(optax.scale(1.0 - args.lr * args.weight_decay))
  parts += [
      optax.add_decayed_weights(args.weight_decay),
      optax.scale_by_learning_rate(args.lr),
  ]
  return optax.chain(*parts)


def run_jax(problem, args, variant, dtype_name):
  params0, xs, ys = problem
  dtype = jnp.dtype(dtype_name)
  nlayers = len(args.dims) - 1
  tx = make_chain(variant, args)

  def loss_fn(params, x, y):
    return jnp.mean((_forward(params, x, jnp.tanh, nlayers) - y) ** 2)

  @jax.jit
  def step(params, opt_state, x, y):
    loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss, grads

  params = {k: jnp.asarray(v, dtype) for k, v in params0.items()}
  opt_state = tx.init(params)
  out = {"params": [], "grads": [], "loss": [], "proj": {}}
  for t in range(args.steps):
    x = jnp.asarray(xs[t], dtype)
    y = jnp.asarray(ys[t], dtype)
    params, opt_state, loss, grads = step(params, opt_state, x, y)
    out["loss"].append(float(loss))
    out["grads"].append({k: np.asarray(v) for k, v in grads.items()})
    out["params"].append({k: np.asarray(v) for k, v in params.items()})
    if t % args.update_gap == 0:
      out["proj"][t] = {k: np.asarray(v)
                        for k, v in opt_state[0].projections.items()
                        if not isinstance(v, optax.MaskedNode)}
  return out


# --------------------------------------------------------------------------
# Comparison.


def _maxdiff(a: dict, b: dict, keys=None) -> float:
  keys = a.keys() if keys is None else keys
  return max(float(np.max(np.abs(np.asarray(a[k], np.float64)
                                 - np.asarray(b[k], np.float64))))
             for k in keys)


def compare_projections(ref, run, args):
  """One row per (refresh, matrix): singular gap, same-input SVD, signs."""
  rows = []
  for t in sorted(ref["proj"]):
    for name, p_torch in ref["proj"][t].items():
      g = ref["grads"][t][name].astype(np.float32)
      m, n = g.shape
      right = m >= n  # torch 'std': project the columns when rows >= cols
      r = min(args.rank, m, n)
      # sj's SVD of the *same* gradient, called as sj.galore calls it.
      p_same = np.asarray(
          sj_projection.svd_subspace(jnp.asarray(g), r, right=right)
      )
      same_dots = np.sum(p_same * p_torch, axis=0)
      p_same = p_same * np.where(same_dots < 0, -1.0, 1.0)
      s = np.linalg.svd(g.astype(np.float64), compute_uv=False)
      gaps = -np.diff(s[: r + 1])
      p_run = np.asarray(run["proj"][t][name], np.float64)
      dots = np.sum(p_torch * p_run, axis=0)
      aligned = p_run * np.where(dots < 0, -1.0, 1.0)
      rows.append({
          "step": t + 1,
          "name": name,
          "shape": f"{m}×{n}",
          "side": "cols (Vhᵣᵀ)" if right else "rows (Uᵣ)",
          "gap": float(np.min(gaps) / s[0]) if gaps.size else float("nan"),
          "same_input": float(np.max(np.abs(p_same - p_torch))),
          "same_flips": int(np.sum(same_dots < 0)),
          "in_run": float(np.max(np.abs(aligned - p_torch))),
          "flips": int(np.sum(dots < 0)),
      })
  return rows


def summarize(refs, runs, args):
  steps, gap = args.steps, args.update_gap
  official = refs["official"]
  names = list(official["params"][0].keys())
  ref_of = lambda v: refs.get(v, official)
  per_step = []
  for t in range(steps):
    row = {"step": t + 1, "refresh": t % gap == 0, "loss": official["loss"][t]}
    for v, run in runs.items():
      row[v] = _maxdiff(ref_of(v)["params"][t], run["params"][t])
    row["dgrad"] = _maxdiff(official["grads"][t], runs["exact"]["grads"][t])
    row["dloss"] = abs(official["loss"][t] - runs["exact"]["loss"][t])
    row["moved"] = max(
        float(np.max(np.abs(official["params"][t][k] - official["params0"][k])))
        for k in names
    )
    per_step.append(row)
  windows = []
  for start in range(0, steps, gap):
    block = per_step[start:start + gap]
    windows.append({
        "label": f"{start + 1}–{start + len(block)}",
        **{v: max(r[v] for r in block) for v in runs},
        "moved": max(r["moved"] for r in block),
    })
  overall = {v: max(r[v] for r in per_step) for v in runs}
  per_leaf = {
      v: {k: max(_maxdiff(ref_of(v)["params"][t], run["params"][t], [k])
                 for t in range(steps)) for k in names}
      for v, run in runs.items()
  }
  return per_step, windows, overall, per_leaf


def _e(x: float) -> str:
  return f"{x:.2e}"


def _sign_of_largest(q, abs_, argmax, take):
  """±1 per column of ``q``: the sign of its entry of largest magnitude."""
  idx = argmax(abs_(q), 0)
  s = take(q, idx)
  return (s >= 0) * 2.0 - 1.0


@contextlib.contextmanager
def canonical_signs(torch, adamw_cls, svd_in_float32: bool = True):
  """Both codes' SVDs with one sign rule (the control runs).

  Inside, galore-torch's projector (swapped in ``galore_torch.adamw``) and
  ``subspace_jax.projection.svd_subspace`` (which ``sj.galore`` looks up at
  trace time) flip each singular vector so that its entry of largest
  magnitude is positive. With ``svd_in_float32=False`` both also do the SVD
  in the gradient's own dtype instead of float32 (the ``signs64`` control of
  a float64 run). Both are restored on exit.
  """
  adamw_mod = sys.modules[adamw_cls.__module__]
  base = adamw_mod.GaLoreProjector
  svd_subspace = sj_projection.svd_subspace

  def torch_signs(q):  # q: d×r, one singular vector per column
    return _sign_of_largest(
        q, torch.abs, lambda a, d: torch.argmax(a, dim=d),
        lambda q, i: q[i, torch.arange(q.shape[1])]).to(q.dtype)

  class CanonicalSignProjector(base):
    def get_orthogonal_matrix(self, weights, rank, type):  # pylint: disable=redefined-builtin
      if svd_in_float32:
        q = super().get_orthogonal_matrix(weights, rank, type)
      else:
        u, _, vh = torch.linalg.svd(weights.data, full_matrices=False)
        q = {"left": u[:, :rank], "right": vh[:rank]}[type]
      if type == "left":  # Uᵣ, m×r
        return q * torch_signs(q)
      if type == "right":  # Vhᵣ, r×n
        return q * torch_signs(q.T)[:, None]
      return q

  def canonical_svd_subspace(g, rank, *, right=False, dtype=jnp.float32):
    if svd_in_float32:
      q = svd_subspace(g, rank, right=right, dtype=dtype)
    else:
      u, _, vh = jnp.linalg.svd(g, full_matrices=False)
      q = (vh[:rank].T if right else u[:, :rank]).astype(dtype)
    signs = _sign_of_largest(
        q, jnp.abs, lambda a, d: jnp.argmax(a, axis=d),
        lambda q, i: q[i, jnp.arange(q.shape[1])])
    return q * signs.astype(q.dtype)

  adamw_mod.GaLoreProjector = CanonicalSignProjector
  sj_projection.svd_subspace = canonical_svd_subspace
  try:
    yield
  finally:
    adamw_mod.GaLoreProjector = base
    sj_projection.svd_subspace = svd_subspace


def variants_of(dtype_name):
  return VARIANTS + (("signs64",) if dtype_name == "float64" else ())


def run_dtype(torch, adamw_cls, problem, args, dtype_name):
  np_dtype = np.float32 if dtype_name == "float32" else np.float64
  x64 = dtype_name == "float64"
  params0 = {k: v.astype(np_dtype) for k, v in problem[0].items()}
  refs, runs = {}, {}
  print(f"[{dtype_name}] PyTorch GaLoreAdamW ...", flush=True)
  refs["official"] = run_torch(torch, adamw_cls, problem, args, dtype_name)
  with jax.enable_x64(x64):
    for v in ("optax", "+eps", "exact"):
      print(f"[{dtype_name}] sj.galore chain {v!r} ...", flush=True)
      runs[v] = run_jax(problem, args, v, dtype_name)
  for v in variants_of(dtype_name)[3:]:
    with canonical_signs(torch, adamw_cls, svd_in_float32=v == "signs"):
      print(f"[{dtype_name}] control {v!r}: PyTorch, then sj.galore 'exact'",
            flush=True)
      refs[v] = run_torch(torch, adamw_cls, problem, args, dtype_name)
      with jax.enable_x64(x64):
        runs[v] = run_jax(problem, args, "exact", dtype_name)
  for ref in refs.values():
    ref["params0"] = params0
  per_step, windows, overall, per_leaf = summarize(refs, runs, args)
  proj_rows = compare_projections(refs["official"], runs["exact"], args)
  signs_rows = compare_projections(refs["signs"], runs["signs"], args)
  for row, srow in zip(proj_rows, signs_rows):
    row["signs_in_run"] = srow["in_run"]
    row["signs_flips"] = srow["flips"]
  out = {"per_step": per_step, "windows": windows, "overall": overall,
         "per_leaf": per_leaf, "proj": proj_rows,
         "variants": variants_of(dtype_name)}
  if x64:
    out["identity_check"] = float64_identity_check()
  return out


def float64_identity_check() -> float:
  """``max |u − P (Pᵀ G)|`` of ``sj.galore(optax.identity())`` in float64."""
  with jax.enable_x64(True):
    g = {"w": jax.random.normal(jax.random.key(0), (8, 16), jnp.float64)}
    tx = sj.galore(optax.identity(), rank=4, side="std")
    u, state = tx.update(g, tx.init(g))
    p = state.projections["w"]
    return float(jnp.max(jnp.abs(u["w"] - p @ (p.T @ g["w"]))))


def print_result(dtype_name, res, args):
  del args
  variants = res["variants"]
  print(f"\n[{dtype_name}] max |Δθ| (PyTorch − JAX) per projection window:")
  print(f"  {'updates':>10} " + " ".join(f"{v:>9}" for v in variants)
        + "   max|θ−θ₀|")
  for w in res["windows"]:
    print(f"  {w['label']:>10} " + " ".join(f"{_e(w[v]):>9}" for v in variants)
          + f"   {_e(w['moved'])}")
  print(f"  {'all':>10} " + " ".join(f"{_e(res['overall'][v]):>9}"
                                     for v in variants))
  print(f"[{dtype_name}] projections (`exact` chain vs PyTorch):")
  for r in res["proj"]:
    print(f"  update {r['step']:>4} {r['name']} {r['shape']:>7} gap "
          f"{r['gap']:.1e}  same input: {r['same_flips']} flips, |ΔP| "
          f"{_e(r['same_input'])}  in run: {r['flips']} flips, |ΔP| "
          f"{_e(r['in_run'])}  `signs`: {r['signs_flips']} flips, |ΔP| "
          f"{_e(r['signs_in_run'])}")


def markdown(results, args, torch, *, command="python -m benchmarks.torch_galore",
             code=None):
  gap = args.update_gap
  torch_v = torch.__version__
  galore_v = importlib.metadata.version("galore-torch")
  dims = "→".join(str(d) for d in args.dims)
  shapes = ", ".join(f"w{i} {m}×{n}" for i, (m, n) in
                     enumerate(zip(args.dims[:-1], args.dims[1:]), start=1))
  refreshes = list(range(1, args.steps + 1, gap))
  lines = [
      "# Official PyTorch GaLore vs `sj.galore`",
      "",
      common.provenance(command, commit_id=code),
      f"PyTorch {torch_v} (LAPACK: "
      f"{'MKL' if torch.backends.mkl.is_available() else 'not MKL'}), "
      f"galore-torch {galore_v} (`GaLoreAdamW`), numpy {np.__version__}.",
      "",
      *([args.note, ""] if args.note else []),
      f"Problem: tanh MLP {dims} ({shapes}, one bias per layer), mean squared "
      f"error against a random teacher plus noise, batch {args.batch}, a new "
      f"fixed numpy batch every update, the same initial weights in both. "
      f"GaLore on the matrices (rank {args.rank}, gap {gap}, scale "
      f"{args.scale}, `proj_type='std'` / `side=\"std\"`), plain AdamW on the "
      f"biases; lr {args.lr}, betas ({args.b1}, {args.b2}), eps {args.eps}, "
      f"weight decay {args.weight_decay}. Projections are computed at "
      f"updates {', '.join(map(str, refreshes))} (update k uses the "
      f"optimizer's step counter k − 1).",
      "",
      "JAX chains (the first three against one PyTorch run):",
      "",
      "* `optax`: `sj.galore(optax.scale_by_adam(b1, b2, eps), side=\"std\")`"
      " → `add_decayed_weights(wd)` → `scale_by_learning_rate(lr)`;",
      "* `+eps`: inner = `official_adam` (this script: "
      "`m/(√v+eps)·√(1−β₂ᵗ)/(1−β₁ᵗ)`, eps before the bias correction, as "
      "galore-torch);",
      "* `exact`: `+eps` with `optax.scale(1 − lr·wd)` before the decay, "
      "i.e. galore-torch's `θ ← (θ − lr·u)(1 − lr·wd)`;",
      "* `signs` (a control): the `exact` chain against a second PyTorch run, "
      "both with one sign rule for the SVD (each singular vector flipped so "
      "that its largest-magnitude entry is positive; galore-torch's projector "
      "and `subspace_jax.projection.svd_subspace` patched for this run "
      "only);",
      "* `signs64` (a control, float64 runs only): as `signs`, with both SVDs "
      "in float64 instead of float32.",
      "",
  ]
  for dtype_name, res in results.items():
    variants = res["variants"]
    lines += [
        f"## {dtype_name}",
        "",
        "Max |Δθ| between PyTorch and JAX over all parameters, per projection "
        "window (window 1 is before the first refresh), and the largest "
        "distance the PyTorch weights moved from their start, for scale:",
        "",
        "| updates | " + " | ".join(f"`{v}`" for v in variants)
        + " | max \\|θ − θ₀\\| |",
        "|---|" + "---|" * (len(variants) + 1),
    ]
    for w in res["windows"]:
      lines.append(f"| {w['label']} | "
                   + " | ".join(_e(w[v]) for v in variants)
                   + f" | {_e(w['moved'])} |")
    lines.append("| **all** | "
                 + " | ".join(f"**{_e(res['overall'][v])}**" for v in variants)
                 + " | |")
    lines += [
        "",
        "Per parameter (max over all updates): "
        + "; ".join(
            f"`{v}`: " + ", ".join(f"{k} {_e(x)}"
                                   for k, x in res["per_leaf"][v].items())
            for v in variants) + ".",
        "",
        "Projections at each refresh. *gap*: smallest distance between "
        "neighbouring singular values among the top r+1, relative to s₁; "
        "*same input*: galore-torch's projection vs `sj.galore`'s SVD "
        "(`svd_subspace`, called as `sj.galore` calls it) of the same "
        "(PyTorch) gradient; *in run*: the projections the `exact` run and "
        "the PyTorch run used; *`signs`*: the same in the control runs. "
        "*flips*: singular vectors (columns of P) of opposite sign; "
        "\\|ΔP\\|: max difference after flipping those back.",
        "",
        "| update | matrix | projected | gap | same input: flips | \\|ΔP\\| "
        "| in run: flips | \\|ΔP\\| | `signs`: flips | \\|ΔP\\| |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in res["proj"]:
      lines.append(
          f"| {r['step']} | {r['name']} {r['shape']} | {r['side']} | "
          f"{r['gap']:.1e} | {r['same_flips']} | {_e(r['same_input'])} | "
          f"{r['flips']} | {_e(r['in_run'])} | "
          f"{r['signs_flips']} | {_e(r['signs_in_run'])} |")
    lines += [
        "",
        "<details><summary>Per update</summary>",
        "",
        "| update | refresh | loss (PyTorch) | \\|Δloss\\| `exact` "
        "| max \\|Δgrad\\| `exact` | " + " | ".join(f"`{v}`" for v in variants)
        + " | max \\|θ − θ₀\\| |",
        "|---|---|---|---|---|" + "---|" * (len(variants) + 1),
    ]
    for r in res["per_step"]:
      lines.append(
          f"| {r['step']} | {'yes' if r['refresh'] else ''} | "
          f"{r['loss']:.5f} | {_e(r['dloss'])} | {_e(r['dgrad'])} | "
          + " | ".join(_e(r[v]) for v in variants)
          + f" | {_e(r['moved'])} |")
    lines += ["", "</details>", ""]
  lines += explanation(results, args)
  lines += ["", common.readme_block("torch_galore", readme_text(results, args))]
  return "\n".join(lines)


def readme_text(results, args) -> str:
  """The README's paragraph: float32's `signs` and `exact` over all updates."""
  key = "float32" if "float32" in results else next(iter(results))
  res = results[key]
  signs, exact = res["overall"]["signs"], res["overall"]["exact"]
  refreshes = len(range(1, args.steps + 1, args.update_gap))
  text = (
      "**Against the official PyTorch GaLore** ([results/torch_galore.md]"
      "(torch_galore.md)): `sj.galore` with galore-torch's eps placement and "
      f"decay order follows `GaLoreAdamW` to {_e(signs)} ({key}) over "
      f"{args.steps} steps ({refreshes - 1} refreshes after the first "
      "projection) once both SVDs use one sign rule")
  if exact > 10 * signs:
    text += (f"; without it they drift to {_e(exact)} after the first "
             "refresh because the two LAPACK builds return some singular "
             "vectors with opposite signs.")
  else:
    text += f", and to {_e(exact)} without it."
  return text


def explanation(results, args):
  """The reading of the figures (computed from them, not fixed text)."""
  key = "float32" if "float32" in results else next(iter(results))
  res = results[key]
  w = res["windows"]
  first, rest = w[0], w[1:]
  later = lambda v: max((x[v] for x in rest), default=float("nan"))
  last_first = first["label"].split("–")[1]
  proj = res["proj"]
  by_matrix = {}
  for r in proj:
    d = by_matrix.setdefault(r["name"], {"shape": r["shape"], "side": r["side"],
                                         "flips": 0, "total": 0})
    d["flips"] += r["same_flips"]
    d["total"] += min(args.rank, *map(int, r["shape"].split("×")))
  flip_text = "; ".join(
      f"{k} {d['shape']}, {d['side']}: {d['flips']} of {d['total']}"
      for k, d in by_matrix.items())
  at_first = res["per_step"][0]["exact"] >= 0.9 * first["exact"]
  worst0 = max((r for r in proj if r["step"] == 1), key=lambda r: r["in_run"])
  out = [
      "## Reading",
      "",
      f"Figures from the {key} run.",
      "",
      f"* `optax` → `+eps` (updates 1–{last_first}: {_e(first['optax'])} → "
      f"{_e(first['+eps'])}): optax's Adam adds eps to √v̂; galore-torch "
      "adds it to √v and bias-corrects afterwards, an effective eps of "
      f"eps/√(1−β₂ᵗ) in optax terms ({1 / np.sqrt(1 - args.b2):.1f}·eps at "
      "the first update, → eps as t grows). No stock optax transform puts eps "
      "there; the script's `official_adam` does.",
      f"* `+eps` → `exact` ({_e(first['+eps'])} → {_e(first['exact'])}): "
      "galore-torch decays the already updated weights, "
      "θ ← (θ − lr·u)(1 − lr·wd); `add_decayed_weights` + "
      "`scale_by_learning_rate` decays the old ones, θ − lr·u − lr·wd·θ. "
      "They differ by lr²·wd·u per update; `optax.scale(1 − lr·wd)` before "
      "`add_decayed_weights` removes it.",
      f"* `exact`, before the first refresh (updates 1–{last_first}): max "
      f"|Δθ| {_e(first['exact'])}"
      + (", already reached at update 1 and not growing" if at_first else "")
      + ". It comes from the first SVD: the projection of "
      f"{worst0['name']} ({worst0['shape']}, relative singular gap "
      f"{worst0['gap']:.1e}) differs by {_e(worst0['in_run'])} between the two "
      "LAPACK builds (after aligning signs), which Adam's first step (≈ the "
      "sign of the projected gradient, a soft sign of width ~eps/√(1−β₂)) "
      "most likely amplifies for projected entries near zero; the float64 "
      "run below confirms the source. The side rule, the SVD convention for "
      "tall matrices (right singular vectors of the untransposed gradient), "
      "the refresh schedule and the order of scale, bias correction, learning "
      "rate and weight decay all match: a mismatch in any of them would show "
      "at the 1e-3 level (compare the `optax` column).",
      f"* `exact`, after the first refresh: max |Δθ| {_e(later('exact'))}, "
      "from the first refreshed update on. Cause: SVD sign conventions. On "
      "the very same gradient, PyTorch's LAPACK and JAX's return some "
      "singular vectors with opposite signs (flipped / all, per matrix over "
      f"all refreshes: {flip_text}). Signs are arbitrary in an SVD and "
      "neither code fixes them. At the first projection a flip does nothing (the moments are "
      "zero and Adam is odd in its input: P·D·adam(D·R) = P·adam(R) for a "
      f"diagonal ±1 D; `exact` and `signs` agree there, "
      f"{_e(first['exact'])} vs {_e(first['signs'])}), but GaLore keeps Adam's "
      "moments across a refresh, so a flipped singular vector turns the kept "
      "moments against the new projected gradient and the two runs move "
      "apart by the size of a few updates.",
      f"* `signs` (both SVDs flipped to one rule): max |Δθ| "
      f"{_e(first['signs'])} before the first refresh, {_e(later('signs'))} "
      f"after, {_e(res['overall']['signs'])} over all {args.steps} updates "
      f"and {len(w) - 1} refreshes: with equal signs the two "
      "implementations stay together, so nothing but the signs separates "
      "them.",
  ]
  if "float64" in results:
    f64 = results["float64"]
    same_size = (": the same size as in float32, though all other arithmetic "
                 "is now float64" if key != "float64" else "")
    w0 = max((r for r in f64["proj"] if r["step"] == 1),
             key=lambda r: r["in_run"])
    out.append(
        f"* float64 (everything in float64 but the SVD, which both codes do "
        "in float32: galore-torch casts to float, `svd_subspace` to "
        f"float32): `exact` {_e(f64['windows'][0]['exact'])} before the first "
        f"refresh, `signs` {_e(f64['overall']['signs'])} overall, with the "
        f"first projection of {w0['name']} differing by {_e(w0['in_run'])}"
        f"{same_size}. With the SVD in float64 too (`signs64`): "
        f"{_e(f64['overall']['signs64'])} over all updates. So the residual "
        "of `exact`/`signs` is the float32 SVD of two LAPACK builds.")
    check = f64["identity_check"]
    if check > 1e-12:
      out.append(
          f"* `signs64` ({_e(f64['overall']['signs64'])}) is not rounding of "
          "float64: the projection PᵀG and P·U ran in float32 for float64 "
          "leaves. Check (identity inner transform, float64 8×16 gradient, "
          f"rank 4): max |update − P(PᵀG)| = {_e(check)} instead of ~1e-16. "
          "Harmless for float32/bfloat16 parameters (there float32 is an "
          "upcast), a precision loss for float64 ones.")
    else:
      out.append(
          "* A float64 leaf is projected in float64. Check (identity inner "
          "transform, float64 8×16 gradient, rank 4): max |update − P(PᵀG)| "
          f"= {_e(check)}, float64 rounding; so `signs64` "
          f"({_e(f64['overall']['signs64'])}) is float64 rounding too.")
  out.append(
      "* With the same sign rule `sj.galore` follows galore-torch's "
      "`GaLoreAdamW` to float32 SVD precision over every refresh: no "
      "discrepancy in the algorithm (side, signs for tall matrices, refresh "
      "schedule, kept moments, scale).")
  return out


def main(argv=None):
  parser = argparse.ArgumentParser(
      description=__doc__.splitlines()[0],
      formatter_class=argparse.ArgumentDefaultsHelpFormatter,
  )
  parser.add_argument("--steps", type=int, default=250,
                      help="optimizer updates")
  parser.add_argument("--rank", type=int, default=8, help="GaLore rank")
  parser.add_argument("--update-gap", type=int, default=50,
                      help="updates between projection refreshes")
  parser.add_argument("--scale", type=float, default=0.25,
                      help="GaLore scale (alpha) on the back-projected update")
  parser.add_argument("--lr", type=float, default=1e-2, help="learning rate")
  parser.add_argument("--weight-decay", type=float, default=0.1,
                      help="decoupled weight decay")
  parser.add_argument("--b1", type=float, default=0.9, help="Adam beta1")
  parser.add_argument("--b2", type=float, default=0.999, help="Adam beta2")
  parser.add_argument("--eps", type=float, default=1e-6,
                      help="Adam eps (galore-torch's default is 1e-6)")
  parser.add_argument("--dims", default="24,64,64,10",
                      help="layer widths of the MLP, input first")
  parser.add_argument("--batch", type=int, default=32, help="batch size")
  parser.add_argument("--seed", type=int, default=0,
                      help="seed of the weights and the data")
  parser.add_argument("--dtypes", default="float32,float64",
                      help="comma-separated dtypes to run (float32, float64)")
  parser.add_argument("--threads", type=int, default=1,
                      help="PyTorch intra-op threads")
  parser.add_argument("--install", action="store_true",
                      help="pip-install torch and galore-torch (--no-deps) "
                           "if they are missing")
  parser.add_argument("--torch-requirement", default=TORCH_REQUIREMENT,
                      help="pip arguments --install uses when torch is missing "
                           "(split like a shell command line)")
  common.add_output_flags(parser, "torch_galore.md")
  args = parser.parse_args(argv)
  code = common.commit()  # before the run: later edits do not count
  args.dims = [int(d) for d in args.dims.split(",")]
  dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
  for d in dtypes:
    if d not in ("float32", "float64"):
      parser.error(f"unknown dtype {d!r}")
  if len(args.dims) < 2:
    parser.error("--dims needs at least two widths")

  torch, adamw_cls = import_torch_galore(args.install, args.torch_requirement)
  problem = make_problem(args.dims, args.steps, args.batch, args.seed)
  results = {}
  for d in dtypes:
    results[d] = run_dtype(torch, adamw_cls, problem, args, d)
    print_result(d, results[d], args)
  common.write(args.out, markdown(
      results, args, torch, code=code,
      command=common.command_line("benchmarks.torch_galore", argv)))


if __name__ == "__main__":
  main()
