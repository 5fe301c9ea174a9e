"""GPT-2 model presets built with Hugging Face transformers.

=========  ========  ======  =====  =======  ===============================================
preset     layers    width   heads  context  use
=========  ========  ======  =====  =======  ===============================================
tiny       2         128     4      64       CPU default, tests, the RL environment
bench10m   6         384     6      64       benchmarks that need >= 10M parameters
small      12        768     12     1024     GPT-2 124M
medium     24        1024    16     1024     GPT-2 355M
large      36        1280    20     1024     GPT-2 774M
=========  ========  ======  =====  =======  ===============================================

The vocabulary size always comes from the tokenizer, so ``tiny`` with the byte
tokenizer has ~0.5M parameters and ``small`` with GPT-2 BPE has the familiar
124M. A local folder (``save_pretrained`` layout) can seed the weights; a hub id
is only contacted when the user names one explicitly.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import GPT2Config, GPT2LMHeadModel

from stso_env.errors import ConfigError


@dataclass(frozen=True)
class Preset:
    n_layer: int
    n_embd: int
    n_head: int
    n_positions: int


PRESETS: dict[str, Preset] = {
    "tiny": Preset(2, 128, 4, 64),
    "bench10m": Preset(6, 384, 6, 64),
    "small": Preset(12, 768, 12, 1024),
    "medium": Preset(24, 1024, 16, 1024),
    "large": Preset(36, 1280, 20, 1024),
}


def gpt2_config(preset: str, vocab_size: int, *, dropout: float = 0.0,
                attn_implementation: str = "eager", n_positions: int | None = None) -> GPT2Config:
    """The transformers ``GPT2Config`` of a preset for a given vocabulary."""
    if preset not in PRESETS:
        raise ConfigError(f"model.preset: unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    p = PRESETS[preset]
    cfg = GPT2Config(
        vocab_size=vocab_size,
        n_positions=n_positions or p.n_positions,
        n_embd=p.n_embd,
        n_layer=p.n_layer,
        n_head=p.n_head,
        resid_pdrop=dropout,
        embd_pdrop=dropout,
        attn_pdrop=dropout,
        bos_token_id=vocab_size - 1,
        eos_token_id=vocab_size - 1,
        attn_implementation=attn_implementation,
    )
    return cfg


def build_model(preset: str, vocab_size: int, *, pretrained: str | None = None, dropout: float = 0.0,
                attn_implementation: str = "eager", n_positions: int | None = None) -> GPT2LMHeadModel:
    """Build a GPT-2 from a preset (random init from the current torch RNG) or from real weights.

    ``pretrained`` is a local folder written by ``save_pretrained``; anything that
    is not an existing folder is treated as an explicit hub id, fetched only if
    the machine is online, with a clear error otherwise.
    """
    if pretrained is None:
        return GPT2LMHeadModel(gpt2_config(preset, vocab_size, dropout=dropout,
                                           attn_implementation=attn_implementation, n_positions=n_positions))
    local = Path(pretrained).expanduser()
    if local.is_dir():
        if not (local / "config.json").is_file():
            raise ConfigError(f"model.pretrained: {local} has no config.json; give a folder written by "
                              "save_pretrained")
        model = GPT2LMHeadModel.from_pretrained(str(local), local_files_only=True,
                                                attn_implementation=attn_implementation)
    else:
        try:
            model = GPT2LMHeadModel.from_pretrained(pretrained, attn_implementation=attn_implementation,
                                                    local_files_only=os.environ.get("HF_HUB_OFFLINE") == "1")
        except OSError as exc:
            raise ConfigError(
                f"model.pretrained: {pretrained!r} is not a local folder and could not be fetched from the "
                f"Hugging Face hub ({type(exc).__name__}). Offline, pass a folder written by save_pretrained, "
                "or leave model.pretrained unset to train from scratch."
            ) from exc
    if model.config.vocab_size != vocab_size:
        raise ConfigError(
            f"model.pretrained: the model's vocabulary has {model.config.vocab_size} entries but the tokenizer "
            f"has {vocab_size}; use the tokenizer the model was trained with (data.tokenizer)"
        )
    return model


def count_parameters(model: torch.nn.Module) -> int:
    """Unique trainable parameters (tied embeddings counted once)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def flops_per_token(model: GPT2LMHeadModel, seq_len: int) -> float:
    """Training FLOPs per token of ``model`` (see :func:`stso_env.monitor.events.training_flops_per_token`)."""
    from stso_env.monitor.events import training_flops_per_token

    cfg = model.config
    # position embeddings are a lookup, not a matmul: they do no FLOPs
    return training_flops_per_token(count_parameters(model) - cfg.n_positions * cfg.n_embd, cfg.n_layer,
                                    cfg.n_embd, seq_len)
