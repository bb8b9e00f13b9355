"""Train-step memory: weights, gradients, optimizer state, temporaries, peak.

For each LLaMA size of the GaLore paper this compiles one bf16 train step
per optimizer on abstract inputs (``jax.ShapeDtypeStruct``: nothing is
allocated, so 7B is measured on a small machine) and splits XLA's memory
analysis with :func:`subspace_jax.memory.breakdown`. Next to it: the
analytic :func:`subspace_jax.memory.estimate` and the papers' published
figures. A focused table compares Adam, transform-mode RSO and model-level
RSO at 1B and 7B.

Writes ``benchmarks/results/memory.md``.

Example:
  python benchmarks/memory.py --models llama_1b --batches 1 --no-focus
"""

from __future__ import annotations

import argparse
import pathlib
import pickle
import sys
import time

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
  sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax
import jax.numpy as jnp
import optax

import subspace_jax as sj
from benchmarks import common
from subspace_jax import memory
from subspace_jax.models import llama
from subspace_jax.training import sharding as shd
from subspace_jax.training import train

GiB = memory.GiB

# The GaLore paper's ranks (Table 2; 7B: Table 3 / Section 5).
RANKS = {
    "llama_60m": (128,),
    "llama_130m": (256,),
    "llama_350m": (256,),
    "llama_1b": (512, 1024),
    "llama_7b": (1024,),
}
OPTIMIZERS = {
    "adamw": "optax.adamw",
    "optax_galore": "optax.contrib.galore",
    "galore": "sj.galore",
    "golore": "sj.golore",
    "rso": "sj.rso (transform)",
    "rso_model": "RSO (model-level)",
}
# Adam through train.setup: the baseline of the focused table, built exactly
# like the two RSO steps it is compared with.
SETUP_ADAM = "adamw_setup"
# optax.adamw on the unrolled model: the baseline of optax.contrib.galore.
UNROLLED_ADAM = "adamw_unrolled"
LABELS = dict(OPTIMIZERS, **{SETUP_ADAM: "Adam (train.setup)",
                             UNROLLED_ADAM: "optax.adamw"})
LOW_RANK = ("optax_galore", "galore", "golore", "rso", "rso_model")

# Published figures. GaLore paper (Zhao et al. 2024, arXiv 2403.03507),
# Table 2: "memory estimate of the total of parameters and optimizer states
# based on BF16 format", LLaMA on C4, ranks 128/256/256/512.
GALORE_TABLE2 = {
    "llama_60m": (0.36, 0.24),
    "llama_130m": (0.76, 0.52),
    "llama_350m": (2.06, 1.22),
    "llama_1b": (7.80, 4.38),
}
# RSO paper (Chen et al. 2025, arXiv 2502.07222): optimizer states of
# LLaMA-1B, Adam vs GaLore/RSO.
RSO_1B_STATES = (4.99, 1.46)


def model_config(name: str, scan: bool = True) -> llama.LlamaConfig:
  return llama.get_config(
      name, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16, scan_layers=scan)


def token_batch(batch: int, seq: int, sharding=None) -> dict:
  tokens = jax.ShapeDtypeStruct((batch, seq), jnp.int32, sharding=sharding)
  return {"inputs": tokens, "targets": tokens}


def _galore_dims(params):
  """optax.contrib.galore's projected leaves: the attention and MLP kernels
  (2-D in an unrolled model), like the LLaMA's own views (llama.views())."""
  def one(path, x):
    name = sj.matrix_view.path_str(path)
    if x.ndim != 2 or any(k in name for k in ("embed", "lm_head", "norm")):
      return None
    return optax.contrib.GaLoreDimensionNumbers()
  return jax.tree_util.tree_map_with_path(one, params)


def measure(name: str, opt: str, rank: int, batch: int, seq: int,
            options) -> dict:
  """Compiles one train step and returns its breakdown and estimate."""
  clip = optax.clip_by_global_norm(1.0)
  start = time.perf_counter()
  projections = 0
  if opt in ("adamw", "optax_galore", UNROLLED_ADAM):
    # optax.contrib.galore cannot treat the stacked layer axis of a scanned
    # model as a batch axis: its model is unrolled (2-D kernels).
    scan = opt == "adamw"
    model = train.ModelDef(model_config(name, scan))
    params = jax.eval_shape(lambda: model.init(0))
    if opt != "optax_galore":
      tx = optax.adamw(1e-3, weight_decay=0.1)
    else:
      tx = optax.contrib.galore(
          1e-3, rank=rank, weight_decay=0.1,
          weight_dimension_numbers=_galore_dims)
    b = memory.train_step_breakdown(
        model.loss, params, optax.chain(clip, tx), token_batch(batch, seq),
        compiler_options=options)
    est = memory.estimate(params, tx)
  else:
    scan = True
    cfg = train.OptimizerConfig(
        name="adamw" if opt == SETUP_ADAM else opt.removesuffix("_model"),
        rank=rank,
        subspace_mode="model" if opt.endswith("_model") else "transform")
    mesh = shd.make_mesh(devices=jax.devices()[:1])
    s = train.setup(model_config(name), cfg, mesh)
    state = s.abstract_state
    if cfg.model_mode:
      subspace = cfg.subspace(state.params.weights, llama.views())
      trainable = subspace.trainable(state.params)
      plans = [p for p in subspace.plans if p is not None]
      # float32 projections of one layer: each layer draws its own inside
      # the scanned loop, so no more than one layer's are needed at once.
      projections = sum(4 * p.dim * p.rank for p in plans)
    else:
      trainable = state.params
    b = memory.breakdown(s.train_step, state, token_batch(
        batch, seq, s.batch_sharding), gradients=trainable,
        compiler_options=options)
    est = memory.Estimate(
        weights=memory.tree_bytes(state.params),
        gradients=memory.tree_bytes(trainable),
        optimizer_state=memory.tree_bytes(state.opt_state))
  return {
      "model": name, "opt": opt, "rank": rank if opt in LOW_RANK else None,
      "batch": batch, "scan": scan, "b": b, "est": est,
      "projections": projections,
      "seconds": time.perf_counter() - start,
  }


def g(x: float) -> str:
  return f"{x / GiB:.2f}"


class Runner:
  """Measures on demand and remembers (one compile per configuration)."""

  def __init__(self, seq: int, cache_file: str | None = None):
    self.seq = seq
    self.cache: dict = {}
    self.used: set = set()
    self.cache_file = pathlib.Path(cache_file) if cache_file else None
    if self.cache_file and self.cache_file.exists():
      self.cache = pickle.loads(self.cache_file.read_bytes())

  def get(self, name, opt, rank, batch, hoist: bool) -> dict:
    key = (name, opt, rank if opt in LOW_RANK else None, batch, self.seq,
           hoist)
    self.used.add(key)
    if key not in self.cache:
      options = None if hoist else memory.NO_LOOP_HOISTING
      row = measure(name, opt, rank, batch, self.seq, options)
      b = row["b"]
      label = LABELS[opt] + ("" if row["scan"] else " (unrolled)")
      print(f"{name:>10} {label:<22} r={row['rank'] or '-':<5} "
            f"B={batch:<3} {'xla-default' if hoist else 'no-hoist':<11} "
            f"weights {g(b.weights)} grads {g(b.gradients)} state "
            f"{g(b.optimizer_state)} temps {g(b.temporaries)} peak "
            f"{g(b.peak)} GiB ({row['seconds']:.0f}s)", flush=True)
      self.cache[key] = row
      if self.cache_file:
        self.cache_file.write_bytes(pickle.dumps(self.cache))
    return self.cache[key]


def main_table(runner, models, batches, opts, hoist) -> str:
  lines = [
      "| model | batch | optimizer | rank | weights | gradients | optimizer "
      "state | temporaries (of which not gradients) | other | **peak** | "
      "peak / Adam | estimate w+g+s | compile (s) |",
      "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
  ]
  for name in models:
    for batch in batches:
      base = {}
      for opt in opts:
        for rank in (RANKS[name] if opt in LOW_RANK else RANKS[name][:1]):
          r = runner.get(name, opt, rank, batch, hoist)
          b, est = r["b"], r["est"]
          if opt in ("adamw", UNROLLED_ADAM):
            base[r["scan"]] = b.peak
          ratio = (f"{b.peak / base[r['scan']]:.2f}×" if r["scan"] in base
                   else "–")
          label = LABELS[opt] + ("" if r["scan"] else " ¹")
          lines.append(
              f"| {name} | {batch} | {label} | {r['rank'] or '–'} | "
              f"{g(b.weights)} | {g(b.gradients)} | {g(b.optimizer_state)} | "
              f"{g(b.temporaries)} ({g(b.activations)}) | {g(b.other)} | "
              f"**{g(b.peak)}** | {ratio} | {g(est.total)} | "
              f"{r['seconds']:.0f} |")
  return "\n".join(lines) + "\n"


def focus_table(runner, models, batches, xla_default) -> tuple[str, list]:
  """Adam / transform RSO / model-level RSO; ``xla_default``: the batches
  also compiled with XLA's default passes."""
  lines = [
      "| model | batch | step | rank | weights (+B) | gradients | optimizer "
      "state | temporaries | **peak** | **peak / Adam** |"
      + (" peak, XLA defaults | / Adam |" if xla_default else ""),
      "|---|---|---|---|---|---|---|---|---|---|"
      + ("---|---|" if xla_default else ""),
  ]
  found = []
  for name in models:
    rank = RANKS[name][-1]
    for batch in batches:
      rows = {o: runner.get(name, o, rank, batch, False)
              for o in (SETUP_ADAM, "rso", "rso_model")}
      dflt = ({o: runner.get(name, o, rank, batch, True) for o in rows}
              if batch in xla_default else None)
      adam = rows[SETUP_ADAM]["b"].peak
      for opt, r in rows.items():
        b = r["b"]
        extra = " – | – |" if xla_default else ""
        if dflt:
          d, d_adam = dflt[opt]["b"].peak, dflt[SETUP_ADAM]["b"].peak
          extra = f" {g(d)} | {d / d_adam:.2f}× |"
        lines.append(
            f"| {name} | {batch} | {LABELS[opt]} | "
            f"{r['rank'] or '–'} | {g(b.weights)} | {g(b.gradients)} | "
            f"{g(b.optimizer_state)} | {g(b.temporaries)} | **{g(b.peak)}** | "
            f"**{b.peak / adam:.2f}×** |" + extra)
        found.append((name, batch, opt, r, b.peak / adam,
                      dflt[opt]["b"].peak / dflt[SETUP_ADAM]["b"].peak
                      if dflt else None))
  return "\n".join(lines) + "\n", found


def paper_table() -> str:
  """Analytic weights + optimizer state against the papers (no compile)."""
  lines = [
      "| model | rank | params | Adam: paper | Adam: ours | GaLore: paper | "
      "GaLore std, embeddings full | GaLore std, all matrices | sj.galore "
      "(lean) | sj.golore / sj.rso (lean, no P) |",
      "|---|---|---|---|---|---|---|---|---|---|",
  ]
  for name, ranks in RANKS.items():
    cfg = model_config(name, scan=False)
    params = jax.eval_shape(lambda: train.ModelDef(cfg).init(0))
    r = ranks[0]
    views = llama.views()
    ws = lambda tx: (lambda e: (e.weights + e.optimizer_state) / GiB)(
        memory.estimate(params, tx))
    adam = ws(optax.scale_by_adam())
    std = ws(sj.galore(rank=r, side="std", views=views))
    std_all = ws(sj.galore(rank=r, side="std"))
    lean = ws(sj.galore(rank=r, views=views))
    rso = ws(sj.rso(rank=r, views=views))
    pa, pg = GALORE_TABLE2.get(name, (None, None))
    p = lambda v: f"{v:.2f}" if v is not None else "–"
    lines.append(
        f"| {name} | {r} | {llama.param_count(cfg) / 1e6:.0f} M | {p(pa)} | "
        f"{adam:.2f} | {p(pg)} | {std:.2f} | {std_all:.2f} | {lean:.2f} | "
        f"{rso:.2f} |")
  return "\n".join(lines) + "\n"


def rso_paper_rows() -> str:
  cfg = model_config("llama_1b", scan=False)
  params = jax.eval_shape(lambda: train.ModelDef(cfg).init(0))
  views = llama.views()
  st = lambda tx: memory.estimate(params, tx).optimizer_state / GiB
  full = lambda tx: memory.estimate(
      {k: v for k, v in params.items() if k in ("embed", "lm_head")},
      tx).optimizer_state / GiB
  adam = st(optax.scale_by_adam())
  emb = full(optax.scale_by_adam())
  ga_std = st(sj.galore(rank=512, side="std", views=views))
  rso_std = st(sj.rso(rank=512, side="std", views=views))
  rso_lean = st(sj.rso(rank=512, views=views))
  return (
      "| LLaMA-1B optimizer state | paper | ours |\n|---|---|---|\n"
      f"| Adam | {RSO_1B_STATES[0]:.2f} | {adam:.2f} |\n"
      f"| GaLore / RSO, r = 512 | {RSO_1B_STATES[1]:.2f} | GaLore std "
      f"{ga_std:.2f} ({ga_std - emb:.2f} without the {emb:.2f} of embedding "
      f"and lm_head Adam moments); RSO std {rso_std:.2f}; RSO lean "
      f"{rso_lean:.2f} |\n")


def _csv(s: str) -> list[str]:
  return [x for x in s.split(",") if x]


def main(argv=None):
  parser = argparse.ArgumentParser(
      description=__doc__.splitlines()[0],
      epilog="Optimizers: " + ", ".join(f"{k} ({v})" for k, v in
                                        OPTIMIZERS.items()))
  parser.add_argument("--models", default=",".join(RANKS),
                      help="comma-separated models of the main table")
  parser.add_argument("--batches", default="1,16",
                      help="micro-batch sizes of the main table")
  parser.add_argument("--optimizers", default=",".join(OPTIMIZERS),
                      help="comma-separated optimizers of the main table")
  parser.add_argument("--seq", type=int, default=256, help="sequence length")
  parser.add_argument("--focus-models", default="llama_1b,llama_7b",
                      help="models of the Adam / RSO / model-RSO table")
  parser.add_argument("--focus-batches", default="1,8",
                      help="micro-batch sizes of that table")
  parser.add_argument("--no-focus", action="store_true",
                      help="skip the Adam / RSO / model-RSO table")
  parser.add_argument("--no-main", action="store_true",
                      help="skip the main table")
  parser.add_argument("--xla-default-batches", default="1",
                      help="batches of the focused table also compiled with "
                      "XLA's default passes (loop hoisting on); '' for none")
  parser.add_argument("--hoist", action="store_true",
                      help="main table with XLA's default passes instead of "
                      "subspace_jax.memory.NO_LOOP_HOISTING")
  parser.add_argument("--cache", default=None,
                      help="pickle file of measurements: reused when it "
                      "exists, extended as the run goes (re-render the "
                      "tables without compiling again)")
  common.add_output_flags(parser, "memory.md", note=False)
  args = parser.parse_args(argv)
  for name in _csv(args.models) + _csv(args.focus_models):
    if name not in RANKS:
      parser.error(f"unknown model {name!r}; choose from {', '.join(RANKS)}")
  opts = _csv(args.optimizers)
  for o in opts:
    if o not in OPTIMIZERS:
      parser.error(f"unknown optimizer {o!r}; choose from "
                   f"{', '.join(OPTIMIZERS)}")
  if "adamw" in opts:  # the baseline first
    opts = ["adamw"] + [o for o in opts if o != "adamw"]
  if "optax_galore" in opts:  # with its own (unrolled) baseline
    i = opts.index("optax_galore")
    opts = opts[:i] + [UNROLLED_ADAM] + opts[i:]

  start = time.perf_counter()
  runner = Runner(args.seq, args.cache)
  command = "python benchmarks/memory.py " + " ".join(
      sys.argv[1:] if argv is None else argv)
  parts = [
      "# Train-step memory: weights, gradients, optimizer state, peak\n",
      common.machine_line() + "\n",
      f"Command: `{command.strip()}`\n",
  ]
  focus = None
  if not args.no_main:
    table = main_table(runner, _csv(args.models),
                       [int(b) for b in _csv(args.batches)], opts, args.hoist)
    parts += [
        f"## All optimizers (seq {args.seq}, bf16, "
        f"{'XLA defaults' if args.hoist else 'NO_LOOP_HOISTING'})\n",
        "GiB per step. weights, optimizer state: the step's inputs, exact; "
        "gradients: analytic size of the differentiated leaves, a part of "
        "temporaries; temporaries: XLA's, in brackets what is not "
        "gradients (saved activations, workspaces, copies); other: batch, "
        "metrics, XLA's output table; peak = arguments + outputs + "
        "temporaries − aliased = weights + state + temporaries + other. "
        "estimate = `memory.estimate` weights + gradients + state, the "
        "memory without activations. peak / Adam: against optax.adamw on the "
        "same model. ¹ unrolled model (optax.contrib.galore cannot project "
        "the stacked layer axis of a scanned model); every other row runs "
        "the scanned model (`scan_layers=True`).\n",
        table,
    ]
  if not args.no_focus:
    table, focus = focus_table(
        runner, _csv(args.focus_models),
        [int(b) for b in _csv(args.focus_batches)],
        [int(b) for b in _csv(args.xla_default_batches)])
    parts += [
        f"## Adam vs transform RSO vs model-level RSO (seq {args.seq}, bf16)\n",
        "All three are `train.setup` steps (clip, optimizer, weight decay, "
        "schedule, loss/grad_norm/lr metrics) on the scanned model, rank = "
        "the largest of the model's ranks; peaks with NO_LOOP_HOISTING"
        + ("; the last two columns with XLA's default passes (loop hoisting "
           "on)" if args.xla_default_batches else "") + ".\n",
        table,
    ]
  parts += [
      "## Against the papers (analytic, bf16 weights and moments, GiB)\n",
      "Weights + optimizer state, as GaLore's Table 2 counts it (ranks as "
      "there):\n",
      paper_table(),
      "RSO paper, optimizer states only:\n",
      rso_paper_rows(),
  ]
  elapsed = time.perf_counter() - start
  compile_s = sum(runner.cache[k]["seconds"] for k in runner.used)
  parts.append(
      f"Run time: {len(runner.used)} compiled steps, {compile_s / 60:.1f} min "
      f"of building and compiling in all (the `compile (s)` column; on a "
      f"shared 2-core machine); this invocation took {elapsed / 60:.1f} min"
      + (" (measurements reused from --cache)" if args.cache else "") + ".\n")
  text = "\n".join(parts)
  if focus is not None:
    text += "\n" + summary(focus)
  text += "\n" + NOTES
  common.write(args.out, text)


def summary(found) -> str:
  out = ["## Targets (NO_LOOP_HOISTING peaks)\n"]
  transform = {(n, b): ratio for n, b, o, _, ratio, _ in found if o == "rso"}
  for name, batch, opt, r, ratio, dflt in found:
    if opt != "rso_model":
      continue
    b = r["b"]
    line = (f"- {name}, batch {batch}: model-level RSO peak {g(b.peak)} GiB "
            f"= {ratio:.2f}× Adam's (transform RSO "
            f"{transform[(name, batch)]:.2f}×"
            + (f"; with XLA defaults {dflt:.2f}×" if dflt is not None else "")
            + ")")
    if name == "llama_7b":
      line += f"; target ≤ 0.65× {'**met**' if ratio <= 0.65 else '**NOT met**'}"
      if batch == 1:
        floor = b.weights + b.optimizer_state + b.gradients
        line += (
            f"; target < 24 GiB {'**met**' if b.peak < 24 * GiB else '**NOT met**'}: "
            f"weights {g(b.weights)} (W and B) + optimizer state "
            f"{g(b.optimizer_state)} + gradients {g(b.gradients)} = "
            f"{g(floor)} GiB before any activation or workspace; the other "
            f"{g(b.temporaries - b.gradients)} GiB of temporaries include the "
            f"float32 projections of one layer ({g(r['projections'])} GiB) "
            "and their sampling workspaces")
    out.append(line + ".")
  return "\n".join(out) + "\n"


NOTES = """## Notes

- Precision: weights, activations and gradients bfloat16 (`dtype` =
  `param_dtype` = bfloat16), and every optimizer moment bfloat16 too: optax
  keeps Adam's moments in the parameters' dtype, and `moment_dtype=None`
  keeps the low-rank moments (and model mode's B) in the gradients' /
  weights' dtype. This is the "BF16 format" of GaLore's Table 2; float32
  moments would double every optimizer-state figure.
- "G" in both papers is GiB (2^30 bytes): LLaMA-350M Adam, 368 M params x
  6 bytes (weights + two moments) = 2.06 GiB (2.21 GB), as published, and
  the RSO paper's 4.99 for 1B Adam states is 1.339 B x 2 moments x 2 bytes
  in GiB. Vocabulary 32000; embedding and lm_head (2 x 32000 x d) are not
  tied.
- Published figures: the 1B ones (GaLore 7.80 / 4.38, RSO 4.99 / 1.46) as
  given in the task; 60M-350M from GaLore's Table 2 as recalled (the search
  corpus here held only the papers' abstracts), consistent with params x 6
  bytes at 130M and 350M. The papers' 7B rows (8-bit optimizers, GaLore
  Table 3) are not comparable to a bf16-moment run and are left out.
- Projected leaves: attention and MLP kernels only; embedding, lm_head and
  norm scales stay with full Adam (`llama.views()`), as in both
  papers. Side: sj's default "lean" projects the larger dimension (state
  r x min(m, n), like optax.contrib.galore); the GaLore paper projects the
  smaller one (state r x max(m, n), plus P of m x r). Model-level RSO
  uses the same lean sides: B is r x min(m, n) (r x 4096 for every 7B
  kernel; on the output side of gate/up), 0.94 B parameters at 7B,
  r = 1024 (1.75 GiB in bf16), counted with the weights.
- Paper gaps: at 350M our Adam figure is the published one; at 60M and 1B
  the paper's Adam figure is 10 % / 4 % above params x 6 bytes (not
  explained by the config; the 1B model here has 1.339 B parameters).
  GaLore's published figures fall between our "embeddings full" and "all
  matrices" columns. RSO's 1.46 for 1B GaLore/RSO is GaLore's (std) state
  without the 0.49 GiB of embedding/lm_head moments; RSO stores no
  projection, so its own state is smaller (see the RSO rows).
- Measured on CPU; read the absolute temporaries as upper bounds for an
  accelerator. (1) The CPU backend computes bf16 matmuls in float32, and
  XLA's loop-invariant code motion then hoists the float32 copy of every
  stacked weight out of the layer scan: with XLA's defaults the step holds
  float32 copies of the block weights (2x their bf16 size) that a GPU
  compile does not make. At 7B, batch 1 (in the run recorded here), that
  adds 4.8 GiB to Adam's peak, 8.2 GiB to transform RSO's and 29.5 GiB to model-level RSO's (its frozen
  W is loop-invariant in both the forward and the backward scan), which is
  why the tables use `memory.NO_LOOP_HOISTING` (same program, conversion
  kept inside the loop). (2) Even then the gradients' global norm (clipping
  and the grad_norm metric) is reduced by an XNNPACK fusion that cannot
  fuse the bf16 to float32 convert, so float32 copies of whole stacked
  gradients are materialized (three 1B MLP gradients live at once in the
  Adam step): this is most of Adam's temporaries beyond one gradient at
  batch 1. A GPU compile fuses that convert into the reduction; how much
  each row would drop cannot be told from here, so the ratios above are
  CPU-compile ratios.
- Scanned vs unrolled (¹): the same optimizer on the unrolled model has a
  different peak (lower at batch 1 for 1B/7B, much higher at batch 16), so
  optax.contrib.galore is compared with optax.adamw on the unrolled model;
  with that baseline its ratio is within 0.07 of sj.galore's (same state
  size: both project the larger side and store P in bf16).
- Transform-mode GoLore/RSO keep the full gradient and add float32
  intermediates of whole stacked leaves: the random projections of all
  layers of a leaf with their sampling workspaces (uint32 bits, float32
  samples, orthogonalization), and the back-projection `P·U` (L x m x n
  float32, 5.4 GiB for a 7B MLP kernel) before its cast to bf16. Their
  temporaries exceed Adam's; at 1B, r = 1024 the peak is no lower than
  Adam's although the state is 2.8x smaller. GaLore's stored projections
  avoid the sampling cost.
- Model-level RSO: no full gradient (gradients = B and the full-rank
  leaves), smaller saved activations (x·P instead of x for the B path).
  What remains at 7B, batch 1: W 12.55 GiB + B 2.60 + optimizer state 6.17
  (B's Adam moments 5.20, embedding/lm_head 0.98) = 21.3 GiB of state
  before any temporary, so 24 GiB is out of reach by construction at
  r = 1024 with bf16 Adam moments (the gradients of B, embedding and
  lm_head add 3.1 GiB). In
  the temporaries: the float32 projections of all 32 layers of every leaf,
  drawn before the scan and kept for the backward pass, with their
  sampling workspaces; float32 gradient copies for the norm; and the merge
  branch `W + P·B` (float32 `P·B` of a whole stacked leaf, 5.4 GiB; a
  `cond` branch counts even though it runs once per subproblem). Measured
  separately (same step, patched): bf16 projections lower the 7B batch-1
  peak from 38.3 to 35.0 GiB; removing the merge branch to 37.6 GiB;
  rank 512 gives 28.3 GiB. Reaching 24 GiB needs a smaller persistent
  state (8-bit moments, a lower rank), and projections drawn per layer
  inside the scan; at batch 8 the saved activations (attention
  probabilities in float32, MLP intermediates) dominate instead, which
  remat (`LlamaConfig.remat`) would trade for compute.
"""


if __name__ == "__main__":
  main()
