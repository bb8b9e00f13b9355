"""Quality: held-out perplexity of every method at its own tuned learning rate.

Modeled on the pretraining tables of the GaLore, GoLore and RSO papers and
scaled to a 2-core CPU: LLaMAs trained from scratch on the corpus embedded
in the package (byte tokens), the same data and steps for every method,
perplexity on the whole validation split at the end. Each method (AdamW,
GaLore, GoLore, GoLore@20%, RSO; both sides for the random ones; transform
and model mode) gets its own learning-rate sweep, then several seeds at its
best rate; the table reports mean ± std and the per-seed difference from
tuned AdamW (same seed: same initial weights and data order).

Stages, run in this order as far as their inputs are known (two runs at a
time by default, each pinned to one core):

  sweep     every variant at each learning rate of its grid, seed 0; a grid
            whose best rate is at an edge grows by a factor of 2 there
  seeds     seeds 1 .. N-1 at each variant's best rate
  rank      the best subspace variant at other ranks (r/d = 1/8, 1/2)
  gap       the best subspace variant at other update gaps
  scale     the random methods at other scales (each at its own best rate)
  defaults  each optimizer as ``--optimizer X`` alone trains it (the command
            line's defaults; the ``tiny`` model only)

Every finished run is appended to ``results/quality_runs.jsonl`` (one JSON
object with its settings, results, command and commit); a run already there
is not run again, so the command resumes where it stopped. The report
(``results/quality.md``, with ``quality_*.png``) is rewritten from that
file after every stage; ``--report-only`` rewrites it without running.

  python -m benchmarks.quality                 # the study (about 2 hours)
  python -m benchmarks.quality --quick         # a smoke run (a few minutes)
  python -m benchmarks.quality --models tiny   # one model

``--quick`` writes its report to the temporary directory unless ``--out``
says otherwise. matplotlib draws the figures (``pip install -e ".[bench]"``);
without it the tables are written alone.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import math
import os
import pathlib
import signal
import sys
import tempfile
import time
from typing import Any, Iterable, Mapping


from benchmarks import common  # pylint: disable=wrong-import-position


# ----------------------------------------------------------------------------
# What is compared
# ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Variant:
  """One optimizer setting of the study.

  Attributes:
    label: Its name in the tables.
    fields: :class:`~subspace_jax.train.step.OptimizerConfig` fields
      (besides the learning rate, seeds, rank, gap and scale).
    grid: Its initial learning-rate grid.
    golore_pct: For GoLore@x%: random projections for the last x% of the
      steps (``svd_steps = (1 - x/100) T``).
  """

  label: str
  fields: Mapping[str, Any]
  grid: tuple[float, ...]
  golore_pct: float = 0.0

  @property
  def subspace(self) -> bool:
    return self.fields["name"] != "adamw"

  @property
  def random(self) -> bool:
    return self.fields["name"] in ("golore", "rso")


_ADAM_GRID = (1.25e-3, 2.5e-3, 5e-3, 1e-2)
_SUB_GRID = (1e-2, 2e-2, 4e-2, 8e-2)

VARIANTS: dict[str, Variant] = {
    "adamw": Variant("AdamW", {"name": "adamw"}, _ADAM_GRID),
    "galore": Variant("GaLore", {"name": "galore"}, _SUB_GRID),
    "golore_lean": Variant("GoLore (lean)", {"name": "golore", "side": "lean"},
                           _SUB_GRID),
    "golore_std": Variant("GoLore (std)", {"name": "golore", "side": "std"},
                          _SUB_GRID),
    "golore20_lean": Variant("GoLore@20% (lean)",
                             {"name": "golore", "side": "lean"}, _SUB_GRID, 20.0),
    "golore20_std": Variant("GoLore@20% (std)",
                            {"name": "golore", "side": "std"}, _SUB_GRID, 20.0),
    "rso_lean": Variant("RSO (lean)", {"name": "rso", "side": "lean"}, _SUB_GRID),
    "rso_std": Variant("RSO (std)", {"name": "rso", "side": "std"}, _SUB_GRID),
    "golore_model_lean": Variant(
        "GoLore, model mode (lean)",
        {"name": "golore", "side": "lean", "subspace_mode": "model"}, _SUB_GRID),
    "golore_model_std": Variant(
        "GoLore, model mode (std)",
        {"name": "golore", "side": "std", "subspace_mode": "model"}, _SUB_GRID),
    "rso_model_lean": Variant(
        "RSO, model mode (lean)",
        {"name": "rso", "side": "lean", "subspace_mode": "model"}, _SUB_GRID),
    "rso_model_std": Variant(
        "RSO, model mode (std)",
        {"name": "rso", "side": "std", "subspace_mode": "model"}, _SUB_GRID),
}


@dataclasses.dataclass(frozen=True)
class Setting:
  """A model and its data, steps and study plan.

  Attributes:
    model: A named config of :data:`subspace_jax.models.CONFIGS`.
    seq_len: Tokens per sequence.
    batch_size: Sequences per step.
    steps: Steps of every run (and the schedule's length).
    variants: Keys of :data:`VARIANTS` studied on this model.
    seeds: Seeds at each variant's best learning rate.
    rank: The base rank (the sweep's); None: hidden / 4.
    update_gap: The base update gap.
    scale: The base scale of the subspace methods.
    ranks: Other ranks of the rank stage (as fractions of hidden), run at
      the best variant's best learning rate.
    gaps: Other update gaps of the gap stage, likewise.
    scales: Other scales of the scale stage; each variant of
      ``scale_variants`` gets a learning-rate sweep at each (its grid
      divided by the scale's ratio to the base scale).
    scale_variants: The variants of the scale stage.
    defaults: Whether the defaults stage runs on this model.
    defaults_seeds: Seeds of each defaults run (None: ``seeds``).
    grid_points: Learning rates of each initial grid (the variant's
      grid's first ones; the grid still grows past an edge).
    grids: Initial grids that replace the variants' own on this model.
  """

  model: str
  seq_len: int
  batch_size: int
  steps: int
  variants: tuple[str, ...]
  seeds: int = 3
  rank: int | None = None
  update_gap: int = 200
  scale: float = 0.25
  ranks: tuple[float, ...] = ()
  gaps: tuple[int, ...] = ()
  scales: tuple[float, ...] = ()
  scale_variants: tuple[str, ...] = ()
  defaults: bool = False
  defaults_seeds: int | None = None
  grid_points: int = 4
  grids: Mapping[str, tuple[float, ...]] = dataclasses.field(
      default_factory=dict)


SETTINGS: dict[str, Setting] = {
    "tiny": Setting(
        "tiny", seq_len=64, batch_size=16, steps=600,
        variants=tuple(VARIANTS), seeds=5, ranks=(1 / 8, 1 / 2),
        gaps=(50, 100, 300), scales=(1.0,),
        scale_variants=("golore_std", "rso_std"), defaults=True,
        defaults_seeds=3),
    "small": Setting(
        "small", seq_len=128, batch_size=16, steps=600,
        variants=("adamw", "galore", "rso_std"), seeds=3, grid_points=2,
        grids={"galore": (1e-2, 2e-2), "rso_std": (4e-2, 8e-2)}),
}
"""The study: the default run (``tiny``) and a larger model. On the larger
model (a run takes 7 times as long) only AdamW, GaLore and the best random
method of ``tiny`` are studied, each from the two rates around its ``tiny``
optimum (AdamW's: half of it, as measured first)."""

STAGES = ("sweep", "seeds", "rank", "gap", "scale", "defaults")

QUICK = {
    "tiny": Setting(
        "tiny", seq_len=32, batch_size=8, steps=40,
        variants=("adamw", "golore_std", "rso_model_std"), seeds=2,
        update_gap=10, ranks=(1 / 8,), gaps=(20,), scales=(1.0,),
        scale_variants=("golore_std",), defaults=True),
}
"""``--quick``: the same stages on a few short runs."""


# ----------------------------------------------------------------------------
# Runs
# ----------------------------------------------------------------------------


def _key(task: Mapping[str, Any]) -> str:
  """A run's identity: what it trains, not which stage asked for it."""
  return json.dumps({k: v for k, v in task.items() if k != "stage"},
                    sort_keys=True)


def _task(setting: str, variant: str, lr: float | None, seed: int,
          stage: str, s: Setting, **changes) -> dict[str, Any]:
  task = dict(setting=setting, model=s.model, seq_len=s.seq_len,
              batch_size=s.batch_size, steps=s.steps, variant=variant,
              lr=lr, seed=seed, rank=s.rank, update_gap=s.update_gap,
              scale=s.scale, stage=stage)
  task.update(changes)
  return task


def _optimizer_config(task: Mapping[str, Any]):
  """The :class:`OptimizerConfig` of a task (the command line's defaults
  for a ``defaults`` run, whose variant is an optimizer name)."""
  from subspace_jax import models  # pylint: disable=import-outside-toplevel
  from subspace_jax.cli import flags as cli  # pylint: disable=import-outside-toplevel
  parser = argparse.ArgumentParser()
  cli.add_model_flags(parser)
  cli.add_optimizer_flags(parser)
  args = parser.parse_args(["--model", task["model"]])
  if task["stage"] == "defaults":
    name, _, mode = task["variant"].partition(":")
    args.optimizer = name
    args.subspace_mode = mode or "transform"
    return cli.optimizer_config(args, task["steps"], seed=task["seed"]
                                ).with_model(models.get_config(task["model"]))
  v = VARIANTS[task["variant"]]
  hidden = models.get_config(task["model"]).hidden_size
  fields = dict(v.fields, learning_rate=task["lr"], seed=task["seed"],
                rank=task["rank"] or max(1, hidden // 4),
                update_gap=task["update_gap"], scale=task["scale"])
  if v.golore_pct:
    fields["svd_steps"] = int(round((1 - v.golore_pct / 100) * task["steps"]))
  return cli.optimizer_config(args, task["steps"], **fields).with_model(
      models.get_config(task["model"]))


def eval_batches(task: Mapping[str, Any]) -> int:
  """Batches that cover the validation split once."""
  from subspace_jax.data import pipeline as data_lib  # pylint: disable=import-outside-toplevel
  source = data_lib.source_from_spec("embedded", split="validation")
  it = data_lib.make_iterator(source, shuffle=False, seq_len=task["seq_len"],
                              batch_size=task["batch_size"])
  try:
    return it.steps_per_epoch
  finally:
    it.close()


def run_task(task: Mapping[str, Any]) -> dict[str, Any]:
  """Trains one run (in this process) and returns its record."""
  from subspace_jax.run import loop  # pylint: disable=import-outside-toplevel
  opt = _optimizer_config(task)
  cfg = loop.RunConfig(
      model=task["model"], seq_len=task["seq_len"],
      batch_size=task["batch_size"], steps=task["steps"], seed=task["seed"],
      optimizer=opt, data="embedded", eval_every=max(1, task["steps"] // 6),
      eval_batches=eval_batches(task), log_every=max(1, task["steps"] // 60),
      checkpoint_dir=None, tensorboard_dir=None, progress=False)
  return dict(task, **train_and_measure(cfg), lr_used=opt.learning_rate,
              scale_used=opt.scale, side_used=opt.side,
              gap_used=opt.update_gap, rank_used=opt.rank)


def train_and_measure(cfg) -> dict[str, Any]:
  """Trains the :class:`RunConfig` ``cfg`` (its output silenced) and
  returns its figures: the final held-out loss and perplexity (inf for a
  run that diverged), the last train loss, the curves, wall time and
  tokens/s."""
  from subspace_jax.run import loop  # pylint: disable=import-outside-toplevel
  with tempfile.TemporaryDirectory(prefix="quality_") as tmp:
    metrics = pathlib.Path(tmp) / "metrics.jsonl"
    cfg = dataclasses.replace(cfg, metrics_path=str(metrics))
    quiet = io.StringIO()
    t0 = time.perf_counter()
    try:
      with contextlib.redirect_stderr(quiet), contextlib.redirect_stdout(quiet):
        summary = loop.train(cfg)
      error = None
    except loop.NonFiniteError as e:
      summary, error = {}, str(e)
    if summary.get("interrupted"):  # A signal stopped it: not a result.
      raise KeyboardInterrupt(f"run stopped by {summary['interrupted']}")
    wall = time.perf_counter() - t0
    curve = [json.loads(line) for line in metrics.read_text().splitlines()]
  loss = summary.get("eval_loss")
  if loss is None or not math.isfinite(loss):
    loss = math.inf  # Diverged: the worst result, never the best.
  return dict(
      eval_loss=loss, eval_ppl=math.exp(min(loss, 700.0)),
      train_loss=summary.get("train_loss"), error=error,
      eval_curve=[(r["step"], r["eval_loss"]) for r in curve if "eval_loss" in r],
      train_curve=[(r["step"], r["loss"]) for r in curve
                   if r.get("loss") is not None],
      wall_s=round(wall, 1), tokens_per_s=summary.get("tokens_per_s"))


def _pin(cores) -> None:
  """Pool initializer: this worker runs on one core of its own, and leaves
  Ctrl-C to the parent (which stops the pool)."""
  signal.signal(signal.SIGINT, signal.SIG_IGN)
  core = cores.get()
  if hasattr(os, "sched_setaffinity"):
    os.sched_setaffinity(0, {core})


def run_all(next_tasks, workers: int, on_done) -> None:
  """Runs what ``next_tasks()`` asks for, on ``workers`` processes (each
  pinned to a core), calling ``on_done(record)`` as each run finishes and
  asking again after each: a run is started as soon as its inputs are
  known (the seeds of a sweep that is complete), in the order asked."""
  if workers <= 1:
    while todo := next_tasks():
      on_done(run_task(todo[0]))
    return
  import multiprocessing as mp  # pylint: disable=import-outside-toplevel
  ctx = mp.get_context("spawn")
  cores = ctx.Queue()
  available = (sorted(os.sched_getaffinity(0))
               if hasattr(os, "sched_getaffinity") else [])
  for i in range(workers):
    cores.put(available[i % len(available)] if available else i)
  with ctx.Pool(workers, initializer=_pin, initargs=(cores,)) as pool:
    running: dict[str, Any] = {}  # key -> AsyncResult
    while True:
      for t in next_tasks():
        if len(running) >= workers:
          break
        if _key(t) not in running:
          running[_key(t)] = pool.apply_async(run_task, (t,))
      if not running:
        return
      while not any(r.ready() for r in running.values()):
        time.sleep(0.5)
      for key in [k for k, r in running.items() if r.ready()]:
        on_done(running.pop(key).get())


# ----------------------------------------------------------------------------
# The plan: which runs the records so far call for
# ----------------------------------------------------------------------------


class Records:
  """The finished runs, by key; appended to a JSONL file as they come."""

  def __init__(self, path: pathlib.Path):
    self.path = path
    self.by_key: dict[str, dict] = {}
    if path.exists():
      for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
          continue
        try:
          rec = json.loads(line)
        except json.JSONDecodeError:
          print(f"quality: skipping damaged line {n} of {path}", file=sys.stderr)
          continue
        self.by_key[_key(_task_of(rec))] = rec

  def add(self, rec: dict) -> None:
    self.by_key[_key(_task_of(rec))] = rec
    self.path.parent.mkdir(parents=True, exist_ok=True)
    with open(self.path, "a", encoding="utf-8") as f:
      f.write(json.dumps(rec) + "\n")
      f.flush()
      os.fsync(f.fileno())

  def get(self, task: Mapping[str, Any]) -> dict | None:
    return self.by_key.get(_key(task))

  def loss(self, task: Mapping[str, Any]) -> float | None:
    rec = self.get(task)
    return None if rec is None else rec["eval_loss"]


_TASK_FIELDS = ("setting", "model", "seq_len", "batch_size", "steps",
                "variant", "lr", "seed", "rank", "update_gap", "scale", "stage",
                "side")


def _task_of(rec: Mapping[str, Any]) -> dict[str, Any]:
  return {k: rec[k] for k in _TASK_FIELDS if k in rec}


def _grid(records: Records, setting: str, variant: str, s: Setting,
          **changes) -> tuple[list[float], list[dict]]:
  """The learning-rate sweep of ``variant`` (seed 0): the rates run so far
  and the tasks still needed. The grid starts as the variant's and grows
  by a factor of 2 past an edge holding the best (finite) result."""
  ratio = s.scale / changes.get("scale", s.scale)
  lrs = sorted(_round(lr * ratio)
               for lr in s.grids.get(variant, VARIANTS[variant].grid)[:s.grid_points])
  while True:
    tasks = [_task(setting, variant, lr, 0, "sweep", s, **changes) for lr in lrs]
    missing = [t for t in tasks if records.get(t) is None]
    if missing:
      return lrs, missing
    losses = [records.loss(t) for t in tasks]
    best = min(range(len(lrs)), key=lambda i: losses[i])
    if not math.isfinite(losses[best]) or len(lrs) >= s.grid_points + 3:
      return lrs, []
    if best == 0:
      lrs.insert(0, _round(lrs[0] / 2))
    elif best == len(lrs) - 1:
      lrs.append(_round(lrs[-1] * 2))
    else:
      return lrs, []


def _round(lr: float) -> float:
  """A learning rate to 4 significant digits (so grids compare exactly)."""
  return float(f"{lr:.4g}")


def best_lr(records: Records, setting: str, variant: str, s: Setting,
            **changes) -> float | None:
  """The sweep's best learning rate (None until the sweep is complete)."""
  lrs, missing = _grid(records, setting, variant, s, **changes)
  if missing:
    return None
  losses = {lr: records.loss(_task(setting, variant, lr, 0, "sweep", s, **changes))
            for lr in lrs}
  return min(losses, key=losses.get)


def seed_runs(records: Records, setting: str, variant: str, s: Setting,
              stage: str = "seeds", **changes) -> tuple[list[dict], list[dict]]:
  """The runs of ``variant`` at its best rate over ``s.seeds`` seeds: those
  done and those still needed (none while the sweep is incomplete)."""
  lr = best_lr(records, setting, variant, s, **changes)
  if lr is None:
    return [], []
  done, todo = [], []
  for seed in range(s.seeds):
    t = _task(setting, variant, lr, seed, "sweep" if seed == 0 else stage, s,
              **changes)
    rec = records.get(t)
    (done if rec is not None else todo).append(rec if rec is not None else t)
  return done, todo


def _mean(xs: Iterable[float]) -> float:
  xs = list(xs)
  return sum(xs) / len(xs)


def best_subspace(records: Records, setting: str, s: Setting) -> str | None:
  """The transform-mode subspace variant with the lowest mean loss over its
  seeds (None until every variant's seeds are done)."""
  means = {}
  for v in s.variants:
    if not VARIANTS[v].subspace:
      continue
    done, todo = seed_runs(records, setting, v, s)
    if todo or not done:
      return None
    if VARIANTS[v].fields.get("subspace_mode") != "model":
      means[v] = _mean(r["eval_loss"] for r in done)
  return min(means, key=means.get) if means else None


def _default_task(setting: str, opt: str, seed: int, s: Setting) -> dict:
  """A defaults run: ``opt`` (``NAME`` or ``NAME:model``) with the command
  line's defaults, which are resolved into the task (so that new defaults
  make new runs)."""
  t = _task(setting, opt, None, seed, "defaults", s)
  cfg = _optimizer_config(t)
  return dict(t, lr=cfg.learning_rate, rank=cfg.rank,
              update_gap=cfg.update_gap, scale=cfg.scale,
              side=cfg.side)


def plan(records: Records, settings: Mapping[str, Setting],
         stages: Iterable[str] = STAGES) -> list[dict]:
  """Every run of ``stages`` that the records so far call for and do not
  hold (a stage whose inputs are not known yet asks for nothing)."""
  stages = set(stages)
  todo: list[dict] = []
  for name, s in settings.items():
    for v in s.variants:
      if "sweep" in stages:
        todo += _grid(records, name, v, s)[1]
      if "seeds" in stages:
        todo += seed_runs(records, name, v, s)[1]
    best = best_subspace(records, name, s)
    if best is not None:
      lr = best_lr(records, name, best, s)
      if "rank" in stages:
        for rank in stage_ranks(s):
          todo += _fixed_lr_runs(records, name, best, lr, s, "rank", rank=rank)
      if "gap" in stages:
        for gap in s.gaps:
          todo += _fixed_lr_runs(records, name, best, lr, s, "gap",
                                 update_gap=gap)
    if "scale" in stages:
      for v in s.scale_variants:
        for scale in s.scales:
          todo += [dict(t, stage="scale") for t in _grid(
              records, name, v, s, scale=scale)[1]]
          todo += seed_runs(records, name, v, s, "scale", scale=scale)[1]
    if "defaults" in stages and s.defaults:
      todo += [t for opt in default_optimizers()
               for seed in range(s.defaults_seeds or s.seeds)
               if records.get(t := _default_task(name, opt, seed, s)) is None]
  return todo


def stage_ranks(s: Setting) -> list[int]:
  hidden = _hidden(s.model)
  return [max(1, round(hidden * frac)) for frac in s.ranks]


def _fixed_lr_runs(records, setting, variant, lr, s, stage, **changes) -> list[dict]:
  """``s.seeds`` runs of ``variant`` at ``lr`` with ``changes`` not yet held."""
  tasks = [_task(setting, variant, lr, seed, stage, s, **changes)
           for seed in range(s.seeds)]
  return [t for t in tasks if records.get(t) is None]


def default_optimizers() -> list[str]:
  """``NAME`` or ``NAME:model`` of every optimizer and mode the command
  line offers."""
  import subspace_jax as sj  # pylint: disable=import-outside-toplevel
  from subspace_jax.train import step as train  # pylint: disable=import-outside-toplevel
  out = []
  for name in train.OPTIMIZERS:
    out.append(name)
    method = sj.transform.METHODS.get(name)
    if method is not None and method.model_mode:
      out.append(f"{name}:model")
  return out


def _hidden(model: str) -> int:
  from subspace_jax import models  # pylint: disable=import-outside-toplevel
  return models.get_config(model).hidden_size


# ----------------------------------------------------------------------------
# The report
# ----------------------------------------------------------------------------


@dataclasses.dataclass
class Result:
  """A variant's runs at one setting over seeds, against tuned AdamW."""

  label: str
  lr: float | None
  runs: list[dict]
  base: list[dict]  # Tuned AdamW's runs (same seeds where there are).

  @property
  def ppl(self) -> list[float]:
    return [r["eval_ppl"] for r in self.runs]

  def deltas(self) -> list[float]:
    """Per seed: 100 (ppl / AdamW's ppl at the same seed − 1)."""
    base = {r["seed"]: r["eval_ppl"] for r in self.base}
    return [100 * (r["eval_ppl"] / base[r["seed"]] - 1)
            for r in self.runs if r["seed"] in base]


def _stats(xs: list[float]) -> tuple[float, float]:
  """Mean and sample standard deviation (0 for one value)."""
  m = _mean(xs)
  if len(xs) < 2:
    return m, 0.0
  return m, math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))


def _pm(xs: list[float], digits: int = 2, sign: bool = False) -> str:
  if not xs:
    return "—"
  if not all(math.isfinite(x) for x in xs):
    return "diverged"
  m, sd = _stats(xs)
  f = f"{{:{'+' if sign else ''}.{digits}f}}"
  return f"{f.format(m)} ± {sd:.{digits}f}"


def _spread(xs: list[float]) -> str:
  if not xs or not all(math.isfinite(x) for x in xs):
    return "—"
  return f"{min(xs):+.1f} … {max(xs):+.1f}"


def _lr(lr: float | None) -> str:
  return "—" if lr is None else f"{lr:g}"


def tuned(records: Records, name: str, s: Setting, variant: str,
          stage: str = "seeds", **changes) -> Result | None:
  """``variant`` at its best rate over the seeds run so far (None before
  its sweep is complete)."""
  done, _ = seed_runs(records, name, variant, s, stage, **changes)
  if not done:
    return None
  base, _ = seed_runs(records, name, "adamw", s)
  return Result(VARIANTS[variant].label, done[0]["lr"], done, base)


def _main_table(records, name, s) -> tuple[str, list[tuple[str, Result]]]:
  rows, results = [], []
  for v in s.variants:
    res = tuned(records, name, s, v)
    if res is None:
      continue
    results.append((v, res))
    d = res.deltas() if v != "adamw" else []
    train = [r["train_loss"] for r in res.runs if r["train_loss"] is not None]
    rows.append(f"| {res.label} | {_lr(res.lr)} | {len(res.runs)} | "
                f"{_pm(res.ppl)} | "
                f"{'—' if v == 'adamw' else _pm(d, 1, sign=True) + ' %'} | "
                f"{'—' if v == 'adamw' else _spread(d)} | "
                f"{_pm(train, 3)} |")
  head = ("| method | tuned lr | seeds | held-out perplexity | Δ vs tuned AdamW "
          "(per seed) | Δ range | train loss (last 10 steps) |\n"
          "|---|---|---|---|---|---|---|\n")
  return head + "\n".join(rows) + "\n", results


def _sweep_table(records, name, s) -> str:
  grids = {v: _grid(records, name, v, s)[0] for v in s.variants}
  lrs = sorted({lr for g in grids.values() for lr in g})
  lines = ["| method | " + " | ".join(f"{lr:g}" for lr in lrs) + " |",
           "|---|" + "---|" * len(lrs)]
  for v, grid in grids.items():
    cells, best = [], best_lr(records, name, v, s)
    for lr in lrs:
      loss = records.loss(_task(name, v, lr, 0, "sweep", s))
      if loss is None:
        cells.append("")
      elif not math.isfinite(loss):
        cells.append("div.")
      else:
        text = f"{math.exp(loss):.2f}"
        cells.append(f"**{text}**" if lr == best else text)
    lines.append(f"| {VARIANTS[v].label} | " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"


def _sensitivity(records, name, s) -> str:
  best = best_subspace(records, name, s)
  if best is None:
    return ""
  base = tuned(records, name, s, best)
  lr = base.lr
  out = []
  ranks = stage_ranks(s)
  hidden = _hidden(s.model)
  if ranks:
    rows = []
    base_rank = base.runs[0]["rank_used"]
    for rank in sorted([base_rank, *ranks]):
      runs = (base.runs if rank == base_rank else
              [records.get(_task(name, best, lr, seed, "rank", s, rank=rank))
               for seed in range(s.seeds)])
      runs = [r for r in runs if r is not None]
      res = Result(base.label, lr, runs, base.base)
      rows.append(f"| {rank} ({rank / hidden:.3g}) | {len(runs)} | "
                  f"{_pm(res.ppl)} | {_pm(res.deltas(), 1, sign=True)} % |")
    out.append(
        f"**Rank** ({base.label} at lr {lr:g}, gap {s.update_gap}; every "
        "other setting as above):\n\n"
        "| rank (r/d) | seeds | held-out perplexity | Δ vs tuned AdamW |\n"
        "|---|---|---|---|\n" + "\n".join(rows) + "\n")
  if s.gaps:
    rows = []
    for gap in sorted({s.update_gap, *s.gaps}):
      runs = (base.runs if gap == s.update_gap else
              [records.get(_task(name, best, lr, seed, "gap", s, update_gap=gap))
               for seed in range(s.seeds)])
      runs = [r for r in runs if r is not None]
      res = Result(base.label, lr, runs, base.base)
      rows.append(f"| {gap} | {len(runs)} | {_pm(res.ppl)} | "
                  f"{_pm(res.deltas(), 1, sign=True)} % |")
    out.append(
        f"**Update gap** ({base.label} at lr {lr:g}, rank "
        f"{base.runs[0]['rank_used']}):\n\n"
        "| update gap | seeds | held-out perplexity | Δ vs tuned AdamW |\n"
        "|---|---|---|---|\n" + "\n".join(rows) + "\n")
  return "\n".join(out)


def _scale_table(records, name, s) -> str:
  if not s.scale_variants or not s.scales:
    return ""
  rows = []
  for v in s.scale_variants:
    for scale in sorted({s.scale, *s.scales}):
      changes = {} if scale == s.scale else {"scale": scale}
      res = tuned(records, name, s, v, "scale" if changes else "seeds", **changes)
      if res is None:
        continue
      rows.append(f"| {res.label} | {scale:g} | {_lr(res.lr)} | "
                  f"{_lr(res.lr * scale)} | {len(res.runs)} | {_pm(res.ppl)} | "
                  f"{_pm(res.deltas(), 1, sign=True)} % |")
  if not rows:
    return ""
  return ("**Scale** (each scale with its own learning-rate sweep; "
          "lr × scale is the step of the projected matrices, lr that of the "
          "embeddings, norms and output layer):\n\n"
          "| method | scale | tuned lr | lr × scale | seeds | held-out "
          "perplexity | Δ vs tuned AdamW |\n|---|---|---|---|---|---|---|\n"
          + "\n".join(rows) + "\n")


def defaults_results(records, name, s) -> list[tuple[str, dict, Result]]:
  """``(--optimizer X ..., its resolved settings, results)`` of the
  defaults stage, for the command line's current defaults."""
  out = []
  base, _ = seed_runs(records, name, "adamw", s)
  for opt in default_optimizers():
    tasks = [_default_task(name, opt, seed, s)
             for seed in range(s.defaults_seeds or s.seeds)]
    runs = [r for t in tasks if (r := records.get(t)) is not None]
    opt_name, _, mode = opt.partition(":")
    flag = f"--optimizer {opt_name}" + (f" --subspace-mode {mode}" if mode else "")
    out.append((flag, tasks[0], Result(flag, tasks[0]["lr"], runs, base)))
  return out


def _defaults_table(records, name, s) -> str:
  rows = []
  for flag, t, res in defaults_results(records, name, s):
    if not res.runs:
      continue
    d = res.deltas()
    settings = f"lr {t['lr']:g}"
    if not flag.endswith("adamw"):
      settings += (f", scale {t['scale']:g}, side {t['side']}, "
                   f"gap {t['update_gap']}, rank {t['rank']}")
    within = ("yes" if d and _mean(d) <= 5 else "no") if d else "—"
    rows.append(f"| `{flag}` | {settings} | {len(res.runs)} | {_pm(res.ppl)} | "
                f"{_pm(d, 1, sign=True)} % | {within} |")
  if not rows:
    return ""
  return ("| command | its defaults | seeds | held-out perplexity | Δ vs tuned "
          "AdamW | within 5 % |\n|---|---|---|---|---|---|\n"
          + "\n".join(rows) + "\n")


def _param_millions(model: str) -> float:
  from subspace_jax import models  # pylint: disable=import-outside-toplevel
  from subspace_jax.data import tokenizers as tokenizer  # pylint: disable=import-outside-toplevel
  cfg = models.get_config(model, vocab_size=tokenizer.ByteTokenizer().vocab_size)
  return models.param_count(cfg) / 1e6


def _golore20_note(s: Setting) -> str:
  """Where GoLore@20% is GaLore: no subspace is chosen in its random phase."""
  svd_steps = int(0.8 * s.steps)
  refreshes = list(range(0, s.steps, s.update_gap))
  if refreshes[-1] >= svd_steps:
    return ""
  return (f" (its subspaces are chosen at steps "
          f"{', '.join(map(str, refreshes))}, all before step {svd_steps}: "
          "here it is GaLore, its lean side run for run, its std side GaLore "
          "on the std side)")


def _protocol(name: str, s: Setting, n_eval: int | None) -> str:
  cfg = _hidden(s.model)
  tokens = s.steps * s.batch_size * s.seq_len
  return (
      f"Model `{s.model}` ({_param_millions(s.model):.2f}M parameters, hidden "
      f"{cfg}), float32, byte tokens; {s.steps} steps of {s.batch_size} × "
      f"{s.seq_len} tokens ({tokens / 1e6:.2f}M tokens); warm-up "
      f"{min(50, s.steps)} steps then cosine decay to 0.1 × the peak; Adam β "
      "= (0.9, 0.999), global-norm clip 1, no weight decay. Subspace methods: "
      f"rank hidden/4 = {max(1, cfg // 4)}, a new subspace every "
      f"{s.update_gap} steps, scale {s.scale:g}, side as named (lean: the "
      "larger dimension of each matrix projected; std: the smaller, the "
      "papers' rule), attention and MLP matrices projected (embeddings, "
      "output layer and norms in full, with Adam at the peak lr), RSO "
      "without a proximal term; GoLore@20% uses SVD projections for the "
      f"first 80% of the steps{_golore20_note(s)}. Held-out: the mean loss over the whole "
      f"validation split ({n_eval or '?'} batches) after the last step. Seed "
      "S sets the initial weights, the data order and the projections; the "
      f"sweep is at seed 0, then seeds 1–{s.seeds - 1} at the best rate. "
      "Δ: per seed, 100 × (perplexity / tuned AdamW's at the same seed − 1), "
      "mean ± std and range.\n")


def _commits(records: Records) -> str:
  ids = sorted({r.get("commit", "unknown") for r in records.by_key.values()})
  return ", ".join(f"`{c}`" for c in ids) or "none yet"


def report(records: Records, settings: Mapping[str, Setting], command: str,
           out: pathlib.Path) -> None:
  """Writes the markdown report (and the figures) from the records."""
  parts = [
      "# Quality: every method at its own tuned learning rate\n",
      f"{common.machine_line()}\n",
      f"Command: `{command}` (it resumes from `{records.path.name}`, which "
      "holds every run with its settings and commit; "
      "`--report-only` rewrites this file from it).\n",
      f"Commit: {_commits(records)} (the runs' code; the report: "
      f"`{common.commit()}`)\n",
  ]
  readme = []
  for name, s in settings.items():
    try:
      n_eval = eval_batches(_task(name, "adamw", None, 0, "sweep", s))
    except Exception:  # pylint: disable=broad-except
      n_eval = None
    table, results = _main_table(records, name, s)
    parts.append(f"## {name}: {_param_millions(s.model):.2f}M parameters\n")
    parts.append(_protocol(name, s, n_eval))
    parts.append(table)
    png = out.with_name(f"{out.stem}_{name}.png")
    if results and plot(results, png, f"{name}: each method at its tuned lr"):
      parts.append(f"![{name}]({png.name})\n\nFigure: mean train loss "
                   "(left) and held-out loss (right) over the seeds at each "
                   "method's tuned learning rate; the band is the seeds' "
                   "range.\n")
    parts.append("### Learning-rate sweeps (seed 0, held-out perplexity; "
                 "the best in bold)\n")
    parts.append(_sweep_table(records, name, s))
    sens = _sensitivity(records, name, s)
    scale = _scale_table(records, name, s)
    if sens or scale:
      parts.append("### Sensitivity\n")
      parts += [x for x in (sens, scale) if x]
    readme.append(f"**{name}** ({_param_millions(s.model):.2f}M parameters, "
                  f"{s.steps} steps, {s.seeds} seeds at each method's tuned "
                  f"lr):\n\n{table}")
    dt = _defaults_table(records, name, s) if s.defaults else ""
    if dt:
      n = s.defaults_seeds or s.seeds
      parts.append("### The defaults: `--optimizer X` alone\n")
      parts.append(
          f"`subspace-jax pretrain --optimizer X` with every other flag "
          f"at its default ({s.steps} steps of {s.batch_size} × {s.seq_len}), "
          f"seeds 0–{n - 1} (`--seed S --proj-seed S`):\n")
      parts.append(dt)
      readme.append(f"`--optimizer X` alone, on the default run ({name}), "
                    f"over {n} seeds:\n\n{dt}")
  if out.stem == "quality":  # The study's report feeds the README.
    parts.append(common.readme_block(
        "quality", "\n".join(readme) + f"\nFrom [quality.md](benchmarks/results/{out.name}) "
        f"(`{command}`)."))
  common.write(out, "\n".join(parts))


def plot(results: list[tuple[str, Result]], path: pathlib.Path, title: str) -> bool:
  """Mean curves over the seeds with their range; False without matplotlib."""
  try:
    import matplotlib  # pylint: disable=import-outside-toplevel
  except ImportError:
    return False
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  fig, axes = plt.subplots(1, 2, figsize=(13, 4.6))
  for v, res in results:
    for ax, key in zip(axes, ("train_curve", "eval_curve")):
      curves = [dict(map(tuple, r[key])) for r in res.runs if r[key]]
      if not curves:
        continue
      steps = sorted(set.intersection(*(set(c) for c in curves)))
      ys = [[c[k] for k in steps] for c in curves]
      mean = [_mean(col) for col in zip(*ys)]
      lo = [min(col) for col in zip(*ys)]
      hi = [max(col) for col in zip(*ys)]
      style = "--" if v == "adamw" else (":" if "model" in v else "-")
      line, = ax.plot(steps, mean, style, label=res.label, lw=1.4)
      ax.fill_between(steps, lo, hi, color=line.get_color(), alpha=0.15)
  axes[0].set(title="train loss", xlabel="step", yscale="log")
  axes[1].set(title="held-out loss", xlabel="step", yscale="log")
  axes[1].legend(fontsize=7, ncol=2)
  fig.suptitle(title)
  fig.tight_layout()
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_name(f".{path.name}.tmp.png")
  fig.savefig(tmp, dpi=90)
  plt.close(fig)
  os.replace(tmp, path)
  print(f"wrote {path}")
  return True


# ----------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
      description=__doc__.splitlines()[0],
      formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
  p.add_argument("--quick", action="store_true",
                 help="a smoke run: a few short runs of the same stages")
  p.add_argument("--models", default=None,
                 help="comma-separated settings to run (default: all of "
                      f"{', '.join(SETTINGS)})")
  p.add_argument("--stages", default=",".join(STAGES),
                 help="comma-separated stages (default: all)")
  p.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1),
                 help="runs at a time, each pinned to one core (default: "
                      "min(2, cores))")
  p.add_argument("--report-only", action="store_true",
                 help="rewrite the report from the runs file; run nothing")
  p.add_argument("--out", default=None,
                 help="the report (default: results/quality.md; with --quick "
                      "a file in the temporary directory); the runs go "
                      "beside it as NAME_runs.jsonl")
  return p


def main(argv: list[str] | None = None) -> None:
  args = build_parser().parse_args(argv)
  settings = QUICK if args.quick else SETTINGS
  if args.models:
    unknown = set(args.models.split(",")) - set(settings)
    if unknown:
      raise SystemExit(f"--models: unknown {', '.join(sorted(unknown))}; "
                       f"choose from {', '.join(settings)}")
    settings = {k: v for k, v in settings.items() if k in args.models.split(",")}
  stages = args.stages.split(",")
  if set(stages) - set(STAGES):
    raise SystemExit(f"--stages: choose from {', '.join(STAGES)}")
  if args.out:
    out = pathlib.Path(args.out)
  elif args.quick:  # A smoke run's figures are not results.
    out = pathlib.Path(tempfile.gettempdir()) / "subspace_jax_quality_quick.md"
  else:
    out = common.RESULTS / "quality.md"
  records = Records(out.with_name(f"{out.stem}_runs.jsonl"))
  command = common.command_line("benchmarks.quality", argv)
  if not args.report_only:
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    code = common.commit()
    total = [0]

    def done(rec: dict) -> None:
      rec = dict(rec, commit=code, command=command)
      records.add(rec)
      total[0] += 1
      print(f"[{total[0]}] {rec['setting']} {rec['stage']} {rec['variant']} "
            f"lr {_lr(rec['lr_used'])} seed {rec['seed']}: perplexity "
            f"{rec['eval_ppl']:.3f} ({rec['wall_s']:.0f} s)", flush=True)

    t0 = time.perf_counter()
    try:
      run_all(lambda: plan(records, settings, stages), args.workers, done)
    except KeyboardInterrupt:
      raise SystemExit(f"quality: interrupted; the {len(records.by_key)} "
                       f"finished runs are in {records.path}: the same "
                       "command resumes") from None
    print(f"quality: {total[0]} run(s) in {time.perf_counter() - t0:.0f} s")
  report(records, settings, command, out)


if __name__ == "__main__":
  main()
