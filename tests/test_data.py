"""Tests for the training data pipeline and tokenizers."""

import json
import multiprocessing
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from subspace_jax import cache
from subspace_jax.data import pipeline as data
from subspace_jax.data import encoding
from subspace_jax.data import sources
from subspace_jax.data import tokenizers as tokenizer
from subspace_jax.data.pipeline import (DataError, EmbeddedCorpus, TextFiles, TfdsText,
                                        make_iterator)
from subspace_jax.data.tokenizers import ByteTokenizer

try:
    import tensorflow_datasets as tfds
except ImportError:
    tfds = None

BYTE = ByteTokenizer()
_NO_SP = "sentencepiece is not installed (pip install sentencepiece)"
_NO_TFDS = ("tensorflow-datasets/array_record are not installed "
            "(pip install tensorflow-datasets array_record)")


def _take(it, n):
    return [next(it) for _ in range(n)]


def _assert_same_batches(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x["inputs"], y["inputs"])
        np.testing.assert_array_equal(x["targets"], y["targets"])


class _Docs:
    """A source of documents held in memory (streamed or pre-tokenized)."""

    def __init__(self, docs, streaming=True, name="test docs"):
        self.docs, self.streaming, self.name = docs, streaming, name

    def open(self):
        return self.docs


def _stream(source, **kwargs):
    settings = dict(tokenizer=BYTE, process_index=0, process_count=1)
    return make_iterator(source, **{**settings, **kwargs})


def _windows(batch):
    """The packed windows of a batch: inputs plus the last target."""
    return np.concatenate([batch["inputs"], batch["targets"][:, -1:]], axis=1)


def _stream_docs(batches, tok):
    """Rebuilds the documents a streaming iterator packed (its windows do not
    overlap), in order."""
    ids = np.concatenate([row for b in batches for row in _windows(b)])
    pieces, start = [], 0
    for end in np.flatnonzero(ids == tok.eos_id):
        pieces.append(tok.decode(ids[start:end]))
        start = end + 1
    return pieces


# ---------------------------------------------------------------- tokenizers


def test_byte_tokenizer_round_trip_and_specials():
    text = "Alice \u2014 caf\u00e9 \u2603\n\tend"
    ids = BYTE.encode(text)
    assert ids == list(text.encode("utf-8"))
    assert BYTE.decode(ids) == text
    specials = {BYTE.pad_id, BYTE.bos_id, BYTE.eos_id}
    assert specials == {256, 257, 258} and BYTE.vocab_size == 259
    assert BYTE.decode([BYTE.bos_id, *ids, BYTE.eos_id]) == text
    assert isinstance(BYTE, tokenizer.Tokenizer)


def test_sentencepiece_train_is_deterministic_cached_and_loadable(tmp_path, monkeypatch):
    pytest.importorskip("sentencepiece", reason=_NO_SP)
    texts = EmbeddedCorpus(split="all").documents()[:40]
    tok_a = tokenizer.SentencePieceTokenizer.train(texts, 400, cache_dir=tmp_path / "a")
    tok_b = tokenizer.SentencePieceTokenizer.train(texts, 400, cache_dir=tmp_path / "b")
    assert tok_a.model_path.read_bytes() == tok_b.model_path.read_bytes()
    assert tok_a.model_path.parent == tmp_path / "a" / "tokenizers"
    assert (tok_a.vocab_size, tok_a.bos_id, tok_a.eos_id) == (400, 1, 2)

    # A second request hits the cache instead of training.
    def no_training(*args, **kwargs):
        raise AssertionError("trained again instead of using the cache")
    monkeypatch.setattr(tokenizer, "_train_to", no_training)
    again = tokenizer.get_tokenizer("sentencepiece", vocab_size=400, corpus=texts,
                                    cache_dir=tmp_path / "a")
    assert again.model_path == tok_a.model_path
    with pytest.raises(AssertionError, match="cache"):  # Other key: must train.
        tokenizer.SentencePieceTokenizer.train(texts, 401, cache_dir=tmp_path / "a")

    loaded = tokenizer.get_tokenizer("sentencepiece", model_path=tok_a.model_path)
    text = "  Alice   said: \u00abcaf\u00e9\u00bb \u2603\n\n123"
    ids = loaded.encode(text)
    assert ids == tok_a.encode(text)
    assert all(0 <= i < 400 for i in ids) and len(ids) < len(text.encode())
    assert loaded.decode(ids + [loaded.eos_id]) == text


def test_sentencepiece_missing_names_the_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "sentencepiece", None)
    with pytest.raises(ImportError, match="pip install sentencepiece"):
        tokenizer.SentencePieceTokenizer("any.model")


def test_sentencepiece_bad_arguments(tmp_path):
    pytest.importorskip("sentencepiece", reason=_NO_SP)
    with pytest.raises(FileNotFoundError, match="not found"):
        tokenizer.SentencePieceTokenizer(tmp_path / "missing.model")
    with pytest.raises(ValueError, match="vocab_size must be >= 300"):
        tokenizer.SentencePieceTokenizer.train(["some text"], 100, cache_dir=tmp_path)
    with pytest.raises(ValueError, match="empty corpus"):
        tokenizer.SentencePieceTokenizer.train(["", "  \n"], 400, cache_dir=tmp_path)
    with pytest.raises(ValueError, match="unknown tokenizer"):
        tokenizer.get_tokenizer("wordpiece")


def test_default_cache_dir_env_override(monkeypatch, tmp_path):
    monkeypatch.setenv("SUBSPACE_JAX_CACHE_DIR", str(tmp_path / "c"))
    assert cache.default_cache_dir() == tmp_path / "c"
    monkeypatch.delenv("SUBSPACE_JAX_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert cache.default_cache_dir() == tmp_path / "x" / "subspace_jax"


# ------------------------------------------------------------ embedded corpus


def test_embedded_corpus_is_english_prose_with_held_out_split():
    every = EmbeddedCorpus(split="all").documents()
    train = EmbeddedCorpus(split="train").documents()
    valid = EmbeddedCorpus(split="validation").documents()
    assert len(every) == 174
    assert train + valid == every
    assert len(valid) == round(0.05 * len(every))
    text = "\n\n".join(every)
    assert len(text) > 350_000
    words = text.lower().split()
    common = {"the", "and", "to", "a", "of", "i", "it", "she", "in", "was"}
    assert sum(w in common for w in words) / len(words) > 0.2
    assert "Alice was beginning to get very tired" in every[0]
    assert "Kiyo" in valid[-1]
    assert all(len(d) > 100 for d in every)
    assert "Gutenberg" not in text
    with pytest.raises(DataError, match="split must be"):
        EmbeddedCorpus(split="test").documents()


# ------------------------------------------------------------ packed pipeline


def test_batches_are_shifted_windows_of_the_token_stream(tmp_path):
    docs = EmbeddedCorpus(split="train").documents()
    stream = encoding.tokenize_documents(docs, BYTE)["tokens"]
    assert np.count_nonzero(stream == BYTE.eos_id) == len(docs)
    it = make_iterator("embedded", BYTE, seq_len=64, batch_size=4, shuffle=False,
                       process_index=0, process_count=1, cache_dir=tmp_path)
    for step, batch in enumerate(_take(it, 3)):
        assert batch["inputs"].shape == batch["targets"].shape == (4, 64)
        assert batch["inputs"].dtype == batch["targets"].dtype == np.int32
        for row in range(4):
            start = (step * 4 + row) * 64
            np.testing.assert_array_equal(batch["inputs"][row], stream[start:start + 64])
            np.testing.assert_array_equal(batch["targets"][row], stream[start + 1:start + 65])


def test_each_epoch_visits_every_window_once_in_a_new_order():
    seq_len, batch = 10, 4
    tokens = np.arange(253, dtype=np.int32)  # 25 windows -> 6 steps, 1 dropped.
    def windows(seed):
        return _stream(_Docs([tokens], streaming=False), seq_len=seq_len,
                       batch_size=batch, seed=seed, num_epochs=2,
                       encoder=lambda doc: {"tokens": doc})
    it = windows(3)
    assert it.steps_per_epoch == 6
    batches = list(it)
    assert len(batches) == 12
    for b in batches:  # Rows are contiguous windows starting at multiples of L.
        np.testing.assert_array_equal(b["targets"] - b["inputs"], 1)
        assert np.all(b["inputs"][:, 0] % seq_len == 0)
    epochs = [np.concatenate([b["inputs"][:, 0] // seq_len for b in batches[i:i + 6]])
              for i in (0, 6)]
    for e in epochs:
        assert len(set(e.tolist())) == 24 and set(e.tolist()) <= set(range(25))
    assert not np.array_equal(epochs[0], epochs[1])
    _assert_same_batches(batches, list(windows(3)))
    other = next(windows(5))
    assert not np.array_equal(other["inputs"], batches[0]["inputs"])


def test_packed_state_resumes_exactly_across_epochs(tmp_path):
    kwargs = dict(seq_len=512, batch_size=32, seed=7, process_index=0,
                  process_count=1, cache_dir=tmp_path)
    first = make_iterator("embedded", BYTE, **kwargs)
    assert first.steps_per_epoch == 22
    _take(first, 19)
    state = json.loads(json.dumps(first.get_state()))
    assert state["batch"] == 19
    expected = _take(first, 6)  # Crosses into epoch 1.
    second = make_iterator("embedded", BYTE, **kwargs)
    second.set_state(state)
    _assert_same_batches(_take(second, 6), expected)

    other = make_iterator("embedded", BYTE, **{**kwargs, "seq_len": 256})
    with pytest.raises(DataError, match="different data or settings"):
        other.set_state(state)
    with pytest.raises(DataError, match="get_state"):
        second.set_state({"epoch": 0})
    with pytest.raises(DataError, match="int >= 0"):
        second.set_state({**state, "batch": -1})


def test_processes_split_the_global_batch(tmp_path):
    kwargs = dict(seq_len=32, batch_size=8, seed=1, cache_dir=tmp_path)
    whole = _take(make_iterator("embedded", BYTE, process_index=0, process_count=1,
                                **kwargs), 3)
    parts = [_take(make_iterator("embedded", BYTE, process_index=p, process_count=4,
                                 **kwargs), 3) for p in range(4)]
    for step in range(3):
        rows = [part[step]["inputs"] for part in parts]
        assert all(r.shape == (2, 32) for r in rows)
        np.testing.assert_array_equal(np.concatenate(rows), whole[step]["inputs"])
        assert len({r.tobytes() for part in rows for r in part}) == 8


def test_default_process_info_comes_from_jax(tmp_path):
    it = make_iterator(EmbeddedCorpus("validation"), BYTE, seq_len=16, batch_size=2,
                       cache_dir=tmp_path)
    assert next(it)["inputs"].shape == (2, 16)  # One process: the whole batch.


def test_tokens_are_cached_on_disk(tmp_path, monkeypatch):
    kwargs = dict(seq_len=64, batch_size=4, process_index=0, process_count=1,
                  cache_dir=tmp_path)
    first = next(make_iterator("embedded", BYTE, **kwargs))
    assert len(list((tmp_path / "tokens").glob("*.npy"))) == 1

    def no_tokenizing(*args, **kwargs):
        raise AssertionError("tokenized again instead of using the cache")
    monkeypatch.setattr(encoding, "tokenize_documents", no_tokenizing)
    _assert_same_batches([next(make_iterator("embedded", BYTE, **kwargs))], [first])
    with pytest.raises(AssertionError, match="cache"):  # Other data: a miss.
        make_iterator(EmbeddedCorpus("validation"), BYTE, **kwargs)


def test_validation_pass_is_finite_and_in_order(tmp_path):
    it = make_iterator(EmbeddedCorpus("validation"), BYTE, seq_len=128, batch_size=4,
                       shuffle=False, num_epochs=1, process_index=0,
                       process_count=1, cache_dir=tmp_path)
    batches = list(it)
    assert len(batches) == it.steps_per_epoch > 0
    text = BYTE.decode(np.concatenate([b["inputs"].ravel() for b in batches]))
    assert text.startswith(EmbeddedCorpus("validation").documents()[0][:200])


# ---------------------------------------------------------------- local files


def test_text_files_documents_and_paragraph_rule(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "b.txt").write_text("Second file.\r\n\r\nSame file, next block.\n")
    (tmp_path / "a.txt").write_text("First file, para one.\n \t\nPara two.\n\n\n")
    (tmp_path / "sub" / "c.txt").write_text("Nested.")
    (tmp_path / "empty.txt").write_text("  \n\n")
    pattern = str(tmp_path / "**" / "*.txt")
    assert TextFiles(pattern).documents() == [
        "First file, para one.\n \t\nPara two.",
        "Second file.\n\nSame file, next block.",
        "Nested."]
    paragraphs = TextFiles(pattern, paragraphs=True).documents()
    assert paragraphs == ["First file, para one.", "Para two.", "Second file.",
                          "Same file, next block.", "Nested."]
    held = TextFiles(pattern, paragraphs=True, split="validation",
                     holdout_fraction=0.4).documents()
    assert held == ["Same file, next block.", "Nested."]


def test_text_files_feed_the_pipeline(tmp_path):
    docs = EmbeddedCorpus(split="all").documents()[:12]
    for i, doc in enumerate(docs):
        (tmp_path / f"doc{i:02d}.txt").write_text(doc)
    it = make_iterator(f"files:{tmp_path}/*.txt", BYTE, seq_len=100, batch_size=5,
                       shuffle=False, process_index=0, process_count=1,
                       cache_dir=tmp_path / "cache")
    batch = next(it)
    np.testing.assert_array_equal(batch["inputs"][0], BYTE.encode(docs[0][:100]))
    packed = np.concatenate([r for b in _take(it, 20) for r in b["inputs"]])
    assert np.count_nonzero(packed == BYTE.eos_id) >= 2


@pytest.mark.parametrize("make, match", [
    (lambda d: TextFiles(str(d / "nothing*.txt")), "matches nothing"),
    (lambda d: TextFiles(str(d / "*")), "matches only directories"),
    (lambda d: TextFiles(str(d / "blank.txt")), "no non-empty document"),
    (lambda d: TextFiles(str(d / "binary.bin")), "not UTF-8"),
    (lambda d: TextFiles(str(d / "locked.txt")), "cannot read"),
    (lambda d: TextFiles(str(d / "one.txt"), split="train"), "too few to hold out"),
])
def test_bad_local_files_give_one_line_errors(tmp_path, monkeypatch, make, match):
    (tmp_path / "folder").mkdir()
    files = tmp_path / "files"
    files.mkdir()
    (files / "blank.txt").write_text("\n \n")
    (files / "binary.bin").write_bytes(b"ok \xff\xfe bad")
    (files / "locked.txt").write_text("secret")
    (files / "one.txt").write_text("just one document")
    real_read = pathlib.Path.read_text

    def read_text(self, *args, **kwargs):  # Root can read a chmod-000 file.
        if self.name == "locked.txt":
            raise PermissionError(13, "Permission denied", str(self))
        return real_read(self, *args, **kwargs)
    monkeypatch.setattr(pathlib.Path, "read_text", read_text)
    root = tmp_path if "directories" in match else files
    with pytest.raises(DataError, match=match) as info:
        make_iterator(make(root), BYTE, seq_len=8, batch_size=1, process_index=0,
                      process_count=1, cache_dir=tmp_path)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("kwargs, match", [
    (dict(seq_len=0), "seq_len must be an int >= 1"),
    (dict(batch_size=0), "batch_size must be an int >= 1"),
    (dict(batch_size=6, process_count=4, process_index=1), "multiple of 4"),
    (dict(process_index=2, process_count=2), "process_index must be in"),
    (dict(process_count=None), "give both process_index and process_count"),
    (dict(num_epochs=0), "num_epochs must be"),
    (dict(workers=-1), "workers must be an int >= 0"),
    (dict(seq_len=4096, batch_size=128), "too small.*lower batch_size or seq_len"),
])
def test_bad_settings_give_one_line_errors(tmp_path, kwargs, match):
    settings = dict(seq_len=16, batch_size=2, process_index=0, process_count=1,
                    cache_dir=tmp_path)
    settings = {k: v for k, v in {**settings, **kwargs}.items() if v is not None}
    with pytest.raises(DataError, match=match) as info:
        make_iterator("embedded", BYTE, **settings)
    assert "\n" not in str(info.value)


def test_source_specs():
    assert data.source_from_spec("embedded") == EmbeddedCorpus("train")
    assert data.source_from_spec("paragraphs:x/*.txt", split="train") == TextFiles(
        "x/*.txt", paragraphs=True, split="train")
    assert data.source_from_spec("tfds:c4/en", data_dir="/d") == TfdsText(
        "c4/en", data_dir="/d")
    with pytest.raises(DataError, match="unknown data source"):
        data.source_from_spec("hub:c4")


# -------------------------------------------------------- streaming pipeline


def _numbered_docs(n):
    return [f"Document {i}: " + "word " * (5 + i % 7) for i in range(n)]


def test_streaming_processes_cover_the_documents_once_per_epoch():
    docs = _numbered_docs(30)
    epochs = {0: [], 1: []}
    for p in range(3):
        with _stream(_Docs(docs), seq_len=16, batch_size=6, seed=2,
                     process_index=p, process_count=3) as it:
            batches = _take(it, 40)  # More than two epochs of this process's data.
        assert all(b["inputs"].shape == (2, 16) for b in batches)
        for b in batches:
            np.testing.assert_array_equal(b["inputs"][:, 1:], b["targets"][:, :-1])
        pieces = _stream_docs(batches, BYTE)
        assert len(pieces) >= 20
        epochs[0].append(pieces[:10])
        epochs[1].append(pieces[10:20])
    for shares in epochs.values():  # Disjoint shares that cover all documents.
        assert sorted(sum(shares, [])) == sorted(docs)
    assert epochs[0][0] != docs[0:30:3]  # Shuffled ...
    assert epochs[0][0] != epochs[1][0]  # ... anew each epoch.


def test_streaming_state_resumes_exactly():
    docs = _numbered_docs(25)
    kwargs = dict(seq_len=8, batch_size=4, seed=9, process_index=1, process_count=2)
    with _stream(_Docs(docs), **kwargs) as first:
        _take(first, 37)
        state = json.loads(json.dumps(first.get_state()))
        expected = _take(first, 30)  # Crosses an epoch (~10 batches each).
    with _stream(_Docs(docs), **kwargs) as second:
        second.set_state(state)
        _assert_same_batches(_take(second, 30), expected)
        with pytest.raises(DataError, match="does not fit this pipeline"):
            second.set_state({**state, "grain": {"no": "state"}})
    with _stream(_Docs(docs), **{**kwargs, "process_index": 0}) as third:
        with pytest.raises(DataError, match="different data or settings"):
            third.set_state(state)


def test_streaming_too_small_or_too_few_documents():
    with pytest.raises(DataError, match="fewer than the 4 processes"):
        _stream(_Docs(["a", "b"]), seq_len=4, batch_size=4, process_index=0,
                process_count=4)
    with pytest.raises(DataError, match="too small: the 2 document.*at most 14 "
                       "tokens.*batch \\(8 x 65\\)") as info:
        _stream(_Docs(["tiny", "docs"]), seq_len=64, batch_size=8)
    assert "\n" not in str(info.value)
    with _stream(_Docs(_numbered_docs(10)), seq_len=8, batch_size=2,
                 shuffle=False, num_epochs=1) as finite:
        batches = list(finite)
    pieces = _stream_docs(batches, BYTE)
    # The last, padded window is dropped: the documents are all there but
    # the last few.
    assert 5 <= len(pieces) < 10 and pieces == _numbered_docs(10)[:len(pieces)]


def _fields(doc):
    """A synthetic encoder: per-token fields beside the tokens, as a loss
    mask would be: the token doubled plus one, and its position in its
    document."""
    tokens = np.asarray([*BYTE.encode(doc), BYTE.eos_id], np.int32)
    return {"tokens": tokens, "double": 2 * tokens + 1,
            "position": np.arange(len(tokens), dtype=np.int32)}


@pytest.mark.parametrize("streaming", [False, True])
def test_extra_fields_pass_through_packing_aligned_with_targets(streaming):
    docs = _numbered_docs(12)
    with _stream(_Docs(docs, streaming=streaming), seq_len=16, batch_size=4,
                 seed=1, encoder=_fields) as it:
        batches = _take(it, 12)
    for b in batches:
        assert set(b) == {"inputs", "targets", "double", "position"}
        assert b["double"].shape == b["targets"].shape == (4, 16)
        np.testing.assert_array_equal(b["double"], 2 * b["targets"] + 1)
        # Positions count up inside a document and restart after its EOS.
        pos, eos = b["position"], b["targets"] == BYTE.eos_id
        np.testing.assert_array_equal(pos[:, 1:], np.where(eos[:, :-1], 0, pos[:, :-1] + 1))
    bad = lambda doc: {"tokens": np.arange(3), "mask": np.ones(2)}
    with pytest.raises(DataError, match="field 'mask' of document 0.*shape \\(2,\\)"):
        next(_stream(_Docs(docs, streaming=streaming), seq_len=4, batch_size=2,
                     encoder=bad))


class _Unreadable:
    """Documents of which one cannot be read (a shard that fails)."""

    def __init__(self, docs, bad):
        self.docs, self.bad = docs, bad

    def __len__(self):
        return len(self.docs)

    def __getitem__(self, index):
        if index == self.bad:
            raise OSError(f"cannot open shard-00003.array_record for record {index}")
        return self.docs[index]


def test_worker_processes_resume_exactly_report_bad_documents_and_stop():
    """One grain worker: the same batches after a resume, a read failure in
    the worker as a one-line DataError naming the document, and no process
    left once the iterators are closed."""
    docs = _numbered_docs(400)
    kwargs = dict(seq_len=16, batch_size=4, seed=3, workers=1)
    with _stream(_Docs(docs), **kwargs) as first:
        _take(first, 3)
        state = json.loads(json.dumps(first.get_state()))
        expected = _take(first, 4)
        assert multiprocessing.active_children()
        first.set_state(state)  # Restarts its worker at the position.
        _assert_same_batches(_take(first, 4), expected)
    with _stream(_Docs(_Unreadable(docs, bad=5)), shuffle=False, **kwargs) as it:
        with pytest.raises(DataError, match="cannot read document 5 of test docs "
                           "\\(OSError: cannot open shard-00003") as info:
            _take(it, 50)
    assert "\n" not in str(info.value)
    assert not multiprocessing.active_children()


# ----------------------------------------------------------------------- TFDS


_TFDS_TRAIN = EmbeddedCorpus(split="all").documents()[:24]
_TFDS_VALID = EmbeddedCorpus(split="all").documents()[24:30]

if tfds is not None:

    class SubspaceJaxTinyProse(tfds.core.GeneratorBasedBuilder):
        """A tiny real TFDS dataset written by the test; text key 'content'."""

        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            return tfds.core.DatasetInfo(
                builder=self,
                features=tfds.features.FeaturesDict({
                    "content": tfds.features.Text(),
                    "title": tfds.features.Text(),
                    "number": np.int64,
                }))

        def _split_generators(self, dl_manager):
            del dl_manager
            return {"train": self._generate_examples(_TFDS_TRAIN),
                    "validation": self._generate_examples(_TFDS_VALID)}

        def _generate_examples(self, docs):
            for i, doc in enumerate(docs):
                yield i, {"content": doc, "title": f"Title {i}", "number": i}


def test_tfds_dataset_through_data_source(tmp_path):
    pytest.importorskip("tensorflow_datasets", reason=_NO_TFDS)
    pytest.importorskip("array_record", reason=_NO_TFDS)
    data_dir = str(tmp_path / "tfds")
    SubspaceJaxTinyProse(data_dir=data_dir, file_format="array_record").download_and_prepare()
    name = "subspace_jax_tiny_prose"

    source = TfdsText(name, data_dir=data_dir, split="train", text_key="content")
    it = make_iterator(source, BYTE, seq_len=64, batch_size=4, seed=0,
                       process_index=0, process_count=1)
    batches = _take(it, 500)  # Two epochs of ~55 KB.
    assert batches[0]["inputs"].shape == (4, 64)
    pieces = _stream_docs(batches, BYTE)
    assert sorted(pieces[:24]) == sorted(_TFDS_TRAIN)
    assert pieces[:24] != pieces[24:48]  # Reshuffled for epoch 1.

    state = it.get_state()
    expected = _take(it, 5)
    resumed = make_iterator(source, BYTE, seq_len=64, batch_size=4, seed=0,
                            process_index=0, process_count=1)
    resumed.set_state(state)
    _assert_same_batches(_take(resumed, 5), expected)

    valid = make_iterator(TfdsText(name, data_dir, "validation", "content"), BYTE,
                          seq_len=64, batch_size=2, shuffle=False, num_epochs=1,
                          process_index=0, process_count=1)
    pieces = _stream_docs(list(valid), BYTE)
    stored = [r["content"].decode() for r in tfds.data_source(  # Written shuffled.
        name, split="validation", data_dir=data_dir, download=False)]
    assert sorted(stored) == sorted(_TFDS_VALID)
    assert pieces == stored[:len(pieces)] and len(pieces) >= 5

    titles = TfdsText(name, data_dir, "validation", text_key="title").open()
    assert sorted(titles[i] for i in range(len(titles))) == [f"Title {i}" for i in range(6)]

    # A damaged shard: the read fails in the pipeline, naming the document.
    shard = next((tmp_path / "tfds").glob("**/*-train.array_record-*"))
    damaged = bytearray(shard.read_bytes())
    damaged[100:2000] = bytes(1900)
    shard.write_bytes(bytes(damaged))
    with pytest.raises(DataError, match=f"cannot read document \\d+ of {name} "
                       "\\(RuntimeError: .*repair or rebuild") as info:
        with make_iterator(source, BYTE, seq_len=64, batch_size=4, seed=0,
                           process_index=0, process_count=1) as broken:
            _take(broken, 500)
    assert "\n" not in str(info.value)

    for bad, match in [(TfdsText(name, data_dir), "no feature 'text'.*content"),
                       (TfdsText(name, data_dir, "test", "content"), "bad split"),
                       (TfdsText("no_such_dataset_xyz", data_dir), "not found")]:
        with pytest.raises(DataError, match=match) as info:
            make_iterator(bad, BYTE, seq_len=8, batch_size=1, process_index=0,
                          process_count=1)
        assert "\n" not in str(info.value)


def test_tfds_text_that_is_not_utf8_names_the_document():
    records = [{"text": "fine".encode()}, {"text": b"bad \xff byte"}]
    column = sources._TextColumn(records, "text", "tfds:some/set (train)")
    assert column[0] == "fine"
    with pytest.raises(DataError, match="document 1 of tfds:some/set \\(train\\) is "
                       "not UTF-8 text \\(bad byte at offset 4\\)"):
        column[1]


def test_tfds_missing_names_the_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)
    with pytest.raises(ImportError, match="pip install tensorflow-datasets"):
        TfdsText("c4/en").open()


# ----------------------------------------------------------------------------
# The token cache is verified before use (issue 20)
# ----------------------------------------------------------------------------


def _corpus(directory):
    """Twelve documents of the embedded corpus as text files."""
    folder = directory / "corpus"
    folder.mkdir()
    for i, doc in enumerate(EmbeddedCorpus(split="all").documents()[:12]):
        (folder / f"doc{i:02d}.txt").write_text(doc[:3000])
    return folder


def _flip_middle(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # One id becomes ~65000: not a byte id.
    path.write_bytes(bytes(data))


def _truncate_half(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


@pytest.mark.parametrize("damage", [_flip_middle, _truncate_half],
                         ids=["flipped", "truncated"])
def test_a_damaged_token_cache_is_rebuilt_naming_the_file(tmp_path, capsys,
                                                          damage):
    """Flipped bytes gave out-of-vocabulary ids (a misleading non-finite
    stop), a truncated file "mmap length is greater than file size"."""
    docs = TextFiles(str(_corpus(tmp_path) / "*.txt"))
    kwargs = dict(seq_len=16, batch_size=2, cache_dir=tmp_path / "cache",
                  shuffle=False, process_index=0, process_count=1)
    first = make_iterator(docs, BYTE, **kwargs)
    want = next(first)
    first.close()
    [path] = (tmp_path / "cache" / "tokens").glob("*.npy")
    damage(path)
    capsys.readouterr()
    again = make_iterator(docs, BYTE, **kwargs)
    got = next(again)
    again.close()
    err = capsys.readouterr().err
    assert f"warning: token cache {path} is damaged (" in err, err
    assert err.strip().endswith("rebuilding it")
    np.testing.assert_array_equal(got["inputs"], want["inputs"])
    assert encoding.cache.damage(path) is None  # Rebuilt, and whole again.


def test_ids_outside_the_vocabulary_are_not_taken_from_the_cache(tmp_path,
                                                                 capsys):
    """A cache whose manifest matches (written so) but whose ids are not
    the tokenizer's: the id range is checked too."""
    docs = TextFiles(str(_corpus(tmp_path) / "*.txt"))
    kwargs = dict(seq_len=16, batch_size=2, cache_dir=tmp_path / "cache",
                  process_index=0, process_count=1)
    make_iterator(docs, BYTE, **kwargs).close()
    [path] = (tmp_path / "cache" / "tokens").glob("*.npy")
    tokens = np.load(path)
    tokens[3] = 4000
    encoding.cache.write_verified(path, lambda f: np.save(f, tokens))
    capsys.readouterr()
    make_iterator(docs, BYTE, **kwargs).close()
    assert "ids outside the vocabulary of 259 (" in capsys.readouterr().err
    assert np.load(path).max() < 259


def test_a_long_single_line_document_is_encoded_without_lists(tmp_path):
    """A 20 MB document of one line: encoding a 50 MB one took about 950 MB
    more before (a Python list of its ids, 36 bytes an id)."""
    script = f'''
import pathlib, resource
from subspace_jax.data import pipeline as data
path = pathlib.Path({str(tmp_path)!r})
(path / "big.txt").write_text(("word " * 4_000_000)[:20_000_000])
src = data.source_from_spec(f"files:{{path}}/big.txt")
docs = src.open()
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
it = data.make_iterator(src, data.ByteTokenizer(), seq_len=64, batch_size=4,
                        cache_dir=path / "cache", process_index=0,
                        process_count=1)
next(it)
it.close()
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)
'''
    out = subprocess.run([sys.executable, "-c", script], capture_output=True,
                         text=True, check=True,
                         env=dict(os.environ, JAX_PLATFORMS="cpu"))
    added_mb = int(out.stdout.split()[-1]) / 1024
    # The text's UTF-8 bytes (20 MB, for its ids and for the cache key) and
    # its uint16 ids (40 MB): a few bytes a byte, where the list took 36.
    assert added_mb < 160, added_mb
