"""Sources of training documents.

* :class:`EmbeddedCorpus`: public-domain English novels shipped with the
  package (no download), with a held-out validation split.
* :class:`TextFiles`: local UTF-8 text files matched by a glob.
* :class:`TfdsText`: any TFDS text dataset (e.g. ``c4/en``), read through
  ``tfds`` random-access data sources (array_record; TensorFlow not needed).

Fine-tuning sources give :class:`Record` examples (a prompt and its
response, or a text) instead of documents, and set ``examples = True``: the
data pipeline packs them whole, apart from each other (see
:mod:`~subspace_jax.data.packing`).

* :class:`JsonlRecords`: a JSON Lines file of ``{"prompt": ..., "response":
  ...}``, ``{"messages": [...]}`` or ``{"text": ...}`` objects; a bad line is
  refused naming the file and the line.
* :class:`Instructions`: a small instruction set made from the embedded
  corpus (no download).

Each is a :class:`Source`: ``open()`` returns its documents as a sequence,
and ``streaming`` says whether they are tokenized as they are read (TFDS)
or once, whole. :func:`source_from_spec` builds one from a string such as
``"files:corpus/*.txt"``.
"""

from __future__ import annotations

import dataclasses
import functools
import glob
import gzip
import importlib.resources
import json
import os
import pathlib
import random
import re
from collections.abc import Sequence
from typing import Any, ClassVar, NamedTuple, Protocol, runtime_checkable

from subspace_jax import jsonio

__all__ = ["DataError", "Source", "EmbeddedCorpus", "TextFiles", "TfdsText",
           "Record", "read_jsonl", "JsonlRecords", "Instructions",
           "source_from_spec"]

_CORPUS_FILE = "gutenberg_en.jsonl.gz"


class DataError(ValueError):
  """A data-pipeline setting or input that cannot work; says what to change."""


@runtime_checkable
class Source(Protocol):
  """A data source: its documents, behind one :meth:`open`.

  Attributes:
    name: Names the source in messages.
    streaming: Whether the documents are too many to tokenize at once:
      then the data pipeline tokenizes them as it reads them, else once,
      whole, and caches the tokens.

  A source may also set ``examples = True``: its documents are
  :class:`Record` examples, which the pipeline packs whole (without it,
  False: texts packed into windows).
  """

  name: str
  streaming: bool

  def open(self) -> Sequence[str]:
    """Returns the documents, in order, as a random-access sequence.

    Raises:
      DataError: If the data cannot be read or has no document.
    """
    ...


def _split_documents(docs: list[str], split: str, holdout_fraction: float,
                     name: str) -> list[str]:
  """Returns the ``train``/``validation``/``all`` part of ``docs``."""
  if split == "all":
    return docs
  if split not in ("train", "validation"):
    raise DataError(f"split must be 'train', 'validation' or 'all', got "
                    f"{split!r}")
  if not 0.0 <= holdout_fraction < 1.0:
    raise DataError(f"holdout_fraction must be in [0, 1), got "
                    f"{holdout_fraction}")
  n_val = max(1, round(len(docs) * holdout_fraction)) if holdout_fraction else 0
  if split == "validation" and n_val == 0:
    raise DataError(f"{name} has no validation split because "
                    "holdout_fraction is 0; set holdout_fraction > 0")
  if split == "train" and n_val >= len(docs):
    raise DataError(f"{name} has only {len(docs)} document(s), too few to "
                    "hold out a validation split; use split='all' or add "
                    "documents")
  return docs[len(docs) - n_val:] if split == "validation" else docs[:len(docs) - n_val]


@functools.lru_cache(maxsize=1)
def _embedded_records() -> tuple[dict[str, str], ...]:
  """The embedded corpus's ``{"source": book, "text": document}`` lines."""
  path = importlib.resources.files("subspace_jax.data") / "corpus" / _CORPUS_FILE
  with path.open("rb") as raw, gzip.open(raw, "rt", encoding="utf-8") as f:
    return tuple(json.loads(line) for line in f if line.strip())


def _embedded_documents() -> tuple[str, ...]:
  return tuple(r["text"] for r in _embedded_records())


@dataclasses.dataclass(frozen=True)
class EmbeddedCorpus:
  """Public-domain English prose shipped inside the package.

  About 390 KB of text from two Project Gutenberg novels, in 174 documents
  of roughly 2,000 characters (whole paragraphs, never crossing a chapter);
  see ``subspace_jax/data/corpus/README.md``. The last ``holdout_fraction`` of the
  documents is the validation split.

  Attributes:
    split: ``"train"``, ``"validation"`` or ``"all"``.
    holdout_fraction: Fraction of documents held out for validation.
  """

  split: str = "train"
  holdout_fraction: float = 0.05
  streaming: ClassVar[bool] = False

  @property
  def name(self) -> str:
    return f"embedded:{self.split}"

  def open(self) -> list[str]:
    """Returns the documents of the chosen split (as :meth:`documents`)."""
    return self.documents()

  def documents(self) -> list[str]:
    """Returns the documents of the chosen split."""
    return _split_documents(list(_embedded_documents()), self.split,
                            self.holdout_fraction, "the embedded corpus")


@dataclasses.dataclass(frozen=True)
class TextFiles:
  """Local UTF-8 text files matched by a glob.

  Files are read in sorted path order (``**`` matches subdirectories). With
  ``paragraphs=False`` each file is one document; with ``paragraphs=True``
  each file is split at blank lines (lines holding only whitespace) and each
  block is one document. Documents are stripped of surrounding whitespace
  and empty ones are skipped. The last ``holdout_fraction`` of the
  documents form the ``"validation"`` split, the rest ``"train"``.

  Attributes:
    pattern: Glob such as ``"corpus/**/*.txt"``; ``~`` is expanded.
    paragraphs: Split files into blank-line separated documents.
    split: ``"all"`` (default), ``"train"`` or ``"validation"``.
    holdout_fraction: Fraction of documents held out for validation.
  """

  pattern: str
  paragraphs: bool = False
  split: str = "all"
  holdout_fraction: float = 0.05
  streaming: ClassVar[bool] = False

  @property
  def name(self) -> str:
    return f"files:{self.pattern}"

  def open(self) -> list[str]:
    """Returns the documents of the chosen split (as :meth:`documents`).

    Raises:
      DataError: As :meth:`documents`.
    """
    return self.documents()

  def files(self) -> list[pathlib.Path]:
    """Returns the matching files, sorted.

    Raises:
      DataError: If no file matches.
    """
    matches = sorted(glob.glob(os.path.expanduser(self.pattern),
                               recursive=True))
    files = [pathlib.Path(m) for m in matches if os.path.isfile(m)]
    if not files:
      what = "only directories" if matches else "nothing"
      raise DataError(f"glob {self.pattern!r} matches {what}; give a "
                      "pattern that matches text files, e.g. "
                      "'data/**/*.txt'")
    return files

  def documents(self) -> list[str]:
    """Reads the files and returns the documents of the chosen split.

    Raises:
      DataError: If a file cannot be read or is not UTF-8, or if there
        is no non-empty document.
    """
    docs: list[str] = []
    for path in self.files():
      try:
        text = path.read_text(encoding="utf-8")
      except OSError as e:
        raise DataError(f"cannot read {str(path)!r} ({e.strerror or e}); "
                        "fix its permissions or exclude it from the "
                        "glob") from None
      except UnicodeDecodeError as e:
        raise DataError(f"{str(path)!r} is not UTF-8 text (bad byte at "
                        f"offset {e.start}); convert it or exclude it "
                        "from the glob") from None
      text = text.replace("\r\n", "\n")
      blocks = re.split(r"\n[ \t\r\f\v]*\n", text) if self.paragraphs else [text]
      docs.extend(b.strip() for b in blocks if b.strip())
    if not docs:
      raise DataError(f"files matching {self.pattern!r} contain no "
                      "non-empty document; point the glob at text files")
    return _split_documents(docs, self.split, self.holdout_fraction,
                            f"files matching {self.pattern!r}")


def _import_tfds() -> Any:
  try:
    import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
  except ImportError:
    raise ImportError("TFDS sources need tensorflow-datasets: pip install "
                      "tensorflow-datasets array_record") from None
  return tfds


class _TextColumn(Sequence):
  """Random access to one text feature of a TFDS data source, as str."""

  def __init__(self, source: Any, key: str, name: str):
    self._source = source
    self._key = key
    self._name = name

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index: int) -> str:  # type: ignore[override]
    value = self._source[int(index)][self._key]
    if isinstance(value, bytes):
      try:
        return value.decode("utf-8")
      except UnicodeDecodeError as e:
        raise DataError(f"document {int(index)} of {self._name} is not UTF-8 "
                        f"text (bad byte at offset {e.start}); repair or "
                        "rebuild the dataset") from None
    return str(value)


@dataclasses.dataclass(frozen=True)
class TfdsText:
  """A text dataset from TensorFlow Datasets, read without TensorFlow.

  The dataset must already be prepared under ``data_dir`` in the
  ``array_record`` file format (``tfds build NAME --data_dir=DIR
  --file_format=array_record``); nothing is downloaded.

  Attributes:
    name: Dataset name, optionally with config and version (``"c4/en"``).
    data_dir: TFDS data directory; ``None`` uses the TFDS default.
    split: TFDS split, slicing allowed (``"train"``, ``"validation[:10%]"``).
    text_key: Name of the text feature.
  """

  name: str
  data_dir: str | None = None
  split: str = "train"
  text_key: str = "text"
  streaming: ClassVar[bool] = True

  def open(self) -> Sequence[str]:
    """Opens the split as a random-access sequence of documents.

    Raises:
      ImportError: If tensorflow-datasets is not installed.
      DataError: If the dataset, split or feature is missing, the
        files are not array_record, or the split is empty.
    """
    tfds = _import_tfds()
    where = f"data_dir={self.data_dir!r}"
    build = (f"build it first with `tfds build {self.name} --data_dir=DIR "
             "--file_format=array_record`")
    try:
      builder = tfds.builder(self.name, data_dir=self.data_dir)
    except tfds.core.DatasetNotFoundError:
      raise DataError(f"TFDS dataset {self.name!r} not found in {where}; "
                      f"{build}") from None
    if not builder.is_prepared():
      raise DataError(f"TFDS dataset {self.name!r} is not prepared in "
                      f"{where}; {build}")
    features = list(builder.info.features.keys())
    if self.text_key not in features:
      raise DataError(f"TFDS dataset {self.name!r} has no feature "
                      f"{self.text_key!r}; set text_key to one of "
                      f"{features}")
    try:
      source = builder.as_data_source(split=self.split)
    except NotImplementedError:
      raise DataError(f"TFDS dataset {self.name!r} in {where} is stored as "
                      f"{builder.info.file_format}, not array_record; "
                      "rebuild it with --file_format=array_record or "
                      "convert it with `tfds convert_format`") from None
    except ValueError as e:
      raise DataError(f"bad split {self.split!r} for TFDS dataset "
                      f"{self.name!r} ({str(e).splitlines()[0]}); "
                      f"available: {list(builder.info.splits.keys())}"
                      ) from None
    if len(source) == 0:
      raise DataError(f"split {self.split!r} of TFDS dataset {self.name!r} "
                      "is empty; choose another split")
    return _TextColumn(source, self.text_key, f"tfds:{self.name} ({self.split})")


# ----------------------------------------------------------------------------
# Fine-tuning examples
# ----------------------------------------------------------------------------


class Record(NamedTuple):
  """One fine-tuning example: a prompt and its response, or a text.

  Attributes:
    where: Where it comes from, for error messages (``"train.jsonl:12"``).
    prompt: The prompt, which the model reads but is not trained to write
      (None for a text).
    response: The response, which the model is trained to write (None for
      a text).
    text: A text the model is trained on whole, as in pretraining (None for
      a prompt/response pair).
    messages: A conversation, ``(role, content)`` pairs, rendered with the
      tokenizer's chat template and learned on its assistant turns (None
      otherwise).
  """

  where: str
  prompt: str | None = None
  response: str | None = None
  text: str | None = None
  messages: tuple[tuple[str, str], ...] | None = None

  @property
  def joined(self) -> str:
    """The whole text: the prompt then the response, the text, or the
    messages' contents one per line."""
    if self.messages is not None:
      return "\n".join(content for _, content in self.messages)
    return self.text if self.text is not None else self.prompt + self.response

  @property
  def conversation(self) -> list[dict[str, str]]:
    """The messages as a chat template takes them."""
    return [{"role": r, "content": c} for r, c in self.messages or ()]


_RECORD_FORMS = ('{"prompt": ..., "response": ...}, {"messages": [{"role": '
                 '..., "content": ...}, ...]} or {"text": ...}')
_JSON_TYPES = {dict: "an object", list: "an array", str: "a string",
               int: "a number", float: "a number", bool: "a boolean",
               type(None): "null"}


def _json_type(value: Any) -> str:
  return _JSON_TYPES.get(type(value), type(value).__name__)


def _parse_record(line: bytes, where: str) -> Record | None:
  """The record of one JSONL line (None for a blank line).

  Raises:
    DataError: Naming ``where`` (the file and line) and what is wrong.
  """
  try:
    text = line.decode("utf-8")
  except UnicodeDecodeError as e:
    raise DataError(f"{where}: not UTF-8 text (bad byte at column "
                    f"{e.start + 1}); convert the file to UTF-8") from None
  if not text.strip():
    return None
  try:
    obj = jsonio.loads(text)
  except jsonio.JSONError as e:
    raise DataError(f"{where}: {e}; write one object per line, "
                    f"{_RECORD_FORMS}") from None
  if not isinstance(obj, dict):
    raise DataError(f"{where}: {_json_type(obj)}, not a JSON object; write "
                    f"one object per line, {_RECORD_FORMS}")
  if "messages" in obj:
    return _parse_messages(obj, where)
  pair = [k for k in ("prompt", "response") if k in obj]
  if pair and "text" in obj:
    raise DataError(f"{where}: both 'text' and {pair[0]!r}; give either a "
                    "prompt and a response or a text")
  if not pair and "text" not in obj:
    keys = ", ".join(map(repr, obj)) or "none"
    raise DataError(f"{where}: no 'prompt' and 'response', 'messages' nor "
                    f"'text' field (keys: {keys}); each line needs "
                    f"{_RECORD_FORMS}")
  if len(pair) == 1:
    other = "response" if pair[0] == "prompt" else "prompt"
    raise DataError(f"{where}: {pair[0]!r} without {other!r}; each line "
                    f"needs {_RECORD_FORMS}")
  fields = {k: obj[k] for k in (pair or ["text"])}
  for key, value in fields.items():
    if not isinstance(value, str):
      raise DataError(f"{where}: {key!r} is {_json_type(value)}, not a string")
  return Record(where, **fields)


_ROLES = ("system", "user", "assistant")


def _parse_messages(obj: dict, where: str) -> Record:
  """The record of a ``{"messages": [...]}`` line."""
  others = [k for k in ("prompt", "response", "text") if k in obj]
  if others:
    raise DataError(f"{where}: both 'messages' and {others[0]!r}; give one "
                    "form per line")
  messages = obj["messages"]
  if not isinstance(messages, list) or not messages:
    raise DataError(f"{where}: 'messages' is {_json_type(messages)}, not a "
                    'non-empty array of {"role": ..., "content": ...}')
  out = []
  for k, m in enumerate(messages, 1):
    if not (isinstance(m, dict) and isinstance(m.get("role"), str)
            and isinstance(m.get("content"), str)):
      raise DataError(f"{where}: message {k} is not an object with a string "
                      "'role' and a string 'content'")
    if m["role"] not in _ROLES:
      raise DataError(f"{where}: message {k} has role {m['role']!r}; use "
                      f"{', '.join(_ROLES)}")
    out.append((m["role"], m["content"]))
  if not any(role == "assistant" for role, _ in out):
    raise DataError(f"{where}: no 'assistant' message, so nothing to learn; "
                    "add the answer as an assistant message")
  return Record(where, messages=tuple(out))


def read_jsonl(path: str | os.PathLike[str]) -> list[Record]:
  """Reads a JSON Lines file of fine-tuning records.

  Each non-blank line is one JSON object: ``{"prompt": str, "response":
  str}`` (the response is learned, the prompt only read), ``{"messages":
  [{"role": "system" | "user" | "assistant", "content": str}, ...]}`` (a
  conversation, rendered with the tokenizer's chat template and learned
  on its assistant turns) or ``{"text": str}`` (learned whole); other keys
  are ignored.

  Args:
    path: The file.

  Returns:
    Its records, in file order.

  Raises:
    DataError: If the file cannot be read or holds no record, or a line is
      not one of the forms above (the message names the file and line).
  """
  name = os.fspath(path)
  try:
    with open(os.path.expanduser(name), "rb") as f:
      lines = f.read().split(b"\n")
  except OSError as e:
    raise DataError(f"cannot read {name} ({e.strerror or e}); give a JSON "
                    "Lines file") from None
  records = [r for number, line in enumerate(lines, 1)
             if (r := _parse_record(line, f"{name}:{number}")) is not None]
  if not records:
    raise DataError(f"{name} holds no record (it is empty); write one JSON "
                    f"object per line, {_RECORD_FORMS}")
  return records


@dataclasses.dataclass(frozen=True)
class JsonlRecords:
  """Fine-tuning records from a JSON Lines file (see :func:`read_jsonl`).

  The last ``holdout_fraction`` of the records (in file order) form the
  ``"validation"`` split, the rest ``"train"``.

  Attributes:
    path: The file; ``~`` is expanded.
    split: ``"all"`` (default), ``"train"`` or ``"validation"``.
    holdout_fraction: Fraction of records held out for validation.
  """

  path: str
  split: str = "all"
  holdout_fraction: float = 0.05
  streaming: ClassVar[bool] = False
  examples: ClassVar[bool] = True

  @property
  def name(self) -> str:
    return f"jsonl:{self.path}"

  def open(self) -> list[Record]:
    """Returns the records of the chosen split.

    Raises:
      DataError: As :func:`read_jsonl`, or if the split is empty.
    """
    return _split_documents(read_jsonl(self.path), self.split,
                            self.holdout_fraction, self.path)


# Instructions made from the embedded corpus: each passage of at most this
# many characters (whole words of one paragraph) is one example, so that an
# example is at most 127 bytes (it fits --seq-len 128 with the byte
# tokenizer's BOS and EOS).
_PASSAGE_CHARS = 48


def _passages(paragraph: str) -> list[str]:
  """``paragraph`` cut at spaces into passages of at most
  :data:`_PASSAGE_CHARS` characters (a longer word is one passage)."""
  out, words = [], []
  for word in paragraph.split():
    if words and len(" ".join([*words, word])) > _PASSAGE_CHARS:
      out.append(" ".join(words))
      words = []
    words.append(word)
  return out + [" ".join(words)] if words else out


@functools.lru_cache(maxsize=1)
def _instruction_records() -> tuple[Record, ...]:
  """Every example of :class:`Instructions`, in its shuffled order."""
  pairs = []
  for doc in _embedded_records():
    book = doc["source"].split(", by ")[0]
    for paragraph in doc["text"].split("\n\n"):
      passages = _passages(paragraph)
      for i, passage in enumerate(passages):
        task = len(pairs) % 3
        if task == 1:
          pairs.append((f"Which book is this from?\n{passage}\n", book))
        elif task == 2 and i + 1 < len(passages):
          pairs.append((f"Continue the text:\n{passage}\n", passages[i + 1]))
        else:
          pairs.append((f"Write in capital letters:\n{passage}\n",
                        passage.upper()))
  random.Random(0).shuffle(pairs)  # Mixes the books before the split.
  return tuple(Record(f"instructions record {i}", prompt, response)
               for i, (prompt, response) in enumerate(pairs))


@dataclasses.dataclass(frozen=True)
class Instructions:
  """A small instruction set made from the embedded corpus (no download).

  Every passage of the corpus (whole words of a paragraph, at most 48
  characters) gives one prompt/response example, of three kinds in turn:
  write the passage in capital letters, name the book it is from
  (``Alice's Adventures in Wonderland`` or ``Botchan (Master Darling)``),
  or continue it with the paragraph's next passage. About 9,000 examples,
  shuffled with a fixed seed; the last ``holdout_fraction`` of them form
  the ``"validation"`` split. Each is at most 127 UTF-8 bytes.

  Attributes:
    split: ``"train"``, ``"validation"`` or ``"all"``.
    holdout_fraction: Fraction of the examples held out for validation.
  """

  split: str = "train"
  holdout_fraction: float = 0.05
  streaming: ClassVar[bool] = False
  examples: ClassVar[bool] = True

  @property
  def name(self) -> str:
    return f"instructions:{self.split}"

  def open(self) -> list[Record]:
    """Returns the examples of the chosen split."""
    return _split_documents(list(_instruction_records()), self.split,
                            self.holdout_fraction, "the instruction set")


def source_from_spec(spec: str, *, split: str | None = None,
                     data_dir: str | None = None, text_key: str = "text"
                     ) -> EmbeddedCorpus | TextFiles | TfdsText | JsonlRecords | Instructions:
  """Parses a source string, handy for command lines and configs.

  Args:
    spec: ``"embedded"``, ``"files:GLOB"`` (one document per file),
      ``"paragraphs:GLOB"`` (one document per blank-line separated
      block), ``"tfds:NAME"`` (e.g. ``"tfds:c4/en"``), ``"jsonl:PATH"``
      (fine-tuning records, :class:`JsonlRecords`) or ``"instructions"``
      (the built-in instruction set, :class:`Instructions`).
    split: Split; defaults to ``"train"`` for embedded, instructions and
      TFDS sources and ``"all"`` for files.
    data_dir: TFDS data directory.
    text_key: TFDS text feature name.

  Returns:
    The source.

  Raises:
    DataError: If the spec is not one of the forms above.
  """
  kind, _, arg = spec.partition(":")
  if kind == "embedded" and not arg:
    return EmbeddedCorpus(split=split or "train")
  if kind in ("files", "paragraphs") and arg:
    return TextFiles(arg, paragraphs=kind == "paragraphs", split=split or "all")
  if kind == "tfds" and arg:
    return TfdsText(arg, data_dir=data_dir, split=split or "train",
                    text_key=text_key)
  if kind == "jsonl" and arg:
    return JsonlRecords(arg, split=split or "all")
  if kind == "instructions" and not arg:
    return Instructions(split=split or "train")
  raise DataError(f"unknown data source {spec!r}; use 'embedded', "
                  "'files:GLOB', 'paragraphs:GLOB', 'tfds:NAME', "
                  "'jsonl:PATH' or 'instructions'")
