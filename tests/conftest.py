"""Shared fixtures. Tests run on CPU with tiny presets and write only under tmp_path."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = REPO.parent / "shared" / "data"
WIKITEXT2 = SHARED_DATA / "wikitext-2"
GPT2_TOKENIZER = SHARED_DATA / "gpt2-tokenizer"

# Two cores: keep intra-op threads fixed so timings and reductions are stable across runs.
# STSO_TEST_THREADS lowers it when several test processes share the cores.
torch.set_num_threads(int(os.environ.get("STSO_TEST_THREADS") or min(2, os.cpu_count() or 1)))


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Token caches go to a per-session temp folder, never into $HOME or the repo."""
    monkeypatch.setenv("STSO_CACHE", str(tmp_path_factory.getbasetemp() / "stso-cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")


@pytest.fixture(scope="session")
def rlhf_tiny(tmp_path_factory):
    """The tiny RLHF preparation (policy + reward model), built once per test session: (cfg, root, summary)."""
    from stso_env.rlhf.config import tiny_config
    from stso_env.rlhf.prepare import prepare

    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("rlhf")
    cfg = tiny_config()
    return cfg, root, prepare(cfg, root, progress=False)


def pytest_collection_modifyitems(config, items):
    """The Ray cluster tests run first. Ray keeps process-wide state after ``ray.shutdown()``: in a test
    process that had already run a local Ray session (the branch orchestrator's, the engine's), tasks on a
    later two-node cluster failed to fetch ``ray.put`` arguments from this driver (``OwnerDiedError``,
    Ray 2.60), while the same tests pass in a fresh process and the local-Ray tests pass after them."""
    items.sort(key=lambda item: 0 if item.get_closest_marker("ray_cluster") else 1)  # stable: order kept
