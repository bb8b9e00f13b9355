"""Fine-tuning: JSONL records, the example encoder, packing with segment ids
and a loss mask, and examples/finetune_llama.py end to end."""

import dataclasses
import json
import pathlib
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import clirun
from reference_llama import numpy_forward
from subspace_jax.models import llama
from subspace_jax.models.io import hf
from subspace_jax.train import checkpoint
from subspace_jax.data import pipeline as data
from subspace_jax.data import encoding
from subspace_jax.data import packing
from subspace_jax.plan import compile_for as plan
from subspace_jax.data import sources
from subspace_jax.train import step as train
from subspace_jax import sharding as shd
from subspace_jax.data import tokenizers as tok_lib
from subspace_jax.cli import finetune
from subspace_jax.train import optimizer as opt_lib

ROOT = pathlib.Path(__file__).resolve().parents[1]
FINETUNE = ROOT / "examples" / "finetune_llama.py"

BYTE = tok_lib.ByteTokenizer()


def _jsonl(path, records):
  path.write_text("".join(json.dumps(r) + "\n" for r in records))
  return path


def _encoded(record, tok=BYTE):
  """An example's tokens and loss mask, computed here from the tokenizer
  alone (not by the pipeline's encoder)."""
  if "text" in record:
    read, learned = [tok.bos_id], tok.encode(record["text"]) + [tok.eos_id]
  else:
    read = [tok.bos_id] + tok.encode(record["prompt"])
    learned = tok.encode(record["response"]) + [tok.eos_id]
  return read + learned, [0] * len(read) + [1] * len(learned)


# ----------------------------------------------------------------------------
# Records and their encoding
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("content,line,words", [
    (b'{"prompt": "a", "response": "b"}\n{"prompt": "a", "response": \n', 2,
     "not valid JSON (Expecting value at column 29)"),
    (b'\n["a", "b"]\n', 2, "an array, not a JSON object"),
    (b'{"prompt": "a"}\n', 1, "'prompt' without 'response'"),
    (b'{"instruction": "a", "output": "b"}\n', 1,
     "no 'prompt' and 'response', 'messages' nor 'text' field (keys: "
     "'instruction', 'output')"),
    (b'{"text": 3}\n', 1, "'text' is a number, not a string"),
    (b'{"text": "a", "response": "b"}\n', 1, "both 'text' and 'response'"),
    (b'{"text": "caf\xe9"}\n', 1, "not UTF-8 text (bad byte at column 14)"),
    # RecursionError, and numbers that overflow a float, before (issue 20).
    (b'{"text": "a", "meta": ' + b"[" * 100_000 + b"]" * 100_000 + b"}\n", 1,
     "not usable JSON: arrays/objects nested 100001 deep (at most 64)"),
    (b'{"text": "a", "score": 1e400}\n', 1,
     "the number 1e400 does not fit a float"),
    (b'{"text": "a", "score": NaN}\n', 1, "NaN is not a finite number"),
], ids=["json", "array", "half-pair", "no-field", "number", "both", "utf8",
        "deep", "overflow", "nan"])
def test_a_bad_line_is_refused_naming_the_file_and_line(tmp_path, content,
                                                       line, words):
  path = tmp_path / "train.jsonl"
  path.write_bytes(content)
  with pytest.raises(data.DataError) as info:
    sources.read_jsonl(path)
  message = str(info.value)
  assert message.startswith(f"{path}:{line}: "), message
  assert words in message and "\n" not in message


@pytest.mark.parametrize("content", [b"", b"\n  \n"], ids=["empty", "blank"])
def test_an_empty_file_or_a_missing_one_is_refused(tmp_path, content):
  path = tmp_path / "train.jsonl"
  path.write_bytes(content)
  with pytest.raises(data.DataError, match=f"^{path} holds no record"):
    sources.read_jsonl(path)
  with pytest.raises(data.DataError, match=f"^cannot read {tmp_path}/absent"):
    sources.read_jsonl(tmp_path / "absent.jsonl")


def test_records_and_splits(tmp_path):
  records = [{"prompt": f"q{i}", "response": f"a{i}", "id": i} for i in range(39)]
  path = _jsonl(tmp_path / "train.jsonl", records + [{"text": "plain"}])
  got = sources.source_from_spec(f"jsonl:{path}").open()
  assert got[0] == sources.Record(f"{path}:1", "q0", "a0")
  assert got[-1] == sources.Record(f"{path}:40", text="plain")
  train_split = sources.JsonlRecords(str(path), split="train").open()
  held_out = sources.JsonlRecords(str(path), split="validation").open()
  assert train_split + held_out == got and len(held_out) == 2
  built_in = sources.Instructions(split="all").open()
  assert len(built_in) > 5000 and len({r.prompt for r in built_in}) > 5000
  assert max(len(r.joined.encode()) for r in built_in) <= 127  # fits seq 128


def test_encoder_adds_bos_and_eos_and_masks_the_prompt():
  encode = encoding.ExampleEncoder(BYTE)
  pair = {"prompt": "Name a colour.\n", "response": "Blue"}
  out = encode(sources.Record("x:1", **pair))
  tokens, mask = _encoded(pair)
  assert out["tokens"].tolist() == tokens and out["loss_mask"].tolist() == mask
  assert tokens[0] == BYTE.bos_id and tokens[-1] == BYTE.eos_id
  assert sum(mask) == len("Blue") + 1  # The response and EOS.
  out = encode(sources.Record("x:2", text="Sky."))
  assert out["tokens"].tolist() == [BYTE.bos_id, *b"Sky.", BYTE.eos_id]
  assert out["loss_mask"].tolist() == [0, 1, 1, 1, 1, 1]
  with pytest.raises(data.DataError, match=r"^f\.jsonl:7: the example is 12 "
                     r"tokens long .* more than the 10 of a row \(seq_len \+ 1\); "
                     "raise seq_len to 11 or more"):
    encoding.ExampleEncoder(BYTE, max_tokens=10)(
        sources.Record("f.jsonl:7", "abcdef", "ghij"))


def test_encoder_uses_the_llama_tokenizers_own_ids(llama_sp_model):
  sp = tok_lib.load_tokenizer(llama_sp_model)
  pair = {"prompt": "What is the capital of France?\n", "response": "Paris."}
  out = encoding.ExampleEncoder(sp)(sources.Record("x:1", **pair))
  tokens, mask = _encoded(pair, sp)
  assert (tokens[0], tokens[-1]) == (1, 2)  # LLaMA's <s> and </s>.
  assert out["tokens"].tolist() == tokens and out["loss_mask"].tolist() == mask


# ----------------------------------------------------------------------------
# Packing
# ----------------------------------------------------------------------------


def test_pack_examples_is_best_fit_decreasing():
  # Worked by hand: 6 opens row A (2 left), 4 row B, 4 fills B, 3 opens C,
  # 3 goes to C (2 left); the 2s go to the fullest rows with room, A then
  # C. Next-fit in order would need 4 rows.
  assert packing.pack_examples([6, 4, 4, 3, 3, 2, 2], 8) == [[0, 5], [1, 2], [3, 4, 6]]
  lengths = np.random.default_rng(0).integers(1, 60, 500)
  rows = packing.pack_examples(lengths, 64)
  assert sorted(i for row in rows for i in row) == list(range(500))
  assert all(sum(lengths[row]) <= 64 for row in rows)
  assert len(rows) <= 1.05 * np.ceil(sum(lengths) / 64) + 1
  with pytest.raises(ValueError, match="item 1 has length 9"):
    packing.pack_examples([3, 9], 8)


def _rows(batch):
  """Every packed piece of a batch, by row: (tokens, loss mask), and checks
  that each piece is one run of one segment id, with the padding after
  them (segment 0, no loss)."""
  out = []
  for b in range(len(batch["inputs"])):
    seg = batch["segment_ids"][b]
    used = int(np.count_nonzero(seg))
    assert (seg[used:] == 0).all() and (batch["loss_mask"][b, used:] == 0).all()
    ids = seg[:used]
    assert (ids == np.repeat(np.arange(1, ids.max() + 1),
                             np.bincount(ids)[1:])).all()  # Runs 1, 2, ...
    pieces = []
    for s in range(1, ids.max() + 1):
      cols = np.flatnonzero(seg == s)
      tokens = [*batch["inputs"][b, cols], batch["targets"][b, cols[-1]]]
      assert (batch["inputs"][b, cols[1:]] == batch["targets"][b, cols[:-1]]).all()
      pieces.append((tokens, [0, *batch["loss_mask"][b, cols]]))
    out.append(pieces)
  return out


def test_packing_keeps_examples_whole_and_cuts_only_longer_texts(tmp_path):
  """One epoch of rows holds every example once, whole (its tokens and its
  loss mask, in one row, one segment); a text longer than a row comes in
  pieces of seq_len + 1 tokens that share one token with the next."""
  rng = np.random.default_rng(1)
  word = lambda n: "".join(rng.choice(list("abcdefgh "), n))
  records = [{"prompt": word(rng.integers(0, 20)),
              "response": word(rng.integers(0, 12))} for _ in range(40)]
  records += [{"text": word(rng.integers(0, 30))} for _ in range(5)]
  long_text = {"text": word(3 * 32 + 5)}
  path = _jsonl(tmp_path / "train.jsonl", records + [long_text])
  source = sources.JsonlRecords(str(path))
  probe = data.make_iterator(source, BYTE, seq_len=32, batch_size=1,
                             shuffle=False, process_index=0, process_count=1)
  num_rows = probe.packing.rows
  probe.close()
  with data.make_iterator(source, BYTE, seq_len=32, batch_size=num_rows,
                          shuffle=False, process_index=0,
                          process_count=1) as it:
    pieces = [p for row in _rows(next(it)) for p in row]
  expected = [_encoded(r) for r in records]
  tokens, mask = _encoded(long_text)
  cuts = [(tokens[k:k + 33], mask[k:k + 33]) for k in range(0, len(tokens) - 1, 32)]
  assert [len(t) for t, _ in cuts] == [33, 33, 33, 7]
  as_key = lambda piece: (tuple(map(int, piece[0])), tuple(map(int, piece[1][1:])))
  assert sorted(map(as_key, pieces)) == sorted(map(as_key, expected + cuts))


# ----------------------------------------------------------------------------
# The loss of a packed batch
# ----------------------------------------------------------------------------


def _packed_loss_examples():
  """15 examples that pack into exactly 8 rows of 32 positions: a long one
  of 32 - k positions and a short one of k for k = 5..12 (one short one
  left out, so that one row ends in padding); one long one is a text."""
  rng = np.random.default_rng(2)
  chars = lambda n: "".join(rng.choice(list("abcdefghij"), n))
  records = []
  for k in range(5, 13):
    for positions in (32 - k, k):
      if positions == 9:
        continue  # Row of k = 9: padding after its long example.
      if positions == 27:
        records.append({"text": chars(positions - 1)})  # BOS + text + EOS.
      else:
        split = int(rng.integers(1, positions - 1))  # BOS + text + EOS.
        records.append({"prompt": chars(split),
                        "response": chars(positions - 1 - split)})
  return records


def test_masked_loss_of_a_packed_batch_is_the_mean_over_response_tokens(tmp_path):
  """The train state's evaluation step on a packed batch (8 rows over the 8
  devices, float64) against the float64 NumPy reference LLaMA run on each
  example alone: the mean cross-entropy over all the response tokens (every
  token of a text). Same arithmetic up to summation order: 1e-10."""
  records = _packed_loss_examples()
  path = _jsonl(tmp_path / "train.jsonl", records)
  with data.make_iterator(sources.JsonlRecords(str(path)), BYTE, seq_len=32,
                          batch_size=8, shuffle=False, process_index=0,
                          process_count=1) as it:
    assert it.packing.rows == 8 and it.steps_per_epoch == 1
    batch = next(it)
  assert (batch["segment_ids"] == 0).sum() == 9  # The one row's padding.
  with jax.enable_x64(True):
    cfg = llama.get_config("tiny", vocab_size=BYTE.vocab_size, num_kv_heads=2,
                           dtype=jnp.float64, param_dtype=jnp.float64)
    params = jax.tree.map(  # Larger weights than init's: sharper logits.
        lambda x: np.asarray(x) * 3.0, llama.ModelDef(cfg).init(0))
    setup = train.setup(cfg, train.OptimizerConfig(name="adamw"),
                        shd.make_mesh(-1, 1, 1))
    state = setup.init_from(jax.tree.map(jnp.asarray, params))

    def loss(b):
      return float(setup.eval_step(state, {
          k: jax.make_array_from_process_local_data(setup.batch_sharding, v)
          for k, v in b.items()}))

    got = loss(batch)
    nll_sum = count = 0
    for record in records:
      tokens, mask = map(np.asarray, _encoded(record))
      logits = numpy_forward(params, tokens[None, :-1], cfg)[0]
      log_z = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1))
      nll = log_z + logits.max(-1) - logits[np.arange(len(tokens) - 1), tokens[1:]]
      nll_sum += (nll * mask[1:]).sum()
      count += mask[1:].sum()
    np.testing.assert_allclose(got, nll_sum / count, rtol=1e-10)
    # Each key matters: without the segment ids the examples of a row see
    # each other; without the mask the prompts count too.
    for key in ("segment_ids", "loss_mask"):
      other = {k: v for k, v in batch.items() if k != key}
      assert abs(loss(other) - got) > 1e-3, key


# ----------------------------------------------------------------------------
# The command line
# ----------------------------------------------------------------------------

_SMALL = ["--seq-len", "64", "--batch-size", "8", "--rank", "8",
          "--update-gap", "2", "--warmup", "2", "--log-every", "2",
          "--eval-every", "0", "--checkpoint-every", "2", "--no-progress",
          "--tensorboard", "none"]


def _args(run_dir, *extra):
  return [*_SMALL, "--checkpoint-dir", str(run_dir / "ckpt"),
          "--metrics", str(run_dir / "metrics.jsonl"), *extra]


def _final_state(run_dir, argv):
  cfg = clirun.run_config(argv, "finetune")
  setup = train.setup(cfg.model_config, cfg.optimizer, shd.make_mesh(*cfg.mesh))
  with checkpoint.Checkpointer(run_dir / "ckpt") as ckpt:
    return ckpt.restore(setup.abstract_state)


@pytest.fixture
def demo_cache(tmp_path, monkeypatch):
  monkeypatch.setenv("SUBSPACE_JAX_CACHE_DIR", str(tmp_path / "cache"))
  return tmp_path / "cache"


def test_defaults_demo_model_and_learning_rate(demo_cache, tmp_path):
  parse = lambda *a: clirun.run_config(list(a), "finetune")
  demo = parse()
  assert demo.init_from == str(demo_cache / "finetune" / finetune.DEMO_NAME)
  # The random demo model trains at pretraining's default learning rate.
  assert (demo.data, demo.tokenizer, demo.optimizer.learning_rate) == (
      "instructions", "byte", opt_lib.DEFAULTS["golore"]["learning_rate"])
  assert demo.model_config == dataclasses.replace(
      finetune.DEMO_CONFIG, max_seq_len=demo.seq_len, scan_layers=True)
  # From a checkpoint: AdamW's 2e-5, and the same step for the subspace
  # methods, whose updates --scale multiplies: 2e-5 / scale.
  pretrained = parse("--init-from", demo.init_from, "--optimizer", "adamw")
  assert pretrained.optimizer.learning_rate == opt_lib.FINETUNE_LEARNING_RATE
  assert pretrained.scan_layers  # Checkpoints load scanned by default.
  golore_scale = opt_lib.DEFAULTS["golore"]["scale"]
  for flags, lr in ((["--optimizer", "golore"], 2e-5 / golore_scale),
                    (["--optimizer", "rso", "--scale", "0.5"], 4e-5),
                    (["--optimizer", "rso", "--lr", "1e-3"], 1e-3)):
    got = parse("--init-from", demo.init_from, *flags).optimizer.learning_rate
    assert got == pytest.approx(lr), flags
  assert not parse("--init-from", demo.init_from,
                   "--no-scan-layers").scan_layers
  assert (demo.answers, parse("--steps", "0").steps,
          parse("--eval-only").steps) == (32, 0, 0)
  assert parse("--model", "tiny").init_from is None
  with pytest.raises(ValueError, match="--tokenizer-model needs --init-from"):
    parse("--tokenizer-model", str(tmp_path))
  # --compile-for plans the step with the batch the run will have.
  keys = plan._abstract_batch(demo, None)  # pylint: disable=protected-access
  assert sorted(keys) == ["inputs", "loss_mask", "segment_ids", "targets"]
  assert sorted(plan._abstract_batch(  # pylint: disable=protected-access
      dataclasses.replace(demo, data="embedded"), None)) == ["inputs", "targets"]


def test_resume_is_bit_exact(tmp_path, demo_cache):
  """Model-mode RSO (a new subproblem every 2 steps) from the demo model on
  a JSONL of pairs and texts: 4 steps, then the same 4 again from the
  checkpoint of step 2 (as if the run had been killed after it) give the
  same metrics and the same bits, data position included."""
  del demo_cache
  rng = np.random.default_rng(3)
  chars = lambda: "".join(rng.choice(list("abcdefgh "), rng.integers(1, 31)))
  path = _jsonl(tmp_path / "train.jsonl",
                [{"prompt": chars(), "response": chars()} for _ in range(60)]
                + [{"text": chars()} for _ in range(20)])
  argv = _args(tmp_path, "--steps", "4", "--optimizer", "rso",
               "--subspace-mode", "model", "--data", f"jsonl:{path}")
  assert finetune.main(argv)["start_step"] == 0
  want = _final_state(tmp_path, argv)
  shutil.rmtree(tmp_path / "ckpt" / "4")
  assert finetune.main(argv)["start_step"] == 2
  got = _final_state(tmp_path, argv)
  assert want.step == got.step == 4 and want.data_state == got.data_state
  for x, y in zip(jax.tree.leaves(want.state), jax.tree.leaves(got.state)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  records = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in records] == [2, 4, 4]
  assert records[1] == dict(records[2], tokens_per_s=records[1]["tokens_per_s"])


def test_the_default_command_runs_offline_and_exports(tmp_path):
  """The command with its defaults (fewer steps): the demo model is written
  into the cache, the instructions are packed, and the trained model is
  exported as a Hugging Face checkpoint that loads back, changed."""
  cache_dir = tmp_path / "cache"
  result = clirun.run(["--steps", "4", "--eval-every", "4", "--no-progress",
                       "--answers", "3", "--export-hf", tmp_path / "out"],
                      tmp_path,
                      script=FINETUNE,
                      extra_env={"SUBSPACE_JAX_CACHE_DIR": str(cache_dir)})
  assert result.returncode == 0, result.stderr
  assert result.stdout.startswith("done: 4 steps"), result.stdout
  assert "wrote the demo model (random weights)" in result.stderr
  assert "examples into" in result.stderr
  # A 4-step run warms up for a tenth of it, and says so.
  assert "--warmup: 0 steps, a tenth of the 4-step schedule" in result.stderr
  # Three held-out answers before and after, scored.
  assert "before training: exact match " in result.stderr
  assert "after training: exact match " in result.stderr
  assert "of 3 held-out answers" in result.stdout
  assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
      "config.json", "generation_config.json", "model.safetensors"]
  assert json.loads((tmp_path / "out" / "generation_config.json").read_text(
      )) == {"_from_model_config": False, "bos_token_id": 257,
             "eos_token_id": 258, "pad_token_id": 256}
  demo = cache_dir / "finetune" / finetune.DEMO_NAME
  config, before = hf.load(demo)
  exported, after = hf.load(tmp_path / "out")
  assert exported == config == finetune.DEMO_CONFIG
  assert json.loads((tmp_path / "out" / "config.json").read_text())[
      "bos_token_id"] == BYTE.bos_id
  moved = [float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
           for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after))]
  assert max(moved) > 1e-3


@pytest.mark.parametrize("lines,words", [
    (['{"prompt": "a", "response": "b"}'] * 30 + ['{"prompt": "a",'],
     ":31: not valid JSON"),
    (['{"prompt": "%s", "response": "b"}' % ("x" * 200)], ":1: the example is "
     "203 tokens long (BOS and EOS included), more than the 65 of a row "
     "(--seq-len + 1); raise --seq-len to 202 or more"),
    ([], " holds no record (it is empty)"),
], ids=["malformed", "too-long", "empty"])
def test_bad_data_exits_2_with_one_line(tmp_path, demo_cache, capsys, lines,
                                        words):
  del demo_cache
  path = tmp_path / "train.jsonl"
  path.write_text("".join(line + "\n" for line in lines))
  with pytest.raises(SystemExit) as exit_info:
    finetune.main(_args(tmp_path, "--data", f"jsonl:{path}", "--split",
                              "all", "--eval-split", "none"))
  assert exit_info.value.code == 2
  err = [l for l in capsys.readouterr().err.splitlines() if "error:" in l]
  assert len(err) == 1 and f"error: {path}" in err[0] and words in err[0], err


def test_eval_only_reports_the_loaded_models_loss_and_answers(tmp_path,
                                                              demo_cache):
  """--eval-only (--steps 0) trains nothing: the held-out loss and the
  answers are the loaded model's, the same as a training run measures
  before its first step."""
  del demo_cache
  argv = [*_args(tmp_path, "--seq-len", "128", "--eval-every", "10",
                 "--eval-batches", "2",
                 "--answers", "4"), "--checkpoint-dir", "none"]
  only = finetune.main([*argv, "--eval-only"])
  assert (only["step"], only["train_loss"], only["answers"]) == (0, None, 4)
  assert np.isfinite(only["eval_loss"])
  trained = finetune.main([*argv, "--steps", "2"])
  assert trained["exact_match_before"] == only["exact_match"]
  with pytest.raises(SystemExit):
    finetune.main([*argv, "--eval-only", "--eval-split", "none"])
