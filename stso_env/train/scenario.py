"""Instability scenarios: seeded noise that makes a training run spike on demand.

A scenario is a YAML file (``configs/scenarios/<name>.yaml``, or any path) with
a base LR multiplier and a list of events. Each event has a *kind*:

==================  ===========================================================  ======================
kind                effect on the affected steps                                 ``strength`` means
==================  ===========================================================  ======================
``random_tokens``   sequences replaced by uniformly random tokens                fraction of the batch
``repeated_ngram``  sequences replaced by one random n-gram repeated             fraction of the batch
``shuffled_labels`` targets of sequences permuted along time (inputs kept)       fraction of the batch
``grad_scale``      loss, hence every gradient, multiplied before clipping       the multiplier
``lr_shock``        learning rate multiplied                                     the multiplier
==================  ===========================================================  ======================

and a schedule: either periodic bursts (``every`` steps from ``start``, each
burst shifted by up to ``jitter`` steps) or random bursts (a burst starts at a
step with probability ``rate``); each burst lasts ``duration`` steps.

A scenario may also override Adam's constants (``optim: {beta2: 0.999}``; keys
``beta1``, ``beta2``, ``eps``, anything else is an error), which the trainer
applies when it builds AdamW. Some spikes are optimizer dynamics rather than bad
data or an LR that is simply too high, and they need the optimizer they happen
under: in ``adam_v_lag`` the same quiet stretch spikes half the runs with
``beta2 = 0.999`` and none with the default 0.95 (numbers in its YAML).

Whether an event is active at a step, and the noise it injects, are pure
functions of ``(run seed, event index, step)`` (counter-based seeding with
``numpy.random.default_rng([...])``). Scenarios therefore carry no state: a
resumed, restored or forked run sees exactly the noise the original would
have seen, which is what bit-exact resume and branch verification need.

A measured fact the presets build on: on the tiny preset, 10-step bursts of
random-token batches every 200 steps raise the clean-batch loss severalfold and
recovery takes many steps, while a single gradient-scale shock does nothing to
Adam (its update is invariant to gradient scale, and the global clip caps it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch

from stso_env.config import CONFIG_DIR, _f, from_dict, load_yaml
from stso_env.errors import ConfigError

SCENARIO_DIR = CONFIG_DIR / "scenarios"
EVENT_KINDS = ("random_tokens", "repeated_ngram", "shuffled_labels", "grad_scale", "lr_shock")
_BATCH_KINDS = ("random_tokens", "repeated_ngram", "shuffled_labels")


@dataclass
class ScenarioEvent:
    kind: str = _f("random_tokens", "what the event does", choices=EVENT_KINDS)
    every: int | None = _f(None, "period of bursts in steps (periodic schedule)", range=(1, 10**12))
    start: int = _f(0, "step of the first periodic burst", range=(0, 10**12))
    jitter: int = _f(0, "each periodic burst starts up to this many steps late", range=(0, 10**9))
    rate: float | None = _f(None, "per-step probability that a burst starts (random schedule)",
                            range=(0.0, 1.0))
    duration: int = _f(1, "steps a burst lasts", range=(1, 10**9))
    strength: float = _f(1.0, "batch fraction, or multiplier for grad_scale/lr_shock", range=(0.0, 1e9))
    ngram: int = _f(4, "n-gram length for repeated_ngram", range=(1, 10**6))

    def validate(self, source: str) -> None:
        if (self.every is None) == (self.rate is None):
            raise ConfigError(f"{source}: events[{self.kind}]: give exactly one of 'every' (periodic bursts) "
                              f"or 'rate' (random bursts)")
        if self.kind in _BATCH_KINDS and self.strength > 1.0:
            raise ConfigError(f"{source}: events[{self.kind}].strength: {self.strength} is a batch fraction; "
                              "allowed 0 <= strength <= 1")


@dataclass
class ScenarioOptim:
    """Adam constants a scenario overrides; None keeps the train config's ``optim`` value.

    Only what AdamW's constructor takes and the trainer never sets again: the LR has the
    scenario's ``lr_scale``, and weight decay and the clip bound are read from the train
    config at every step, so overriding them here would silently do nothing.
    """

    beta1: float | None = _f(None, "Adam first-moment decay", range=(0.0, 0.99999))
    beta2: float | None = _f(None, "Adam second-moment decay", range=(0.0, 0.99999999))
    eps: float | None = _f(None, "Adam epsilon", range=(1e-30, 1.0))


SCENARIO_OPTIM_KEYS = tuple(f.name for f in fields(ScenarioOptim))


@dataclass
class Scenario:
    name: str = _f("custom", "scenario name")
    description: str = _f("", "what the scenario models")
    lr_scale: float = _f(1.0, "multiplier on the configured LR for the whole run", range=(1e-6, 1e6))
    optim: ScenarioOptim = field(default_factory=ScenarioOptim,
                                 metadata={"help": "Adam constants overridden for this scenario"})
    events: list[ScenarioEvent] = field(default_factory=list, metadata={"help": "noise events"})

    def adamw_kwargs(self, optim: Any) -> dict[str, Any]:
        """``betas`` and ``eps`` for ``torch.optim.AdamW``: the train config's ``optim`` section
        (an :class:`~stso_env.config.OptimConfig`) with this scenario's overrides on top."""
        o = self.optim
        return {"betas": (optim.beta1 if o.beta1 is None else o.beta1,
                          optim.beta2 if o.beta2 is None else o.beta2),
                "eps": optim.eps if o.eps is None else o.eps}

    # ------------------------------------------------------------------ schedule

    def _starts_periodic(self, ev: ScenarioEvent, i: int, seed: int, step: int) -> bool:
        assert ev.every is not None
        if step < ev.start:
            return False
        # A burst k starts at start + k*every + jitter_k; only bursts k and k-1 can cover `step`
        # as long as duration + jitter <= every (checked loosely: we scan a few).
        k_hi = (step - ev.start) // ev.every
        span = (ev.duration + ev.jitter) // ev.every + 1
        for k in range(max(0, k_hi - span), k_hi + 1):
            jit = 0
            if ev.jitter:
                jit = int(np.random.default_rng([seed, 101, i, k]).integers(0, ev.jitter + 1))
            s = ev.start + k * ev.every + jit
            if s <= step < s + ev.duration:
                return True
        return False

    def _starts_random(self, ev: ScenarioEvent, i: int, seed: int, step: int) -> bool:
        assert ev.rate is not None
        for s in range(max(0, step - ev.duration + 1), step + 1):
            if np.random.default_rng([seed, 102, i, s]).random() < ev.rate:
                return True
        return False

    def active(self, seed: int, step: int) -> list[int]:
        """Indices of the events active at ``step``."""
        out = []
        for i, ev in enumerate(self.events):
            hit = (self._starts_periodic(ev, i, seed, step) if ev.every is not None
                   else self._starts_random(ev, i, seed, step))
            if hit:
                out.append(i)
        return out

    # ------------------------------------------------------------------ effects

    def apply(self, seed: int, step: int, inputs: torch.Tensor, labels: torch.Tensor,
              vocab_size: int) -> tuple[torch.Tensor, torch.Tensor, float, float, list[str]]:
        """Corrupt a batch for ``step``.

        Returns ``(inputs, labels, loss_multiplier, lr_multiplier, active_kinds)``.
        Inputs and labels are copied before any change; the originals are untouched.
        """
        loss_mult, lr_mult, kinds = 1.0, self.lr_scale, []
        idx = self.active(seed, step)
        if not idx:
            return inputs, labels, loss_mult, lr_mult, kinds
        inputs, labels = inputs.clone(), labels.clone()
        bsz, seq = inputs.shape
        for i in idx:
            ev = self.events[i]
            kinds.append(ev.kind)
            rng = np.random.default_rng([seed, 103, i, step])
            if ev.kind == "grad_scale":
                loss_mult *= ev.strength
                continue
            if ev.kind == "lr_shock":
                lr_mult *= ev.strength
                continue
            n = min(bsz, math.ceil(ev.strength * bsz))
            rows = rng.choice(bsz, size=n, replace=False)
            for r in rows:
                if ev.kind == "random_tokens":
                    w = torch.from_numpy(rng.integers(0, vocab_size, size=seq + 1))
                    inputs[r], labels[r] = w[:-1], w[1:]
                elif ev.kind == "repeated_ngram":
                    gram = rng.integers(0, vocab_size, size=ev.ngram)
                    w = torch.from_numpy(np.resize(gram, seq + 1))
                    inputs[r], labels[r] = w[:-1], w[1:]
                elif ev.kind == "shuffled_labels":
                    labels[r] = labels[r][torch.from_numpy(rng.permutation(seq))]
        return inputs, labels, loss_mult, lr_mult, kinds


def load_scenario(spec: str) -> Scenario:
    """A scenario by name (``configs/scenarios/<name>.yaml``) or by path to a YAML file."""
    path = Path(spec)
    if not (spec.endswith((".yaml", ".yml")) or path.is_file()):
        path = SCENARIO_DIR / f"{spec}.yaml"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in SCENARIO_DIR.glob("*.yaml")))
        raise ConfigError(f"scenario: {spec!r} is neither a file nor a known scenario; known: {known}")
    raw = load_yaml(path)
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: a scenario must be a mapping with 'name' and 'events'")
    optim = raw.get("optim")
    if isinstance(optim, dict):
        bad = sorted(str(k) for k in optim if k not in SCENARIO_OPTIM_KEYS)
        if bad:
            raise ConfigError(
                f"{path}: optim.{bad[0]}: a scenario may override only Adam's constants "
                f"({', '.join(SCENARIO_OPTIM_KEYS)}); set other optimizer values in the train config's "
                "optim section, and scale the LR with the scenario's lr_scale or an lr_shock event")
    events = raw.get("events") or []
    if not isinstance(events, list):
        raise ConfigError(f"{path}: events: expected a list of events")
    parsed = [from_dict(ScenarioEvent, ev, source=str(path), prefix=f"events[{j}].")
              for j, ev in enumerate(events)]
    sc = from_dict(Scenario, {k: v for k, v in raw.items() if k != "events"}, source=str(path))
    sc.events = parsed
    return sc


def available_scenarios() -> list[str]:
    return sorted(p.stem for p in SCENARIO_DIR.glob("*.yaml"))
