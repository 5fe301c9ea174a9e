"""T5's span-corruption objective on fixed-length windows, deterministic per (key, row).

Raffel et al. 2020 (T5, section 3.1.4): 15 % of a window's tokens, in spans of mean length 3, are
dropped from the encoder input, each span replaced by one sentinel token; the decoder predicts the
sentinels followed by the tokens they stand for. For a window of ``L`` tokens the noise mask covers
``n = round(0.15 L)`` tokens in ``s = round(n / 3)`` spans, so every row of every batch has the same
lengths, ``L - n + s`` in and ``n + s`` out: no padding, and a batch of windows is one tensor. The
span layout is drawn as in the reference (``random_spans_noise_mask`` of t5.data.preprocessors, also
in transformers' ``run_t5_mlm_flax.py``): both the noise and the non-noise tokens are cut into ``s``
random segments and interleaved, starting with non-noise.

Ids: the tokenizer's ids ``0 .. V-1`` stay; ``V`` is the pad token, which T5 also uses to start the
decoder; ``V+1 .. V+100`` are the sentinels (T5's 100 ``extra_ids``), the ``k``-th span of a row
being ``V+1+k``.

Determinism: a row's layout comes from ``numpy.random.default_rng([*key, row])``, so training
(key: seed and step) and evaluation (a fixed key per split, the row being the window's index) give the
same corruption after a resume, in any batch size, world size or process.
"""

from __future__ import annotations

import numpy as np
import torch

from stso_env.errors import ConfigError

NOISE_DENSITY = 0.15
MEAN_SPAN = 3.0
N_SENTINELS = 100


class SpanCorruption:
    """Turn windows of tokenizer ids into T5 (encoder input, decoder target) pairs.

    Args:
        vocab_size: the tokenizer's vocabulary ``V``; the model's is :attr:`model_vocab_size`.
    """

    def __init__(self, vocab_size: int) -> None:
        self.vocab_size = int(vocab_size)
        self.pad_id = self.pad_id_for(self.model_vocab_size_for(vocab_size))
        self.first_sentinel = self.vocab_size + 1

    @staticmethod
    def model_vocab_size_for(vocab_size: int) -> int:
        return int(vocab_size) + 1 + N_SENTINELS

    @staticmethod
    def pad_id_for(model_vocab_size: int) -> int:
        """The pad / decoder-start id of a model vocabulary built by :meth:`model_vocab_size_for`."""
        return int(model_vocab_size) - 1 - N_SENTINELS

    @property
    def model_vocab_size(self) -> int:
        return self.model_vocab_size_for(self.vocab_size)

    @staticmethod
    def spans(length: int) -> tuple[int, int]:
        """``(noise tokens, spans)`` of a window of ``length`` tokens."""
        noise = min(max(int(round(length * NOISE_DENSITY)), 1), length - 1)
        return noise, max(1, int(round(noise / MEAN_SPAN)))

    @classmethod
    def lengths(cls, length: int) -> tuple[int, int]:
        """``(encoder input, decoder target)`` lengths for windows of ``length`` tokens."""
        noise, spans = cls.spans(length)
        return length - noise + spans, noise + spans

    @classmethod
    def check_length(cls, length: int) -> None:
        if length < 4:
            raise ConfigError(f"data.seq_len: {length} tokens is too short for span corruption; use at least 4")
        if cls.spans(length)[1] > N_SENTINELS:
            raise ConfigError(f"data.seq_len: {length} tokens make {cls.spans(length)[1]} masked spans, more than "
                              f"the {N_SENTINELS} sentinels of a T5 vocabulary; use at most 2000 tokens")

    @staticmethod
    def noise_mask(length: int, rng: np.random.Generator) -> np.ndarray:
        """Boolean mask of the masked tokens of one window (the reference's ``random_spans_noise_mask``)."""
        noise, spans = SpanCorruption.spans(length)

        def segments(items: int) -> np.ndarray:
            cuts = np.arange(items - 1) < spans - 1
            rng.shuffle(cuts)
            return np.bincount(np.cumsum(np.concatenate([[0], cuts])), minlength=spans)

        interleaved = np.stack([segments(length - noise), segments(noise)], axis=1).reshape(-1)
        starts = np.zeros(length, dtype=bool)
        starts[np.cumsum(interleaved)[:-1]] = True
        return np.cumsum(starts) % 2 == 1

    def corrupt(self, windows: torch.Tensor, key: tuple[int, ...] | list[int],
                rows: np.ndarray | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(encoder inputs, decoder targets)`` of a ``(B, L)`` batch of token ids.

        Row ``i`` is corrupted with ``default_rng([*key, rows[i]])`` (``rows`` defaults to ``0..B-1``).
        """
        x = windows.detach().cpu().numpy()
        n, length = x.shape
        self.check_length(length)
        rows = np.arange(n) if rows is None else np.asarray(rows)
        t_in, t_out = self.lengths(length)
        enc = np.empty((n, t_in), dtype=np.int64)
        dec = np.empty((n, t_out), dtype=np.int64)
        for i in range(n):
            mask = self.noise_mask(length, np.random.default_rng([*map(int, key), int(rows[i])]))
            span_start = mask & ~np.concatenate([[False], mask[:-1]])
            sentinel = self.first_sentinel + np.cumsum(span_start) - 1
            # encoder: non-noise tokens, and a span's sentinel in place of its first token
            keep_in = ~mask | span_start
            enc[i] = np.where(span_start, sentinel, x[i])[keep_in]
            # decoder: each span's sentinel, then its tokens
            dec_tokens = np.stack([sentinel, x[i]], axis=1)[mask]  # (noise, 2): [sentinel, token]
            take = np.stack([span_start[mask], np.ones(int(mask.sum()), dtype=bool)], axis=1)
            dec[i] = dec_tokens[take]
        return torch.from_numpy(enc).to(windows.device), torch.from_numpy(dec).to(windows.device)

    def decoder_inputs(self, targets: torch.Tensor) -> torch.Tensor:
        """Targets shifted right behind the start token (teacher forcing), as T5's ``_shift_right``."""
        start = torch.full_like(targets[:, :1], self.pad_id)
        return torch.cat([start, targets[:, :-1]], dim=1)
