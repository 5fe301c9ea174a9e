"""Deterministic, resumable sampler of training windows.

The token stream is cut into non-overlapping windows of ``seq_len + 1`` tokens
(input plus the shifted target). Each epoch visits every window once in an
order drawn from ``numpy.random.default_rng([seed, epoch])``, so the order is a
pure function of ``(seed, epoch)`` until a *data reorder* intervention shuffles
a block of upcoming windows; that is why the permutation itself is part of the
state, not just the seed.

The sampler owns its randomness: it never touches the global numpy/torch RNGs,
which keeps the trainer's RNG streams (dropout, init) independent of the data
order (GUIDE section 3: DataLoader iterators silently draw from the global RNG).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from stso_env.errors import CheckpointError, DataError


class WindowSampler:
    """Yields batches of ``(batch, seq_len + 1)`` token windows in a seeded order."""

    def __init__(self, tokens: np.ndarray, seq_len: int, batch_size: int, seed: int) -> None:
        self.tokens = torch.from_numpy(np.ascontiguousarray(tokens).astype(np.int64, copy=False))
        self.seq_len = int(seq_len)
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.n_windows = (len(tokens) - 1) // self.seq_len
        if self.n_windows < self.batch_size:
            raise DataError(
                f"the training corpus has {len(tokens)} tokens: {self.n_windows} windows of {seq_len}+1 tokens, "
                f"fewer than one batch of {batch_size}; use a larger corpus or smaller data.seq_len/batch_size"
            )
        self.epoch = 0
        self.offset = 0  # windows consumed in the current epoch
        self.reorders = 0  # reorder interventions applied (feeds their seeds)
        self.permutation = self._epoch_permutation(0)

    def _epoch_permutation(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(self.n_windows).astype(np.int64)

    def _advance_epoch(self) -> None:
        self.epoch += 1
        self.offset = 0
        self.permutation = self._epoch_permutation(self.epoch)

    def next_indices(self) -> np.ndarray:
        """Window indices of the next batch; the last partial batch of an epoch is dropped."""
        if self.offset + self.batch_size > self.n_windows:
            self._advance_epoch()
        idx = self.permutation[self.offset:self.offset + self.batch_size]
        self.offset += self.batch_size
        return idx

    def windows(self, idx: np.ndarray) -> torch.Tensor:
        starts = torch.from_numpy(idx * self.seq_len)
        ar = torch.arange(self.seq_len + 1)
        return self.tokens[starts[:, None] + ar[None, :]]

    def next_batch(self) -> torch.Tensor:
        """The next batch as an int64 tensor of shape ``(batch_size, seq_len + 1)``."""
        return self.windows(self.next_indices())

    def reorder(self, block: int) -> None:
        """Shuffle the next ``block`` windows of this epoch (the *data reorder* intervention)."""
        end = min(self.offset + block, self.n_windows)
        if end - self.offset < 2:
            return
        rng = np.random.default_rng([self.seed, self.epoch, self.offset, 1_000_003 + self.reorders])
        seg = self.permutation[self.offset:end].copy()
        self.permutation[self.offset:end] = seg[rng.permutation(len(seg))]
        self.reorders += 1

    def state_dict(self) -> dict[str, Any]:
        return {
            "seed": self.seed,
            "epoch": self.epoch,
            "offset": self.offset,
            "reorders": self.reorders,
            "n_windows": self.n_windows,
            "seq_len": self.seq_len,
            "batch_size": self.batch_size,
            "permutation": self.permutation.copy(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key in ("n_windows", "seq_len", "batch_size"):
            if int(state[key]) != getattr(self, key):
                raise CheckpointError(
                    f"sampler.{key}: the checkpoint has {state[key]} but this run has {getattr(self, key)}; "
                    "resume with the same corpus, tokenizer, data.seq_len and data.batch_size"
                )
        perm = np.asarray(state["permutation"], dtype=np.int64)
        if perm.shape != (self.n_windows,):
            raise CheckpointError(f"sampler.permutation: expected {self.n_windows} entries, got {perm.shape}")
        self.seed = int(state["seed"])
        self.epoch = int(state["epoch"])
        self.offset = int(state["offset"])
        self.reorders = int(state["reorders"])
        self.permutation = perm.copy()
