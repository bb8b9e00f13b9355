"""Speed of the optimizers' train steps and of the projection refresh.

Four parts, each a ratio of runs taken alternately in one process after a
warm-up (see "How we measure" in DESIGN.md):

* ``step``: the steady (non-refresh) train step of every optimizer divided
  by AdamW's, for a LLaMA built with ``train.setup`` on a one-device mesh and
  a batch of random tokens. ``update_gap`` is huge, so only the warm-up's
  step 0 changes the subspace and every timed step is a steady one.
* ``refresh``: the refresh step (``count % update_gap == 0``: GaLore's SVD,
  a new random subspace, RSO's reset) divided by AdamW's step, with
  ``update_gap = 1`` so that every step is a refresh.
* ``update``: the jitted optimizer update alone (transform mode, steady), on
  random gradients, divided by AdamW's update: the optimizer's own cost.
* ``projection``: the projection refresh alone, full SVD vs the fast
  randomized subspace (cold and warm-started), with the captured energy
  (functions of ``benchmarks/projection_refresh.py``).

Optimizer names: ``adamw``, ``galore``, ``golore``, ``rso`` (transform mode)
and ``golore-model``, ``rso-model`` (model mode); a ``:householder`` suffix
(``golore:householder``) traces the step with the previous Stiefel sampler
(``jax.random.normal`` + Householder QR) instead of the current one, for a
before/after comparison in the same process.

On a GPU the ``step`` part also prints absolute tokens/s and MFU
(``6 · N · tokens/s / peak``, N = all parameters).

OpenBLAS (JAX's CPU LAPACK) is limited to one thread unless
``OPENBLAS_NUM_THREADS`` is already set: see projection_refresh.py.

Example:
  python benchmarks/speed.py --parts step --reps 5
  python -m benchmarks.speed --parts projection --shapes 4096x11008 --ranks 512
"""

from __future__ import annotations

import os

# Before NumPy or JAX load OpenBLAS (see projection_refresh.py).
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse  # pylint: disable=wrong-import-position
import shlex  # pylint: disable=wrong-import-position
import sys  # pylint: disable=wrong-import-position
import time  # pylint: disable=wrong-import-position


import jax  # pylint: disable=wrong-import-position
import jax.numpy as jnp  # pylint: disable=wrong-import-position
import numpy as np  # pylint: disable=wrong-import-position

from benchmarks import common  # pylint: disable=wrong-import-position
from benchmarks import projection_refresh as pr  # pylint: disable=wrong-import-position
from subspace_jax import projection as proj  # pylint: disable=wrong-import-position
from subspace_jax import models  # pylint: disable=wrong-import-position
from subspace_jax.models import llama  # pylint: disable=wrong-import-position
from subspace_jax import sharding as shd  # pylint: disable=wrong-import-position
from subspace_jax.train import step as train  # pylint: disable=wrong-import-position

PARTS = ("step", "refresh", "update", "projection")
DEFAULT_OPTIMIZERS = "adamw,galore,golore,rso,golore-model,rso-model"
# Dense peak FLOP/s by GPU (device_kind substring): (bf16, tf32).
PEAK_FLOPS = {
    "H200": (989e12, 494e12),
    "H100": (989e12, 494e12),
    "A100": (312e12, 156e12),
}
STEADY_TARGET = 1.10   # transform-mode steady step / AdamW
_LOADS: list[float] = []  # 1-minute load average after every timed round
_MEDIANS: dict[str, dict[str, float]] = {}  # part -> optimizer -> median ratio
MODEL_RSO_TARGET = 0.8  # model-mode RSO step / AdamW


def _legacy_stiefel(key, m, rank, *, dtype=jnp.float32):
  """The previous sampler: ``jax.random.normal`` + Householder QR."""
  z = jax.random.normal(key, (m, rank), jnp.float32)
  return proj._householder_q(z).astype(dtype)  # pylint: disable=protected-access


class Variant:
  """One optimizer's compiled function and its live state: ``run()`` takes
  one step (or update) and blocks until it is done."""

  def __init__(self, name, fn, state, *args):
    self.name, self.fn, self.state, self.args = name, fn, state, args

  def run(self):
    self.state, out = self.fn(self.state, *self.args)
    jax.block_until_ready((self.state, out))
    return out


def optimizer_config(name: str, args, update_gap: int) -> train.OptimizerConfig:
  opt, _, mode = name.partition(":")[0].partition("-")
  kw = dict(name=opt, rank=args.rank, update_gap=update_gap,
            warmup_steps=10, total_steps=10**6)
  if mode:
    kw["subspace_mode"] = mode
  return train.OptimizerConfig(**kw)


def random_batch(cfg: llama.LlamaConfig, batch: int, seq: int, seed: int = 0):
  toks = jax.random.randint(jax.random.key(seed), (batch, seq + 1), 0,
                            cfg.vocab_size)
  return {"inputs": toks[:, :-1], "targets": toks[:, 1:]}


def _compile(name, jitted, *args):
  """``jitted.lower(*args).compile()``, traced with the legacy sampler for a
  ``:householder`` name."""
  saved = proj.stiefel
  if name.endswith(":householder"):
    proj.stiefel = _legacy_stiefel
  try:
    return jitted.lower(*args).compile()
  finally:
    proj.stiefel = saved


def build_step(name: str, cfg, args, update_gap: int, mesh, log) -> Variant:
  """Compiles ``name``'s train step and runs ``args.warmup`` steps."""
  t0 = time.perf_counter()
  s = train.setup(cfg, optimizer_config(name, args, update_gap), mesh)
  state = s.init(0)
  batch = jax.device_put(random_batch(cfg, args.batch, args.seq),
                         s.batch_sharding)
  v = Variant(name, _compile(name, s.train_step, state, batch), state, batch)
  for _ in range(args.warmup):
    metrics = v.run()
  log(f"  {name} (update_gap={update_gap}): compiled and warmed up in "
      f"{time.perf_counter() - t0:.0f}s, loss {float(metrics['loss']):.3f}")
  return v


def build_update(name: str, cfg, args, update_gap: int, mesh, log) -> Variant:
  """Compiles ``name``'s optimizer update alone (random gradients)."""
  del mesh
  t0 = time.perf_counter()
  tx, _ = train.make_optimizer(optimizer_config(name, args, update_gap),
                             models.MODELS["llama"])
  params = train.ModelDef(cfg).init(0)
  grads = jax.tree.map(
      lambda x: 1e-3 * jax.random.normal(jax.random.key(1), x.shape, x.dtype),
      params)
  # (opt_state, grads, params) -> (opt_state, updates), the state donated.
  fn = jax.jit(lambda st, g, p: tx.update(g, st, p)[::-1], donate_argnums=0)
  state = tx.init(params)
  v = Variant(name, _compile(name, fn, state, grads, params), state, grads,
              params)
  for _ in range(args.warmup):
    v.run()
  log(f"  {name} update (update_gap={update_gap}): compiled and warmed up in "
      f"{time.perf_counter() - t0:.0f}s")
  return v


def alternate(variants: list[Variant], reps: int, log) -> dict[str, np.ndarray]:
  """``reps`` rounds of one run of each variant in turn: seconds per run."""
  times = {v.name: [] for v in variants}
  loads = []
  for i in range(reps):
    for v in variants:
      t = time.perf_counter()
      v.run()
      times[v.name].append(time.perf_counter() - t)
    loads.append(os.getloadavg()[0])
    _LOADS.append(loads[-1])
    log(f"  round {i + 1}/{reps}: " + ", ".join(
        f"{n} {t[-1]:.3f}s" for n, t in times.items()))
  times = {n: np.asarray(t) for n, t in times.items()}
  times["_load"] = np.asarray(loads)
  return times


def ratios(times, ref="adamw") -> dict[str, tuple[float, ...]]:
  """Median and quartiles of the per-round ratio ``t / t_ref``, and the
  ratio of the fastest runs (interference from other jobs only adds time,
  so the minima are the least disturbed pair)."""
  out = {}
  for n, t in times.items():
    if n.startswith("_"):
      continue
    r = t / times[ref]
    out[n] = (float(np.median(r)),
              *(float(q) for q in np.percentile(r, [25, 75])),
              float(t.min() / times[ref].min()))
  return out


def peak_flops(args, cfg) -> tuple[float | None, str]:
  if args.peak_tflops:
    return args.peak_tflops * 1e12, f"{args.peak_tflops:g} TFLOP/s (--peak-tflops)"
  kind = jax.devices()[0].device_kind
  bf16 = jnp.dtype(cfg.dtype) == jnp.bfloat16
  for key, (p16, p32) in PEAK_FLOPS.items():
    if key in kind:
      p = p16 if bf16 else p32
      what = "bf16" if bf16 else "TF32 (float32 matmuls)"
      return p, f"{p / 1e12:g} TFLOP/s, the dense {what} peak of {key}"
  return None, f"unknown for {kind!r} (pass --peak-tflops)"


def gpu_lines(times, cfg, args) -> list[str]:
  """Absolute tokens/s and MFU per optimizer (GPU only)."""
  n_params = llama.param_count(cfg)
  tokens = args.batch * args.seq
  peak, peak_text = peak_flops(args, cfg)
  lines = [
      f"Absolute throughput ({jax.devices()[0].device_kind}); MFU = 6·N·tokens/s "
      f"/ peak with N = {n_params / 1e6:.1f}M parameters (all, embeddings "
      f"included) and peak = {peak_text}.", "",
      "| optimizer | median step (ms) | tokens/s | MFU |", "|---|---|---|---|",
  ]
  for n, t in times.items():
    if n.startswith("_"):
      continue
    med = float(np.median(t))
    tps = tokens / med
    mfu = f"{6 * n_params * tps / peak:.1%}" if peak else "n/a"
    lines.append(f"| {n} | {1e3 * med:.1f} | {tps:,.0f} | {mfu} |")
  return lines


def _target_text(name, median):
  if name.startswith("rso-model"):
    return f"≤ {MODEL_RSO_TARGET}: {'met' if median <= MODEL_RSO_TARGET else 'NOT met'}"
  if name.split(":")[0] in ("galore", "golore", "rso"):
    return f"≤ {STEADY_TARGET:.2f}: {'met' if median <= STEADY_TARGET else 'NOT met'}"
  return ""


def step_section(title, names, cfg, args, update_gap, mesh, log, targets,
                 builder=build_step, what="step", part=None):
  """Builds, times and formats one table of ratios to AdamW (the medians
  are kept in ``_MEDIANS[part]`` for the README)."""
  log(f"{title}: building {', '.join(names)}")
  variants = [builder(n, cfg, args, update_gap, mesh, log) for n in names]
  log(f"{title}: timing {args.reps} alternating rounds")
  times = alternate(variants, args.reps, log)
  del variants
  rs = ratios(times)
  _MEDIANS[part or title] = {n: float(r[0]) for n, r in rs.items()}
  load = times["_load"]
  lines = [
      f"## {title}", "",
      f"Load average (1 min) during the rounds: {load.min():.1f}–{load.max():.1f} "
      f"on {os.cpu_count()} cores (this run alone accounts for about "
      f"{min(os.cpu_count(), 2)}).", "",
      f"| optimizer | {what} / AdamW's (median) | quartiles | ratio of "
      "fastest runs | target |",
      "|---|---|---|---|---|",
  ]
  for n, (med, q1, q3, mins) in rs.items():
    lines.append(f"| {n} | {med:.3f} | {q1:.3f}–{q3:.3f} | {mins:.3f} | "
                 f"{_target_text(n, med) if targets else ''} |")
    log(f"  {n}: {med:.3f} ({q1:.3f}–{q3:.3f}), fastest runs {mins:.3f}")
  if jax.devices()[0].platform == "gpu" and what == "step":
    lines += [""] + gpu_lines(times, cfg, args)
    for line in gpu_lines(times, cfg, args)[4:]:
      log("  " + line)
  return lines + [""]


def command_line() -> str:
  if __package__:
    return "python -m benchmarks.speed " + shlex.join(sys.argv[1:])
  return "python benchmarks/speed.py " + shlex.join(sys.argv[1:])


def main(argv=None):
  parser = argparse.ArgumentParser(
      description=__doc__.splitlines()[0],
      formatter_class=argparse.RawDescriptionHelpFormatter,
      epilog="\n".join(__doc__.splitlines()[2:]))
  parser.add_argument("--parts", default=",".join(PARTS),
                      help=f"comma-separated parts to run, of {', '.join(PARTS)}")
  parser.add_argument("--model", default="llama_60m", choices=list(llama.CONFIGS),
                      help="LLaMA config of the step parts")
  parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                      help="compute dtype of the model (weights stay float32)")
  parser.add_argument("--batch", type=int, default=2, help="sequences per step")
  parser.add_argument("--seq", type=int, default=256, help="sequence length")
  parser.add_argument("--rank", type=int, default=128, help="subspace rank")
  parser.add_argument("--optimizers", default=DEFAULT_OPTIMIZERS,
                      help="comma-separated optimizers of the steady part "
                           "(adamw is always added first)")
  parser.add_argument("--refresh-optimizers", default=None,
                      help="optimizers of the refresh part (default: those of "
                           "--optimizers but adamw)")
  parser.add_argument("--reps", type=int, default=10,
                      help="alternating timed rounds per step part")
  parser.add_argument("--warmup", type=int, default=2,
                      help="untimed steps after compilation (>= 1)")
  parser.add_argument("--peak-tflops", type=float, default=None,
                      help="peak FLOP/s of the GPU for MFU (default: by device)")
  parser.add_argument("--shapes", default=pr.DEFAULT_SHAPES,
                      help="projection part: comma-separated MxN shapes")
  parser.add_argument("--ranks", default=pr.DEFAULT_RANKS,
                      help="projection part: comma-separated ranks")
  parser.add_argument("--proj-repeats", type=int, default=2,
                      help="projection part: timed rounds (minimum reported)")
  common.add_output_flags(parser, "speed.md")
  args = parser.parse_args(argv)
  parts = args.parts.split(",")
  for p in parts:
    if p not in PARTS:
      parser.error(f"unknown part {p!r}; choose from {', '.join(PARTS)}")
  if args.warmup < 1:
    parser.error("--warmup must be >= 1 (step 0 is a refresh)")

  def log(msg):
    print(msg, flush=True)

  load0 = os.getloadavg()
  code = common.commit()  # before the run: later edits do not count
  cfg = llama.get_config(args.model, dtype=jnp.dtype(args.dtype))
  mesh = shd.make_mesh(devices=jax.devices()[:1])
  names = [n for n in args.optimizers.split(",") if n and n != "adamw"]
  refresh_names = (names if args.refresh_optimizers is None else
                   [n for n in args.refresh_optimizers.split(",") if n and n != "adamw"])
  on_gpu = jax.devices()[0].platform == "gpu"
  out = []
  if "step" in parts or "refresh" in parts:
    out += [
        f"Model {args.model} ({llama.param_count(cfg) / 1e6:.1f}M parameters, "
        f"compute {args.dtype}), batch {args.batch}×{args.seq} random tokens, "
        f"rank {args.rank}, one-device mesh, `train.setup`'s jitted step "
        "(gradient clipping, weight decay and schedule included). Each round "
        "times one step of every optimizer in turn (A B C … A B C …) after "
        f"compilation and {args.warmup} warm-up steps; a ratio is the median "
        f"over {args.reps} rounds of (step time / AdamW's step time in the "
        "same round)." + ("" if on_gpu else
                          " No GPU: ratios only, no absolute times."), "",
    ]
  if "step" in parts:
    out += step_section(
        "Steady step (no refresh; update_gap = 10⁶, timing after step 0)",
        ["adamw"] + names, cfg, args, 10**6, mesh, log, targets=True,
        part="step")
  if "refresh" in parts and refresh_names:
    out += step_section(
        "Refresh step (update_gap = 1: every step is a refresh) vs AdamW's step",
        ["adamw"] + refresh_names, cfg, args, 1, mesh, log, targets=False,
        part="refresh")
  update_names = ["adamw"] + [n for n in names if "-" not in n.split(":")[0]]
  if "update" in parts and len(update_names) > 1:
    out += step_section(
        "Optimizer update alone (transform mode, steady; update_gap = 10⁶)",
        update_names, cfg, args, 10**6, mesh, log, targets=False,
        builder=build_update, what="update")
    out += [
        "The jitted `tx.update` (clipping, subspace transform, weight decay, "
        "schedule) on random gradients, without the model: the optimizer's "
        "own cost relative to AdamW's update.", "",
    ]
  if "projection" in parts:
    log("projection refresh:")
    def log_load(msg):
      _LOADS.append(os.getloadavg()[0])
      log("  " + msg)

    rows = pr.run(pr.parse_shapes(args.shapes), pr.parse_ranks(args.ranks),
                  args.proj_repeats, 1.0, 8, 2, log=log_load)
    for row in rows:
      log("  " + pr.format_row(row))
    out += [
        "## Projection refresh alone: full SVD vs fast randomized subspace", "",
        pr.describe(args.proj_repeats, 1.0, 8, 2), "",
        pr.table(rows), pr.target_line(rows), "",
    ]
  if "step" in parts:
    out += [common.readme_block("speed", readme_text(args))]
  common.write(args.out, "\n".join(header(args, load0, code) + out))


_README_NAMES = {"galore": "GaLore", "golore": "GoLore", "rso": "RSO",
                 "golore-model": "GoLore model mode",
                 "rso-model": "RSO model mode"}


def readme_text(args) -> str:
  """The README's speed sentence from this run's medians."""
  steady = _MEDIANS.get("step", {})
  named = ", ".join(f"{_README_NAMES.get(n, n)} {r:.2f}"
                    for n, r in steady.items() if n != "adamw")
  text = (f"**Speed** ([results/speed.md](speed.md)): {args.model}, batch "
          f"{args.batch}×{args.seq}, rank {args.rank}, steady-step time over "
          f"AdamW's in one process (median of {args.reps} alternating rounds "
          f"on a shared {os.cpu_count()}-core CPU): {named}")
  refresh = {n: r for n, r in _MEDIANS.get("refresh", {}).items() if n != "adamw"}
  if refresh:
    random = [r for n, r in refresh.items() if n != "galore"]
    parts = []
    if "galore" in refresh:
      parts.append(f"GaLore's exact SVD {refresh['galore']:.1f}")
    if random:
      parts.append(f"the random ones {min(random):.2f}–{max(random):.2f}")
    text += f" (a refresh step: {', '.join(parts)})"
  return text + "."


def header(args, load0, code) -> list[str]:
  """Title, machine, command and how busy the machine was."""
  cores = os.cpu_count()
  during = (f"{min(_LOADS):.1f}–{max(_LOADS):.1f}" if _LOADS else "n/a")
  if _LOADS and max(_LOADS) > cores + 1:
    verdict = ("other jobs were running during the timed rounds (single "
               "times are noisy; the ratios are medians of per-round ratios)")
  elif load0[0] > 0.5:
    verdict = ("other jobs had been running just before (the load during the "
               "timed rounds is about this run's own)")
  else:
    verdict = "the machine was otherwise idle"
  return [
      "# Speed: train steps and projection refresh", "",
      common.provenance(command_line(), commit_id=code),
      f"OPENBLAS_NUM_THREADS={os.environ.get('OPENBLAS_NUM_THREADS')}. Load "
      f"average (1 min) before the run: {load0[0]:.1f}, during the timed "
      f"rounds: {during}, on {cores} cores; this run alone keeps about "
      f"{min(cores, 2)} busy, so {verdict}."
      + (f" {args.note}" if args.note else ""), "",
  ]


if __name__ == "__main__":
  main()
