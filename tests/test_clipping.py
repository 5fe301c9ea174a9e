from __future__ import annotations

import math

import torch

from stso_env.train.clipping import ZClip, arc_combine, arc_k, spam_clip_


def test_zclip_warmup_then_adaptive_threshold():
    z = ZClip(alpha=0.97, z_thresh=2.5, warmup=4)
    for g in (1.0, 1.2, 0.8, 1.0):
        assert z.threshold(g) is None
    assert z.mean == 1.0 and abs(z.var - 0.02) < 1e-12
    std = math.sqrt(0.02)
    g = 3.0
    zscore = (g - 1.0) / (std + 1e-6)
    expected = 1.0 + 2.5 * std / (zscore / 2.5)  # mu + z_thr^2 sigma / z
    thr = z.threshold(g)
    assert abs(thr - expected) < 1e-12
    # EMA updated with the clip value, variance with the updated mean (reference behaviour)
    m = 0.97 * 1.0 + 0.03 * expected
    assert abs(z.mean - m) < 1e-12
    assert abs(z.var - (0.97 * 0.02 + 0.03 * (expected - m) ** 2)) < 1e-12
    # A normal step is not clipped
    assert z.threshold(1.05) is None


def test_zclip_state_round_trip():
    a = ZClip(warmup=2)
    for g in (1.0, 2.0, 1.5):
        a.threshold(g)
    b = ZClip(warmup=2)
    b.load_state_dict(a.state_dict())
    assert b.threshold(10.0) == a.threshold(10.0)


def test_arc_k_and_combine():
    assert arc_k(4, 1) == 1 and arc_k(10, 2) == 3 and arc_k(4, 0) == 0
    g = torch.tensor([[3.0, 4.0], [0.0, 1.0], [0.0, 2.0], [30.0, 40.0]])  # norms 5, 1, 2, 50
    mean, bound, k = arc_combine(g, f=1)
    assert k == 1 and bound == 5.0
    expected = (g[0] + g[1] + g[2] + g[3] * (5.0 / 50.0)) / 4
    assert torch.allclose(mean, expected)


def test_spam_clip_against_second_moment():
    p = torch.nn.Parameter(torch.zeros(4))
    opt = torch.optim.AdamW([p], lr=0.1)
    p.grad = torch.tensor([1.0, 1.0, 1.0, 1.0])
    opt.step()
    v = opt.state[p]["exp_avg_sq"].clone()
    p.grad = torch.tensor([1.0, -1000.0, 0.5, 10000.0])
    n = spam_clip_([p], opt, theta=5000.0)
    lim = float(torch.sqrt(5000.0 * v)[0])  # v = (1 - 0.999) * 1^2, so the limit is sqrt(5) = 2.236
    assert abs(lim - 5 ** 0.5) < 1e-5
    assert n == 2
    assert torch.allclose(p.grad, torch.tensor([1.0, -lim, 0.5, lim]))
