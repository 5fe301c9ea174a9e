"""Gradient clip policies: off, ZClip, ARC and SPAM's spike-aware clipping.

How each policy meets the static global-norm cap ``optim.max_grad_norm`` (default 1.0):

* ``"off"`` is the fixed-threshold baseline: only the static cap applies.
* ``"zclip"`` and ``"spam"`` *replace* the static cap. ZClip's paper compares it against
  fixed-threshold clipping, and SPAM's reference runs train without global-norm clipping
  (``--grad_clipping`` 0); composed with a cap of 1.0 that binds on most steps of a tiny run,
  ZClip's results equalled the fixed baseline's bit for bit.
* ``"arc"`` runs before the static cap: ARC is a robust *aggregation* rule over gradient
  vectors (the shards' mean after clipping the largest), not a replacement for norm clipping,
  so the recipe's cap stays on the aggregate.

A controller may override the cap for every policy (``Trainer.max_grad_norm_override``: SPAM for
its clip-delay steps, StableAdamW, whose update clipping replaces gradient clipping).

* **ZClip** (Kumar et al. 2025, arXiv 2504.02507; reference code
  bluorion-com/ZClip, ``mode="zscore"``, ``clip_option="adaptive_scaling"``,
  ``max_grad_norm=None``). Reference: 2025_Kumar_ZClip.
  EMA mean and variance of the total grad norm (alpha 0.97), initialised from
  the first ``warmup`` norms, during which nothing is clipped. With
  ``z = (g - mu) / (sigma + eps)``, a step with ``z > z_thresh`` is clipped to
  ``mu + z_thresh * sigma / (z / z_thresh)``. The EMA is then updated with the
  clip value (or the raw norm), the variance using the *updated* mean, as the
  reference does. The variant that runs is "ZClip alone" (the reference with
  ``max_grad_norm=None``); its default 1.0 would add the cap this module leaves out.
* **ARC**, Adaptive Robust Clipping (Allouah et al., ICLR 2025). Reference:
  2025_Allouah_ARC. Over ``n`` gradient vectors (here the micro-batch shards),
  ``k = floor(2 (f/n) (n-f))`` vectors with the largest norms are clipped to the
  ``(k+1)``-th largest norm, then the shards are averaged (ARC followed by the mean
  as the aggregator).
* **SPAM spike-aware clipping** (Huang et al., ICLR 2025, SPAM-Optimizer).
  Reference: 2025_Huang_SPAM. Element-wise, a gradient entry with
  ``g^2 > theta * v`` (``v`` Adam's second moment before this step, not
  bias-corrected) becomes ``sign(g) * sqrt(theta * v)``; ``theta`` is 5000.
  Entries whose ``v`` is still zero are left alone (the reference would set them to
  zero, freezing a parameter that has never had a gradient; with GPT-2's tied output
  embedding every entry has a gradient from the first step, so the two agree here).
"""

from __future__ import annotations

import math
from typing import Any

import torch

CLIP_POLICIES = ("off", "zclip", "arc", "spam")
#: Policies whose adaptive clipping replaces the static ``optim.max_grad_norm`` cap (see above).
REPLACES_STATIC_CAP = frozenset({"zclip", "spam"})


class ZClip:
    """Stateful z-score clip threshold on the total gradient norm (ZClip, Kumar et al. 2025).

    Reference: 2025_Kumar_ZClip.
    """

    def __init__(self, alpha: float = 0.97, z_thresh: float = 2.5, warmup: int = 25, eps: float = 1e-6) -> None:
        self.alpha, self.z_thresh, self.warmup, self.eps = alpha, z_thresh, warmup, eps
        self.buffer: list[float] = []
        self.mean: float | None = None
        self.var: float | None = None

    @property
    def initialized(self) -> bool:
        return self.mean is not None

    def threshold(self, grad_norm: float) -> float | None:
        """Clip value for this step (None = no adaptive clip); updates the EMA state."""
        if not math.isfinite(grad_norm):
            return None  # a non-finite step is skipped by the trainer; do not poison the EMA
        if self.mean is None or self.var is None:
            self.buffer.append(grad_norm)
            if len(self.buffer) >= self.warmup:
                self.mean = sum(self.buffer) / len(self.buffer)
                self.var = sum((x - self.mean) ** 2 for x in self.buffer) / len(self.buffer)
                self.buffer = []
            return None
        std = self.var ** 0.5
        z = (grad_norm - self.mean) / (std + self.eps)
        clip_val = None
        if z > self.z_thresh:
            clip_val = self.mean + (self.z_thresh * std) / (z / self.z_thresh)
        g = clip_val if clip_val is not None else grad_norm
        self.mean = self.alpha * self.mean + (1 - self.alpha) * g
        self.var = self.alpha * self.var + (1 - self.alpha) * (g - self.mean) ** 2
        return clip_val

    def state_dict(self) -> dict[str, Any]:
        return {"buffer": list(self.buffer), "mean": self.mean, "var": self.var}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.buffer = [float(x) for x in state["buffer"]]
        self.mean = None if state["mean"] is None else float(state["mean"])
        self.var = None if state["var"] is None else float(state["var"])


def arc_k(n: int, f: int) -> int:
    """Number of shard gradients ARC clips: ``floor(2 (f/n) (n - f))``. Reference: 2025_Allouah_ARC."""
    return int(math.floor(2.0 * (f / n) * (n - f)))


def arc_combine(shard_grads: torch.Tensor, f: int) -> tuple[torch.Tensor, float, int]:
    """Average ``(n, P)`` flattened shard gradients after Adaptive Robust Clipping.

    Reference: 2025_Allouah_ARC.

    Returns ``(mean gradient, clip bound (inf if none), number clipped)``.
    """
    n = shard_grads.shape[0]
    k = arc_k(n, f)
    if k <= 0 or k >= n:
        return shard_grads.mean(0), math.inf, 0
    norms = torch.linalg.vector_norm(shard_grads, dim=1)
    order = torch.argsort(norms, descending=True, stable=True)
    bound = norms[order[k]]
    scale = torch.ones_like(norms)
    top = order[:k]
    scale[top] = torch.clamp(bound / (norms[top] + 1e-12), max=1.0)
    return (shard_grads * scale[:, None]).mean(0), float(bound), k


@torch.no_grad()
def spam_clip_(params: list[torch.nn.Parameter], optimizer: torch.optim.Optimizer, theta: float) -> int:
    """Spike-aware clipping in place against Adam's ``exp_avg_sq``; returns entries clipped.

    Reference: 2025_Huang_SPAM.
    """
    clipped = 0
    for p in params:
        if p.grad is None:
            continue
        state = optimizer.state.get(p)
        if not state or "exp_avg_sq" not in state:
            continue
        v = state["exp_avg_sq"]
        limit = theta * v
        mask = (p.grad * p.grad > limit) & (v > 0)
        n = int(mask.sum())
        if n:
            p.grad[mask] = torch.sign(p.grad[mask]) * torch.sqrt(limit[mask])
            clipped += n
    return clipped
