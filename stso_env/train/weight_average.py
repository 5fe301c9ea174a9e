"""An exponential moving average of a trainer's weights, and the probe loss it scores.

Why: the probe loss of the live weights rewards a lower LR soon after the cut (the weights stop
bouncing around the valley floor, an annealing effect) although the run may end higher, since it
made less progress (``assets/results/horizon/report.md``: LR x0.8 lowers the probe loss 50 steps
later at nearly every fork point and raises it at the end of the run). An average of recent
weights has already removed most of that noise, in every copy alike, so its loss compares the
progress runs made without the cost of a cooldown fork. Averaged weights standing in for a
cooldown: Sanyal et al. 2023 (LAWA, arXiv 2306.03241), Hägele et al. 2024 (arXiv 2405.18392).

The average is updated after every optimizer step (``Trainer.post_update_hooks``), as
``ema = decay * ema + (1 - decay) * w``, and starts from the weights it is attached to.
"""

from __future__ import annotations

import math
from typing import Any

import torch


class WeightEMA:
    """EMA of ``trainer.model``'s parameters; attach it before the steps it should average."""

    def __init__(self, decay: float) -> None:
        if not (isinstance(decay, (int, float)) and math.isfinite(decay) and 0.0 < decay < 1.0):
            raise ValueError(f"WeightEMA: decay={decay!r} must be a number in (0, 1), e.g. 0.98 (about 50 steps)")
        self.decay = float(decay)
        self.updates = 0
        self.shadow: list[torch.Tensor] = []
        self._trainer: Any = None

    def attach(self, trainer: Any, start: WeightEMA | None = None) -> WeightEMA:
        """Average ``trainer``'s steps from now on, starting from its weights, or from ``start``'s
        average (a fork continues its parent's). Returns ``self``."""
        self.detach()
        params = list(trainer.model.parameters())
        if start is not None:
            if len(start.shadow) != len(params):
                raise ValueError(f"WeightEMA.attach: the start average has {len(start.shadow)} tensors, the model "
                                 f"{len(params)}; start from an average of the same model")
            self.shadow = [s.detach().clone() for s in start.shadow]
            self.updates = start.updates
        else:
            self.shadow = [p.detach().clone() for p in params]
            self.updates = 0
        self._trainer = trainer
        trainer.post_update_hooks.append(self._update)
        return self

    def detach(self) -> None:
        tr = self._trainer
        if tr is not None and self._update in tr.post_update_hooks:
            tr.post_update_hooks.remove(self._update)
        self._trainer = None

    @torch.no_grad()
    def _update(self, trainer: Any) -> None:
        for s, p in zip(self.shadow, trainer.model.parameters()):
            s.lerp_(p.detach(), 1.0 - self.decay)
        self.updates += 1

    @torch.no_grad()
    def probe_loss(self) -> float:
        """The trainer's probe loss with the averaged weights; the live weights are put back after."""
        tr = self._trainer
        if tr is None:
            raise RuntimeError("WeightEMA.probe_loss: attach it to a trainer first")
        params = list(tr.model.parameters())
        live = [p.detach().clone() for p in params]
        try:
            for p, s in zip(params, self.shadow):
                p.copy_(s)
            return tr.probe_loss()
        finally:
            for p, w in zip(params, live):
                p.copy_(w)
