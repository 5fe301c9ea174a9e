"""Corpora: the built-in language, WikiText-2 files, hub errors, bad files and the token cache."""

from __future__ import annotations

import itertools
import re
import time
from pathlib import Path

import numpy as np
import pytest

from stso_env.errors import DataError
from stso_env.train import corpus
from stso_env.train.corpus import (
    TokenSplits,
    check_length,
    default_cache_dir,
    generate_builtin_text,
    load_corpus,
    split_documents,
    validation_windows,
)
from stso_env.train.tokenizer import Tokenizer, build_tokenizer

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
WIKI = DATA / "wikitext-2"
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def byte() -> Tokenizer:
    return build_tokenizer("byte")


@pytest.fixture(scope="module")
def gpt2() -> Tokenizer:
    return build_tokenizer(str(DATA / "gpt2-tokenizer"))


def entropy_bits(counts: np.ndarray) -> float:
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log2(p)).sum())


def conditional_entropy_bits(data: np.ndarray, k: int) -> float:
    """Plug-in H(next byte | previous k bytes) = H(k+1 gram) - H(k gram)."""
    ctx = np.zeros(len(data) - k, dtype=np.int64)
    for i in range(k):
        ctx = ctx * 256 + data[i : len(data) - k + i]
    joint = ctx * 256 + data[k:]
    return entropy_bits(np.unique(joint, return_counts=True)[1]) - entropy_bits(np.unique(ctx, return_counts=True)[1])


# ------------------------------------------------------------------ built-in text


def test_builtin_deterministic() -> None:
    a = generate_builtin_text(7, 20_000)
    assert len(a) == 20_000
    assert a == generate_builtin_text(7, 20_000)
    assert a != generate_builtin_text(8, 20_000)
    assert a != generate_builtin_text(7, 20_000, stream=1)
    # A shorter request is a prefix of a longer one.
    assert generate_builtin_text(7, 50_000).startswith(a)
    assert generate_builtin_text(7, 0) == ""
    # Pinned start: fails if the lexicon or the grammar changes without a version bump.
    assert generate_builtin_text(0, 40) == "Plour ourtlourvaren nontondon task chous"


def test_builtin_shape() -> None:
    text = generate_builtin_text(0, 100_000)
    paragraphs = text.split("\n\n")
    assert len(paragraphs) > 50
    for para in paragraphs[:-1]:
        assert para.endswith("."), para[-40:]
        assert "\n" not in para
        sentences = re.split(r"(?<=\.) ", para)
        assert 3 <= len(sentences) <= 8
        assert all(s[0].isupper() and s.endswith(".") for s in sentences)
    words = [w.strip(".,").lower() for w in text.split()]
    assert len(set(words)) > 1000
    # Zipfian: the most frequent word is far more common than the median word.
    counts = np.sort(np.unique(words, return_counts=True)[1])[::-1]
    assert counts[0] > 20 * counts[len(counts) // 2]


def test_builtin_has_structure() -> None:
    data = np.frombuffer(generate_builtin_text(3, 300_000).encode("utf-8"), dtype=np.uint8)
    h1 = entropy_bits(np.bincount(data))
    h3 = conditional_entropy_bits(data, 3)
    shuffled = np.random.default_rng(0).permutation(data)
    h3_shuffled = conditional_entropy_bits(shuffled, 3)
    assert 3.8 < h1 < 4.6
    assert h3 < h1 - 2.0
    # The shuffled copy has the same unigram counts and the same estimator bias,
    # so the gap is structure, not sample size.
    assert h3 < h3_shuffled - 1.2


def test_builtin_generation_speed() -> None:
    start = time.perf_counter()
    text = generate_builtin_text(11, 2_000_000)
    assert len(text) == 2_000_000
    assert time.perf_counter() - start < 3.0


def test_builtin_load_counts(byte: Tokenizer, tmp_path: Path) -> None:
    splits = load_corpus("builtin", byte, seed=5, builtin_chars=30_000, valid_fraction=0.1, cache_dir=tmp_path)
    train_text = generate_builtin_text(5, 30_000)
    valid_text = generate_builtin_text(5, 3_000, stream=1)
    # Each "\n\n" loses its blank line and the paragraph's newline becomes eos; the
    # cut-off last paragraph gets one eos more.
    assert len(splits.train) == len(train_text.encode()) - train_text.count("\n\n") + 1
    assert int((splits.train == byte.eos_id).sum()) == train_text.count("\n\n") + 1
    assert byte.decode(splits.valid[:200]) == valid_text[:200]
    assert splits.train.dtype == np.uint16
    assert splits.tokenizer_spec == "byte"
    assert "builtin" in splits.source and "seed 5" in splits.source
    other = load_corpus("builtin", byte, seed=6, builtin_chars=30_000, valid_fraction=0.1, cache_dir=tmp_path)
    assert other.fingerprint != splits.fingerprint


# ------------------------------------------------------------------ files


def _paragraphs(text: str) -> list[str]:
    """Runs of non-blank lines, written independently of ``split_documents``."""
    runs = itertools.groupby(text.split("\n"), key=lambda line: bool(line.strip()))
    return ["\n".join(group) for non_blank, group in runs if non_blank]


def _blank_line_bytes(raw: bytes) -> int:
    return sum(len(line) for line in raw.splitlines(keepends=True) if not line.decode("utf-8").strip())


def test_wikitext_valid_byte_counts(byte: Tokenizer, tmp_path: Path) -> None:
    path = WIKI / "valid.txt"
    raw = path.read_bytes()
    splits = load_corpus(str(path), byte, valid_fraction=0.05, cache_dir=tmp_path)
    tokens = np.concatenate([splits.train, splits.valid])
    assert len(tokens) == len(raw) - _blank_line_bytes(raw)
    # Blank lines in WikiText surround headings; the paragraphs of one section are
    # adjacent lines and form one document.
    docs = _paragraphs(raw.decode("utf-8"))
    assert len(docs) == 1160
    assert int((tokens == byte.eos_id).sum()) == len(docs)
    assert len(splits.valid) == round(len(tokens) * 0.05)
    first = int(np.argmax(tokens == byte.eos_id))
    assert byte.decode(tokens[:first]) == " = Homarus gammarus = "


def test_wikitext_valid_gpt2_counts(gpt2: Tokenizer, tmp_path: Path) -> None:
    path = WIKI / "valid.txt"
    splits = load_corpus(str(path), gpt2, cache_dir=tmp_path)
    tokens = np.concatenate([splits.train, splits.valid])
    docs = _paragraphs(path.read_text(encoding="utf-8"))
    assert len(tokens) == sum(len(gpt2.encode(doc)) for doc in docs) + len(docs)
    assert int((tokens == 50256).sum()) == len(docs)
    assert gpt2.decode(tokens[: int(np.argmax(tokens == 50256))]) == docs[0] == " = Homarus gammarus = "
    assert splits.tokenizer_spec == gpt2.spec


def test_wikitext_pair_detection(byte: Tokenizer, tmp_path: Path) -> None:
    splits = load_corpus(str(WIKI / "train.txt"), byte, cache_dir=tmp_path)
    valid_raw = (WIKI / "valid.txt").read_bytes()
    assert len(splits.valid) == len(valid_raw) - _blank_line_bytes(valid_raw)
    train_raw = (WIKI / "train.txt").read_bytes()
    assert len(splits.train) == len(train_raw) - _blank_line_bytes(train_raw)
    assert "valid.txt" in splits.source
    from_dir = load_corpus(str(WIKI), byte, cache_dir=tmp_path)
    assert from_dir.fingerprint == splits.fingerprint
    assert np.array_equal(from_dir.valid, splits.valid)


def test_pair_naming_variants(byte: Tokenizer, tmp_path: Path) -> None:
    (tmp_path / "wiki.train.tokens").write_text("alpha\n\nbeta\n", encoding="utf-8")
    (tmp_path / "wiki.valid.tokens").write_text("gamma\n", encoding="utf-8")
    cache = tmp_path / "cache"
    pair = load_corpus(str(tmp_path / "wiki.train.tokens"), byte, cache_dir=cache)
    assert byte.decode(pair.train) == "alpha<|endoftext|>beta<|endoftext|>"
    assert byte.decode(pair.valid) == "gamma<|endoftext|>"
    assert load_corpus(str(tmp_path), byte, cache_dir=cache).fingerprint == pair.fingerprint
    # No sibling: the tail is split off. Newlines inside a paragraph are kept.
    lone = tmp_path / "lone" / "train.txt"
    lone.parent.mkdir()
    lone.write_text("one\ntwo\n \nthree four five six seven eight nine ten", encoding="utf-8")
    split = load_corpus(str(lone), byte, valid_fraction=0.2, cache_dir=cache)
    joined = byte.decode(np.concatenate([split.train, split.valid]))
    assert joined == "one\ntwo<|endoftext|>three four five six seven eight nine ten<|endoftext|>"
    assert len(split.valid) == round(0.2 * (len(joined) - 2 * (len("<|endoftext|>") - 1)))


def test_check_length_and_windows(byte: Tokenizer, tmp_path: Path) -> None:
    path = tmp_path / "small.txt"
    path.write_text("x" * 199 + "\n", encoding="utf-8")
    splits = load_corpus(str(path), byte, valid_fraction=0.1, cache_dir=tmp_path / "c")
    assert (len(splits.train), len(splits.valid)) == (180, 20)
    check_length(splits, 16)
    with pytest.raises(DataError, match=r"validation split has 20 tokens but seq_len 64 needs at least 65"):
        check_length(splits, 64)
    tokens = np.arange(1000, dtype=np.uint16)
    win = validation_windows(tokens, 100, None)
    assert win.shape == (9, 101) and win.dtype == np.uint16
    assert np.array_equal(win[:, 0], np.arange(9) * 100)
    assert np.array_equal(win[3], np.arange(300, 401))
    some = validation_windows(tokens, 100, 3)
    assert np.array_equal(some[:, 0], [0, 400, 800])
    assert np.array_equal(some, validation_windows(tokens, 100, 3))
    with pytest.raises(DataError, match="fewer than one window"):
        validation_windows(tokens[:50], 100, None)


# ------------------------------------------------------------------ errors


def test_hf_dataset_offline(byte: Tokenizer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import datasets

    # No cached copy may rescue the load on a machine that once downloaded it.
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf", raising=False)
    start = time.perf_counter()
    with pytest.raises(DataError) as info:
        load_corpus("hf:wikitext:wikitext-103-raw-v1", byte, cache_dir=tmp_path)
    assert time.perf_counter() - start < 20
    msg = str(info.value)
    assert "wikitext" in msg and "wikitext-103-raw-v1" in msg
    assert "network access or a local copy" in msg and "--corpus builtin" in msg


def test_bad_files(byte: Tokenizer, tmp_path: Path) -> None:
    missing = tmp_path / "missing.txt"
    with pytest.raises(DataError, match="does not exist") as info:
        load_corpus(str(missing), byte, cache_dir=tmp_path)
    assert str(missing) in str(info.value)

    empty = tmp_path / "empty.txt"
    empty.write_bytes(b"")
    with pytest.raises(DataError, match="is empty") as info:
        load_corpus(str(empty), byte, cache_dir=tmp_path)
    assert str(empty) in str(info.value)

    blank = tmp_path / "blank.txt"
    blank.write_text(" \n\n\t\n", encoding="utf-8")
    with pytest.raises(DataError, match="only whitespace"):
        load_corpus(str(blank), byte, cache_dir=tmp_path)

    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("caf\u00e9 au lait\n".encode("latin-1"))
    with pytest.raises(DataError, match=r"not UTF-8.*0xe9 at offset 3") as info:
        load_corpus(str(latin1), byte, cache_dir=tmp_path)
    assert str(latin1) in str(info.value)

    no_pair = tmp_path / "folder"
    no_pair.mkdir()
    (no_pair / "notes.txt").write_text("hello\n", encoding="utf-8")
    with pytest.raises(DataError, match="no train/validation pair"):
        load_corpus(str(no_pair), byte, cache_dir=tmp_path)

    tiny = tmp_path / "tiny.txt"
    tiny.write_text("\n", encoding="utf-8")
    with pytest.raises(DataError, match="only whitespace"):
        load_corpus(str(tiny), byte, cache_dir=tmp_path)


# ------------------------------------------------------------------ cache


def test_cache_hit_and_garbage(byte: Tokenizer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cache = tmp_path / "cache"
    first = load_corpus("builtin", byte, seed=2, builtin_chars=20_000, cache_dir=cache)
    files = sorted(p.name for p in cache.iterdir())
    assert files == [f"{first.fingerprint}.train.npy", f"{first.fingerprint}.valid.npy"]

    def no_tokenizing(*args: object, **kwargs: object) -> np.ndarray:
        raise AssertionError("tokenized although the cache holds the arrays")

    with monkeypatch.context() as patch:
        patch.setattr(corpus, "tokenize_documents", no_tokenizing)
        second = load_corpus("builtin", byte, seed=2, builtin_chars=20_000, cache_dir=cache)
    assert isinstance(second, TokenSplits)
    assert second.fingerprint == first.fingerprint
    assert np.array_equal(second.train, first.train) and np.array_equal(second.valid, first.valid)

    (cache / f"{first.fingerprint}.train.npy").write_bytes(b"not an npy file")
    third = load_corpus("builtin", byte, seed=2, builtin_chars=20_000, cache_dir=cache)
    assert np.array_equal(third.train, first.train)
    # The garbage was replaced, and no temporary files were left behind.
    assert np.array_equal(np.load(cache / f"{first.fingerprint}.train.npy"), first.train)
    assert len(list(cache.iterdir())) == 2


def test_fingerprint_tracks_tokenizer(byte: Tokenizer, gpt2: Tokenizer, tmp_path: Path) -> None:
    a = load_corpus("builtin", byte, builtin_chars=5_000, cache_dir=tmp_path)
    b = load_corpus("builtin", gpt2, builtin_chars=5_000, cache_dir=tmp_path)
    assert a.fingerprint != b.fingerprint
    assert len(b.train) < len(a.train)
    assert int(b.train.max()) < 50257


def test_default_cache_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("STSO_CACHE", str(tmp_path))
    assert default_cache_dir() == tmp_path / "tokens"
    monkeypatch.delenv("STSO_CACHE")
    default = default_cache_dir()
    assert default == Path.home() / ".cache" / "stso" / "tokens"
    assert REPO not in default.resolve().parents


def test_split_documents() -> None:
    assert split_documents(" \n = Title = \n \n Body one\n Body two\n\n\n") == [
        " = Title = ",
        " Body one\n Body two",
    ]
    assert split_documents("") == []
