"""One device check of a real GPU, in under 8 minutes: results/gpu.md.

What a lent H100/H200 is for, in one command that needs only what such a
machine has (JAX with CUDA, flax, optax, orbax; anything else is carried as
wheels and installed from a folder with ``--wheels DIR``, no index):

  python -m benchmarks.gpu                 # about 8 minutes on one GPU

Parts, in this order, each given at most its share of ``--minutes`` (a part
that would not fit in what is left is reported as skipped, and the results
file is rewritten after every part, so a stopped run keeps what it did):

* ``tests``: the suite's fast numerics subset (``--test-args``) on the GPU,
  in a subprocess (``JAX_PLATFORMS=cuda``, float32 matmuls at full
  precision as on the CPU the suite is written for); needs pytest.
* ``speed``: tokens/s and MFU (``6·N·tokens/s`` over the card's dense bf16
  peak) of llama_60m and llama_1b train steps in bfloat16 for AdamW and
  every optimizer in both modes (``train.setup``'s step: clipping, weight
  decay, schedule).
* ``memory``: ``--compile-for gpu`` figures of 1B and 7B steps (the
  compiler's peak, :func:`subspace_jax.plan.compile_for.compile_for`'s step)
  against the peak the device reports after running that very executable
  (``memory_stats()["peak_bytes_in_use"]``), each case in its own process
  so each peak is its own; the 7B model-mode case is one real 7B step on
  one GPU.
* ``paper60m``: the time-budgeted LLaMA-60M run of the papers' setting
  (``python -m benchmarks.paper60m --minutes M``) for the minutes left;
  needs the data pipeline's grain.

``--tiny`` runs every part with tiny models, a one-test subset and the CPU
as the compile target: the suite's test of this script (on the CPU it reports
no device peak and no MFU).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import pathlib
import shlex
import subprocess
import sys
import time
from typing import Any, Callable

if __package__ in (None, ""):  # Run as `python benchmarks/gpu.py`.
  sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from benchmarks import common  # pylint: disable=wrong-import-position

PARTS = ("tests", "speed", "memory", "paper60m")
OPTIMIZERS = ("adamw", "galore", "golore", "rso", "golore-model", "rso-model")
# The numerics files of the suite: projections, the transforms, model mode
# and the LLaMA (the others test files, data and the command line).
TEST_ARGS = ("tests/test_projection.py tests/test_transform.py "
             "tests/test_factored.py tests/test_llama.py -k 'not slow' -x -q")


@dataclasses.dataclass(frozen=True)
class SpeedCase:
  """One model of the speed part: its batch and rank."""

  model: str
  batch: int
  seq: int
  rank: int


@dataclasses.dataclass(frozen=True)
class MemoryCase:
  """One step of the memory part (``benchmarks.memory``'s names)."""

  model: str
  step: str
  rank: int
  batch: int
  seq: int
  run: bool = True  # Also run it (else the compiler's figures only).


FULL = dict(
    speed=(SpeedCase("llama_60m", 32, 256, 128),
           SpeedCase("llama_1b", 16, 512, 512)),
    memory=(MemoryCase("llama_1b", "adamw", 512, 4, 256),
            MemoryCase("llama_1b", "rso_model", 512, 4, 256),
            MemoryCase("llama_7b", "rso_model", 1024, 1, 256),
            MemoryCase("llama_7b", "adamw", 1024, 1, 256)),
    target="gpu", test_args=TEST_ARGS, paper=["--model", "llama_60m"])
TINY = dict(
    speed=(SpeedCase("tiny", 4, 32, 16),),
    memory=(MemoryCase("tiny", "rso_model", 16, 2, 32),),
    target="cpu",
    test_args="tests/test_projection.py -q -k captured_energy",
    paper=["--model", "tiny", "--data", "embedded", "--batch-size", "4",
           "--seq-len", "32", "--steps", "4", "--methods", "rso"])
# Each part's share of the budget: it may use up to this fraction of the
# total (and never more than what is left).
SHARES = {"tests": 0.2, "speed": 0.35, "memory": 0.35, "paper60m": 0.3}
GiB = 1024**3


class Budget:
  """Seconds left of the run's budget."""

  def __init__(self, minutes: float):
    self.total = 60 * minutes
    self.start = time.perf_counter()

  def used(self) -> float:
    return time.perf_counter() - self.start

  def left(self) -> float:
    return self.total - self.used()

  def share(self, part: str) -> float:
    return min(SHARES[part] * self.total, self.left())


def log(msg: str) -> None:
  print(f"gpu: {msg}", flush=True)


# ----------------------------------------------------------------------------
# Packages
# ----------------------------------------------------------------------------


def install_wheels(wheels: str | None, packages: list[str]) -> list[str]:
  """Installs the missing ``packages`` from the wheel folder ``wheels``
  (``pip --no-index``); returns those still missing."""
  missing = [p for p in packages if importlib.util.find_spec(p) is None]
  if missing and wheels:
    names = {"pytest": "pytest", "grain": "grain"}
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-index",
           "--find-links", wheels, *(names.get(p, p) for p in missing)]
    log("installing " + " ".join(missing) + f" from {wheels}")
    subprocess.run(cmd, check=False)
    importlib.invalidate_caches()
    missing = [p for p in packages if importlib.util.find_spec(p) is None]
  return missing


# ----------------------------------------------------------------------------
# Parts
# ----------------------------------------------------------------------------


def part_tests(settings, budget: Budget, args) -> list[str]:
  """The fast numerics subset of the suite, on the device, in a subprocess."""
  if install_wheels(args.wheels, ["pytest"]):
    return ["Not run: pytest is not installed (carry its wheel and pass "
            "`--wheels DIR`)."]
  env = dict(os.environ, NVIDIA_TF32_OVERRIDE="0",
             JAX_DEFAULT_MATMUL_PRECISION="highest")
  if not args.tiny:
    env["JAX_PLATFORMS"] = "cuda"
  cmd = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider",
         *shlex.split(args.test_args or settings["test_args"])]
  timeout = max(10.0, budget.share("tests"))
  start = time.perf_counter()
  try:
    out = subprocess.run(cmd, cwd=common.ROOT, env=env, capture_output=True,
                         text=True, timeout=timeout)
    tail, rc = (out.stdout + out.stderr).strip().splitlines()[-1:], out.returncode
  except subprocess.TimeoutExpired as e:
    text = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
    tail, rc = text.strip().splitlines()[-1:] + [f"stopped at {timeout:.0f} s"], None
  seconds = time.perf_counter() - start
  summary = " / ".join(tail) or "no output"
  log(f"tests: {summary} ({seconds:.0f} s)")
  return [f"`pytest {shlex.join(cmd[5:])}` (float32 matmuls at full precision, "
          f"TF32 off): exit code {rc}, {seconds:.0f} s: {summary}"]


def _speed_rows(case: SpeedCase, names, budget: Budget, deadline: float):
  """Step time, tokens/s and MFU of each optimizer on ``case``."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  from benchmarks import paper60m  # pylint: disable=import-outside-toplevel
  from benchmarks import speed  # pylint: disable=import-outside-toplevel
  from subspace_jax.models import llama  # pylint: disable=import-outside-toplevel
  from subspace_jax import sharding as shd  # pylint: disable=import-outside-toplevel
  from subspace_jax.train import step as train  # pylint: disable=import-outside-toplevel
  cfg = llama.get_config(case.model, dtype=jnp.bfloat16, scan_layers=True)
  mesh = shd.make_mesh(devices=jax.devices()[:1])
  opts = argparse.Namespace(rank=case.rank)
  batch = speed.random_batch(cfg, case.batch, case.seq)
  params = llama.param_count(cfg)
  rows = []
  for name in names:
    if budget.used() > deadline:
      rows.append((name, None, "skipped: out of time"))
      continue
    t0 = time.perf_counter()
    s = train.setup(cfg, speed.optimizer_config(name, opts, 10**6), mesh)
    state = s.init(0)
    b = jax.device_put(batch, s.batch_sharding)
    step = s.train_step.lower(state, b).compile()
    for _ in range(2):  # Step 0 draws the first subspace; then steady.
      state, metrics = step(state, b)
    jax.block_until_ready(metrics)
    compile_s = time.perf_counter() - t0
    times = []
    for _ in range(5):
      t = time.perf_counter()
      state, metrics = step(state, b)
      jax.block_until_ready(metrics)
      times.append(time.perf_counter() - t)
    med = float(np.median(times))
    tps = case.batch * case.seq / med
    rows.append((name, (med, tps, paper60m.mfu(tps, params), compile_s,
                        float(metrics["loss"])), ""))
    log(f"speed: {case.model} {name}: {1e3 * med:.1f} ms, {tps:,.0f} tokens/s")
    del state, step, s
  return rows


def part_speed(settings, budget: Budget, args) -> list[str]:
  from subspace_jax.models import llama  # pylint: disable=import-outside-toplevel
  deadline = budget.used() + budget.share("speed")
  lines = []
  for case in settings["speed"]:
    rows = _speed_rows(case, args.optimizers.split(","), budget, deadline)
    n = llama.param_count(llama.get_config(case.model))
    lines += [f"{case.model} ({n / 1e6:.3g}M parameters), batch {case.batch} "
              f"× {case.seq}, bf16 compute with float32 weights, scanned "
              f"layers, no remat, rank {case.rank}; median of 5 steady steps "
              "after 2:", "",
              "| optimizer | step (ms) | tokens/s | MFU | / AdamW's time | "
              "compile + 2 steps (s) | loss |", "|---|---|---|---|---|---|---|"]
    base = next((r[0] for name, r, _ in rows if name == "adamw" and r), None)
    for name, r, note in rows:
      if r is None:
        lines.append(f"| {name} | {note} | | | | | |")
        continue
      med, tps, mfu, comp, loss = r
      ratio = f"{med / base:.2f}" if base else "–"
      lines.append(f"| {name} | {1e3 * med:.1f} | {tps:,.0f} | {mfu} | "
                   f"{ratio} | {comp:.0f} | {loss:.3f} |")
    lines.append("")
  return lines


def _memory_child(case: MemoryCase, target: str) -> dict[str, Any]:
  """Compiles ``case``'s step for ``target`` as ``--compile-for`` does, runs
  that executable twice, and returns the compiler's and the device's
  figures (run in a process of its own, so the device's peak is this
  step's)."""
  import jax  # pylint: disable=import-outside-toplevel
  from benchmarks import memory as bench  # pylint: disable=import-outside-toplevel
  from subspace_jax.plan import compile_for as plan  # pylint: disable=import-outside-toplevel
  from subspace_jax.plan import memory  # pylint: disable=import-outside-toplevel
  from subspace_jax import sharding as shd  # pylint: disable=import-outside-toplevel
  from subspace_jax.train import step as train  # pylint: disable=import-outside-toplevel
  cfg = bench.run_config(bench.Case(target, case.model, case.step, case.rank,
                                    case.batch, case.seq, (1, 1, 1)))
  devices = memory.target_devices(target)[:1]
  mesh = shd.make_mesh(1, 1, 1, devices=devices)
  s = train.setup(cfg.model_config, cfg.optimizer, mesh)
  t0 = time.perf_counter()
  abstract_batch = plan._abstract_batch(cfg, s.batch_sharding)  # pylint: disable=protected-access
  executable = s.train_step.lower(s.abstract_state, abstract_batch).compile()
  compiled = memory.memory_of(executable)
  out = dict(compile_s=time.perf_counter() - t0, compiled_peak=compiled.peak,
             temporaries=compiled.temporaries,
             state=memory.tree_bytes(s.abstract_state, per_device=True),
             capacity=memory.device_capacity(devices[0])[0])
  if not case.run:
    return out
  stats = lambda: devices[0].memory_stats() or {}
  state = s.init(0)
  jax.block_until_ready(state)
  out["peak_after_init"] = stats().get("peak_bytes_in_use")
  tokens = jax.numpy.zeros((cfg.batch_size, cfg.seq_len), jax.numpy.int32)
  batch = jax.device_put({k: tokens for k in abstract_batch}, s.batch_sharding)
  t0 = time.perf_counter()
  for _ in range(2):
    state, metrics = executable(state, batch)
  jax.block_until_ready(metrics)
  out.update(step_s=(time.perf_counter() - t0) / 2,
             loss=float(metrics["loss"]),
             peak=stats().get("peak_bytes_in_use"),
             in_use=stats().get("bytes_in_use"))
  return out


def part_memory(settings, budget: Budget, args) -> list[str]:
  deadline = budget.used() + budget.share("memory")
  target = settings["target"]
  lines = [f"Each step compiled for `{target}` as `--compile-for {target}` "
           "compiles it (bf16 weights and moments, scanned layers, remat, one "
           "device), then that executable run twice in the same fresh "
           "process: GiB.", "",
           "| model | optimizer | rank | batch × seq | compiled peak | device "
           "peak after init | device peak after the steps | device / compiled "
           "| step (s) | compile (s) |", "|---|---|---|---|---|---|---|---|---|---|"]
  g = lambda b: "–" if b is None else f"{b / GiB:.2f}"
  for case in settings["memory"]:
    what = (f"| {case.model} | {case.step} | "
            f"{'–' if case.step == 'adamw' else case.rank} | "
            f"{case.batch} × {case.seq} |")
    if budget.used() > deadline:
      lines.append(f"{what} skipped: out of time | | | | | |")
      continue
    cmd = [sys.executable, "-m", "benchmarks.gpu", "--child-memory",
           json.dumps(dataclasses.asdict(case)), "--target", target]
    env = dict(os.environ, XLA_PYTHON_CLIENT_MEM_FRACTION="0.95")
    try:
      out = subprocess.run(cmd, cwd=common.ROOT, env=env, capture_output=True,
                           text=True, timeout=max(10.0, deadline - budget.used()))
    except subprocess.TimeoutExpired:
      lines.append(f"{what} stopped: out of time | | | | | |")
      continue
    if out.returncode:
      error = (out.stderr.strip().splitlines() or ["?"])[-1][:200]
      lines.append(f"{what} failed: {error} | | | | | |")
      log(f"memory: {case.model} {case.step} failed: {error}")
      continue
    r = json.loads(out.stdout.strip().splitlines()[-1])
    ratio = (f"{r['peak'] / r['compiled_peak']:.2f}" if r.get("peak") else "–")
    lines.append(
        f"{what} {g(r['compiled_peak'])} | {g(r.get('peak_after_init'))} | "
        f"{g(r.get('peak'))} | {ratio} | "
        f"{r['step_s']:.2f} | {r['compile_s']:.0f} |" if "step_s" in r else
        f"{what} {g(r['compiled_peak'])} | not run | | | | {r['compile_s']:.0f} |")
    log(f"memory: {case.model} {case.step}: compiled {g(r['compiled_peak'])}, "
        f"device {g(r.get('peak'))} GiB")
  cap = None
  try:
    import jax  # pylint: disable=import-outside-toplevel
    from subspace_jax.plan import memory  # pylint: disable=import-outside-toplevel
    cap = memory.device_capacity(jax.devices()[0])[0]
  except Exception:  # pylint: disable=broad-except
    pass
  lines += ["", f"Device memory: {g(cap)} GiB (`memory_stats()['bytes_limit']`"
            "). The device peak is the allocator's high-water mark since the "
            "process started: the state's initialization is in it (its own "
            "peak is the column before).", ""]
  return lines


def part_paper60m(settings, budget: Budget, args) -> list[str]:
  if install_wheels(args.wheels, ["grain"]):
    return ["Not run: the data pipeline needs grain (carry its wheel and "
            "its dependencies' and pass `--wheels DIR`)."]
  minutes = budget.share("paper60m") / 60
  if minutes < 0.5:
    return ["Not run: out of time."]
  out = pathlib.Path(args.out).with_name("paper60m.md")
  cmd = [sys.executable, "-m", "benchmarks.paper60m", *settings["paper"],
         "--out", str(out)]
  if "--steps" not in settings["paper"]:
    cmd += ["--minutes", f"{minutes:.1f}"]
  result = subprocess.run(cmd, cwd=common.ROOT, capture_output=True, text=True,
                          timeout=60 * minutes + 60)
  if result.returncode:
    error = (result.stderr.strip().splitlines() or ["?"])[-1][:300]
    return [f"`{' '.join(cmd[1:])}` failed: {error}"]
  text = out.read_text(encoding="utf-8")
  table = [l for l in text.splitlines() if l.startswith("|")]
  return [f"`python {' '.join(cmd[1:])}` ({minutes:.1f} minutes; report: "
          f"[{out.name}]({out.name})):", "", *table, ""]


RUNNERS: dict[str, Callable] = {
    "tests": part_tests, "speed": part_speed, "memory": part_memory,
    "paper60m": part_paper60m,
}
TITLES = {
    "tests": "The suite's fast numerics subset on the device",
    "speed": "Train-step speed (bf16)",
    "memory": "Compiled and real peaks (--compile-for against the device)",
    "paper60m": "LLaMA-60M in the papers' setting, time-budgeted",
}


def write(path, command: str, sections: dict[str, list[str]], budget: Budget,
          done: bool) -> None:
  import jax  # pylint: disable=import-outside-toplevel
  dev = jax.devices()[0]
  text = ["# Device check\n", common.provenance(command), "",
          f"Device: {dev.platform} ({dev.device_kind}), {jax.device_count()} "
          f"device(s). {'Run' if done else 'So far'}: {budget.used() / 60:.1f} "
          f"of {budget.total / 60:.0f} minutes.", ""]
  for part, lines in sections.items():
    text += [f"## {TITLES[part]}", "", *lines, ""]
  common.write(path, "\n".join(text))


def build_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
      description=__doc__.splitlines()[0],
      formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
  p.add_argument("--parts", default=",".join(PARTS),
                 help=f"comma-separated, of {', '.join(PARTS)}")
  p.add_argument("--minutes", type=float, default=7.5,
                 help="the budget of the whole run")
  p.add_argument("--tiny", action="store_true",
                 help="tiny models, one test, the CPU as compile target: a "
                      "check of this script")
  p.add_argument("--wheels", default=None,
                 help="folder of wheels to install missing packages from "
                      "(pytest, grain), with pip --no-index")
  p.add_argument("--optimizers", default=",".join(OPTIMIZERS),
                 help="optimizers of the speed part (speed.py's names)")
  p.add_argument("--test-args", default=None,
                 help="arguments of the tests part's pytest (default: the "
                      "numerics files, -k 'not slow')")
  p.add_argument("--child-memory", default=None, help=argparse.SUPPRESS)
  p.add_argument("--target", default="gpu", help=argparse.SUPPRESS)
  common.add_output_flags(p, "gpu.md", note=False)
  return p


def main(argv: list[str] | None = None) -> None:
  args = build_parser().parse_args(argv)
  if args.child_memory:
    case = MemoryCase(**json.loads(args.child_memory))
    print(json.dumps(_memory_child(case, args.target)), flush=True)
    return
  parts = [p for p in args.parts.split(",") if p]
  for p in parts:
    if p not in PARTS:
      raise SystemExit(f"--parts: unknown {p!r}; choose from {', '.join(PARTS)}")
  settings = TINY if args.tiny else FULL
  budget = Budget(args.minutes)
  command = common.command_line("benchmarks.gpu", argv)
  sections: dict[str, list[str]] = {}
  for part in parts:
    if budget.left() < 5:
      sections[part] = ["Not run: out of time."]
      continue
    log(f"{part} ({budget.left():.0f} s left)")
    try:
      sections[part] = RUNNERS[part](settings, budget, args)
    except Exception as e:  # pylint: disable=broad-except
      sections[part] = [f"Failed: {type(e).__name__}: {str(e)[:300]}"]
      log(f"{part} failed: {e}")
    write(args.out, command, sections, budget, done=False)
  write(args.out, command, sections, budget, done=True)


if __name__ == "__main__":
  main()
