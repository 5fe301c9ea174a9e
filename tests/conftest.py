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
