"""The gold reward: how much of a text is well-formed in the built-in language.

An RLHF run optimises a *learned* reward model, which can be fooled; over-optimisation
(Gao et al. 2022) is only visible against a reward that cannot be fooled. The built-in
corpus (:mod:`stso_env.train.corpus`) comes from a known grammar, so the grammar itself
is that gold reward: :func:`gold_score` parses a text with the grammar's own lexicon and
rules and returns the share of well-formed clauses. It is a pure function of the text
(no model, no randomness), cheap enough to score every completion of a run.

What is checked
---------------
Sentences end with ``"."``; a sentence is cut at ``", "`` into *segments*. The first
segment must be a clause, every later one a subordinator or coordinator followed by a
clause. A clause follows the corpus grammar::

    Clause -> NP_top V VP_rest [Adv]
    NP_top -> Det_n Adj* N_n [Prep Det_m Adj* N_m]
    VP_rest-> NP_top | Prep Det_m Adj* N_m

with number agreement between determiner and noun (``n``, ``m``: singular or plural)
and between the subject's number and the verb's suffix (``-a`` singular, ``-on``
plural), whatever stands between them. Every word must be a surface form of the
lexicon (the first letter of a sentence may be a capital).

Scoring
-------
A sentence's credit is the share of its segments that are well-formed clauses; the
text's score is the mean credit over its sentences. A trailing sentence without its
full stop (a completion cut by a token budget) is scored as a *prefix*: a segment
counts when it can still be completed to a clause, so running out of tokens is not an
error, while a wrong word is. A text with no words scores 0. So a corpus sentence
scores 1, a sentence with one agreement error scores 0 (one clause) or 0.5 (two
clauses), and random letters score about 0.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass

from stso_env.train.corpus import lexicon

# Word classes of the lexicon (surface forms are unique across classes, so a word has one).
DET, NOUN, VERB, ADJ, ADV, PREP, SUB, COORD = "det", "noun", "verb", "adj", "adv", "prep", "sub", "coord"
SING, PLUR = "sing", "plur"

_SENTENCE_END = re.compile(r"(?<=\.)\s*")


@dataclass(frozen=True)
class WordInfo:
    """Class of one surface form; ``number`` is SING/PLUR for determiners, nouns and verbs, else None.
    ``index`` is the lexeme's position in its class (the same for both numbers of a noun or verb)."""

    cls: str
    number: str | None
    index: int


@functools.lru_cache(maxsize=1)
def lexicon_index() -> dict[str, WordInfo]:
    """Every surface form of the built-in lexicon mapped to its class, number and lexeme index."""
    lex = lexicon()
    table: dict[str, WordInfo] = {}

    def add(words: tuple[str, ...], cls: str, number: str | None) -> None:
        for i, w in enumerate(words):
            table[w] = WordInfo(cls, number, i)

    add(lex.det_sing, DET, SING)
    add(lex.det_plur, DET, PLUR)
    add(lex.noun_sing, NOUN, SING)
    add(lex.noun_plur, NOUN, PLUR)
    add(lex.verb_sing, VERB, SING)
    add(lex.verb_plur, VERB, PLUR)
    add(lex.adjectives, ADJ, None)
    add(lex.adverbs, ADV, None)
    add(lex.prepositions, PREP, None)
    add(lex.subordinators, SUB, None)
    add(lex.coordinators, COORD, None)
    return table


@functools.lru_cache(maxsize=1)
def _word_prefixes() -> frozenset[str]:
    """Proper prefixes of the lexicon's surface forms (a completion may stop inside a word)."""
    return frozenset(w[:k] for w in lexicon_index() for k in range(1, len(w)))


def verb_form(index: int, number: str) -> str:
    """The verb with lexeme ``index`` inflected for a ``number`` subject (SING ``-a``, PLUR ``-on``)."""
    lex = lexicon()
    return (lex.verb_sing if number == SING else lex.verb_plur)[index]


class _Fail(Exception):
    """Raised inside the parser: ``at_end`` says whether the input ran out (a viable prefix)."""

    def __init__(self, at_end: bool) -> None:
        super().__init__(at_end)
        self.at_end = at_end


class _Clause:
    """LL(1) recursive-descent recogniser of one clause over a list of :class:`WordInfo` (None = unknown)."""

    def __init__(self, words: list[WordInfo | None]) -> None:
        self.words = words
        self.pos = 0

    def _peek(self) -> WordInfo | None:
        if self.pos >= len(self.words):
            raise _Fail(at_end=True)
        return self.words[self.pos]

    def _take(self, cls: str, number: str | None = None) -> WordInfo:
        w = self._peek()
        if w is None or w.cls != cls or (number is not None and w.number != number):
            raise _Fail(at_end=False)
        self.pos += 1
        return w

    def _next_is(self, cls: str) -> bool:
        return self.pos < len(self.words) and self.words[self.pos] is not None \
            and self.words[self.pos].cls == cls  # type: ignore[union-attr]

    def _np(self, with_pp: bool) -> str:
        det = self._take(DET)
        while self._peek() is not None and self._peek().cls == ADJ:  # type: ignore[union-attr]
            self.pos += 1
        self._take(NOUN, det.number)
        if with_pp and self._next_is(PREP):
            self.pos += 1
            self._np(with_pp=False)
        return det.number  # type: ignore[return-value]

    def parse(self) -> None:
        """Consume a whole clause; raise :class:`_Fail` unless the words are exactly one clause."""
        number = self._np(with_pp=True)
        self._take(VERB, number)
        if self._next_is(PREP):
            self.pos += 1
            self._np(with_pp=False)
        else:
            self._np(with_pp=True)
        if self._next_is(ADV):
            self.pos += 1
        if self.pos != len(self.words):
            raise _Fail(at_end=False)


def _segment_ok(tokens: list[str], first: bool, complete: bool) -> bool:
    """Whether one comma-separated segment is a clause (``complete``) or can still become one."""
    index = lexicon_index()
    words = [index.get(t) for t in tokens]
    if not first:
        if not words:
            return not complete
        if words[0] is None or words[0].cls not in (SUB, COORD):
            return False
        words = words[1:]
    try:
        _Clause(words).parse()
    except _Fail as fail:
        return fail.at_end and not complete
    return True


def sentence_credit(sentence: str, *, complete: bool = True) -> float:
    """Share of well-formed segments of one sentence (see the module docstring).

    Args:
        sentence: One sentence, with or without its final ``"."``.
        complete: False for a trailing fragment: a segment that could still be completed counts.
    """
    body = sentence.strip()
    if body.endswith("."):
        body = body[:-1]
    if not body:
        return 0.0
    body = body[0].lower() + body[1:]
    if not complete:
        body = body.rstrip(" ")
        last = body.rsplit(" ", 1)[-1]
        if last not in lexicon_index() and last in _word_prefixes():  # cut inside a word
            body = body[: len(body) - len(last)].rstrip(" ")
            if not body:
                return 1.0
        if body.endswith(","):  # cut right after a comma: the next segment has not started
            body += " "
    segments = body.split(", ")
    good = 0
    for k, seg in enumerate(segments):
        tokens = seg.split(" ") if seg else []
        last = k == len(segments) - 1
        if any(not t for t in tokens):  # double spaces, stray commas
            continue
        good += _segment_ok(tokens, first=k == 0, complete=complete or not last)
    return good / len(segments)


def gold_score(text: str) -> float:
    """Mean sentence credit of ``text`` in [0, 1]: 1 for corpus text, about 0 for gibberish.

    Sentences end at ``"."``; a trailing piece without one is scored as a prefix (module
    docstring). Texts without words score 0.
    """
    pieces = [p for p in _SENTENCE_END.split(text.strip()) if p.strip()]
    if not pieces:
        return 0.0
    credits = [sentence_credit(p, complete=p.rstrip().endswith(".")) for p in pieces]
    return sum(credits) / len(credits)


def completion_score(prompt: str, completion: str) -> float:
    """Gold score of ``prompt + completion`` up to the completion's first sentence end.

    Prompts are sentence starts, so the sentence they begin is what a completion is judged on;
    text after its full stop is ignored, text without one is scored as a prefix.
    """
    end = completion.find(".")
    return gold_score(prompt + (completion[: end + 1] if end >= 0 else completion))
