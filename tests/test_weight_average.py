"""stso_env.train.weight_average: the EMA of a trainer's weights and the probe loss it scores."""

from __future__ import annotations

import pytest
import torch

from stso_env.train.weight_average import WeightEMA


class _Trainer:
    """What WeightEMA uses of a trainer: the model, the post-update hooks and the probe loss."""

    def __init__(self) -> None:
        self.model = torch.nn.Linear(1, 1, bias=False)
        with torch.no_grad():
            self.model.weight.fill_(0.0)
        self.post_update_hooks: list = []

    def step_to(self, value: float) -> None:
        with torch.no_grad():
            self.model.weight.fill_(value)
        for hook in self.post_update_hooks:
            hook(self)

    def probe_loss(self) -> float:
        return float(self.model.weight.item())


def test_known_answers_and_live_weights_put_back():
    tr = _Trainer()
    ema = WeightEMA(0.5).attach(tr)
    tr.step_to(2.0)  # 0.5 * 0 + 0.5 * 2
    tr.step_to(4.0)  # 0.5 * 1 + 0.5 * 4
    assert ema.updates == 2 and ema.shadow[0].item() == pytest.approx(2.5)
    assert ema.probe_loss() == pytest.approx(2.5)
    assert tr.model.weight.item() == 4.0  # the live weights are back
    # a fork continues the parent's average; detaching stops the updates
    child_tr = _Trainer()
    child = WeightEMA(0.5).attach(child_tr, start=ema)
    child_tr.step_to(0.5)
    assert child.shadow[0].item() == pytest.approx(1.5) and ema.shadow[0].item() == pytest.approx(2.5)
    child.detach()
    child_tr.step_to(100.0)
    assert child.shadow[0].item() == pytest.approx(1.5) and child_tr.post_update_hooks == []


def test_bad_decay_and_use_before_attach_are_clear_errors():
    for bad in (0.0, 1.0, -0.1, float("nan")):
        with pytest.raises(ValueError, match="decay"):
            WeightEMA(bad)
    with pytest.raises(RuntimeError, match="attach"):
        WeightEMA(0.9).probe_loss()
    other = WeightEMA(0.9).attach(_Trainer())
    other.shadow.append(torch.zeros(1))
    with pytest.raises(ValueError, match="same model"):
        WeightEMA(0.9).attach(_Trainer(), start=other)
