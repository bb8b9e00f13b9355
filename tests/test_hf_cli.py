"""The command line with pretrained models: --init-from, --tokenizer-model
and --export-hf (examples/pretrain_llama.py)."""

import json
import shutil

import jax
import numpy as np
import pytest

import clirun
from subspace_jax.models import llama
from subspace_jax.models.io import hf


@pytest.fixture
def checkpoint(tmp_path, llama_sp_model):
  """A tiny random LLaMA (GQA, vocab 32000) saved in the Hugging Face
  layout, with the LLaMA tokenizer beside it."""
  cfg = llama.get_config("tiny", vocab_size=32000, num_kv_heads=2,
                         max_seq_len=128)
  # Seed 1: not the weights a run with --seed 0 would draw itself.
  params = llama.ModelDef(cfg).init(1)
  hf.save(tmp_path / "ckpt", cfg, params)
  shutil.copy(llama_sp_model, tmp_path / "ckpt" / "tokenizer.model")
  return tmp_path / "ckpt", cfg, params


def test_flags_take_the_model_and_tokenizer_from_the_checkpoint(checkpoint):
  path, cfg, _ = checkpoint
  run = clirun.run_config(["--init-from", path, "--seq-len", "256"])
  assert (run.tokenizer, run.tokenizer_model) == ("sentencepiece", str(path))
  model = run.model_config
  assert model.vocab_size == 32000 and model.kv_heads == 2
  assert model.max_seq_len == 256 and model.hidden_size == cfg.hidden_size
  assert run.optimizer.rank == cfg.hidden_size // 4
  assert run.checkpoint_dir.endswith("ckpt_golore/ckpt")


@pytest.mark.parametrize("args,words", [
    (["--model", "tiny"], "--model and --init-from exclude each other"),
    (["--tokenizer", "byte"], "is a sentencepiece tokenizer, not --tokenizer "
     "byte"),
    (["--tokenizer-model", "absent.json"], "--tokenizer-model: tokenizer file"),
])
def test_conflicting_flags_are_refused(checkpoint, args, words):
  path, _, _ = checkpoint
  with pytest.raises(ValueError, match=words):
    clirun.run_config(["--init-from", path, *args])


def test_unsupported_checkpoint_exits_2_naming_the_key(checkpoint, tmp_path):
  path, _, _ = checkpoint
  config = json.loads((path / "config.json").read_text())
  config["rope_scaling"] = {"rope_type": "llama3", "factor": 8.0}
  (path / "config.json").write_text(json.dumps(config))
  result = clirun.run(["--init-from", path, "--steps", "2"], tmp_path)
  assert result.returncode == 2
  assert result.stderr.count("\n") == 1
  assert "--init-from" in result.stderr
  assert "rope_scaling type 'llama3' is not supported" in result.stderr


@pytest.mark.slow
def test_train_from_a_checkpoint_and_export(checkpoint, tmp_path):
  """Model-mode RSO from the checkpoint's weights with a learning rate too
  small to move a float32 weight: the export (merged W + P·B) is the
  checkpoint again, so the run started from it and the merge is right;
  the tokenizer's files and its special ids go with it."""
  path, cfg, params = checkpoint
  template = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
  (path / "chat_template.jinja").write_text(template)
  result = clirun.run(
      ["--init-from", path, *clirun.FAST, "--steps", "6", "--lr", "1e-12",
       "--optimizer", "rso", "--subspace-mode", "model",
       "--export-hf", tmp_path / "out"], tmp_path)
  assert result.returncode == 0, result.stderr
  assert "starting from the weights of" in result.stderr
  out = tmp_path / "out"
  assert (out / "tokenizer.model").read_bytes() == (
      path / "tokenizer.model").read_bytes()
  config = json.loads((out / "config.json").read_text())
  assert (config["bos_token_id"], config["eos_token_id"]) == (1, 2)
  assert "pad_token_id" not in config
  # What transformers' apply_chat_template and generate read: the source's
  # chat template, and a generation config of the tokenizer's ids.
  assert (out / "chat_template.jinja").read_text() == template
  assert json.loads((out / "generation_config.json").read_text()) == {
      "_from_model_config": False, "bos_token_id": 1, "eos_token_id": 2}
  exported_cfg, exported = hf.load(out)
  assert exported_cfg.kv_heads == 2 and exported_cfg.max_seq_len == 128
  # The steps move W + P·B by ~lr (1e-12), far below float32's resolution
  # at these weights (~1e-9 at 0.02): the weights come back within 1e-8.
  jax.tree.map(lambda a, b: np.testing.assert_allclose(
      np.asarray(a), np.asarray(b), rtol=0, atol=1e-8), exported, params)


def test_tokenizer_model_sets_the_vocabulary(llama_sp_model):
  """Pretraining from scratch with an existing tokenizer: its kind is the
  default --tokenizer and its vocabulary the model's."""
  run = clirun.run_config(["--tokenizer-model", llama_sp_model])
  assert (run.tokenizer, run.model) == ("sentencepiece", "tiny")
  assert run.model_config.vocab_size == 32000
  with pytest.raises(ValueError, match="is a sentencepiece tokenizer, not "
                     "--tokenizer huggingface"):
    clirun.run_config(["--tokenizer-model", llama_sp_model,
                       "--tokenizer", "huggingface"])
  with pytest.raises(ValueError, match="--tokenizer huggingface needs "
                     "--tokenizer-model"):
    clirun.run_config(["--tokenizer", "huggingface"])


def test_a_damaged_tokenizer_model_exits_2_naming_the_flag(tmp_path):
  (tmp_path / "bad.model").write_bytes(b"\x01" * 64)
  result = clirun.run(["--tokenizer-model", tmp_path / "bad.model"], tmp_path)
  assert result.returncode == 2 and result.stderr.count("\n") == 1
  assert "--tokenizer-model: " in result.stderr
  assert "is not a SentencePiece model" in result.stderr
