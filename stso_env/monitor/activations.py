"""Per-layer activation and attention summary statistics of a GPT-2.

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
                       labels: torch.Tensor | None = None) -> list[dict[str, float]] | tuple[list, torch.Tensor]:
    """Summaries for every block of ``model`` (a ``GPT2LMHeadModel``) on ``input_ids``.

    With ``labels`` the same forward pass also gives the per-sequence loss, returned as
    ``(rows, seq_losses)``: a monitor that needs both pays for one pass.
    """
    blocks = model.transformer.h
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
        res = model(input_ids=input_ids, output_attentions=True, use_cache=False)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
        if kernel != "eager":
            model.set_attn_implementation(kernel)
    attentions = res.attentions if res.attentions is not None else [None] * len(blocks)
    seq = input_ids.shape[1]
    # log of the number of visible keys for each causal query position (position 0 sees 1 key -> 0)
    log_keys = torch.log(torch.arange(1, seq + 1, dtype=torch.float32, device=input_ids.device))
    rows = []
    for h, att in zip(outs, attentions):
        d = h.shape[-1]
        logp = torch.log_softmax(h, dim=-1)
        ent = -(logp.exp() * logp).sum(-1).mean() / math.log(d)
        if att is not None:
            a = att.float().clamp_min(1e-12)
            e = -(a * a.log()).sum(-1)  # (B, H, Tq)
            e = e[..., 1:] / log_keys[1:]
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
