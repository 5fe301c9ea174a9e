"""The monitored training CLI end to end, in subprocesses, including a resume after damage."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from stso_env import cp

REPO = Path(__file__).resolve().parent.parent


def train(run_dir, *extra, steps=30):
    cmd = [sys.executable, "-m", "stso_env.train", "--preset", "tiny", "--steps", str(steps),
           "--run-dir", str(run_dir), "--checkpoint-every", "10", "--seed", "3", "--scenario", "spiky",
           "--no-progress", *extra]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)


def rows(run_dir, kind="step"):
    out = []
    for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        if r["kind"] == kind:
            out.append(r)
    return out


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli") / "run"
    r = train(d)
    assert r.returncode == 0, r.stderr
    return d, r


def test_writes_checkpoints_metrics_and_config(finished_run):
    d, r = finished_run
    ck = d / "checkpoints"
    assert sorted(p.name for p in ck.glob("cp_*.ptz")) == ["cp_20.ptz", "cp_30.ptz"]  # keep = 2
    seeds = json.loads((ck / "seed_manifest.json").read_text())
    assert seeds["seed"] == 3 and seeds["scenario"] == "spiky" and seeds["tokenizer"] == "byte"
    steps = rows(d)
    assert [s["step"] for s in steps] == list(range(30))
    assert all(s["tokens"] == 512 and s["flops"] > 0 for s in steps)
    ev = rows(d, "eval")
    assert ev[-1]["step"] == 30 and ev[-1]["val_ppl"] > 1
    state = cp.load(ck / "cp_30.ptz")
    assert state["global_step"] == 30 and "transformer.wte.weight" in state["model"]
    man = cp.read_manifest(ck / "cp_30.ptz")
    acts = man["extras"]["activations"]
    assert len(acts) == 2 and {"act_mean", "act_std", "act_entropy", "attn_entropy"} <= set(acts[0])
    assert "val_ppl" in r.stdout


def test_resume_falls_back_to_intact_checkpoint_and_matches(finished_run, tmp_path):
    d, _ = finished_run
    import shutil
    d2 = tmp_path / "run"
    shutil.copytree(d, d2)
    original = rows(d2)
    newest = d2 / "checkpoints" / "cp_30.ptz"
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])  # truncate the newest
    r = train(d2, "--resume")
    assert r.returncode == 0, r.stderr
    assert "cp_30.ptz" in r.stderr and "resumed from" in r.stderr and "cp_20.ptz" in r.stderr
    resumed = rows(d2)
    assert [s["step"] for s in resumed] == list(range(30))  # no duplicated rows
    assert [s["loss"] for s in resumed] == [s["loss"] for s in original]  # same trajectory, exactly
    assert cp.load(d2 / "checkpoints" / "cp_30.ptz")["global_step"] == 30


def test_bad_input_gives_clear_error(tmp_path):
    r = train(tmp_path / "x", "--scenario", "nope")
    assert r.returncode == 2 and "neither a file nor a known scenario" in r.stderr
    r = train(tmp_path / "y", "--corpus", str(tmp_path / "missing.txt"))
    assert r.returncode == 2 and "missing.txt" in r.stderr
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim:\n  lr: fast\n")
    r = train(tmp_path / "z", "--config", str(bad))
    assert r.returncode == 2 and "optim.lr: expected a number" in r.stderr and str(bad) in r.stderr


def test_resume_with_other_config_is_refused(finished_run, tmp_path):
    import shutil
    d, _ = finished_run
    d2 = tmp_path / "run"
    shutil.copytree(d, d2)
    r = subprocess.run([sys.executable, "-m", "stso_env.train", "--preset", "tiny", "--steps", "30",
                        "--run-dir", str(d2), "--checkpoint-every", "10", "--seed", "4", "--scenario", "spiky",
                        "--no-progress", "--resume"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "different configuration" in r.stderr and "seed" in r.stderr


def test_fresh_start_in_used_run_dir_is_refused_without_overwrite(finished_run, tmp_path):
    import shutil
    d, _ = finished_run
    d2 = tmp_path / "run"
    shutil.copytree(d, d2)
    r = train(d2, steps=10)
    assert r.returncode == 2 and "already holds checkpoints" in r.stderr and "--overwrite" in r.stderr
    assert (d2 / "checkpoints" / "cp_30.ptz").exists()  # nothing lost
    r = train(d2, "--overwrite", steps=10)
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in (d2 / "checkpoints").glob("cp_*.ptz")) == ["cp_10.ptz"]
