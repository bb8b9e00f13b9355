"""Checkpoints of sharded train states (8 host devices, see conftest.py).

Exact resume, restoring onto another mesh, the JSON items, corrupt and
unfinished checkpoints (checksums of the arrays), retention and save
intervals, checkpoints of another model and of another format.
"""

import dataclasses
import json
import re
import os
import pathlib
import shutil
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from jax.experimental.compilation_cache import compilation_cache

from subspace_jax.models import llama
from subspace_jax.train import checkpoint
from subspace_jax.train import step as train
from subspace_jax.train.checkpoint import (
    Checkpointer,
    CheckpointWarning,
    IncompatibleCheckpointError,
    UnreadableCheckpointError,
    state_checksums,
)
from subspace_jax.data.pipeline import ByteTokenizer, EmbeddedCorpus, make_iterator
from subspace_jax.sharding import make_mesh

UPDATE_GAP = 3
# Resume after N steps and take M more: the subspace index changes from
# N // 3 = 1 to 2 at count 6, i.e. after the restore, and the step after
# that refresh still records a loss.
N, M = 4, 4


@pytest.fixture(scope="module", autouse=True)
def _compilation_cache(tmp_path_factory):
  """A persistent compilation cache for this module only.

  A fresh ``Setup`` re-jits the same train step; with the cache its compiled
  executable is loaded instead of compiled again, which halves the module's
  runtime. The settings before are put back afterwards.
  """
  names = {
      "jax_compilation_cache_dir": str(tmp_path_factory.mktemp("xla_cache")),
      "jax_persistent_cache_min_compile_time_secs": 0.0,
      "jax_persistent_cache_min_entry_size_bytes": 0,
  }
  before = {name: getattr(jax.config, name) for name in names}
  for name, value in names.items():
    jax.config.update(name, value)
  compilation_cache.reset_cache()
  yield
  for name, value in before.items():
    jax.config.update(name, value)
  compilation_cache.reset_cache()


def _mesh(data, fsdp, tensor, n=8):
  if jax.device_count() < 8:
    pytest.skip("needs XLA_FLAGS=--xla_force_host_platform_device_count=8")
  return make_mesh(data, fsdp, tensor, devices=jax.devices()[:n])


def _opt(name: str) -> train.OptimizerConfig:
  # "rso:model" is RSO in model mode (its key and counter are in params).
  name, _, mode = name.partition(":")
  # GaLore with the randomized SVD: its state holds the projections, as with
  # the exact SVD, but an exact SVD refresh takes 5-30 s on 8 host devices
  # sharing 2 cores (well under a second on one device).
  return train.OptimizerConfig(
      name=name, rank=8, update_gap=UPDATE_GAP, total_steps=N + M,
      warmup_steps=2, learning_rate=3e-3,
      svd="randomized" if name == "galore" else "exact",
      subspace_mode=mode or "transform",
  )


def _batches(n: int, seed: int = 0) -> list[dict]:
  tokens = np.random.default_rng(seed).integers(0, 256, (n, 8, 33), np.int32)
  return [{"inputs": t[:, :-1], "targets": t[:, 1:]} for t in tokens]


def _run_config(model: llama.LlamaConfig, opt: train.OptimizerConfig) -> dict:
  """A JSON-able run config like the training loop's."""
  as_json = lambda c: json.loads(json.dumps(dataclasses.asdict(c), default=str))
  return {"model": as_json(model), "optimizer": as_json(opt)}


def _assert_trees_equal(actual, expected):
  assert jax.tree.structure(actual) == jax.tree.structure(expected)
  for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected)):
    assert a.dtype == e.dtype
    np.testing.assert_array_equal(a, e)


def _train(setup, state, batches, ckpt=None):
  """Runs the batches, saving through ``ckpt`` after every step; returns the
  state, the per-step losses and a host copy of the state at each save."""
  losses, saved = [], {}
  for batch in batches:
    state, metrics = setup.train_step(state, batch)
    losses.append(np.asarray(metrics["loss"]))
    step = int(state.step)
    if ckpt is not None and ckpt.save(step, state):
      saved[step] = jax.device_get(state)
  return state, losses, saved


# --------------------------------------------------------------------------
# Resuming
# --------------------------------------------------------------------------


@pytest.mark.parametrize("name", [*train.OPTIMIZERS, "rso:model"])
def test_resume_is_bit_identical(name, tmp_path):
  assert N // UPDATE_GAP != (N + M - 1) // UPDATE_GAP  # a refresh after N
  mesh = _mesh(2, 2, 2)
  model = llama.get_config("tiny")
  batches = _batches(N + M)

  # One uninterrupted run of N + M steps that checkpoints (async) at step N.
  first = train.setup(model, _opt(name), mesh)
  with Checkpointer(tmp_path, save_interval_steps=N) as ckpt:
    state, losses, saved = _train(first, first.init(0), batches[:N], ckpt)
    assert list(saved) == [N]
    state, more, _ = _train(first, state, batches[N:])
  losses += more
  expected = jax.device_get(state)
  del first, state

  # A new process, in effect: a fresh Setup restores step N and goes on.
  second = train.setup(model, _opt(name), mesh)
  with Checkpointer(tmp_path) as ckpt:
    restored = ckpt.restore(second.abstract_state)
  assert restored.step == N and int(restored.state.step) == N
  _assert_trees_equal(restored.state, saved[N])
  for leaf, want in zip(
      jax.tree.leaves(restored.state), jax.tree.leaves(second.abstract_state)
  ):
    assert leaf.dtype == want.dtype and leaf.sharding == want.sharding
  dtypes = {leaf.dtype for leaf in jax.tree.leaves(restored.state.opt_state)}
  assert jnp.dtype(jnp.int32) in dtypes  # step counts
  if name != "adamw":  # projection key data
    assert jnp.dtype(jnp.uint32) in {leaf.dtype for leaf in jax.tree.leaves(restored.state)}
  if name.endswith(":model"):  # the step after restore draws the same P
    sub = _opt(name).subspace(restored.state.params.weights,
                                llama.views())
    before = jax.device_put(saved[N])
    for a, b in zip(
        sub.projections(restored.state.params, restored.state.opt_state),
        sub.projections(before.params, before.opt_state)):
      if a is not None:
        np.testing.assert_array_equal(a, b)

  state, resumed_losses, _ = _train(second, restored.state, batches[N:])
  np.testing.assert_array_equal(np.stack(resumed_losses), np.stack(losses[N:]))
  _assert_trees_equal(jax.device_get(state), expected)


def test_restore_onto_another_mesh(tmp_path):
  model = llama.get_config("tiny", scan_layers=True)
  opt = _opt("galore")
  batches = _batches(N + M, seed=1)
  fsdp = train.setup(model, opt, _mesh(data=2, fsdp=4, tensor=1))
  with Checkpointer(tmp_path, save_interval_steps=N) as ckpt:
    state, _, saved = _train(fsdp, fsdp.init(0), batches[:N], ckpt)
  _, losses, _ = _train(fsdp, state, batches[N:])

  data = train.setup(model, opt, _mesh(data=4, fsdp=1, tensor=1, n=4))
  with Checkpointer(tmp_path) as ckpt:
    restored = ckpt.restore(data.abstract_state)
  _assert_trees_equal(jax.device_get(restored.state), saved[N])
  four = set(jax.devices()[:4])
  for leaf, want in zip(
      jax.tree.leaves(restored.state), jax.tree.leaves(data.abstract_state)
  ):
    assert leaf.sharding == want.sharding and leaf.sharding.device_set == four

  _, resumed_losses, _ = _train(data, restored.state, batches[N:])
  assert np.all(np.isfinite(resumed_losses))
  # Another mesh sums in another order: equal up to float32 rounding.
  np.testing.assert_allclose(resumed_losses, losses, rtol=1e-5)


# --------------------------------------------------------------------------
# Small checkpoints of one initial state
# --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small():
  """An adamw setup of the tiny model and its initial state (host copy)."""
  setup = train.setup(llama.get_config("tiny"), _opt("adamw"), _mesh(2, 2, 2))
  return setup, jax.device_get(setup.init(0))


def _variant(setup, host_state, k: int):
  """The state with every parameter shifted by ``k`` and step ``k``, placed
  on the devices (a distinct state per step, without training)."""
  state = host_state._replace(
      step=np.int32(k),
      params=jax.tree.map(lambda p: p + k, host_state.params),
  )
  return jax.device_put(state, setup.state_shardings)


def test_data_state_and_config_round_trip(small, tmp_path):
  setup, host = small
  data = lambda: make_iterator(
      EmbeddedCorpus(), ByteTokenizer(), seq_len=32, batch_size=8,
      cache_dir=tmp_path / "tokens",
  )
  it = data()
  for _ in range(3):
    next(it)
  config = _run_config(llama.get_config("tiny"), _opt("adamw"))
  with Checkpointer(tmp_path / "ckpt", async_save=False) as ckpt:
    assert ckpt.save(
        3, _variant(setup, host, 3), data_state=it.get_state(), config=config,
        force=True,
    )
  with Checkpointer(tmp_path / "ckpt") as ckpt:
    restored = ckpt.restore(setup.abstract_state, expected_config=config)
  # Each process saves its own position, restored as the list of them.
  assert restored.data_state == [it.get_state()]
  assert restored.config == config
  resumed = data()
  resumed.set_state(restored.data_state[0])
  for _ in range(2):
    want, got = next(it), next(resumed)
    np.testing.assert_array_equal(got["inputs"], want["inputs"])
    np.testing.assert_array_equal(got["targets"], want["targets"])


def test_async_save_then_wait_then_restore(small, tmp_path):
  setup, host = small
  ckpt = Checkpointer(tmp_path, save_interval_steps=5, async_save=True)
  assert ckpt.save(5, _variant(setup, host, 5))
  ckpt.wait_until_finished()
  assert ckpt.all_steps() == [5]
  assert sorted(os.listdir(tmp_path)) == ["5"]  # committed: no temp dir left
  restored = ckpt.restore(setup.abstract_state)
  assert restored.step == 5
  assert restored.data_state is None and restored.config is None
  _assert_trees_equal(
      jax.device_get(restored.state), jax.device_get(_variant(setup, host, 5))
  )
  ckpt.close()
  ckpt.close()  # closing twice is harmless


def test_keeps_the_last_n_and_saves_on_the_interval(small, tmp_path):
  setup, host = small
  state = _variant(setup, host, 0)
  with Checkpointer(
      tmp_path, save_interval_steps=2, max_to_keep=2, async_save=False
  ) as ckpt:
    assert [ckpt.save(s, state) for s in range(1, 8)] == [
        False, True, False, True, False, True, False,
    ]
    assert ckpt.save(7, state, force=True)
    assert not ckpt.save(7, state, force=True)  # already saved
    assert ckpt.all_steps() == [6, 7] and ckpt.latest_step() == 7
  assert sorted(os.listdir(tmp_path)) == ["6", "7"]
  with Checkpointer(tmp_path) as ckpt:
    assert ckpt.all_steps() == [6, 7]
    assert ckpt.restore(setup.abstract_state, step=6).step == 6


def test_empty_directory_restores_nothing(small, tmp_path):
  setup, _ = small
  with Checkpointer(tmp_path) as ckpt:
    assert ckpt.latest_step() is None and ckpt.all_steps() == []
    assert ckpt.restore(setup.abstract_state) is None
    with pytest.raises(UnreadableCheckpointError, match="no checkpoint for step 4"):
      ckpt.restore(setup.abstract_state, step=4)


# --------------------------------------------------------------------------
# Corrupt and unfinished checkpoints
# --------------------------------------------------------------------------


def _files(path: pathlib.Path) -> list[pathlib.Path]:
  return sorted(p for p in path.rglob("*") if p.is_file())


def _array_files(step_dir: pathlib.Path) -> list[pathlib.Path]:
  """The files holding the array chunks (OCDBT data files)."""
  return [p for p in _files(step_dir / "state") if p.parent.name == "d"]


def _garble(step_dir):
  rng = np.random.default_rng(0)
  for p in _array_files(step_dir):
    p.write_bytes(rng.bytes(p.stat().st_size))


def _truncate(step_dir):
  for p in _array_files(step_dir):
    with open(p, "r+b") as f:
      f.truncate(p.stat().st_size // 2)


CORRUPTIONS = {
    "garbled_arrays": _garble,
    "truncated_arrays": _truncate,
    "deleted_tree_metadata": lambda d: (d / "state" / "_METADATA").unlink(),
    "deleted_manifest": lambda d: (d / "state" / "manifest.ocdbt").unlink(),
    "missing_state": lambda d: shutil.rmtree(d / "state"),
    "garbled_config": lambda d: (d / "config" / "metadata").write_text("{not json"),
}


# A failed Orbax read can leave a callback for its closed event loop behind.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("corrupt", list(CORRUPTIONS))
def test_corrupt_latest_falls_back_then_fails_clearly(small, tmp_path, corrupt):
  setup, host = small
  config = _run_config(llama.get_config("tiny"), _opt("adamw"))
  with Checkpointer(tmp_path, save_interval_steps=1, async_save=False) as ckpt:
    for step in (1, 2):
      ckpt.save(step, _variant(setup, host, step), config=config)
  CORRUPTIONS[corrupt](tmp_path / "2")
  left = _files(tmp_path)

  with Checkpointer(tmp_path) as ckpt:
    with pytest.warns(UserWarning, match=r"step\(s\) 2 .*restored step 1 instead"):
      restored = ckpt.restore(setup.abstract_state, expected_config=config)
    assert restored.step == 1
    _assert_trees_equal(
        jax.device_get(restored.state), jax.device_get(_variant(setup, host, 1))
    )
    assert _files(tmp_path) == left  # the bad checkpoint is kept

    CORRUPTIONS[corrupt](tmp_path / "1")
    with pytest.raises(UnreadableCheckpointError, match=r"step\(s\) 2, 1") as err:
      ckpt.restore(setup.abstract_state)
    assert "\n" not in str(err.value) and len(str(err.value)) < 500
    with pytest.raises(UnreadableCheckpointError, match="step\\(s\\) 2 "):
      ckpt.restore(setup.abstract_state, step=2)  # no fallback when asked


def _flip_bytes(step_dir, n=64):
  """Inverts ``n`` bytes in the middle of the largest array data file.

  The zstd frames carry no checksum: depending on what the bytes hit, the
  file decodes to other values (the checksum catches them) or fails to
  decode (TensorStore catches it). Either way it must not load.
  """
  path = max(_array_files(step_dir), key=lambda p: p.stat().st_size)
  data = bytearray(path.read_bytes())
  middle = len(data) // 2
  data[middle:middle + n] = bytes(b ^ 0xFF for b in data[middle:middle + n])
  path.write_bytes(bytes(data))


# How a damaged array file is reported: a checksum mismatch, or the decoder's
# own error where the flipped bytes break a zstd frame.
# The array and a reason: "checksum mismatch", or zstd's own words for a
# frame it cannot decode, which vary with the bytes hit ("Data corruption
# detected", "Unknown frame descriptor", "Src size is incorrect", ...).
_DAMAGE = r"array [\w/]+: (checksum mismatch|[A-Z][^;)]+)"


def test_a_changed_value_fails_the_checksum(small, tmp_path):
  """A value changed behind Orbax's back (the saved hash no longer fits):
  always reported as a checksum mismatch, whatever the file format does."""
  setup, host = small
  with Checkpointer(tmp_path, save_interval_steps=1, async_save=False) as ckpt:
    for step in (1, 2):
      ckpt.save(step, _variant(setup, host, step))
  path = tmp_path / "2" / "checksums" / "metadata"  # the JSON item
  saved = json.loads(path.read_text())
  name = "params/embed/embedding"
  dtype, digest = saved["arrays"][name]
  saved["arrays"][name] = [dtype, digest[:-1] + ("0" if digest[-1] != "0" else "1")]
  path.write_text(json.dumps(saved))
  with Checkpointer(tmp_path) as ckpt:
    with pytest.raises(UnreadableCheckpointError,
                       match=f"array {re.escape(name)}: checksum mismatch"):
      ckpt.restore(setup.abstract_state, step=2)
    with pytest.warns(CheckpointWarning, match="checksum mismatch"):
      assert ckpt.restore(setup.abstract_state).step == 1


def test_flipped_bytes_fail_the_checksum_and_fall_back(small, tmp_path):
  setup, host = small
  with Checkpointer(tmp_path, save_interval_steps=1, async_save=False) as ckpt:
    for step in (1, 2):
      ckpt.save(step, _variant(setup, host, step))
  _flip_bytes(tmp_path / "2")

  with Checkpointer(tmp_path) as ckpt:
    with pytest.warns(CheckpointWarning) as caught:
      restored = ckpt.restore(setup.abstract_state)
    assert restored.step == 1
    _assert_trees_equal(
        jax.device_get(restored.state), jax.device_get(_variant(setup, host, 1))
    )
    [warning] = caught
    message = str(warning.message)
    assert "\n" not in message and len(message) < 500
    assert message.startswith(f"checkpoint step(s) 2 in {tmp_path} is corrupt (array ")
    assert message.endswith("restored step 1 instead")
    assert re.search(_DAMAGE, message), message

    with pytest.raises(UnreadableCheckpointError, match=_DAMAGE):
      ckpt.restore(setup.abstract_state, step=2)  # no fallback when asked
    _flip_bytes(tmp_path / "1")
    with pytest.raises(UnreadableCheckpointError, match=r"step\(s\) 2, 1 are corrupt") as err:
      ckpt.restore(setup.abstract_state)
    assert "\n" not in str(err.value) and re.search(_DAMAGE, str(err.value))


def test_checksums_see_every_element_and_no_sharding(small):
  setup, _ = small
  rng = np.random.default_rng(0)
  arrays = {
      "f32": rng.standard_normal((6, 10)).astype(np.float32),
      "bf16": rng.standard_normal((6, 10)).astype(jnp.bfloat16),
      "f16": rng.standard_normal((4,)).astype(np.float16),
      "i8": rng.integers(-128, 128, (3, 5), dtype=np.int8),
      "u32": rng.integers(0, 2**32, (2, 2), dtype=np.uint32),
      "bool": rng.integers(0, 2, (7,)).astype(bool),
      "scalar": np.int32(7),
  }
  base = state_checksums(arrays)
  assert set(base) == set(arrays) and all(len(h) == 16 for h in base.values())
  assert len(set(base.values())) == len(base)
  for name, x in arrays.items():
    x = np.asarray(x)
    bits = x.view(np.dtype(f"u{x.dtype.itemsize}")) if x.dtype != bool else x
    for i in (0, x.size // 2, x.size - 1):
      for bit in {0, x.dtype.itemsize * 8 - 1} if x.dtype != bool else {0}:
        changed = bits.copy().reshape(-1)
        changed[i] ^= np.array(1 << bit, changed.dtype) if x.dtype != bool else True
        changed = changed.reshape(x.shape).view(x.dtype)
        assert state_checksums({**arrays, name: changed})[name] != base[name]
  f32 = arrays["f32"]
  # Two sign flips (a plain sum of odd multiples mod 2**32 misses these) and
  # a permutation of the rows.
  flipped = f32.copy()
  flipped.reshape(-1)[:2] *= -1
  assert state_checksums({"f32": flipped})["f32"] != base["f32"]
  assert state_checksums({"f32": f32[::-1].copy()})["f32"] != base["f32"]
  # The same on 8 devices as on one.
  tiled = np.tile(f32, (4, 4))
  spec = jax.sharding.PartitionSpec(("data", "fsdp"), "tensor")
  sharded = jax.device_put(tiled, jax.sharding.NamedSharding(setup.mesh, spec))
  assert len(sharded.sharding.device_set) == 8
  assert state_checksums({"x": sharded}) == state_checksums({"x": tiled})


def test_checkpoint_without_checksums_restores_with_a_warning(
    small, tmp_path, monkeypatch):
  setup, host = small
  # A checkpoint as saved before checksums existed: no "checksums" item (and
  # no version: format 1), read as the version that reads format 1 does.
  monkeypatch.setattr(checkpoint, "FORMAT", 1)
  with ocp.CheckpointManager(tmp_path, item_handlers={
      "state": ocp.StandardCheckpointHandler(),
      "data": checkpoint._PerProcessJsonHandler(),
      "config": ocp.JsonCheckpointHandler(),
  }) as manager:
    manager.save(3, args=ocp.args.Composite(
        state=ocp.args.StandardSave(_variant(setup, host, 3)),
        data=checkpoint._PerProcessJsonSave({"pos": 3}),
        config=ocp.args.JsonSave(None),
    ))
  with Checkpointer(tmp_path) as ckpt:
    with pytest.warns(CheckpointWarning, match="step 3 .* has no checksums .*unverified"):
      restored = ckpt.restore(setup.abstract_state)
  assert restored.step == 3 and restored.data_state == [{"pos": 3}]
  _assert_trees_equal(jax.device_get(restored.state), jax.device_get(_variant(setup, host, 3)))


def test_restore_into_another_dtype_is_verified_then_cast(small, tmp_path):
  setup, host = small
  with Checkpointer(tmp_path, async_save=False) as ckpt:
    ckpt.save(1, _variant(setup, host, 1), force=True)
  to_bf16 = lambda a: jax.ShapeDtypeStruct(a.shape, jnp.bfloat16, sharding=a.sharding)
  abstract = setup.abstract_state._replace(
      params=jax.tree.map(to_bf16, setup.abstract_state.params))
  with Checkpointer(tmp_path) as ckpt, warnings.catch_warnings():
    warnings.simplefilter("error", CheckpointWarning)  # verified: no warning
    restored = ckpt.restore(abstract)
  assert restored.step == 1
  want = jax.tree.map(lambda p: np.asarray(p).astype(jnp.bfloat16), _variant(setup, host, 1).params)
  _assert_trees_equal(jax.device_get(restored.state.params), want)


def test_unfinished_save_is_ignored(small, tmp_path):
  setup, host = small
  with Checkpointer(tmp_path, save_interval_steps=1, async_save=False) as ckpt:
    ckpt.save(1, _variant(setup, host, 1))
  # What a crash in the middle of saving step 2 leaves: Orbax's temporary
  # directory, partly written.
  partial = tmp_path / "2.orbax-checkpoint-tmp-1700000000"
  shutil.copytree(tmp_path / "1", partial)
  shutil.rmtree(partial / "state")
  with Checkpointer(tmp_path) as ckpt:
    assert ckpt.all_steps() == [1]
    assert ckpt.restore(setup.abstract_state).step == 1


# --------------------------------------------------------------------------
# Checkpoints of another model
# --------------------------------------------------------------------------


def test_config_of_another_model_is_refused(small, tmp_path):
  setup, host = small
  saved = _run_config(llama.get_config("tiny"), _opt("adamw"))
  wider = _run_config(llama.get_config("tiny", hidden_size=128), _opt("adamw"))
  with Checkpointer(tmp_path, async_save=False) as ckpt:
    ckpt.save(1, _variant(setup, host, 1), config=saved, force=True)
  before = [(p, p.stat().st_mtime_ns) for p in _files(tmp_path)]
  with Checkpointer(tmp_path) as ckpt:
    with pytest.raises(ValueError, match="hidden_size.*checkpoint_dir") as err:
      ckpt.restore(setup.abstract_state, expected_config=wider)
  message = str(err.value)
  assert "\n" not in message and "num_layers" not in message
  assert [(p, p.stat().st_mtime_ns) for p in _files(tmp_path)] == before


@pytest.mark.parametrize(
    "other, match",
    [
        ((llama.get_config("tiny", hidden_size=128), "adamw"), "other shapes"),
        ((llama.get_config("tiny"), "golore"), "not in the checkpoint"),
    ],
    ids=["wider_model", "other_optimizer"],
)
def test_tree_of_another_model_is_refused(small, tmp_path, other, match):
  setup, host = small
  with Checkpointer(tmp_path, async_save=False) as ckpt:
    ckpt.save(1, _variant(setup, host, 1), force=True)
  model, opt = other
  abstract = train.setup(model, _opt(opt), setup.mesh).abstract_state
  with Checkpointer(tmp_path) as ckpt:
    with pytest.raises(IncompatibleCheckpointError, match=match) as err:
      ckpt.restore(abstract)
  assert "\n" not in str(err.value) and "checkpoint_dir" in str(err.value)


# --------------------------------------------------------------------------
# Checkpoint format versions
# --------------------------------------------------------------------------


def _save_without_version(setup, host, directory, step):
  """A checkpoint as saved before the version item existed."""
  with ocp.CheckpointManager(directory, item_handlers={
      "state": ocp.StandardCheckpointHandler(),
      "data": checkpoint._PerProcessJsonHandler(),
      "config": ocp.JsonCheckpointHandler(),
  }) as manager:
    manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(_variant(setup, host, step)),
        data=checkpoint._PerProcessJsonSave(None),
        config=ocp.args.JsonSave(None),
    ))


@pytest.mark.parametrize("versioned", [True, False], ids=["format_1", "no_version"])
def test_checkpoint_of_an_older_format_is_refused(small, tmp_path, monkeypatch, versioned):
  setup, host = small
  # As the version that wrote format 1 (this tiny state is the same in 2).
  monkeypatch.setattr(checkpoint, "FORMAT", 1)
  if versioned:
    with Checkpointer(tmp_path, async_save=False) as ckpt:
      ckpt.save(1, _variant(setup, host, 1), force=True)
  else:
    _save_without_version(setup, host, tmp_path, 1)
  before = [(p, p.stat().st_mtime_ns) for p in _files(tmp_path)]
  with Checkpointer(tmp_path) as ckpt:
    # Format 1 reads it (the one without a version has no checksums either).
    with (warnings.catch_warnings() if versioned else
          pytest.warns(CheckpointWarning, match="no checksums")):
      if versioned:
        warnings.simplefilter("error", CheckpointWarning)
      assert ckpt.restore(setup.abstract_state).step == 1
    monkeypatch.setattr(checkpoint, "FORMAT", 2)
    with pytest.raises(IncompatibleCheckpointError) as err:
      ckpt.restore(setup.abstract_state)
  message = str(err.value)
  assert message == (
      f"checkpoint step 1 in {tmp_path} was written by an older subspace_jax "
      "(format 1, this one reads 2); resume it with that version or use "
      "another checkpoint_dir")
  assert [(p, p.stat().st_mtime_ns) for p in _files(tmp_path)] == before


def test_checkpoint_of_a_newer_format_is_refused(small, tmp_path, monkeypatch):
  setup, host = small
  current = checkpoint.FORMAT
  with Checkpointer(tmp_path, save_interval_steps=1, async_save=False) as ckpt:
    ckpt.save(1, _variant(setup, host, 1))
    monkeypatch.setattr(checkpoint, "FORMAT", current + 1)
    ckpt.save(2, _variant(setup, host, 2))
  monkeypatch.setattr(checkpoint, "FORMAT", current)
  with Checkpointer(tmp_path) as ckpt:
    # Refused, not skipped for the older step: it is not corrupt.
    with pytest.raises(IncompatibleCheckpointError, match=re.escape(
        f"step 2 in {tmp_path} was written by a newer subspace_jax (format "
        f"{current + 1}, this one reads {current})")) as err:
      ckpt.restore(setup.abstract_state)
    assert "\n" not in str(err.value)
    assert ckpt.restore(setup.abstract_state, step=1).step == 1
