"""Training corpora: the built-in synthetic language, text files and hub datasets.

:func:`load_corpus` turns a corpus spec into four disjoint token arrays
(:class:`TokenSplits`): *train*; *probe*, the held-out data controllers, rewards
and branch selection may look at; *validation*, for model selection, early
stopping and calibration; *test*, read once at the end for the final score and by
nothing during a run. :func:`validation_windows` cuts a held-out array into fixed
windows for perplexity; :func:`check_length` says early when a corpus is too small
for the context length.

Held-out splits
---------------
Selecting on the data one scores on inflates every method that selects, so the
three held-out sets never overlap (GUIDE section 6):

* ``builtin``: validation, test and probe are streams 1, 2 and 3 of the
  generator, of ``builtin_chars * valid_fraction`` characters each (the probe a
  quarter of that).
* a text source with its own test part (``test.txt`` beside ``train.txt``, or a
  hub ``test`` split): the probe is the first 10 % of the validation tokens and
  validation the rest.
* a text source with a validation part only (WikiText-2 in ``../shared/data``):
  its validation tokens are cut into probe (first 10 %), validation (next 40 %)
  and test (last 50 %), in contiguous ranges.
* a single file (or a hub dataset with only ``train``): the last
  ``2 * valid_fraction`` of its tokens are held out and cut as above.

Corpus specs
------------
``"builtin"``
    :func:`generate_builtin_text` with the run's seed (stream 0) for training and
    further streams of the same seed for the held-out sets, so held-out sentences
    are new sentences of the same language.
``<path>``
    A UTF-8 text file or a directory. A file named ``train.txt`` or ``*.train.*``
    with a sibling ``valid.txt`` / ``validation.txt`` (``*.valid.*`` /
    ``*.validation.*``) is read as that pair, with a sibling ``test.txt``
    (``*.test.*``) as its test part when there is one; a directory holding such
    files is read the same way. Any other file is split (see above).
``"hf:<dataset id>[:<config>]"``
    ``datasets.load_dataset(id, config)``, its ``train``, ``validation``
    (``valid``/``val``/``dev`` accepted) and ``test`` splits, held-out parts cut as
    above when missing. Needs network access or a cached copy.

Documents and end-of-text ids
-----------------------------
Text is cut into paragraphs at whitespace-only lines. Those lines are dropped,
newlines inside a paragraph stay, and every paragraph is followed by one
end-of-text id (the eos takes the place of the newline that ended the paragraph).
Cutting at blank lines rather than at every newline keeps hard-wrapped text in one
piece. In WikiText blank lines surround the headings, so a document is a heading or
the paragraph lines of one section (the newlines between those paragraphs stay):
1160 documents in ``valid.txt``. With the byte tokenizer a file that ends in a
newline gives exactly ``file bytes - bytes of whitespace-only lines (newlines
included)`` tokens. Hub dataset rows are documents as they are (one trailing
newline removed, blank rows dropped).

The built-in language
---------------------
A fixed lexicon (the same for every seed; the seed only picks the sentences) of
1945 pronounceable pseudo-words built from onset + vowel + coda syllables:

========================  =====  =========================================================
class                     count  form
========================  =====  =========================================================
determiners               6 + 6  one syllable; six go with singular nouns, six with plural
nouns                     900    2-3 syllables; plural adds ``-s`` after a vowel, else ``-en``
verbs                     500    stem ending in a consonant; ``-a`` after a singular
                                 subject, ``-on`` after a plural one (agreement)
adjectives                350    2 syllables + ``-ic`` / ``-al`` / ``-ous``
adverbs                   150    2 syllables + ``-ly``
prepositions              20     1-2 syllables
subordinators             10     1-2 syllables, introduce a subordinate clause
coordinators              3      1 syllable
========================  =====  =========================================================

Within each class word frequencies are Zipfian, ``p(rank k) ~ 1 / (k + 2.7) ** 1.1``.
Sentences come from this probabilistic grammar::

    S      -> Clause [", " Sub Clause (p .25) | ", " Coord Clause (p .10)] "."
    Clause -> NP_subj VP
    NP     -> Det_num Adj{0: .50, 1: .35, 2: .15} N_num [PP (p .2, top-level NPs only)]
    PP     -> Prep NP                   (the inner NP has no PP)
    VP     -> V_agree NP [Adv (p .25)]  (p .7)
            | V_agree PP [Adv (p .25)]  (p .3)

``num`` is plural with p .35; the determiner set and the noun suffix follow it, and
the verb suffix agrees with the subject's number even when adjectives and a PP
stand between them. Semantic preferences make wider context pay off: every noun
has 4 preferred verbs and 3 preferred adjectives, every verb 4 preferred object
nouns and 1 preferred preposition, taken with p .6 / .6 / .5 / .7 instead of a
Zipf draw; every paragraph (3-8 sentences) has a topic of 8 nouns from which
35 % of its nouns come. Sentences start with a capital letter and end with a full
stop; paragraphs are single lines separated by a blank line.

Measured on 2,000,000 characters (seed 0): 233,725 words, 3335 distinct word
forms (word unigram entropy 9.0 bits), 8.6 characters per word with its space,
34 distinct characters. Character unigram entropy 4.27 bits; plug-in entropy of
the next character given the previous 3 is 1.85 bits, against 4.08 bits for the
same characters shuffled (at 300,000 characters: 1.85 against 3.57, the shuffled
copy carrying the same small-sample bias). A 2-layer, 128-wide GPT-2 on bytes
(batch 16 x 128, AdamW 3e-3, 1500 steps) reaches 1.14 nats = 1.65 bits per
character on validation text, still falling, versus 2.96 nats for the unigram.
Generation takes about 0.11 s for 2 M characters (plus 0.04 s once for the
lexicon) on one core.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from stso_env.errors import ConfigError, DataError
from stso_env.train.tokenizer import Tokenizer, forced_hub_offline, hub_offline_reason

log = logging.getLogger(__name__)

# Bump when the text-to-token rules or the built-in generator change, so cached
# token arrays made under the old rules are never reused.
CORPUS_FORMAT_VERSION = 2  # 2: probe and test splits
BUILTIN_GENERATOR_VERSION = 1

_TRAIN_NAMES = ("train",)
_VALID_NAMES = ("valid", "validation")
_TEST_NAMES = ("test",)
_HF_VALID_SPLITS = ("validation", "valid", "val", "dev")
_HF_TEST_SPLITS = ("test",)
#: Shares of a held-out part cut into probe / validation / test when the source has no test part.
PROBE_SHARE, VALIDATION_SHARE = 0.10, 0.40
#: Share of the validation tokens that becomes the probe when the source has its own test part.
PROBE_SHARE_WITH_TEST = 0.10

_LEXICON_SEED = 20240611
# Syllable parts; the empty onset and the repeated empty coda make open syllables
# and vowel-initial words common, so words stay pronounceable.
# fmt: off
_ONSETS = ("", "b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z",
           "br", "dr", "gl", "kr", "pl", "st", "tr", "sh", "th", "ch")
_VOWELS = ("a", "e", "i", "o", "u", "ai", "ei", "ou", "oa", "ia")
_CODAS = ("", "", "", "n", "r", "l", "s", "m", "k", "nd", "rt", "sk")
# fmt: on
_VOWEL_LETTERS = frozenset("aeiou")

# Random numbers are drawn in blocks of this many; every draw site owns its own
# generator, so text for a seed is a prefix of the text for a longer request.
_BLOCK = 1 << 15


@dataclass
class TokenSplits:
    """The four disjoint token arrays of one corpus under one tokenizer (see the module docstring).

    Attributes:
        train: 1-D token ids (uint16 when the vocabulary fits, else int32).
        valid: the validation split (model selection, calibration), same dtype.
        probe: what controllers, rewards and branch selection may look at.
        test: the final score only.
        source: Human description of where the text came from.
        tokenizer_spec: ``Tokenizer.spec`` of the tokenizer used.
        fingerprint: sha256 hex over the source identity (file contents, seed and
            sizes, or dataset id) and the tokenizer spec; keys caches and config hashes.
    """

    train: np.ndarray
    valid: np.ndarray
    probe: np.ndarray
    test: np.ndarray
    source: str
    tokenizer_spec: str
    fingerprint: str

    def sizes(self) -> dict[str, int]:
        """Tokens per split, for reports."""
        return {"train": int(len(self.train)), "probe": int(len(self.probe)),
                "validation": int(len(self.valid)), "test": int(len(self.test))}


# --------------------------------------------------------------------------- lexicon


@dataclass(frozen=True)
class _Lexicon:
    det_sing: tuple[str, ...]
    det_plur: tuple[str, ...]
    noun_sing: tuple[str, ...]
    noun_plur: tuple[str, ...]
    verb_sing: tuple[str, ...]
    verb_plur: tuple[str, ...]
    adjectives: tuple[str, ...]
    adverbs: tuple[str, ...]
    prepositions: tuple[str, ...]
    subordinators: tuple[str, ...]
    coordinators: tuple[str, ...]
    noun_verbs: tuple[tuple[int, ...], ...]
    noun_adjs: tuple[tuple[int, ...], ...]
    verb_objs: tuple[tuple[int, ...], ...]
    verb_prep: tuple[int, ...]

    @property
    def size(self) -> int:
        """Number of lexemes (inflected forms of one noun or verb count once)."""
        return (
            len(self.det_sing)
            + len(self.det_plur)
            + len(self.noun_sing)
            + len(self.verb_sing)
            + len(self.adjectives)
            + len(self.adverbs)
            + len(self.prepositions)
            + len(self.subordinators)
            + len(self.coordinators)
        )


@functools.lru_cache(maxsize=1)
def _lexicon() -> _Lexicon:
    """Build the fixed lexicon; every surface form is unique across all classes."""
    rng = np.random.default_rng(_LEXICON_SEED)
    taken: set[str] = set()

    def syllable(coda: bool | None = None) -> str:
        onset = _ONSETS[int(rng.integers(len(_ONSETS)))]
        vowel = _VOWELS[int(rng.integers(len(_VOWELS)))]
        codas = [c for c in _CODAS if c] if coda else ([""] if coda is False else list(_CODAS))
        return onset + vowel + codas[int(rng.integers(len(codas)))]

    def make(count: int, syllables: Sequence[int], forms, last_coda: bool | None = None) -> list[str]:
        stems: list[str] = []
        while len(stems) < count:
            n_syl = syllables[int(rng.integers(len(syllables)))]
            parts = [syllable() for _ in range(n_syl - 1)] + [syllable(last_coda)]
            stem = "".join(parts)
            surface = forms(stem)
            if len(stem) < 2 or any(s in taken for s in surface) or len(set(surface)) != len(surface):
                continue
            taken.update(surface)
            stems.append(stem)
        return stems

    def plain(stem: str) -> tuple[str, ...]:
        return (stem,)

    def noun_plural(stem: str) -> str:
        return stem + ("s" if stem[-1] in _VOWEL_LETTERS else "en")

    det_sing = make(6, [1], plain, last_coda=False)
    det_plur = make(6, [1], plain, last_coda=True)
    coordinators = make(3, [1], plain)
    subordinators = make(10, [1, 2], plain)
    prepositions = make(20, [1, 2], plain)
    nouns = make(900, [2, 2, 3], lambda s: (s, noun_plural(s)))
    verbs = make(500, [2], lambda s: (s + "a", s + "on"), last_coda=True)
    adjectives: list[str] = []
    while len(adjectives) < 350:
        suffix = ("ic", "al", "ous")[int(rng.integers(3))]
        adjectives += [s + suffix for s in make(1, [2], lambda s, x=suffix: (s + x,))]
    adverbs = [s + "ly" for s in make(150, [2], lambda s: (s + "ly",))]

    def prefs(rows: int, k: int, high: int) -> tuple[tuple[int, ...], ...]:
        return tuple(tuple(int(x) for x in rng.choice(high, size=k, replace=False)) for _ in range(rows))

    return _Lexicon(
        det_sing=tuple(det_sing),
        det_plur=tuple(det_plur),
        noun_sing=tuple(nouns),
        noun_plur=tuple(noun_plural(s) for s in nouns),
        verb_sing=tuple(s + "a" for s in verbs),
        verb_plur=tuple(s + "on" for s in verbs),
        adjectives=tuple(adjectives),
        adverbs=tuple(adverbs),
        prepositions=tuple(prepositions),
        subordinators=tuple(subordinators),
        coordinators=tuple(coordinators),
        noun_verbs=prefs(len(nouns), 4, len(verbs)),
        noun_adjs=prefs(len(nouns), 3, len(adjectives)),
        verb_objs=prefs(len(verbs), 4, len(nouns)),
        verb_prep=tuple(int(x) for x in rng.integers(len(prepositions), size=len(verbs))),
    )


def lexicon() -> _Lexicon:
    """The built-in grammar's fixed lexicon (word classes and forms), for scorers that check its text."""
    return _lexicon()


def _zipf_cdf(n: int) -> np.ndarray:
    weights = 1.0 / (np.arange(n) + 2.7) ** 1.1
    return np.cumsum(weights / weights.sum())


def _zipf_stream(rng: np.random.Generator, n: int) -> Iterator[int]:
    cdf = _zipf_cdf(n)
    while True:
        idx = np.searchsorted(cdf, rng.random(_BLOCK), side="right")
        yield from np.minimum(idx, n - 1).tolist()


def _uniform_stream(rng: np.random.Generator) -> Iterator[float]:
    while True:
        yield from rng.random(_BLOCK).tolist()


# ------------------------------------------------------------------------- generator


def generate_builtin_text(seed: int, n_chars: int, *, stream: int = 0) -> str:
    """Generate ``n_chars`` characters of the built-in synthetic language.

    The grammar, lexicon and measured entropies are in the module docstring.

    Args:
        seed: Picks the sentences; the same seed gives the same text in any process
            on any platform (numpy's PCG64 through ``SeedSequence([seed, stream])``).
        n_chars: Exact length of the returned text; the last sentence may be cut.
        stream: Independent text streams of one seed; the loader trains on stream 0
            and validates on stream 1.

    Returns:
        Paragraphs of sentences, separated by blank lines. A shorter request gives
        a prefix of a longer one.
    """
    if n_chars < 0:
        raise ConfigError(f"n_chars must be >= 0, got {n_chars}")
    lex = _lexicon()
    children = np.random.SeedSequence([int(seed), int(stream)]).spawn(10)
    rngs = [np.random.default_rng(child) for child in children]
    unif = _uniform_stream(rngs[0]).__next__
    z_noun = _zipf_stream(rngs[1], len(lex.noun_sing)).__next__
    z_verb = _zipf_stream(rngs[2], len(lex.verb_sing)).__next__
    z_adj = _zipf_stream(rngs[3], len(lex.adjectives)).__next__
    z_adv = _zipf_stream(rngs[4], len(lex.adverbs)).__next__
    z_prep = _zipf_stream(rngs[5], len(lex.prepositions)).__next__
    z_det = _zipf_stream(rngs[6], len(lex.det_sing)).__next__
    z_sub = _zipf_stream(rngs[7], len(lex.subordinators)).__next__
    z_coord = _zipf_stream(rngs[8], len(lex.coordinators)).__next__
    z_topic = _zipf_stream(rngs[9], len(lex.noun_sing)).__next__

    noun_sing, noun_plur = lex.noun_sing, lex.noun_plur
    verb_sing, verb_plur = lex.verb_sing, lex.verb_plur
    det_sing, det_plur = lex.det_sing, lex.det_plur
    adjectives, adverbs, preps = lex.adjectives, lex.adverbs, lex.prepositions
    noun_verbs, noun_adjs, verb_objs, verb_prep = lex.noun_verbs, lex.noun_adjs, lex.verb_objs, lex.verb_prep

    def noun_phrase(out: list[str], noun: int, pp: bool) -> bool:
        """Append an NP headed by ``noun``; return whether it is plural."""
        plural = unif() < 0.35
        out.append(det_plur[z_det()] if plural else det_sing[z_det()])
        u = unif()
        n_adj = 0 if u < 0.5 else (1 if u < 0.85 else 2)
        for _ in range(n_adj):
            out.append(adjectives[noun_adjs[noun][int(unif() * 3)]] if unif() < 0.6 else adjectives[z_adj()])
        out.append(noun_plur[noun] if plural else noun_sing[noun])
        if pp and unif() < 0.2:
            out.append(preps[z_prep()])
            noun_phrase(out, pick_noun(), False)
        return plural

    topic: list[int] = []

    def pick_noun() -> int:
        return topic[int(unif() * 8)] if unif() < 0.35 else z_noun()

    def clause(out: list[str]) -> None:
        subject = pick_noun()
        plural = noun_phrase(out, subject, True)
        verb = noun_verbs[subject][int(unif() * 4)] if unif() < 0.6 else z_verb()
        out.append(verb_plur[verb] if plural else verb_sing[verb])
        if unif() < 0.7:
            obj = verb_objs[verb][int(unif() * 4)] if unif() < 0.5 else pick_noun()
            noun_phrase(out, obj, True)
        else:
            out.append(preps[verb_prep[verb]] if unif() < 0.7 else preps[z_prep()])
            noun_phrase(out, pick_noun(), False)
        if unif() < 0.25:
            out.append(adverbs[z_adv()])

    paragraphs: list[str] = []
    total = 0
    while total < n_chars:
        topic[:] = [z_topic() for _ in range(8)]
        sentences: list[str] = []
        for _ in range(3 + int(unif() * 6)):
            words: list[str] = []
            clause(words)
            u = unif()
            if u < 0.35:
                words[-1] += ","
                words.append(lex.subordinators[z_sub()] if u < 0.25 else lex.coordinators[z_coord()])
                clause(words)
            sentence = " ".join(words)
            sentences.append(sentence[0].upper() + sentence[1:] + ".")
        paragraph = " ".join(sentences)
        paragraphs.append(paragraph)
        total += len(paragraph) + 2
    return "\n\n".join(paragraphs)[:n_chars]


# ------------------------------------------------------------------ text -> tokens


def split_documents(text: str) -> list[str]:
    """Cut ``text`` into paragraphs at whitespace-only lines (see module docstring)."""
    docs: list[str] = []
    current: list[str] = []
    for line in text.split("\n"):
        if line.strip():
            current.append(line)
        elif current:
            docs.append("\n".join(current))
            current = []
    if current:
        docs.append("\n".join(current))
    return docs


def _token_dtype(tokenizer: Tokenizer) -> type[np.integer]:
    return np.uint16 if tokenizer.vocab_size <= np.iinfo(np.uint16).max + 1 else np.int32


def tokenize_documents(docs: Sequence[str], tokenizer: Tokenizer) -> np.ndarray:
    """Encode ``docs`` and join them into one array, an eos id after each document."""
    dtype = _token_dtype(tokenizer)
    eos = np.array([tokenizer.eos_id], dtype=dtype)
    pieces: list[np.ndarray] = []
    for ids in tokenizer.encode_batch(docs):
        pieces.append(ids.astype(dtype, copy=False))
        pieces.append(eos)
    if not pieces:
        return np.zeros(0, dtype=dtype)
    return np.concatenate(pieces)


def _split_tail(tokens: np.ndarray, valid_fraction: float, what: str) -> tuple[np.ndarray, np.ndarray]:
    n_valid = max(1, round(len(tokens) * valid_fraction))
    if len(tokens) - n_valid < 1:
        raise DataError(
            f"{what} has only {len(tokens)} tokens, too few to split off a validation part "
            f"(valid_fraction {valid_fraction}); use a larger text"
        )
    return tokens[:-n_valid].copy(), tokens[-n_valid:].copy()


def cut_held_out(held: np.ndarray, what: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Cut a held-out part with no test set beside it into contiguous (probe, validation, test)."""
    n = len(held)
    a = int(round(n * PROBE_SHARE))
    b = a + int(round(n * VALIDATION_SHARE))
    if a < 1 or b - a < 1 or n - b < 1:
        raise DataError(f"{what}: its held-out part has only {n} tokens, too few to cut into probe, "
                        "validation and test; use a larger text or a larger valid_fraction")
    return held[:a].copy(), held[a:b].copy(), held[b:].copy()


def cut_probe(valid: np.ndarray, what: str) -> tuple[np.ndarray, np.ndarray]:
    """Cut a validation part into contiguous (probe, validation) when a test set exists beside it."""
    a = int(round(len(valid) * PROBE_SHARE_WITH_TEST))
    if a < 1 or len(valid) - a < 1:
        raise DataError(f"{what}: its validation part has only {len(valid)} tokens, too few to cut off a "
                        "probe; use a larger validation text")
    return valid[:a].copy(), valid[a:].copy()


def _held_out(train: np.ndarray, valid: np.ndarray | None, test: np.ndarray | None, valid_fraction: float,
              what: str) -> tuple[np.ndarray, ...]:
    """(train, probe, validation, test) from what a source has (rules in the module docstring)."""
    if valid is None:
        train, valid = _split_tail(train, min(0.5, 2 * valid_fraction), what)
    if test is None:
        probe, valid, test = cut_held_out(valid, what)
    else:
        probe, valid = cut_probe(valid, what)
    return train, probe, valid, test


# ------------------------------------------------------------------------- sources

# A source is known before any tokenizing (identity for the fingerprint, a human
# description) and tokenized only on a cache miss (the producer).
_Producer = Callable[[Tokenizer], tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]  # train, probe, valid, test
_Source = tuple[dict[str, Any], str, _Producer]


def _read_text(path: Path) -> tuple[str, str]:
    """Return the text of ``path`` and the sha256 of its bytes; DataError if unusable."""
    if not path.exists():
        raise DataError(
            f"corpus file {str(path)!r} does not exist; give an existing text file, "
            f"a folder with train.txt and valid.txt, 'builtin' or 'hf:<dataset id>'"
        )
    if not path.is_file():
        raise DataError(f"corpus path {str(path)!r} is not a regular file")
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise DataError(f"cannot read corpus file {str(path)!r}: {exc}") from exc
    if not raw:
        raise DataError(f"corpus file {str(path)!r} is empty")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(
            f"corpus file {str(path)!r} is not UTF-8 text: invalid byte 0x{raw[exc.start]:02x} at "
            f"offset {exc.start}; convert it to UTF-8 (e.g. iconv -t utf-8)"
        ) from exc
    return text, hashlib.sha256(raw).hexdigest()


def _sibling_valid(path: Path) -> Path | None:
    """Return the validation file paired with a train file, or None."""
    name = path.name
    candidates: list[str] = []
    stem, dot, ext = name.partition(".")
    if stem.lower() in _TRAIN_NAMES and dot:
        candidates += [v + dot + ext for v in _VALID_NAMES]
    parts = name.split(".")
    for i, part in enumerate(parts[1:-1], start=1):  # "*.train.*"
        if part.lower() in _TRAIN_NAMES:
            candidates += [".".join(parts[:i] + [v] + parts[i + 1 :]) for v in _VALID_NAMES]
    for cand in candidates:
        if (path.parent / cand).is_file():
            return path.parent / cand
    return None


def _sibling_test(train: Path) -> Path | None:
    """The test file beside a train file (``test.txt`` / ``*.test.*``), or None."""
    name = train.name
    stem, dot, ext = name.partition(".")
    candidates = [t + dot + ext for t in _TEST_NAMES] if stem.lower() in _TRAIN_NAMES and dot else []
    parts = name.split(".")
    for i, part in enumerate(parts[1:-1], start=1):
        if part.lower() in _TRAIN_NAMES:
            candidates += [".".join(parts[:i] + [t] + parts[i + 1 :]) for t in _TEST_NAMES]
    return next((train.parent / c for c in candidates if (train.parent / c).is_file()), None)


def _pair_in_dir(directory: Path, spec: str) -> tuple[Path, Path]:
    for train in sorted(directory.iterdir()):
        if train.is_file():
            valid = _sibling_valid(train)
            if valid is not None:
                return train, valid
    raise DataError(
        f"corpus folder {str(directory)!r} holds no train/validation pair (looked for train.txt with "
        f"valid.txt or validation.txt, or *.train.* with *.valid.*); give a single text file instead "
        f"(spec {spec!r})"
    )


def _file_source(spec: str, path: Path, valid_fraction: float) -> _Source:
    """Return (identity, description, producer) for a file or folder corpus."""
    if path.is_dir():
        train_path, valid_path = _pair_in_dir(path, spec)
    else:
        train_path, valid_path = path, (_sibling_valid(path) if path.is_file() else None)
    train_text, train_hash = _read_text(train_path)
    test_path = _sibling_test(train_path) if valid_path is not None else None
    if valid_path is not None:
        valid_text, valid_hash = _read_text(valid_path)
        identity = {"kind": "file-pair", "train_sha256": train_hash, "valid_sha256": valid_hash}
        description = f"{train_path.resolve()} (validation: {valid_path.name}"
        if test_path is not None:
            test_text, identity["test_sha256"] = _read_text(test_path)
            description += f", test: {test_path.name})"
        else:
            description += " cut into probe, validation and test)"
    else:
        valid_text, valid_hash = "", ""
        identity = {"kind": "file", "sha256": train_hash, "valid_fraction": valid_fraction}
        description = f"{train_path.resolve()} (last {2 * valid_fraction:g} of tokens held out)"

    def produce(tokenizer: Tokenizer) -> tuple[np.ndarray, ...]:
        def tokens_of(text: str, path: Path) -> np.ndarray:
            docs = split_documents(text)
            if not docs:
                raise DataError(f"corpus file {str(path)!r} holds only whitespace")
            return tokenize_documents(docs, tokenizer)

        train = tokens_of(train_text, train_path)
        valid = tokens_of(valid_text, valid_path) if valid_path is not None else None
        test = tokens_of(test_text, test_path) if test_path is not None else None
        return _held_out(train, valid, test, valid_fraction, f"corpus file {str(train_path)!r}")

    return identity, description, produce


def _builtin_source(seed: int, builtin_chars: int, valid_fraction: float) -> _Source:
    n_valid = max(1, int(builtin_chars * valid_fraction))
    n_probe = max(1, n_valid // 4)
    identity = {
        "kind": "builtin",
        "generator": BUILTIN_GENERATOR_VERSION,
        "seed": int(seed),
        "train_chars": int(builtin_chars),
        "valid_chars": n_valid,
        "probe_chars": n_probe,
    }
    description = (
        f"builtin synthetic language v{BUILTIN_GENERATOR_VERSION} (seed {seed}, "
        f"{builtin_chars} train chars, {n_valid} validation and test chars each, {n_probe} probe chars)"
    )

    def produce(tokenizer: Tokenizer) -> tuple[np.ndarray, ...]:
        def tokens(n: int, stream: int) -> np.ndarray:
            return tokenize_documents(split_documents(generate_builtin_text(seed, n, stream=stream)), tokenizer)

        # streams: 0 train, 1 validation, 2 test, 3 probe (independent sentences of one language)
        return tokens(builtin_chars, 0), tokens(n_probe, 3), tokens(n_valid, 1), tokens(n_valid, 2)

    return identity, description, produce


_HF_ADVICE = (
    "it needs network access or a local copy; use --corpus builtin or the path of a local "
    "text file (e.g. ../shared/data/wikitext-2/train.txt)"
)


def _hf_source(spec: str, valid_fraction: float) -> _Source:
    body = spec[len("hf:") :].strip()
    name, _, config = body.partition(":")
    name, config = name.strip(), config.strip() or None
    if not name:
        raise DataError(f"corpus spec {spec!r} names no dataset; write hf:<dataset id>[:<config>]")
    label = f"{name}" + (f" ({config})" if config else "")
    import datasets

    reason = hub_offline_reason()
    try:
        if reason is None:
            dsd = datasets.load_dataset(name, config)
        else:
            with forced_hub_offline():
                dsd = datasets.load_dataset(name, config)
    except Exception as exc:
        # datasets reports "not available" through many unrelated exception types
        # (ConnectionError, FileNotFoundError, ValueError, hub HTTP errors).
        why = f"the hub is unreachable ({reason}) and no cached copy exists" if reason else str(exc)
        raise DataError(f"hub dataset {label} (spec {spec!r}) cannot be loaded: {why}; {_HF_ADVICE}") from exc
    if "train" not in dsd:
        raise DataError(f"hub dataset {label} has no 'train' split (splits: {sorted(dsd)})")
    valid_split = next((s for s in _HF_VALID_SPLITS if s in dsd), None)
    test_split = next((s for s in _HF_TEST_SPLITS if s in dsd), None) if valid_split else None

    def column(split: str) -> list[str]:
        ds = dsd[split]
        string_cols = [c for c, f in ds.features.items() if getattr(f, "dtype", None) in ("string", "large_string")]
        col = "text" if "text" in ds.column_names else (string_cols[0] if string_cols else None)
        if col is None:
            raise DataError(f"hub dataset {label} split {split!r} has no text column (columns: {ds.column_names})")
        return [row.removesuffix("\n") for row in ds[col] if row and row.strip()]

    identity = {
        "kind": "hf",
        "dataset": name,
        "config": config,
        "valid_split": valid_split,
        "test_split": test_split,
        "valid_fraction": None if valid_split else valid_fraction,
        "fingerprints": {s: getattr(dsd[s], "_fingerprint", None) for s in sorted(dsd)},
    }
    description = (f"hub dataset {label}, splits train/{valid_split or f'last {2 * valid_fraction:g} of train'}"
                   + (f"/{test_split}" if test_split else " (held out part cut into probe, validation, test)"))

    def produce(tokenizer: Tokenizer) -> tuple[np.ndarray, ...]:
        train = tokenize_documents(column("train"), tokenizer)
        valid = tokenize_documents(column(valid_split), tokenizer) if valid_split else None
        test = tokenize_documents(column(test_split), tokenizer) if test_split else None
        return _held_out(train, valid, test, valid_fraction, f"hub dataset {label}")

    return identity, description, produce


# -------------------------------------------------------------------------- cache


def default_cache_dir() -> Path:
    """``$STSO_CACHE/tokens`` if ``STSO_CACHE`` is set, else ``~/.cache/stso/tokens``."""
    root = os.environ.get("STSO_CACHE")
    return (Path(root).expanduser() if root else Path.home() / ".cache" / "stso") / "tokens"


_SPLIT_NAMES = ("train", "probe", "valid", "test")


def _cache_paths(cache_dir: Path, fingerprint: str) -> tuple[Path, ...]:
    return tuple(cache_dir / f"{fingerprint}.{name}.npy" for name in _SPLIT_NAMES)


def _read_cached(path: Path, vocab_size: int) -> np.ndarray | None:
    if not path.is_file():
        return None
    try:
        arr = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as exc:
        log.warning("ignoring unreadable token cache %s: %s", path, exc)
        return None
    if arr.ndim != 1 or arr.dtype.kind not in "iu" or arr.size == 0 or int(arr.max()) >= vocab_size:
        log.warning("ignoring token cache %s: not a 1-D array of ids below %d", path, vocab_size)
        return None
    return arr


def _write_cached(path: Path, arr: np.ndarray) -> None:
    """Write atomically so a reader never sees half a file; a failure only warns."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as fh:
            np.save(fh, arr, allow_pickle=False)
        os.replace(tmp, path)
    except OSError as exc:
        log.warning("cannot write token cache %s (%s); continuing without it", path, exc)
        tmp.unlink(missing_ok=True)


# --------------------------------------------------------------------------- API


def check_spec(spec: str) -> None:
    """Raise :class:`DataError` if ``spec`` cannot name a corpus, without reading or tokenizing it: an
    empty spec, or a local path that does not exist (a hub dataset is checked when it is fetched)."""
    text = spec.strip()
    if not text:
        raise DataError("corpus spec is empty; use 'builtin', a text file path or 'hf:<dataset id>'")
    if text.lower() == "builtin" or text.startswith("hf:"):
        return
    if not Path(text).expanduser().exists():
        raise DataError(f"corpus file {text!r} does not exist; give an existing text file, "
                        f"a folder with train.txt and valid.txt, 'builtin' or 'hf:<dataset id>'")


def load_corpus(
    spec: str,
    tokenizer: Tokenizer,
    *,
    seed: int = 0,
    builtin_chars: int = 2_000_000,
    valid_fraction: float = 0.05,
    cache_dir: str | Path | None = None,
) -> TokenSplits:
    """Load and tokenize a corpus (forms in the module docstring).

    Args:
        spec: ``"builtin"``, a path to a text file or folder, or
            ``"hf:<dataset id>[:<config>]"``.
        tokenizer: Tokenizer to encode with; its eos id separates documents.
        seed: Seed of the built-in text (ignored for other corpora).
        builtin_chars: Characters of built-in training text; validation and test
            get ``builtin_chars * valid_fraction`` more each, the probe a quarter of
            that, from independent streams.
        valid_fraction: Half the share of tokens held out when a corpus has no
            validation part of its own; in (0, 0.5] (at most half is held out).
        cache_dir: Folder for cached token arrays, keyed by fingerprint (default
            :func:`default_cache_dir`).

    Returns:
        The train, probe, validation and test token arrays with their provenance.

    Raises:
        DataError: missing, empty, non-UTF-8 or too small inputs, an unknown spec,
            or a hub dataset that cannot be fetched; the message names the spec or file.
    """
    if not 0.0 < valid_fraction <= 0.5:
        raise ConfigError(f"valid_fraction must be in (0, 0.5], got {valid_fraction}")
    if builtin_chars < 1:
        raise ConfigError(f"builtin_chars must be >= 1, got {builtin_chars}")
    text = spec.strip()
    if text.lower() == "builtin":
        identity, description, produce = _builtin_source(seed, builtin_chars, valid_fraction)
    elif text.startswith("hf:"):
        identity, description, produce = _hf_source(text, valid_fraction)
    elif text:
        identity, description, produce = _file_source(spec, Path(text).expanduser(), valid_fraction)
    else:
        raise DataError("corpus spec is empty; use 'builtin', a text file path or 'hf:<dataset id>'")

    key = {
        "format": CORPUS_FORMAT_VERSION,
        "source": identity,
        "tokenizer": tokenizer.spec,
        "vocab_size": tokenizer.vocab_size,
    }
    fingerprint = hashlib.sha256(json.dumps(key, sort_keys=True).encode("utf-8")).hexdigest()
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    paths = _cache_paths(cache, fingerprint)

    arrays: list[np.ndarray | None] = []
    for path in paths:
        arrays.append(_read_cached(path, tokenizer.vocab_size))
        if arrays[-1] is None:
            break
    if len(arrays) < len(paths) or arrays[-1] is None:
        t0 = time.perf_counter()
        arrays = list(produce(tokenizer))
        log.info("tokenized %s with %s in %.1f s", description, tokenizer.spec, time.perf_counter() - t0)
        for path, arr in zip(paths, arrays):
            _write_cached(path, arr)
    else:
        log.info("token cache hit for %s (%s)", description, fingerprint[:12])
    train, probe, valid, test = arrays
    return TokenSplits(train=train, valid=valid, probe=probe, test=test, source=description,
                       tokenizer_spec=tokenizer.spec, fingerprint=fingerprint)


def check_length(splits: TokenSplits, seq_len: int) -> None:
    """Raise DataError unless every split holds at least one ``seq_len + 1`` window.

    A training step reads ``seq_len + 1`` consecutive tokens (inputs plus shifted
    targets), and perplexity needs at least one validation window of that size.
    """
    need = seq_len + 1
    for name, arr in (("train", splits.train), ("probe", splits.probe), ("validation", splits.valid),
                      ("test", splits.test)):
        if len(arr) < need:
            raise DataError(
                f"corpus {splits.source}: the {name} split has {len(arr)} tokens but seq_len {seq_len} "
                f"needs at least {need}; use a larger corpus, a smaller seq_len"
                + (", or a larger valid_fraction" if name != "train" else "")
            )


def validation_windows(tokens: np.ndarray, seq_len: int, max_windows: int | None = None) -> np.ndarray:
    """Cut ``tokens`` into non-overlapping ``(n, seq_len + 1)`` windows for perplexity.

    Window ``i`` starts at ``i * seq_len``; consecutive windows share one boundary
    token, so every token after the first is a target exactly once. With
    ``max_windows`` smaller than the number available, evenly spaced windows are
    kept (a fixed choice, so evaluations stay comparable across runs).
    """
    if seq_len < 1:
        raise ConfigError(f"seq_len must be >= 1, got {seq_len}")
    if max_windows is not None and max_windows < 1:
        raise ConfigError(f"max_windows must be >= 1 or None, got {max_windows}")
    tokens = np.asarray(tokens).reshape(-1)
    n = (len(tokens) - 1) // seq_len
    if n < 1:
        raise DataError(
            f"validation split has {len(tokens)} tokens, fewer than one window of seq_len + 1 = "
            f"{seq_len + 1}; use a larger corpus or validation fraction, or a smaller seq_len"
        )
    starts = np.arange(n) * seq_len
    if max_windows is not None and max_windows < n:
        starts = starts[np.unique(np.linspace(0, n - 1, max_windows).round().astype(np.int64))]
    return tokens[starts[:, None] + np.arange(seq_len + 1)]
