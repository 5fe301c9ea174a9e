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


def test_builtin_generation_length_and_determinism() -> None:
    # its speed is a benchmark's matter (make bench: env.json, builtin_generation_seconds)
    text = generate_builtin_text(11, 2_000_000)
    assert len(text) == 2_000_000
    assert generate_builtin_text(11, 1000) == generate_builtin_text(11, 1000)


def test_check_spec_names_the_bad_spec_without_loading(tmp_path: Path) -> None:
    for ok in ("builtin", " Builtin ", "hf:wikitext:wikitext-103-raw-v1", str(WIKI), str(WIKI / "valid.txt")):
        corpus.check_spec(ok)
    with pytest.raises(DataError, match="nowhere.txt' does not exist"):
        corpus.check_spec(str(tmp_path / "nowhere.txt"))
    with pytest.raises(DataError, match="spec is empty"):
        corpus.check_spec("  ")


def test_builtin_load_counts(byte: Tokenizer, tmp_path: Path) -> None:
    splits = load_corpus("builtin", byte, seed=5, builtin_chars=30_000, valid_fraction=0.1, cache_dir=tmp_path)
    train_text = generate_builtin_text(5, 30_000)
    valid_text = generate_builtin_text(5, 3_000, stream=1)
    # Each "\n\n" loses its blank line and the paragraph's newline becomes eos; the
    # cut-off last paragraph gets one eos more.
    assert len(splits.train) == len(train_text.encode()) - train_text.count("\n\n") + 1
    assert int((splits.train == byte.eos_id).sum()) == train_text.count("\n\n") + 1
    assert byte.decode(splits.valid[:200]) == valid_text[:200]
    assert byte.decode(splits.test[:200]) == generate_builtin_text(5, 3_000, stream=2)[:200]
    assert byte.decode(splits.probe[:200]) == generate_builtin_text(5, 750, stream=3)[:200]
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
    # A single file: train, then the held-out tail cut into probe, validation and test, in order.
    tokens = np.concatenate([splits.train, splits.probe, splits.valid, splits.test])
    assert len(tokens) == len(raw) - _blank_line_bytes(raw)
    # Blank lines in WikiText surround headings; the paragraphs of one section are
    # adjacent lines and form one document.
    docs = _paragraphs(raw.decode("utf-8"))
    assert len(docs) == 1160
    assert int((tokens == byte.eos_id).sum()) == len(docs)
    held = round(len(tokens) * 0.10)
    assert len(splits.probe) + len(splits.valid) + len(splits.test) == held
    assert (len(splits.probe), len(splits.valid)) == (round(held * 0.1), round(held * 0.4))
    first = int(np.argmax(tokens == byte.eos_id))
    assert byte.decode(tokens[:first]) == " = Homarus gammarus = "


def test_wikitext_valid_gpt2_counts(gpt2: Tokenizer, tmp_path: Path) -> None:
    path = WIKI / "valid.txt"
    splits = load_corpus(str(path), gpt2, cache_dir=tmp_path)
    tokens = np.concatenate([splits.train, splits.probe, splits.valid, splits.test])
    docs = _paragraphs(path.read_text(encoding="utf-8"))
    assert len(tokens) == sum(len(gpt2.encode(doc)) for doc in docs) + len(docs)
    assert int((tokens == 50256).sum()) == len(docs)
    assert gpt2.decode(tokens[: int(np.argmax(tokens == 50256))]) == docs[0] == " = Homarus gammarus = "
    assert splits.tokenizer_spec == gpt2.spec


def test_wikitext_pair_detection(byte: Tokenizer, tmp_path: Path) -> None:
    splits = load_corpus(str(WIKI / "train.txt"), byte, cache_dir=tmp_path)
    valid_raw = (WIKI / "valid.txt").read_bytes()
    # No test.txt beside the pair: valid.txt is cut into probe (10 %), validation (40 %), test (50 %).
    held = len(valid_raw) - _blank_line_bytes(valid_raw)
    assert len(splits.probe) + len(splits.valid) + len(splits.test) == held
    assert len(splits.test) >= 65_536
    assert (len(splits.probe), len(splits.valid)) == (round(held * 0.1), round(held * 0.4))
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
    assert byte.decode(np.concatenate([pair.probe, pair.valid, pair.test])) == "gamma<|endoftext|>"
    assert load_corpus(str(tmp_path), byte, cache_dir=cache).fingerprint == pair.fingerprint
    # No sibling: the tail is split off. Newlines inside a paragraph are kept.
    lone = tmp_path / "lone" / "train.txt"
    lone.parent.mkdir()
    lone.write_text("one\ntwo\n \nthree four five six seven eight nine ten", encoding="utf-8")
    split = load_corpus(str(lone), byte, valid_fraction=0.2, cache_dir=cache)
    joined = byte.decode(np.concatenate([split.train, split.probe, split.valid, split.test]))
    assert joined == "one\ntwo<|endoftext|>three four five six seven eight nine ten<|endoftext|>"
    n_tokens = len(joined) - 2 * (len("<|endoftext|>") - 1)
    assert len(split.probe) + len(split.valid) + len(split.test) == round(0.4 * n_tokens)


def test_check_length_and_windows(byte: Tokenizer, tmp_path: Path) -> None:
    path = tmp_path / "small.txt"
    path.write_text("x" * 199 + "\n", encoding="utf-8")
    splits = load_corpus(str(path), byte, valid_fraction=0.25, cache_dir=tmp_path / "c")
    assert (len(splits.train), len(splits.probe), len(splits.valid), len(splits.test)) == (100, 10, 40, 50)
    check_length(splits, 9)
    with pytest.raises(DataError, match=r"probe split has 10 tokens but seq_len 16 needs at least 17"):
        check_length(splits, 16)
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
    assert files == sorted(f"{first.fingerprint}.{n}.npy" for n in ("train", "probe", "valid", "test"))

    def no_tokenizing(*args: object, **kwargs: object) -> np.ndarray:
        raise AssertionError("tokenized although the cache holds the arrays")

    with monkeypatch.context() as patch:
        patch.setattr(corpus, "tokenize_documents", no_tokenizing)
        second = load_corpus("builtin", byte, seed=2, builtin_chars=20_000, cache_dir=cache)
    assert isinstance(second, TokenSplits)
    assert second.fingerprint == first.fingerprint
    for name in ("train", "probe", "valid", "test"):
        assert np.array_equal(getattr(second, name), getattr(first, name))

    (cache / f"{first.fingerprint}.train.npy").write_bytes(b"not an npy file")
    third = load_corpus("builtin", byte, seed=2, builtin_chars=20_000, cache_dir=cache)
    assert np.array_equal(third.train, first.train)
    # The garbage was replaced, and no temporary files were left behind.
    assert np.array_equal(np.load(cache / f"{first.fingerprint}.train.npy"), first.train)
    assert len(list(cache.iterdir())) == 4


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


# ------------------------------------------------------------------ held-out sets


def _windows_in(needle_source: np.ndarray, haystack: np.ndarray, width: int = 48, step: int = 97) -> int:
    """How many ``width``-token windows of ``needle_source`` (every ``step`` tokens) occur in ``haystack``."""
    hay = haystack.astype(np.uint16).tobytes()
    hits = 0
    for i in range(0, len(needle_source) - width, step):
        hits += needle_source[i:i + width].astype(np.uint16).tobytes() in hay
    return hits


def test_held_out_sets_are_disjoint(byte: Tokenizer, tmp_path: Path) -> None:
    """Probe, validation and test never share text: controllers and selection read the first two, the
    final score the third."""
    splits = load_corpus("builtin", byte, seed=0, builtin_chars=200_000, cache_dir=tmp_path)
    sizes = splits.sizes()
    assert sizes == {"train": len(splits.train), "probe": len(splits.probe), "validation": len(splits.valid),
                     "test": len(splits.test)}
    assert min(sizes.values()) > 1000
    for a, b in ((splits.probe, splits.valid), (splits.probe, splits.test), (splits.valid, splits.test),
                 (splits.test, splits.train), (splits.probe, splits.train)):
        assert _windows_in(a, b) == 0
    # A validation file with no test beside it is cut into contiguous, non-overlapping ranges.
    wt = load_corpus(str(WIKI), byte, cache_dir=tmp_path)
    held = (WIKI / "valid.txt").read_bytes()
    joined = np.concatenate([wt.probe, wt.valid, wt.test])
    assert len(joined) == len(held) - _blank_line_bytes(held)
    assert _windows_in(wt.probe[:20_000], wt.test) == 0 and _windows_in(wt.valid[:20_000], wt.test) == 0


def test_test_file_is_used(byte: Tokenizer, tmp_path: Path) -> None:
    (tmp_path / "train.txt").write_text("alpha beta\n\ngamma delta\n", encoding="utf-8")
    (tmp_path / "valid.txt").write_text("epsilon zeta eta theta iota kappa\n", encoding="utf-8")
    (tmp_path / "test.txt").write_text("lambda mu\n", encoding="utf-8")
    splits = load_corpus(str(tmp_path), byte, cache_dir=tmp_path / "cache")
    assert byte.decode(splits.test) == "lambda mu<|endoftext|>"
    # With a test file, the probe is the first 10 % of the validation tokens and validation the rest.
    assert byte.decode(np.concatenate([splits.probe, splits.valid])) == "epsilon zeta eta theta iota kappa<|endoftext|>"
    assert len(splits.probe) == round(0.1 * (len("epsilon zeta eta theta iota kappa") + 1))
    assert "test: test.txt" in splits.source
