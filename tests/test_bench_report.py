"""The README's benchmark table is rendered from the committed benchmark JSON, never typed by hand."""

from __future__ import annotations

import json
from pathlib import Path

from agents.bench import BENCHES, report
from stso_env.eval.published import readme_block

REPO = Path(__file__).resolve().parent.parent
PUBLISHED = REPO / "assets" / "results" / "bench"


def test_readme_bench_table_is_the_committed_run_and_each_file_says_where_it_ran():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    assert readme_block(readme, "bench") == report(PUBLISHED, label="assets/results/bench")
    for name in BENCHES:
        meta = json.loads((PUBLISHED / f"{name}.json").read_text())["meta"]
        assert meta["commit"]["commit"] and meta["torch"] and meta["threads"] >= 1 and meta["device"] == "cpu"


def test_gpu_benchmark_code_path_runs_on_cpu_and_computes_mfu(tmp_path, monkeypatch):
    import pytest
    import torch

    from agents.bench import bench_gpu, peak_tflops

    # data-sheet peaks by device name; unknown devices give no MFU rather than a guess
    assert peak_tflops("NVIDIA H100 80GB HBM3") == 989.4 and peak_tflops("NVIDIA H100 PCIe") == 756.0
    assert peak_tflops("NVIDIA H200") == 989.4 and peak_tflops("NVIDIA A100-SXM4-80GB") == 312.0
    assert peak_tflops("Some GPU") is None
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit, match="no CUDA device"):
        bench_gpu(tmp_path, device="cuda")

    # the same code on the tiny preset on CPU, with a made-up peak of 1 TFLOP/s
    res = bench_gpu(tmp_path, quick=True, device="cpu", peak=1.0, tokenizer="byte")
    saved = json.loads((tmp_path / "gpu.json").read_text())
    assert saved["meta"]["device"] == "cpu" and saved["train"]["eager"]["precision"] == "bf16"
    eager = res["train"]["eager"]
    assert eager["attn_implementation"] == "sdpa" and eager["tokens_per_second"] > 0
    tflops = eager["tokens_per_second"] * eager["flops_per_token"] / 1e12
    assert eager["mfu"] == eager["model_tflops_per_second"] == tflops
    ac = res["activation_checkpointing"]
    assert not ac["off"]["gradient_checkpointing"] and ac["on"]["gradient_checkpointing"]
    assert res["env"]["env_overhead_ratio"] > 0 and res["fork"]["fork_seconds"] > 0
    assert res["checkpoint"]["lossless_ratio"] < 1
