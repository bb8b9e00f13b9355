"""Train-step memory per chip on an accelerator's compiler, and collectives.

Every figure comes from a train step compiled on abstract inputs (nothing
is allocated, so a 175B step is planned on a laptop): by default for TPU
v5p chips, with libtpu's compile-only devices (``pip install
"subspace_jax[aot]"``). That compiler decides what a real chip holds, and
refuses a program that does not fit while naming the bytes it needs. A
CPU compile of the same step on one device (XLA's CPU backend, loop
hoisting off) is a secondary column: the CPU upcasts bf16 matmuls and keeps
float32 copies, so its peaks are upper bounds.

Tables (``--tables``, all by default):

* ``7b``: LLaMA 7B against the targets: ranks, weight decay, 8 sequences
  per chip, and one card alone;
* ``onecard``: only the 7B model-mode rows that must fit a small memory
  (one chip at ranks 1024 and 512, 4 chips at rank 512), without the rest
  of ``7b``;
* ``175b``: a 175B-shaped LLaMA on 8 chips with FSDP, sequences of 2048;
* ``comm``: the collective bytes of one 7B step on 8 chips, data parallel
  and FSDP, for every optimizer;
* ``refresh``: GaLore's exact and randomized refresh at 1B and 7B (those
  of ``--models``): the
  compile time of the step and of the optimizer update alone, and their
  memory;
* ``sizes``: LLaMA 60M to 7B, every optimizer, one sequence of 256 tokens
  per chip, one data-parallel replica per chip (optax.contrib.galore on the
  CPU compiler only: the TPU compiler took over 30 minutes on its 56
  unrolled SVDs of the 60M model);
* the papers' published figures against ours (analytic, always).

Writes ``benchmarks/results/memory.md``.

Example:
  python -m benchmarks.memory --tables sizes --models llama_60m --no-cpu
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import pathlib
import re
import subprocess
import sys
import time
from typing import Any, NamedTuple

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
  sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax
import jax.numpy as jnp
import optax

import subspace_jax as sj
from benchmarks import common
from subspace_jax import models
from subspace_jax.plan import memory
from subspace_jax.models import llama
from subspace_jax.plan import compile_for as plan
from subspace_jax import sharding as shd
from subspace_jax.train import step as train
from subspace_jax.run.config import RunConfig

GiB = memory.GiB

# The GaLore paper's ranks (Table 2; 7B: Table 3 / Section 5).
RANKS = {
    "llama_60m": 128,
    "llama_130m": 256,
    "llama_350m": 256,
    "llama_1b": 512,
    "llama_7b": 1024,
}
# Step label -> (optimizer, subspace mode); "optax_*" are optax's own
# transforms on an unrolled model (optax.contrib.galore cannot treat the
# stacked layer axis of a scanned model as a batch axis).
STEPS = {
    "adamw": ("adamw", "transform"),
    "optax_adamw": ("optax.adamw", None),
    "optax_galore": ("optax.contrib.galore", None),
    "galore": ("galore", "transform"),
    "galore_randomized": ("galore", "transform"),
    "golore": ("golore", "transform"),
    "rso": ("rso", "transform"),
    "golore_model": ("golore", "model"),
    "rso_model": ("rso", "model"),
}
LABELS = {
    "adamw": "AdamW", "optax_adamw": "optax.adamw ¹",
    "optax_galore": "optax.contrib.galore ¹",
    "galore": "sj.galore", "galore_randomized": "sj.galore (randomized SVD)",
    "golore": "sj.golore", "rso": "sj.rso", "golore_model": "GoLore, model mode",
    "rso_model": "RSO, model mode",
}
TPU4, TPU8 = "tpu:v5p:2x2x1", "tpu:v5p:2x2x2"
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


class Case(NamedTuple):
  """One compiled step: what the tables' rows are measured from."""

  target: str
  model: str
  step: str
  rank: int
  batch: int  # Sequences per step, all devices.
  seq: int
  mesh: tuple[int, int, int]
  weight_decay: float = 0.0
  side: str | None = None  # None: the method's own side rule.

  def key(self) -> str:
    fields = self._asdict()
    if fields["side"] is None:  # The keys cached before there was a side.
      del fields["side"]
    return json.dumps(fields, sort_keys=True)

  def label(self) -> str:
    return LABELS[self.step] + (f", side {self.side}" if self.side else "")

  def on_cpu(self) -> Case:
    """The same step on one CPU device, with one device's share of the
    batch."""
    per = self.batch // max(self.mesh[0] * self.mesh[1], 1)
    return self._replace(target="cpu", batch=max(per, 1), mesh=(1, 1, 1))


def model_config(name: str, scan: bool = True) -> llama.LlamaConfig:
  return llama.get_config(
      name, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16, scan_layers=scan)


def run_config(case: Case) -> RunConfig:
  """The run whose train step ``case`` compiles: bf16 weights and moments,
  scanned layers, full remat, a 32000-token vocabulary."""
  name, mode = STEPS[case.step]
  svd = "randomized" if case.step == "galore_randomized" else "exact"
  opt = train.OptimizerConfig(name=name, rank=case.rank, subspace_mode=mode,
                              weight_decay=case.weight_decay, svd=svd,
                              side=case.side)
  return RunConfig(
      model=case.model, scan_layers=True, remat="full", dtype="bfloat16",
      param_dtype="bfloat16", tokenizer="sentencepiece", vocab_size=32000,
      batch_size=case.batch, seq_len=case.seq, mesh=case.mesh, optimizer=opt,
      eval_split=None, checkpoint_dir=None)


def _galore_dims(params):
  """optax.contrib.galore's projected leaves: the attention and MLP kernels
  (2-D in an unrolled model), like the LLaMA's own views (llama.views())."""
  def one(path, x):
    name = sj.matrix_view.path_str(path)
    if x.ndim != 2 or any(k in name for k in ("embed", "lm_head", "norm")):
      return None
    return optax.contrib.GaLoreDimensionNumbers()
  return jax.tree_util.tree_map_with_path(one, params)


def _optax_report(case: Case, devices, options) -> memory.StepReport:
  """optax.adamw or optax.contrib.galore on the unrolled model: the plain
  step (clip, optimizer, apply), weights and state replicated, the batch
  split over the data-parallel replicas."""
  mesh = shd.make_mesh(*case.mesh, devices=devices)
  model = train.ModelDef(model_config(case.model, scan=False))
  place = lambda tree, sharding: jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding),
      tree)
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  params = place(jax.eval_shape(lambda: model.init(0)), replicated)
  if case.step == "optax_adamw":
    tx = optax.adamw(1e-3, weight_decay=case.weight_decay)
  else:
    tx = optax.contrib.galore(1e-3, rank=case.rank,
                              weight_decay=case.weight_decay,
                              weight_dimension_numbers=_galore_dims)
  tx = optax.chain(optax.clip_by_global_norm(1.0), tx)
  opt_state = place(jax.eval_shape(tx.init, params), replicated)
  tokens = jax.ShapeDtypeStruct((case.batch, case.seq), jnp.int32,
                                sharding=shd.batch_sharding(mesh))

  def step(params, opt_state, batch):
    loss, grads = jax.value_and_grad(model.loss)(params, batch)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  return memory.step_report(
      jax.jit(step, donate_argnums=(0, 1)), params, opt_state,
      {"inputs": tokens, "targets": tokens}, devices=devices,
      target=case.target, weights=params, optimizer_state=opt_state,
      compiler_options=options)


def _update_report(model: str, svd: str, device) -> dict[str, int]:
  """Compiles ``sj.galore``'s update (as ``train.make_optimizer`` builds it,
  at ``RANKS[model]``) for ``model``'s bf16 weights on ``device``."""
  opt = train.OptimizerConfig(name="galore", rank=RANKS[model], svd=svd)
  tx, _ = train.make_optimizer(opt, models.MODELS["llama"])
  sharding = jax.sharding.SingleDeviceSharding(device)
  params = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding),
      jax.eval_shape(lambda: train.ModelDef(model_config(model)).init(0)))
  state = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding),
      jax.eval_shape(tx.init, params))
  compiled = jax.jit(lambda g, s, p: tx.update(g, s, p),
                     donate_argnums=1).lower(params, state, params).compile()
  m = memory.memory_of(compiled)
  return {"temporaries": m.temporaries, "peak": m.peak,
          "state": memory.tree_bytes(state)}


class Runner:
  """Compiles each case once; results kept in a JSON file (``--cache``).
  With ``compile=False`` a case not in the cache is not compiled: ``get``
  and ``update_alone`` return None for it."""

  def __init__(self, cache_file: str | None, compile: bool = True):  # pylint: disable=redefined-builtin
    self.compile = compile
    self.file = pathlib.Path(cache_file) if cache_file else None
    self.cache: dict[str, Any] = {}
    if self.file and self.file.exists():
      self.cache = json.loads(self.file.read_text())
    self.devices: dict[str, list] = {}
    self.used: set[str] = set()

  def _devices(self, case: Case) -> list:
    if case.target not in self.devices:
      self.devices[case.target] = memory.target_devices(case.target)
    n = case.mesh[0] * case.mesh[1] * case.mesh[2]
    return self.devices[case.target][:n]

  def get(self, case: Case) -> dict[str, Any] | None:
    key = case.key()
    if key not in self.cache and not self.compile:
      return None
    self.used.add(key)
    if key not in self.cache:
      options = memory.NO_LOOP_HOISTING if case.target == "cpu" else None
      devices = self._devices(case)
      start, cpu = time.perf_counter(), time.process_time()
      if case.step.startswith("optax_"):
        report = _optax_report(case, devices, options)
      else:
        report = plan.compile_for(run_config(case), case.target,
                                  devices=devices, compiler_options=options)
      seconds = time.perf_counter() - start
      cpu = time.process_time() - cpu
      print(f"{case.model} {case.step} r{case.rank} batch {case.batch} "
            f"mesh {case.mesh} {case.target}: "
            + " / ".join(report.lines()[1:]) + f" ({seconds:.0f} s)",
            flush=True)
      self.cache[key] = {"report": report.to_dict(), "seconds": seconds,
                         "cpu_seconds": cpu}
      if self.file:
        self.file.write_text(json.dumps(self.cache, indent=0))
    return self.cache[key]

  def compile_seconds(self) -> float:
    return sum(self.cache[k]["seconds"] for k in self.used)

  def update_alone(self, model: str, svd: str) -> dict[str, Any]:
    """GaLore's optimizer update alone (``svd``), jitted on one chip for
    the model's bf16 weights at a refresh step: compile time and memory
    (cached like the steps)."""
    key = json.dumps({"update_alone": model, "svd": svd})
    if key not in self.cache and not self.compile:
      return None
    self.used.add(key)
    if key not in self.cache:
      device = self._devices(Case(TPU4, model, "galore", 0, 1, 1, (1, 1, 1)))[0]
      start, cpu = time.perf_counter(), time.process_time()
      report = _update_report(model, svd, device)
      self.cache[key] = dict(report, seconds=time.perf_counter() - start,
                             cpu_seconds=time.process_time() - cpu)
      print(f"{model} galore {svd} update alone: {self.cache[key]}",
            flush=True)
    return self.cache[key]


def g(x: float | None) -> str:
  return "–" if x is None else f"{x / GiB:.2f}"


def peak(result: dict) -> int:
  """The bytes one device needs: the peak, or the compiler's figure for a
  program it refused."""
  return result["report"]["required"]


def memory_cells(result: dict) -> str:
  """weights | state | temporaries (gradients) | **peak**, or a refusal."""
  r = result["report"]
  b = r["breakdown"]
  if b is None:
    return (f"– | – | – | **does not fit: needs {g(r['required'])}** "
            "(the compiler's figure)")
  return (f"{g(b['weights'])} | {g(b['optimizer_state'])} | "
          f"{g(b['temporaries'])} ({g(b['gradients'])}) | **{g(b['peak'])}**")


def sizes_table(runner: Runner, models, steps, cpu: bool) -> str:
  """One row per model and optimizer; optax's own transforms (¹) on the
  CPU compiler only (see the notes)."""
  lines = [
      "| model | optimizer | rank | weights | optimizer state | temporaries "
      "(gradients) | **peak / chip** | peak / AdamW | CPU peak, 1 device "
      "(/ AdamW) |",
      "|---|---|---|---|---|---|---|---|---|",
  ]
  for name in models:
    base, cpu_base = None, {}
    for step in steps:
      case = Case(TPU4, name, step, RANKS[name], batch=4, seq=256,
                  mesh=(4, 1, 1))
      unrolled = step.startswith("optax_")
      cells, ratio = "– | – | – | – (CPU only)", "–"
      if not unrolled:
        r = runner.get(case)
        base = peak(r) if step == "adamw" else base
        cells, ratio = memory_cells(r), f"{peak(r) / base:.2f}×"
      cpu_cell = "–"
      if cpu or unrolled:
        p = peak(runner.get(case.on_cpu()))
        cpu_base[unrolled] = p if "adamw" in step else cpu_base[unrolled]
        cpu_cell = f"{g(p)} ({p / cpu_base[unrolled]:.2f}×)"
      lines.append(
          f"| {name} | {LABELS[step]} | "
          f"{'–' if 'adamw' in step else case.rank} | {cells} | {ratio} | "
          f"{cpu_cell} |")
  return "\n".join(lines) + "\n"


def _7b_cases() -> list[tuple[str, Case, Case | None]]:
  """(setting, case, the AdamW case it is compared with)."""
  m, s = "llama_7b", 256
  dp = lambda step, rank=1024, batch=4, **kw: Case(
      TPU4, m, step, rank, batch, s, (4, 1, 1), **kw)
  one = lambda step, rank=1024: Case(TPU4, m, step, rank, 1, s, (1, 1, 1))
  adam, adam8, adam1 = dp("adamw"), dp("adamw", batch=32), one("adamw")
  return [
      ("1 sequence / chip, 4 chips", adam, None),
      ("", dp("galore"), adam), ("", dp("galore_randomized"), adam),
      ("", dp("golore"), adam), ("", dp("rso"), adam),
      ("", dp("golore_model"), adam), ("", dp("rso_model"), adam),
      ("rank 512", dp("rso_model", 512), adam),
      ("weight decay 0.1", dp("rso_model", weight_decay=0.1), adam),
      ("8 sequences / chip", adam8, None),
      ("8 sequences / chip", dp("rso_model", batch=32), adam8),
      ("one chip alone (a 24 GB card)", adam1, None),
      ("one chip alone", one("rso_model"), adam1),
      ("one chip alone, rank 512", one("rso_model", 512), adam1),
  ]


def llama7b_table(runner: Runner) -> str:
  lines = [
      "| optimizer | rank | setting | weights | optimizer state | "
      "temporaries (gradients) | **peak / chip** | peak / AdamW |",
      "|---|---|---|---|---|---|---|---|",
  ]
  for setting, case, base in _7b_cases():
    r = runner.get(case)
    ratio = "1×" if base is None else f"{peak(r) / peak(runner.get(base)):.2f}×"
    rank = "–" if case.step == "adamw" else case.rank
    lines.append(f"| {LABELS[case.step]} | {rank} | {setting} | "
                 f"{memory_cells(r)} | {ratio} |")
  return "\n".join(lines) + "\n"


# 7B RSO in model mode where it has to fit a small memory: (setting, case,
# the target in GiB per chip).
# The memory-lean side (B on each kernel's smaller side), and the method's
# own (GoLore's and RSO's "std") for the first case.
ONE_CARD = (
    ("one chip alone (a 24 GB card)",
     Case(TPU4, "llama_7b", "rso_model", 1024, 1, 256, (1, 1, 1)), 21),
    ("one chip alone (a 24 GB card)",
     Case(TPU4, "llama_7b", "rso_model", 1024, 1, 256, (1, 1, 1),
          side="lean"), 21),
    ("one chip alone, rank 512",
     Case(TPU4, "llama_7b", "rso_model", 512, 1, 256, (1, 1, 1),
          side="lean"), 21),
    ("4 chips, one sequence per chip, rank 512",
     Case(TPU4, "llama_7b", "rso_model", 512, 4, 256, (4, 1, 1),
          side="lean"), 18),
)


def one_card_table(runner: Runner) -> str:
  """The small-memory cases of :data:`ONE_CARD` (no AdamW baseline: these
  rows are about fitting, not ratios)."""
  lines = [
      "| optimizer | rank | setting | weights | optimizer state | "
      "temporaries (gradients) | **peak / chip** | target |",
      "|---|---|---|---|---|---|---|---|",
  ]
  for setting, case, limit in ONE_CARD:
    r = runner.get(case)
    if r is None:
      lines.append(f"| {case.label()} | {case.rank} | {setting} | not "
                   f"measured | | | | ≤ {limit} |")
      continue
    lines.append(f"| {case.label()} | {case.rank} | {setting} | "
                 f"{memory_cells(r)} | ≤ {limit} |")
  return "\n".join(lines) + "\n"


def _175b_cases() -> list[Case]:
  return [Case(TPU8, "llama_175b", step, 1024, 8, 2048, (1, 8, 1))
          for step in ("adamw", "rso", "golore_model", "rso_model")]


def llama175b_table(runner: Runner) -> str:
  lines = [
      "| optimizer | rank | weights | optimizer state | temporaries "
      "(gradients) | **peak / chip** | collectives / step |",
      "|---|---|---|---|---|---|---|",
  ]
  for case in _175b_cases():
    r = runner.get(case)
    rank = "–" if case.step == "adamw" else case.rank
    c = r["report"]["collectives"]
    lines.append(f"| {LABELS[case.step]} | {rank} | {memory_cells(r)} | "
                 f"{'–' if c is None else g(c['bytes'])} |")
  return "\n".join(lines) + "\n"


# sj.galore is left out: under FSDP each step gathers its stored
# projections (3.06 GiB at rank 1024) and a refresh every gradient matrix
# whole for its SVD; data parallel, it all-reduces what GoLore does.
COMM_STEPS = ("adamw", "golore", "rso", "golore_model", "rso_model")
# Under FSDP also the memory-lean side (the larger dimension projected):
# the embed dimension that FSDP splits is then kept, not summed over, in
# the MLP's kernels (see the notes).
LEAN = ("golore", "rso_model")


def _comm_case(step: str, mesh, side: str | None = None) -> Case:
  return Case(TPU8, "llama_7b", step, 1024, 8, 256, mesh, side=side)


def _comm_rows(mesh) -> list[Case]:
  cases = [_comm_case(step, mesh) for step in COMM_STEPS]
  if mesh == (1, 8, 1):
    cases += [_comm_case(step, mesh, "lean") for step in LEAN]
  return cases
COMM_KINDS = ("all-reduce", "all-gather", "reduce-scatter")


def comm_table(runner: Runner) -> str:
  lines = [
      "| mesh | optimizer | " + " | ".join(COMM_KINDS) + " | **all, GiB** | "
      "/ AdamW | ring estimate sent / chip | peak / chip |",
      "|---|---|" + "---|" * len(COMM_KINDS) + "---|---|---|---|",
  ]
  for mesh, name in (((8, 1, 1), "data parallel, 8"), ((1, 8, 1), "FSDP, 8")):
    base = None
    for case in _comm_rows(mesh):
      step = case.step
      r = runner.get(case)
      if r is None:
        lines.append(f"| {name} | {case.label()} | not measured |")
        continue
      c = r["report"]["collectives"]
      if c is None:
        lines.append(f"| {name} | {case.label()} | does not fit |")
        continue
      kinds = c["by_kind"]
      cells = " | ".join(
          f"{g(kinds[k]['bytes'])} ({kinds[k]['count']}×)" if k in kinds
          and kinds[k]["count"] else "–" for k in COMM_KINDS)
      base = c["bytes"] if step == "adamw" else base
      del step
      ratio = f"{c['bytes'] / base:.2f}×" if base else "–"
      lines.append(f"| {name} | {case.label()} | {cells} | "
                   f"**{g(c['bytes'])}** | {ratio} | {g(c['wire'])} | "
                   f"{g(peak(r))} |")
  return "\n".join(lines) + "\n"


REFRESH_MODELS = ("llama_1b", "llama_7b")


def _refresh_cases(model: str) -> list[Case]:
  return [Case(TPU4, model, step, RANKS[model], 4, 256, (4, 1, 1))
          for step in ("galore", "galore_randomized")]


def refresh_table(runner: Runner, models=REFRESH_MODELS) -> str:
  """GaLore's exact refresh (on a TPU: the Gram matrix's Jacobi eigh)
  against the randomized one: compile time and memory of the whole step
  (v5p, 4 chips, data parallel) and of the optimizer update alone (one
  chip), which holds the refresh."""
  lines = [
      "| model | rank | refresh | step: compile, min (CPU min) | step: "
      "peak / chip | update alone: compile, min (CPU min) | update alone: "
      "temporaries |",
      "|---|---|---|---|---|---|---|",
  ]
  for model in (m for m in REFRESH_MODELS if m in models):
    for case in _refresh_cases(model):
      r = runner.get(case)
      svd = "randomized" if case.step == "galore_randomized" else "exact"
      u = runner.update_alone(model, svd)
      minutes = lambda x: "not measured" if x is None else (
          f"{x['seconds'] / 60:.1f} ({x.get('cpu_seconds', 0) / 60:.1f})")
      lines.append(
          f"| {model} | {case.rank} | {svd} | {minutes(r)} | "
          f"{g(r and peak(r))} | {minutes(u)} | {g(u and u['temporaries'])} |")
  return "\n".join(lines) + "\n"


def paper_table() -> str:
  """Analytic weights + optimizer state against the papers (no compile)."""
  lines = [
      "| model | rank | params | Adam: paper | Adam: ours | GaLore: paper | "
      "GaLore std, embeddings full | GaLore std, all matrices | sj.galore "
      "(lean) | sj.golore / sj.rso (lean, no P) |",
      "|---|---|---|---|---|---|---|---|---|---|",
  ]
  for name, r in RANKS.items():
    cfg = model_config(name, scan=False)
    params = jax.eval_shape(lambda: train.ModelDef(cfg).init(0))
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


def _verdict(ok: bool) -> str:
  return "**met**" if ok else "**not met**"


def targets(runner: Runner, tables) -> str:
  """The targets, each with its figure."""
  out = ["## Targets\n"]
  if "7b" in tables:
    cases = {(c.step, c.rank, c.batch, c.mesh, c.weight_decay): c
             for _, c, _ in _7b_cases()}
    get = lambda step, rank=1024, batch=4, mesh=(4, 1, 1): peak(runner.get(
        cases[(step, rank, batch, mesh, 0.0)]))
    adam = get("adamw")
    for rank, batch, mesh, limit, where in (
        (1024, 1, (1, 1, 1), 21, "one chip alone (a 24 GB card)"),
        (512, 4, (4, 1, 1), 18, "4 chips, one sequence per chip"),
        (1024, 4, (4, 1, 1), 22, "4 chips, one sequence per chip")):
      p = get("rso_model", rank, batch, mesh)
      out.append(f"- 7B, RSO in model mode, rank {rank}, {where}: {g(p)} GiB "
                 f"per chip, target ≤ {limit}: {_verdict(p <= limit * GiB)}.")
    for step in ("golore", "rso"):
      ratio = get(step) / adam
      out.append(f"- 7B, {LABELS[step]} (transform), rank 1024, 4 chips data "
                 f"parallel: {ratio:.2f}× AdamW's peak (AdamW with ZeRO-1: "
                 f"{g(adam)}), target ≤ 0.70×: {_verdict(ratio <= 0.70)}.")
  if "onecard" in tables and "7b" not in tables:
    for setting, case, limit in ONE_CARD:
      if runner.get(case) is None:
        continue
      p = peak(runner.get(case))
      out.append(f"- 7B, {case.label()}, rank {case.rank}, {setting}: "
                 f"{g(p)} GiB per chip, target ≤ {limit}: "
                 f"{_verdict(p <= limit * GiB)}.")
  if "175b" in tables:
    adam, rso = (runner.get(c) for c in (_175b_cases()[0], _175b_cases()[-1]))
    out.append(f"- 175B, RSO in model mode, rank 1024, 8 chips FSDP: "
               f"{g(peak(rso))} GiB per chip, target ≤ 80: "
               f"{_verdict(peak(rso) <= 80 * GiB)} (AdamW needs "
               f"{g(peak(adam))}).")
  if "comm" in tables:
    out += _comm_targets(runner)
  if "refresh" in tables:
    r = runner.get(_refresh_cases("llama_1b")[0])
    if r is not None:
      out.append(f"- GaLore's exact SVD, llama_1b on v5p 2x2x1: the step "
                 f"compiles in {r['seconds'] / 60:.1f} min "
                 f"({r.get('cpu_seconds', 0) / 60:.1f} CPU min), target ≤ 4: "
                 f"{_verdict(r['seconds'] <= 240)}.")
  return "\n".join(out) + "\n"


def _comm_targets(runner: Runner) -> list[str]:
  """The collectives' targets, of the steps measured: data parallel, model
  mode against AdamW; under FSDP, the transform against AdamW."""
  out = []
  dp = [runner.get(_comm_case(s, (8, 1, 1))) for s in ("adamw", "rso_model")]
  if None not in dp:
    ratio = (dp[1]["report"]["collectives"]["bytes"]
             / dp[0]["report"]["collectives"]["bytes"])
    out.append(f"- 7B on 8 chips, data parallel: RSO in model mode moves "
               f"{ratio:.2f}× AdamW's collective bytes per step, target ≤ "
               f"0.25×: {_verdict(ratio <= 0.25)}.")
  fsdp = _comm_rows((1, 8, 1))
  adam = runner.get(fsdp[0])
  for case in fsdp[1:]:
    r = runner.get(case)
    if adam is None or r is None:
      continue
    r, a = r["report"], adam["report"]
    p = r["required"] / a["required"]
    b = r["collectives"]["bytes"] / a["collectives"]["bytes"]
    targeted = STEPS[case.step][1] == "transform"

    def check(ratio: float, limit: float) -> str:
      return (f", target ≤ {limit:.2f}×: {_verdict(ratio <= limit)}"
              if targeted else "")

    out.append(f"- 7B under FSDP over 8 chips, {case.label()}, rank 1024: "
               f"peak {p:.2f}× AdamW's{check(p, 0.80)}; collective bytes "
               f"{b:.2f}× AdamW's{check(b, 1.05)}.")
  return out


def readme_summary(runner: Runner, tables, models) -> str:
  """What the README shows: peak per chip by model and optimizer, and the
  one-line results of the other tables."""
  out = []
  if "sizes" in tables and "7b" in tables:
    out += ["| model | rank | AdamW | GaLore | GoLore / RSO | GoLore / RSO, "
            "model mode |", "|---|---|---|---|---|---|"]
    steps = ("adamw", "galore", "golore", "golore_model")
    for name in dict.fromkeys([*models, "llama_7b"]):
      case = lambda step: Case(TPU4, name, step, RANKS[name], 4, 256,
                               (4, 1, 1))
      if any(case(s).key() not in runner.cache for s in steps):
        continue
      p = {s: peak(runner.get(case(s))) for s in steps}
      cell = lambda s: f"{g(p[s])} ({p[s] / p['adamw']:.2f}×)"
      out.append(f"| {name} | {RANKS[name]} | {g(p['adamw'])} | "
                 f"{cell('galore')} | {cell('golore')} | "
                 f"**{cell('golore_model')}** |")
    out.append("")
  out.append(targets(runner, tables).replace("## Targets\n", "").strip())
  return "\n".join(out) + "\n"


TABLES = ("7b", "onecard", "175b", "comm", "refresh", "sizes")


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--tables", default=",".join(TABLES),
                      help=f"comma-separated, of {', '.join(TABLES)}")
  parser.add_argument("--models", default=",".join(RANKS),
                      help="models of the sizes table")
  parser.add_argument("--optimizers", default=",".join(
      s for s in STEPS if s != "galore_randomized"),
                      help=f"optimizers of the sizes table, of "
                      f"{', '.join(STEPS)}")
  parser.add_argument("--no-cpu", action="store_true",
                      help="leave out the CPU column of the sizes table")
  parser.add_argument("--cache", default=None,
                      help="JSON file of measurements: reused when it "
                      "exists, extended as the run goes (re-render the "
                      "tables without compiling again)")
  parser.add_argument("--no-compile", action="store_true",
                      help="only what --cache holds: a step not in it is "
                      "shown as not measured")
  parser.add_argument("--earlier", default=None, metavar="COMMIT",
                      help="also copy the tables that this run does not "
                      "measure in full from this file as COMMIT has it, "
                      "under a heading naming that commit")
  common.add_output_flags(parser, "memory.md", note=False)
  return parser


# Sections every run writes itself (never copied by --earlier).
_OWN_SECTIONS = ("## Targets", "## Against the papers", "## Notes")


def earlier_sections(commit: str, measured: set[str]) -> str:
  """The table sections of ``results/memory.md`` at ``commit`` whose titles
  are not in ``measured``, one heading level down, under a heading that
  says where they come from."""
  path = "benchmarks/results/memory.md"
  text = subprocess.run(["git", "show", f"{commit}:{path}"], cwd=common.ROOT,
                        capture_output=True, text=True, check=True).stdout
  found = re.search(r"(?m)^Command: (.*)$", text)
  kept = [part for part in re.split(r"(?m)^(?=## )", text)[1:]
          if part.splitlines()[0].strip() not in measured
          and not part.startswith(_OWN_SECTIONS)]
  if not kept:
    return ""
  head = (f"## Earlier measurements (commit `{commit}`, not re-run)\n\n"
          f"Copied from this file as commit `{commit}` wrote it ("
          f"{found.group(1) if found else 'its command unrecorded'}): the code "
          "of that commit, before the changes the tables above measure.\n")
  return head + "\n" + "".join("#" + part for part in kept)


def main(argv=None):
  parser = _parser()
  args = parser.parse_args(argv)
  tables = [t for t in args.tables.split(",") if t]
  models = [m for m in args.models.split(",") if m]
  steps = [s for s in args.optimizers.split(",") if s]
  for value, known, flag in ((tables, TABLES, "--tables"),
                             (models, RANKS, "--models"),
                             (steps, STEPS, "--optimizers")):
    for v in value:
      if v not in known:
        parser.error(f"{flag}: unknown {v!r}; choose from {', '.join(known)}")
  try:
    memory.target_devices(TPU8)
  except ValueError as e:
    parser.error(f"{e}")
  start = time.perf_counter()
  runner = Runner(args.cache, compile=not args.no_compile)
  command = common.command_line("benchmarks.memory", argv)
  parts = [
      "# Train-step memory per chip, on the TPU compiler\n",
      common.provenance(command),
      f"TPU figures: libtpu {importlib.metadata.version('libtpu')}, "
      "compile-only devices.\n",
      HOW,
  ]
  sections = {
      "sizes": ("## By model size (v5p, 4 chips, one sequence of 256 tokens "
                "per chip)\n", lambda: sizes_table(runner, models, steps,
                                                    not args.no_cpu)),
      "7b": ("## LLaMA 7B (v5p, sequences of 256 tokens)\n",
             lambda: llama7b_table(runner)),
      "onecard": ("## LLaMA 7B in a small memory (v5p, sequences of 256 "
                  "tokens)\n", lambda: one_card_table(runner)),
      "175b": ("## A 175B LLaMA on 8 chips (v5p 2x2x2, FSDP over 8, 8 "
               "sequences of 2048 tokens)\n", lambda: llama175b_table(runner)),
      "comm": ("## Collectives of one 7B step on 8 chips (v5p 2x2x2, 8 "
               "sequences of 256 tokens, rank 1024)\n",
               lambda: comm_table(runner)),
      "refresh": ("## GaLore's refresh: exact SVD and randomized (v5p, 4 "
                  "chips data parallel; the update alone on one chip)\n",
                  lambda: refresh_table(runner, models)),
  }
  complete = set()  # Titles of the tables with every row measured.
  for name in (t for t in TABLES if t in tables):
    title, make = sections[name]
    text = make()
    parts += [title, text]
    if "not measured" not in text:
      complete.add(title.strip())
  if args.earlier:
    parts.append(earlier_sections(args.earlier, complete))
  parts += [targets(runner, tables),
            "## Against the papers (analytic, bf16 weights and moments, "
            "GiB)\n",
            "Weights + optimizer state, as GaLore's Table 2 counts it (ranks "
            "as there):\n", paper_table(), "RSO paper, optimizer states "
            "only:\n", rso_paper_rows()]
  parts.append(
      f"Run time: {len(runner.used)} compiled steps, "
      f"{runner.compile_seconds() / 60:.1f} min of building and compiling in "
      f"all; this invocation took {(time.perf_counter() - start) / 60:.1f} "
      "min" + (" (measurements reused from --cache)" if args.cache else "")
      + ".\n")
  parts.append(common.readme_block("memory", readme_summary(
      runner, tables, models)))
  common.write(args.out, "\n".join(parts) + "\n" + NOTES)


HOW = """Per chip, GiB. Every step is `train.setup`'s (global-norm clip, the
optimizer, weight decay, schedule, the non-finite guard; `--scan-layers
--remat`, bf16 weights, activations and moments, vocabulary 32000), except
¹: optax's own transforms on the unrolled model, with `optax.adamw` on the
same unrolled model as their baseline, measured on the CPU compiler only
(libtpu spent over 30 minutes on the 56 unrolled SVDs of
optax.contrib.galore's 60M step). weights and optimizer state: the
step's inputs, exact (model mode's weights include `B`). temporaries: the
compiler's, with the gradients' analytic size in brackets (gradients live
inside the step). peak = weights + state + temporaries + the batch and
outputs. A step the compiler refuses is shown with the bytes it says it
needs. Data-parallel replicas split the moments of the weights kept in
full (all of AdamW's) over the data axis (ZeRO-1). CPU peak: the same step
on one CPU device (one chip's share of the batch), XLA's CPU backend with loop hoisting off (`memory.NO_LOOP_HOISTING`):
an upper bound, see the notes.
"""


NOTES = """## Notes

- The TPU compiler is the witness: it schedules bf16 matmuls natively and
  refuses what does not fit (v5p: 95.74 GiB per chip, libtpu's own figure).
  The CPU compiler computes bf16 matmuls in float32 and keeps float32
  copies of weights and gradients; its peaks are secondary.
- Model mode at 7B, rank 1024, one chip alone, `B` on the lean side: the
  step's inputs are the weights (12.55), `B` (1.75) and the moments of `B`
  and of the full leaves (4.48), 18.78 GiB; the gradients of `B` (1.75,
  every layer's at once at the end of the backward loop, which the
  global-norm clip needs) and of the embedding and lm_head (0.49) bring the
  floor to 21.02, so the 21 GiB target needs one of these gone (e.g. a clip
  that does not hold every layer's gradient). The compiler's figure adds
  its loops' temporaries (per-layer kernel slices and projection draws).
  Two copies are gone since the earlier 7B table: the TPU compiler wrote a
  transposed copy of every stacked q/k/v kernel and `B` before the remat
  forward loop, so that the projections' matmuls produced the
  sequence-minor layout the attention wants (an optimization barrier on
  the projections' outputs now makes the activations take the transpose),
  and the zeroed `B` of a merge took a second buffer. With GoLore's and
  RSO's own side rule ("std", `B` on each kernel's larger side: r x 11008
  for the MLP's) `B`, its moments and its gradient grow by 1.27, 2.53 and
  1.27 GiB.
- ZeRO-1: on 4 data-parallel chips the moments of the leaves kept in full
  (the 32000 x 4096 embedding and lm_head for the subspace methods, every
  weight for AdamW) are split over the data axis; each replica updates its
  slice and the updated slices are gathered (the all-gather column of the
  collectives), so the gradients' all-reduce outputs no longer sit whole
  beside the moments.
- Three things in the step used to hold weight-sized copies and no longer
  do: the merge `W + P·B` (now a loop over the stacked matrices that
  rewrites W in place, with a trip count of zero between merges), the
  non-finite guard (it checked the updates, so the old and the new
  optimizer state had to live at once: 1.75 GiB at 7B; it now checks the
  loss and the gradient norm, and the loop never checkpoints a non-finite
  state) and the lm_head's float32 kernel gradient (its backward now works
  in the operands' dtype).
- The transform draws a stacked leaf's random projections one matrix at a
  time. Drawn for all 32 layers at once, the random bits, float32
  Gaussians and QR of every layer added 12.6 GiB to a 7B GoLore or RSO
  step (45.37 GiB per chip, 0.85x AdamW; now 32.77, 0.61x).
- Under FSDP the transform follows the weights' sharding (its
  `shardings` option, which `train.setup` passes): each matrix's `P` is
  drawn whole on every device (no collective) and split along the
  projected dimension as its gradient is, `PᵀG` is reduced into the
  state's sharding (one `r x k` reduction per matrix split along its
  projected dimension), the update is gathered along the rank
  (`r x k`) and `P U` is formed in the gradient's sharding, one matrix at
  a time, `P` drawn again for it. Before, XLA's propagation split each
  draw into small collectives and all-reduced the back-projection in
  float32: 7B on 8 chips needed 8.40 GiB per chip (AdamW 7.37) and 51.23
  GiB of collectives (AdamW 40.68). FSDP splits the embed dimension: with
  the "std" side (GoLore's and RSO's default) it is the projected one of
  `o_proj` and of the three MLP kernels, which then exchange two
  `r x 11008` (`r x 4096` for `o_proj`) bf16 arrays per layer and step;
  with "lean" only q, k and v exchange (`r x 4096`).
- GaLore's exact SVD on a TPU: `jnp.linalg.svd` (QDWH and spectral divide
  and conquer written in JAX) took libtpu 659 CPU-s (18 min on this shared
  machine) to compile for one 2048 x 2048 matrix, so the 1B step did not
  compile in 30 minutes; the TPU's refresh now takes the eigenvectors of
  the smaller Gram matrix from the compiler's Jacobi solver (one custom
  call, 29 CPU-s for 2048 x 2048), the CPU and GPU keep the library SVD
  (`lax.platform_dependent`).
- Collectives are read off the compiled program, a loop body counted once
  per iteration (`memory.collective_bytes`); the ring estimate is what a
  ring algorithm sends from each chip. Model mode all-reduces the
  gradients of `B` and of the leaves kept in full, not those of `W`.
- Precision: weights, activations, gradients and every optimizer moment in
  bfloat16 (optax keeps Adam's moments in the parameters' dtype), the
  "BF16 format" of GaLore's Table 2; float32 moments would double every
  optimizer-state figure.
- "G" in both papers is GiB: LLaMA-350M Adam, 368 M params x 6 bytes
  (weights + two moments) = 2.06 GiB, as published, and the RSO paper's
  4.99 for 1B Adam states is 1.339 B x 2 moments x 2 bytes. Vocabulary
  32000; embedding and lm_head are not tied, and stay with full Adam in
  every subspace method (`llama.views()`), as in both papers.
- Published figures: the 1B ones (GaLore 7.80 / 4.38, RSO 4.99 / 1.46) and
  60M-350M from GaLore's Table 2. GaLore's published figures fall between
  our "embeddings full" and "all matrices" columns; RSO's 1.46 is GaLore's
  (std) state without the 0.49 GiB of embedding/lm_head moments, and RSO
  stores no projection, so its own state is smaller.
- Sides: "lean" projects the larger dimension (state r x min(m, n), like
  optax.contrib.galore), sj.galore's default; "std", the papers' rule and
  GoLore's and RSO's default, projects the smaller one (state r x max(m,
  n), plus GaLore's P of m x r). Model mode puts `B` on the method's side
  (lean: r x 4096 for every 7B kernel). Rows marked "side lean" choose it.
"""


if __name__ == "__main__":
  main()
