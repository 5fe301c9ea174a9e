"""RLHF controllers, the M3 verdict, and the tiny end-to-end pipeline (train_controller and evaluate)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from agents.rlhf_controllers import AdaptiveKLController, Rule, make_rlhf_controller
from agents.rlhf_evaluate import m3, summarise
from stso_env.envs.rlhf_env import NEUTRAL_ACTION, RLHFEnv
from stso_env.rlhf.monitor import OBSERVATION_NAMES


def rec(controller, seed, diverged, gold, scenario="overoptimize"):
    return {"scenario": scenario, "controller": controller, "seed": seed, "diverged": diverged,
            "reasons": ["kl"] if diverged else [], "test_gold": gold, "seconds": 1.0}


def test_m3_needs_half_the_divergences_at_no_worse_gold():
    records = [rec("fixed", s, s < 4, 0.20) for s in range(6)]  # fixed: 4 of 6 diverge
    records += [rec("rule", s, s < 2, 0.20 + 0.01 * s) for s in range(6)]  # 2 of 6, gold up
    records += [rec("policy", s, s < 3, 0.30) for s in range(6)]  # 3 of 6: not half
    records += [rec("calm_only", s, False, 0.19) for s in range(6)]  # never diverges, gold lower
    ok = m3(records, "rule", "fixed")
    assert ok["pairs"] == 6 and ok["divergence_rate"] == pytest.approx(1 / 3)
    assert ok["reference_divergence_rate"] == pytest.approx(2 / 3) and ok["divergence_halved"]
    assert ok["gold_no_worse"] and ok["holds"]
    assert not m3(records, "policy", "fixed")["holds"] and m3(records, "policy", "fixed")["gold_no_worse"]
    low = m3(records, "calm_only", "fixed")
    assert low["divergence_halved"] and not low["gold_no_worse"] and not low["holds"]
    never = m3([rec("fixed", 0, False, 0.2), rec("rule", 0, False, 0.3)], "rule", "fixed")
    assert never["divergence_halved"] is None and not never["holds"]  # nothing to halve
    assert m3(records, "rule", "adaptive_kl") is None
    s = summarise(records)["overoptimize"]["fixed"]
    assert s["divergence_rate"] == pytest.approx(4 / 6) and s["reasons"] == {"kl": 4}


class _Env:
    """The parts of the env a controller touches."""

    def __init__(self):
        from stso_env.rlhf.monitor import DivergenceRule
        from stso_env.rlhf.run import Knobs

        self.run = type("R", (), {"knobs": Knobs(beta=0.05)})()
        self.decision_interval = 8
        self.divergence = DivergenceRule()

    def action_masks(self):
        return np.ones(18, dtype=bool)


def test_adaptive_kl_follows_ziegler_and_the_rule_guards():
    env = _Env()
    c = AdaptiveKLController(target=0.1, horizon=400)
    c.reset(env, {})
    assert c.act(np.zeros(len(OBSERVATION_NAMES)), {"kl": 0.3}).tolist() == list(NEUTRAL_ACTION)
    assert env.run.knobs.beta == pytest.approx(0.05 * (1 + 0.2 * 8 / 400))  # error clipped at +0.2
    c.act(np.zeros(len(OBSERVATION_NAMES)), {"kl": 0.09})
    assert env.run.knobs.beta == pytest.approx(0.05 * (1 + 0.2 * 8 / 400) * (1 - 0.1 * 8 / 400))
    r = Rule()
    r.reset(env, {})
    obs = np.zeros(len(OBSERVATION_NAMES), dtype=np.float32)
    obs[OBSERVATION_NAMES.index("entropy_ratio")] = 1.0
    assert r.act(obs, {}).tolist() == list(NEUTRAL_ACTION)
    obs[OBSERVATION_NAMES.index("kl_max")] = 0.5
    obs[OBSERVATION_NAMES.index("entropy_ratio")] = 0.5
    obs[OBSERVATION_NAMES.index("u_reward_volatility")] = 4.0
    assert r.act(obs, {}).tolist() == [0, 2, 1, 0, 1, 1]
    with pytest.raises(ValueError, match="policy:PATH"):
        make_rlhf_controller("policy")
    with pytest.raises(ValueError, match="unknown RLHF controller"):
        make_rlhf_controller("pbt")


def test_tiny_pipeline_end_to_end(rlhf_tiny, tmp_path):
    """agents.train_controller --env STSO-RLHF-v0 on the tiny size: real MaskablePPO in the real env, the
    saved policy evaluated with fixed and adaptive KL on held-out seeds through agents.evaluate."""
    from agents.evaluate import main as evaluate_main
    from agents.train_controller import main as train_main

    _, root, _ = rlhf_tiny
    code = train_main(["--env", "STSO-RLHF-v0", "--size", "tiny", "--prepared", str(root), "--interval", "4",
                       "--total-timesteps", "4", "--n-steps", "4", "--eval-seeds", "1", "--workers", "1", "--runs-dir",
                       str(tmp_path), "--run-name", "r", "--no-progress"])
    assert code == 0
    run = tmp_path / "r"
    assert (run / "policy.zip").is_file() and (run / "report.md").is_file()
    assert list((run / "tb").rglob("events.out.tfevents.*")) and (run / "train" / "log_db.parquet").is_dir()
    summary = json.loads((run / "summary.json").read_text())
    assert summary["rl"]["timesteps"] == 4
    policy = f"policy:{run / 'policy.zip'}"
    assert set(summary["m3"]) == {f"{policy} vs fixed", f"{policy} vs adaptive_kl", "adaptive_kl vs fixed"}
    assert summary["m3"]["adaptive_kl vs fixed"]["divergence_halved"] is None or summary["m3"][
        "adaptive_kl vs fixed"]["reference_divergence_rate"] > 0
    out = evaluate_main(["--env", "STSO-RLHF-v0", "--size", "tiny", "--prepared", str(root), "--interval", "4",
                         "--scenarios", "calm", "--controllers", "fixed,rule", "--seeds", "1", "--workers", "1",
                         "--out", str(tmp_path / "eval"), "--no-progress"])
    assert [e["controller"] for e in out["episodes"]] == ["fixed", "rule"]
    assert out["episodes"][0]["steps"] == 16 and 0.0 <= out["episodes"][0]["test_gold"] <= 1.0
    assert "M3" in (tmp_path / "eval" / "report.md").read_text()


def test_bad_controller_and_scenario_arguments_exit_2(rlhf_tiny, tmp_path, capsys):
    from agents.rlhf_evaluate import main

    _, root, _ = rlhf_tiny
    assert main(["--controllers", "fixed,pbt", "--size", "tiny", "--prepared", str(root)]) == 2
    assert "unknown 'pbt'" in capsys.readouterr().err
    assert main(["--controllers", "policy:/nope.zip", "--size", "tiny", "--prepared", str(root)]) == 2
    assert "no such file" in capsys.readouterr().err
    assert main(["--scenarios", "nope", "--size", "tiny", "--prepared", str(root)]) == 2
    assert "no such RLHF scenario" in capsys.readouterr().err
    from stso_env.errors import ConfigError

    with pytest.raises(ConfigError, match="decision_interval=100"):
        RLHFEnv(size="tiny", prepared=str(root), decision_interval=100)
