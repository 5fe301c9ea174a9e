from __future__ import annotations

import numpy as np
import pytest

from stso_env.errors import CheckpointError, DataError
from stso_env.train.sampler import WindowSampler


def make(seed=0):
    return WindowSampler(np.arange(1001, dtype=np.int32), seq_len=10, batch_size=4, seed=seed)


def test_windows_and_epochs_cover_everything_once():
    s = make()
    assert s.n_windows == 100
    seen = []
    for _ in range(25):
        b = s.next_batch()
        assert b.shape == (4, 11)
        assert (b[:, 1:] - b[:, :-1] == 1).all()  # contiguous windows with the shifted target
        seen += (b[:, 0] // 10).tolist()
    assert sorted(seen) == list(range(100)) and s.epoch == 0
    s.next_batch()
    assert s.epoch == 1 and s.offset == 4


def test_same_seed_same_order_other_seed_other_order():
    a, b, c = make(0), make(0), make(1)
    xa = [a.next_batch() for _ in range(5)]
    xb = [b.next_batch() for _ in range(5)]
    xc = [c.next_batch() for _ in range(5)]
    assert all((p == q).all() for p, q in zip(xa, xb))
    assert not all((p == q).all() for p, q in zip(xa, xc))


def test_state_round_trip_including_reorder():
    a = make()
    a.next_batch()
    a.reorder(16)
    st = a.state_dict()
    b = make()
    b.load_state_dict(st)
    for _ in range(40):  # crosses an epoch boundary
        assert (a.next_batch() == b.next_batch()).all()


def test_reorder_shuffles_only_the_next_block():
    a, b = make(), make()
    a.next_batch(), b.next_batch()
    before = a.permutation.copy()
    a.reorder(8)
    assert sorted(a.permutation[4:12]) == sorted(before[4:12])
    assert (a.permutation[4:12] != before[4:12]).any()
    assert (a.permutation[12:] == before[12:]).all() and (a.permutation[:4] == before[:4]).all()


def test_errors():
    with pytest.raises(DataError, match="fewer than one batch"):
        WindowSampler(np.arange(30), seq_len=10, batch_size=4, seed=0)
    s = make()
    st = s.state_dict()
    other = WindowSampler(np.arange(1001), seq_len=20, batch_size=4, seed=0)
    with pytest.raises(CheckpointError, match="sampler.n_windows"):
        other.load_state_dict(st)
