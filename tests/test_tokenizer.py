"""Tokenizers: exact round trips, GPT-2 known ids, and clear errors for bad specs."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

from stso_env.errors import DataError
from stso_env.train.tokenizer import ByteTokenizer, Tokenizer, build_tokenizer

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
GPT2_DIR = DATA / "gpt2-tokenizer"
WIKI_VALID = DATA / "wikitext-2" / "valid.txt"

SAMPLES = [
    "Hello, world!",
    "Crème brûlée à la française, naïve façade",
    "emoji 🙂🚀 and CJK 漢字, tab\tand\nnewline",
    "",
    "  leading and trailing spaces  ",
]


@pytest.fixture(scope="module")
def gpt2() -> Tokenizer:
    return build_tokenizer(f"gpt2:{GPT2_DIR}")


@pytest.mark.parametrize("text", SAMPLES)
def test_byte_round_trip(text: str) -> None:
    tok = build_tokenizer("byte")
    ids = tok.encode(text)
    assert ids.dtype == np.int32
    assert len(ids) == len(text.encode("utf-8"))
    assert ids.size == 0 or int(ids.max()) < 257
    assert tok.decode(ids) == text


def test_byte_attributes_and_eos() -> None:
    tok = ByteTokenizer()
    assert (tok.name, tok.vocab_size, tok.eos_id, tok.spec) == ("byte", 257, 256, "byte")
    assert build_tokenizer("").spec == "byte"
    # A literal marker in the text stays text; only the loader inserts id 256.
    assert 256 not in tok.encode("a<|endoftext|>b").tolist()
    assert tok.decode([104, 105, 256, 33]) == "hi<|endoftext|>!"
    with pytest.raises(DataError, match=r"id 300 is outside 0\.\.256"):
        tok.decode([300])


def test_gpt2_known_ids(gpt2: Tokenizer) -> None:
    assert gpt2.encode("Hello world").tolist() == [15496, 995]
    assert gpt2.encode(" Hello world").tolist() == [18435, 995]
    assert gpt2.vocab_size == 50257
    assert gpt2.eos_id == 50256
    assert gpt2.name == "gpt2"
    assert gpt2.spec == f"gpt2:{GPT2_DIR.resolve()}"
    assert 50256 not in gpt2.encode("x <|endoftext|> y").tolist()
    assert gpt2.decode([15496, 50256, 995]) == "Hello<|endoftext|> world"


def test_gpt2_round_trip_wikitext_line(gpt2: Tokenizer) -> None:
    lines = WIKI_VALID.read_text(encoding="utf-8").split("\n")
    line = next(x for x in lines if len(x) > 200)
    ids = gpt2.encode(line)
    assert ids.dtype == np.int32
    assert gpt2.decode(ids) == line
    for text in SAMPLES:
        assert gpt2.decode(gpt2.encode(text)) == text
    batch = gpt2.encode_batch([line, "Hello world", ""])
    assert [b.tolist() for b in batch] == [ids.tolist(), [15496, 995], []]


def test_gpt2_spec_forms_agree(gpt2: Tokenizer) -> None:
    for spec in (str(GPT2_DIR), gpt2.spec):
        other = build_tokenizer(spec)
        assert other.spec == gpt2.spec
        assert other.encode("Rebuilt from its spec.").tolist() == gpt2.encode("Rebuilt from its spec.").tolist()


@pytest.mark.parametrize("spec", ["bpe", "gpt2", "sentencepiece:x"])
def test_unknown_spec(spec: str) -> None:
    with pytest.raises(DataError) as info:
        build_tokenizer(spec)
    msg = str(info.value)
    assert repr(spec) in msg
    assert "byte" in msg and "gpt2:<dir>" in msg and "hf:<hub id>" in msg


def test_missing_dir_and_files(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(DataError, match="does not exist") as info:
        build_tokenizer(f"gpt2:{missing}")
    assert str(missing) in str(info.value)
    with pytest.raises(DataError, match="does not exist"):
        build_tokenizer(str(missing))
    (tmp_path / "vocab.json").write_text("{}", encoding="utf-8")
    with pytest.raises(DataError, match="merges.txt not found") as info:
        build_tokenizer(str(tmp_path))
    assert str(tmp_path) in str(info.value)


def test_hub_tokenizer_offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    spec = "hf:stso-tests/no-such-tokenizer"
    start = time.perf_counter()
    with pytest.raises(DataError) as info:
        build_tokenizer(spec)
    assert time.perf_counter() - start < 20
    msg = str(info.value)
    assert repr(spec) in msg
    assert "HF_HUB_OFFLINE" in msg
    assert "vocab.json" in msg and "merges.txt" in msg and "'byte'" in msg
