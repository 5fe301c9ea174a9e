"""Adam-HD: hypergradient descent on the learning rate (Baydin et al., ICLR 2018).

Reference: A. G. Baydin, R. Cornish, D. Martinez Rubio, M. Schmidt, F. Wood,
"Online Learning Rate Adaptation with Hypergradient Descent", ICLR 2018
(arXiv 1703.04782), Algorithm "Adam-HD"; reference code gbaydin/hypergradient-descent.
Citation key: 2018_Baydin_HD (``assets/related_work.md``).
"""

from __future__ import annotations

import math
from typing import Any

import gymnasium as gym
import numpy as np
import torch

from agents.controllers.base import Controller
from stso_env.envs.gpt2_env import LR_SCALE_LIMITS


@torch.no_grad()
def hypergradient(optimizer: torch.optim.Optimizer) -> float | None:
    """``h_t = sum over all parameters of g_t . u_{t-1}``, one global dot product (Reference:
    2018_Baydin_HD).

    ``g_t`` is the gradient now in ``p.grad`` (as it will be applied, after clipping) and
    ``u_{t-1} = m_hat_{t-1} / (sqrt(v_hat_{t-1}) + eps)`` Adam's previous update direction,
    rebuilt from the moments still in the optimizer state (bias-corrected with the step
    count of the step that produced them, exactly as torch's Adam(W) forms its update).
    Returns None when no parameter has a previous update yet (the very first step).
    """
    total: torch.Tensor | None = None
    for group in optimizer.param_groups:
        beta1, beta2 = group["betas"]
        eps = group["eps"]
        for p in group["params"]:
            if p.grad is None:
                continue
            state = optimizer.state.get(p)
            if not state or "exp_avg" not in state:
                continue
            step = float(state["step"])
            if step < 1:
                continue
            m_hat = state["exp_avg"] / (1.0 - beta1 ** step)
            denom = (state["exp_avg_sq"] / (1.0 - beta2 ** step)).sqrt_().add_(eps)
            term = torch.sum(p.grad * m_hat / denom, dtype=torch.float64)
            total = term if total is None else total + term
    return None if total is None else float(total)


class AdamHD(Controller):
    """Adam-HD: the effective learning rate follows its own hypergradient, updated every optimizer step.
    Reference: 2018_Baydin_HD.

    Method (Baydin et al. 2018, Adam-HD): with Adam's update ``theta_t = theta_{t-1} - alpha_t u_t``,
    ``u = m_hat / (sqrt(v_hat) + eps)``, the derivative of the loss with respect to the previous
    step's learning rate is ``-g_t . u_{t-1}``, so gradient descent on ``alpha`` gives::

        h_t     = g_t . u_{t-1}            (one dot product over *all* parameters)
        alpha_t = alpha_{t-1} + beta * h_t

    The reference code sums ``g . u`` per parameter tensor and lets each tensor's learning rate
    drift on its own (a known bug); here ``h`` is one global sum, as in the paper.

    The gradient in ``h``: the paper's ``g_t`` is the loss gradient, which its Adam also applies;
    the run clips it to the static ``optim.max_grad_norm`` (1.0) first, and ``h`` uses the gradient
    as applied, as the reference code does when clipping precedes ``optimizer.step()``. Clipping
    to a global norm scales the whole gradient by ``c_t <= 1``, so ``h`` keeps its sign and this is
    Adam-HD with the step size ``beta * c_t`` on clipped steps (on the tiny preset the cap binds on
    most steps: 74 % of the steps of a 220-step spiky run under ``fixed``, by up to two orders of
    magnitude at the early norms), which keeps the LR from jumping on a gradient-scale shock.

    How it runs here: a ``trainer.pre_update_hooks`` hook, called after the backward pass and
    clipping (``p.grad`` holds ``g_t`` as it will be applied) and before the optimizer step, while
    the optimizer state still holds ``m_{t-1}``, ``v_{t-1}`` and their step count. The run's first
    step has no ``u_{t-1}`` and is skipped (the controller normally starts after the env's opening
    window, when Adam's state exists). The action is the neutral one every window, so the env's
    compounding LR scale is left to this hook.

    Variant: HD *rides on* the configured warm-up + cosine schedule rather than replacing it.
    ``alpha`` is the effective LR ``sched_t * lr_scale``; each step the carried scale is applied to
    the schedule's current LR, the additive update happens in LR units, and the result is expressed
    back as ``trainer.knobs.lr_scale = alpha_t / sched_t``, clamped to ``LR_SCALE_LIMITS``
    ([0.01, 100]). So the schedule keeps shaping the LR (warm-up, cosine decay) and HD learns a
    multiplicative correction, moved additively by ``beta * h / sched_t`` per step. (The paper adapts
    the raw LR with no schedule.) The decoupled weight decay of AdamW and the scenario's injected LR
    multiplier are not part of ``u``: Adam-HD is defined on the Adam update alone.

    Settings:
        beta: hypergradient step size in LR units per unit of ``h`` (default 1e-6). The paper uses
            1e-7 for Adam at alpha_0 = 1e-3 on MNIST/CIFAR models. On the tiny preset (0.44M
            parameters, byte vocabulary, peak LR 3e-3 after 50 warm-up steps, grad norm capped at
            1.0) ``|h|`` measured over a 200-step run (seed 0, steps 10-199) had median ~5, 95th
            percentile ~50-65 and maximum ~95; during the LR warm-up ``h`` stays at +60..+75 (the
            gradient keeps agreeing with the momentum: the LR is too small), later it changes
            sign from step to step with a small positive mean (~2-5). With ``beta = 1e-6`` the LR
            moves by about 1e-6..1e-4 per step: the scale reached ~2 by the end of that run
            without instability (``beta = 3e-6`` reached ~3, also stable); the paper's 1e-7 would
            leave the LR nearly unchanged on runs this short.
    """

    name = "hd"

    def __init__(self, beta: float = 1e-6) -> None:
        super().__init__()
        if not (math.isfinite(beta) and beta >= 0):
            raise ValueError(f"AdamHD: beta={beta!r} must be a finite number >= 0 (e.g. 1e-6)")
        self.beta = float(beta)
        self.alpha_history: list[float] = []
        self.h_history: list[float] = []
        self.step_history: list[int] = []
        self.skipped = 0
        self._trainer: Any = None

    def reset(self, env: gym.Env, *, seed: int, run_name: str) -> None:
        self.close()
        super().reset(env, seed=seed, run_name=run_name)
        self.alpha_history, self.h_history, self.step_history = [], [], []
        self.skipped = 0
        self._trainer = self.base.trainer
        self._trainer.pre_update_hooks.append(self._pre_update)

    def act(self, obs: np.ndarray, info: dict[str, Any]) -> np.ndarray:
        # The env's own trainer may be rebuilt by a restore with a different seed; follow it.
        if self.base.trainer is not self._trainer:
            self.close()
            self._trainer = self.base.trainer
            self._trainer.pre_update_hooks.append(self._pre_update)
        return super().act(obs, info)

    def close(self) -> None:
        if self._trainer is not None and self._pre_update in self._trainer.pre_update_hooks:
            self._trainer.pre_update_hooks.remove(self._pre_update)
        self._trainer = None

    def _pre_update(self, trainer: Any) -> None:
        """One Adam-HD update of the effective LR, expressed as ``trainer.knobs.lr_scale``."""
        h = hypergradient(trainer.optimizer)
        if h is None or not math.isfinite(h):
            self.skipped += 1
            return
        sched = float(trainer.scheduler.get_last_lr()[0])
        if not sched > 0:
            self.skipped += 1
            return
        alpha_prev = sched * trainer.knobs.lr_scale
        alpha = alpha_prev + self.beta * h
        lo, hi = LR_SCALE_LIMITS
        scale = min(hi, max(lo, alpha / sched))
        trainer.knobs.lr_scale = scale
        self.h_history.append(h)
        self.alpha_history.append(sched * scale)
        self.step_history.append(int(trainer.global_step))

    def describe(self) -> dict[str, Any]:
        a, h = self.alpha_history, np.abs(np.asarray(self.h_history, dtype=float))
        return {
            **super().describe(), "beta": self.beta, "variant": "rides on the warm-up + cosine schedule",
            "updates": len(a), "skipped": self.skipped,
            "alpha_first": a[0] if a else None, "alpha_last": a[-1] if a else None,
            "alpha_min": min(a) if a else None, "alpha_max": max(a) if a else None,
            "abs_h_median": float(np.median(h)) if len(h) else None,
        }
