"""The fast attention path: training steps on SDPA, the probe pass on eager attention (for attention entropy)."""

from __future__ import annotations

import math

from stso_env.train.trainer import Trainer
from tests.helpers import tiny_config


def test_sdpa_trains_like_eager_and_the_probe_still_measures_attention_entropy():
    eager = Trainer(tiny_config(seed=2))
    fast = Trainer(tiny_config(seed=2, **{"model__attn_implementation": "sdpa"}))
    assert fast.model.config._attn_implementation == "sdpa"
    loss_e, rows_e = eager.probe()
    loss_f, rows_f = fast.probe()
    assert fast.model.config._attn_implementation == "sdpa"  # switched back after the eager probe pass
    assert all(math.isfinite(r["attn_entropy"]) for r in rows_f)
    assert max(abs(a["attn_entropy"] - b["attn_entropy"]) for a, b in zip(rows_e, rows_f)) == 0.0  # same pass
    assert loss_f == loss_e
    le = [s.loss for s in eager.train_steps(4)]
    lf = [s.loss for s in fast.train_steps(4)]
    # two kernels, one function: fp32 rounding apart, measured below 1e-5 on CPU
    assert max(abs(a - b) for a, b in zip(le, lf)) < 1e-4
    assert le[0] != le[-1]


def test_compiled_training_passes_match_eager():
    plain = Trainer(tiny_config(seed=3))
    compiled = Trainer(tiny_config(seed=3), compile_model=True)
    lp = [s.loss for s in plain.train_steps(3)]
    lc = [s.loss for s in compiled.train_steps(3)]
    assert max(abs(a - b) for a, b in zip(lp, lc)) < 1e-4  # fused kernels round differently, nothing more
    assert compiled.state_dict()["model"].keys() == plain.state_dict()["model"].keys()  # state: the plain module
