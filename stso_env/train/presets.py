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

``qk_norm=True`` (``model.qk_norm``) adds a LayerNorm over each head's query and
key before the dot product, the fix Wortsman et al. 2023 ("Small-scale proxies
for large-scale Transformer training instabilities", arXiv 2309.14322) show
removes attention-logit growth at high LR (after Dehghani et al. 2023). It
patches each block's fused QKV projection ``c_attn`` (:class:`QKNormConv1D`), so
the attention kernel, and with eager attention its attention probabilities
(``output_attentions``), stay those of transformers' ``GPT2Attention``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import GPT2Config, GPT2LMHeadModel
from transformers.pytorch_utils import Conv1D

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


class QKNormConv1D(Conv1D):
    """GPT-2's fused query/key/value projection followed by a LayerNorm over each head's query and
    key (QK-layernorm, Wortsman et al. 2023, arXiv 2309.14322).

    Why it helps: attention logits are ``q . k / sqrt(d)``; at a high LR the query and key weights
    grow, the logits grow with the product of their norms, the softmax saturates on one key
    (attention entropy collapses) and the run breaks down (the paper: the loss diverges; on the tiny
    preset it falls back to about the loss of a model without attention for tens of windows, see
    ``configs/scenarios/attn_logit.yaml``). Normalising ``q`` and ``k`` bounds the logits by the
    LayerNorm gains, which grow only as fast as any other parameter.

    Made by :meth:`patch` from the existing ``c_attn`` (its class is swapped in place), so the weight
    and bias keep their parameters, their names in ``state_dict`` and their random init; only
    ``q_norm`` and ``k_norm`` (ones and zeros, no RNG drawn) are new.
    """

    n_head: int
    q_norm: torch.nn.LayerNorm
    k_norm: torch.nn.LayerNorm

    @classmethod
    def patch(cls, conv: Conv1D, n_head: int, eps: float) -> QKNormConv1D:
        if conv.nf % (3 * n_head):
            raise ValueError(f"c_attn has {conv.nf} outputs, not 3 x n_head ({n_head}) heads")
        conv.__class__ = cls
        head_dim = conv.nf // (3 * n_head)
        conv.n_head = n_head
        conv.q_norm = torch.nn.LayerNorm(head_dim, eps=eps, device=conv.weight.device, dtype=conv.weight.dtype)
        conv.k_norm = torch.nn.LayerNorm(head_dim, eps=eps, device=conv.weight.device, dtype=conv.weight.dtype)
        return conv  # type: ignore[return-value]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = super().forward(x).chunk(3, dim=-1)
        heads = (self.n_head, q.shape[-1] // self.n_head)
        q = self.q_norm(q.unflatten(-1, heads)).flatten(-2)
        k = self.k_norm(k.unflatten(-1, heads)).flatten(-2)
        return torch.cat((q, k, v), dim=-1)


def add_qk_norm(model: GPT2LMHeadModel) -> GPT2LMHeadModel:
    """Patch every block of ``model`` with :class:`QKNormConv1D`; records ``qk_norm`` in its config."""
    cfg = model.config
    for block in model.transformer.h:
        if not isinstance(block.attn.c_attn, QKNormConv1D):
            QKNormConv1D.patch(block.attn.c_attn, cfg.n_head, cfg.layer_norm_epsilon)
    cfg.qk_norm = True
    return model


def build_model(preset: str, vocab_size: int, *, pretrained: str | None = None, dropout: float = 0.0,
                attn_implementation: str = "eager", n_positions: int | None = None,
                qk_norm: bool = False) -> GPT2LMHeadModel:
    """Build a GPT-2 from a preset (random init from the current torch RNG) or from real weights.

    ``pretrained`` is a local folder written by ``save_pretrained``; anything that
    is not an existing folder is treated as an explicit hub id, fetched only if
    the machine is online, with a clear error otherwise. ``qk_norm`` adds
    QK-layernorm (:class:`QKNormConv1D`), for models trained from scratch only.
    """
    if pretrained is None:
        model = GPT2LMHeadModel(gpt2_config(preset, vocab_size, dropout=dropout,
                                            attn_implementation=attn_implementation, n_positions=n_positions))
        return add_qk_norm(model) if qk_norm else model
    if qk_norm:
        raise ConfigError("model.qk_norm: true needs a model trained from scratch, but model.pretrained is set; "
                          "GPT-2 weights were trained without QK-layernorm, and adding it changes what they "
                          "compute. Unset model.pretrained or set model.qk_norm: false")
    local = Path(pretrained).expanduser()
    if local.is_dir():
        if not (local / "config.json").is_file():
            raise ConfigError(f"model.pretrained: {local} has no config.json; give a folder written by "
                              "save_pretrained")
        if json.loads((local / "config.json").read_text(encoding="utf-8")).get("qk_norm"):
            raise ConfigError(f"model.pretrained: {local} holds a model with QK-layernorm (model.qk_norm), "
                              "which transformers' GPT2LMHeadModel cannot load; continue it from an STSO "
                              "checkpoint (--resume) instead")
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
