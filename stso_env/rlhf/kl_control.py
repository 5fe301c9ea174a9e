"""The adaptive KL coefficient of Ziegler et al. 2019, the standard baseline for steering an RLHF run.

Reference: 2019_Ziegler_RLHF (``assets/related_work.md``), section 2.2: the KL penalty
coefficient ``beta`` follows the measured KL to the reference model so that the KL stays near a
target,

    e_t      = clip(KL_t / KL_target - 1, -0.2, 0.2)
    beta_t+1 = beta_t * (1 + K_beta * e_t),    K_beta = n_steps / horizon

where ``n_steps`` is the number of optimizer steps since the last update and ``horizon`` sets how
fast ``beta`` reacts (their ``horizon`` is 10,000 samples; here it is counted in optimizer steps,
like ``n_steps``). The clip keeps one very large or very small KL reading from moving ``beta`` by
more than 20 % of ``K_beta``. This is the rule of the original implementation
(``lm-human-preferences``, ``AdaptiveKLController``), which TRL kept until its PPO trainer was
removed; TRL 1.16's GRPO trainer holds ``beta`` fixed, so the controller sets ``trainer.beta``
itself.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

#: The largest proportional error one update acts on (Ziegler et al. 2019, eq. 2).
ERROR_CLIP = 0.2


@dataclass
class AdaptiveKL:
    """``beta`` that follows the measured KL towards ``target`` (see the module docstring).

    Args:
        beta: the starting coefficient (> 0: with 0 the trainer builds no reference model).
        target: the KL to the reference model to hold, in nats per token (> 0).
        horizon: optimizer steps over which a constant error changes ``beta`` by a factor of about
            ``1 + error`` (> 0).
    """

    beta: float
    target: float
    horizon: float

    def __post_init__(self) -> None:
        for name in ("beta", "target", "horizon"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ValueError(f"AdaptiveKL.{name}: must be a finite number > 0, got {value!r}")
        self.beta = float(self.beta)

    def update(self, kl: float, n_steps: int) -> float:
        """Move ``beta`` after ``n_steps`` optimizer steps whose mean KL was ``kl``; returns the new ``beta``.

        A KL that is not finite (a run that diverged) counts as the largest error, so ``beta`` rises.
        """
        if not 0 <= n_steps < self.horizon / ERROR_CLIP:
            # beyond horizon / 0.2 steps a low KL would make the factor 1 + e * n / horizon reach 0
            raise ValueError(f"AdaptiveKL.update n_steps: must be in [0, {self.horizon / ERROR_CLIP:g}) "
                             f"(5 x horizon), got {n_steps}; update more often or raise the horizon")
        error = ERROR_CLIP if not math.isfinite(kl) else min(max(kl / self.target - 1.0, -ERROR_CLIP), ERROR_CLIP)
        self.beta *= 1.0 + error * n_steps / self.horizon
        return self.beta
