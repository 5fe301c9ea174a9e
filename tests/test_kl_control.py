"""Known answers of the adaptive KL coefficient (Ziegler et al. 2019)."""

from __future__ import annotations

import math

import pytest

from stso_env.rlhf.kl_control import AdaptiveKL


def test_beta_follows_the_kl_with_the_clipped_proportional_error():
    c = AdaptiveKL(beta=0.1, target=6.0, horizon=100)
    # KL 7.5 is 25 % over target: the error is clipped to +0.2; 10 steps of 100 -> x1.02
    assert math.isclose(c.update(7.5, 10), 0.1 * 1.02)
    # KL 5.4 is 10 % under target: x(1 - 0.1 * 0.1) = x0.99
    assert math.isclose(c.update(5.4, 10), 0.1 * 1.02 * 0.99)
    # at the target beta stays; a zero-step update changes nothing
    assert math.isclose(c.update(6.0, 50), 0.1 * 1.02 * 0.99)
    assert math.isclose(c.update(100.0, 0), 0.1 * 1.02 * 0.99)
    # KL 0 is the largest negative error: -0.2 over 50 of 100 steps -> x0.9
    assert math.isclose(c.update(0.0, 50), 0.1 * 1.02 * 0.99 * 0.9)
    # a diverged run (KL inf or nan) raises beta as hard as the clip allows
    before = c.beta
    assert math.isclose(c.update(float("nan"), 100), before * 1.2)


def test_a_constant_kl_over_target_compounds():
    c = AdaptiveKL(beta=0.05, target=1.0, horizon=10)
    for _ in range(5):
        c.update(3.0, 1)
    assert math.isclose(c.beta, 0.05 * 1.02 ** 5)


@pytest.mark.parametrize("field,value", [("beta", 0.0), ("target", -1.0), ("horizon", float("inf"))])
def test_bad_settings_are_named(field, value):
    kwargs = {"beta": 0.1, "target": 6.0, "horizon": 100.0, field: value}
    with pytest.raises(ValueError, match=f"AdaptiveKL.{field}"):
        AdaptiveKL(**kwargs)


def test_too_long_an_update_is_refused():
    c = AdaptiveKL(beta=0.1, target=6.0, horizon=10)
    with pytest.raises(ValueError, match="n_steps"):
        c.update(0.0, 50)  # 1 - 0.2 * 50 / 10 = 0: beta would vanish
    assert c.beta == 0.1
