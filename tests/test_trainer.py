from __future__ import annotations

import math

import pytest
import torch
import yaml

from stso_env.config import ASSETS_DIR
from stso_env.errors import CheckpointError, ConfigError
from stso_env.train.trainer import Trainer
from tests.helpers import tiny_config


@pytest.fixture(scope="module")
def trainer_and_splits():
    t = Trainer(tiny_config(scenario="calm"))
    return t, t.splits


def fresh(splits, **kw):
    return Trainer(tiny_config(**kw), splits=splits)


def test_tiny_learns_the_builtin_corpus(trainer_and_splits):
    _, splits = trainer_and_splits
    t = fresh(splits, scenario="calm")
    assert t.n_params < 1_000_000 and t.seq_len == 64
    before = t.evaluate(32)["val_loss"]
    stats = t.train_steps(120)
    after = t.evaluate(32)["val_loss"]
    assert math.log(257) - 0.2 < before < math.log(257) + 0.5  # random init ~ uniform over 257 tokens
    assert after < before - 1.5, (before, after)
    s = stats[-1]
    assert s.step == 119 and s.tokens == 8 * 64 and s.flops == t.flops_per_token * 512
    assert not s.skipped and s.clip_policy == "off" and s.lr > 0


def test_lr_schedule_and_knobs(trainer_and_splits):
    _, splits = trainer_and_splits
    t = fresh(splits, scenario="calm", optim__warmup_steps=10, optim__lr=1e-3)
    s0 = t.train_step()
    assert abs(s0.lr - 1e-4) < 1e-12  # (0+1)/10 of the peak
    t.set_knobs(lr_scale=0.5, wd_scale=2.0)
    s1 = t.train_step()
    assert abs(s1.lr - 0.5 * 2e-4) < 1e-12 and abs(s1.weight_decay - 0.2) < 1e-12
    assert t.optimizer.param_groups[0]["weight_decay"] == pytest.approx(0.2)
    with pytest.raises(ConfigError, match="clip_policy"):
        t.set_knobs(clip_policy="sometimes")
    with pytest.raises(ConfigError, match="unknown knob"):
        t.set_knobs(learning_rate=1.0)


def test_replan_schedule_ends_the_cosine_early_and_keeps_the_lr_continuous(trainer_and_splits):
    _, splits = trainer_and_splits
    # steps=100, warm-up 10, floor 0.1 of the peak 1e-3
    t = fresh(splits, scenario="calm", steps=100, optim__warmup_steps=10, optim__lr=1e-3, optim__min_lr_ratio=0.1)
    lrs = [t.train_step().lr for _ in range(30)]
    assert t.schedule_end == 100
    planned = 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 20 / 90))  # the factor at step 30
    t.replan_schedule(50)
    assert t.schedule_end == 50
    lrs += [t.train_step().lr for _ in range(30)]
    assert lrs[30] == pytest.approx(1e-3 * planned, rel=1e-9)  # continuous: step 30 as planned
    mid = 0.1 + (planned - 0.1) * 0.5 * (1 + math.cos(math.pi * 10 / 20))  # halfway down the new tail
    assert lrs[40] == pytest.approx(1e-3 * mid, rel=1e-9)
    assert lrs[50] == pytest.approx(1e-4, rel=1e-9) and lrs[59] == pytest.approx(1e-4, rel=1e-9)  # the floor
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))  # never rises after the warm-up
    with pytest.raises(ConfigError, match="must be after the current step 60"):
        t.replan_schedule(60)


def test_skip_batch_changes_nothing_but_data_position(trainer_and_splits):
    _, splits = trainer_and_splits
    t = fresh(splits, scenario="calm")
    t.train_steps(3)
    before = [p.detach().clone() for p in t.model.parameters()]
    offset = t.sampler.offset
    t.set_knobs(skip_batch=True)
    s = t.train_step()
    assert s.skipped and math.isfinite(s.loss) and s.flops == pytest.approx(t.flops_per_token * 512 / 3)
    assert all(torch.equal(a, b) for a, b in zip(before, t.model.parameters()))
    assert t.sampler.offset == offset + 8 and t.global_step == 4 and not t.knobs.skip_batch


def test_momentum_reset_and_reorder(trainer_and_splits):
    _, splits = trainer_and_splits
    t = fresh(splits, scenario="calm")
    t.train_steps(3)
    seen = {}

    def pre_step(opt, *_):  # what Adam sees right before the reset step's update
        seen["m"] = [st["exp_avg"].abs().max().item() for st in opt.state.values()]
        seen["v"] = [st["exp_avg_sq"].abs().max().item() for st in opt.state.values()]

    handle = t.optimizer.register_step_pre_hook(pre_step)
    t.set_knobs(momentum_reset=True, reorder=True)
    perm = t.sampler.permutation.copy()
    s = t.train_step()
    handle.remove()
    assert s.momentum_reset and s.reordered and not t.knobs.momentum_reset
    assert max(seen["m"]) == 0.0 and min(seen["v"]) > 0.0  # first moment reset, second kept
    assert (t.sampler.permutation != perm).any()


@pytest.mark.parametrize("policy", ["zclip", "arc", "spam"])
def test_clip_policies_run_and_bound(trainer_and_splits, policy):
    _, splits = trainer_and_splits
    t = fresh(splits, scenario="spiky", clip__zclip_warmup=3)
    t.set_knobs(clip_policy=policy)
    stats = t.train_steps(8)
    assert all(s.clip_policy == policy and math.isfinite(s.loss) for s in stats)
    assert all(s.grad_norm_clipped <= s.clip_bound * (1 + 1e-5) for s in stats if math.isfinite(s.clip_bound))
    if policy == "arc":
        # ARC over 4 shards with f=1 clips the largest shard each step: the bound is finite
        assert all(math.isfinite(s.clip_bound) for s in stats)


def test_grad_scale_shock_is_capped(trainer_and_splits):
    _, splits = trainer_and_splits
    t = fresh(splits, scenario="calm")
    t.scenario.events = []
    from stso_env.train.scenario import ScenarioEvent
    t.scenario.events = [ScenarioEvent(kind="grad_scale", every=1000, start=5, duration=1, strength=100.0)]
    stats = t.train_steps(7)
    assert stats[5].noise == ["grad_scale"]
    assert stats[5].grad_norm > 20 * stats[4].grad_norm
    assert stats[5].grad_norm_clipped == pytest.approx(1.0, rel=1e-4)


def test_state_dict_matches_schema(trainer_and_splits):
    _, splits = trainer_and_splits
    t = fresh(splits)
    t.train_steps(2)
    schema = yaml.safe_load((ASSETS_DIR / "state_schema_v1.yaml").read_text())
    state = t.state_dict()
    assert set(state) == set(schema["training_state"])
    for key, spec in schema["training_state"].items():
        if "fields" in spec:
            assert set(state[key]) == set(spec["fields"]), key


def test_resume_refuses_other_config(trainer_and_splits):
    _, splits = trainer_and_splits
    a = fresh(splits)
    b = fresh(splits, optim__lr=1e-4)
    with pytest.raises(CheckpointError, match=r"optim\.lr"):
        b.load_state_dict(a.state_dict())


def test_bf16_autocast_runs_on_cpu(trainer_and_splits):
    _, splits = trainer_and_splits
    t = fresh(splits, precision="bf16")
    s = t.train_steps(2)
    assert all(math.isfinite(x.loss) for x in s)


def test_activation_summary(trainer_and_splits):
    _, splits = trainer_and_splits
    t = fresh(splits)
    rows = t.activation_summary()
    assert len(rows) == 2
    for r in rows:
        assert 0.0 < r["act_entropy"] <= 1.0 and 0.0 < r["attn_entropy"] <= 1.0 and r["act_std"] > 0


def test_pretrained_local_folder_seeds_the_weights(trainer_and_splits, tmp_path):
    from stso_env.train.presets import build_model
    _, splits = trainer_and_splits
    src = build_model("tiny", 257)
    src.save_pretrained(tmp_path / "m")
    t = fresh(splits, model__pretrained=str(tmp_path / "m"))
    for k, v in src.state_dict().items():
        assert torch.equal(v, t.model.state_dict()[k]), k
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="no config.json"):
        fresh(splits, model__pretrained=str(tmp_path / "empty"))
    with pytest.raises(ConfigError, match="vocabulary has 257 entries but the tokenizer has 50257"):
        build_model("tiny", 50257, pretrained=str(tmp_path / "m"))


def test_presets_have_the_published_sizes():
    from stso_env.train.presets import gpt2_config
    from transformers import GPT2LMHeadModel
    with torch.device("meta"):  # no memory, just shapes
        n = {p: sum(x.numel() for x in GPT2LMHeadModel(gpt2_config(p, 50257)).parameters())
             for p in ("small", "medium", "large")}
    assert round(n["small"] / 1e6) == 124 and round(n["medium"] / 1e6) == 355 and round(n["large"] / 1e6) == 774
