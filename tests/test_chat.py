"""Chat data: the messages form of JSONL records, chat templates rendered
(data/chat.py), the loss on assistant turns, and BOS only once."""

import json
import pathlib

import pytest

pytest.importorskip("jinja2")

from subspace_jax.data import chat
from subspace_jax.data import pipeline as data
from subspace_jax.data import encoding
from subspace_jax.data import sources
from subspace_jax.data import tokenizers as tok_lib

# A template in the style of ChatML (SmolLM2's, without its default system
# message), and one that writes BOS itself (LLaMA-2's style).
CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + "
          "m['content'] + '<|im_end|>\\n' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
          "{% endif %}")
WITH_BOS = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' "
            "%}[INST] {{ m['content'] }} [/INST]{% else %} {{ m['content'] }}"
            "{{ eos_token }}{% endif %}{% endfor %}")


class _Byte(tok_lib.ByteTokenizer):
  """The byte tokenizer with a chat template; BOS and EOS spelled <s>,
  </s>."""

  def __init__(self, template, add_bos=True):
    self.chat_template, self.add_bos = template, add_bos

  def piece(self, i):
    return {self.bos_id: "<s>", self.eos_id: "</s>"}.get(i, chr(i))


CONVERSATION = [{"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello!"},
                {"role": "user", "content": "2+2?"},
                {"role": "assistant", "content": "4"}]


def test_turns_split_read_and_learned_text():
  pieces = chat.turns(CHATML, CONVERSATION)
  assert "".join(t for t, _ in pieces) == chat.render(CHATML, CONVERSATION)
  assert [t for t, learned in pieces if learned] == ["Hello!<|im_end|>\n",
                                                     "4<|im_end|>\n"]


def test_conversation_ids_mask_the_assistant_turns_only():
  tok = _Byte(CHATML, add_bos=False)
  ids, mask = chat.encode_conversation(tok, CONVERSATION)
  learned = bytes(i for i, m in zip(ids, mask) if m).decode()
  assert learned == "Hello!<|im_end|>\n4<|im_end|>\n"
  assert bytes(ids).decode() == chat.render(CHATML, CONVERSATION)


def test_bos_is_added_once():
  """The template writes <s>: its id, not its bytes, and no second BOS;
  a template without it gets the tokenizer's BOS when add_bos is on."""
  tok = _Byte(WITH_BOS)
  ids, mask = chat.encode_conversation(tok, CONVERSATION[:2])
  assert ids[0] == tok.bos_id and ids.count(tok.bos_id) == 1
  assert ids[-1] == tok.eos_id and mask[-1] == 1
  assert bytes(ids[1:-1]).decode() == "[INST] Hi [/INST] Hello!"
  ids, _ = chat.encode_conversation(_Byte(CHATML), CONVERSATION[:2])
  assert ids[0] == tok.bos_id and ids[1] != tok.bos_id
  prompt = chat.prompt_ids(_Byte(CHATML, add_bos=False), CONVERSATION[:1])
  assert bytes(prompt).decode() == "<|im_start|>user\nHi<|im_end|>\n" \
                                   "<|im_start|>assistant\n"


def test_pairs_get_no_bos_when_the_tokenizer_adds_none_or_it_is_there():
  enc = encoding.ExampleEncoder(_Byte(None, add_bos=False))
  out = enc(sources.Record("x:1", "Q", "A"))
  assert out["tokens"].tolist() == [ord("Q"), ord("A"), 258]
  bos = tok_lib.ByteTokenizer.bos_id

  class Starts(_Byte):
    def encode(self, text):
      return [bos, *super().encode(text)]

  out = encoding.ExampleEncoder(Starts(None))(sources.Record("x:1", "Q", "A"))
  assert out["tokens"].tolist()[:2] == [bos, ord("Q")]  # One BOS.


def test_messages_records_in_jsonl(tmp_path):
  path = tmp_path / "chat.jsonl"
  path.write_text(json.dumps({"messages": CONVERSATION}) + "\n"
                  + json.dumps({"prompt": "a", "response": "b"}) + "\n")
  records = sources.read_jsonl(path)
  assert records[0].messages == tuple((m["role"], m["content"])
                                      for m in CONVERSATION)
  assert records[0].conversation == CONVERSATION
  out = encoding.ExampleEncoder(_Byte(CHATML, add_bos=False))(records[0])
  assert out["loss_mask"].sum() == len("Hello!<|im_end|>\n4<|im_end|>\n")
  with pytest.raises(data.DataError, match=r":1: the tokenizer has no chat "
                     "template"):
    encoding.ExampleEncoder(tok_lib.ByteTokenizer())(records[0])


@pytest.mark.parametrize("line,words", [
    ({"messages": []}, "'messages' is an array, not a non-empty array"),
    ({"messages": "hi"}, "'messages' is a string"),
    ({"messages": [{"role": "user"}]}, "message 1 is not an object with a "
     "string 'role' and a string 'content'"),
    ({"messages": [{"role": "bot", "content": "x"}]}, "message 1 has role "
     "'bot'"),
    ({"messages": [{"role": "user", "content": "x"}]}, "no 'assistant' "
     "message"),
    ({"messages": [{"role": "assistant", "content": "x"}], "text": "y"},
     "both 'messages' and 'text'"),
])
def test_bad_messages_are_refused_naming_the_line(tmp_path, line, words):
  path = tmp_path / "chat.jsonl"
  path.write_text(json.dumps(line) + "\n")
  with pytest.raises(data.DataError) as e:
    sources.read_jsonl(path)
  assert str(e.value).startswith(f"{path}:1: ") and words in str(e.value)


def test_a_failing_template_is_one_line():
  bad = "{{ raise_exception('only user and assistant roles') }}"
  with pytest.raises(chat.ChatError, match="^only user and assistant roles$"):
    chat.render(bad, CONVERSATION)
  with pytest.raises(chat.ChatError, match="not valid Jinja"):
    chat.render("{% for %}", CONVERSATION)


def test_the_example_file_reads_and_encodes():
  """examples/data/chat.jsonl, the README's example of the forms."""
  path = pathlib.Path(__file__).resolve().parents[1] / "examples" / "data" \
      / "chat.jsonl"
  records = sources.read_jsonl(path)
  assert any(r.messages for r in records) and any(r.prompt for r in records)
  enc = encoding.ExampleEncoder(_Byte(CHATML, add_bos=False))
  for r in records:
    assert enc(r)["loss_mask"].sum() > 0
