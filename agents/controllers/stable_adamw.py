"""StableAdamW (Wortsman et al. 2023): AdamW with AdaFactor-style update clipping per tensor.

Reference: 2023_Wortsman_StableAdamW (``assets/related_work.md``).
"""

from __future__ import annotations

import math
from typing import Any

import gymnasium as gym
import numpy as np
import torch

from agents.controllers.base import Controller
from stso_env.envs.gpt2_env import NEUTRAL_ACTION


@torch.no_grad()
def update_rms(grad: torch.Tensor, exp_avg_sq: torch.Tensor, step: float, beta2: float, eps: float) -> float:
    """``sqrt(mean(g^2 / max(v_hat, eps^2)))`` with ``v_hat = exp_avg_sq / (1 - beta2^step)``, the
    bias-corrected second moment *after* this step's update (``exp_avg_sq`` and ``step`` as the
    optimizer left them). The ``eps^2`` floor is the reference code's. Reference:
    2023_Wortsman_StableAdamW."""
    v_hat = exp_avg_sq.double() / (1.0 - beta2 ** step)
    ratio = grad.double().square() / torch.clamp(v_hat, min=eps * eps)
    return float(ratio.mean().sqrt())


class StableAdamW(Controller):
    """StableAdamW (Wortsman, Dettmers, Zettlemoyer, Morcos, Farhadi, Schmidt, "Stable and
    low-precision training for large-scale vision-language models", NeurIPS 2023, arXiv
    2304.13013; reference code ``StableAdamWUnfused``) on the run's AdamW. Reference:
    2023_Wortsman_StableAdamW.

    Update clipping as in AdaFactor, per parameter tensor: after this step's moment update, with
    ``v_hat`` the bias-corrected second moment,
    ``RMS = sqrt(mean(g^2 / max(v_hat, eps^2)))`` and the tensor's step size is divided by
    ``max(1, RMS / clip_thresh)`` (``clip_thresh = 1`` in the paper and code). The paper's finding:
    loss spikes follow 1-8 steps after Adam's ``v`` under-estimates ``g^2`` (a gradient much larger
    than the recent ones), which is exactly when ``RMS`` exceeds 1.

    Implementation, exact for AdamW: torch's AdamW update of a tensor,
    ``p_new = p (1 - lr wd) - lr m_hat / (sqrt(v_hat) + eps)``, is linear in ``lr``. A
    ``pre_update_hooks`` hook keeps a copy ``p_old`` of every parameter; a ``post_update_hooks``
    hook, right after ``optimizer.step()``, computes ``RMS`` from ``p.grad`` (the gradient the
    optimizer applied) and the updated state, and for a tensor with ``RMS > clip_thresh`` sets
    ``p = p_old + (p_new - p_old) / s`` with ``s = RMS / clip_thresh``: the whole decoupled update,
    weight decay included, at ``lr / s``, as the paper's algorithm and optimi's StableAdamW do
    (``scale_weight_decay=True``). The authors' ``StableAdamWUnfused`` applies the weight decay at
    the unclipped LR and divides only the Adam step: ``scale_weight_decay=False`` runs that
    (``p = p_old (1 - lr wd) + (p_new - p_old (1 - lr wd)) / s``). Tensors with ``RMS <= 1`` are
    left exactly as AdamW wrote them. Torch's bias-corrected AdamW and the reference's "beta-hat"
    moments give the same ``m_hat``, ``v_hat`` (up to rounding), and both put ``eps`` outside the
    square root.

    No gradient clipping: StableAdamW replaces it (the paper compares the two; update clipping
    won), so the controller sets ``trainer.max_grad_norm_override`` to ``max_grad_norm`` (default
    0: no static cap) while attached. The run's betas and eps are kept (the paper recommends
    ``beta2`` 0.95-0.99 at large batch; the tiny preset already uses 0.95).

    Settings:
        clip_thresh: the RMS above which the step is scaled down (default 1.0, the paper's ``d``).
        scale_weight_decay: scale the decoupled weight decay with the step (default True: the
            paper's algorithm); False is the reference code's variant.
        max_grad_norm: static global-norm cap while attached (default 0.0, none); None keeps the
            run's ``optim.max_grad_norm``.
    """

    name = "stable_adamw"

    def __init__(self, clip_thresh: float = 1.0, scale_weight_decay: bool = True,
                 max_grad_norm: float | None = 0.0) -> None:
        super().__init__()
        if not (math.isfinite(clip_thresh) and clip_thresh > 0):
            raise ValueError(f"StableAdamW: clip_thresh={clip_thresh!r} must be a finite number > 0 (paper: 1.0)")
        if max_grad_norm is not None and not (math.isfinite(max_grad_norm) and max_grad_norm >= 0):
            raise ValueError(f"StableAdamW: max_grad_norm={max_grad_norm!r} must be None (the run's cap) or a "
                             "finite number >= 0 (0: no cap, the default)")
        self.clip_thresh = float(clip_thresh)
        self.scale_weight_decay = bool(scale_weight_decay)
        self.max_grad_norm = None if max_grad_norm is None else float(max_grad_norm)
        self.clipped_tensors = 0
        self.updates = 0
        self.max_rms = 0.0
        #: (global step, tensors clipped, largest RMS) for steps that clipped something
        self.events: list[tuple[int, int, float]] = []
        self._before: list[torch.Tensor | None] = []
        self._trainer: Any = None

    def reset(self, env: gym.Env, *, seed: int, run_name: str) -> None:
        self.close()
        super().reset(env, seed=seed, run_name=run_name)
        self.clipped_tensors, self.updates, self.max_rms, self.events = 0, 0, 0.0, []
        self.attach(self.base.trainer)

    def attach(self, trainer: Any) -> None:
        """Register the hooks on ``trainer`` (``reset`` does this for the env's trainer)."""
        self._trainer = trainer
        trainer.pre_update_hooks.append(self._pre_update)
        trainer.post_update_hooks.append(self._post_update)
        trainer.max_grad_norm_override = self.max_grad_norm

    def act(self, obs: np.ndarray, info: dict[str, Any]) -> np.ndarray:
        # A restore with another seed rebuilds the env's trainer; follow it.
        if self.base.trainer is not self._trainer:
            self.close()
            self.attach(self.base.trainer)
        return np.asarray(NEUTRAL_ACTION, dtype=np.int64)

    def close(self) -> None:
        tr = self._trainer
        if tr is not None:
            if self._pre_update in tr.pre_update_hooks:
                tr.pre_update_hooks.remove(self._pre_update)
            if self._post_update in tr.post_update_hooks:
                tr.post_update_hooks.remove(self._post_update)
            tr.max_grad_norm_override = None
        self._trainer = None
        self._before = []

    # ------------------------------------------------------------------ hooks

    @torch.no_grad()
    def _pre_update(self, trainer: Any) -> None:
        # The parameters the optimizer is about to update (pre-update hooks change knobs, not them).
        self._before = [[p.detach().clone() if p.grad is not None else None for p in g["params"]]
                        for g in trainer.optimizer.param_groups]

    @torch.no_grad()
    def _post_update(self, trainer: Any) -> None:
        opt = trainer.optimizer
        if len(self._before) != len(opt.param_groups):
            raise RuntimeError("StableAdamW: the post-update hook ran without its pre-update copy; register both "
                               "hooks with attach(trainer)")
        clipped, top = 0, 0.0
        for group, before in zip(opt.param_groups, self._before):
            beta2, eps = group["betas"][1], group["eps"]
            decay = 1.0 - group["lr"] * group["weight_decay"]
            for p, old in zip(group["params"], before):
                if old is None or p.grad is None:
                    continue
                state = opt.state[p]
                rms = update_rms(p.grad, state["exp_avg_sq"], float(state["step"]), beta2, eps)
                top = max(top, rms)
                if rms > self.clip_thresh:
                    s = rms / self.clip_thresh
                    # The applied update is linear in lr: shrink it (or only its Adam part) by s.
                    base = old if self.scale_weight_decay else old * decay
                    p.copy_(base + (p - base) / s)
                    clipped += 1
        self._before = []
        self.updates += 1
        self.max_rms = max(self.max_rms, top)
        if clipped:
            self.clipped_tensors += clipped
            self.events.append((int(trainer.global_step), clipped, top))

    def describe(self) -> dict[str, Any]:
        return {
            **super().describe(), "clip_thresh": self.clip_thresh, "scale_weight_decay": self.scale_weight_decay,
            "max_grad_norm": self.max_grad_norm, "updates": self.updates, "clipped_tensors": self.clipped_tensors,
            "clipped_steps": len(self.events), "max_rms": self.max_rms,
            "variant": "StableAdamW as AdamW + per-tensor update clipping"
                       + (" (whole decoupled update scaled)" if self.scale_weight_decay
                          else " (weight decay at the unclipped LR, as StableAdamWUnfused)")
                       + (", no gradient clipping" if self.max_grad_norm == 0 else
                          f", gradient cap {self.max_grad_norm}" if self.max_grad_norm is not None
                          else ", the run's gradient cap"),
        }
