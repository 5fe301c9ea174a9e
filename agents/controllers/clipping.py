"""Adaptive gradient clipping baselines: ZClip and ARC for the whole run.

The clipping itself lives in the trainer (:mod:`stso_env.train.clipping`); these controllers
select it every window and report which variant ran. References: 2025_Kumar_ZClip,
2025_Allouah_ARC (``assets/related_work.md``).
"""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np

from agents.controllers.base import Controller
from stso_env.envs.gpt2_env import CLIP_POLICIES, NEUTRAL_ACTION
from stso_env.train.clipping import REPLACES_STATIC_CAP, arc_k


class _ClipThroughout(Controller):
    """The neutral action with a fixed clip policy (action dimension 2) every window."""

    clip_choice = 0

    def __init__(self) -> None:
        super().__init__()
        self._announced = False

    def reset(self, env: gym.Env, *, seed: int, run_name: str) -> None:
        super().reset(env, seed=seed, run_name=run_name)
        self._announced = False

    def act(self, obs: np.ndarray, info: dict[str, Any]) -> np.ndarray:
        action = np.asarray(NEUTRAL_ACTION, dtype=np.int64)
        action[2] = self.clip_choice
        if not self._announced:  # one timeline entry: the policy holds for the rest of the run
            self.record("clip", action, f"{CLIP_POLICIES[self.clip_choice]} clipping for the whole run "
                                        f"({self.variant()})")
            self._announced = True
        return action

    def max_grad_norm(self) -> float:
        """The static global-norm cap that applies under this controller's policy (0: none)."""
        if self.env is None:
            return float("nan")
        tr = self.base.trainer
        if tr.max_grad_norm_override is not None:
            return float(tr.max_grad_norm_override)
        return 0.0 if CLIP_POLICIES[self.clip_choice] in REPLACES_STATIC_CAP else float(tr.cfg.optim.max_grad_norm)

    def variant(self) -> str:
        cap = self.max_grad_norm()
        return f"with the static max_grad_norm={cap:g} cap" if cap > 0 else "without a static norm cap"


class ZClipController(_ClipThroughout):
    """ZClip adaptive gradient clipping (Kumar et al. 2025, arXiv 2504.02507; reference code
    bluorion-com/ZClip) in every window: clip choice 1. Reference: 2025_Kumar_ZClip.

    The trainer's :class:`~stso_env.train.clipping.ZClip` keeps an EMA mean and variance of the
    total grad norm (``clip.zclip_alpha`` 0.97), initialised from the first ``clip.zclip_warmup``
    (25) norms seen under this policy; a step with ``z = (g - mu) / sigma > clip.zclip_z_thresh``
    (2.5) is clipped to ``mu + z_thr^2 sigma / z``.

    ZClip *replaces* the fixed-threshold cap, as in the paper's comparison (ZClip vs fixed
    clipping): under the ``"zclip"`` policy the trainer's static ``optim.max_grad_norm`` does not
    apply, so the variant that runs is "ZClip alone" (the reference code with
    ``max_grad_norm=None``; during the warm-up nothing is clipped). The reference's default
    ``max_grad_norm=1.0`` would stack a 1.0 cap on top, and on the tiny preset that cap binds first
    on most steps, which made ZClip's runs equal the fixed baseline's bit for bit. ``describe()``
    reports ``variant`` and the cap in force (0). The env's opening window runs before the
    controller, so ZClip's warm-up starts at the controller's first window. No settings: the
    parameters are the run's ``clip.*`` config, reported by ``describe()``.
    """

    name = "zclip"
    clip_choice = 1

    def describe(self) -> dict[str, Any]:
        out = {**super().describe(), "clip_policy": "zclip"}
        if self.env is not None:
            c = self.base.trainer.cfg.clip
            out.update(alpha=c.zclip_alpha, z_thresh=c.zclip_z_thresh, warmup=c.zclip_warmup,
                       max_grad_norm=self.max_grad_norm(),
                       variant=f"ZClip alone (replaces the fixed cap; {self.variant()})")
        return out


class ARCController(_ClipThroughout):
    """Adaptive Robust Clipping (Allouah et al., "Adaptive Gradient Clipping for Robust Federated
    Learning", ICLR 2025, arXiv 2405.14432) over micro-batch shards in every window: clip choice 2.
    Reference: 2025_Allouah_ARC.

    Each step the batch is split into ``n = max(optim.micro_batches, clip.arc_shards)`` shards
    (default 4); with ``f = clip.arc_f`` (default 1) assumed corrupted shards,
    ``k = floor(2 (f/n) (n - f))`` shard gradients with the largest norms (k = 1 for n = 4, f = 1)
    are clipped to the (k+1)-th largest norm and the shards are averaged (ARC is the paper's
    pre-aggregation step; the mean is the aggregator here). ARC is a robust-aggregation rule, not a
    replacement for norm clipping, so the recipe's static ``optim.max_grad_norm`` cap still applies
    to the mean (``describe()`` reports it). ARC's setting is distributed learning over workers;
    here the "workers" are micro-batch shards of one batch, which costs ``n`` backward passes of
    ``1/n`` of the batch (the same FLOPs). No settings: the parameters are the run's ``clip.*``
    config.
    """

    name = "arc"
    clip_choice = 2

    def describe(self) -> dict[str, Any]:
        out = {**super().describe(), "clip_policy": "arc"}
        if self.env is not None:
            cfg = self.base.trainer.cfg
            n = max(cfg.optim.micro_batches, cfg.clip.arc_shards)
            out.update(shards=n, f=cfg.clip.arc_f, k=arc_k(n, cfg.clip.arc_f),
                       max_grad_norm=self.max_grad_norm(), variant=f"ARC {self.variant()}")
        return out
