"""Fuzzing every reader of files with hypothesis (issue 20).

Random bytes, truncations and mutations of valid files are thrown at the
readers of the safetensors files, the weight index, config.json, the
tokenizer files, the JSONL records, the items of a training checkpoint and
the token cache. Each property asserts only what the library promises of
damaged or hostile input:

* a clean error: a ``ValueError`` (of which ``DataError``,
  ``IncompatibleCheckpointError`` and ``JSONError`` are kinds) with a
  one-line message, or an ``UnreadableCheckpointError`` for a checkpoint,
  never another exception (RecursionError, OverflowError, TypeError,
  KeyError...) and never a crash;
* bounded time (hypothesis's ``deadline`` per example) and memory (the
  process's peak grows by less than ``_MEMORY_MB`` over a test);
* no file opened outside the directory the input came from.

The examples are derandomized (the same on every run) and few, so that
the module stays within the suite's time budget; raise ``max_examples``
locally to search longer.
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import resource
import shutil
import sys
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, example, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import clirun  # noqa: E402
from subspace_jax.models import llama
from subspace_jax.models.io import hf  # noqa: E402
from subspace_jax.models.io import safetensors as stf  # noqa: E402
from subspace_jax.train import checkpoint
from subspace_jax.data import encoding
from subspace_jax.data import sources  # noqa: E402
from subspace_jax.data import tokenizers as tok_lib  # noqa: E402
from subspace_jax.train.checkpoint import Checkpointer  # noqa: E402

# Every example of a reader of one small file takes milliseconds; a second
# is "unbounded".
_FAST = settings(max_examples=40, deadline=2000, derandomize=True,
                 database=None,
                 suppress_health_check=[HealthCheck.function_scoped_fixture,
                                        HealthCheck.too_slow])
_SLOW = settings(_FAST, max_examples=12, deadline=10_000)
_MEMORY_MB = 300


@contextlib.contextmanager
def _bounded_memory():
  """Fails if the process's peak memory grows by ``_MEMORY_MB`` or more."""
  before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  yield
  grown = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
  assert grown < _MEMORY_MB, f"peak memory grew by {grown:.0f} MB"


def _one_line(error: BaseException) -> str:
  message = str(error)
  assert message and "\n" not in message, repr(message)
  return message


# JSON values: what a mutated file may hold where a value was.
_SCALARS = (st.none() | st.booleans() | st.integers(-2**70, 2**70)
            | st.floats(allow_nan=False, allow_infinity=False)
            | st.text(max_size=20))
_JSON = st.recursive(_SCALARS, lambda inner: st.lists(inner, max_size=4)
                     | st.dictionaries(st.text(max_size=8), inner, max_size=4),
                     max_leaves=12)
# Text that is not quite JSON: deep nesting, non-finite numbers, junk.
_NEAR_JSON = st.sampled_from([
    "[" * 5000, '{"a": ' * 3000, "1e400", "-Infinity", "NaN", "[1, 2",
    '{"a": 1}x', "\ufeff{}", '"\\ud800"', "9" * 5000, "",
])


def _mutations(data: bytes):
  """Byte strings derived from ``data``: truncated, with bytes changed,
  with bytes inserted, or random."""
  n = len(data)
  truncated = st.integers(0, max(n - 1, 0)).map(lambda k: data[:k])
  changed = st.lists(st.tuples(st.integers(0, max(n - 1, 0)),
                               st.integers(0, 255)), min_size=1, max_size=8
                     ).map(lambda edits: _edit(data, edits))
  inserted = st.tuples(st.integers(0, n), st.binary(min_size=1, max_size=64)
                       ).map(lambda t: data[:t[0]] + t[1] + data[t[0]:])
  return truncated | changed | inserted | st.binary(max_size=2048)


def _edit(data: bytes, edits) -> bytes:
  out = bytearray(data)
  for at, value in edits:
    if out:
      out[at % len(out)] = value
  return bytes(out)


# ----------------------------------------------------------------------------
# Safetensors files
# ----------------------------------------------------------------------------


def _valid_safetensors(path: pathlib.Path) -> bytes:
  tensors = [("a", np.dtype(np.float32), (3, 4),
              lambda: np.arange(12, dtype=np.float32).reshape(3, 4)),
             ("b", np.dtype(jnp.bfloat16), (5,),
              lambda: np.ones(5, jnp.bfloat16))]
  stf.write(path, tensors, {"format": "pt"})
  return path.read_bytes()


def _header(entries) -> bytes:
  raw = json.dumps(entries).encode()
  return len(raw).to_bytes(8, "little") + raw


def _read_all(path) -> None:
  """Opens a safetensors file and reads every tensor and a slice of it;
  a refusal must be a one-line ValueError."""
  try:
    file = stf.SafetensorsFile(path)
    for name, info in file.tensors.items():
      whole = file.read(name)
      assert whole.shape == info.shape and whole.dtype == info.dtype
      if info.shape:
        part = file.read(name, (slice(0, 1),))
        assert part.shape == (min(1, info.shape[0]),) + info.shape[1:]
  except ValueError as e:
    _one_line(e)


@_FAST
@given(data=st.data())
def test_safetensors_files(tmp_path, data):
  """Mutations of a valid file; crafted headers (shapes, offsets, dtypes
  of any JSON, overlapping tensors) over a few bytes of data."""
  valid = _valid_safetensors(tmp_path / "valid.safetensors")
  crafted = st.builds(
      lambda entries, tail: _header(entries) + tail,
      st.dictionaries(st.sampled_from(["a", "b", "__metadata__"]), st.one_of(
          _JSON, st.fixed_dictionaries({
              "dtype": st.sampled_from(["F32", "BF16", "I8", "F64"]) | _JSON,
              "shape": st.lists(st.integers(-1, 2**40), max_size=3) | _JSON,
              "data_offsets": st.lists(st.integers(-1, 2**66), max_size=3)
                              | _JSON})), max_size=3),
      st.binary(max_size=64))
  content = data.draw(_mutations(valid) | crafted)
  path = tmp_path / "fuzz.safetensors"
  path.write_bytes(content)
  with _bounded_memory():
    _read_all(path)


# ----------------------------------------------------------------------------
# A Hugging Face checkpoint directory: index, config.json
# ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> pathlib.Path:
  """A tiny sharded checkpoint (index and 3 files) and a valid file
  outside it."""
  root = tmp_path_factory.mktemp("hf")
  cfg = llama.get_config("tiny")  # The byte tokenizer's 259 ids.
  params = llama.ModelDef(cfg).init(0)
  hf.save(root / "model", cfg, params, max_shard_bytes=60_000)
  hf.save(root / "outside", cfg, params)
  return root / "model"


@contextlib.contextmanager
def _no_open_outside(directory: pathlib.Path, monkeypatch):
  """Fails on any file opened outside ``directory`` (and beside it, where a
  valid checkpoint waits) by Python's ``open`` or the safetensors package.
  /etc/passwd and /proc/self/environ count as outside too."""
  inside = os.path.realpath(directory) + os.sep
  beside = os.path.realpath(directory.parent) + os.sep
  opened = []

  def check(path):
    real = os.path.realpath(os.fsdecode(path))
    if ((real.startswith(beside) and not real.startswith(inside))
        or real in ("/etc/passwd", "/proc/self/environ")):
      opened.append(real)

  def hook(event, args):
    if event == "open" and isinstance(args[0], (str, bytes, os.PathLike)):
      check(args[0])

  safe_open = stf.safetensors.safe_open

  def checked_safe_open(path, *args, **kwargs):
    check(path)
    return safe_open(path, *args, **kwargs)

  monkeypatch.setattr(stf.safetensors, "safe_open", checked_safe_open)
  if not _AUDIT:
    sys.addaudithook(lambda event, args: [h(event, args) for h in _AUDIT[1:]])
    _AUDIT.append(None)  # Installed (once: audit hooks cannot be removed).
  _AUDIT.append(hook)
  try:
    yield
  finally:
    _AUDIT.remove(hook)
    monkeypatch.undo()
  assert not opened, f"opened outside {directory}: {opened}"


_AUDIT: list = []

_NAMES = st.sampled_from([
    "../outside/model.safetensors", "/etc/passwd", "/proc/self/environ",
    "..", ".", "", "a/../../outside/model.safetensors", "./model-00001-of-00003.safetensors",
    "model-00001-of-00003.safetensors", "sub/x.safetensors", "\x00",
    "model-00002-of-00003.safetensors/..",
]) | st.text(max_size=30)


def _check_dir(directory: pathlib.Path) -> None:
  """What hf.load does before it builds the model: config.json, the index
  and every tensor's header; a refusal must be a one-line ValueError."""
  try:
    config = hf.read_config(directory)
    ckpt = hf._Checkpoint(directory)  # pylint: disable=protected-access
    hf._check_tensors(ckpt, config)  # pylint: disable=protected-access
    for name in ckpt.where:
      ckpt.read(name, False, (slice(0, 1),), np.float32)
  except ValueError as e:
    _one_line(e)


@_FAST
@given(data=st.data())
def test_weight_index(hf_dir, tmp_path, monkeypatch, data):
  """An index whose weight_map names anything (paths out of the
  directory, absolute paths, junk), or whose bytes are mutated: nothing
  outside the directory is opened."""
  directory = tmp_path / "model"
  if not directory.exists():
    shutil.copytree(hf_dir, directory)
    shutil.copytree(hf_dir.parent / "outside", tmp_path / "outside")
  index = json.loads((hf_dir / hf.INDEX_FILE).read_text())
  choice = data.draw(st.integers(0, 2))
  if choice == 0:
    names = list(index["weight_map"])
    changed = data.draw(st.dictionaries(st.sampled_from(names), _NAMES,
                                        min_size=1, max_size=4))
    index["weight_map"].update(changed)
    content = json.dumps(index).encode()
  elif choice == 1:
    content = json.dumps(data.draw(_JSON)).encode()
  else:
    content = data.draw(_mutations((hf_dir / hf.INDEX_FILE).read_bytes())
                        | _NEAR_JSON.map(str.encode))
  (directory / hf.INDEX_FILE).write_bytes(content)
  with _bounded_memory(), _no_open_outside(directory, monkeypatch):
    _check_dir(directory)


@_FAST
@given(data=st.data())
def test_config_json(hf_dir, tmp_path, data):
  """config.json with keys set to any JSON value, or mutated bytes; the
  size is checked before a model is built (no hang, no memory blow-up)."""
  directory = tmp_path / "model"
  if not directory.exists():
    shutil.copytree(hf_dir, directory)
  config = json.loads((hf_dir / hf.CONFIG_FILE).read_text())
  if data.draw(st.booleans()):
    keys = list(config) + ["rope_parameters", "head_dim"]
    config.update(data.draw(st.dictionaries(
        st.sampled_from(keys), _JSON | st.integers(-2, 10**12),
        min_size=1, max_size=4)))
    content = json.dumps(config).encode()
  else:
    content = data.draw(_mutations((hf_dir / hf.CONFIG_FILE).read_bytes())
                        | _NEAR_JSON.map(str.encode))
  (directory / hf.CONFIG_FILE).write_bytes(content)
  with _bounded_memory():
    _check_dir(directory)


# ----------------------------------------------------------------------------
# Tokenizer files
# ----------------------------------------------------------------------------


def _load_tokenizer(directory) -> None:
  try:
    tok = tok_lib.load_tokenizer(directory)
    ids = tok.encode("Hello, world.")
    assert all(0 <= i < tok.vocab_size for i in ids)
    for i in (tok.eos_id, tok.bos_id, getattr(tok, "pad_id", None)):
      assert i is None or 0 <= i < tok.vocab_size
  except ValueError as e:
    _one_line(e)


@pytest.fixture(scope="module")
def tokenizer_json(tmp_path_factory) -> bytes:
  tokenizers = pytest.importorskip("tokenizers")
  vocab = {w: i for i, w in enumerate(
      ["<unk>", "<s>", "</s>", "Hello", ",", "world", "."])}
  tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
  tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
  return tok.to_str().encode()


@_FAST
@given(data=st.data())
def test_tokenizer_config_and_tokenizer_json(tokenizer_json, tmp_path, data):
  (tmp_path / "tokenizer.json").write_bytes(
      data.draw(st.just(tokenizer_json) | _mutations(tokenizer_json)))
  config = data.draw(
      st.dictionaries(st.sampled_from(["bos_token", "eos_token", "pad_token",
                                       "other"]), _JSON, max_size=3)
      .map(lambda d: json.dumps(d).encode())
      | _NEAR_JSON.map(str.encode)
      | _mutations(b'{"eos_token": "</s>", "bos_token": {"content": "<s>"}}'))
  (tmp_path / "tokenizer_config.json").write_bytes(config)
  with _bounded_memory():
    _load_tokenizer(tmp_path)


@_SLOW
@given(data=st.data())
def test_sentencepiece_model(llama_sp_model, tmp_path, data):
  model = llama_sp_model.read_bytes()
  (tmp_path / "tokenizer.model").write_bytes(data.draw(_mutations(model)))
  with _bounded_memory():
    _load_tokenizer(tmp_path)


# ----------------------------------------------------------------------------
# JSONL records
# ----------------------------------------------------------------------------


_GOOD_LINES = (b'{"prompt": "Q", "response": "A"}\n{"text": "plain"}\n'
               b'{"prompt": "x", "response": "y", "id": 3}\n')


@_FAST
@example(content=b'{"text": "a", "meta": ' + b"[" * 50_000 + b"]" * 50_000 + b"}")
@example(content=b'{"text": "a", "score": 1e400}\n{"prompt": 1, "response": []}')
@given(content=_mutations(_GOOD_LINES)
       | st.lists(_JSON.map(lambda v: json.dumps(v).encode())
                  | _NEAR_JSON.map(str.encode), max_size=5)
       .map(lambda lines: b"\n".join(lines)))
def test_jsonl_records(tmp_path, content):
  path = tmp_path / "train.jsonl"
  path.write_bytes(content)
  with _bounded_memory():
    try:
      records = sources.read_jsonl(path)
      assert all(isinstance(r, sources.Record) for r in records)
    except sources.DataError as e:
      assert _one_line(e).startswith(str(path)), str(e)


# ----------------------------------------------------------------------------
# The items of a training checkpoint
# ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def saved_checkpoint(tmp_path_factory):
  """Steps 1 and 2 of a small state, with a data position and a config."""
  root = tmp_path_factory.mktemp("ckpt")
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("x",))
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  state = {"w": jax.device_put(jnp.arange(12.0).reshape(3, 4), sharding),
           "step": jax.device_put(jnp.int32(2), sharding)}
  with Checkpointer(root, save_interval_steps=1, async_save=False) as ckpt:
    for step in (1, 2):
      ckpt.save(step, state, data_state={"batch": step, "signature": "s"},
                config={"model": {"width": 4}, "seed": 0})
  abstract = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), state)
  return root, abstract


_ITEMS = ["data/process_0-of-1.json", "config/metadata",
          "checksums/metadata", "version/metadata"]


@_SLOW
@given(data=st.data())
def test_checkpoint_items(saved_checkpoint, tmp_path, data):
  """Step 2's JSON items (data position, config, checksums, version)
  mutated: the restore falls back to step 1 with a warning, or refuses in
  one line; it never returns what step 2 does not hold."""
  source, abstract = saved_checkpoint
  root = tmp_path / "ckpt"
  if root.exists():
    shutil.rmtree(root)
  shutil.copytree(source, root)
  item = root / "2" / data.draw(st.sampled_from(_ITEMS))
  original = item.read_bytes()
  content = data.draw(_mutations(original) | _JSON.map(
      lambda v: json.dumps(v).encode()) | _NEAR_JSON.map(str.encode))
  item.write_bytes(content)
  with _bounded_memory(), Checkpointer(root) as ckpt:
    with warnings.catch_warnings(record=True) as caught:
      warnings.simplefilter("always")
      try:
        restored = ckpt.restore(abstract, expected_config={
            "model": {"width": 4}})
      except (ValueError, checkpoint.UnreadableCheckpointError) as e:
        _one_line(e)
        return
  if restored.step == 2:  # The mutation left the item's meaning as it was.
    assert restored.data_state == [{"batch": 2, "signature": "s"}]
    assert restored.config == {"model": {"width": 4}, "seed": 0}
  else:
    assert restored.step == 1 and restored.data_state == [
        {"batch": 1, "signature": "s"}]
    assert any("restored step 1 instead" in str(w.message) for w in caught)
  np.testing.assert_array_equal(restored.state["w"], np.arange(12.0).reshape(3, 4))


# ----------------------------------------------------------------------------
# The token cache
# ----------------------------------------------------------------------------


@_SLOW
@given(data=st.data())
def test_token_cache(tmp_path, data):
  """A mutated cache file or manifest: the tokens come back as a fresh
  tokenization gives them."""
  docs = ["A first document.", "And a second one, a little longer."]
  tok = tok_lib.ByteTokenizer()
  cache_dir = tmp_path / "cache"
  if cache_dir.exists():
    shutil.rmtree(cache_dir)
  want = encoding._cached_stream(docs, tok, "docs", cache_dir)["tokens"]  # pylint: disable=protected-access
  want = np.array(want)
  [path] = (cache_dir / "tokens").glob("*.npy")
  target = data.draw(st.sampled_from([path, path.with_name(path.name + ".sha256.json")]))
  target.write_bytes(data.draw(_mutations(target.read_bytes())))
  with _bounded_memory():
    got = encoding._cached_stream(docs, tok, "docs", cache_dir)["tokens"]  # pylint: disable=protected-access
  np.testing.assert_array_equal(got, want)


# ----------------------------------------------------------------------------
# The command line
# ----------------------------------------------------------------------------


@settings(_SLOW, max_examples=3, deadline=None)
@given(data=st.data())
def test_cli_init_from_a_damaged_checkpoint(hf_dir, tmp_path, data):
  """--init-from a directory whose config.json or index is damaged: exit
  code 2 and one line on stderr."""
  directory = tmp_path / "model"
  if directory.exists():
    shutil.rmtree(directory)
  shutil.copytree(hf_dir, directory)
  name = data.draw(st.sampled_from([hf.CONFIG_FILE, hf.INDEX_FILE]))
  item = directory / name
  item.write_bytes(data.draw(_mutations(item.read_bytes())
                             | _NEAR_JSON.map(str.encode)))
  out = clirun.run(["--init-from", directory, "--steps", "1", "--eval-every",
                    "0", "--checkpoint-dir", "none", "--metrics", "none",
                    "--no-progress", "--tensorboard", "none", "--batch-size",
                    "2", "--seq-len", "16"], tmp_path, timeout=120)
  if out.returncode == 0:
    return  # The mutation left a loadable checkpoint.
  assert out.returncode == 2, out.stderr[-3000:]
  # A short run's warm-up note may come first (settings are resolved
  # before the model is read); then the error, one line.
  lines = [l for l in out.stderr.strip().splitlines()
           if not l.startswith("--warmup: ")]
  assert len(lines) == 1 and lines[0].startswith(
      "pretrain_llama.py: error: "), out.stderr[-3000:]
