"""Sources of training documents.

* :class:`EmbeddedCorpus`: public-domain English novels shipped with the
  package (no download), with a held-out validation split.
* :class:`TextFiles`: local UTF-8 text files matched by a glob.
* :class:`TfdsText`: any TFDS text dataset (e.g. ``c4/en``), read through
  ``tfds`` random-access data sources (array_record; TensorFlow not needed).

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
import re
from collections.abc import Sequence
from typing import Any, ClassVar, Protocol, runtime_checkable

__all__ = ["DataError", "Source", "EmbeddedCorpus", "TextFiles", "TfdsText",
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
def _embedded_documents() -> tuple[str, ...]:
  path = importlib.resources.files("subspace_jax") / "data" / _CORPUS_FILE
  with path.open("rb") as raw, gzip.open(raw, "rt", encoding="utf-8") as f:
    return tuple(json.loads(line)["text"] for line in f if line.strip())


@dataclasses.dataclass(frozen=True)
class EmbeddedCorpus:
  """Public-domain English prose shipped inside the package.

  About 390 KB of text from two Project Gutenberg novels, in 174 documents
  of roughly 2,000 characters (whole paragraphs, never crossing a chapter);
  see ``subspace_jax/data/README.md``. The last ``holdout_fraction`` of the
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


def source_from_spec(spec: str, *, split: str | None = None,
                     data_dir: str | None = None,
                     text_key: str = "text") -> EmbeddedCorpus | TextFiles | TfdsText:
  """Parses a source string, handy for command lines and configs.

  Args:
    spec: ``"embedded"``, ``"files:GLOB"`` (one document per file),
      ``"paragraphs:GLOB"`` (one document per blank-line separated
      block) or ``"tfds:NAME"`` (e.g. ``"tfds:c4/en"``).
    split: Split; defaults to ``"train"`` for embedded and TFDS sources
      and ``"all"`` for files.
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
  raise DataError(f"unknown data source {spec!r}; use 'embedded', "
                  "'files:GLOB', 'paragraphs:GLOB' or 'tfds:NAME'")
