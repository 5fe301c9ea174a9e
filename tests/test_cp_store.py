"""Tests of CheckpointStore: retention, background writes, damage recovery, crash safety."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from stso_env import cp
from stso_env.cp import CheckpointStore, checkpoint_path
from stso_env.errors import CheckpointCorruptError, CheckpointError, ConfigError

REPO_ROOT = Path(__file__).resolve().parents[1]


def small_state(step: int) -> dict:
    return {"w": torch.full((4, 4), float(step)), "step": step, "rng": torch.get_rng_state()}


def temp_files(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if ".tmp-" in p.name)


def damage(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[cp.PREFIX_BYTES + 3] ^= 0xFF  # inside the first chunk
    path.write_bytes(bytes(data))


def test_checkpoint_path(tmp_path: Path) -> None:
    assert checkpoint_path(tmp_path, 200) == tmp_path / "cp_200.ptz"
    assert CheckpointStore(tmp_path, async_write=False).path(7) == tmp_path / "cp_7.ptz"


@pytest.mark.parametrize("async_write", [False, True])
def test_keep_retains_exactly_the_newest(tmp_path: Path, async_write: bool) -> None:
    with CheckpointStore(tmp_path, keep=2, async_write=async_write) as store:
        for step in (10, 20, 30, 40):
            store.save(step, small_state(step))
        assert store.list() == [30, 40]
        assert store.latest() == 40
        assert store.load()["step"] == 40
        assert store.load(30)["step"] == 30
        assert store.n_saves == 4 and store.n_written == 4
        assert store.last_bytes == store.path(40).stat().st_size
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cp_30.ptz", "cp_40.ptz"]

    with CheckpointStore(tmp_path, keep=3, async_write=async_write) as store:
        store.save(50, small_state(50))
        store.save(60, small_state(60))
        assert store.list() == [40, 50, 60]


def test_just_written_checkpoint_is_never_pruned(tmp_path: Path) -> None:
    # A run resumed from step 20 writes step 25 while 30 and 40 (an abandoned future) exist.
    with CheckpointStore(tmp_path, keep=2, async_write=False) as store:
        for step in (20, 30, 40):
            store.save(step, small_state(step))
        store.save(25, small_state(25))
        assert store.list() == [25, 40]


@pytest.mark.parametrize("keep", [1, 0, -3, True, 2.0])
def test_keep_below_two_is_refused(tmp_path: Path, keep: object) -> None:
    with pytest.raises(ConfigError, match="at least 2"):
        CheckpointStore(tmp_path, keep=keep)  # type: ignore[arg-type]


def test_bad_options_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="quantize"):
        CheckpointStore(tmp_path, quantize="int4")
    with pytest.raises(ConfigError, match="level"):
        CheckpointStore(tmp_path, level=99)
    with pytest.raises(ConfigError, match="chunk_bytes"):
        CheckpointStore(tmp_path, chunk_bytes=8)
    store = CheckpointStore(tmp_path, async_write=False)
    with pytest.raises(CheckpointError, match="non-negative int"):
        store.save(-1, {})


def test_latest_intact_skips_damaged_newest(tmp_path: Path) -> None:
    with CheckpointStore(tmp_path, keep=3, async_write=False) as store:
        for step in (1, 2, 3):
            store.save(step, small_state(step))
        damage(store.path(3))
        with pytest.warns(RuntimeWarning, match="cp_3.ptz.*fails its checksum"):
            assert store.latest_intact() == 2
        assert store.path(3).exists()  # kept for inspection
        with pytest.warns(RuntimeWarning, match="cp_3.ptz"):
            assert store.load()["step"] == 2
        with pytest.raises(CheckpointCorruptError, match="cp_3.ptz"):
            store.load(3)
        with pytest.raises(CheckpointError, match="no checkpoint for step 9"):
            store.load(9)
        damage(store.path(2))
        damage(store.path(1))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            assert store.latest_intact() is None
            with pytest.raises(CheckpointError, match="no intact checkpoint"):
                store.load()


def test_stale_temp_files_are_removed_on_open(tmp_path: Path) -> None:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale_other = tmp_path / f".cp_7.ptz.tmp-{dead.pid}-0"
    stale_own = tmp_path / f".cp_8.ptz.tmp-{os.getpid()}-123456"
    stale_seed = tmp_path / f".seed_manifest.json.tmp-{dead.pid}-1"
    live_other = tmp_path / f".cp_9.ptz.tmp-{os.getppid()}-0"  # a live process may be writing it
    for p in (stale_other, stale_own, stale_seed, live_other):
        p.write_bytes(b"\x00" * 100)
    keep = tmp_path / "notes.txt"
    keep.write_text("not ours")

    store = CheckpointStore(tmp_path, async_write=False)
    assert sorted(store.removed_temp_files) == sorted([stale_other, stale_own, stale_seed])
    assert temp_files(tmp_path) == [live_other.name]
    assert keep.exists() and store.list() == []


def test_async_blocks_less_than_it_writes(tmp_path: Path) -> None:
    gen = torch.Generator().manual_seed(0)
    state = {f"layer{i}": torch.randn(1024, 1280, generator=gen) for i in range(4)}  # 21 MB
    with CheckpointStore(tmp_path, async_write=True) as store:
        blocked = 0.0
        for step in range(3):
            blocked += store.save(step, state)
            store.wait()  # let each write finish so the next save measures only its snapshot
        assert store.total_blocking_seconds == pytest.approx(blocked)
        assert store.n_written == 3 and store.total_write_seconds > 0
        assert blocked < store.total_write_seconds, (blocked, store.total_write_seconds)
        loaded = store.load()
    for key, value in state.items():
        assert torch.equal(loaded[key], value)


def test_async_snapshot_is_isolated_from_later_changes(tmp_path: Path) -> None:
    w = torch.zeros(1000)
    with CheckpointStore(tmp_path, async_write=True) as store:
        store.save(1, {"w": w, "meta": {"lr": 0.1}})
        w += 1  # training continues while the write runs
        store.save(2, {"w": w, "meta": {"lr": 0.2}})
        w += 1
        one, two = store.load(1), store.load(2)
    assert torch.equal(one["w"], torch.zeros(1000)) and one["meta"]["lr"] == 0.1
    assert torch.equal(two["w"], torch.ones(1000)) and two["meta"]["lr"] == 0.2


def test_background_error_surfaces_on_wait_save_and_close(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    store = CheckpointStore(run_dir, async_write=True)
    store.save(1, small_state(1))
    store.wait()
    # The directory vanishing (unmounted disk, deleted run) makes the next write fail.
    for p in run_dir.iterdir():
        p.unlink()
    run_dir.rmdir()
    store.save(2, small_state(2))
    with pytest.raises(CheckpointError, match="background checkpoint write failed.*cp_2.ptz"):
        store.wait()
    store.wait()  # reported once

    store.save(3, small_state(3))
    with pytest.raises(CheckpointError, match="cp_3.ptz"):
        store.save(4, small_state(4))  # the earlier failure surfaces; this save is not started

    store.save(5, small_state(5))
    with pytest.raises(CheckpointError, match="cp_5.ptz"):
        store.close()
    with pytest.raises(CheckpointError, match="closed"):
        store.save(6, small_state(6))


def test_sync_mode_stats_and_extras(tmp_path: Path) -> None:
    with CheckpointStore(tmp_path, async_write=False, config_hash="cfg-1") as store:
        blocked = store.save(5, {"w": torch.ones(10)}, extras={"layers": [{"mean": 0.0, "entropy": 1.5}]})
        assert blocked >= store.last_write_seconds > 0
        assert store.last_blocking_seconds == blocked
        m = store.read_manifest(5)
    assert m["step"] == 5 and m["config_hash"] == "cfg-1"
    assert m["extras"] == {"layers": [{"mean": 0.0, "entropy": 1.5}]}


def test_quantized_store(tmp_path: Path) -> None:
    state = {
        "optim": {
            "state": {
                0: {
                    "step": torch.tensor(3.0),
                    "exp_avg": torch.randn(1000) * 1e-3,
                    "exp_avg_sq": torch.rand(1000) * 1e-6,
                }
            }
        }
    }
    with CheckpointStore(tmp_path, async_write=True, quantize="int8") as store:
        store.save(1, state)
        out = store.load(1)
        encodings = [t["encoding"] for t in store.read_manifest(1)["tensors"]]
    assert encodings == ["grouped", "int8_signed", "int8_sqrt"]
    got = out["optim"]["state"][0]
    assert torch.equal(got["step"], torch.tensor(3.0))
    assert torch.allclose(got["exp_avg"], state["optim"]["state"][0]["exp_avg"], rtol=0.15, atol=2e-5)


def test_seed_manifest(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path, async_write=False)
    assert store.read_seed_manifest() is None
    path = store.write_seed_manifest({"seed": 17, "data_seed": 3, "note": "baseline"})
    assert path == tmp_path / "seed_manifest.json"
    assert store.read_seed_manifest() == {"seed": 17, "data_seed": 3, "note": "baseline"}
    store.write_seed_manifest({"seed": 18})
    assert store.read_seed_manifest() == {"seed": 18}
    assert temp_files(tmp_path) == []
    with pytest.raises(CheckpointError, match="plain JSON"):
        store.write_seed_manifest({"bad": object()})
    assert store.list() == []


_CHILD = textwrap.dedent(
    """
    import sys, torch
    from stso_env.cp import CheckpointStore
    store = CheckpointStore(sys.argv[1], async_write=False)
    store.save(1, {"w": torch.arange(1000, dtype=torch.float32), "step": 1})
    print("saved 1", flush=True)
    big = {"w": torch.randn(50_000_000), "step": 2}  # 200 MB
    while True:
        store.save(2, big)
    """
)


def test_sigkill_during_write_keeps_previous_checkpoint(tmp_path: Path) -> None:
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    child = subprocess.Popen(
        [sys.executable, "-c", _CHILD, str(tmp_path)], stdout=subprocess.PIPE, env=env, cwd=REPO_ROOT
    )
    try:
        assert child.stdout is not None
        assert child.stdout.readline().strip() == b"saved 1"
        deadline = time.monotonic() + 60
        while not any(name.startswith(".cp_2.ptz.tmp-") for name in temp_files(tmp_path)):
            assert time.monotonic() < deadline, "the child never started writing step 2"
            assert child.poll() is None, "the child died on its own"
            time.sleep(0.002)
        os.kill(child.pid, signal.SIGKILL)
    finally:
        if child.poll() is None:
            child.kill()
        child.wait()
        if child.stdout is not None:
            child.stdout.close()
    assert child.returncode == -signal.SIGKILL

    assert cp.verify(tmp_path / "cp_1.ptz")["step"] == 1
    assert cp.load(tmp_path / "cp_1.ptz")["step"] == 1
    if (tmp_path / "cp_2.ptz").exists():  # only if a whole write finished before the kill
        assert cp.verify(tmp_path / "cp_2.ptz")["step"] == 2
    left_over = temp_files(tmp_path)
    assert left_over, "the kill should have interrupted a write"
    store = CheckpointStore(tmp_path, async_write=False)
    assert temp_files(tmp_path) == []
    assert sorted(p.name for p in store.removed_temp_files) == left_over
    assert store.latest_intact() in (1, 2)


def test_overlapped_snapshot_captures_state_at_save_time(tmp_path):
    """save(overlap=True) copies on a helper thread; after barrier() the caller may mutate freely."""
    import torch as _torch

    from stso_env.cp import CheckpointStore as _Store

    state = {"w": _torch.arange(1_000_000, dtype=_torch.float32), "step": 3, "arr": np.arange(10)}
    expected = state["w"].clone()
    with _Store(tmp_path / "ov", keep=2) as store:
        store.save(3, state, overlap=True)
        waited = store.barrier()
        assert waited >= 0.0 and store.barrier() == 0.0  # a second barrier has nothing to wait for
        state["w"].add_(1.0)  # mutate after the barrier: the checkpoint must not see it
        state["arr"][:] = -1
        state["step"] = 4
        store.wait()
        loaded = store.load(3)
    assert _torch.equal(loaded["w"], expected) and loaded["step"] == 3 and loaded["arr"].tolist() == list(range(10))
