"""agents.train_controller: settings, errors, and one whole run end to end in a subprocess."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml

from agents.train_controller import ControllerTrainConfig, build_config, parse_args, shield_counts
from stso_env.config import from_dict
from stso_env.errors import ConfigError

from tests.conftest import REPO, WIKITEXT2

TINY = {
    "builtin_chars": 200_000,
    "collect": {"episodes": 10, "episode_steps": 150, "policy_episodes": 2},
    "proxy": {"horizon": 2, "epochs": 15, "ensemble": 2, "hidden": 32},
    "rl": {"total_timesteps": 256, "n_steps": 64, "batch_size": 64, "eval_freq": 128, "n_envs": 2,
           "iterations": 2},
    "eval": {"seeds": 2, "steps": 30},
}


def _yaml(tmp_path, data: dict) -> object:
    path = tmp_path / "settings.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_flags_override_yaml_and_bad_keys_are_named(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"rl": {"total_timesteps": 100}, "seed": 4}))
    cfg = build_config(parse_args(["--config", str(path), "--total-timesteps", "999"]))
    assert cfg.rl.total_timesteps == 999 and cfg.seed == 4 and cfg.rl.algo == "model_based"
    # model-free algorithms learn in the real env unless told otherwise
    assert build_config(parse_args(["--algo", "ppo"])).rl.env == "STSO-GPT2-v0"
    path.write_text(yaml.safe_dump({"rl": {"total_timestep": 100}}))
    with pytest.raises(ConfigError, match=r"rl\.total_timestep: unknown key"):
        build_config(parse_args(["--config", str(path)]))
    with pytest.raises(ConfigError, match="model_based learns in STSO-Proxy-v0"):
        build_config(parse_args(["--algo", "model_based", "--env", "STSO-GPT2-v0"]))
    with pytest.raises(ConfigError, match="must include 'policy' and 'fixed'"):
        from_dict(ControllerTrainConfig, {"eval": {"controllers": ["fixed"]}})
    with pytest.raises(ConfigError, match="rl.iterations: 2 iterations refit a proxy"):
        build_config(parse_args(["--algo", "ppo", "--config", str(_yaml(tmp_path, {"rl": {"iterations": 2}}))]))


def test_help_explains_every_option():
    out = subprocess.run([sys.executable, "-m", "agents.train_controller", "--help"], cwd=REPO,
                         capture_output=True, text=True, check=True).stdout
    for flag in ("--algo", "--env", "--total-timesteps", "--config", "--seed", "model_based", "rl.n_steps"):
        assert flag in out, flag


@pytest.mark.slow
def test_end_to_end_tiny(tmp_path):
    cfg = dict(TINY, runs_dir=str(tmp_path))
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg))
    proc = subprocess.run([sys.executable, "-m", "agents.train_controller", "--config", str(path), "--run-name",
                           "e2e", "--no-progress"], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = tmp_path / "e2e"
    for name in ("policy.zip", "gate.json", "config.yaml", "report.md", "proxy/proxy.json", "proxy/proxy.safetensors",
                 "proxy/proxy_report.json", "figures/learning_curve.png", "eval/results.json",
                 "eval/figures/loss_curves.png", "eval/figures/uncertainty_timeline.png"):
        assert (run / name).is_file(), name
    assert list((run / "tb").rglob("events.out.tfevents.*")), "no TensorBoard event file"
    # the resolved config is complete and loads back strictly
    resolved = from_dict(ControllerTrainConfig, yaml.safe_load((run / "config.yaml").read_text()))
    assert resolved.collect.episodes == 10 and resolved.rl.total_timesteps == 256 and resolved.rl.iterations == 2
    results = json.loads((run / "eval" / "results.json").read_text())
    assert set(results["controllers"]) == {"fixed", "policy"}
    assert len(results["controllers"]["policy"]["seeds"]) == 2
    report = (run / "report.md").read_text()
    assert "## 5. Held-out real episodes" in report and "| policy |" in report
    # the outcome gate: fitted on real runs of training seeds, read by every evaluation run of the policy
    from agents.controllers.outcome_gate import OutcomeGate

    gate = OutcomeGate.load(run / "gate.json")
    assert [r["seed"] for r in gate.runs] == [200000, 200001, 200002] * 2
    assert {r["scenario"] for r in gate.runs} == {"spiky", "adam_v_lag"}
    assert "## 4. Outcome gate" in report and "Outcome gate: open in" in report and (run / "gate.md").is_file()
    for record in (run / "eval" / "runs").rglob("policy__seed*.json"):
        d = json.loads(record.read_text())["setup"]["describe"]
        assert d["gate"] == str(run / "gate.json") and not d["shield"] and d["gate_open"] in (True, False)
    # the proxy's figure over every held-out run and the yardstick it has to beat
    assert "held-out runs (calibration and test; none trained on)" in report
    assert "the probe loss stays where it is" in report
    # a second, model-based iteration: 2 episodes with the policy (seeds 10 and 11, after the 10 collected),
    # a proxy refitted with the first fit's test runs (seeds 8 and 9; by default 10 and 11 now) held out,
    # and 256 more policy steps from where the first iteration stopped
    from stso_env.proxy.logdb import read_log_db

    log = read_log_db(run / "log_db.parquet")
    assert sorted(set(log.column("seed").to_pylist())) == list(range(12))
    assert json.loads((run / "proxy" / "proxy_report.json").read_text())["test_seeds"] == [8, 9]
    summary = json.loads((run / "summary.json").read_text())
    assert [r["iteration"] for r in summary["iterations"]] == [1, 2]
    assert [r["timesteps"] for r in summary["iterations"]] == [256, 512] and summary["rl"]["timesteps"] == 512
    assert summary["collect"]["episodes"] == 12 and summary["iterations"][1]["episodes"] == 2
    assert "| 2 | 2 | " in report and "model-based iterations (collect with the policy, refit, retrain): **on**" \
        in report
    from agents.controllers.learned import load_policy

    assert load_policy(run / "policy.zip").num_timesteps == 512
    # a second run into the same folder is refused without --overwrite, and nothing is lost
    before = (run / "policy.zip").read_bytes()
    again = subprocess.run([sys.executable, "-m", "agents.train_controller", "--config", str(path), "--run-name",
                            "e2e", "--no-progress"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert again.returncode == 2 and "--overwrite" in again.stderr
    assert (run / "policy.zip").read_bytes() == before


def test_model_free_ppo_in_the_real_env(tmp_path):
    from agents.train_controller import main

    path = tmp_path / "mf.yaml"
    path.write_text(yaml.safe_dump({
        "runs_dir": str(tmp_path), "builtin_chars": 200_000, "collect": {"episode_steps": 40},
        "rl": {"total_timesteps": 32, "n_steps": 16, "batch_size": 16, "eval_freq": 16, "n_envs": 1},
        "eval": {"seeds": 1, "steps": 30}}))
    assert main(["--config", str(path), "--algo", "ppo", "--run-name", "mf", "--no-progress"]) == 0
    run = tmp_path / "mf"
    # model-free: nothing collected, no proxy; the policy learned in STSO-GPT2-v0 and is plain PPO
    assert not (run / "log_db.parquet").exists() and not (run / "proxy").exists()
    resolved = yaml.safe_load((run / "config.yaml").read_text())
    assert resolved["rl"]["algo"] == "ppo" and resolved["rl"]["env"] == "STSO-GPT2-v0"
    from agents.controllers.learned import policy_algorithm

    assert policy_algorithm(run / "policy.zip") == "ppo"
    assert list((run / "tb").rglob("events.out.tfevents.*"))
    results = json.loads((run / "eval" / "results.json").read_text())
    assert set(results["controllers"]) == {"fixed", "policy"}


def test_shield_counts_add_up_over_the_policy_runs(tmp_path):
    cell = tmp_path / "runs" / "spiky__builtin"
    cell.mkdir(parents=True)
    for seed, (proposed, shielded) in enumerate(((10, 7), (5, 5))):
        describe = {"shield": True, "shield_rule": "dominance", "shield_level": 0.9,
                    "proposed_changes": proposed, "shielded_changes": shielded}
        (cell / f"policy__seed{seed}.json").write_text(json.dumps({"setup": {"describe": describe}}))
    (cell / "fixed__seed0.json").write_text(json.dumps({"setup": {"describe": {}}}))
    assert shield_counts(tmp_path) == {"rule": "dominance", "level": 0.9, "proposed": 15, "ran": 3}
    assert shield_counts(tmp_path / "nothing") is None


def test_gate_settings_are_checked(tmp_path):
    path = tmp_path / "g.yaml"
    path.write_text(yaml.safe_dump({"gate": {"window": 60}}))
    with pytest.raises(ConfigError, match="gate.window: 60 windows"):
        build_config(parse_args(["--config", str(path)]))
    path.write_text(yaml.safe_dump({"gate": {"seed": 1}}))
    with pytest.raises(ConfigError, match=r"gate\.seed: unknown key"):
        build_config(parse_args(["--config", str(path)]))
    cfg = build_config(parse_args([]))
    assert cfg.gate.enabled and cfg.gate.seeds == 3 and cfg.gate.seed_offset == 200_000
    assert cfg.gate.corpora == []
    wiki = str(WIKITEXT2)
    path.write_text(yaml.safe_dump({"gate": {"corpora": ["builtin", wiki]}}))
    assert build_config(parse_args(["--config", str(path)])).gate.corpora == ["builtin", wiki]
    path.write_text(yaml.safe_dump({"gate": {"corpora": ["builtin", str(tmp_path / "nowhere")]}}))
    with pytest.raises(ConfigError, match="gate.corpora: .*nowhere"):
        build_config(parse_args(["--config", str(path)]))
    path.write_text(yaml.safe_dump({"gate": {"corpora": "builtin"}}))
    with pytest.raises(ConfigError, match="gate.corpora"):
        build_config(parse_args(["--config", str(path)]))


def test_controller_presets_load(monkeypatch):
    """Every preset in configs/controller passes the strict loader (paths in them start at the repository)."""
    monkeypatch.chdir(REPO)
    presets = sorted((REPO / "configs" / "controller").glob("*.yaml"))
    assert presets
    for preset in presets:
        cfg = build_config(parse_args(["--config", str(preset)]))
        assert cfg.run_name and cfg.run_name != "train-controller"  # never overwrites make train's run
