"""The uncertainty index: one number saying how unstable a training run is right now.

Updated once per optimizer step by :meth:`UncertaintyIndex.update`. Five raw components are
each turned into a z-score by their own running normaliser and combined as

    index = sum_i  w_i * z_i            (weights from :class:`UncertaintyWeights`)

and a trigger with hysteresis turns **on** when ``index > tau`` and **off** when
``index < tau - hysteresis``.

Components (raw values; :data:`COMPONENT_NAMES` fixes their order for observation vectors):

``loss_volatility``
    ``|loss_t - E_{t-1}| / (|E_{t-1}| + eps)``: the residual of the loss against its EMA
    ``E`` (decay ``loss_ema_decay``), relative to the EMA; ``E`` is updated after the residual
    is taken, so a spike is measured against the past it breaks from.
``grad_volatility``
    ``|g_t - G_{t-1}| / (G_{t-1} + eps)``: the change rate of the grad norm against its EMA
    ``G`` (decay ``grad_ema_decay``), also updated afterwards. With ``grad_ema_decay: 0`` this
    is exactly ``|g_t - g_{t-1}| / g_{t-1}``; a little smoothing keeps ordinary batch-to-batch
    jitter from looking like a change of regime.
``attention_entropy``, ``activation_entropy``
    ``-H`` for the given entropy ``H`` (mean over layers). A *drop* of entropy signals
    collapse, so the negated value makes a drop a positive z. These summaries arrive only
    every few steps: between arrivals (None, or the same value passed again) the last raw value
    and its z are reused (the normaliser learns only from new values, so repeats do not shrink
    its variance); before the first arrival the component is None with z = 0.
``disagreement``
    Variance across the K forecasts of :class:`~stso_env.monitor.forecaster.ForecasterEnsemble`
    for the current window (window-std units squared, see that module); None (z = 0) until
    ``history`` finite losses were seen. Its normaliser scores ``log(d + 1e-6)``: the variance
    of K forecasts spans orders of magnitude with a heavy right tail, and a plain z of it fired
    on ordinary fluctuations after a spike had shrunk and then re-grown the level.

Normalisers: an exponentially weighted mean and variance in the incremental form of West 1979 /
Finch 2009, ``delta = x - mu; mu += a delta; var = (1-a) (var + a delta^2)`` with step
``a = max(1 - norm_decay, 1 / n)`` for the n-th value: the first ``1 / (1 - norm_decay)`` values
give the exact mean and population variance, later ones an EMA (decay ``norm_decay``). A value is
scored against the statistics *before* it is absorbed: ``z = (x - mu) / sqrt(var + floor)``
with ``floor = 1e-12 + (1e-3 mu)^2`` (so a near-constant series does not turn rounding noise
into a huge z), clipped to ``+-z_clip``. While fewer than ``norm_warmup`` values have been
absorbed, ``z = 0``.

Calibration of the defaults. With roughly unit-variance z-scores from three always-present
components the index of a calm run spreads by about 1.4; on synthetic calm runs (exponential
decay plus noise, also after a spike) its maximum over 700 steps stayed below about 5.5, while a
3x loss spike scores above 10 on its first step. Hence ``tau: 6`` and ``hysteresis: 3``.

Non-finite inputs. A NaN/inf loss or grad norm counts as maximal volatility for that step
(``z = z_clip``, raw reported as ``inf``) and is kept out of the EMAs, the normalisers and the
forecasters' data, so one bad step cannot poison the state. A non-finite entropy is treated the
same way for its component. On a non-finite loss the forecasters do not move and the last
disagreement is reused. A grad norm of None (not measured, e.g. a skipped batch) is neutral:
z = 0 and nothing is updated.

Randomness comes only from the forecasters' private generators: :meth:`UncertaintyIndex.update`
never touches the global ``random``, ``numpy.random`` or ``torch`` RNG streams.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from stso_env.config import ASSETS_DIR, _f, config_hash, load_config, to_dict
from stso_env.errors import ConfigError
from stso_env.monitor.forecaster import ForecasterEnsemble

#: Components of the index, in the order used by observation vectors.
COMPONENT_NAMES: tuple[str, ...] = (
    "loss_volatility", "grad_volatility", "attention_entropy", "activation_entropy", "disagreement",
)
DEFAULT_CONFIG_PATH = ASSETS_DIR / "uncertainty_config.yaml"
#: Version of :meth:`UncertaintyIndex.state_dict`'s layout.
STATE_VERSION = 1
#: Denominator guard of the relative volatilities.
EPS = 1e-8
#: Added to the disagreement before its log is z-scored (window-std units squared).
DISAGREEMENT_FLOOR = 1e-6
#: Absolute and relative (to |mean|) variance floor of the normalisers.
VAR_EPS = 1e-12
REL_SD_FLOOR = 1e-3

_BIG = 1e6


@dataclass
class UncertaintyWeights:
    """Weight of each component's z-score in the index (0 switches a component off)."""

    loss_volatility: float = _f(1.0, "weight of the loss residual against its EMA", range=(0.0, _BIG))
    grad_volatility: float = _f(1.0, "weight of the grad-norm change rate", range=(0.0, _BIG))
    attention_entropy: float = _f(0.5, "weight of the attention-entropy drop", range=(0.0, _BIG))
    activation_entropy: float = _f(0.5, "weight of the activation-entropy drop", range=(0.0, _BIG))
    disagreement: float = _f(1.0, "weight of the forecasters' disagreement", range=(0.0, _BIG))


@dataclass
class UncertaintyConfig:
    """Settings of :class:`UncertaintyIndex`; defaults in ``assets/uncertainty_config.yaml``."""

    weights: UncertaintyWeights = field(default_factory=UncertaintyWeights,
                                        metadata={"help": "component weights"})
    tau: float = _f(6.0, "trigger threshold: the trigger turns on when index > tau", range=(0.0, _BIG))
    hysteresis: float = _f(3.0, "the trigger turns off when index < tau - hysteresis", range=(0.0, _BIG))
    loss_ema_decay: float = _f(0.9, "decay of the loss EMA the residual is taken against", range=(0.0, 0.99999))
    grad_ema_decay: float = _f(0.9, "decay of the grad-norm EMA (0 = previous raw norm)", range=(0.0, 0.99999))
    norm_decay: float = _f(0.99, "decay of each normaliser's running mean and variance", range=(0.0, 0.99999))
    norm_warmup: int = _f(20, "values a normaliser absorbs before its z-scores are used (z = 0 before)",
                          range=(0, 10**9))
    z_clip: float = _f(10.0, "each z-score is clipped to +-z_clip", range=(0.1, _BIG))
    n_forecasters: int = _f(4, "K, forecasters in the ensemble", range=(2, 64))
    horizon: int = _f(10, "N, forecast target is the mean loss of the next N steps", range=(1, 100_000))
    history: int = _f(32, "W, losses in the window each forecaster reads", range=(1, 100_000))
    patch: int = _f(8, "losses read per recurrent step (W / patch steps; must divide history)",
                    range=(1, 100_000))
    hidden: int = _f(16, "hidden units per forecaster", range=(1, 4096))
    forecaster: str = _f("gru", "recurrent cell of the forecasters", choices=("gru", "lstm"))
    forecaster_lr: float = _f(1e-2, "Adam learning rate of the forecasters", range=(1e-8, 10.0))
    train_every: int = _f(4, "steps (finite losses) between online training updates", range=(1, 10**9))
    replay: int = _f(256, "(window, target) pairs kept in the replay buffer, oldest dropped first",
                     range=(1, 10**7))
    batch: int = _f(32, "minibatch per forecaster per training update", range=(1, 100_000))
    seed: int = _f(0, "seed of the forecasters' init, bootstrap and minibatches", range=(0, 2**32 - 1))

    def validate(self, source: str) -> None:
        if self.history % self.patch:
            raise ConfigError(f"{source}: patch: {self.patch} does not divide history {self.history}; "
                              f"pick a divisor (e.g. patch: 8 with history: 32)")


def load_uncertainty_config(path: str | Path | None = None,
                            overrides: dict[str, Any] | None = None) -> UncertaintyConfig:
    """Load :class:`UncertaintyConfig` strictly from YAML (default ``assets/uncertainty_config.yaml``)."""
    return load_config(UncertaintyConfig, DEFAULT_CONFIG_PATH if path is None else path, overrides)


# --------------------------------------------------------------------------- building blocks


class RunningNormaliser:
    """EMA mean/variance z-scorer with warm-up and clipping (formulas in the module docstring)."""

    def __init__(self, decay: float, warmup: int, z_clip: float) -> None:
        self.decay, self.warmup, self.z_clip = decay, warmup, z_clip
        self.count = 0
        self.mean = 0.0
        self.var = 0.0

    def score(self, x: float) -> float:
        """z of ``x`` against the current statistics (0 during warm-up), clipped."""
        if self.count < max(self.warmup, 1):
            return 0.0
        sd = math.sqrt(self.var + VAR_EPS + (REL_SD_FLOOR * self.mean) ** 2)
        return min(max((x - self.mean) / sd, -self.z_clip), self.z_clip)

    def absorb(self, x: float) -> None:
        """Fold a finite ``x`` into the running mean and variance.

        The step size is ``max(1 - decay, 1 / (count + 1))``: the first ``1 / (1 - decay)``
        values give the exact mean and population variance (Welford), later ones the EMA. A
        plain EMA started at zero variance would underestimate the spread by a factor
        ``1 - decay**count`` right when warm-up ends and fire on noise.
        """
        alpha = max(1.0 - self.decay, 1.0 / (self.count + 1))
        delta = x - self.mean
        self.mean += alpha * delta
        self.var = (1.0 - alpha) * (self.var + alpha * delta * delta)
        self.count += 1

    def score_and_absorb(self, x: float) -> float:
        """Score ``x`` against the past, then absorb it."""
        z = self.score(x)
        self.absorb(x)
        return z

    def state_dict(self) -> dict[str, Any]:
        return {"count": self.count, "mean": self.mean, "var": self.var}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.count, self.mean, self.var = int(state["count"]), float(state["mean"]), float(state["var"])


class HysteresisTrigger:
    """On when ``index > tau``; off again only when ``index < tau - hysteresis``."""

    def __init__(self, tau: float, hysteresis: float) -> None:
        self.tau, self.hysteresis = tau, hysteresis
        self.on = False

    def update(self, index: float) -> tuple[bool, bool]:
        """Return ``(trigger, fired)``; ``fired`` is True only on the step the trigger turns on."""
        if not self.on and index > self.tau:
            self.on = True
            return True, True
        if self.on and index < self.tau - self.hysteresis:
            self.on = False
        return self.on, False


@dataclass
class UncertaintyReading:
    """One step's index, trigger state and the components behind them."""

    step: int
    """Updates seen, this one included (1 on the first call)."""
    index: float
    trigger: bool
    """Trigger state after this step (hysteresis applied)."""
    fired: bool
    """True only on the step the trigger turned on."""
    raw: dict[str, float | None]
    """Raw component values keyed by :data:`COMPONENT_NAMES` (entropies negated; None = not available)."""
    z: dict[str, float]
    """Clipped z-scores keyed by :data:`COMPONENT_NAMES` (0 while unavailable or warming up)."""
    forecast: float | None
    """Ensemble mean forecast of the mean loss over the next ``horizon`` steps, in loss units."""
    disagreement: float | None
    """Variance across the forecasts (window-std units squared); equals ``raw['disagreement']``."""

    def z_vector(self) -> np.ndarray:
        """The z-scores as float32 in :data:`COMPONENT_NAMES` order (for observation vectors)."""
        return np.array([self.z[n] for n in COMPONENT_NAMES], dtype=np.float32)


# --------------------------------------------------------------------------- the index


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Dotted keys of a nested config mapping (for naming the differences between two configs)."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


class UncertaintyIndex:
    """Online uncertainty index with hysteresis trigger; see the module docstring for the formulas."""

    component_names: tuple[str, ...] = COMPONENT_NAMES

    def __init__(self, config: UncertaintyConfig | None = None) -> None:
        self.config = cfg = config if config is not None else load_uncertainty_config()
        self.weights = {n: float(getattr(cfg.weights, n)) for n in COMPONENT_NAMES}
        self.normalisers = {n: RunningNormaliser(cfg.norm_decay, cfg.norm_warmup, cfg.z_clip)
                            for n in COMPONENT_NAMES}
        self.trigger = HysteresisTrigger(cfg.tau, cfg.hysteresis)
        self.forecasters = ForecasterEnsemble(
            n_models=cfg.n_forecasters, window=cfg.history, horizon=cfg.horizon, hidden=cfg.hidden,
            kind=cfg.forecaster, lr=cfg.forecaster_lr, replay=cfg.replay, batch=cfg.batch,
            train_every=cfg.train_every, patch=cfg.patch, seed=cfg.seed)
        self.step = 0
        self.loss_ema: float | None = None
        self.grad_ema: float | None = None
        # Components that are reused between arrivals: last (raw, z).
        self.last: dict[str, tuple[float | None, float]] = {
            n: (None, 0.0) for n in ("attention_entropy", "activation_entropy", "disagreement")}
        self.last_forecast: float | None = None

    def _volatility(self, name: str, x: float | None, ema: float | None,
                    decay: float) -> tuple[float | None, float, float | None]:
        """(raw, z, new EMA) of ``|x - ema| / (|ema| + eps)``; non-finite x is maximal volatility."""
        if x is None:
            return None, 0.0, ema
        if not math.isfinite(x):
            return math.inf, self.config.z_clip, ema
        if ema is None:
            return None, 0.0, x
        raw = abs(x - ema) / (abs(ema) + EPS)
        return raw, self.normalisers[name].score_and_absorb(raw), decay * ema + (1.0 - decay) * x

    def _entropy(self, name: str, value: float | None) -> tuple[float | None, float]:
        """(raw, z) of ``-value``; None or a repeat reuses the last arrival, non-finite is maximal."""
        if value is None:
            return self.last[name]
        value = float(value)
        if not math.isfinite(value):
            return math.inf, self.config.z_clip
        raw = -value
        # A value bit-identical to the last arrival is the same summary passed again (callers
        # may hold the last one between refreshes), not a new measurement.
        if raw != self.last[name][0]:
            self.last[name] = (raw, self.normalisers[name].score_and_absorb(raw))
        return self.last[name]

    def update(self, loss: float, grad_norm: float | None, attention_entropy: float | None = None,
               activation_entropy: float | None = None) -> UncertaintyReading:
        """Fold in one optimizer step and return the reading (call once per step, in order).

        ``grad_norm=None`` means "not measured this step" (e.g. a deliberately skipped batch):
        the grad component reads z = 0 and its state is untouched, whereas NaN/inf means the
        gradient blew up and scores ``z_clip``. Entropies are None between arrivals.
        """
        cfg = self.config
        self.step += 1
        loss = float(loss)
        grad_norm = None if grad_norm is None else float(grad_norm)
        raw: dict[str, float | None] = {}
        z: dict[str, float] = {}
        raw["loss_volatility"], z["loss_volatility"], self.loss_ema = self._volatility(
            "loss_volatility", loss, self.loss_ema, cfg.loss_ema_decay)
        raw["grad_volatility"], z["grad_volatility"], self.grad_ema = self._volatility(
            "grad_volatility", grad_norm, self.grad_ema, cfg.grad_ema_decay)
        raw["attention_entropy"], z["attention_entropy"] = self._entropy("attention_entropy", attention_entropy)
        raw["activation_entropy"], z["activation_entropy"] = self._entropy("activation_entropy",
                                                                           activation_entropy)
        if math.isfinite(loss):
            self.forecasters.observe(loss)
            fc = self.forecasters.predict()
            if fc is not None:
                # The variance of K forecasts spans orders of magnitude with a heavy right tail;
                # its log is close to normal, so z measures a ratio to the usual level.
                log_d = math.log(fc.disagreement + DISAGREEMENT_FLOOR)
                self.last["disagreement"] = (fc.disagreement,
                                             self.normalisers["disagreement"].score_and_absorb(log_d))
                self.last_forecast = fc.mean
        raw["disagreement"], z["disagreement"] = self.last["disagreement"]
        index = math.fsum(self.weights[n] * z[n] for n in COMPONENT_NAMES)
        trigger, fired = self.trigger.update(index)
        return UncertaintyReading(step=self.step, index=index, trigger=trigger, fired=fired,
                                  raw={n: raw[n] for n in COMPONENT_NAMES}, z={n: z[n] for n in COMPONENT_NAMES},
                                  forecast=self.last_forecast, disagreement=raw["disagreement"])

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict[str, Any]:
        """Plain-data state (copies): EMAs, normalisers, trigger, forecasters with Adam and RNG states."""
        return {
            "version": STATE_VERSION,
            "config_hash": config_hash(self.config),
            "config": to_dict(self.config),
            "step": self.step,
            "loss_ema": self.loss_ema,
            "grad_ema": self.grad_ema,
            "normalisers": {n: self.normalisers[n].state_dict() for n in COMPONENT_NAMES},
            "last": {n: [raw, z] for n, (raw, z) in self.last.items()},
            "last_forecast": self.last_forecast,
            "trigger": self.trigger.on,
            "forecasters": self.forecasters.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` output; the config must match the one it was saved with."""
        if state.get("version") != STATE_VERSION:
            raise ConfigError(f"uncertainty state version {state.get('version')!r} is not {STATE_VERSION}")
        if state.get("config_hash") != config_hash(self.config):
            saved, now = _flatten(state.get("config") or {}), _flatten(to_dict(self.config))
            diffs = ", ".join(f"{k}: saved {saved.get(k)!r}, now {now.get(k)!r}"
                              for k in sorted(set(saved) | set(now)) if saved.get(k) != now.get(k))
            raise ConfigError(f"uncertainty state was saved under another config (config hash "
                              f"{state.get('config_hash')!r} != {config_hash(self.config)!r}; {diffs}); "
                              f"build the index with the saved config")
        self.forecasters.load_state_dict(state["forecasters"])
        self.step = int(state["step"])
        self.loss_ema = None if state["loss_ema"] is None else float(state["loss_ema"])
        self.grad_ema = None if state["grad_ema"] is None else float(state["grad_ema"])
        for n in COMPONENT_NAMES:
            self.normalisers[n].load_state_dict(state["normalisers"][n])
        for n, (r, zz) in state["last"].items():
            if n not in self.last:
                raise ConfigError(f"uncertainty state: unknown reused component {n!r}")
            self.last[n] = (None if r is None else float(r), float(zz))
        self.last_forecast = None if state["last_forecast"] is None else float(state["last_forecast"])
        self.trigger.on = bool(state["trigger"])


__all__ = [
    "COMPONENT_NAMES", "DEFAULT_CONFIG_PATH", "HysteresisTrigger", "RunningNormaliser", "UncertaintyConfig",
    "UncertaintyIndex", "UncertaintyReading", "UncertaintyWeights", "load_uncertainty_config",
]
