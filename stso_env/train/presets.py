"""Model presets built with Hugging Face transformers: GPT-2 (causal LM) and T5 (encoder-decoder).

=========  ========  ======  =====  =======  ===============================================
preset     layers    width   heads  context  use
=========  ========  ======  =====  =======  ===============================================
tiny       2         128     4      64       CPU default, tests, the RL environment
bench10m   6         384     6      64       benchmarks that need >= 10M parameters
small      12        768     12     1024     GPT-2 124M
medium     24        1024    16     1024     GPT-2 355M
large      36        1280    20     1024     GPT-2 774M
=========  ========  ======  =====  =======  ===============================================

=========  ======  ======  =====  ====  ====  =======  ============================================
preset     layers  d_model heads  d_ff  d_kv  context  use
=========  ======  ======  =====  ====  ====  =======  ============================================
t5-tiny    2 + 2   128     4      512   32    64       tests, STSO-T5-v0
t5-small   6 + 6   512     8      2048  64    512      T5-small shapes (60M with T5's vocabulary)
t5-base    12 + 12 768     12     3072  64    512      T5-base shapes (220M with T5's vocabulary)
=========  ======  ======  =====  ====  ====  =======  ============================================

T5 presets build transformers' ``T5ForConditionalGeneration`` (layers: encoder + decoder; T5 v1.0:
ReLU feed-forward, tied embeddings, relative position buckets) and train with span corruption
(:mod:`stso_env.train.span_corruption`); their vocabulary is the tokenizer's plus a pad token (the
decoder's start) and the sentinels that stand for the masked spans. "Context" is the training window;
T5's relative positions have no hard limit.

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
from transformers import GPT2Config, GPT2LMHeadModel, T5Config, T5ForConditionalGeneration
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


@dataclass(frozen=True)
class T5Preset:
    num_layers: int  # of the encoder, and of the decoder
    d_model: int
    num_heads: int
    d_ff: int
    d_kv: int
    n_positions: int  # the default training window


T5_PRESETS: dict[str, T5Preset] = {
    "t5-tiny": T5Preset(2, 128, 4, 512, 32, 64),
    "t5-small": T5Preset(6, 512, 8, 2048, 64, 512),
    "t5-base": T5Preset(12, 768, 12, 3072, 64, 512),
}


def model_family(preset: str) -> str:
    """``"gpt2"`` or ``"t5"``; a ConfigError for an unknown preset."""
    if preset in PRESETS:
        return "gpt2"
    if preset in T5_PRESETS:
        return "t5"
    raise ConfigError(f"model.preset: unknown preset {preset!r}; choose one of "
                      f"{', '.join([*PRESETS, *T5_PRESETS])}")


def context_length(preset: str) -> int:
    """The preset's default training window (``data.seq_len`` when that is unset)."""
    return (PRESETS[preset] if model_family(preset) == "gpt2" else T5_PRESETS[preset]).n_positions


def t5_config(preset: str, vocab_size: int, *, dropout: float = 0.0,
              attn_implementation: str = "eager") -> T5Config:
    """The transformers ``T5Config`` of a T5 preset; ``vocab_size`` is the whole model vocabulary
    (the tokenizer's, the pad token and the sentinels: :attr:`SpanCorruption.model_vocab_size`)."""
    from stso_env.train.span_corruption import SpanCorruption

    if model_family(preset) != "t5":
        raise ConfigError(f"model.preset: {preset!r} is not a T5 preset; choose one of {', '.join(T5_PRESETS)}")
    p = T5_PRESETS[preset]
    pad = SpanCorruption.pad_id_for(vocab_size)
    return T5Config(
        vocab_size=vocab_size, d_model=p.d_model, d_kv=p.d_kv, d_ff=p.d_ff, num_layers=p.num_layers,
        num_decoder_layers=p.num_layers, num_heads=p.num_heads, dropout_rate=dropout,
        feed_forward_proj="relu", tie_word_embeddings=True, pad_token_id=pad, eos_token_id=pad,
        decoder_start_token_id=pad, attn_implementation=attn_implementation,
    )


def gpt2_config(preset: str, vocab_size: int, *, dropout: float = 0.0,
                attn_implementation: str = "eager", n_positions: int | None = None) -> GPT2Config:
    """The transformers ``GPT2Config`` of a preset for a given vocabulary."""
    if model_family(preset) != "gpt2":
        raise ConfigError(f"model.preset: {preset!r} is not a GPT-2 preset; choose one of {', '.join(PRESETS)}")
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
                qk_norm: bool = False) -> GPT2LMHeadModel | T5ForConditionalGeneration:
    """Build a GPT-2 from a preset (random init from the current torch RNG) or from real weights; a T5
    preset builds a ``T5ForConditionalGeneration`` from scratch (``vocab_size`` is then the model's whole
    vocabulary, sentinels included).

    ``pretrained`` is a local folder written by ``save_pretrained``; anything that
    is not an existing folder is treated as an explicit hub id, fetched only if
    the machine is online, with a clear error otherwise. ``qk_norm`` adds
    QK-layernorm (:class:`QKNormConv1D`), for models trained from scratch only.
    """
    if model_family(preset) == "t5":
        if pretrained is not None or qk_norm:
            raise ConfigError(f"model.{'pretrained' if pretrained is not None else 'qk_norm'}: the T5 presets "
                              "train from scratch with STSO's tokenizers and sentinels (published T5 weights use "
                              "their own SentencePiece vocabulary) and without QK-layernorm; unset it")
        return T5ForConditionalGeneration(t5_config(preset, vocab_size, dropout=dropout,
                                                    attn_implementation=attn_implementation))
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


def flops_per_token(model: GPT2LMHeadModel | T5ForConditionalGeneration, seq_len: int) -> float:
    """Training FLOPs per token of ``model`` (see :func:`stso_env.monitor.events.training_flops_per_token`);
    for a T5, per token of the training window (:func:`t5_flops_per_token`)."""
    from stso_env.monitor.events import training_flops_per_token

    if isinstance(model, T5ForConditionalGeneration):
        return t5_flops_per_token(model, seq_len)
    cfg = model.config
    # position embeddings are a lookup, not a matmul: they do no FLOPs
    return training_flops_per_token(count_parameters(model) - cfg.n_positions * cfg.n_embd, cfg.n_layer,
                                    cfg.n_embd, seq_len)


def t5_flops_per_token(model: T5ForConditionalGeneration, seq_len: int) -> float:
    """Training FLOPs of a T5 under span corruption, per token of a ``seq_len`` window.

    The same count as GPT-2's (``6 N`` per token and parameter it passes, ``12 T d`` per layer and
    token for attention scores and values, forward + backward), applied to what each stack sees: the
    encoder its ``T_e`` input tokens, the decoder its ``T_d`` target tokens with self-attention over
    ``T_d`` and cross-attention over ``T_e`` keys, and the tied output projection ``T_d`` times.
    """
    from stso_env.train.span_corruption import SpanCorruption

    cfg = model.config
    t_enc, t_dec = SpanCorruption.lengths(seq_len)
    n_enc = sum(p.numel() for p in model.encoder.block.parameters())
    n_dec = sum(p.numel() for p in model.decoder.block.parameters())
    d_attn = cfg.num_heads * cfg.d_kv
    matmuls = 6.0 * (n_enc * t_enc + (n_dec + cfg.d_model * cfg.vocab_size) * t_dec)
    attention = 12.0 * d_attn * (cfg.num_layers * t_enc * t_enc
                                 + cfg.num_decoder_layers * t_dec * (t_dec + t_enc))
    return (matmuls + attention) / seq_len
