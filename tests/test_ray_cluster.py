"""Scale-out on a Ray cluster: a head node (``ray start --head``) and a worker node that joins it
(``ray start --address``), one CPU each, both on this machine, each its own raylet and object store.
The engine's jobs, branch verification, PBT and ``agents.evaluate --ray-address`` on it give exactly
the results of a serial run with the same (one) torch thread, and their work lands on both nodes."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import pytest
import ray
import torch
import yaml

import stso_env  # noqa: F401  (registers the env)
from agents.controllers.pbt import PBT
from stso_env.branch import BranchConfig, BranchOrchestrator
from stso_env.config import TrainConfig, apply_overrides
from stso_env.eval.engine import run_jobs
from stso_env.proxy.model import ProxyConfig, ProxyEnsemble

pytestmark = pytest.mark.ray_cluster
RAY = Path(sys.executable).with_name("ray")
# Ray workers import a task's function by module name; this module's by value, from whatever folder pytest runs in
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
CHARS = 20_000  # a small built-in corpus: every fork rebuilt in a worker tokenizes it
ENV = {"preset": "tiny", "scenario": "spiky", "decision_interval": 5, "episode_steps": 20,
       "config": apply_overrides(TrainConfig(), {"data.builtin_chars": CHARS, "device": "cpu"})}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:
    """In the child: SIGTERM when this test process dies, so a killed test run leaves no Ray node behind."""
    import ctypes
    import signal

    ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _start(args: list[str], log: Path, env: dict[str, str]) -> subprocess.Popen:
    # --block: the command stays in the foreground and owns the node's processes; SIGTERM stops them all
    with log.open("w") as out:
        proc = subprocess.Popen([str(RAY), "start", "--block", "--disable-usage-stats", *args], env=env,
                                stdout=out, stderr=subprocess.STDOUT,
                                preexec_fn=_die_with_parent if sys.platform == "linux" else None)
    deadline = time.monotonic() + 60
    while "Ray runtime started" not in log.read_text():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"`ray start {' '.join(args)}` failed:\n{log.read_text()[-3000:]}")
        time.sleep(0.2)
    return proc


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def cluster():
    """``host:port`` of a running two-node cluster; stopped (both nodes) after the module's tests."""
    # a short folder of its own outside the working tree: Ray's unix sockets live under it, and a socket
    # path must stay under 108 bytes
    root = Path(tempfile.mkdtemp(prefix="stso-ray-", dir="/tmp"))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "RAY_USAGE_STATS_ENABLED": "0",
           # a loopback test cluster that lives for this module: no token (a real one: README, RAY_AUTH_MODE=token)
           "RAY_AUTH_MODE": "disabled",
           # the workers' token caches go where this session's do (tests/conftest.py), never to $HOME
           "STSO_CACHE": str(root / "cache"), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    port = _free_port()
    address = f"127.0.0.1:{port}"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # serial references: one thread, as every Ray task here
    procs: list[subprocess.Popen] = []
    try:
        procs.append(_start(["--head", f"--port={port}", "--node-ip-address=127.0.0.1", "--num-cpus=1",
                             "--include-dashboard=false", f"--temp-dir={root}"], root / "head.log", env))
        procs.append(_start([f"--address={address}", "--node-ip-address=127.0.0.1", "--num-cpus=1"],
                            root / "worker.log", env))
        ray.init(address=address, log_to_driver=False)
        deadline = time.monotonic() + 60
        while sum(n["Alive"] for n in ray.nodes()) < 2:
            assert time.monotonic() < deadline, f"the worker node did not join: {ray.nodes()}"
            time.sleep(0.2)
        assert ray.cluster_resources()["CPU"] == 2.0
        ray.shutdown()  # the tests connect through the code under test (verification stays connected)
        yield address
    finally:
        if ray.is_initialized():
            ray.shutdown()
        for proc in reversed(procs):
            _stop(proc)
        torch.set_num_threads(threads)
        shutil.rmtree(root, ignore_errors=True)


def _nodes() -> set[str]:
    return {n["NodeID"] for n in ray.nodes() if n["Alive"]}


# ---------------------------------------------------------------------- the engine


def _train(seed: int) -> dict[str, Any]:
    """A job: a small regression trained from ``seed``; its losses, weights and where it ran."""
    torch.manual_seed(seed)
    x, y = torch.randn(256, 32), torch.randn(256, 1)
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.Tanh(), torch.nn.Linear(64, 1))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(60):
        loss = torch.nn.functional.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        time.sleep(0.005)  # long enough that two jobs overlap, so both nodes get work
    weights = torch.cat([p.detach().flatten() for p in model.parameters()]).tolist()
    node = ray.get_runtime_context().get_node_id() if ray.is_initialized() else None
    return {"losses": losses, "weights": weights, "threads": torch.get_num_threads(), "node": node}


def test_run_jobs_on_the_cluster_equal_serial(cluster):
    seeds = [0, 1, 2, 3]
    serial = dict(run_jobs(_train, seeds, workers=1, threads=1, engine="serial"))
    on_ray = dict(run_jobs(_train, seeds, workers=2, threads=1, engine="ray", address=cluster))
    assert not ray.is_initialized()  # run_jobs connected, so it disconnected
    for s in seeds:
        assert on_ray[s]["losses"] == serial[s]["losses"] and on_ray[s]["weights"] == serial[s]["weights"]
        assert on_ray[s]["threads"] == 1
    assert len({r["node"] for r in on_ray.values()}) == 2  # both nodes ran jobs


# ---------------------------------------------------------------------- branch verification


def _proxy() -> ProxyEnsemble:
    # untrained, as in tests/test_branch.py: the orchestrator works with any proxy; horizon 2 windows
    return ProxyEnsemble(ProxyConfig(horizon=2, hidden=16, layers=1, ensemble=3, seed=0), nvec=(4, 3, 4, 2, 2, 2))


def test_branch_verification_on_the_cluster_equals_in_process(cluster, tmp_path):
    env = gym.make("STSO-GPT2-v0", **dict(ENV, episode_steps=200))  # the adopted fork has steps left
    env.reset(seed=0)
    env.step([1, 1, 1, 0, 0, 0])
    base = env.unwrapped
    runs = {}
    for name, ray_kw in (("in-process", {}), ("ray", {"use_ray": True, "ray_address": cluster})):
        fork = base.fork()
        cfg = BranchConfig(n_candidates=20, top_k=2, seed=1, adopt=True, rollback=False,
                           out_dir=str(tmp_path / name), **ray_kw)
        d = BranchOrchestrator(cfg, _proxy()).decide(fork, "run")
        # the adopted fork is the run now: it keeps training the same either way
        _, _, _, _, info = fork.step(np.asarray(d.chosen_action))
        runs[name] = (d, info, fork._env_state()["trainer"]["model"])
        fork.close()
    env.close()
    (local, info_local, model_local), (remote, info_remote, model_remote) = runs["in-process"], runs["ray"]
    assert local.executor == "sequential" and remote.executor == "ray"
    assert ray.is_initialized() and len(_nodes()) == 2  # verification stays connected to the cluster
    assert remote.verification == local.verification and len(remote.verification) >= 2
    assert remote.chosen_plan == local.chosen_plan and remote.adopted and local.adopted
    assert remote.wasted_flops == local.wasted_flops > 0
    keys = ("probe_loss", "train_loss", "global_step", "flops")
    assert [info_remote[k] for k in keys] == [info_local[k] for k in keys]
    assert model_remote.keys() == model_local.keys()
    assert all(torch.equal(model_remote[k], model_local[k]) for k in model_local)
    doc = json.loads(remote.path.read_text())
    assert doc["executor"] == "ray" and json.loads((remote.path.parent / "seed_manifest.json").read_text())[
        "config"]["ray_address"] == cluster


# ---------------------------------------------------------------------- PBT


def _pbt_run(ray_address: str | None) -> dict[str, Any]:
    env = gym.make("STSO-GPT2-v0", **ENV)
    ctrl = PBT(population=3, ready_windows=1, ray_address=ray_address)
    obs, info = env.reset(seed=3)
    ctrl.reset(env, seed=3, run_name="pbt")
    infos, n, done = [], 0, False
    while not done:
        if n == 1:  # the main run is the worst: it copies a member (an actor's state to this process)
            info = dict(info, probe_loss=1e9)
        elif n == 2:  # the main run is the best: a member copies it (this process's state to an actor)
            info = dict(info, probe_loss=0.0)
        obs, _, terminated, truncated, info = env.step(ctrl.act(obs, info))
        infos.append(info)
        n += 1
        done = terminated or truncated
    if ray_address is None:
        members = [m._env_state() for m in ctrl.members[1:]]
    else:
        members = ray.get([m.state.remote() for m in ctrl.members[1:]])
    out = {"events": ctrl.events, "hparams": ctrl.hparams, "member_flops": ctrl.member_flops,
           "extra_flops": ctrl.extra_flops, "latest": ctrl.latest, "decisions": ctrl.decisions,
           "probe": [i["probe_loss"] for i in infos], "nodes": set(ctrl.member_nodes),
           "models": [env.unwrapped._env_state()["trainer"]["model"]] + [m["trainer"]["model"] for m in members],
           "describe": ctrl.describe()}
    ctrl.close()
    env.close()
    return out


def test_pbt_members_on_the_cluster_equal_in_process(cluster):
    local, remote = _pbt_run(None), _pbt_run(cluster)
    assert remote["describe"].pop("members") == "ray" and local["describe"].pop("members") == "in-process"
    assert remote["events"][0]["target"] == 0 and remote["events"][1]["source"] == 0  # both ways of an exploit
    for key in ("events", "hparams", "member_flops", "extra_flops", "latest", "decisions", "probe", "describe"):
        assert remote[key] == local[key], key
    assert len(remote["events"]) == 2 and remote["extra_flops"] > 0
    for a, b in zip(remote["models"], local["models"]):
        assert all(torch.equal(a[k], b[k]) for k in b)
    assert len(remote["nodes"]) == 2 and not local["nodes"]  # one actor per node


# ---------------------------------------------------------------------- agents.evaluate --ray-address


def test_evaluate_on_the_cluster_equals_serial(cluster, tmp_path):
    from agents import evaluate

    settings = tmp_path / "settings.yaml"
    settings.write_text(yaml.safe_dump({"pbt": {"population": 3, "ready_windows": 1}}))
    common = ["--controllers", "fixed,pbt", "--seeds", "1", "--seed-offset", "0", "--steps", "40",
              "--decision-interval", "10", "--preset", "tiny", "--builtin-chars", str(CHARS), "--val-windows", "2",
              "--test-tokens", "65536", "--device", "cpu", "--threads", "1", "--settings", str(settings),
              "--no-progress"]
    evaluate.main([*common, "--engine", "serial", "--out", str(tmp_path / "serial")])
    evaluate.main([*common, "--engine", "ray", "--workers", "2", "--ray-address", cluster,
                   "--out", str(tmp_path / "ray")])

    def runs(folder: str) -> dict[str, dict[str, Any]]:
        out = {}
        for path in sorted((tmp_path / folder / "runs").rglob("*.json")):
            data = json.loads(path.read_text())
            rec = data["record"]
            for timing in ("checkpoint_io_seconds", "proxy_latency_ms"):
                rec.pop(timing)
            rec["accounting"].pop("wall_seconds")
            data["setup"]["describe"].pop("members", None)
            out[path.name] = {k: data[k] for k in ("job_key", "record", "curve", "setup")}
            out[path.name]["ray_address"] = data["job"]["ray_address"]
        return out

    serial, on_ray = runs("serial"), runs("ray")
    assert sorted(serial) == ["fixed__seed0.json", "pbt__seed0.json"] and sorted(on_ray) == sorted(serial)
    assert on_ray["pbt__seed0.json"].pop("ray_address") == cluster
    assert serial["pbt__seed0.json"].pop("ray_address") is None
    on_ray["fixed__seed0.json"].pop("ray_address"), serial["fixed__seed0.json"].pop("ray_address")
    for name in serial:
        assert on_ray[name] == serial[name], name
    assert on_ray["pbt__seed0.json"]["record"]["accounting"]["extra_flops_reported"] > 0


# ---------------------------------------------------------------------- settings (no cluster needed)


@pytest.mark.parametrize("kw, message", [
    ({"ray_address": "10.0.0.1:6379"}, "use_ray is false"),
    ({"use_ray": True, "ray_address": " "}, "cluster address"),
    ({"use_ray": True, "ray_address": 6379}, "cluster address"),
])
def test_ray_address_settings_are_checked(kw, message):
    from stso_env.errors import ConfigError

    with pytest.raises(ConfigError, match=message):
        BranchConfig(**kw)
    assert BranchConfig(use_ray=True, ray_address="10.0.0.1:6379").ray_address == "10.0.0.1:6379"
    with pytest.raises(ValueError, match="ray_address"):
        PBT(ray_address="")


def test_cli_flags_reach_the_controllers(tmp_path):
    from agents.controllers import make_controller
    from agents.evaluate import _job_key, make_jobs, parse_args
    from agents.train_controller import parse_args as train_args
    from stso_env.eval.suite import CellConfig, SuiteConfig

    args, _ = parse_args(["--ray-address", "10.0.0.1:6379"])
    assert args.ray_address == "10.0.0.1:6379" and train_args(["--ray-address", "h:1"]).ray_address == "h:1"
    suite = SuiteConfig(name="s", controllers=["pbt"], seeds=1, cells=[CellConfig()])
    job = make_jobs(suite, tmp_path, ray_address="10.0.0.1:6379")[0]
    assert job["ray_address"] == "10.0.0.1:6379"
    assert _job_key(job) == _job_key(dict(job, ray_address=None))  # a run on Ray equals the in-process one
    pbt = make_controller("pbt", settings={"population": 2}, ray_address="10.0.0.1:6379")
    assert pbt.ray_address == "10.0.0.1:6379" and pbt.describe()["members"] == "ray"
    # a setting given explicitly wins over the shared resource
    assert make_controller("pbt", settings={"ray_address": "h:2"}, ray_address="h:1").ray_address == "h:2"
