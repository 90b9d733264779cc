"""Corpus finding, splitting, tokenizing and caching."""

from __future__ import annotations

import os
import time

import numpy as np
import pytest
from bench_helpers import keep_torch_threads, write_corpus  # noqa: F401 - a fixture

from blockopt.bench import data
from blockopt.bench.errors import BenchInputError


def test_split_is_a_deterministic_partition_cut_at_newlines():
    text = b"".join(f"line {i} {'x' * (i % 37)}\n".encode() for i in range(20000))
    train, val = data.split_chunks(text, 0.1)
    assert data.split_chunks(text, 0.1) == (train, val)
    # every chunk ends at a newline, and together they are the text, each byte once
    assert all(c.endswith(b"\n") for c in train + val)
    assert b"".join(sorted(train + val, key=text.index)) == text
    frac = sum(map(len, val)) / len(text)
    assert 0.07 < frac < 0.13
    # interleaved: held-out chunks come from the whole text, not only its end
    first_val = text.index(val[0])
    assert first_val < len(text) * 0.2


def test_tiny_text_still_holds_something_out():
    train, val = data.split_chunks(b"a\nb\nc\n", 0.1)
    assert val and train and b"".join(train + val).count(b"\n") == 3


def test_default_source_is_the_stdlib_capped_and_stable():
    a = data.resolve_source(None)
    b = data.resolve_source(None)
    assert a.default and a.files and a.files == b.files and a.key == b.key
    assert a.max_bytes == data.DEFAULT_MAX_BYTES and a.used_bytes <= data.DEFAULT_MAX_BYTES
    assert all(p.suffix == ".py" for p in a.files)
    assert not any({"test", "tests", "site-packages"} & set(p.parts) for p in a.files)
    assert os.path.dirname(os.__file__) in a.description or "standard library" in a.description


def test_folder_and_glob_sources(tmp_path):
    (tmp_path / "d" / "sub").mkdir(parents=True)
    write_corpus(tmp_path / "d" / "b.txt", lines=10)
    write_corpus(tmp_path / "d" / "sub" / "a.md", lines=10, seed=1)
    (tmp_path / "d" / "blob.bin").write_bytes(b"\x00\x01\x02" * 100)  # binary: skipped
    (tmp_path / "d" / ".hidden").write_text("secret")  # hidden: skipped
    src = data.resolve_source(tmp_path / "d")
    assert [p.name for p in src.files] == ["b.txt", "a.md"]
    g = data.resolve_source(str(tmp_path / "d" / "**" / "*.md"))
    assert [p.name for p in g.files] == ["a.md"]


def test_cache_key_follows_the_files(tmp_path):
    f = write_corpus(tmp_path / "c.txt", lines=50)
    k1 = data.resolve_source(f).key
    assert data.resolve_source(f).key == k1
    time.sleep(0.01)
    f.write_text(f.read_text() + "more\n")
    assert data.resolve_source(f).key != k1
    assert data.resolve_source(f, max_bytes=100).key != data.resolve_source(f).key


def test_byte_corpus_round_trip_and_cache(tmp_path):
    f = write_corpus(tmp_path / "c.txt", lines=400)
    src = data.resolve_source(f)
    c1 = data.load_corpus(src, cache_dir=tmp_path / "cache")
    assert not c1.from_cache and c1.vocab_size == 256
    text = f.read_bytes()
    assert c1.train.size + c1.val.size == len(text)
    assert bytes(np.asarray(c1.val[:200], dtype=np.uint8)) in text
    c2 = data.load_corpus(src, cache_dir=tmp_path / "cache")
    assert c2.from_cache and c2.cache_path == c1.cache_path
    np.testing.assert_array_equal(np.asarray(c2.train), np.asarray(c1.train))
    np.testing.assert_array_equal(np.asarray(c2.val), np.asarray(c1.val))


def test_max_bytes_caps_at_a_newline(tmp_path):
    f = write_corpus(tmp_path / "c.txt", lines=400)
    c = data.load_corpus(data.resolve_source(f, max_bytes=1000), cache_dir=tmp_path / "cache")
    assert c.train.size + c.val.size <= 1000
    assert c.train_bytes + c.val_bytes == f.read_bytes()[:1000].rfind(b"\n") + 1


def test_bpe_is_trained_on_training_text_and_cached(tmp_path):
    pytest.importorskip("tokenizers")
    f = write_corpus(tmp_path / "c.txt", lines=600)
    src = data.resolve_source(f)
    c = data.load_corpus(src, tokenizer="bpe", vocab_size=300, cache_dir=tmp_path / "cache")
    assert c.tokenizer == "bpe" and 256 < c.vocab_size <= 300
    assert int(np.max(c.train)) < c.vocab_size
    assert c.train.size < c.train_bytes / 1.5  # merges compress this repetitive text
    assert (c.cache_path / "tokenizer.json").is_file()
    again = data.load_corpus(src, tokenizer="bpe", vocab_size=300, cache_dir=tmp_path / "cache")
    assert again.from_cache and again.vocab_size == c.vocab_size
    # the same text is held out as with bytes
    b = data.load_corpus(src, cache_dir=tmp_path / "cache")
    assert b.val_bytes == c.val_bytes


@pytest.mark.parametrize("spec, msg", [
    ("nope.txt", "no such file or folder"),
    ("", "empty path"),
    ("*.none", "matches no files"),
])
def test_bad_sources(tmp_path, spec, msg):
    with pytest.raises(BenchInputError, match=msg):
        data.resolve_source(str(tmp_path / spec) if spec else spec)


def test_batches_depend_on_the_seed_only():
    a = data.train_batches(10_000, steps=5, batch_size=3, context=16, seed=7)
    b = data.train_batches(10_000, steps=5, batch_size=3, context=16, seed=7)
    c = data.train_batches(10_000, steps=5, batch_size=3, context=16, seed=8)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    assert a.shape == (5, 3) and a.min() >= 0 and a.max() <= 10_000 - 17
    tokens = np.arange(10_000, dtype=np.uint16)
    x, y = data.get_batch(tokens, a[0], 16)
    assert x.shape == y.shape == (3, 16) and (y - x == 1).all()


def test_eval_windows_spread_over_the_split():
    w = data.eval_windows(1000, n_windows=5, context=10)
    assert w[0] == 0 and w[-1] == 1000 - 11 and len(w) == 5
    with pytest.raises(BenchInputError, match="--context"):
        data.eval_windows(10, n_windows=5, context=10)
