"""The RLHF proxy (return@N and value variance with conformal bounds), the explore and branch
controllers, and the env's what_if rollouts, on known answers."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from agents.rlhf_controllers import Branch, make_rlhf_controller
from stso_env.envs.rlhf_env import NEUTRAL_ACTION, RLHFEnv
from stso_env.errors import DataError
from stso_env.rlhf.monitor import OBSERVATION_NAMES
from stso_env.rlhf.proxy import RLHFProxy, action_one_hot, all_actions, return_rows, split_episodes

N = list(NEUTRAL_ACTION)
UP = [3, 1, 0, 0, 1, 0]  # LR x1.25
KL_I, GOLD_I = OBSERVATION_NAMES.index("kl_max"), OBSERVATION_NAMES.index("gold_probe")


def table(episodes):
    """A log table from ``[(run_id, [(state, action, reward, terminated), ...]), ...]``."""
    cols = {k: [] for k in ("run_id", "episode", "env_step", "state", "action", "reward", "terminated")}
    for run, rows in episodes:
        for t, (state, action, reward, term) in enumerate(rows):
            for k, v in zip(cols, (run, 1, t, list(map(float, state)), action, float(reward), term)):
                cols[k].append(v)
    return pa.table(cols)


def zeros():
    return np.zeros(len(OBSERVATION_NAMES))


def test_return_at_n_is_act_then_hold_and_drops_rows_cut_by_the_time_limit():
    rewards = [1.0, 2.0, 3.0, 4.0, 5.0]
    actions = [UP, N, N, UP, N]
    ended = table([("a", [(zeros(), a, r, t == 4) for t, (a, r) in enumerate(zip(actions, rewards))]),
                   ("b", [(zeros(), a, r, False) for a, r in zip(actions, rewards)])])
    rows = return_rows(ended, horizon=2)
    # a: t0 3 (next is neutral), t1 5, t2 dropped (t3 is not neutral), t3 9, t4 5 (diverged: shorter sum)
    # b: the same but t4 is cut by the time limit
    assert rows.ret.tolist() == [3.0, 5.0, 9.0, 5.0, 3.0, 5.0, 9.0]
    assert rows.action.tolist()[:4] == [UP, N, UP, N] and rows.episode.tolist()[:4] == ["a/1"] * 4
    assert return_rows(ended, horizon=1).ret.tolist() == rewards * 2
    with pytest.raises(DataError, match="no return@"):
        return_rows(table([("c", [(zeros(), UP, 1.0, False)] * 3)]), horizon=2)


def test_one_hot_and_the_candidate_grid():
    grid = all_actions()
    assert grid.shape == (648, 6) and len({tuple(a) for a in grid}) == 648
    oh = action_one_hot(np.array([N, UP]))
    assert oh.shape == (2, 18) and oh.sum(axis=1).tolist() == [6.0, 6.0] and oh[0, 2] == 1 and oh[1, 3] == 1
    with pytest.raises(Exception, match="action dimension 0"):
        action_one_hot(np.array([[4, 0, 0, 0, 0, 0]]))


def synthetic_logs(root, episodes=90, steps=8, seed=0):
    """Known dynamics: raising the LR when the KL is high costs 5 (a divergence); otherwise the return is
    the gold level plus noise whose spread grows with the KL."""
    rng = np.random.default_rng(seed)
    for e in range(episodes):
        rows = []
        for _ in range(steps):
            s = zeros()
            s[KL_I], s[GOLD_I] = rng.uniform(0, 1), rng.uniform(0, 1)
            a = UP if rng.random() < 0.4 else N
            r = -5.0 if (a == UP and s[KL_I] > 0.5) else s[GOLD_I] + rng.normal(0, 0.05 + 0.5 * s[KL_I])
            rows.append((s, a, r, False))
        folder = root / f"ep{e}" / "log_db.parquet"
        folder.mkdir(parents=True)
        pq.write_table(table([(f"ep{e}", rows)]), folder / "part-00000.parquet")
    return root


def test_proxy_learns_the_risk_the_variance_and_covers_held_out_episodes(tmp_path):
    proxy = RLHFProxy.from_logs(synthetic_logs(tmp_path), horizon=1, trees=100)
    assert proxy.rows["train"] + proxy.rows["calibration"] + proxy.rows["test"] == 720
    hot, calm = zeros(), zeros()
    hot[KL_I], hot[GOLD_I] = 0.9, 0.5
    calm[KL_I], calm[GOLD_I] = 0.1, 0.5
    p_hot, p_calm = proxy.predict(hot, np.array([N, UP])), proxy.predict(calm, np.array([N, UP]))
    assert p_hot["mean"][1] < -3 < p_hot["mean"][0]  # raising the LR at high KL diverges; holding does not
    assert abs(p_calm["mean"][1] - p_calm["mean"][0]) < 1.0  # at low KL the LR change costs nothing
    assert p_hot["variance"][0] > 2 * p_calm["variance"][0]  # the noise grows with the KL
    assert (p_hot["lower"] < p_hot["mean"]).all() and (p_hot["upper"] > p_hot["mean"]).all()
    rows = return_rows(pa.concat_tables([pq.read_table(p) for p in sorted(tmp_path.glob("*/log_db.parquet/*"))]), 1)
    test = rows.subset(split_episodes(rows.episode) == 2)
    ev = proxy.evaluate(test)
    assert ev["rows"] == proxy.rows["test"] and ev["spearman"] > 0.5 and ev["mae"] < ev["mae_constant"]
    assert 0.7 <= ev["coverage"]["80%"] <= 0.95 and ev["coverage"]["90%"] >= ev["coverage"]["80%"]
    with pytest.raises(DataError, match="no log_db.parquet"):
        RLHFProxy.from_logs(tmp_path / "nothing")


@pytest.fixture()
def kw(rlhf_tiny):
    _, root, _ = rlhf_tiny
    return {"size": "tiny", "prepared": str(root), "decision_interval": 4, "scenario": "overoptimize"}


def test_what_if_comes_back_and_step_replays_its_first_window(kw):
    env = RLHFEnv(**kw)
    env.reset(seed=5)
    before = env.lineage()
    rollout = env.what_if([UP, N])
    assert len(rollout) == 2 and env.lineage() == before
    obs, r, *_ = env.step(np.array(UP))
    assert np.array_equal(obs, rollout[0][0]) and r == rollout[0][1]
    env.close()


def test_explore_is_seeded_and_masked_and_branch_verifies_before_it_commits(kw, tmp_path):
    env = RLHFEnv(**kw)
    _, info = env.reset(seed=2)
    draws = []
    for _ in range(2):
        ex = make_rlhf_controller("explore", path="1.0")
        ex.reset(env, info)
        draws.append([ex.act(None, info).tolist() for _ in range(5)])
    assert draws[0] == draws[1] and any(d != N for d in draws[0])
    never = make_rlhf_controller("explore", path="0")
    never.reset(env, info)
    assert all(never.act(None, info).tolist() == N for _ in range(5))

    br = Branch(str(synthetic_logs(tmp_path)), horizon=1, verify=1, max_verifications=1)
    br.reset(env, info)
    obs = np.zeros(len(OBSERVATION_NAMES), dtype=np.float32)
    obs[OBSERVATION_NAMES.index("entropy_ratio")] = 1.0
    assert br.act(obs, info).tolist() == N and br.decisions == []  # no warning: no branching
    obs[OBSERVATION_NAMES.index("trigger")] = 1.0
    before = env.lineage()
    first = br.act(obs, info)
    d = br.decisions[-1]
    assert d["candidates"] == int(np.prod([env.action_masks()[:4].sum(), env.action_masks()[4:7].sum()])) * 54
    assert env.lineage() == before  # verification rolled back
    if d["proxy_best"] != N:
        assert set(d["verified_return"]) == {"neutral", "proxy_best"} and br.verified == 1
        won = d["verified_return"]["proxy_best"] > d["verified_return"]["neutral"]
        assert first.tolist() == (d["proxy_best"] if won else N)
    br.act(obs, info)
    assert br.verified <= 1  # the budget holds
    env.close()


def test_train_proxy_cli_reports_held_out_figures(tmp_path, capsys):
    import json

    from agents.train_proxy import main

    logs = synthetic_logs(tmp_path / "logs", episodes=60)
    out = tmp_path / "out"
    assert main(["--env", "STSO-RLHF-v0", "--logs", str(logs), "--horizon", "1", "--trees", "50",
                 "--out", str(out)]) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["episodes"] == 60 and res["rows"]["train"] + res["rows"]["calibration"] + res["rows"]["test"] == 480
    assert res["test"]["spearman"] > 0.5 and (out / "calibration.png").stat().st_size > 1000
    assert "coverage of the 80 % interval" in (out / "report.md").read_text()
    capsys.readouterr()
    assert main(["--env", "STSO-RLHF-v0", "--logs", str(tmp_path / "none"), "--out", str(out)]) == 2
    assert "no log_db.parquet" in capsys.readouterr().err


def test_evaluate_logs_explore_episodes_and_writes_the_branch_decisions(rlhf_tiny, tmp_path):
    import json

    from agents.rlhf_evaluate import main

    _, root, _ = rlhf_tiny
    base = ["--size", "tiny", "--prepared", str(root), "--interval", "4", "--scenarios", "overoptimize",
            "--seeds", "1", "--workers", "1", "--no-progress"]
    assert main(base + ["--controllers", "explore:1", "--log-dir", str(tmp_path / "logs"),
                        "--out", str(tmp_path / "collect")]) == 0
    db = tmp_path / "logs" / "overoptimize-explore-1000" / "log_db.parquet"
    rows = pa.concat_tables([pq.read_table(p) for p in db.glob("part-*.parquet")])
    assert rows.num_rows == 3 and all(a != N for a in rows["action"].to_pylist())  # p = 1: never neutral
    assert main(base + ["--controllers", f"branch:{synthetic_logs(tmp_path / 'synthetic', steps=16)}",
                        "--out", str(tmp_path / "eval")]) == 0
    why = json.loads((tmp_path / "eval" / "branches" / "overoptimize-1000.json").read_text())
    ep = json.loads((tmp_path / "eval" / "results.json").read_text())["episodes"][0]
    assert len(why["decisions"]) == ep["branch_decisions"] and ep["verifications"] <= 6
    assert main(base + ["--controllers", "branch:/no/such/logs", "--out", str(tmp_path / "bad")]) == 2
