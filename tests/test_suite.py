"""Evaluation suites: strict loading, parallel runs equal serial ones, resume, committed results."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from agents.controllers import CONTROLLERS
from agents.evaluate import main as evaluate_main
from stso_env.errors import ConfigError
from stso_env.eval.engine import run_jobs
from stso_env.eval.published import readme_block, readme_tables, update_readme
from stso_env.eval.suite import SUITE_DIR, available_suites, load_suite

REPO = Path(__file__).resolve().parent.parent

SUITE = """
name: mini
description: one cell, two seeds, two controllers
steps: 30
decision_interval: 10
seeds: 2
seed_offset: 100000
builtin_chars: 100000
test_tokens: 65536
controllers: [fixed, zclip]
cells:
  - {scenario: calm, corpus: builtin}
"""

# Wall-clock fields differ between any two runs; everything else must be equal.
_TIMING = {"wall_seconds", "checkpoint_io_seconds", "io_seconds"}


def _strip(obj):
    if isinstance(obj, dict):
        return {k: _strip(v) for k, v in obj.items() if k not in _TIMING}
    if isinstance(obj, list):
        return [_strip(v) for v in obj]
    return obj


def _records(out: Path) -> dict[str, dict]:
    return {p.name: _strip(json.loads(p.read_text())["record"]) for p in sorted((out / "runs").rglob("*.json"))}


def test_load_suite_is_strict(tmp_path: Path) -> None:
    for name in available_suites():
        suite = load_suite(name, tuple(CONTROLLERS))
        assert suite.cells and suite.controllers
    bad = tmp_path / "bad.yaml"
    bad.write_text(SUITE.replace("seeds: 2", "seeds: 2\nworkers: 3"))
    with pytest.raises(ConfigError, match="workers: unknown key"):
        load_suite(str(bad))
    bad.write_text(SUITE.replace("[fixed, zclip]", "[fixed, zclipp]"))
    with pytest.raises(ConfigError, match="unknown controller.*zclipp"):
        load_suite(str(bad), tuple(CONTROLLERS))
    bad.write_text(SUITE + "  - {scenario: calm, corpus: builtin}\n")
    with pytest.raises(ConfigError, match="calm__builtin listed twice"):
        load_suite(str(bad))
    bad.write_text(SUITE.replace("steps: 30", "steps: 35"))
    with pytest.raises(ConfigError, match="multiple of decision_interval"):
        load_suite(str(bad))
    with pytest.raises(ConfigError, match="known: .*smoke"):
        load_suite("no-such-suite")


def test_variants_run_a_controller_again_under_other_settings(tmp_path: Path) -> None:
    from stso_env.eval.stats import ours

    path = tmp_path / "variants.yaml"
    path.write_text(SUITE.replace("seeds: 2", "seeds: 1").replace("[fixed, zclip]", "[fixed, hd, hd_fast]")
                    + "variants:\n  hd_fast: {controller: hd, settings: {beta: 0.001}}\n")
    suite = load_suite(str(path), tuple(CONTROLLERS))
    assert suite.controller_of("hd_fast") == "hd" and suite.settings_of("hd_fast") == {"beta": 0.001}
    assert suite.controller_of("hd") == "hd" and suite.settings_of("hd") == {}
    out = tmp_path / "out"
    evaluate_main(["--suite", str(path), "--threads", "1", "--no-progress", "--engine", "serial", "--out", str(out),
                   "--results-dir", str(tmp_path / "res")])
    runs = {p.stem: json.loads(p.read_text()) for p in (out / "runs" / "calm__builtin").glob("*.json")}
    assert set(runs) == {"fixed__seed100000", "hd__seed100000", "hd_fast__seed100000"}
    fast, plain = runs["hd_fast__seed100000"], runs["hd__seed100000"]
    assert fast["job"]["variant_of"] == "hd" and fast["job"]["settings"] == {"beta": 0.001}
    assert "variant_of" not in plain["job"]  # other jobs keep the keys stored runs were made with
    assert fast["setup"]["describe"]["name"] == "hd" and fast["setup"]["describe"]["beta"] == 0.001
    assert fast["record"]["final_test_ppl"] != plain["record"]["final_test_ppl"]  # the setting took effect
    res = json.loads((tmp_path / "res" / "results.json").read_text())
    assert res["settings"]["variants"] == {"hd_fast": {"controller": "hd", "settings": {"beta": 0.001}}}
    assert json.loads((out / "calm__builtin" / "results.json").read_text())["settings"]["variants"] == {
        "hd_fast": "hd"}
    # a variant of one of STSO's own controllers is never a baseline
    assert "stso_k1" in ours({"stso_k1": "stso", "hd_fast": "hd"}) and "hd_fast" not in ours({"hd_fast": "hd"})
    for variants, message in [("  hd: {controller: hd}", "the label is a controller's name"),
                              ("  hd_fast: {controller: hdd}", "unknown controller 'hdd'"),
                              ("  hd_slow: {controller: hd}", "not listed in controllers"),
                              ("  hd_fast: {settings: {beta: 1}}", "expected {controller: NAME")]:
        path.write_text(SUITE.replace("[fixed, zclip]", "[fixed, hd, hd_fast]") + "variants:\n" + variants + "\n")
        with pytest.raises(ConfigError, match=message):
            load_suite(str(path), tuple(CONTROLLERS))


def test_core_suite_covers_what_it_claims() -> None:
    core = load_suite("core", tuple(CONTROLLERS))
    builtin = {c.scenario for c in core.cells if c.corpus == "builtin"}
    scenarios = {p.stem for p in (REPO / "configs" / "scenarios").glob("*.yaml")}
    assert builtin == scenarios  # every scenario on the built-in corpus
    wikitext = {c.scenario for c in core.cells if "wikitext-2" in c.corpus}
    assert "spiky" in wikitext and len(wikitext) >= 2
    assert core.seeds >= 5
    # every controller, the oracle and new baselines included; `scripted` is a probe, not a method (with no
    # plan it is `fixed`), and its plans live in the suites that ask a question of one scenario
    assert set(core.controllers) == set(CONTROLLERS) - {"scripted"}


def test_parallel_equals_serial_then_resume(tmp_path: Path) -> None:
    """Two local worker processes with one thread each give exactly the serial results with one thread;
    --resume reruns only what is missing, and a second run without it is refused."""
    path = tmp_path / "mini.yaml"
    path.write_text(SUITE)
    common = ["--suite", str(path), "--threads", "1", "--no-progress"]
    evaluate_main(common + ["--out", str(tmp_path / "serial"), "--results-dir", str(tmp_path / "res-s"),
                            "--engine", "serial"])
    evaluate_main(common + ["--out", str(tmp_path / "par"), "--results-dir", str(tmp_path / "res-p"),
                            "--engine", "local", "--workers", "2"])
    serial, par = _records(tmp_path / "serial"), _records(tmp_path / "par")
    assert len(serial) == 4 and serial == par
    res = json.loads((tmp_path / "res-p" / "results.json").read_text())
    assert res["meta"]["workers"] == 2 and res["meta"]["threads"] == 1 and res["meta"]["engine"] == "local"
    assert res["meta"]["versions"]["torch"].startswith("2.") and res["meta"]["machine"]["cores"] >= 1
    cell = res["cells"]["calm__builtin"]
    assert set(cell["split_tokens"]) == {"train", "probe", "validation", "test"}
    assert cell["comparison"]["metrics"]["final_test_ppl"]["zclip"]["verdict"] in ("better", "worse", "no_difference")
    assert (tmp_path / "res-p" / "report.md").read_text().startswith("# Suite `mini`")

    with pytest.raises(SystemExit, match="--resume"):
        evaluate_main(common + ["--out", str(tmp_path / "par"), "--results-dir", str(tmp_path / "res-p")])
    gone = tmp_path / "par" / "runs" / "calm__builtin" / "zclip__seed100001.json"
    kept = tmp_path / "par" / "runs" / "calm__builtin" / "fixed__seed100000.json"
    kept_mtime = kept.stat().st_mtime_ns
    gone.unlink()
    evaluate_main(common + ["--out", str(tmp_path / "par"), "--results-dir", str(tmp_path / "res-p"), "--resume"])
    assert kept.stat().st_mtime_ns == kept_mtime
    assert _records(tmp_path / "par") == serial

    # Resume refuses runs made under other settings.
    path.write_text(SUITE.replace("steps: 30", "steps: 40"))
    with pytest.raises(SystemExit, match="other settings"):
        evaluate_main(common + ["--out", str(tmp_path / "par"), "--results-dir", str(tmp_path / "res-p"),
                                "--resume"])


def test_ray_engine_equals_serial() -> None:
    pytest.importorskip("ray", reason="the distributed extra is part of make test's install")
    jobs = [1.0, 4.0, 9.0, 16.0]
    serial = dict(run_jobs(math.sqrt, jobs, engine="serial", threads=1))
    ray_results = dict(run_jobs(math.sqrt, jobs, workers=2, engine="ray", threads=1))
    assert ray_results == serial == {1.0: 1.0, 4.0: 2.0, 9.0: 3.0, 16.0: 4.0}


def test_readme_tables_come_from_the_committed_results(tmp_path: Path) -> None:
    """Every suite marked ``readme: true`` has committed results, and the README's block equals the tables
    rendered from them: nothing in it is typed by hand."""
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    published = [p.stem for p in SUITE_DIR.glob("*.yaml") if load_suite(p.stem).readme]
    assert published, "no suite feeds the README's result tables"
    for name in published:
        results = REPO / "assets" / "results" / name / "results.json"
        assert results.is_file(), f"{results} is missing: run `python -m agents.evaluate --suite {name}`"
        block = readme_block(readme, name)
        assert block is not None, f"README.md has no results:{name} block"
        assert block == readme_tables(json.loads(results.read_text())), (
            f"README.md's {name} tables differ from {results}; regenerate with "
            f"`python -m agents.evaluate --update-readme {name}`")
    # update_readme rewrites exactly the block.
    copy = tmp_path / "README.md"
    name = published[0]
    copy.write_text(readme.replace(readme_block(readme, name), "stale\n"))
    assert update_readme(copy, name, REPO / "assets" / "results" / name / "results.json")
    assert copy.read_text() == readme


def test_write_reports_renders_the_report_and_its_copy_from_results(tmp_path: Path) -> None:
    from stso_env.eval.published import render_suite_report, write_reports

    results = json.loads((REPO / "assets" / "results" / "core" / "results.json").read_text())
    results["settings"]["report_copy"] = "copy.md"
    (tmp_path / "res").mkdir()
    (tmp_path / "res" / "results.json").write_text(json.dumps(results))
    written = write_reports(tmp_path / "res", tmp_path)
    assert written == [tmp_path / "res" / "report.md", tmp_path / "copy.md"]
    report = written[0].read_text()
    assert report == render_suite_report(results)
    assert "Ablations of the branch method" in report and "Where the gain comes from" in report
    assert "](figures/" not in written[1].read_text()
    assert written[1].read_text() == report.replace("](figures/", "](assets/results/core/figures/")


@pytest.mark.parametrize("name", ["rlhf_calibration", "rlhf", "rlhf_proxy"])
def test_rlhf_readme_blocks_are_the_committed_reports(name: str) -> None:
    """The Phase 2 blocks are the committed reports as their commands wrote them (``--readme-block``)."""
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    out = f"assets/results/{name}"
    report = (REPO / out / "report.md").read_text(encoding="utf-8")
    commit = json.loads((REPO / out / "results.json").read_text())["meta"]["commit"]["commit"]
    body = report.split("\n", 2)[2].replace("\n## ", "\n#### ").replace("](calibration.png)",
                                                                    f"]({out}/calibration.png)")
    assert readme_block(readme, name) == f"From `{out}/report.md` (commit {commit}):\n\n{body}"


def test_run_identity_ignores_resources_a_controller_does_not_read() -> None:
    from agents.evaluate import _job_key

    base = {"cell": "c", "scenario": "spiky", "controller": "zclip", "seed": 1, "settings": {},
            "proxy": "a/proxy", "policy": "a/policy.zip", "branch_dir": "x", "tuning_dir": "y"}
    moved = dict(base, proxy="b/proxy", policy="b/policy.zip", branch_dir="z")
    assert _job_key(base) == _job_key(moved)  # a baseline reads neither: its stored run still counts
    assert _job_key(base) != _job_key(dict(base, seed=2))
    for name in ("stso", "policy"):  # these read the proxy (the policy's shield too)
        assert _job_key(dict(base, controller=name)) != _job_key(dict(moved, controller=name))
    assert _job_key(dict(base, controller="stso")) == _job_key(dict(base, controller="stso", policy="other"))
    # the content digest counts like the path, for the same controllers only
    retrained = dict(base, proxy_sha256="new")
    assert _job_key(dict(base, proxy_sha256="old")) == _job_key(retrained)
    assert _job_key(dict(base, controller="stso", proxy_sha256="old")) != _job_key(dict(retrained, controller="stso"))


def test_content_digest_follows_contents_not_paths(tmp_path: Path) -> None:
    from stso_env.files import content_digest

    a, b = tmp_path / "a", tmp_path / "b"
    for d in (a, b):
        (d / "sub").mkdir(parents=True)
        (d / "proxy.json").write_text("{}")
        (d / "sub" / "w.bin").write_bytes(b"\x00\x01")
    assert content_digest(a) == content_digest(b) and len(content_digest(a)) == 64
    (b / "sub" / "w.bin").write_bytes(b"\x00\x02")
    assert content_digest(a) != content_digest(b)
    (b / "sub" / "w.bin").write_bytes(b"\x00\x01")
    (b / "sub" / "w.bin").rename(b / "sub" / "v.bin")  # a renamed file is another artefact
    assert content_digest(a) != content_digest(b)
    assert content_digest(a / "proxy.json") != content_digest(a)
    assert content_digest(None) is None and content_digest(tmp_path / "missing") is None
    # a report beside the artefact is not part of it (its fit time changes from run to run)
    (b / "sub" / "v.bin").rename(b / "sub" / "w.bin")
    (a / "proxy_report.json").write_text('{"fit_seconds": 1.85}')
    (b / "proxy_report.json").write_text('{"fit_seconds": 1.9}')
    assert content_digest(a) == content_digest(b)
    assert content_digest(a, every_byte=True) != content_digest(b, every_byte=True)


def test_content_digest_of_a_stable_baselines3_save_follows_its_weights(tmp_path: Path) -> None:
    """Two trainings with the same seed save the same weights, and SB3's ``data`` member differs (start time,
    episode wall times, object addresses): same digest; more training changes the weights and the digest."""
    from stable_baselines3 import PPO

    from stso_env.files import content_digest

    def trained(steps: int, name: str) -> Path:
        model = PPO("MlpPolicy", "CartPole-v1", n_steps=32, batch_size=32, n_epochs=1, seed=0, device="cpu")
        model.learn(steps)
        model.save(tmp_path / name / "policy")  # the same file name: a file's name is part of its digest
        return tmp_path / name / "policy.zip"

    a, b, c = trained(64, "a"), trained(64, "b"), trained(128, "c")
    assert content_digest(a, every_byte=True) != content_digest(b, every_byte=True)
    assert content_digest(a) == content_digest(b) != content_digest(c)


def test_resume_refuses_runs_made_with_a_proxy_retrained_in_place(tmp_path: Path) -> None:
    """A proxy retrained into the same folder keeps its path; --resume must not pass the runs made with the
    old one off as runs of the new one (baselines, which never read it, stay valid)."""
    from agents.evaluate import _run_path, execute, make_jobs, parse_args
    from stso_env.files import content_digest

    path = tmp_path / "mini.yaml"
    path.write_text(SUITE)
    proxy = tmp_path / "proxy"
    proxy.mkdir()
    (proxy / "proxy.json").write_text('{"fit": 1}')
    out = tmp_path / "out"
    args, _ = parse_args(["--suite", str(path), "--resume", "--no-progress", "--out", str(out)])

    def suite_with(controllers: list[str]):
        suite = load_suite(str(path))
        suite.controllers, suite.proxy = controllers, str(proxy)
        return suite

    def store(job: dict, legacy: bool = False) -> None:
        if legacy:  # a run written before runs recorded digests
            job = {k: v for k, v in job.items() if not k.endswith("_sha256")}
        _run_path(out, job).parent.mkdir(parents=True, exist_ok=True)
        _run_path(out, job).write_text(json.dumps({"job": job, "record": {}, "curve": [], "setup": {}}))

    for job in make_jobs(suite_with(["fixed", "stso"]), out):
        store(job)
    assert len(execute(suite_with(["fixed", "stso"]), out, args)) == 2  # every run kept, none to run
    (proxy / "proxy.json").write_text('{"fit": 2}')  # retrained in place
    with pytest.raises(SystemExit, match="another proxy than .*retrained in place"):
        execute(suite_with(["fixed", "stso"]), out, args)
    assert len(execute(suite_with(["fixed"]), out, args)) == 1  # the baseline never read it
    for job in make_jobs(suite_with(["stso"]), out):
        store(job, legacy=True)
    assert len(execute(suite_with(["fixed", "stso"]), out, args)) == 2  # legacy runs match on the path
    # a report written beside the proxy is not part of it: runs recorded under this rule are kept
    for job in make_jobs(suite_with(["stso"]), out):
        store(job)
    (proxy / "proxy_report.json").write_text('{"fit_seconds": 1.0}')
    assert len(execute(suite_with(["fixed", "stso"]), out, args)) == 2
    # runs recorded with the every-byte digest (report included) of the proxy they were made with are kept
    every_byte = content_digest(proxy, every_byte=True)
    assert every_byte != content_digest(proxy)
    for job in make_jobs(suite_with(["stso"]), out):
        store(dict(job, proxy_sha256=every_byte))
    assert len(execute(suite_with(["fixed", "stso"]), out, args)) == 2
    (proxy / "proxy.json").write_text('{"fit": 3}')
    with pytest.raises(SystemExit, match="another proxy than .*retrained in place"):
        execute(suite_with(["fixed", "stso"]), out, args)
    (proxy / "proxy_report.json").unlink()
    # an outcome gate named in the policy's settings counts by its content too
    gate = tmp_path / "gate.json"
    gate.write_text('{"fit": 1}')
    gated = suite_with(["policy"])
    gated.settings = {"policy": {"gate": str(gate)}}
    jobs = make_jobs(gated, out)
    assert all(j["gate_sha256"] for j in jobs)
    assert "gate_sha256" not in make_jobs(suite_with(["fixed"]), out)[0]
    for job in jobs:
        store(job)
    assert len(execute(gated, out, args)) == 1
    gate.write_text('{"fit": 2}')
    with pytest.raises(SystemExit, match=f"another gate than {gate}.*retrained in place"):
        execute(gated, out, args)


def test_a_variant_scores_with_a_proxy_or_policy_of_its_own(tmp_path: Path) -> None:
    """A variant's ``proxy`` (or ``policy``) replaces the suite's for its runs only (path and content digest),
    so two proxies or policies meet side by side in one suite; a bad value is a clear error."""
    from agents.evaluate import make_jobs
    from stso_env.files import content_digest

    proxies = {}
    for name in ("proxy_a", "proxy_b"):
        proxies[name] = tmp_path / name
        proxies[name].mkdir()
        (proxies[name] / "proxy.json").write_text(json.dumps({"fit": name}))
    path = tmp_path / "two_proxies.yaml"
    path.write_text(SUITE.replace("[fixed, zclip]", "[fixed, stso, stso_b]") + f"proxy: {proxies['proxy_a']}\n"
                    + f"variants:\n  stso_b: {{controller: stso, proxy: {proxies['proxy_b']}}}\n")
    suite = load_suite(str(path), tuple(CONTROLLERS))
    assert suite.proxy_of("stso") == str(proxies["proxy_a"]) and suite.proxy_of("stso_b") == str(proxies["proxy_b"])
    jobs = {j["controller"]: j for j in make_jobs(suite, tmp_path / "out") if j["seed"] == 100000}
    assert jobs["stso"]["proxy"] == str(proxies["proxy_a"]) and jobs["stso_b"]["proxy"] == str(proxies["proxy_b"])
    assert jobs["stso_b"]["variant_of"] == "stso"
    assert jobs["stso"]["proxy_sha256"] == content_digest(proxies["proxy_a"]) != jobs["stso_b"]["proxy_sha256"]
    assert jobs["stso_b"]["proxy_sha256"] == content_digest(proxies["proxy_b"])
    path.write_text(SUITE.replace("[fixed, zclip]", "[fixed, stso_b]")
                    + "variants:\n  stso_b: {controller: stso, proxy: 3}\n")
    with pytest.raises(ConfigError, match="variants.stso_b.proxy: expected the path of a proxy folder"):
        load_suite(str(path), tuple(CONTROLLERS))
    # the same for a policy of its own
    policies = {name: tmp_path / f"{name}.zip" for name in ("a", "b")}
    for name, p in policies.items():
        p.write_bytes(name.encode())
    path.write_text(SUITE.replace("[fixed, zclip]", "[fixed, policy, policy_b]")
                    + f"proxy: {proxies['proxy_a']}\npolicy: {policies['a']}\n"
                    + f"variants:\n  policy_b: {{controller: policy, policy: {policies['b']}}}\n")
    suite = load_suite(str(path), tuple(CONTROLLERS))
    jobs = {j["controller"]: j for j in make_jobs(suite, tmp_path / "out") if j["seed"] == 100000}
    assert jobs["policy"]["policy"] == str(policies["a"]) and jobs["policy_b"]["policy"] == str(policies["b"])
    assert jobs["policy_b"]["policy_sha256"] == content_digest(policies["b"]) != jobs["policy"]["policy_sha256"]
    assert jobs["policy_b"]["proxy"] == jobs["policy"]["proxy"] == str(proxies["proxy_a"])


def test_a_suite_that_names_its_proxy_and_runs_no_policy_trains_nothing(tmp_path: Path, monkeypatch) -> None:
    """prepare_artefacts trains make train's artefacts only for what a suite lacks: a suite of proxy controllers
    that names its proxy needs no policy; one that runs the policy without naming it still gets one."""
    import agents.train_controller
    from agents.evaluate import prepare_artefacts

    calls = []
    monkeypatch.setattr(agents.train_controller, "main", lambda argv: calls.append(argv))
    path = tmp_path / "mini.yaml"
    path.write_text(SUITE.replace("[fixed, zclip]", "[fixed, stso]") + f"proxy: {tmp_path}\n")
    suite = load_suite(str(path), tuple(CONTROLLERS))
    prepare_artefacts(suite, tmp_path / "out", False)
    assert calls == [] and suite.policy is None
    suite.controllers = ["fixed", "policy"]
    prepare_artefacts(suite, tmp_path / "out", False)
    assert len(calls) == 1 and suite.policy == str(tmp_path / "out" / "prepare" / "train-controller" / "policy.zip")
