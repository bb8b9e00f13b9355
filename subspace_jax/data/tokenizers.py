"""Tokenizers for the training data pipeline.

Three implementations share one small interface (:class:`Tokenizer`):

* :class:`ByteTokenizer`: UTF-8 bytes plus three special ids; no dependency.
* :class:`SentencePieceTokenizer`: a SentencePiece model, either loaded from a
  path (a LLaMA ``tokenizer.model``, say) or trained locally on a corpus and
  cached on disk, keyed by a hash of the corpus and the training settings.
  ``sentencepiece`` is optional and is imported only when this tokenizer is
  used.
* :class:`HFTokenizer`: a Hugging Face ``tokenizer.json``, through the
  ``tokenizers`` package (optional too).

An existing tokenizer is loaded with :func:`load_tokenizer` (a ``.model``
file, a ``tokenizer.json`` or a checkpoint directory holding one). Its BOS,
EOS and padding ids are the tokenizer's own: those that a
``tokenizer_config.json`` (or ``special_tokens_map.json``) beside it names,
else the SentencePiece model's.

Typical use::

    tok = get_tokenizer("byte")
    tok = get_tokenizer("sentencepiece", vocab_size=8000)  # trains on the
                                                           # embedded corpus
    tok = load_tokenizer("path/to/llama")  # its tokenizer.model or .json
    ids = tok.encode("Hello") + [tok.eos_id]
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import pathlib
import sys
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np

from subspace_jax import jsonio
from subspace_jax import cache
from subspace_jax.data import sources


@runtime_checkable
class Tokenizer(Protocol):
    """What the data pipeline needs from a tokenizer."""

    vocab_size: int
    eos_id: int
    bos_id: int

    def encode(self, text: str) -> list[int]:
        """Maps text to token ids (no BOS/EOS added)."""
        ...

    def decode(self, ids: Sequence[int]) -> str:
        """Maps token ids back to text, dropping special ids."""
        ...


class ByteTokenizer:
    """UTF-8 byte tokenizer: ids 0-255 are bytes, then PAD, BOS and EOS.

    Deterministic and dependency free; ``decode(encode(s)) == s`` for any
    string ``s``.
    """

    pad_id = 256
    bos_id = 257
    eos_id = 258
    vocab_size = 259
    fingerprint = "byte-v1"
    add_bos = True
    chat_template = None
    stop_ids = (258,)

    def encode(self, text: str) -> list[int]:
        """Returns the UTF-8 bytes of ``text`` as ids."""
        return list(text.encode("utf-8"))

    def encode_array(self, text: str) -> np.ndarray:
        """:meth:`encode` as a uint8 array: one byte per id, where the list
        takes about 36 (what the data pipeline uses on long documents)."""
        return np.frombuffer(text.encode("utf-8"), np.uint8)

    def decode(self, ids: Sequence[int]) -> str:
        """Decodes byte ids, skipping special ids; bad UTF-8 becomes U+FFFD."""
        return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode(
            "utf-8", errors="replace")

    def __repr__(self) -> str:
        return "ByteTokenizer()"


def _import_sentencepiece() -> Any:
    try:
        import sentencepiece  # pylint: disable=import-outside-toplevel
    except ImportError:
        raise ImportError("SentencePiece tokenizers need the sentencepiece "
                          "package: pip install sentencepiece") from None
    return sentencepiece


class SentencePieceTokenizer:
    """A SentencePiece model behind the :class:`Tokenizer` interface.

    Args:
        model_path: Path to a ``.model`` file.
        specials: BOS/EOS/pad pieces (``{"bos": "<s>", ...}``, from a
            ``tokenizer_config.json``) that replace the model's own ids.

    Attributes:
        pad_id: The padding id, or None if the model has none.

    Raises:
        FileNotFoundError: If ``model_path`` does not exist.
        ValueError: If the model has no EOS piece, or is not a SentencePiece
            model.
    """

    def __init__(self, model_path: str | os.PathLike[str],
                 specials: Mapping[str, str | None] | None = None):
        spm = _import_sentencepiece()
        path = pathlib.Path(model_path).expanduser()
        if not path.is_file():
            raise FileNotFoundError(
                f"SentencePiece model {str(path)!r} not found; pass the path "
                "of an existing .model file or train one with "
                "SentencePieceTokenizer.train")
        data = _read_tokenizer_file(path)
        self.model_path = path
        self._sp = spm.SentencePieceProcessor()
        try:
            self._sp.LoadFromSerializedProto(data)
        except Exception:  # pylint: disable=broad-except
            raise ValueError(f"{path} is not a SentencePiece model (it cannot "
                             "be parsed)") from None
        self.vocab_size = int(self._sp.vocab_size())
        ids = {"bos": int(self._sp.bos_id()), "eos": int(self._sp.eos_id()),
               "pad": int(self._sp.pad_id())}
        for role, piece in (specials or {}).items():
            if piece is not None:
                ids[role] = _piece_id(path, piece, self._sp.piece_to_id(piece),
                                      self._sp.id_to_piece)
        _check_ids(path, ids, self.vocab_size)
        self.bos_id, self.eos_id = ids["bos"], ids["eos"]
        self.pad_id = ids["pad"] if ids["pad"] >= 0 else None
        if self.eos_id < 0:
            raise ValueError(f"SentencePiece model {str(path)!r} has no EOS "
                             "piece; retrain it with eos_id >= 0")
        self.add_bos, self.chat_template = True, None
        self.stop_ids = (self.eos_id,)
        self.fingerprint = _fingerprint("sp", data, ids)

    def encode(self, text: str) -> list[int]:
        """Returns the piece ids of ``text``."""
        return self._sp.encode(text)

    def decode(self, ids: Sequence[int]) -> str:
        """Returns the text of piece ids; control ids (BOS, EOS, PAD) vanish."""
        return self._sp.decode([int(i) for i in ids])

    def piece(self, i: int) -> str:
        """The text of id ``i`` as the vocabulary spells it (``"<s>"``)."""
        return self._sp.id_to_piece(int(i))

    def __repr__(self) -> str:
        return (f"SentencePieceTokenizer({str(self.model_path)!r}, "
                f"vocab_size={self.vocab_size})")

    @classmethod
    def train(
        cls,
        texts: Iterable[str],
        vocab_size: int,
        *,
        model_type: str = "unigram",
        cache_dir: str | os.PathLike[str] | None = None,
    ) -> SentencePieceTokenizer:
        """Trains a model on ``texts``, or reuses the cached one.

        Training is single-threaded with a fixed seed, so the same corpus and
        settings give the same model. Text is kept as is (no normalization,
        spaces preserved) and unknown characters fall back to byte pieces, so
        ``decode(encode(s)) == s``. Ids: UNK 0, BOS 1, EOS 2, PAD 3.

        Args:
            texts: Training documents; each line of each document is one
                SentencePiece sentence (blank lines are skipped).
            vocab_size: Size of the vocabulary, including the 256 byte pieces
                and the 4 special pieces (so at least 300 or so).
            model_type: ``"unigram"`` or ``"bpe"``.
            cache_dir: Where models are cached (a ``tokenizers/`` folder is
                made in it); defaults to :func:`default_cache_dir`.

        Returns:
            The tokenizer, whose ``model_path`` is the cached model file.

        Raises:
            ValueError: On bad settings, an empty corpus, or a training failure.
        """
        if model_type not in ("unigram", "bpe"):
            raise ValueError(f"model_type must be 'unigram' or 'bpe', got "
                             f"{model_type!r}")
        if vocab_size < 300:
            raise ValueError(f"vocab_size must be >= 300 for a SentencePiece "
                             f"model with byte fallback, got {vocab_size}")
        lines = [line for text in texts for line in text.split("\n")
                 if line.strip()]
        if not lines:
            raise ValueError("cannot train a SentencePiece model on an empty "
                             "corpus; pass some non-empty texts")
        key = cache.content_key(f"sp-v1|{model_type}|{vocab_size}", lines)
        path = cache.cache_path(cache_dir, "tokenizers",
                                f"sp_{model_type}_{vocab_size}_{key[:16]}.model")
        why = cache.damage(path)
        if why is None:
            try:
                return cls(path)
            except ValueError as e:
                why = str(e)
        if why not in ("missing", "its manifest is missing"):
            print(f"warning: cached tokenizer {path} is damaged ({why}); "
                  "training it again", file=sys.stderr, flush=True)
        _train_to(path, lines, vocab_size, model_type)
        return cls(path)


def _fingerprint(kind: str, data: bytes, ids: Mapping[str, Any]) -> str:
    digest = hashlib.sha256(data)
    digest.update(json.dumps(ids, sort_keys=True).encode())
    return f"{kind}-" + digest.hexdigest()[:16]


def _piece_id(path: pathlib.Path, piece: str, found: int | None,
              id_to_piece: Any) -> int:
    """The id of a special ``piece`` a config names (``found``: the
    tokenizer's lookup, which SentencePiece answers with UNK when absent)."""
    if found is None or found < 0 or id_to_piece(found) != piece:
        raise ValueError(f"{path}: the special token {piece!r} named by its "
                         "tokenizer_config.json is not in the vocabulary")
    return int(found)


class HFTokenizer:
    """A Hugging Face ``tokenizer.json`` behind the :class:`Tokenizer`
    interface (the ``tokenizers`` package).

    Args:
        path: The ``tokenizer.json`` file.
        specials: BOS/EOS/pad tokens (``{"bos": "<s>", ...}``, from a
            ``tokenizer_config.json``). Without an EOS there, a special token
            ``</s>``, ``<|endoftext|>`` or ``<|end_of_text|>`` of the
            vocabulary is the EOS (and ``<s>``/``<|begin_of_text|>`` the BOS).

    Raises:
        ValueError: If the file cannot be parsed or no EOS token is known.
    """

    _EOS = ("</s>", "<|endoftext|>", "<|end_of_text|>")
    _BOS = ("<s>", "<|begin_of_text|>")
    add_bos = True  # load_tokenizer sets these from the files beside it.
    chat_template = None

    def __init__(self, path: str | os.PathLike[str],
                 specials: Mapping[str, str | None] | None = None):
        try:
            import tokenizers  # pylint: disable=import-outside-toplevel
        except ImportError:
            raise ImportError("tokenizer.json files need the tokenizers "
                              "package: pip install tokenizers") from None
        path = pathlib.Path(path).expanduser()
        data = _read_tokenizer_file(path)
        try:
            self._tok = tokenizers.Tokenizer.from_str(data.decode("utf-8"))
        except Exception as e:  # pylint: disable=broad-except
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise ValueError(f"{path} is not a Hugging Face tokenizer.json "
                             f"({first})") from None
        self.model_path = path
        self.vocab_size = int(self._tok.get_vocab_size(with_added_tokens=True))
        specials = dict(specials or {})
        if "eos" not in specials:  # No config names them: the usual names.
            for role, names in (("eos", self._EOS), ("bos", self._BOS)):
                if specials.get(role) is None:
                    specials[role] = next(
                        (n for n in names if self._tok.token_to_id(n) is not None),
                        None)
        ids = {role: None if token is None else _piece_id(
                   path, token, self._tok.token_to_id(token),
                   self._tok.id_to_token)
               for role, token in specials.items()}
        _check_ids(path, ids, self.vocab_size)
        if ids.get("eos") is None:
            raise ValueError(f"{path}: no EOS token is known; put a "
                             "tokenizer_config.json naming its eos_token "
                             "beside it")
        self.eos_id = ids["eos"]
        self.bos_id = ids.get("bos")
        self.pad_id = ids.get("pad")
        self.stop_ids = (self.eos_id,)
        self.fingerprint = _fingerprint("hf", data, ids)

    def encode(self, text: str) -> list[int]:
        """Returns the token ids of ``text`` (no special tokens added)."""
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int]) -> str:
        """Returns the text of ``ids``; special tokens vanish."""
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)

    def piece(self, i: int) -> str:
        """The text of id ``i`` as the vocabulary spells it
        (``"<|im_start|>"``)."""
        return self._tok.id_to_token(int(i))

    def __repr__(self) -> str:
        return (f"HFTokenizer({str(self.model_path)!r}, "
                f"vocab_size={self.vocab_size})")


# File names of a tokenizer in a checkpoint directory, in the order they are
# preferred, and the kind of each.
TOKENIZER_FILES = (("tokenizer.model", "sentencepiece"),
                   ("tokenizer.json", "huggingface"))


def tokenizer_file(path: str | os.PathLike[str]) -> tuple[str, pathlib.Path]:
    """The kind (``"sentencepiece"`` or ``"huggingface"``) and file of the
    tokenizer at ``path``: a ``.model`` file, a ``.json`` file, or a
    directory holding ``tokenizer.model`` or ``tokenizer.json``.

    Raises:
        ValueError: If there is no such file.
    """
    path = pathlib.Path(path).expanduser()
    if path.suffix.lower() == ".gguf":
        if not path.is_file():
            raise ValueError(f"tokenizer file {path} not found")
        return "huggingface", path  # Made from its metadata: load_tokenizer.
    if path.is_dir():
        for name, kind in TOKENIZER_FILES:
            if (path / name).is_file():
                return kind, path / name
        raise ValueError(f"{path} holds no tokenizer.model or tokenizer.json")
    if not path.is_file():
        raise ValueError(f"tokenizer file {path} not found")
    kind = "huggingface" if path.suffix == ".json" else "sentencepiece"
    return kind, path


def _token(value: Any) -> str | None:
    """A special token as a tokenizer config gives it: a string or
    ``{"content": ...}``."""
    if isinstance(value, Mapping):
        value = value.get("content")
    return value if isinstance(value, str) else None


# A special token in a tokenizer config: a string, {"content": ...} or null.
_TOKEN_SCHEMA = {"anyOf": [
    {"type": ["string", "null"]},
    {"type": "object", "required": ["content"],
     "properties": {"content": {"type": "string"}}}]}
TOKENIZER_CONFIG_SCHEMA = {
    "type": "object",
    "properties": {f"{role}_token": _TOKEN_SCHEMA
                   for role in ("bos", "eos", "pad")},
}
"""The JSON Schema of the keys read from ``tokenizer_config.json`` and
``special_tokens_map.json`` (others are ignored)."""

# Largest tokenizer file read (a tokenizer.json of a 256K vocabulary is
# about 35 MB).
_MAX_TOKENIZER_BYTES = 512 * 2**20


def special_tokens(directory: str | os.PathLike[str]) -> dict[str, str | None]:
    """The BOS/EOS/pad tokens that ``tokenizer_config.json`` (else
    ``special_tokens_map.json``) in ``directory`` names: ``{"bos": "<s>",
    ...}``, only the roles it names (a null entry as None); empty without
    such a file.

    Raises:
        ValueError: If the file is not JSON or a token is neither a string,
            ``{"content": string}`` nor null (naming the file and key).
    """
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        path = pathlib.Path(directory) / name
        if not path.is_file():
            continue
        try:
            config = jsonio.read(path, schema=TOKENIZER_CONFIG_SCHEMA)
        except OSError as e:
            raise ValueError(f"cannot read {path} ({e.strerror or e})") from None
        if not isinstance(config, Mapping):
            raise ValueError(f"{path} is not a JSON object")
        return {role: _token(config[f"{role}_token"])
                for role in ("bos", "eos", "pad") if f"{role}_token" in config}
    return {}


def _read_tokenizer_file(path: pathlib.Path) -> bytes:
    """The bytes of a tokenizer file, refused if larger than any tokenizer."""
    with open(path, "rb") as f:
        data = f.read(_MAX_TOKENIZER_BYTES + 1)
    if len(data) > _MAX_TOKENIZER_BYTES:
        raise ValueError(f"{path} is larger than {_MAX_TOKENIZER_BYTES:,} "
                         "bytes; it is not a tokenizer file")
    return data


def _check_ids(path: pathlib.Path, ids: Mapping[str, int | None],
               vocab_size: int) -> None:
    """Refuses special ids outside the vocabulary."""
    for role, i in ids.items():
        if i is not None and i >= 0 and i >= vocab_size:
            raise ValueError(f"{path}: the {role} id {i} is outside the "
                             f"vocabulary of {vocab_size} ids (a damaged file)")


def load_tokenizer(path: str | os.PathLike[str]
                   ) -> SentencePieceTokenizer | HFTokenizer:
    """An existing tokenizer: a SentencePiece ``.model``, a Hugging Face
    ``tokenizer.json``, or a directory holding one (``tokenizer.model``
    first), with the special tokens of a ``tokenizer_config.json`` beside
    it (and its ``add_bos``, ``chat_template`` and ``stop_ids``: see
    :func:`_read_extras`); or a ``.gguf`` file, whose metadata's tokenizer
    is written as Hugging Face files into the cache
    (:func:`subspace_jax.models.io.gguf.tokenizer_dir`).

    Raises:
        ValueError: If there is no tokenizer there, or it is damaged.
    """
    kind, file = tokenizer_file(path)
    if file.suffix.lower() == ".gguf":
        from subspace_jax.models.io import gguf  # pylint: disable=import-outside-toplevel
        file = gguf.tokenizer_dir(file) / "tokenizer.json"
    specials = special_tokens(file.parent)
    if kind == "huggingface":
        tok = HFTokenizer(file, specials)
    else:
        tok = SentencePieceTokenizer(file, specials)
    _read_extras(tok, file.parent)
    return tok


def _read_json_file(path: pathlib.Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e})") from None


def _read_extras(tok: Any, directory: pathlib.Path) -> None:
    """Sets what a checkpoint's tokenizer files say beyond the vocabulary:

    * ``add_bos``: whether examples start with BOS (``add_bos_token`` of
      ``tokenizer_config.json``; default True, LLaMA's convention);
    * ``chat_template``: the Jinja chat template (``chat_template.jinja``,
      else ``tokenizer_config.json``'s ``chat_template``; None);
    * ``stop_ids``: the ids that end a generated answer: EOS and the
      ``eos_token_id`` (one or a list) of ``generation_config.json``.
    """
    config = {}
    if (directory / "tokenizer_config.json").is_file():
        config = _read_json_file(directory / "tokenizer_config.json")
        config = config if isinstance(config, Mapping) else {}
    tok.add_bos = bool(config.get("add_bos_token", True))
    template = None
    if (directory / "chat_template.jinja").is_file():
        template = (directory / "chat_template.jinja").read_text(
            encoding="utf-8")
    else:
        template = config.get("chat_template")
        if isinstance(template, list):  # Named templates: the default one.
            template = next((t.get("template") for t in template
                             if isinstance(t, Mapping)
                             and t.get("name") == "default"), None)
    tok.chat_template = template if isinstance(template, str) else None
    stops = [tok.eos_id]
    if (directory / "generation_config.json").is_file():
        gen = _read_json_file(directory / "generation_config.json")
        eos = gen.get("eos_token_id") if isinstance(gen, Mapping) else None
        for i in eos if isinstance(eos, list) else [eos]:
            if isinstance(i, int) and 0 <= i < tok.vocab_size and i not in stops:
                stops.append(i)
    tok.stop_ids = tuple(stops)


def _train_to(path: pathlib.Path, lines: list[str], vocab_size: int,
              model_type: str) -> None:
    """Trains a SentencePiece model and writes it atomically to ``path``."""
    spm = _import_sentencepiece()
    spm.set_random_generator_seed(0)
    model = io.BytesIO()
    print(f"Training a SentencePiece {model_type} model (vocab {vocab_size}) "
          f"on {len(lines)} lines...", flush=True)
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(lines), model_writer=model,
            vocab_size=vocab_size, model_type=model_type,
            normalization_rule_name="identity", remove_extra_whitespaces=False,
            byte_fallback=True, split_digits=True, character_coverage=1.0,
            unk_id=0, bos_id=1, eos_id=2, pad_id=3, num_threads=1,
            max_sentence_length=1 << 16, minloglevel=2)
    except RuntimeError as e:
        msg = str(e).strip().splitlines()[-1] if str(e).strip() else repr(e)
        raise ValueError(f"SentencePiece training failed ({msg}); try a "
                         "smaller vocab_size or a larger corpus") from None
    cache.write_verified(path, lambda f: f.write(model.getvalue()))


def get_tokenizer(
    name: str = "byte",
    *,
    vocab_size: int = 8000,
    model_path: str | os.PathLike[str] | None = None,
    corpus: Iterable[str] | None = None,
    model_type: str = "unigram",
    cache_dir: str | os.PathLike[str] | None = None,
) -> ByteTokenizer | SentencePieceTokenizer:
    """Builds a tokenizer by name.

    Args:
        name: ``"byte"`` or ``"sentencepiece"``.
        vocab_size: SentencePiece vocabulary size when training.
        model_path: Load this SentencePiece model instead of training one.
        corpus: Texts to train SentencePiece on; defaults to the training
            split of the embedded corpus.
        model_type: SentencePiece model type when training.
        cache_dir: Cache directory for trained models.

    Returns:
        The tokenizer.

    Raises:
        ValueError: If ``name`` is unknown.
    """
    if name == "byte":
        return ByteTokenizer()
    if name in ("sentencepiece", "spm", "sp"):
        if model_path is not None:
            return SentencePieceTokenizer(model_path)
        if corpus is None:
            corpus = sources.EmbeddedCorpus(split="train").documents()
        return SentencePieceTokenizer.train(corpus, vocab_size,
                                            model_type=model_type,
                                            cache_dir=cache_dir)
    raise ValueError(f"unknown tokenizer {name!r}; use 'byte' or "
                     "'sentencepiece'")
