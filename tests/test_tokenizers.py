"""Tests of the existing tokenizers the trainer loads: a real LLaMA
SentencePiece model and a Hugging Face tokenizer.json (data/tokenizers.py).
"""

import json
import shutil

import pytest

from subspace_jax.data import sources
from subspace_jax.data import tokenizers as tok_lib

sentencepiece = pytest.importorskip("sentencepiece")


@pytest.fixture(scope="module")
def texts() -> list[str]:
  return sources.EmbeddedCorpus(split="validation").documents()


def test_llama_sentencepiece_model(llama_sp_model, texts):
  """The LLaMA tokenizer: 32000 ids, BOS <s> and EOS </s> from the model
  itself, no padding id, and text comes back from its ids."""
  tok = tok_lib.load_tokenizer(llama_sp_model)
  assert isinstance(tok, tok_lib.SentencePieceTokenizer)
  assert tok.vocab_size == 32000
  sp = sentencepiece.SentencePieceProcessor(model_file=str(llama_sp_model))
  assert (sp.id_to_piece(tok.bos_id), sp.id_to_piece(tok.eos_id)) == (
      "<s>", "</s>")
  assert tok.pad_id is None
  text = texts[0][:2000]
  ids = tok.encode(text)
  assert 0 < len(ids) < len(text) / 2 and max(ids) < 32000
  assert tok.bos_id not in ids and tok.eos_id not in ids
  assert tok.decode(ids + [tok.eos_id]) == text


def test_special_tokens_from_tokenizer_config(llama_sp_model, tmp_path):
  """A tokenizer_config.json beside the model decides the special ids (a
  checkpoint directory: tokenizer.model is found in it); a token it names
  that the vocabulary lacks is refused in one line."""
  shutil.copy(llama_sp_model, tmp_path / "tokenizer.model")
  (tmp_path / "tokenizer_config.json").write_text(json.dumps(
      {"bos_token": {"content": "<s>", "lstrip": False}, "eos_token": "</s>",
       "pad_token": "<unk>"}))
  tok = tok_lib.load_tokenizer(tmp_path)
  assert (tok.bos_id, tok.eos_id, tok.pad_id) == (1, 2, 0)
  (tmp_path / "tokenizer_config.json").write_text(json.dumps(
      {"eos_token": "</s>", "pad_token": "<pad>"}))
  with pytest.raises(ValueError) as info:
    tok_lib.load_tokenizer(tmp_path)
  assert "'<pad>'" in str(info.value) and "\n" not in str(info.value)
  assert "not in the vocabulary" in str(info.value)


def _bpe_tokenizer_json(path, texts) -> None:
  """A byte-level BPE (vocab 400) trained here, saved as tokenizer.json."""
  tokenizers = pytest.importorskip("tokenizers")
  tok = tokenizers.Tokenizer(tokenizers.models.BPE(unk_token="<unk>"))
  tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = tokenizers.decoders.ByteLevel()
  trainer = tokenizers.trainers.BpeTrainer(
      vocab_size=400, special_tokens=["<unk>", "<s>", "</s>", "<pad>"],
      initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(),
      show_progress=False)
  tok.train_from_iterator(texts, trainer)
  tok.save(str(path))


def test_hf_tokenizer_json(tmp_path, texts):
  """A tokenizer.json: its vocabulary size, the special ids of its
  tokenizer_config.json (or the usual names without one), and round trips
  of text."""
  _bpe_tokenizer_json(tmp_path / "tokenizer.json", texts)
  tok = tok_lib.load_tokenizer(tmp_path / "tokenizer.json")
  assert isinstance(tok, tok_lib.HFTokenizer) and tok.vocab_size == 400
  assert (tok.bos_id, tok.eos_id, tok.pad_id) == (1, 2, None)  # Guessed.
  (tmp_path / "tokenizer_config.json").write_text(json.dumps(
      {"bos_token": None, "eos_token": "<s>", "pad_token": "<pad>"}))
  configured = tok_lib.load_tokenizer(tmp_path)
  assert (configured.bos_id, configured.eos_id, configured.pad_id) == (
      None, 1, 3)
  assert configured.fingerprint != tok.fingerprint
  text = texts[1][:1500]
  ids = tok.encode(text)
  assert len(ids) < len(text) and max(ids) < 400
  assert tok.decode(ids + [tok.eos_id, tok.pad_id or 3]) == text


def test_bad_tokenizer_paths_are_refused_in_one_line(tmp_path):
  cases = {tmp_path / "absent.model": "not found",
           tmp_path: "holds no tokenizer.model or tokenizer.json"}
  (tmp_path / "junk.model").write_bytes(b"\x01" * 40)
  cases[tmp_path / "junk.model"] = "is not a SentencePiece model"
  (tmp_path / "junk.json").write_text("{}")
  cases[tmp_path / "junk.json"] = "is not a Hugging Face tokenizer.json"
  for path, words in cases.items():
    with pytest.raises(ValueError) as info:
      tok_lib.load_tokenizer(path)
    assert words in str(info.value) and "\n" not in str(info.value), path


@pytest.mark.parametrize("config,words", [
    ('{"eos_token": ' + "[" * 50_000 + "]" * 50_000 + "}",
     "nested 50001 deep (at most 64)"),
    ('{"eos_token": ["</s>"]}', "eos_token: ['</s>'] is not valid under"),
    ('{"bos_token": {"content": 1}}', "bos_token/content: 1 is not of type 'string'"),
    ('{"eos_token": "</s>", "x": Infinity}', "Infinity is not a finite number"),
])
def test_a_damaged_tokenizer_config_is_one_line(llama_sp_model, tmp_path,
                                                config, words):
  """A deeply nested tokenizer_config.json was a RecursionError; a token
  given as a list was silently ignored (issue 20)."""
  shutil.copy(llama_sp_model, tmp_path / "tokenizer.model")
  (tmp_path / "tokenizer_config.json").write_text(config)
  with pytest.raises(ValueError) as info:
    tok_lib.load_tokenizer(tmp_path)
  message = str(info.value)
  assert "tokenizer_config.json" in message and words in message, message
  assert "\n" not in message
