"""Compile targets, collective bytes and --compile-for (subspace_jax.plan.memory,
subspace_jax.plan.compile_for, examples/pretrain_llama.py).

The TPU tests need libtpu (``pip install "subspace_jax[aot]"``) and are
skipped without it; everything else runs on the CPU.
"""

import importlib.util
import json
import re

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from subspace_jax.plan import memory
from subspace_jax.models import llama
from subspace_jax.plan import compile_for as plan
from subspace_jax.train import step as train
from subspace_jax import sharding as shd

import clirun

HAS_LIBTPU = importlib.util.find_spec("libtpu") is not None
needs_libtpu = pytest.mark.skipif(not HAS_LIBTPU, reason="needs libtpu "
                                  '(pip install "subspace_jax[aot]")')
needs_8 = pytest.mark.skipif(jax.device_count() < 8,
                             reason="needs 8 host devices (conftest.py)")

TINY = ["--batch-size", "4", "--seq-len", "32"]


def _mesh8():
  return jax.make_mesh((8,), ("d",), axis_types=(AxisType.Auto,))


# --- targets ---------------------------------------------------------------


def test_cpu_target_is_the_host_devices():
  assert memory.target_devices("cpu") == jax.devices("cpu")


@pytest.mark.parametrize("target", ["tpu", "tpu:", "cpu:2", "quantum", ""])
def test_bad_target_names_the_forms(target):
  with pytest.raises(ValueError, match=re.escape(memory.TARGET_FORMS)):
    memory.target_devices(target)


def test_gpu_target_needs_a_gpu():
  if any(d.platform == "gpu" for d in jax.devices()):
    pytest.skip("a GPU is attached")
  with pytest.raises(ValueError, match="needs an attached GPU"):
    memory.target_devices("gpu")


@pytest.mark.skipif(HAS_LIBTPU, reason="libtpu is installed")
def test_tpu_target_without_libtpu_says_what_to_install():
  with pytest.raises(ValueError, match=re.escape(
      'pip install "subspace_jax[aot]"')):
    memory.target_devices("tpu:v5p:2x2x1")


def test_does_not_fit_reads_the_compilers_figures():
  message = ("RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory "
             "required for HLO temporaries (180.00G) exceeds available HBM "
             "(95.74G).")
  assert memory.does_not_fit(message) == (180 * memory.GiB,
                                          int(95.74 * memory.GiB))
  assert memory.does_not_fit("INTERNAL: something else") is None


# --- collective bytes ------------------------------------------------------


@needs_8
def test_collective_bytes_of_a_sharded_matmul_by_hand():
  """x @ w with the contraction split 8 ways: one all-reduce of the
  (64, 32) float32 result, nothing else."""
  mesh = _mesh8()
  x = jax.ShapeDtypeStruct((64, 128), jnp.float32,
                           sharding=NamedSharding(mesh, P(None, "d")))
  w = jax.ShapeDtypeStruct((128, 32), jnp.float32,
                           sharding=NamedSharding(mesh, P("d", None)))
  f = jax.jit(lambda x, w: x @ w, out_shardings=NamedSharding(mesh, P()))
  c = memory.collective_bytes(f.lower(x, w).compile())
  size = 64 * 32 * 4
  assert c.by_kind["all-reduce"] == memory.Collective(1, size, 2 * size * 7 // 8)
  assert c.bytes == size and c.unknown_trip_counts == 0


@needs_8
def test_collectives_in_a_loop_count_once_per_iteration():
  """A scan of 5 steps, each gathering an 8-way sharded (128, 128) weight:
  5 all-gathers forward (and as many in the backward pass)."""
  mesh = _mesh8()
  ws = jax.ShapeDtypeStruct((5, 128, 128), jnp.float32,
                            sharding=NamedSharding(mesh, P(None, "d", None)))
  x = jax.ShapeDtypeStruct((64, 128), jnp.float32,
                           sharding=NamedSharding(mesh, P("d", None)))

  def f(ws, x):
    h, _ = jax.lax.scan(lambda h, w: (jnp.tanh(h @ w), None), x, ws)
    return h.sum()

  text = jax.jit(f).lower(ws, x).compile().as_text()
  c = memory.collective_bytes(text)
  assert c.by_kind["all-gather"].count == 5
  assert c.by_kind["all-gather"].bytes == 5 * 128 * 128 * 4
  # Without XLA's known_trip_count the condition's constant (i < 5) is used.
  stripped = re.sub(r'"known_trip_count":\{"n":"\d+"\},?', "", text)
  assert "known_trip_count" not in stripped
  assert memory.collective_bytes(stripped) == c
  # The TPU compiler writes that constant with a layout: s32[]{:T(128)}.
  tpu_style = re.sub(r"(= s32\[\]) constant\(", r"\1{:T(128)} constant(",
                     stripped)
  assert tpu_style != stripped
  assert memory.collective_bytes(tpu_style) == c


def _tiny_step_collectives(scan: bool) -> memory.Collectives:
  config = llama.get_config("tiny", scan_layers=scan, num_layers=3)
  s = train.setup(config, train.OptimizerConfig(name="adamw"),
                  shd.make_mesh(data=1, fsdp=1, tensor=8))
  tokens = jax.ShapeDtypeStruct((8, 16), jnp.int32, sharding=s.batch_sharding)
  compiled = s.train_step.lower(
      s.abstract_state, {"inputs": tokens, "targets": tokens}).compile()
  return memory.collective_bytes(compiled, num_devices=8)


@needs_8
def test_scanned_and_unrolled_steps_move_the_same_bytes():
  """Tensor parallelism all-reduces activations in every layer: inside the
  scanned step's layer loop, once per layer in the unrolled one. The two
  agree to 1% (not exactly: the unrolled step keeps a few scalar
  all-reduces that the scanned one merges); counting the loop body once
  would give about a third (3 layers)."""
  scanned, unrolled = _tiny_step_collectives(True), _tiny_step_collectives(False)
  assert scanned.unknown_trip_counts == 0
  assert unrolled.bytes > 0
  assert scanned.bytes == pytest.approx(unrolled.bytes, rel=0.01)
  for kind in memory.COLLECTIVES:
    assert scanned.by_kind[kind].bytes == pytest.approx(
        unrolled.by_kind[kind].bytes, rel=0.01), kind


@needs_8
def test_data_parallel_step_reduces_every_gradient_once_and_gathers_the_weights():
  """On a data-parallel mesh (ZeRO-1: Adam's moments split over the data
  axis) each replica updates a slice of every weight: the collectives are
  the gradients' reduction, at most once each, and the gathering of the
  updated weights (4 bytes a parameter), besides the batch and scalars."""
  cfg = clirun.run_config(["--mesh", "8,1,1", "--optimizer", "adamw",
                           "--batch-size", "8", "--seq-len", "16"])
  report = plan.compile_for(cfg, "cpu")
  grads = 4 * llama.param_count(cfg.model_config)
  c = report.collectives
  assert report.devices == 8 and report.breakdown.gradients == grads
  reduced = c.by_kind["all-reduce"].bytes + c.by_kind["reduce-scatter"].bytes
  assert 0.8 * grads <= reduced <= grads + 64
  tokens = 8 * 16 * 4
  assert c.by_kind["all-gather"].bytes == grads + tokens
  # The moments: 1/8 of AdamW's 2 x 4 bytes a parameter on each device.
  assert report.breakdown.optimizer_state <= 2 * grads / 8 * 1.1


# --- plan.compile_for and --compile-for --------------------------------------


def test_compile_for_cpu_through_the_cli(tmp_path):
  out = tmp_path / "memory.json"
  r = clirun.run(["--compile-for", "cpu", "--memory-json", out, *TINY],
                 tmp_path)
  assert r.returncode == 0, r.stderr
  assert "peak" in r.stdout and "capacity unknown" in r.stdout
  report = json.loads(out.read_text())
  config = clirun.run_config(TINY).model_config
  b = report["breakdown"]
  assert report["target"] == "cpu" and report["devices"] == 1
  assert report["fits"] is None and report["capacity"] is None
  assert b["weights"] == b["gradients"] == 4 * llama.param_count(config)
  assert b["weights"] + b["optimizer_state"] + b["temporaries"] + b[
      "other"] == b["peak"] == report["required"]
  c = b["compiled"]
  assert b["peak"] == (c["arguments"] + c["outputs"] + c["temporaries"]
                       - c["aliased"])
  assert report["collectives"]["bytes"] == 0  # One device.
  # Nothing trained, no run directory made.
  assert sorted(p.name for p in tmp_path.iterdir()) == ["memory.json"]


def test_compile_for_exit_code_follows_the_memory_limit(tmp_path):
  """--memory-limit (GiB) is the capacity planned against: 3 over it, 0
  under it. The tiny step's peak is a few MiB."""
  out = tmp_path / "m.json"
  small = clirun.run(["--compile-for", "cpu", "--memory-limit", "0.001",
                      "--memory-json", out, *TINY], tmp_path)
  assert small.returncode == 3, small.stderr
  assert "does not fit" in small.stdout
  report = json.loads(out.read_text())
  assert report["fits"] is False and report["capacity_source"] == "given"
  assert report["capacity"] == int(0.001 * memory.GiB) < report["required"]
  large = clirun.run(["--compile-for", "cpu", "--memory-limit", "1", *TINY],
                     tmp_path)
  assert large.returncode == 0, large.stderr
  assert ": fits" in large.stdout


@pytest.mark.parametrize("target", ["quantum", "tpu"])
def test_bad_target_exits_2_naming_the_flag(tmp_path, target):
  r = clirun.run(["--compile-for", target, *TINY], tmp_path)
  assert r.returncode == 2
  lines = r.stderr.strip().splitlines()
  assert len(lines) == 1 and "--compile-for" in lines[0], r.stderr
  assert memory.TARGET_FORMS in lines[0]


def test_model_mode_gradients_are_the_factors(tmp_path):
  """In model mode only B (and the leaves kept in full) is differentiated."""
  cfg = clirun.run_config(["--optimizer", "rso", "--subspace-mode", "model",
                           "--rank", "8", "--mesh", "1,1,1", *TINY])
  report = plan.compile_for(cfg, "cpu", devices=jax.devices()[:1])
  b = report.breakdown
  assert 0 < b.gradients < b.weights
  assert b.weights + b.optimizer_state + b.temporaries + b.other == b.peak


def test_a_mesh_smaller_than_the_target_plans_its_own_devices(tmp_path):
  """--mesh 1,1,1 on a target of 8 devices plans one device (a single
  card): no collectives; a mesh larger than the target is refused."""
  cfg = clirun.run_config(["--mesh", "1,1,1", *TINY])
  report = plan.compile_for(cfg, "cpu")
  assert len(jax.devices()) == 8 and report.devices == 1
  assert report.collectives.bytes == 0
  two = plan.compile_for(clirun.run_config(["--mesh", "2,1,1", *TINY]), "cpu")
  assert two.devices == 2 and two.collectives.bytes > 0
  with pytest.raises(ValueError, match="needs 16 devices"):
    plan.compile_for(clirun.run_config(["--mesh", "16,1,1", *TINY]), "cpu")


# --- TPU (compile-only; libtpu) ----------------------------------------------


@needs_libtpu
def test_tpu_topology_devices_and_capacity():
  devices = memory.target_devices("tpu:v5p:2x2x1")
  assert len(devices) == 4 and len(memory.target_devices("tpu:v5p:2x2x2")) == 8
  assert memory.device_capacity(devices[0]) == (
      memory.HBM_BY_DEVICE_KIND[devices[0].device_kind], "table")
  # The test session's own devices are still the 8 CPU ones.
  assert jax.device_count() == 8 and jax.devices()[0].platform == "cpu"
  with pytest.raises(ValueError, match="TPU topology 'v5p:9x9x9x9'.*tpu:v5p:2x2x1"):
    memory.target_devices("tpu:v5p:9x9x9x9")


@needs_libtpu
def test_tpu_compile_of_the_tiny_step_fits(tmp_path):
  out = tmp_path / "m.json"
  r = clirun.run(["--compile-for", "tpu:v5p:2x2x1", "--mesh", "1,4,1",
                  "--memory-json", out, "--batch-size", "8", "--seq-len", "32"],
                 tmp_path)
  assert r.returncode == 0, r.stderr
  assert "TPU_ACCELERATOR_TYPE" not in r.stderr, r.stderr
  report = json.loads(out.read_text())
  assert report["devices"] == 4 and report["fits"] is True
  config = clirun.run_config(TINY).model_config
  # FSDP over 4 chips: the weights' per-chip share (norms replicated).
  assert report["breakdown"]["weights"] < 4 * llama.param_count(config) / 3
  assert report["collectives"]["by_kind"]["all-gather"]["count"] > 0


@needs_libtpu
def test_tpu_compiler_refusal_is_reported_as_does_not_fit():
  """Four 120 GiB outputs of a 60 GiB (per chip) input: the compiler
  refuses; the report carries its figures instead of raising."""
  devices = memory.target_devices("tpu:v5p:2x2x1")
  mesh = jax.sharding.Mesh(devices, ("d",), axis_types=(AxisType.Auto,))
  n = 4 * 60 * memory.GiB // 4
  big = jax.ShapeDtypeStruct((n,), jnp.float32,
                             sharding=NamedSharding(mesh, P("d")))
  step = jax.jit(lambda a: (a * 2, a + 1))
  report = memory.step_report(step, big, devices=devices, target="tpu",
                              weights=big, optimizer_state={})
  assert report.fits is False and report.breakdown is None
  assert report.capacity_source == "compiler"
  assert report.required > report.capacity > 90 * memory.GiB
  assert report.required >= 3 * 60 * memory.GiB  # input and two outputs
  assert "does not fit: needs" in "\n".join(report.lines())
