"""Per-layer activation and attention summary statistics of a GPT-2 or a T5.

Checkpoints store these summaries instead of activations themselves: they cost
a few hundred bytes per layer and still show where a model is collapsing.

For each transformer block ``i`` on a given batch:

* ``act_mean``, ``act_std``: mean and standard deviation of the block's output
  hidden states;
* ``act_entropy``: mean over tokens of the entropy of ``softmax(h)`` over the
  hidden dimension, divided by ``log(d)`` so it lies in [0, 1] for any width
  (1 = activation mass spread evenly, near 0 = one dominant feature);
* ``attn_entropy``: mean over heads and query positions of the entropy of the
  attention distribution, divided by ``log`` of the number of visible keys
  (causal), so 1 means uniform attention and 0 attention on one token.

A T5 (``T5ForConditionalGeneration``) has one row per encoder block, then one per decoder
block; an encoder block's attention entropy is over all input tokens (it sees both ways), a
decoder block's over its self-attention, causal as GPT-2's.

Attention probabilities need the eager attention kernel: a model that trains with
another kernel (``model.attn_implementation: sdpa``, the fast path) is switched to
eager for this pass only and back afterwards, so training steps keep the fast
kernel and the summary still has ``attn_entropy``.
"""

from __future__ import annotations

import math

import torch


@torch.no_grad()
def activation_summary(model: torch.nn.Module, input_ids: torch.Tensor,
                       labels: torch.Tensor | None = None, *, decoder_input_ids: torch.Tensor | None = None
                       ) -> list[dict[str, float]] | tuple[list, torch.Tensor]:
    """Summaries for every block of ``model`` (a ``GPT2LMHeadModel`` or ``T5ForConditionalGeneration``)
    on ``input_ids`` (for a T5 also ``decoder_input_ids``, the shifted targets).

    With ``labels`` the same forward pass also gives the per-sequence loss, returned as
    ``(rows, seq_losses)``: a monitor that needs both pays for one pass.
    """
    encoder_decoder = hasattr(model, "encoder") and hasattr(model, "decoder")
    if encoder_decoder and decoder_input_ids is None:
        raise ValueError("activation_summary: an encoder-decoder model needs decoder_input_ids")
    blocks = [*model.encoder.block, *model.decoder.block] if encoder_decoder else list(model.transformer.h)
    outs: list[torch.Tensor] = [torch.empty(0)] * len(blocks)

    def hook(i: int):
        def fn(_module, _inp, out):
            outs[i] = (out[0] if isinstance(out, tuple) else out).detach().float()
        return fn

    handles = [b.register_forward_hook(hook(i)) for i, b in enumerate(blocks)]
    was_training = model.training
    model.eval()
    kernel = getattr(model.config, "_attn_implementation", "eager")
    if kernel != "eager":
        model.set_attn_implementation("eager")  # the probe pass alone pays for attention probabilities
    try:
        extra = {"decoder_input_ids": decoder_input_ids} if encoder_decoder else {}
        res = model(input_ids=input_ids, output_attentions=True, use_cache=False, **extra)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
        if kernel != "eager":
            model.set_attn_implementation(kernel)
    if encoder_decoder:
        attentions = [*(res.encoder_attentions or [None] * len(model.encoder.block)),
                      *(res.decoder_attentions or [None] * len(model.decoder.block))]
        causal = [False] * len(model.encoder.block) + [True] * len(model.decoder.block)
    else:
        attentions = res.attentions if res.attentions is not None else [None] * len(blocks)
        causal = [True] * len(blocks)
    rows = []
    for h, att, is_causal in zip(outs, attentions, causal):
        d = h.shape[-1]
        logp = torch.log_softmax(h, dim=-1)
        ent = -(logp.exp() * logp).sum(-1).mean() / math.log(d)
        if att is not None:
            a = att.float().clamp_min(1e-12)
            e = -(a * a.log()).sum(-1)  # (B, H, Tq)
            seq = e.shape[-1]
            if is_causal:
                # log of the number of visible keys per query position (position 0 sees 1 key -> 0)
                log_keys = torch.log(torch.arange(1, seq + 1, dtype=torch.float32, device=e.device))
                e = e[..., 1:] / log_keys[1:]
            else:
                e = e / math.log(att.shape[-1])
            attn_ent = float(e.mean())
        else:
            attn_ent = float("nan")
        rows.append({
            "act_mean": float(h.mean()),
            "act_std": float(h.std()),
            "act_entropy": float(ent),
            "attn_entropy": attn_ent,
        })
    if labels is not None:
        logits = res.logits.float()
        tok = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                                reduction="none")
        return rows, tok.view(labels.shape).mean(1)
    return rows
