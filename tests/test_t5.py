"""The T5 family: span corruption, the presets, the Trainer contract on t5-tiny, and STSO-T5-v0."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest
import torch

import stso_env  # noqa: F401  (registers the envs)
from stso_env import cp
from stso_env.config import config_hash
from stso_env.envs.t5_env import T5Env
from stso_env.errors import ConfigError
from stso_env.train.span_corruption import N_SENTINELS, SpanCorruption
from stso_env.train.trainer import Trainer
from tests.helpers import tiny_config

V = 1000


def uncorrupt(enc: np.ndarray, dec: np.ndarray, first_sentinel: int) -> list[int]:
    """Put each span of the target back in place of its sentinel in the input."""
    spans: dict[int, list[int]] = {}
    cur = None
    for tok in dec:
        if tok >= first_sentinel:
            cur = spans.setdefault(int(tok), [])
        else:
            cur.append(int(tok))
    out = []
    for tok in enc:
        out += spans[int(tok)] if tok >= first_sentinel else [int(tok)]
    return out


def test_span_corruption_inverts_and_has_t5_statistics():
    sc = SpanCorruption(V)
    assert (sc.pad_id, sc.first_sentinel, sc.model_vocab_size) == (V, V + 1, V + 1 + N_SENTINELS)
    x = torch.randint(0, V, (64, 64), generator=torch.Generator().manual_seed(0))
    enc, dec = sc.corrupt(x, (7, 1))
    # 64 tokens: round(9.6) = 10 masked in round(10 / 3) = 3 spans -> 64 - 10 + 3 in, 10 + 3 out
    assert SpanCorruption.lengths(64) == (57, 13) and enc.shape == (64, 57) and dec.shape == (64, 13)
    assert SpanCorruption.lengths(512) == (461, 103)  # T5's own 512-token inputs: 77 masked in 26 spans
    for i in range(len(x)):
        assert uncorrupt(enc[i].numpy(), dec[i].numpy(), sc.first_sentinel) == x[i].tolist()
        # the sentinels are V+1, V+2, V+3 in order, in both halves
        assert enc[i][enc[i] > V].tolist() == dec[i][dec[i] > V].tolist() == [V + 1, V + 2, V + 3]
    # the layout is drawn per (key, row): the same row alone gives the same pair, another key another
    e5, d5 = sc.corrupt(x[5:6], (7, 1), rows=np.array([5]))
    assert torch.equal(e5[0], enc[5]) and torch.equal(d5[0], dec[5])
    assert not torch.equal(sc.corrupt(x, (7, 2))[0], enc)
    assert torch.equal(sc.decoder_inputs(dec)[:, 0], torch.full((64,), V)) and torch.equal(
        sc.decoder_inputs(dec)[:, 1:], dec[:, :-1])
    # spans start anywhere but at position 0 (the reference's layout starts with kept tokens)
    starts = {int(np.flatnonzero(SpanCorruption.noise_mask(64, np.random.default_rng(s)))[0]) for s in range(50)}
    assert min(starts) >= 1 and len(starts) > 10
    with pytest.raises(ConfigError, match="data.seq_len"):
        sc.corrupt(torch.zeros((1, 4000), dtype=torch.long), (0,))


def test_t5_presets_have_the_published_sizes():
    from transformers import T5ForConditionalGeneration

    from stso_env.train.presets import t5_config
    with torch.device("meta"):
        n = {p: sum(x.numel() for x in T5ForConditionalGeneration(t5_config(p, 32128)).parameters())
             for p in ("t5-small", "t5-base")}
    # Hugging Face's t5-small and t5-base (vocabulary 32128, tied embeddings)
    assert n == {"t5-small": 60_506_624, "t5-base": 222_903_552}
    with pytest.raises(ConfigError, match="model.pretrained"):
        Trainer(tiny_config(model__preset="t5-tiny", model__pretrained="t5-small"))


def t5_config(**kw):
    return tiny_config(model__preset="t5-tiny", data__builtin_chars=100_000, **kw)


def test_t5_trainer_learns_checkpoints_and_resumes_exactly(tmp_path):
    cfg = t5_config(scenario="spiky", model__dropout=0.1, clip__zclip_warmup=5)
    t = Trainer(cfg)
    assert type(t.model).__name__ == "T5ForConditionalGeneration" and t.span_corruption is not None
    t.set_knobs(clip_policy="zclip")
    first = [s.loss for s in t.train_steps(10)]
    cp.save(t.state_dict(), tmp_path / "cp.ptz")
    t.set_knobs(reorder=True, momentum_reset=True)
    straight = [s.loss for s in t.train_steps(10)]
    params = {k: v.clone() for k, v in t.model.state_dict().items()}
    assert straight[-1] < first[0] - 1.0  # it learns: ~7.2 -> ~4 nats in 20 steps

    r = Trainer(cfg, splits=t.splits)
    r.load_state_dict(cp.load(tmp_path / "cp.ptz"))
    r.set_knobs(reorder=True, momentum_reset=True)
    assert [s.loss for s in r.train_steps(10)] == straight  # exact float equality
    for k, v in r.model.state_dict().items():
        assert torch.equal(v, params[k]), k

    ev = t.evaluate(16)
    assert ev["val_loss"] == t.evaluate(16)["val_loss"] and np.isfinite(ev["val_loss"])  # fixed masks
    probe, rows = t.probe()
    assert probe == t.probe_loss()
    # 2 encoder + 2 decoder blocks, entropies normalised to [0, 1]
    assert len(rows) == 4 and all(0 < r["attn_entropy"] <= 1 and 0 < r["act_entropy"] <= 1 for r in rows)
    assert len(t.activation_summary(2)) == 4


def test_activation_checkpointing_computes_the_same_numbers():
    for preset in ("tiny", "t5-tiny"):
        plain = tiny_config(model__preset=preset, model__dropout=0.1, data__builtin_chars=100_000)
        ckpt = tiny_config(model__preset=preset, model__dropout=0.1, data__builtin_chars=100_000,
                           model__gradient_checkpointing=True)
        # a memory option: the hash (and so every checkpoint's resume check) ignores it
        assert config_hash(plain) == config_hash(ckpt)
        losses = []
        for cfg in (plain, ckpt):  # one after the other: a trainer draws dropout from the global RNG it seeds
            t = Trainer(cfg)
            assert t.model.is_activation_checkpointing == cfg.model.gradient_checkpointing
            losses.append([s.loss for s in t.train_steps(4)])
        assert losses[0] == losses[1], preset


FAST = {"scenario": "spiky", "decision_interval": 5, "episode_steps": 20}
ACTIONS = [[2, 1, 0, 0, 0, 0], [0, 2, 1, 1, 1, 0], [3, 0, 2, 0, 0, 0]]


def test_t5_env_keeps_the_env_contract():
    # (Gymnasium's env checker runs on it in test_gpt2_env.py)
    a, b = gym.make("STSO-T5-v0", **FAST), gym.make("STSO-T5-v0", **FAST)
    assert a.unwrapped.trainer is None and a.unwrapped._kwargs["preset"] == "t5-tiny"
    oa, _ = a.reset(seed=4)
    ob, _ = b.reset(seed=4)
    assert np.array_equal(oa, ob) and a.observation_space.contains(oa)
    assert type(a.unwrapped.trainer.model).__name__ == "T5ForConditionalGeneration"
    a.step(ACTIONS[1])
    b.step(ACTIONS[1])
    child = a.unwrapped.fork()
    assert type(child) is T5Env
    sid = b.unwrapped.snapshot()
    ra = [a.step(x)[:2] for x in ACTIONS[2:]]
    rc = [child.step(x)[:2] for x in ACTIONS[2:]]
    rb = [b.step(x)[:2] for x in ACTIONS[2:]]
    b.unwrapped.restore(sid)
    rb2 = [b.step(x)[:2] for x in ACTIONS[2:]]
    for (o1, x1), (o2, x2), (o3, x3), (o4, x4) in zip(ra, rc, rb, rb2):
        assert np.array_equal(o1, o2) and np.array_equal(o1, o3) and np.array_equal(o1, o4)
        assert x1 == x2 == x3 == x4
    for e in (a, b, child):
        e.close()
    with pytest.raises(ConfigError, match="not a T5 preset"):
        gym.make("STSO-T5-v0", preset="tiny")
