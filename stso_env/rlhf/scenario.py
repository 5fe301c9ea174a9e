"""RLHF instability scenarios: the settings and reward noise under which an RLHF run goes wrong.

A scenario is a YAML file (``configs/rlhf_scenarios/<name>.yaml``, or any path), loaded strictly
like every config of the project (:func:`stso_env.config.from_dict`). It sets the GRPO run's
starting learning rate, KL coefficient ``beta`` and sampling temperature, and may add bursts of
noise to the reward model's scores:

``reward_noise``
    Gaussian noise of standard deviation ``scale`` (in reward-model score units) added to every
    completion's proxy reward in the optimizer steps ``s`` with ``s >= start`` and
    ``(s - start) % every < duration``; ``every: 0`` means no noise. The noise of a batch is a
    pure function of ``(run seed, generation index)`` (``numpy.random.default_rng``), never of
    the global RNG streams, so a restored or forked run sees exactly the noise the original saw.

Each file cites the failure it reproduces in ``references`` (keys of ``assets/related_work.md``)
and records its calibration (how often the fixed schedule fails) in its description.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from stso_env.config import REPO_ROOT, _f, from_dict, load_yaml_mapping
from stso_env.errors import ConfigError

SCENARIO_DIR = REPO_ROOT / "configs" / "rlhf_scenarios"


@dataclass
class RewardNoise:
    """Bursts of Gaussian noise on the proxy reward (see the module docstring)."""

    every: int = _f(0, "period of the bursts in optimizer steps; 0 = no noise", range=(0, 10**7))
    start: int = _f(0, "optimizer step of the first burst", range=(0, 10**7))
    duration: int = _f(0, "optimizer steps per burst", range=(0, 10**7))
    scale: float = _f(0.0, "standard deviation of the noise, in reward-model score units", range=(0.0, 1e6))

    def validate(self, source: str) -> None:
        if self.every and not 0 < self.duration <= self.every:
            raise ConfigError(f"{source}: reward_noise.duration: {self.duration} must be in 1..every ({self.every}) "
                              "when every > 0")

    def active(self, step: int) -> bool:
        """Whether the optimizer step ``step`` (from 0) lies in a burst."""
        return bool(self.every and self.scale > 0 and step >= self.start
                    and (step - self.start) % self.every < self.duration)

    def sample(self, seed: int, generation: int, step: int, n: int) -> np.ndarray:
        """The noise added to the ``n`` rewards of generation ``generation`` (first used at optimizer ``step``)."""
        if not self.active(step):
            return np.zeros(n)
        return np.random.default_rng([seed, 0x5EED, generation]).normal(0.0, self.scale, n)


@dataclass
class RLHFScenario:
    """An RLHF run's starting settings and injected noise."""

    name: str = _f("calm", "scenario name")
    description: str = _f("", "what goes wrong, and how often the fixed schedule fails (calibration)")
    references: list[str] = _f([], "keys of assets/related_work.md this scenario reproduces")
    lr: float = _f(1e-4, "GRPO learning rate at the start (constant schedule)", range=(1e-9, 1.0))
    beta: float = _f(0.04, "KL coefficient at the start (> 0: the reference model is real)", range=(1e-6, 100.0))
    temperature: float = _f(1.0, "sampling temperature of the policy's completions", range=(0.05, 10.0))
    reward_noise: RewardNoise = field(default_factory=RewardNoise, metadata={"help": "reward noise section"})


def load_rlhf_scenario(name_or_path: str | Path) -> RLHFScenario:
    """A scenario by name (``configs/rlhf_scenarios/<name>.yaml``) or by path.

    Raises:
        ConfigError: unknown name (the message lists the known ones), a malformed file, an unknown
            key or a value out of range, naming the file and the dotted key.
    """
    p = Path(name_or_path)
    if p.suffix not in (".yaml", ".yml"):
        p = SCENARIO_DIR / f"{name_or_path}.yaml"
        if not p.is_file():
            known = sorted(x.stem for x in SCENARIO_DIR.glob("*.yaml"))
            raise ConfigError(f"scenario {str(name_or_path)!r}: no such RLHF scenario; choose one of "
                              f"{', '.join(known)} or give a path to a YAML file")
    data = load_yaml_mapping(p)
    data.setdefault("name", p.stem)
    return from_dict(RLHFScenario, data, source=str(p))


def rlhf_scenario_names() -> list[str]:
    """Names of the scenarios shipped in ``configs/rlhf_scenarios``."""
    return sorted(x.stem for x in SCENARIO_DIR.glob("*.yaml"))
