"""Benchmarks: ``make bench`` writes JSON under ``runs/bench/``.

    python -m agents.bench [--only checkpoint|monitor|env|proxy|collect|gpu] [--out runs/bench] [--quick]

Every JSON file records the commit, torch version, thread count and device (``meta``);
``--readme-block bench`` renders the README's table from them (:func:`report`).

``monitor`` -> ``runs/bench/monitor.json``: ``bare_steps_per_second`` of the
tiny trainer against ``monitored_steps_per_second`` with the monitor on as
STSO-GPT2-v0 runs it (every step's update; per window of 10 steps the probe pass
with entropy on the whole probe batch, ``update_probe`` and ``observe``; target:
at most 10 % slower), and ``index_update_ms``, the mean cost of one
``UncertaintyIndex.update`` (forecaster training included) on a synthetic series.
``env`` -> ``runs/bench/env.json``:
``env_overhead_ratio`` = bare trainer steps/s over the training steps/s inside
STSO-GPT2-v0 with ``run_dir`` logging on (target at most 1.10), and
``env_overhead_ratio_no_logging`` with it off. Both alternate the two sides A B B A.
``builtin_generation_seconds``: generating the 2M-character built-in corpus (target under 3 s).

``proxy`` -> ``runs/bench/proxy.json``: ``proxy_env_steps_per_second`` of
``ProxyVecModel.step_batch`` (STSO-Proxy-v0's batched transition, 1024 states
per call, default 5 x 2 x 128 ensemble; target >= 10,000) and
``score_500_candidates_ms``, the median time of one ``ProxyEnsemble.predict``
call on 500 (state, action) pairs (target <= 50 ms).

``collect`` -> ``runs/bench/collect.json``: ``parallel_speedup``, the wall time of collecting the
same tiny episodes in one process with its threads over that of 2 worker processes of one thread
each (``agents.collect --workers 2``), alternated A B B A; no target, the figure that says
whether ``collect.workers`` pays on a machine.

``gpu`` -> ``runs/bench/gpu.json`` (needs CUDA; it runs by default when torch sees a device):
see :func:`bench_gpu`.

``checkpoint`` -> ``runs/bench/checkpoint.json`` on the ``bench10m`` preset
(10.8M parameters, byte vocabulary, AdamW state after a warm-up), everything
measured side by side in one process:

* ``torch_save_bytes`` / ``lossless_bytes`` / ``int8_bytes``: the same full
  training state written by ``torch.save`` and by ``stso_env.cp`` (lossless and
  with 8-bit Adam moments);
* ``sync_save_seconds``: ``torch.save`` of that state to disk, flushed and
  fsynced (a checkpoint is only a checkpoint once it is durable; the figure
  without fsync is given too);
* ``async_real_cost_seconds`` (target ``async_real_cost_ratio`` <= 0.10 x
  ``sync_save_seconds``): the training thread's real cost of an overlapped async
  save, the extra wall time of the ``async_real_cost_steps`` steps during which
  the write is under way against the same steps from the same state without a
  save (alternated, averaged); beside it ``async_blocking_seconds``, mean time the
  training thread is blocked per save with the background writer in
  overlapped mode (the tensor copy runs during the next forward/backward, the
  trainer waits for it before its update; the wait is counted),
  ``overlap_next_step_extra_seconds`` how much longer the overlapped step
  takes than a plain one, and ``async_copy_blocking_seconds`` when save()
  copies everything itself;
* ``steps_per_second_without_cp`` / ``steps_per_second_with_cp``: the same
  300 steps from the same state, without checkpoints and with one every 100
  steps (at steps 50, 150, 250 so every write finishes inside the window),
  alternated A B B A and averaged;
* ``int8_final_loss_delta_after_10_restores``: relative difference of the
  validation loss between a run restored 10 times from int8 checkpoints (every
  20 steps) and the uninterrupted run (a lossless restore is bit-exact, so the
  uninterrupted run *is* the lossless path); also after 1 and 5 restores.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from stso_env import cp
from stso_env.config import TrainConfig, apply_overrides
from stso_env.train.trainer import Trainer

TARGETS = {
    "lossless_ratio": 0.87,
    "int8_ratio": 0.45,
    "async_real_cost_ratio": 0.10,
    "checkpoint_slowdown": 0.05,
    "int8_final_loss_delta_after_10_restores": 0.01,
}


def _cfg(preset: str, steps: int, **overrides: Any) -> TrainConfig:
    """The benchmarks' run: calm scenario, built-in corpus, CPU unless ``overrides`` say otherwise
    (dotted keys, e.g. ``{"device": "cuda"}``)."""
    return apply_overrides(TrainConfig(), {
        "model.preset": preset, "steps": steps, "scenario": "calm", "device": "cpu",
        "optim.warmup_steps": 20, "data.builtin_chars": 2_000_000, **overrides,
    })


def _timed(fn: Callable[[], Any]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _torch_save(state: dict, path: Path, fsync: bool) -> None:
    with open(path, "wb") as fh:
        torch.save(state, fh)
        fh.flush()
        if fsync:
            os.fsync(fh.fileno())


def _clone_state(t: Trainer) -> dict:
    """A detached copy of the trainer state to rewind to (so A/B runs start identically)."""
    tmp = Path(tempfile.mkdtemp()) / "s.ptz"
    cp.save(t.state_dict(), tmp)
    state = cp.load(tmp)
    tmp.unlink()
    return state


def bench_checkpoint(out: Path, quick: bool = False, overrides: dict[str, Any] | None = None,
                     write: bool = True) -> dict[str, Any]:
    """The checkpoint figures (see the module docstring); ``overrides`` change the run (the GPU benchmark
    passes its device, preset and precision), ``write=False`` returns them without writing checkpoint.json."""
    overrides = dict(overrides or {})
    preset = overrides.pop("model.preset", "tiny" if quick else "bench10m")
    window, every, restores, restore_every, warm = (60, 20, 3, 5, 10) if quick else (300, 100, 10, 20, 30)
    total = warm + 4 * window + restores * restore_every + 100
    t = Trainer(_cfg(preset, total, **overrides))
    print(f"[checkpoint] {preset}: {t.n_params / 1e6:.2f}M parameters; warm-up {warm} steps")
    t.train_steps(warm)
    start = _clone_state(t)
    res: dict[str, Any] = {"preset": preset, "n_params": t.n_params, "torch": torch.__version__,
                           "python": platform.python_version(), "threads": torch.get_num_threads()}

    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        state = t.state_dict()
        sync = [_timed(lambda: _torch_save(state, d / "ts.pt", True)) for _ in range(3)]
        nosync = [_timed(lambda: _torch_save(state, d / "ts.pt", False)) for _ in range(3)]
        res["torch_save_bytes"] = (d / "ts.pt").stat().st_size
        res["sync_save_seconds"] = statistics.median(sync)
        res["sync_save_seconds_no_fsync"] = statistics.median(nosync)
        lossless = [_timed(lambda: cp.save(state, d / "l.ptz")) for _ in range(3)]
        res["lossless_bytes"] = (d / "l.ptz").stat().st_size
        res["lossless_sync_save_seconds"] = statistics.median(lossless)
        cp.save(state, d / "q.ptz", quantize="int8")
        res["int8_bytes"] = (d / "q.ptz").stat().st_size
        cp.save(state, d / "b.ptz", quantize="bf16")
        res["bf16_moments_bytes"] = (d / "b.ptz").stat().st_size

        # Blocking time of the background writer, saves spaced so no write is still in flight.
        # Overlapped mode (the default of the training CLI): the copy runs during the next
        # forward/backward and the trainer waits only before its update; blocking = the save()
        # call + that wait. Plain mode copies everything inside save().
        plain = [_timed(t.train_step) for _ in range(3 if quick else 5)]
        for mode in ("overlap", "copy"):
            with cp.CheckpointStore(d / mode, keep=2) as store:
                t.mutation_barriers.append(store.barrier)
                blocked, next_step = [], []
                for _ in range(5):
                    store.wait()  # as with a checkpoint every 100 steps, no earlier write is in flight
                    t.train_steps(2)
                    before = store.stats()["total_blocking_seconds"]
                    store.save(t.global_step, t.state_dict(), overlap=mode == "overlap")
                    next_step.append(_timed(t.train_step))
                    blocked.append(store.stats()["total_blocking_seconds"] - before)
                store.wait()
                t.mutation_barriers.remove(store.barrier)
                key = "async_blocking_seconds" if mode == "overlap" else "async_copy_blocking_seconds"
                res[key] = statistics.mean(blocked[1:])  # the first save allocates the buffers
                if mode == "overlap":
                    # the copy shares memory bandwidth with the step it overlaps: report that cost too
                    res["overlap_next_step_extra_seconds"] = statistics.mean(next_step[1:]) - statistics.median(plain)
                res["async_write_seconds"] = store.stats()["total_write_seconds"] / store.stats()["n_written"]

        # The training thread's real cost of an overlapped async save: the extra wall time of the steps
        # during which a save is under way (the blocking, the copy competing with the step it overlaps,
        # the writer thread competing for the cores), against the same steps from the same state with
        # no save. The first save-run counts the steps the write needs; every run then takes exactly
        # that many steps, the save-runs waiting for the write at the end (inside the window).
        def steps_with_save(n: int | None) -> tuple[int, float]:
            with cp.CheckpointStore(d / "real", keep=2) as store:
                store.save(0, t.state_dict())  # allocate staging buffers outside the window
                store.wait()
                t.load_state_dict(start)
                t.mutation_barriers.append(store.barrier)
                written = store.stats()["n_written"]
                t0 = time.perf_counter()
                store.save(t.global_step + 1, t.state_dict(), overlap=True)
                done = 0
                while (n is None and store.stats()["n_written"] == written and done < 100) or \
                        (n is not None and done < n):
                    t.train_step()
                    done += 1
                store.wait()
                elapsed = time.perf_counter() - t0
                t.mutation_barriers.remove(store.barrier)
            return done, elapsed

        def steps_without_save(n: int) -> float:
            t.load_state_dict(start)
            return _timed(lambda: t.train_steps(n))

        n_real, _ = steps_with_save(None)  # also a warm-up of this store's buffers
        with_save, without_save = [], []
        for flag in (True, False, False, True, True, False):
            (with_save if flag else without_save).append(steps_with_save(n_real)[1] if flag
                                                         else steps_without_save(n_real))
        res["async_real_cost_steps"] = n_real
        res["async_real_cost_seconds"] = statistics.mean(with_save) - statistics.mean(without_save)
        print(f"[checkpoint] {n_real} steps with a save under way: {statistics.mean(with_save):.3f}s, "
              f"without: {statistics.mean(without_save):.3f}s")

        # Throughput without and with checkpoints, A B B A from the same state.
        def run(with_cp: bool) -> float:
            t.load_state_dict(start)
            with cp.CheckpointStore(d / "tp", keep=2) as store:
                store.save(0, t.state_dict())  # allocate staging buffers outside the window
                store.wait()
                t.mutation_barriers.append(store.barrier)
                t0 = time.perf_counter()
                for i in range(window):
                    t.train_step()
                    if with_cp and i % every == every // 2:
                        store.save(t.global_step, t.state_dict(), overlap=True)
                store.wait()
                rate = window / (time.perf_counter() - t0)
                t.mutation_barriers.remove(store.barrier)
                return rate

        rates = {False: [], True: []}
        for flag in (False, True, True, False):
            rates[flag].append(run(flag))
            print(f"[checkpoint] {'with' if flag else 'without'} checkpoints: {rates[flag][-1]:.2f} steps/s")
        res["steps_per_second_without_cp"] = statistics.mean(rates[False])
        res["steps_per_second_with_cp"] = statistics.mean(rates[True])
        res["checkpoint_every"] = every

        # int8 restores against the uninterrupted (= lossless, bit-exact) run.
        def val() -> float:
            return t.evaluate(128)["val_loss"]

        t.load_state_dict(start)
        ref = {}
        for r in range(1, restores + 1):
            t.train_steps(restore_every)
            if r in (1, 5, restores):
                ref[r] = val()
        t.load_state_dict(start)
        q = {}
        for r in range(1, restores + 1):
            t.train_steps(restore_every)
            cp.save(t.state_dict(), d / "r.ptz", quantize="int8")
            t.load_state_dict(cp.load(d / "r.ptz"))
            if r in (1, 5, restores):
                q[r] = val()
        for r in sorted(ref):
            res[f"int8_loss_delta_after_{r}_restores"] = abs(q[r] - ref[r]) / ref[r]
        res["int8_final_loss_delta_after_10_restores"] = res[f"int8_loss_delta_after_{restores}_restores"]
        res["lossless_final_val_loss"] = ref[restores]
        res["int8_final_val_loss"] = q[restores]

    res["lossless_ratio"] = res["lossless_bytes"] / res["torch_save_bytes"]
    res["int8_ratio"] = res["int8_bytes"] / res["torch_save_bytes"]
    res["async_blocking_ratio"] = res["async_blocking_seconds"] / res["sync_save_seconds"]
    res["async_real_cost_ratio"] = res["async_real_cost_seconds"] / res["sync_save_seconds"]
    res["checkpoint_slowdown"] = 1 - res["steps_per_second_with_cp"] / res["steps_per_second_without_cp"]
    res["targets"] = TARGETS
    res["meets_targets"] = {k: res[k] <= v for k, v in TARGETS.items()}
    if write:
        _write(out / "checkpoint.json", res)
    return res


def _bare_and(preset: str, steps: int, rounds: int, fn_name: str, make_other: Callable[[], Callable[[], int]],
              overrides: dict[str, Any] | None = None) -> tuple[float, float]:
    """Steps/s of a bare trainer and of ``make_other()`` (a callable running some steps, returning how many),
    alternated A B B A ... over ``rounds`` pairs, each on a fresh identical run (``overrides``: of the
    bare trainer's config, as the other side's)."""
    bare, other = [], []
    for r in range(rounds):
        for which in ((False, True) if r % 2 == 0 else (True, False)):
            if which:
                run = make_other()
                t0 = time.perf_counter()
                n = run()
                other.append(n / (time.perf_counter() - t0))
            else:
                t = Trainer(_cfg(preset, 10_000, **(overrides or {})))
                t.train_steps(5)  # warm-up outside the window, as the other side does
                _sync()
                t0 = time.perf_counter()
                t.train_steps(steps)
                _sync()
                bare.append(steps / (time.perf_counter() - t0))
    print(f"[{fn_name}] bare {statistics.mean(bare):.2f} steps/s, other {statistics.mean(other):.2f} steps/s")
    return statistics.mean(bare), statistics.mean(other)


def _index_update_ms(n: int) -> float:
    """Mean ``UncertaintyIndex.update`` time in ms (forecaster training included) over ``n`` steps of a
    calm synthetic loss and grad-norm series, after 200 start-up steps."""
    from stso_env.monitor.uncertainty import UncertaintyIndex

    rng = np.random.default_rng(6)
    t = np.arange(200 + n)
    loss = 3.0 * np.exp(-t / 400) + 2.0 + rng.normal(0, 0.02, t.size)
    grad = 1.0 + rng.normal(0, 0.05, t.size)
    index = UncertaintyIndex()
    for i in range(200):
        index.update(float(loss[i]), float(grad[i]))
    start = time.perf_counter()
    for i in range(200, 200 + n):
        index.update(float(loss[i]), float(grad[i]), 4.0 if i % 5 == 0 else None, 3.0 if i % 5 == 0 else None)
    return (time.perf_counter() - start) / n * 1e3


def bench_monitor(out: Path, quick: bool = False) -> dict[str, Any]:
    """The monitor as STSO-GPT2-v0 runs it, against the bare trainer, tiny preset: ``Monitor.update`` after
    every step (state features, uncertainty index with online forecasters, event accounting), and once
    per window of ``decision_interval`` (10) steps the probe pass on the whole probe batch (probe loss,
    attention and activation entropy on every probe sequence: ``Trainer.probe``), ``update_probe`` and
    ``observe``."""
    from stso_env.monitor.monitor import Monitor

    steps, rounds, interval = (60, 1, 10) if quick else (400, 3, 10)

    clock = {"train": 0.0, "monitor": 0.0}

    def make():
        t = Trainer(_cfg("tiny", 10_000))
        mon = Monitor(vocab_size=t.tokenizer.vocab_size, budget_steps=10_000)
        t.train_steps(5)

        def run() -> int:
            flops = 0.0
            for i in range(steps):
                t1 = time.perf_counter()
                s = t.train_step()
                t2 = time.perf_counter()
                mon.update(s)
                flops += s.flops
                if (i + 1) % interval == 0:
                    probe, rows = t.probe()
                    mon.set_layer_stats(rows)
                    mon.update_probe(probe, flops, interval)
                    mon.observe()
                    flops = 0.0
                t3 = time.perf_counter()
                clock["train"] += t2 - t1
                clock["monitor"] += t3 - t2
            return steps
        return run

    bare, monitored = _bare_and("tiny", steps, rounds, "monitor", make)
    res = {"preset": "tiny", "steps": steps, "rounds": rounds, "decision_interval": interval,
           "probe_sequences": int(Trainer(_cfg("tiny", 10)).probe_batch.shape[0]), "bare_steps_per_second": bare,
           "monitored_steps_per_second": monitored, "monitor_overhead_ab": bare / monitored - 1,
           # A/B rates of separate runs vary by several % on this machine; the time spent inside the
           # monitor's calls over the training steps of the same runs is the sharper figure
           "monitor_seconds_per_step": clock["monitor"] / (steps * rounds),
           "train_seconds_per_step": clock["train"] / (steps * rounds),
           "target_overhead": 0.10}
    res["monitor_overhead"] = clock["monitor"] / clock["train"]
    res["meets_target"] = res["monitor_overhead"] <= 0.10 and res["monitor_overhead_ab"] <= 0.10
    res["index_update_ms"] = _index_update_ms(100 if quick else 500)
    _write(out / "monitor.json", res)
    return res


def bench_env(out: Path, quick: bool = False, overrides: dict[str, Any] | None = None, write: bool = True,
              steps_rounds: tuple[int, int] | None = None) -> dict[str, Any]:
    """STSO-GPT2-v0 steps (decision_interval 10) against bare trainer steps, with the env's logging
    (``run_dir``: the Parquet log database and TensorBoard) on, and with it off (``overrides``: of the
    run's config, e.g. the GPU benchmark's device and preset)."""
    overrides = dict(overrides or {})
    preset = overrides.pop("model.preset", "tiny")
    steps, rounds = steps_rounds or ((60, 1) if quick else (400, 3))
    res: dict[str, Any] = {"preset": preset, "decision_interval": 10, "steps": steps, "rounds": rounds,
                           "target_ratio": 1.10}
    from torch.utils.tensorboard import SummaryWriter  # noqa: F401  (a once-per-process import, not per step)
    with tempfile.TemporaryDirectory() as logs:
        for label, logged in (("", True), ("_no_logging", False)):
            def make(logged=logged):
                run_dir = tempfile.mkdtemp(dir=logs) if logged else None
                env = _env(_cfg(preset, 10_000, **overrides), run_dir=run_dir)
                env.reset(seed=0)
                env.step([2, 1, 0, 0, 0, 0])  # warm-up outside the window: opens the log writers

                def run() -> int:
                    for _ in range(steps // 10):
                        env.step([2, 1, 0, 0, 0, 0])
                    env.close()  # the last log rows are flushed inside the window
                    _sync()
                    return steps
                return run

            bare, env_rate = _bare_and(preset, steps, rounds, f"env{label}", make, overrides)
            res[f"bare_steps_per_second{label}"] = bare
            res[f"env_training_steps_per_second{label}"] = env_rate
            res[f"env_overhead_ratio{label}"] = bare / env_rate
    res["meets_target"] = res["env_overhead_ratio"] <= 1.10
    from stso_env.train.corpus import generate_builtin_text

    # the built-in corpus every default run generates first (2M characters; target under 3 s)
    t0 = time.perf_counter()
    generate_builtin_text(11, 2_000_000)
    res["builtin_generation_seconds"] = time.perf_counter() - t0
    if write:
        _write(out / "env.json", res)
    return res


def bench_proxy(out: Path, quick: bool = False) -> dict[str, Any]:
    """STSO-Proxy-v0's batched transition and candidate scoring, with the default proxy architecture.

    The ensemble is fitted for a few epochs on synthetic rows first: speed depends on the
    architecture, not on what the weights learned, and a synthetic set keeps the benchmark free of
    a collection run.
    """
    import numpy as np

    from stso_env.envs.proxy_env import ProxyVecModel
    from stso_env.monitor.monitor import OBSERVATION_NAMES
    from stso_env.proxy.dataset import ACTION_NVEC, ProxyDataset
    from stso_env.proxy.model import ProxyConfig, ProxyEnsemble

    batch, candidates, calls = 1024, 500, (20 if quick else 200)
    rng = np.random.default_rng(0)
    n, s = 2048, len(OBSERVATION_NAMES)

    def synthetic(rows: int) -> ProxyDataset:
        state = rng.normal(size=(rows, s)).astype(np.float32)
        action = np.stack([rng.integers(0, k, rows) for k in ACTION_NVEC], axis=1)
        return ProxyDataset(state=state, action=action, loss_at_n=state[:, 0] - 0.01 * action[:, 0],
                            diverged_at_n=(state[:, 1] > 1.5).astype(np.float32),
                            instability_risk=np.abs(state[:, 2]), recovery_time=np.abs(state[:, 3]),
                            next_state=state + 0.01 * rng.normal(size=state.shape).astype(np.float32),
                            run_id=np.array(["synthetic"] * rows), episode=np.zeros(rows, np.int64),
                            seed=np.zeros(rows, np.int64), horizon=10, state_names=list(OBSERVATION_NAMES))

    cfg = ProxyConfig(epochs=2 if quick else 5, patience=5)
    model = ProxyEnsemble(cfg, state_dim=s, state_names=list(OBSERVATION_NAMES))
    t0 = time.perf_counter()
    model.fit(synthetic(n), synthetic(256))
    fit_s = time.perf_counter() - t0
    vec = ProxyVecModel(model)
    states = rng.uniform(-3, 3, (batch, s)).astype(np.float32)
    actions = np.stack([rng.integers(0, k, batch) for k in ACTION_NVEC], axis=1)
    actions[:, 5] = 0
    vec.step_batch(states, actions)  # warm-up: first call allocates
    t0 = time.perf_counter()
    for _ in range(calls):
        states = vec.step_batch(states, actions)[0]
    steps_per_s = batch * calls / (time.perf_counter() - t0)
    cs, ca = states[:candidates], actions[:candidates]
    model.predict(cs, ca)
    times = [_timed(lambda: model.predict(cs, ca)) for _ in range(calls)]
    res = {"ensemble": cfg.ensemble, "hidden": cfg.hidden, "layers": cfg.layers, "fit_seconds": fit_s,
           "batch": batch, "calls": calls, "threads": torch.get_num_threads(),
           "proxy_env_steps_per_second": steps_per_s,
           "score_500_candidates_ms": 1000 * statistics.median(times),
           "targets": {"proxy_env_steps_per_second": ">= 10000", "score_500_candidates_ms": "<= 50"}}
    res["meets_targets"] = {"proxy_env_steps_per_second": steps_per_s >= 10_000,
                            "score_500_candidates_ms": res["score_500_candidates_ms"] <= 50}
    _write(out / "proxy.json", res)
    return res


def _env(cfg: TrainConfig, run_dir: str | None = None):
    """STSO-GPT2-v0 on exactly ``cfg``'s run (the env's own preset, corpus and tokenizer arguments would
    override the config's), decision interval 10."""
    from stso_env.envs.gpt2_env import GPT2Env

    return GPT2Env(preset=cfg.model.preset, scenario=cfg.scenario, corpus=cfg.data.corpus,
                   tokenizer=cfg.data.tokenizer, decision_interval=10, episode_steps=10_000, config=cfg,
                   run_dir=run_dir)


def _sync() -> None:
    """Wait for queued GPU work, so a wall-clock window holds all of its kernels."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


#: Dense bf16 tensor-core peaks in TFLOP/s from the vendors' data sheets (without sparsity), matched
#: against ``torch.cuda.get_device_name()``, longest key first; ``--peak-tflops`` overrides.
PEAK_BF16_TFLOPS = {"H100 PCIe": 756.0, "H100": 989.4, "H200": 989.4, "H800": 989.4, "A100": 312.0,
                    "L40S": 362.1, "L4": 121.0, "A10G": 70.0}


def peak_tflops(device_name: str) -> float | None:
    for key in sorted(PEAK_BF16_TFLOPS, key=len, reverse=True):
        if key in device_name:
            return PEAK_BF16_TFLOPS[key]
    return None


def _throughput(cfg: TrainConfig, compile_model: bool, steps: int, warm: int, peak: float | None,
                device: str) -> dict[str, Any]:
    """Tokens/s, model FLOPs utilisation and peak memory of ``steps`` training steps after ``warm``
    (the compile happens in the warm-up). MFU counts the model's FLOPs (``Trainer.flops_per_token``:
    6 N + attention), not recomputation, so activation checkpointing lowers it."""
    t = Trainer(cfg, compile_model=compile_model)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t.train_steps(warm)
    _sync()
    t0 = time.perf_counter()
    stats = t.train_steps(steps)
    _sync()
    seconds = time.perf_counter() - t0
    tokens = sum(s.tokens for s in stats)
    res = {"preset": cfg.model.preset, "n_params": t.n_params, "batch_size": cfg.data.batch_size,
           "seq_len": t.seq_len, "precision": cfg.precision, "attn_implementation": cfg.model.attn_implementation,
           "compile": compile_model, "gradient_checkpointing": cfg.model.gradient_checkpointing,
           "steps": steps, "tokens_per_second": tokens / seconds, "flops_per_token": t.flops_per_token,
           "final_loss": stats[-1].loss}
    res["model_tflops_per_second"] = res["tokens_per_second"] * t.flops_per_token / 1e12
    res["mfu"] = res["model_tflops_per_second"] / peak if peak else None
    if device == "cuda":
        res["peak_memory_gb"] = torch.cuda.max_memory_allocated() / 1e9
    del t
    if device == "cuda":
        torch.cuda.empty_cache()
    return res


def _fork_latency(cfg: TrainConfig, rounds: int) -> dict[str, Any]:
    """Median seconds of an env's ``snapshot()``, ``restore()`` and ``fork()`` (in memory on CUDA: copies
    from device to device), with the trainer's whole state (model, AdamW moments) on the device."""
    env = _env(cfg)
    env.reset(seed=0)
    env.step([2, 1, 0, 0, 0, 0])
    timings: dict[str, list[float]] = {"snapshot": [], "restore": [], "fork": []}
    for _ in range(rounds):
        _sync()
        t0 = time.perf_counter()
        sid = env.snapshot()
        _sync()
        timings["snapshot"].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        env.restore(sid)
        _sync()
        timings["restore"].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        child = env.fork()
        _sync()
        timings["fork"].append(time.perf_counter() - t0)
        child.close()
    res = {"snapshot_mode": env.snapshot_mode, "n_params": env.trainer.n_params, "rounds": rounds,
           **{f"{k}_seconds": statistics.median(v) for k, v in timings.items()}}
    env.close()
    return res


def _default_tokenizer() -> str:
    """GPT-2's BPE from the shared data folder when it is there (the presets' published sizes), else bytes."""
    from stso_env.config import REPO_ROOT

    folder = REPO_ROOT.parent / "shared" / "data" / "gpt2-tokenizer"
    return str(folder) if (folder / "vocab.json").is_file() else "byte"


def bench_gpu(out: Path, quick: bool = False, device: str = "cuda", peak: float | None = None,
              tokenizer: str | None = None) -> dict[str, Any]:
    """The GPU path -> ``gpu.json``: tokens/s and MFU of the ``small`` preset in bf16 with SDPA attention,
    eager and under ``torch.compile``; activation checkpointing's memory and speed on ``large``; the env's
    overhead and its snapshot / restore / fork latency on ``small``; and the checkpoint figures on ``small``.
    ``device="cpu"`` with ``quick`` runs the same code on the tiny preset (a smoke run of the code path,
    not a result)."""
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("agents.bench --only gpu: torch sees no CUDA device; run it on a GPU machine "
                         "(the other benchmarks run on CPU)")
    name = torch.cuda.get_device_name() if device == "cuda" else platform.processor() or "cpu"
    peak = peak if peak is not None else (peak_tflops(name) if device == "cuda" else None)
    tokenizer = tokenizer or _default_tokenizer()
    small, big = ("tiny", "tiny") if quick else ("small", "large")
    steps, warm = (3, 2) if quick else (30, 10)
    common = {"device": device, "data.tokenizer": tokenizer, "model.attn_implementation": "sdpa",
              "precision": "bf16", "data.batch_size": 4 if quick else 16}
    res: dict[str, Any] = {"device_name": name, "peak_bf16_tflops": peak, "tokenizer": tokenizer}
    print(f"[gpu] {name}: peak {peak} TFLOP/s; tokenizer {tokenizer}")
    train = {}
    for label, compiled in (("eager", False), ("compiled", device == "cuda")):
        train[label] = _throughput(_cfg(small, 10_000, **common), compiled, steps, warm, peak, device)
        print(f"[gpu] {small} {label}: {train[label]['tokens_per_second']:,.0f} tokens/s, MFU {train[label]['mfu']}")
    res["train"] = train
    ckpt = {}
    for label, on in (("off", False), ("on", True)):
        cfg = _cfg(big, 10_000, **{**common, "data.batch_size": 2 if quick else 8, "model.gradient_checkpointing": on})
        ckpt[label] = _throughput(cfg, False, steps, warm, peak, device)
        print(f"[gpu] {big} activation checkpointing {label}: {ckpt[label]['tokens_per_second']:,.0f} tokens/s, "
              f"peak memory {ckpt[label].get('peak_memory_gb')} GB")
    res["activation_checkpointing"] = ckpt
    run = {**common, "model.preset": small, "data.batch_size": 4 if quick else 8}
    res["env"] = bench_env(out, quick=True, overrides=run, write=False,
                           steps_rounds=(20, 1) if quick else (100, 2))
    res["fork"] = _fork_latency(_cfg(small, 10_000, **run), 2 if quick else 5)
    print(f"[gpu] snapshot / restore / fork: {res['fork']['snapshot_seconds']:.3f} / "
          f"{res['fork']['restore_seconds']:.3f} / {res['fork']['fork_seconds']:.3f} s")
    res["checkpoint"] = bench_checkpoint(out, quick=quick, overrides=run, write=False)
    res["targets"] = {"mfu_compiled": 0.45}
    mfu = train["compiled"]["mfu"]
    res["meets_targets"] = {"mfu_compiled": None if mfu is None else mfu >= 0.45}
    _write(out / "gpu.json", res, device=device)
    return res


def _write(path: Path, data: dict, device: str = "cpu") -> None:
    from agents.evaluate import git_commit, machine

    data = {**data, "meta": {"commit": git_commit(), "torch": torch.__version__,
                             "python": platform.python_version(), "threads": torch.get_num_threads(),
                             "device": torch.cuda.get_device_name() if device == "cuda" else device,
                             "machine": machine()}}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)
    print(f"wrote {path}")
    for k, v in data.items():
        if not isinstance(v, dict):
            print(f"  {k}: {v:.4g}" if isinstance(v, float) else f"  {k}: {v}")


def bench_collect(out: Path, quick: bool = False) -> dict[str, Any]:
    """``agents.collect`` on the tiny preset, the same episodes (``spiky`` and ``adam_v_lag`` in turn, the
    ``mixed`` policy) collected in this process with its threads and by 2 worker processes of one torch
    thread each, alternated A B B A; wall seconds (worker start-up included) and their ratio."""
    from agents.collect import collect

    episodes, steps, rounds = (2, 40, 1) if quick else (4, 600, 2)  # the episodes agents.train_controller collects
    res: dict[str, Any] = {"preset": "tiny", "episodes": episodes, "episode_steps": steps, "rounds": rounds,
                           "scenarios": ["spiky", "adam_v_lag"], "workers": 2, "threads_per_worker": 1}
    sides = {"serial": {}, "parallel": {"workers": 2, "threads": 1}}
    times: dict[str, list[float]] = {k: [] for k in sides}
    order = [k for r in range(rounds) for k in (("serial", "parallel") if r % 2 == 0 else ("parallel", "serial"))]
    with tempfile.TemporaryDirectory() as tmp:
        for i, side in enumerate(order):
            run = functools.partial(collect, episodes=episodes, run_dir=Path(tmp) / f"{side}{i}",
                                    scenarios=res["scenarios"], corpus="builtin", seed=0, episode_steps=steps,
                                    decision_interval=10, policy="mixed", progress=False, **sides[side])
            times[side].append(_timed(run))
    res["serial_seconds"] = statistics.mean(times["serial"])
    res["parallel_seconds"] = statistics.mean(times["parallel"])
    res["parallel_speedup"] = res["serial_seconds"] / res["parallel_seconds"]
    _write(out / "collect.json", res)
    return res


BENCHES = {"checkpoint": bench_checkpoint, "monitor": bench_monitor, "env": bench_env, "proxy": bench_proxy,
           "collect": bench_collect}


def report(out: Path, label: str | None = None) -> str:
    """The README's benchmark table, rendered from the JSON files in ``out`` (every benchmark must be there);
    ``label`` names the folder in the table's heading (default: ``out`` as given)."""
    r = {}
    for name in sorted(BENCHES):
        path = out / f"{name}.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing: run python -m agents.bench --out {out}")
        r[name] = json.loads(path.read_text())
    c, m, e, p, col = r["checkpoint"], r["monitor"], r["env"], r["proxy"], r["collect"]
    meta = c["meta"]
    mb = 1e6
    restores = sorted(int(k.split("_")[4]) for k in c if k.startswith("int8_loss_delta_after_"))
    rows = [
        (f"checkpoint, `{c['preset']}` ({c['n_params'] / 1e6:.1f}M params + AdamW state): **real cost of an async "
         f"save to the training thread** (extra wall time of the {c['async_real_cost_steps']} steps a write is "
         f"under way, against the same steps without one)",
         f"{1e3 * c['async_real_cost_seconds']:.0f} ms = **{c['async_real_cost_ratio']:.2f}x** torch.save", "<= 0.1x"),
        ("... of which blocked in save() and before the next update (overlapped snapshot)",
         f"{1e3 * c['async_blocking_seconds']:.1f} ms = {c['async_blocking_ratio']:.3f}x", ""),
        ("... the step the snapshot copy overlaps runs longer by",
         f"{1e3 * c['overlap_next_step_extra_seconds']:.0f} ms", ""),
        ("... blocked when save() copies everything itself",
         f"{1e3 * c['async_copy_blocking_seconds']:.1f} ms", ""),
        ("synchronous `torch.save` + fsync", f"{1e3 * c['sync_save_seconds']:.0f} ms", ""),
        ("`torch.save` bytes", f"{c['torch_save_bytes'] / mb:.1f} MB", ""),
        ("lossless `cp_*.ptz` bytes", f"{c['lossless_bytes'] / mb:.1f} MB = **{c['lossless_ratio']:.3f}x** torch.save",
         "<= 0.87x"),
        ("int8-moment `cp_*.ptz` bytes", f"{c['int8_bytes'] / mb:.1f} MB = **{c['int8_ratio']:.3f}x**", "<= 0.45x"),
        (f"steps/s without / with a checkpoint every {c['checkpoint_every']} steps: slowdown (A B B A runs; "
         "below 0 means faster, i.e. noise)",
         f"{c['steps_per_second_without_cp']:.3f} / {c['steps_per_second_with_cp']:.3f}: "
         f"**{100 * c['checkpoint_slowdown']:+.1f} %**", "<= 5 %"),
        ("int8 mode: validation loss vs lossless after " + " / ".join(map(str, restores)) + " restores",
         " / ".join(f"{100 * c[f'int8_loss_delta_after_{k}_restores']:.2f} %" for k in restores[:-1]) +
         f" / **{100 * c[f'int8_loss_delta_after_{restores[-1]}_restores']:.2f} %**", "<= 1 %"),
        (f"monitor as the env runs it (tiny; probe pass on {m['probe_sequences']} sequences every "
         f"{m['decision_interval']} steps): time in monitor calls / training step time",
         f"{1e3 * m['monitor_seconds_per_step']:.2f} ms / {1e3 * m['train_seconds_per_step']:.1f} ms = "
         f"**{100 * m['monitor_overhead']:.1f} %** (A/B runs: {m['bare_steps_per_second']:.1f} vs "
         f"{m['monitored_steps_per_second']:.1f} steps/s, {100 * m['monitor_overhead_ab']:.1f} %)", "<= 10 %"),
        ("env (tiny, decision interval 10, logging on): bare / in-env training steps/s",
         f"{e['bare_steps_per_second']:.1f} / {e['env_training_steps_per_second']:.1f} = "
         f"**{e['env_overhead_ratio']:.3f}**", "<= 1.10"),
        ("... with logging off",
         f"{e['bare_steps_per_second_no_logging']:.1f} / {e['env_training_steps_per_second_no_logging']:.1f} = "
         f"{e['env_overhead_ratio_no_logging']:.3f}", ""),
        (f"proxy: batched STSO-Proxy-v0 steps/s ({p['batch']} states per call, {p['ensemble']} x {p['layers']} x "
         f"{p['hidden']} ensemble)", f"**{p['proxy_env_steps_per_second']:,.0f}**", ">= 10,000"),
        ("proxy: scoring 500 candidate (state, action) pairs, one call",
         f"**{p['score_500_candidates_ms']:.1f} ms**", "<= 50 ms"),
        (f"collection (`agents.collect`, tiny, {col['episodes']} episodes of {col['episode_steps']} steps): one "
         f"process with {col['meta']['threads']} threads / {col['workers']} workers of {col['threads_per_worker']} "
         "thread (A B B A)",
         f"{col['serial_seconds']:.1f} s / {col['parallel_seconds']:.1f} s = **{col['parallel_speedup']:.2f}x**", ""),
    ]
    commit = meta["commit"]
    dirty = ", uncommitted changes" if commit["dirty"] else ""
    # a benchmark added later is run alone; its file says so instead of borrowing the others' commit
    later = "".join(f"; `{name}.json` at commit {x['meta']['commit']['commit']}"
                    f"{', uncommitted changes' if x['meta']['commit']['dirty'] else ''}"
                    for name, x in sorted(r.items()) if x["meta"]["commit"] != commit)
    head = (f"From `{label or out}/*.json` (commit {commit['commit']}{dirty}{later}; "
            f"{meta['machine']['cpu']}, {meta['machine']['cores']} cores, torch {meta['torch']}, "
            f"{meta['threads']} threads, {meta['device']}):\n\n")
    return head + "| benchmark | measured | target |\n| --- | --- | --- |\n" + "".join(
        f"| {a} | {b} | {t} |\n" for a, b, t in rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m agents.bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", choices=sorted([*BENCHES, "gpu"]), action="append",
                   help="run only these benchmarks (gpu: the GPU path, gpu.json; needs CUDA; it runs by default "
                   "when torch sees a CUDA device)")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="the GPU's dense bf16 peak for MFU (default: from its name, see PEAK_BF16_TFLOPS)")
    p.add_argument("--gpu-device", default="cuda", choices=("cuda", "cpu"),
                   help="device of the gpu benchmark (cpu with --quick: a smoke run of its code path)")
    p.add_argument("--out", default="runs/bench", help="output folder for the JSON files")
    p.add_argument("--quick", action="store_true", help="tiny preset and few steps (a smoke run, not a result)")
    p.add_argument("--readme-block", default=None, metavar="NAME",
                   help="then write the table of OUT's JSON files between README's results:NAME markers")
    args = p.parse_args(argv)
    names = args.only or [*sorted(BENCHES), *(["gpu"] if torch.cuda.is_available() else [])]
    for name in names:
        if name == "gpu":
            bench_gpu(Path(args.out), quick=args.quick, device=args.gpu_device, peak=args.peak_tflops)
        else:
            BENCHES[name](Path(args.out), quick=args.quick)
    if args.readme_block:
        from stso_env.config import REPO_ROOT
        from stso_env.eval.published import replace_readme_block

        replace_readme_block(REPO_ROOT / "README.md", args.readme_block, report(Path(args.out)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
