"""A run-level gate learned from real end-of-run outcomes: does the policy beat the fixed schedule
in a run that starts like this one?

Why: a policy learned in the proxy plays one recipe wherever it runs, because the proxy's target
(the probe loss ``N`` windows ahead) favours a lower LR in nearly every state (short-horizon bias,
``assets/results/horizon/report.md``). That recipe wins some scenarios and loses others at the end
of the run (``assets/results/policy_shield/report.md``), and the per-window conformal shield, which
reads the same short-horizon proxy, cannot tell them apart. The gate asks the question the final
score asks, on real runs: ``agents.fit_gate`` runs the fixed schedule and the policy from the same
state after ``window`` neutral windows, on training seeds of the collection's scenarios, labels
each run by which of the two ends with the lower *probe* loss, and fits a logistic regression
(scikit-learn, L2) from that state to the label. In a run, :class:`~agents.controllers.learned.
LearnedPolicy` keeps the neutral action for the first ``window`` windows, asks the gate once, and
then lets the policy act for the rest of the run or not at all.

Against ``tuned_fixed`` (``agents.fit_gate --against tuned_fixed``): both copies of every run start on
the LR that ``tuned_fixed``'s sweep picks for the setting, and the label says whether the policy on
top of that LR (``tune_lr: true``) beats the tuned schedule. That is the question a policy on the
tuned LR is scored on; a gate fitted against ``fixed`` answers another one.

The file is JSON (``gate.json``): the observation features, their standardisation, the
coefficients, the reference the policy was compared with and the runs it was fitted on. Nothing
is unpickled.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from stso_env.errors import DataError

GATE_FORMAT = 1

#: Observation features that are loss *levels*. Their values say which corpus and tokenizer a run
#: trains on more than how it is going (WikiText-2's byte-level loss sits far above the built-in
#: corpus'), so a gate fitted on one corpus and reading them misfires on another; ``loss_levels=False``
#: leaves them out and keeps their changes, volatilities and every other feature.
LOSS_LEVELS = ("loss", "loss_ema", "batch_loss_mean", "batch_loss_mean_ema", "probe_loss", "probe_loss_ema")

#: What the policy's copy of a fitting run is compared with: the fixed schedule, or the fixed schedule
#: on ``tuned_fixed``'s swept LR (both copies then start on that LR).
REFERENCES = ("fixed", "tuned_fixed")


def gate_features(names: Sequence[str], loss_levels: bool = True) -> list[str]:
    """The observation features a gate reads: all of ``names``, or all but :data:`LOSS_LEVELS`."""
    return [n for n in names if loss_levels or n not in LOSS_LEVELS]


@dataclass
class OutcomeGate:
    """Logistic regression from the observation after ``window`` windows to "the policy wins this run"."""

    window: int
    features: list[str]
    mean: list[float]
    scale: list[float]
    coef: list[float]
    intercept: float
    #: the fitting runs: scenario, seed, end probe loss of the fixed schedule (on the tuned LR against
    #: ``tuned_fixed``) and of the policy, label
    runs: list[dict[str, Any]] = field(default_factory=list)
    format: int = GATE_FORMAT
    #: what the policy was compared with (:data:`REFERENCES`); files written before it: ``fixed``
    reference: str = "fixed"

    def __post_init__(self) -> None:
        n = len(self.features)
        if not isinstance(self.window, int) or self.window < 1:
            raise DataError(f"outcome gate: window={self.window!r} must be an integer >= 1 (the neutral windows "
                            "before the gate decides)")
        for name in ("mean", "scale", "coef"):
            v = getattr(self, name)
            if len(v) != n or not all(isinstance(x, (int, float)) and math.isfinite(x) for x in v):
                raise DataError(f"outcome gate: {name} must hold {n} finite numbers, one per feature")
        if any(s <= 0 for s in self.scale):
            raise DataError("outcome gate: scale must be positive")
        if not math.isfinite(self.intercept):
            raise DataError("outcome gate: intercept must be finite")
        if self.reference not in REFERENCES:
            raise DataError(f"outcome gate: reference={self.reference!r}, expected one of {', '.join(REFERENCES)}")

    @property
    def reference_name(self) -> str:
        """The reference in words, for decisions and reports."""
        return "the fixed schedule" if self.reference == "fixed" else "tuned_fixed"

    def standardised(self, obs: np.ndarray, names: Sequence[str]) -> np.ndarray:
        """The gate's features of ``obs`` (features ``names``) in standard deviations of the fitting runs."""
        index = {n: i for i, n in enumerate(names)}
        missing = [f for f in self.features if f not in index]
        if missing:
            raise DataError(f"outcome gate: the observation lacks {missing}; fit the gate on this env's features")
        x = np.nan_to_num(np.asarray(obs, dtype=np.float64)[[index[f] for f in self.features]],
                          nan=0.0, posinf=1e6, neginf=-1e6)
        return (x - np.asarray(self.mean)) / np.asarray(self.scale)

    def probability(self, obs: np.ndarray, names: Sequence[str]) -> float:
        """P(the policy beats the reference) for a run whose observation is ``obs`` (features ``names``)."""
        z = float(np.dot(self.standardised(obs, names), np.asarray(self.coef)) + self.intercept)
        return 1.0 / (1.0 + math.exp(-max(min(z, 500.0), -500.0)))

    def extrapolation(self, obs: np.ndarray, names: Sequence[str]) -> tuple[float, str]:
        """How far ``obs`` lies outside the fitting runs: the largest absolute standardised feature and its
        name. A logistic regression fitted on a few dozen runs or fewer answers any state, and far from them with the
        most confidence, so a large value means the probability is extrapolated, not learned."""
        z = np.abs(self.standardised(obs, names))
        k = int(np.argmax(z))
        return float(z[k]), self.features[k]

    def save(self, path: str | Path) -> Path:
        from stso_env.files import write_text_atomic

        p = Path(path)
        write_text_atomic(p, json.dumps(asdict(self), indent=1))
        return p

    @classmethod
    def load(cls, path: str | Path) -> OutcomeGate:
        p = Path(path)
        if not p.is_file():
            raise DataError(f"outcome gate {p}: no such file; write one with `python -m agents.fit_gate`")
        try:
            raw = json.loads(p.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise DataError(f"outcome gate {p}: not JSON ({err}); write it again with agents.fit_gate") from None
        if not isinstance(raw, dict) or raw.get("format") != GATE_FORMAT:
            raise DataError(f"outcome gate {p}: format {raw.get('format') if isinstance(raw, dict) else None!r}, "
                            f"expected {GATE_FORMAT}; write it again with agents.fit_gate")
        known = {f for f in cls.__dataclass_fields__}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise DataError(f"outcome gate {p}: unknown keys {unknown}")
        try:
            return cls(**raw)
        except TypeError as err:
            raise DataError(f"outcome gate {p}: {err}") from None


def fit_gate(states: np.ndarray, wins: np.ndarray, names: Sequence[str], window: int,
             runs: list[dict[str, Any]], c: float = 1.0, reference: str = "fixed") -> OutcomeGate:
    """Fit the gate on ``states`` (one row per run, the observation after ``window`` windows) and
    ``wins`` (1 where the policy ended the run with the lower probe loss than ``reference``). With one class only the
    gate is constant: always open when the policy won every run, always closed when it never did."""
    x = np.nan_to_num(np.asarray(states, dtype=np.float64), nan=0.0, posinf=1e6, neginf=-1e6)
    y = np.asarray(wins, dtype=np.int64)
    if x.ndim != 2 or x.shape[0] != len(y) or x.shape[1] != len(names) or len(y) == 0:
        raise DataError(f"fit_gate: states {x.shape}, wins {y.shape}, {len(names)} feature names do not match")
    mean = x.mean(axis=0)
    scale = x.std(axis=0)
    scale[scale < 1e-12] = 1.0
    if len(np.unique(y)) < 2:
        coef = np.zeros(x.shape[1])
        intercept = 10.0 if y[0] == 1 else -10.0
    else:
        from sklearn.linear_model import LogisticRegression

        model = LogisticRegression(C=c, max_iter=1000).fit((x - mean) / scale, y)
        coef, intercept = model.coef_[0], float(model.intercept_[0])
    return OutcomeGate(window=int(window), features=list(names), mean=mean.tolist(), scale=scale.tolist(),
                       coef=np.asarray(coef, dtype=np.float64).tolist(), intercept=float(intercept), runs=runs,
                       reference=reference)
