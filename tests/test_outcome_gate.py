"""The outcome gate: fitted from real end-of-run outcomes, read once per run by the learned policy."""

from __future__ import annotations

import json

import gymnasium as gym
import numpy as np
import pytest

import stso_env  # noqa: F401  (registers the envs)
from agents.controllers import make_controller
from agents.controllers.outcome_gate import LOSS_LEVELS, OutcomeGate, fit_gate, gate_features
from stso_env.envs.gpt2_env import NEUTRAL_ACTION
from stso_env.errors import DataError
from stso_env.monitor.monitor import OBSERVATION_NAMES
from tests.conftest import WIKITEXT2
from tests.test_suite import SUITE

ENV = {"preset": "tiny", "scenario": "calm", "decision_interval": 5, "episode_steps": 40}
NAMES = ["grad_norm", "loss", "lr"]


def test_fit_learns_which_runs_the_policy_wins_and_round_trips(tmp_path):
    # the policy wins the runs whose gradients are tiny (the quiet stretch of adam_v_lag), loses the others
    states = np.array([[0.01, 3.0, 1.0], [0.02, 3.1, 1.0], [0.015, 2.9, 1.0],
                       [1.0, 3.0, 1.0], [1.2, 3.1, 1.0], [0.9, 2.9, 1.0]])
    wins = np.array([1, 1, 1, 0, 0, 0])
    runs = [{"scenario": "s", "seed": i} for i in range(6)]
    gate = fit_gate(states, wins, NAMES, window=2, runs=runs)
    assert gate.window == 2 and gate.scale[2] == 1.0  # a constant feature keeps a unit scale
    assert gate.coef[0] < 0 and gate.coef[2] == 0.0
    assert gate.probability(np.array([0.01, 3.0, 1.0]), NAMES) > 0.5
    assert gate.probability(np.array([1.1, 3.0, 1.0]), NAMES) < 0.5
    # the observation's own feature order is followed by name
    assert gate.probability(np.array([1.0, 0.01, 3.0]), ["lr", "grad_norm", "loss"]) > 0.5
    back = OutcomeGate.load(gate.save(tmp_path / "gate.json"))
    assert back == gate
    # one class only: a constant gate
    closed = fit_gate(states, np.zeros(6), NAMES, window=1, runs=runs)
    opened = fit_gate(states, np.ones(6), NAMES, window=1, runs=runs)
    assert closed.probability(states[0], NAMES) < 1e-4 and opened.probability(states[3], NAMES) > 1 - 1e-4


def test_gate_features_leave_out_exactly_the_loss_levels():
    kept = gate_features(OBSERVATION_NAMES, loss_levels=False)
    assert gate_features(OBSERVATION_NAMES) == list(OBSERVATION_NAMES)
    assert set(OBSERVATION_NAMES) - set(kept) == set(LOSS_LEVELS) == {
        "loss", "loss_ema", "batch_loss_mean", "batch_loss_mean_ema", "probe_loss", "probe_loss_ema"}
    assert "probe_loss_delta" in kept and "grad_norm" in kept


def test_bad_gate_files_are_clear_errors(tmp_path):
    gate = fit_gate(np.eye(3), np.array([1, 0, 0]), NAMES, window=1, runs=[])
    path = gate.save(tmp_path / "gate.json")
    with pytest.raises(DataError, match="agents.fit_gate"):
        OutcomeGate.load(tmp_path / "missing.json")
    (tmp_path / "text.json").write_text("{not json")
    with pytest.raises(DataError, match="not JSON"):
        OutcomeGate.load(tmp_path / "text.json")
    raw = json.loads(path.read_text())
    for change, message in (({"format": 9}, "format 9"), ({"extra": 1}, "unknown keys"),
                            ({"coef": [1.0]}, "coef must hold 3"), ({"scale": [1.0, 0.0, 1.0]}, "positive"),
                            ({"window": 0}, "window")):
        (tmp_path / "bad.json").write_text(json.dumps(dict(raw, **change)))
        with pytest.raises(DataError, match=message):
            OutcomeGate.load(tmp_path / "bad.json")
    with pytest.raises(DataError, match="lacks"):
        gate.probability(np.zeros(2), ["grad_norm", "loss"])
    (tmp_path / "bad.json").write_text(json.dumps(dict(raw, reference="best")))
    with pytest.raises(DataError, match="reference='best'.*fixed, tuned_fixed"):
        OutcomeGate.load(tmp_path / "bad.json")
    # files written before the reference was recorded compared the policy with the fixed schedule
    (tmp_path / "old.json").write_text(json.dumps({k: v for k, v in raw.items() if k != "reference"}))
    assert OutcomeGate.load(tmp_path / "old.json").reference == "fixed"


@pytest.fixture(scope="module")
def policy_zip(tmp_path_factory):
    from sb3_contrib import MaskablePPO

    env = gym.make("STSO-GPT2-v0", **ENV)
    path = tmp_path_factory.mktemp("policy") / "policy.zip"
    MaskablePPO("MlpPolicy", env, n_steps=8, batch_size=8, seed=0, device="cpu").save(str(path))
    env.close()
    return path


def _gate(tmp_path, open_: bool, window: int = 2):
    n = len(OBSERVATION_NAMES)
    gate = OutcomeGate(window=window, features=list(OBSERVATION_NAMES), mean=[0.0] * n, scale=[1.0] * n,
                       coef=[0.0] * n, intercept=10.0 if open_ else -10.0)
    return gate.save(tmp_path / f"gate_{open_}.json")


def _play(env, ctrl, proposal, monkeypatch, windows: int = 5) -> list[list[int]]:
    """The actions ``ctrl`` plays in the first ``windows`` windows of a seed-3 run when its policy always
    proposes ``proposal``."""
    obs, info = env.reset(seed=3)
    ctrl.reset(env, seed=3, run_name="g")
    monkeypatch.setattr(ctrl.model, "predict", lambda *a, **k: (proposal, None))
    played = []
    for _ in range(windows):
        a = ctrl.act(obs, info)
        played.append(a.tolist())
        obs, _, _, _, info = env.step(a)
    return played


def test_policy_keeps_the_fixed_schedule_until_the_gate_and_after_a_closed_one(policy_zip, tmp_path, monkeypatch):
    env = gym.make("STSO-GPT2-v0", **ENV)
    proposal = np.array([1, 1, 1, 0, 0, 0])  # LR x0.9, well inside the LR bounds for a few windows
    for open_ in (True, False):
        ctrl = make_controller("policy", policy_path=policy_zip, settings={"gate": str(_gate(tmp_path, open_))})
        assert not ctrl.shield and ctrl.gate is not None
        played = _play(env, ctrl, proposal, monkeypatch)
        neutral = list(NEUTRAL_ACTION)
        # two neutral windows, then the gate decides once: the policy's action, or neutral to the end
        assert played[:2] == [neutral, neutral]
        assert played[2:] == ([proposal.tolist()] * 3 if open_ else [neutral] * 3)
        d = ctrl.describe()
        assert d["gate_open"] is open_ and (d["gate_probability"] > 0.5) is open_
        gates = [x for x in ctrl.decisions if x["kind"] == "gate"]
        assert len(gates) == 1 and ("open" if open_ else "closed") in gates[0]["reason"]
        # a new run asks the gate again
        obs, info = env.reset(seed=4)
        ctrl.reset(env, seed=4, run_name="g2")
        assert ctrl.gate_open is None and ctrl.act(obs, info).tolist() == neutral
    with pytest.raises(DataError, match="agents.fit_gate"):
        make_controller("policy", policy_path=policy_zip, settings={"gate": str(tmp_path / "none.json")})
    env.close()


def _gate_at(tmp_path, name: str, window: int, intercept: float):
    """A constant gate deciding after ``window`` windows with P(the policy wins) = sigmoid(intercept)."""
    n = len(OBSERVATION_NAMES)
    return OutcomeGate(window=window, features=list(OBSERVATION_NAMES), mean=[0.0] * n, scale=[1.0] * n,
                       coef=[0.0] * n, intercept=intercept).save(tmp_path / f"{name}.json")


def test_an_early_gate_opens_where_confident_and_leaves_the_rest_to_the_gate(policy_zip, tmp_path, monkeypatch):
    env = gym.make("STSO-GPT2-v0", **ENV)
    proposal = np.array([1, 1, 1, 0, 0, 0])
    neutral = list(NEUTRAL_ACTION)
    # (early gate's P, the gate's P) -> the window from which the policy acts (None: never)
    cases = [(10.0, -10.0, 1), (0.4, 10.0, 3), (0.4, -10.0, None), (-10.0, 10.0, 3)]
    for early_logit, late_logit, acts_from in cases:
        settings = {"gate": str(_gate_at(tmp_path, f"late{late_logit}", 3, late_logit)),
                    "early_gate": str(_gate_at(tmp_path, f"early{early_logit}", 1, early_logit))}
        ctrl = make_controller("policy", policy_path=policy_zip, settings=settings)
        played = _play(env, ctrl, proposal, monkeypatch)
        start = 5 if acts_from is None else acts_from
        assert played == [neutral] * start + [proposal.tolist()] * (5 - start), (early_logit, late_logit)
        d = ctrl.describe()
        assert d["gate_window"] == acts_from and d["gate_open"] is (acts_from is not None)
        assert d["early_gate_probability"] == pytest.approx(1 / (1 + np.exp(-early_logit)))
        # the early gate is asked once; the gate only where the early one was not confident
        kinds = [x["reason"].split(" after")[0] for x in ctrl.decisions if x["kind"] == "gate"]
        assert kinds == (["early outcome gate"] if acts_from == 1 else ["early outcome gate", "outcome gate"])
    late, early = str(_gate_at(tmp_path, "l", 3, 0.0)), str(_gate_at(tmp_path, "e", 3, 0.0))
    with pytest.raises(ValueError, match="smaller window"):
        make_controller("policy", policy_path=policy_zip, settings={"gate": late, "early_gate": early})
    with pytest.raises(ValueError, match="set gate too"):
        make_controller("policy", policy_path=policy_zip, settings={"early_gate": early})
    with pytest.raises(ValueError, match="early_gate_confidence"):
        make_controller("policy", policy_path=policy_zip,
                        settings={"gate": late, "early_gate": str(_gate_at(tmp_path, "e1", 1, 0.0)),
                                  "early_gate_confidence": 0.3})
    env.close()


def test_extrapolation_is_the_largest_standardised_feature():
    gate = OutcomeGate(window=1, features=["grad_norm", "loss"], mean=[1.0, 2.0], scale=[2.0, 4.0],
                       coef=[0.0, 0.0], intercept=0.0)
    # grad_norm (5 - 1) / 2 = 2, loss (-10 - 2) / 4 = -3: the loss, three standard deviations out
    assert gate.extrapolation(np.array([7.0, 5.0, -10.0]), ["lr", "grad_norm", "loss"]) == (3.0, "loss")


def test_gate_max_z_refuses_an_open_gate_whose_state_lies_beyond_its_fitting_runs(policy_zip, tmp_path, monkeypatch):
    env = gym.make("STSO-GPT2-v0", **ENV)
    proposal = np.array([1, 1, 1, 0, 0, 0])
    neutral = list(NEUTRAL_ACTION)
    loss = OBSERVATION_NAMES.index("loss")

    def gate(name, window, scale):
        # always confident that the policy wins; it reads the training loss, in units of ``scale`` from 0
        return str(OutcomeGate(window=window, features=["loss"], mean=[0.0], scale=[scale], coef=[0.0],
                               intercept=10.0).save(tmp_path / f"{name}.json"))

    def play(settings):
        ctrl = make_controller("policy", policy_path=policy_zip, settings=settings)
        obs, info = env.reset(seed=3)
        ctrl.reset(env, seed=3, run_name="z")
        monkeypatch.setattr(ctrl.model, "predict", lambda *a, **k: (proposal, None))
        played, seen = [], []
        for _ in range(5):
            seen.append(float(obs[loss]))
            a = ctrl.act(obs, info)
            played.append(a.tolist())
            obs, _, _, _, info = env.step(a)
        return ctrl, played, seen

    early, late, late_wide = gate("early", 1, 1.0), gate("late", 3, 1.0), gate("late_wide", 3, 1e3)
    ctrl, played, seen = play({"gate": late, "early_gate": early})
    assert played == [neutral] + [proposal.tolist()] * 4  # no limit: the early gate opens
    # the observed loss (nats / log vocab) is its distance from 0
    assert ctrl.describe()["early_gate_z"] == pytest.approx(abs(seen[1])) and abs(seen[1]) > 0.5
    # a limit below the state's distance: neither gate opens, both refusals recorded with the feature
    ctrl, played, seen = play({"gate": late, "early_gate": early, "gate_max_z": 0.5})
    d = ctrl.describe()
    assert played == [neutral] * 5 and d["gate_open"] is False and d["extrapolation_refusals"] == 2
    assert d["early_gate_z"] == pytest.approx(abs(seen[1])) and d["gate_z"] == pytest.approx(abs(seen[3]))
    assert d["early_gate_z_feature"] == d["gate_z_feature"] == "loss"
    reasons = [x["reason"] for x in ctrl.decisions if x["kind"] == "gate"]
    assert len(reasons) == 2 and all("not trusted" in r and "on loss, beyond gate_max_z 0.5" in r for r in reasons)
    # the early gate refused, a gate whose runs spread wider decides at its own window and opens
    ctrl, played, _ = play({"gate": late_wide, "early_gate": early, "gate_max_z": 0.5})
    assert played == [neutral] * 3 + [proposal.tolist()] * 2 and ctrl.describe()["extrapolation_refusals"] == 1
    for bad in (0, -1.0, True, "6"):
        with pytest.raises(ValueError, match="gate_max_z"):
            make_controller("policy", policy_path=policy_zip, settings={"gate": late, "gate_max_z": bad})
    with pytest.raises(ValueError, match="set gate too"):
        make_controller("policy", policy_path=policy_zip, settings={"gate_max_z": 6.0})
    env.close()


def test_a_policy_on_the_tuned_lr_starts_from_the_sweep_and_bounds_its_drift_from_there(policy_zip, tmp_path,
                                                                                        monkeypatch):
    from agents.controllers.tuned import TunedFixed

    sweeps = []

    def sweep(self, base):
        sweeps.append(1)
        return {"lr_scale": 0.5, "tuning_flops": 123.0, "val_loss": {}}

    monkeypatch.setattr(TunedFixed, "_sweep", sweep)
    env = gym.make("STSO-GPT2-v0", **ENV)
    proposal = np.array([0, 1, 0, 0, 0, 0])  # LR x0.8 every window, nothing else
    neutral = list(NEUTRAL_ACTION)
    ctrl = make_controller("policy", policy_path=policy_zip, tuning_dir=tmp_path, settings={"tune_lr": True})
    played = _play(env, ctrl, proposal, monkeypatch, windows=5)
    # from 0.5, three cuts reach 0.256 (0.512 of the tuned scale); a fourth would leave the bounds [0.5, 2]
    assert played == [proposal.tolist()] * 3 + [neutral] * 2
    assert env.unwrapped.trainer.knobs.lr_scale == pytest.approx(0.5 * 0.8 ** 3)
    d = ctrl.describe()
    assert d["tune_lr"] and d["lr_origin"] == 0.5 and d["tuning_flops"] == 123.0 and d["lr_changes_bounded"] == 2
    assert ctrl.decisions[0]["kind"] == "tuned_lr" and "x0.5" in ctrl.decisions[0]["reason"]
    # the sweep is cached with tuned_fixed's: a second run reads it
    _play(env, ctrl, proposal, monkeypatch, windows=1)
    assert len(sweeps) == 1 and len(list(tmp_path.glob("tuned_fixed__*.json"))) == 1
    # without the setting the same policy starts from the schedule's LR
    plain = make_controller("policy", policy_path=policy_zip, tuning_dir=tmp_path)
    _play(env, plain, proposal, monkeypatch, windows=1)
    assert plain.describe()["lr_origin"] == 1.0 and plain.tuning_flops == 0.0
    # bounds from the schedule's own LR: from 0.5 no cut is left
    own = make_controller("policy", policy_path=policy_zip, tuning_dir=tmp_path,
                          settings={"tune_lr": True, "lr_bounds_from": "schedule"})
    assert _play(env, own, proposal, monkeypatch, windows=2) == [neutral] * 2
    assert own.describe()["lr_origin"] == 1.0 and own.describe()["tuned_lr_scale"] == 0.5
    with pytest.raises(ValueError, match="tune_lr"):
        make_controller("policy", policy_path=policy_zip, settings={"tune_lr": "yes"})
    with pytest.raises(ValueError, match="lr_bounds_from"):
        make_controller("policy", policy_path=policy_zip, settings={"lr_bounds_from": "run"})
    env.close()


def test_a_policy_with_the_skip_step_guard_skips_what_skip_step_skips(policy_zip, monkeypatch):
    """The guard is the skip_step controller under the policy: with the policy neutral, the run is
    skip_step's run step for step (the same skipped steps, the same weights); with a proposal the policy's
    actions play as before while the guard judges every step."""
    import torch

    from agents.controllers.skip_step import SkipStep

    settings = {"rolling_interval_length": 6, "sigma_factor": 1.0}  # small and strict: skips within 25 steps
    env = gym.make("STSO-GPT2-v0", **dict(ENV, scenario="spiky"))
    trainer = lambda: env.unwrapped.trainer  # noqa: E731  (reset rebuilds it)
    ref = SkipStep(**settings)
    obs, info = env.reset(seed=3)
    ref.reset(env, seed=3, run_name="ref")
    for _ in range(5):
        obs, _, _, _, info = env.step(ref.act(obs, info))
    ref.close()
    weights = {k: v.clone() for k, v in trainer().model.state_dict().items()}
    assert ref.skipped_steps and len(ref.log) == 25
    neutral = np.asarray(NEUTRAL_ACTION)
    guarded = make_controller("policy", policy_path=policy_zip, settings={"skip_step": settings})
    assert _play(env, guarded, neutral, monkeypatch) == [list(NEUTRAL_ACTION)] * 5
    d = guarded.describe()
    assert d["skip_step"] and d["skipped_steps"] == ref.skipped_steps and d["skip_step_settings"] == {
        **settings, "exclude_skipped": False}
    assert all(torch.equal(v, weights[k]) for k, v in trainer().model.state_dict().items())
    assert [x["global_step"] for x in guarded.decisions if x["kind"] == "skip_step"] == ref.skipped_steps
    guarded.close()
    assert not trainer().pre_update_hooks and not trainer().pre_step_hooks
    # the policy acts on top: its actions are played, the guard still judges all 25 steps
    proposal = np.array([1, 1, 1, 0, 0, 0])  # LR x0.9
    assert _play(env, guarded, proposal, monkeypatch) == [proposal.tolist()] * 5
    assert len(guarded.guard.log) == 25 and guarded.describe()["skipped_steps"]
    assert {x["kind"] for x in guarded.decisions} == {"policy", "skip_step"}
    guarded.close()
    plain = make_controller("policy", policy_path=policy_zip).describe()
    assert not plain["skip_step"] and plain["skipped_steps"] == [] and plain["skip_step_settings"] is None
    with pytest.raises(ValueError, match="skip_step='yes'"):
        make_controller("policy", policy_path=policy_zip, settings={"skip_step": "yes"})
    with pytest.raises(ValueError, match="its settings are rolling_interval_length"):
        make_controller("policy", policy_path=policy_zip, settings={"skip_step": {"sigma": 2.0}})
    env.close()


def test_fit_gate_on_real_tiny_runs(policy_zip, tmp_path):
    from agents.fit_gate import main

    out = tmp_path / "gate.json"
    argv = ["--policy", str(policy_zip), "--scenarios", "calm", "--seeds", "2", "--episode-steps", "40",
            "--decision-interval", "5", "--builtin-chars", "200000", "--out", str(out), "--no-progress"]
    assert main(argv) == 0
    gate = OutcomeGate.load(out)
    assert gate.window == 1 and [r["seed"] for r in gate.runs] == [200000, 200001]
    for r in gate.runs:
        assert np.isfinite(r["fixed_probe_loss"]) and np.isfinite(r["policy_probe_loss"])
        assert r["policy_wins"] == (r["policy_probe_loss"] < r["fixed_probe_loss"])
    # the policy changes the run: its end differs from the fixed schedule's
    assert any(r["policy_probe_loss"] != r["fixed_probe_loss"] for r in gate.runs)
    report = out.with_suffix(".md").read_text()
    assert "| `builtin` | `calm` | 200000 |" in report
    # deterministic: the same runs give the same losses; without the loss levels the gate reads the rest
    again = tmp_path / "again.json"
    assert main(argv[:-3] + ["--out", str(again), "--no-progress", "--no-loss-levels"]) == 0
    assert OutcomeGate.load(again).runs == gate.runs
    assert gate.features == list(OBSERVATION_NAMES)
    assert OutcomeGate.load(again).features == [n for n in OBSERVATION_NAMES if n not in LOSS_LEVELS]
    assert main(argv[:-3] + ["--window", "8", "--out", str(tmp_path / "w.json")]) == 2
    assert main(["--policy", str(tmp_path / "nope.zip"), "--out", str(out)]) == 2
    assert main(argv[:-3] + ["--corpus", " , ", "--out", str(tmp_path / "c.json")]) == 2


def test_fit_gate_on_two_corpora(policy_zip, tmp_path):
    """A comma list of corpora: one gate fitted on the runs of each, every run naming its corpus."""
    from agents.fit_gate import main

    wiki = str(WIKITEXT2 / "valid.txt")
    out = tmp_path / "gate.json"
    assert main(["--policy", str(policy_zip), "--scenarios", "calm", "--seeds", "1", "--episode-steps", "30",
                 "--decision-interval", "5", "--builtin-chars", "200000", "--corpus", f"builtin,{wiki}",
                 "--out", str(out), "--no-progress"]) == 0
    runs = OutcomeGate.load(out).runs
    assert [(r["corpus"], r["seed"]) for r in runs] == [("builtin", 200000), (wiki, 200000)]
    # the same seed on another corpus is another run: its fixed schedule ends elsewhere
    assert runs[0]["fixed_probe_loss"] != runs[1]["fixed_probe_loss"]
    assert f"| `{wiki}` | `calm` | 200000 |" in out.with_suffix(".md").read_text()


def test_fit_gate_against_tuned_fixed_starts_both_copies_on_the_swept_lr(policy_zip, tmp_path, monkeypatch):
    """``--against tuned_fixed``: the reference copy is exactly a tuned_fixed run, and the gate says so."""
    from agents.controllers.tuned import TunedFixed
    from agents.fit_gate import main
    from stso_env.config import TrainConfig, apply_overrides

    monkeypatch.setattr(TunedFixed, "_sweep", lambda self, base: {"lr_scale": 0.5, "tuning_flops": 1.0,
                                                                  "val_loss": {}})
    common = ["--policy", str(policy_zip), "--scenarios", "calm", "--seeds", "1", "--episode-steps", "40",
              "--decision-interval", "5", "--builtin-chars", "200000", "--no-progress"]
    out = tmp_path / "tuned" / "gate.json"
    assert main(common + ["--against", "tuned_fixed", "--out", str(out)]) == 0
    gate = OutcomeGate.load(out)
    (run,) = gate.runs
    assert gate.reference == "tuned_fixed" and run["lr_scale"] == 0.5
    assert len(list((out.parent / "tuning").glob("tuned_fixed__*.json"))) == 1  # the sweep's cache beside it
    report = out.with_suffix(".md").read_text()
    assert "against tuned_fixed" in report and "| `builtin` | `calm` | 200000 | x0.5 |" in report
    # the reference copy is tuned_fixed's own run of that seed, to the last digit
    env = gym.make("STSO-GPT2-v0", preset="tiny", scenario="calm", corpus="builtin", decision_interval=5,
                   episode_steps=40, config=apply_overrides(TrainConfig(), {"data.builtin_chars": 200000}))
    ctrl = make_controller("tuned_fixed", tuning_dir=out.parent / "tuning")
    obs, info = env.reset(seed=200000)
    ctrl.reset(env, seed=200000, run_name="t")
    done = False
    while not done:
        obs, _, terminated, truncated, info = env.step(ctrl.act(obs, info))
        done = terminated or truncated
    env.close()
    assert run["fixed_probe_loss"] == info["probe_loss"]
    # against the fixed schedule the same seed starts on x1 and ends elsewhere
    plain = tmp_path / "plain.json"
    assert main(common + ["--out", str(plain)]) == 0
    (plain_run,) = OutcomeGate.load(plain).runs
    assert plain_run["lr_scale"] == 1.0 and plain_run["fixed_probe_loss"] != run["fixed_probe_loss"]
    assert OutcomeGate.load(plain).reference == "fixed"
    # a gate fitted against tuned_fixed read runs on the tuned LR: the policy must play there too
    with pytest.raises(ValueError, match="fitted against tuned_fixed.*tune_lr"):
        make_controller("policy", policy_path=policy_zip, settings={"gate": str(out)})
    tuned = make_controller("policy", policy_path=policy_zip, tuning_dir=out.parent / "tuning",
                            settings={"gate": str(out), "tune_lr": True})
    assert tuned.describe()["gate_reference"] == "tuned_fixed"


def test_gate_distance_replays_each_run_to_its_gate_with_known_distances(policy_zip, tmp_path, monkeypatch, capsys):
    from agents.gate_distance import main as gate_distance

    n = OBSERVATION_NAMES.index("momentum_reset_flag")
    assert n >= 0
    # one feature, 0 under the neutral action of the first windows: 3 standard deviations from a mean of -3
    gate = OutcomeGate(window=1, features=["momentum_reset_flag"], mean=[-3.0], scale=[1.0], coef=[0.0],
                       intercept=2.0).save(tmp_path / "gate.json")
    suite = tmp_path / "mini_gate.yaml"
    # the test suite's one-cell suite, with the policy behind that gate
    suite.write_text(SUITE.replace("name: mini", "name: mini_gate").replace("[fixed, zclip]", "[fixed, policy]")
                     + f"policy: {policy_zip}\nsettings:\n  policy: {{shield: false, gate: {gate}}}\n")
    runs = {"policy": [10.0, None], "fixed": [11.0, 12.0]}
    results = {"suite": "mini_gate", "meta": {"commit": "abc"}, "cells": {"calm__builtin": {"controllers": {
        name: {"seeds": [{"seed": 100000 + i, "final_test_ppl": v} for i, v in enumerate(values)]}
        for name, values in runs.items()}}}}
    (tmp_path / "results.json").write_text(json.dumps(results))
    monkeypatch.chdir(tmp_path)  # the suite's run folder (runs/suites/mini_gate) is looked up from here
    out = tmp_path / "distance.md"
    assert gate_distance(["--suite", str(suite), "--controller", "policy", "--reference", "fixed", "--results",
                          str(tmp_path / "results.json"), "--out", str(out), "--no-progress"]) == 0
    text = out.read_text()
    p = 1 / (1 + np.exp(-2.0))
    # both seeds: P sigmoid(2), distance exactly 3 on the one feature, let through at window 1;
    # -9.1 % = (10 - 11) / 11, and a diverged run (no test perplexity) is n/a
    assert f"| `calm__builtin` | 100000 |  |  | {p:.3f} | 3.0 (momentum_reset_flag) | 1 | -9.1 % |" in text
    assert f"| `calm__builtin` | 100001 |  |  | {p:.3f} | 3.0 (momentum_reset_flag) | 1 | n/a |" in text
    assert not (tmp_path / "runs").exists()  # a replay writes nothing
    assert gate_distance(["--suite", str(suite), "--controller", "fixed", "--results",
                          str(tmp_path / "results.json")]) == 2
    assert "not a policy controller" in capsys.readouterr().err
    assert gate_distance(["--suite", str(suite), "--controller", "policy", "--results", str(tmp_path / "no.json")]) == 2
    assert "no such file" in capsys.readouterr().err
