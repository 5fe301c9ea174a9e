"""Preference pairs from the built-in language, for training and judging a reward model.

A reward model needs pairs *(prompt, chosen, rejected)* where a judge prefers *chosen*.
Human judges are out of reach offline, but the built-in corpus has a known grammar
(:mod:`stso_env.train.corpus`), so the preferences here are exact: the prompt is the
start of a generated sentence (a few words), *chosen* is the rest of that sentence,
and *rejected* is the same rest corrupted in one of three ways:

``agreement``
    the first verb of the continuation takes the other number's suffix (``-a`` after a
    plural subject or ``-on`` after a singular one): every word stays in the lexicon and
    only long-range agreement tells the two apart.
``shuffle``
    the continuation's words in a random order (the full stop stays last).
``foreign``
    one continuation word replaced by a re-ordering of its own letters that is no word
    of the lexicon, so the character statistics barely change.

Every rejected continuation is checked with the gold scorer (:mod:`stso_env.rlhf.gold`)
to score below the chosen one, which scores 1.

Determinism and splits
----------------------
Sentences come from :func:`~stso_env.train.corpus.generate_builtin_text` with the seed
and stream :data:`PREFERENCE_STREAM` (the corpus loader uses streams 0-3 for its own
splits). Pair *i* draws its randomness from ``SeedSequence([seed, stream, i])``, so a
pair does not change when more pairs are requested. Each distinct prompt goes to the
train, probe or test split by a hash of ``(seed, prompt)``, so the three splits never
share a prompt and a prompt's split does not depend on the sizes asked for; repeated
prompts are kept once.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field

import numpy as np

from stso_env.errors import ConfigError
from stso_env.rlhf.gold import SING, VERB, completion_score, lexicon_index, verb_form
from stso_env.train.corpus import generate_builtin_text, split_documents

#: Generator stream of the preference sentences (the corpus loader uses 0-3).
PREFERENCE_STREAM = 16
CORRUPTIONS = ("agreement", "shuffle", "foreign")
SPLITS = ("train", "probe", "test")
#: Shares of distinct prompts in the train / probe / test splits (by hash).
SPLIT_SHARES = (0.8, 0.1, 0.1)
_SENTENCE_SPLIT = re.compile(r"(?<=\.) ")
_CHARS_PER_SENTENCE = 110  # a little above the corpus mean, to generate enough text in one go


@dataclass(frozen=True)
class PreferencePair:
    """One preference: ``prompt + chosen`` is a corpus sentence, ``prompt + rejected`` its corruption.

    ``chosen`` and ``rejected`` start with the space that follows the prompt.
    """

    prompt: str
    chosen: str
    rejected: str
    corruption: str


@dataclass
class PreferenceSplits:
    """Pairs of the three prompt-disjoint splits: *train* fits the reward model, *probe* is what a
    controller of the RLHF run may look at, *test* is read once for the final numbers."""

    train: list[PreferencePair] = field(default_factory=list)
    probe: list[PreferencePair] = field(default_factory=list)
    test: list[PreferencePair] = field(default_factory=list)

    def split(self, name: str) -> list[PreferencePair]:
        """The pairs of split ``name`` (train, probe or test)."""
        if name not in SPLITS:
            raise ConfigError(f"preference split {name!r}: choose one of {', '.join(SPLITS)}")
        return getattr(self, name)

    def prompts(self, name: str) -> list[str]:
        """The prompts of split ``name``, in order."""
        return [p.prompt for p in self.split(name)]


def pairs_as_columns(pairs: list[PreferencePair]) -> dict[str, list[str]]:
    """Column form (``prompt``, ``chosen``, ``rejected``, ``corruption``) for ``datasets.Dataset.from_dict``."""
    rows = [asdict(p) for p in pairs]
    return {key: [r[key] for r in rows] for key in ("prompt", "chosen", "rejected", "corruption")}


def split_of(prompt: str, seed: int) -> str:
    """The split a prompt belongs to: a hash of ``(seed, prompt)`` against :data:`SPLIT_SHARES`."""
    digest = hashlib.sha256(f"{seed}\x00{prompt}".encode()).digest()
    u = int.from_bytes(digest[:8], "big") / 2.0**64
    edge = 0.0
    for name, share in zip(SPLITS, SPLIT_SHARES):
        edge += share
        if u < edge:
            return name
    return SPLITS[-1]


def corpus_sentences(seed: int, n_chars: int, *, stream: int = PREFERENCE_STREAM) -> list[str]:
    """Whole sentences of ``n_chars`` characters of generated text (the paragraph the cut falls in is dropped)."""
    docs = split_documents(generate_builtin_text(seed, n_chars, stream=stream))[:-1]
    return [s for d in docs for s in _SENTENCE_SPLIT.split(d) if s.endswith(".")]


def _agreement(words: list[str], rng: np.random.Generator) -> list[str] | None:
    index = lexicon_index()
    for i, w in enumerate(words):
        info = index.get(w.rstrip(",."))
        if info is not None and info.cls == VERB:
            flipped = verb_form(info.index, "plur" if info.number == SING else SING)
            out = list(words)
            out[i] = w.replace(w.rstrip(",."), flipped)
            return out
    return None


def _shuffle(words: list[str], rng: np.random.Generator) -> list[str] | None:
    bare = [w.rstrip(".") for w in words]
    order = rng.permutation(len(bare))
    if (order == np.arange(len(bare))).all():
        order = np.roll(order, 1)
    out = [bare[int(k)] for k in order]
    out[-1] = out[-1].rstrip(",") + "."
    return out


def _foreign(words: list[str], rng: np.random.Generator) -> list[str] | None:
    index = lexicon_index()
    for i in rng.permutation(len(words)).tolist():
        stem = words[i].rstrip(",.")
        if len(set(stem)) < 2:
            continue
        for _ in range(20):
            fake = "".join(rng.permutation(list(stem)).tolist())
            if fake not in index:
                out = list(words)
                out[i] = words[i].replace(stem, fake)
                return out
    return None


_CORRUPT = {"agreement": _agreement, "shuffle": _shuffle, "foreign": _foreign}


def make_pair(sentence: str, rng: np.random.Generator, *, prompt_words: tuple[int, int],
              weights: tuple[float, float, float], max_chars: int | None = None) -> PreferencePair | None:
    """Cut ``sentence`` into prompt and continuation and corrupt the continuation (module docstring).

    Returns None when the sentence (or every corruption of it) is longer than ``max_chars``, too short for a prompt of
    ``prompt_words`` words plus a continuation of at least two, or when no corruption applies.
    """
    if max_chars is not None and len(sentence) > max_chars:
        return None
    words = sentence.split(" ")
    lo, hi = prompt_words
    hi = min(hi, len(words) - 2)
    if hi < lo:
        return None
    k = int(rng.integers(lo, hi + 1))
    prompt, rest = " ".join(words[:k]), words[k:]
    p = np.asarray(weights, dtype=float) / float(sum(weights))
    first = int(rng.choice(len(CORRUPTIONS), p=p))
    # The drawn corruption first, the others as fall-backs (e.g. no verb left to flip).
    for name in [CORRUPTIONS[first]] + [c for i, c in enumerate(CORRUPTIONS) if i != first and p[i] > 0]:
        out = _CORRUPT[name](rest, rng)
        if out is None:
            continue
        rejected = " " + " ".join(out)
        too_long = max_chars is not None and len(prompt) + len(rejected) > max_chars
        if not too_long and completion_score(prompt, rejected) < 1.0:
            return PreferencePair(prompt=prompt, chosen=" " + " ".join(rest), rejected=rejected, corruption=name)
    return None


def _pairs(seed: int, n_sentences: int, prompt_words: tuple[int, int],
           weights: tuple[float, float, float], max_chars: int | None) -> Iterator[PreferencePair]:
    for i, sentence in enumerate(corpus_sentences(seed, n_sentences * _CHARS_PER_SENTENCE)):
        rng = np.random.default_rng(np.random.SeedSequence([int(seed), PREFERENCE_STREAM, i]))
        pair = make_pair(sentence, rng, prompt_words=prompt_words, weights=weights, max_chars=max_chars)
        if pair is not None:
            yield pair


def build_preferences(seed: int, n_train: int, n_probe: int, n_test: int, *,
                      prompt_words: tuple[int, int] = (2, 4),
                      weights: tuple[float, float, float] = (1.0, 1.0, 1.0),
                      max_chars: int | None = None) -> PreferenceSplits:
    """Build ``n_train`` / ``n_probe`` / ``n_test`` preference pairs with prompt-disjoint splits.

    Args:
        seed: Picks the sentences, the prompt cuts, the corruptions and the split of each prompt.
        n_train, n_probe, n_test: Pairs per split (each >= 0).
        prompt_words: Inclusive range of words in a prompt (>= 1).
        weights: Relative frequencies of the ``agreement``, ``shuffle`` and ``foreign`` corruptions.
        max_chars: Longest sentence used (so that prompt and continuation fit a model's context);
            None keeps all. Both ``prompt + chosen`` and ``prompt + rejected`` fit it.

    Raises:
        ConfigError: on negative sizes, a bad word range or weights that are all zero.
    """
    if min(n_train, n_probe, n_test) < 0:
        raise ConfigError(f"preferences: pair counts must be >= 0, got {n_train}, {n_probe}, {n_test}")
    if prompt_words[0] < 1 or prompt_words[1] < prompt_words[0]:
        raise ConfigError(f"preferences: prompt words range {prompt_words} must satisfy 1 <= min <= max")
    if max_chars is not None and max_chars < 20:
        raise ConfigError(f"preferences: max_chars {max_chars} is too short for any sentence; use >= 20")
    if min(weights) < 0 or sum(weights) <= 0:
        raise ConfigError(f"preferences: corruption weights {weights} must be >= 0 with a positive sum")
    want = {"train": n_train, "probe": n_probe, "test": n_test}
    # Enough sentences for the rarest split to fill, with headroom; doubled until it does.
    n_sentences = int(max(n / share for n, share in zip(want.values(), SPLIT_SHARES)) * 1.3) + 50
    while True:
        out = PreferenceSplits()
        seen: set[str] = set()
        for pair in _pairs(seed, n_sentences, prompt_words, weights, max_chars):
            if pair.prompt in seen:
                continue
            seen.add(pair.prompt)
            name = split_of(pair.prompt, seed)
            bucket = out.split(name)
            if len(bucket) < want[name]:
                bucket.append(pair)
            if all(len(out.split(s)) >= want[s] for s in SPLITS):
                return out
        if n_sentences > 10**8:  # pragma: no cover - only with absurd sizes or filters
            raise ConfigError(f"preferences: cannot find {want} pairs within {n_sentences} sentences; "
                              "ask for fewer pairs or raise max_chars")
        n_sentences *= 2
