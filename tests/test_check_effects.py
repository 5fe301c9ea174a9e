"""agents.check_effects: real forked effects against the proxy's predictions, on a tiny real run."""

from __future__ import annotations

import json

import numpy as np
import pytest

from agents.check_effects import main, point_summary
from tests.test_proxy import HORIZON, synth_table


def test_point_summary_known_answers():
    real = np.array([-0.2, 0.1, 0.3])
    # the same order: rank correlation 1; the proxy picks the first change, the real best: no regret
    s = point_summary(real, np.array([-0.01, 0.0, 0.02]))
    assert s["spearman"] == pytest.approx(1.0) and s["chosen"] == 1 and s["regret"] == 0.0
    # reversed order: -1; the proxy picks the third change (+0.3) against the real best (-0.2)
    s = point_summary(real, np.array([0.02, 0.0, -0.01]))
    assert s["spearman"] == pytest.approx(-1.0) and s["chosen"] == 3
    assert s["chosen_real_effect"] == pytest.approx(0.3) and s["regret"] == pytest.approx(0.5)
    # the proxy keeps the neutral action (all predicted to hurt): its real effect is 0, the best is -0.2
    s = point_summary(real, np.array([0.1, 0.2, 0.3]))
    assert s["chosen"] == 0 and s["regret"] == pytest.approx(0.2)
    # a diverged fork: no correlation, and choosing it is the worst possible choice
    s = point_summary(np.array([np.inf, 0.1]), np.array([-1.0, 0.0]))
    assert s["spearman"] is None and s["chosen"] == 1 and s["regret"] == np.inf


@pytest.fixture(scope="module")
def proxy_dir(tmp_path_factory):
    """A small proxy over the real observation width (fitted on the synthetic log of tests/test_proxy.py)."""
    from stso_env.proxy.dataset import build_targets
    from stso_env.proxy.model import ProxyConfig, ProxyEnsemble

    ds = build_targets(synth_table(range(24)), horizon=HORIZON)
    model = ProxyEnsemble(ProxyConfig(horizon=2, hidden=16, ensemble=2, epochs=3))
    model.fit(ds.subset(ds.seed < 20), ds.subset(ds.seed >= 20))
    out = tmp_path_factory.mktemp("proxy")
    model.save(out)
    return out


def test_forks_a_tiny_real_run_and_reports(proxy_dir, tmp_path):
    out = tmp_path / "fx"
    argv = ["--proxy", str(proxy_dir), "--scenarios", "calm", "--seeds", "1", "--windows", "1",
            "--episode-steps", "40", "--out", str(out), "--no-progress"]
    assert main(argv) == 0
    res = json.loads((out / "effects.json").read_text())
    assert res["horizon"] == 2 and len(res["points"]) == 1 and len(res["changes"]) == 10
    point = res["points"][0]
    assert point["window"] == 1 and len(point["real"]) == len(point["predicted"]) == 10
    # the neutral fork replays the main run exactly: every difference is the intervention's
    assert res["fork_max_abs_gap"] == 0.0
    # a real intervention moves the real loss; the run is deterministic
    assert np.ptp(point["real"]) > 0
    assert res["meta"]["proxy_sha256"] and res["meta"]["versions"]["torch"].startswith("2.")
    again = tmp_path / "again"
    assert main(argv[:-3] + ["--out", str(again), "--no-progress"]) == 0
    assert json.loads((again / "effects.json").read_text())["points"][0]["real"] == point["real"]
    report = (out / "report.md").read_text()
    assert "| `calm` | 1 |" in report and "`lr_change=x0.8`" in report


def test_bad_windows_are_clear_errors(proxy_dir, tmp_path, capsys):
    base = ["--proxy", str(proxy_dir), "--scenarios", "calm", "--episode-steps", "40", "--out", str(tmp_path)]
    assert main(base + ["--windows", "a,b"]) == 2
    assert "comma-separated integers" in capsys.readouterr().err
    assert main(base + ["--windows", "3"]) == 2  # 3 + horizon 2 passes the run's 4 windows
    assert "passes the run's 4 windows" in capsys.readouterr().err


def test_cooldown_and_end_of_run_measures(proxy_dir, tmp_path):
    """--cooldown and --to-end add the real effects after a cooldown and at the end of the run; the end of a
    run that forks at its last horizon is the horizon's own outcome."""
    out = tmp_path / "fx"
    argv = ["--proxy", str(proxy_dir), "--scenarios", "calm", "--seeds", "1", "--windows", "1",
            "--episode-steps", "60", "--changes", "lr_change=x0.8,clip_policy=zclip", "--cooldown", "2",
            "--to-end", "--ema", "0.9", "--out", str(out), "--no-progress"]
    assert main(argv) == 0
    res = json.loads((out / "effects.json").read_text())
    point = res["points"][0]
    assert res["changes"] == ["lr_change=x0.8", "clip_policy=zclip"]
    assert len(point["real"]) == len(point["real_cooled"]) == len(point["real_end"]) == len(point["real_ema"]) == 2
    assert all(np.isfinite(point["real_cooled"])) and all(np.isfinite(point["real_end"]))
    # the averaged weights lag the live ones: another loss, so other effects
    assert all(np.isfinite(point["real_ema"])) and point["real_ema"] != point["real"]
    # a cooldown is more training: each copy's loss differs from its loss at +N, so the effects do too
    assert point["real_cooled"] != point["real"] and point["real_end"] != point["real"]
    c = res["per_change"]["lr_change=x0.8"]
    assert c["end_mean"] == pytest.approx(point["real_end"][0]) and c["cooled_sign_as_end"] in (0.0, 1.0)
    assert c["ema_sign_as_end"] in (0.0, 1.0)
    assert "sign after cooldown as at the end" in (out / "report.md").read_text()
    assert "sign of averaged weights (EMA decay 0.9) at +N as at the end" in (out / "report.md").read_text()
    # fork at window 3 of 6 with horizon 2: one window is left after the horizon
    assert main(argv[:-8] + ["--windows", "3", "--to-end", "--out", str(tmp_path / "late"), "--no-progress"]) == 0
    assert main(argv[:8] + ["--changes", "lr_change=x9", "--out", str(tmp_path / "bad"), "--no-progress"]) == 2
