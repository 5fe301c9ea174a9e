"""Supervised examples for the proxy world model, built from the log database.

Every logged row ``t`` of a trajectory (rows sharing ``(run_id, episode)``,
ordered by ``env_step``) becomes one example: the input is the state the
action was chosen on plus the executed action, and the targets describe what
happens over the next ``N`` env steps (the row's own window and the ``N - 1``
after it), where ``N`` is the horizon.

Targets (row ``t``, window = rows ``t .. t+N-1``):

``loss_at_n``
    ``probe_loss`` of row ``t+N-1``: the probe loss ``N`` env steps after the
    state. When the trajectory diverges inside the window it ends early; the
    target is then the last finite probe loss in the window (falling back to
    ``probe_loss_before`` of row ``t``), so the regression head is never fed
    NaN or inf, and ``diverged_at_n`` says the number is a pre-divergence one.
``diverged_at_n``
    1 when any row of the window is ``diverged`` or ``terminated``, else 0.
``instability_risk``
    the *count* of instability events (``instability_events`` summed over the
    window); not a probability, so a larger spike cluster scores higher.
``loss_before`` (an input, not a target)
    ``probe_loss_before`` of row ``t``: the probe loss at the state. The proxy
    regresses ``loss_at_n`` as a change from it (see
    :mod:`stso_env.proxy.model`).
``recovery_time``
    ``k - 1`` for the smallest ``k`` in ``1..N`` whose probe loss after ``k``
    steps is at or below ``probe_loss_before`` of row ``t`` (the loss at the
    state); ``N`` when it never gets back within the horizon or the window
    diverges. 0 thus means "no setback", ``m`` means an ``m``-window setback.
``next_state``
    ``next_state`` of row ``t`` (the observation after one env step).

Plans (``build_targets(..., plans=True)``): the proxy's input action becomes a *plan*, the
executed action of row ``t`` followed by its *continuation*, the action of the remaining
``N - 1`` windows summarised per dimension by its most frequent value over rows
``t+1 .. t+N-1`` (ties to the smaller value). A plan proxy's action vector has
``2 * len(ACTION_NVEC)`` entries (:data:`PLAN_NVEC`), so a branch decision can score
"momentum reset now, then LR x0.9 for four windows" apart from "LR x0.9 now and then nothing".
Where the window has no later row (horizon 1, or a divergence in the first window) the
continuation is :func:`hold_continuation` of the row's own action. Episodes collected with
held perturbations (``agents.collect``'s ``perturbed`` policy) give exact continuations;
uniformly random episodes give their per-dimension mode, a summary the ensemble's spread and
the conformal bounds account for.

Rows whose window runs past the end of a trajectory that did *not* diverge
(the step budget truncated it, or logging stopped) are dropped: the future is
unknown there, and a truncation is not a divergence.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from stso_env.errors import ConfigError, DataError

#: MultiDiscrete sizes of the STSO-GPT2-v0 action space.
ACTION_NVEC: tuple[int, ...] = (4, 3, 4, 2, 2, 2)
#: MultiDiscrete sizes of a plan: the first window's action, then the continuation's.
PLAN_NVEC: tuple[int, ...] = ACTION_NVEC + ACTION_NVEC
#: Action dimensions that act once, on the window's first step (momentum reset, reorder, skip).
ONE_SHOT_DIMS: tuple[int, ...] = (3, 4, 5)
#: How a proxy sees an action (``ProxyConfig.action_encoding``): ``one_hot``, a column per choice of every
#: dimension; ``ordered``, the LR change and the weight-decay scale as one number each (the log of the
#: factor), the clip policy one-hot, the 0/1 dimensions as they are (:func:`encode_actions`).
ACTION_ENCODINGS: tuple[str, ...] = ("one_hot", "ordered")
#: The proxy's loss@N heads (``ProxyConfig.loss_model``): the MLP ensemble's, or trees on the state plus a
#: linear plan term (:class:`stso_env.proxy.trees.TreeLossHead`).
LOSS_MODELS: tuple[str, ...] = ("mlp", "trees")
#: The proxy's divergence heads (``ProxyConfig.divergence_model``): the MLP ensemble's logit, or trees on the
#: state and plan (:class:`stso_env.proxy.trees.TreeDivergenceHead`).
DIVERGENCE_MODELS: tuple[str, ...] = ("mlp", "trees")
#: Action dimensions with no order among their choices (the clip policy), one-hot under ``ordered``.
_CATEGORICAL_DIMS: tuple[int, ...] = (2,)
#: Names of the scalar targets, in the order of :meth:`ProxyDataset.scalar_targets`.
SCALAR_TARGETS: tuple[str, ...] = ("loss_at_n", "diverged_at_n", "instability_risk", "recovery_time")
_REQUIRED = ("run_id", "episode", "env_step", "seed", "state", "action", "next_state", "terminated",
             "truncated", "probe_loss", "probe_loss_before", "instability_events", "diverged")


def action_one_hot(action: np.ndarray, nvec: tuple[int, ...] = ACTION_NVEC) -> np.ndarray:
    """One-hot encode MultiDiscrete actions ``(n, len(nvec))`` into ``(n, sum(nvec))`` float32."""
    a = np.asarray(action, dtype=np.int64)
    if a.ndim != 2 or a.shape[1] != len(nvec):
        raise DataError(f"action: expected shape (n, {len(nvec)}), got {a.shape}")
    out = np.zeros((a.shape[0], int(sum(nvec))), dtype=np.float32)
    offset = 0
    rows = np.arange(a.shape[0])
    for d, size in enumerate(nvec):
        col = a[:, d]
        if col.size and (col.min() < 0 or col.max() >= size):
            raise DataError(f"action[:, {d}]: values must lie in 0..{size - 1}, got {col.min()}..{col.max()}")
        out[rows, offset + col] = 1.0
        offset += size
    return out


def hold_continuation(action: np.ndarray) -> np.ndarray:
    """The continuation that holds ``action``'s settings (LR change, weight decay, clip policy) and repeats
    none of its one-shot interventions: ``(n, D)`` -> ``(n, D)``."""
    a = np.array(action, dtype=np.int64, copy=True).reshape(-1, len(ACTION_NVEC))
    a[:, list(ONE_SHOT_DIMS)] = 0
    return a


def as_plan(action: np.ndarray, continuation: np.ndarray | None = None) -> np.ndarray:
    """Plans ``(n, 2D)`` from first-window actions ``(n, D)`` and continuations (default: held settings)."""
    a = np.asarray(action, dtype=np.int64).reshape(-1, len(ACTION_NVEC))
    c = hold_continuation(a) if continuation is None else np.asarray(continuation, dtype=np.int64).reshape(a.shape)
    return np.concatenate([a, c], axis=1)


def _mode_rows(actions: np.ndarray) -> np.ndarray:
    # per-dimension most frequent value (bincount's argmax: ties go to the smaller value)
    return np.array([np.bincount(actions[:, d]).argmax() for d in range(actions.shape[1])], dtype=np.int64)


def action_feature_names(nvec: tuple[int, ...] = ACTION_NVEC) -> list[str]:
    """Names of the one-hot action columns: ``action{d}={value}``."""
    return [f"action{d}={v}" for d, size in enumerate(nvec) for v in range(size)]


def _check_encoding(encoding: str, nvec: tuple[int, ...]) -> None:
    if encoding not in ACTION_ENCODINGS:
        raise ConfigError(f"proxy config action_encoding: {encoding!r} is not one of {list(ACTION_ENCODINGS)}")
    if encoding == "ordered" and tuple(nvec) not in (ACTION_NVEC, PLAN_NVEC):
        raise ConfigError(f"proxy config action_encoding: 'ordered' needs the env's action space {list(ACTION_NVEC)} "
                          f"or its plans {list(PLAN_NVEC)}, got {list(nvec)}; use 'one_hot'")


def _ordered_columns(nvec: tuple[int, ...]) -> list[tuple[int, int | None]]:
    # (dimension, choice) per column: choice None is the dimension's number, else its one-hot column
    cols: list[tuple[int, int | None]] = []
    for d, size in enumerate(nvec):
        field = d % len(ACTION_NVEC)
        cols += [(d, v) for v in range(size)] if field in _CATEGORICAL_DIMS else [(d, None)]
    return cols


def encoded_width(nvec: tuple[int, ...], encoding: str = "one_hot") -> int:
    """Number of columns :func:`encode_actions` gives actions of sizes ``nvec``."""
    _check_encoding(encoding, nvec)
    return int(sum(nvec)) if encoding == "one_hot" else len(_ordered_columns(nvec))


def encoded_feature_names(nvec: tuple[int, ...], encoding: str = "one_hot") -> list[str]:
    """Names of :func:`encode_actions`' columns: ``action{d}={value}`` for one-hot ones, ``action{d}`` else."""
    _check_encoding(encoding, nvec)
    if encoding == "one_hot":
        return action_feature_names(nvec)
    return [f"action{d}" if v is None else f"action{d}={v}" for d, v in _ordered_columns(nvec)]


def encode_actions(action: np.ndarray, nvec: tuple[int, ...] = ACTION_NVEC, encoding: str = "one_hot") -> np.ndarray:
    """The proxy's action columns ``(n, encoded_width(nvec, encoding))`` float32 (see :data:`ACTION_ENCODINGS`).

    ``ordered`` gives each ordered dimension one column, the log of its factor (LR x0.8 -> log 0.8, the
    neutral choice 0), so a model fits one slope per dimension where one-hot codes need a coefficient per
    choice: on a few hundred logged windows the per-choice estimates are noise-sized (see
    ``agents.proxy_baselines``)."""
    onehot = action_one_hot(action, nvec)  # validates shape and ranges
    _check_encoding(encoding, nvec)
    if encoding == "one_hot":
        return onehot
    # the env's own factors (imported here: the env module is heavy, and loaded anyway wherever actions are made)
    from stso_env.envs.gpt2_env import LR_CHANGES, WD_SCALES

    factors = {0: LR_CHANGES, 1: WD_SCALES}
    a = np.asarray(action, dtype=np.int64)
    out = np.zeros((a.shape[0], encoded_width(nvec, encoding)), dtype=np.float32)
    for j, (d, v) in enumerate(_ordered_columns(nvec)):
        field = d % len(ACTION_NVEC)
        if v is not None:
            out[:, j] = a[:, d] == v
        elif field in factors:
            out[:, j] = np.log(np.asarray(factors[field]))[a[:, d]]
        else:
            out[:, j] = a[:, d]
    return out


@dataclass
class ProxyDataset:
    """Proxy examples as aligned numpy arrays (one entry per example)."""

    state: np.ndarray             # (n, S) float32
    action: np.ndarray            # (n, D) int64, MultiDiscrete
    loss_at_n: np.ndarray         # (n,) float32
    diverged_at_n: np.ndarray     # (n,) float32, 0/1
    instability_risk: np.ndarray  # (n,) float32, event count
    recovery_time: np.ndarray     # (n,) float32, 0..N
    next_state: np.ndarray        # (n, S) float32
    run_id: np.ndarray            # (n,) str
    episode: np.ndarray           # (n,) int64
    seed: np.ndarray              # (n,) int64
    horizon: int
    state_names: list[str] = field(default_factory=list)
    action_nvec: tuple[int, ...] = ACTION_NVEC
    target_names: tuple[str, ...] = SCALAR_TARGETS + ("next_state",)
    #: (n,) float32 probe loss at the state (``probe_loss_before``, nats); None for hand-made sets
    loss_before: np.ndarray | None = None
    #: (n,) int64 the first window of the horizon (0 = the example's own) in which a scenario event (the log's
    #: ``noise`` column: an LR shock, a data event) was active, -1 for none; None for logs without the column.
    #: No model input: it measures how much of a target the state could foresee (``agents.foresight``)
    event_window: np.ndarray | None = None

    def __len__(self) -> int:
        return int(self.state.shape[0])

    @property
    def feature_names(self) -> list[str]:
        """Model input names: the state features, then the one-hot action columns."""
        return list(self.state_names) + action_feature_names(self.action_nvec)

    @property
    def groups(self) -> np.ndarray:
        """Training-run identifier per example (``run_id#episode``: every episode of STSO-GPT2-v0 is
        a training run of its own), for splitting by whole runs, never by rows."""
        return self.trajectory

    @property
    def trajectory(self) -> np.ndarray:
        """``run_id#episode`` per example."""
        return np.array([f"{r}#{e}" for r, e in zip(self.run_id, self.episode)], dtype=object)

    def subset(self, mask: np.ndarray) -> ProxyDataset:
        """The examples selected by a boolean mask or an index array."""
        idx = np.asarray(mask)
        take = {k: getattr(self, k)[idx] for k in ("state", "action", "loss_at_n", "diverged_at_n",
                                                   "instability_risk", "recovery_time", "next_state",
                                                   "run_id", "episode", "seed")}
        return ProxyDataset(**take, horizon=self.horizon, state_names=list(self.state_names),
                            action_nvec=self.action_nvec, target_names=self.target_names,
                            loss_before=None if self.loss_before is None else self.loss_before[idx],
                            event_window=None if self.event_window is None else self.event_window[idx])

    def scalar_targets(self) -> np.ndarray:
        """``(n, 4)`` float32 in the order of :data:`SCALAR_TARGETS`."""
        return np.stack([self.loss_at_n, self.diverged_at_n, self.instability_risk, self.recovery_time], axis=1)

    def features(self) -> np.ndarray:
        """Flat ``(n, S + D)`` matrix of state and integer action (the calibration wrapper's input)."""
        return np.concatenate([self.state, self.action.astype(np.float32)], axis=1)


def _list_column(table: pa.Table, name: str, dtype: type) -> np.ndarray:
    col = table.column(name).combine_chunks()
    lengths = np.diff(np.asarray(col.offsets))
    if lengths.size and lengths.min() != lengths.max():
        raise DataError(f"log db column {name!r}: rows have different lengths ({lengths.min()}..{lengths.max()}); "
                        "all rows must come from one observation/action layout")
    width = int(lengths[0]) if lengths.size else 0
    return np.asarray(col.flatten().to_numpy(zero_copy_only=False), dtype=dtype).reshape(-1, width)


def build_targets(table: pa.Table, horizon: int, *, state_names: list[str] | None = None,
                  plans: bool = False) -> ProxyDataset:
    """Turn logged trajectories into supervised proxy examples (see the module docstring); with ``plans``
    the action of each example is its plan (first action + continuation, :data:`PLAN_NVEC`)."""
    if not isinstance(horizon, int) or horizon < 1:
        raise ConfigError(f"horizon: must be an integer >= 1, got {horizon!r}")
    missing = [c for c in _REQUIRED if c not in table.column_names]
    if missing:
        raise DataError(f"log db: missing columns {missing}; write it with stso_env.proxy.logdb.LogDB "
                        "(assets/log_schema.json)")
    if table.num_rows == 0:
        raise DataError("log db: no rows; collect some STSO-GPT2-v0 episodes first")
    if state_names is None:
        meta = table.schema.metadata or {}
        raw = meta.get(b"observation_names")
        state_names = json.loads(raw) if raw else []
    run = np.asarray(table.column("run_id").to_pylist(), dtype=object)
    ep = table.column("episode").to_numpy().astype(np.int64)
    step = table.column("env_step").to_numpy().astype(np.int64)
    order = np.lexsort((step, ep, run.astype(str)))
    t = table.take(pa.array(order))
    run, ep, step = run[order], ep[order], step[order]
    state = _list_column(t, "state", np.float32)
    action = _list_column(t, "action", np.int64)
    next_state = _list_column(t, "next_state", np.float32)
    if state.shape[1] != next_state.shape[1]:
        raise DataError(f"log db: state has {state.shape[1]} features but next_state {next_state.shape[1]}")
    if not state_names:
        state_names = [f"f{i}" for i in range(state.shape[1])]
    if len(state_names) != state.shape[1]:
        raise DataError(f"log db: {len(state_names)} observation names for {state.shape[1]} state features")
    nvec = ACTION_NVEC if action.shape[1] == len(ACTION_NVEC) else tuple(int(v) + 1 for v in action.max(0))
    seed = t.column("seed").to_numpy().astype(np.int64)
    probe = t.column("probe_loss").to_numpy(zero_copy_only=False).astype(np.float64)
    before = t.column("probe_loss_before").to_numpy(zero_copy_only=False).astype(np.float64)
    events = t.column("instability_events").to_numpy().astype(np.float64)
    div = (t.column("diverged").to_numpy(zero_copy_only=False).astype(bool)
           | t.column("terminated").to_numpy(zero_copy_only=False).astype(bool))
    noisy = (np.asarray([bool(v) for v in t.column("noise").to_pylist()]) if "noise" in t.column_names
             else None)

    keep: list[int] = []
    first_event: list[int] = []
    conts: list[np.ndarray] = []
    targets: list[tuple[float, float, float, float]] = []
    # trajectory boundaries: a new (run_id, episode) pair starts a new trajectory
    starts = np.flatnonzero(np.r_[True, (run[1:] != run[:-1]) | (ep[1:] != ep[:-1])])
    ends = np.r_[starts[1:], len(run)]
    for s, e in zip(starts, ends):
        if np.any(np.diff(step[s:e]) == 0):
            raise DataError(f"log db: trajectory {run[s]}#{ep[s]} has duplicate env_step values; "
                            "rows were logged twice (resume into a new run folder)")
        div_rows = np.flatnonzero(div[s:e])
        # rows after the first divergence belong to no valid future: stop the trajectory there
        stop = s + int(div_rows[0]) + 1 if div_rows.size else e
        for i in range(s, stop):
            last = min(i + horizon - 1, stop - 1)
            diverged = bool(div[i:last + 1].any())
            if i + horizon - 1 > last and not diverged:
                continue  # horizon runs past a truncated/unfinished end: future unknown
            window = probe[i:last + 1]
            finite = np.flatnonzero(np.isfinite(window))
            if diverged or not np.isfinite(probe[last]):
                loss = window[finite[-1]] if finite.size else before[i]
            else:
                loss = probe[last]
            if not np.isfinite(loss):
                continue  # no usable loss anywhere: nothing to regress on
            rec = float(horizon)
            if not diverged and np.isfinite(before[i]):
                ok = np.flatnonzero(np.isfinite(window) & (window <= before[i]))
                if ok.size:
                    rec = float(ok[0])
            keep.append(i)
            if noisy is not None:
                active = np.flatnonzero(noisy[i:last + 1])
                first_event.append(int(active[0]) if active.size else -1)
            if plans:
                later = action[i + 1:last + 1]
                conts.append(_mode_rows(later) if len(later) else hold_continuation(action[i])[0])
            targets.append((float(loss), float(diverged), float(np.nansum(events[i:last + 1])), rec))
    if not keep:
        raise DataError(f"log db: no trajectory is long enough for horizon {horizon} "
                        f"(longest has {int((ends - starts).max())} rows); lower --horizon or log longer episodes")
    k = np.asarray(keep)
    tg = np.asarray(targets, dtype=np.float32)
    acts = action[k]
    if plans:
        if action.shape[1] != len(ACTION_NVEC):
            raise DataError(f"log db: plans need STSO-GPT2-v0 actions of {len(ACTION_NVEC)} dimensions, got "
                            f"{action.shape[1]}")
        acts = np.concatenate([acts, np.stack(conts)], axis=1)
        nvec = PLAN_NVEC
    return ProxyDataset(state=state[k], action=acts, loss_at_n=tg[:, 0], diverged_at_n=tg[:, 1],
                        instability_risk=tg[:, 2], recovery_time=tg[:, 3], next_state=next_state[k],
                        run_id=run[k].astype(str), episode=ep[k], seed=seed[k], horizon=horizon,
                        state_names=list(state_names), action_nvec=nvec,
                        loss_before=before[k].astype(np.float32),
                        event_window=None if noisy is None else np.asarray(first_event, dtype=np.int64))
