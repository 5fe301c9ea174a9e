"""How the proxy ranks interventions from state to state.

A policy learned in the proxy (STSO-Proxy-v0) and a shield that asks the proxy can only make
state-dependent choices if the proxy's *ranking* of interventions changes with the state. A
world model can fit loss@N well (a high R²) and still predict the same effect of an action in
every state: the effect is then an additive offset, the best action is the same everywhere, and
the learned policy degenerates into one fixed action that the shield either always passes or
always blocks. :func:`action_effects` measures this on held-out states: for every single change
from the neutral action, its predicted effect on loss@N (the change against the neutral action,
negative = predicted to help), how much that effect varies across states, in what share of
states it is predicted to help, and how often the predicted best action differs between states.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from stso_env.errors import DataError

#: The single changes from the neutral action ``(2, 1, 0, 0, 0, 0)`` of STSO-GPT2-v0 whose effects are
#: reported: (name, action). Skipping a batch is left out: it is masked unless a run allows it.
DEVIATIONS: tuple[tuple[str, tuple[int, ...]], ...] = (
    ("lr_change=x0.8", (0, 1, 0, 0, 0, 0)),
    ("lr_change=x0.9", (1, 1, 0, 0, 0, 0)),
    ("lr_change=x1.1", (3, 1, 0, 0, 0, 0)),
    ("weight_decay=x0.5", (2, 0, 0, 0, 0, 0)),
    ("weight_decay=x2", (2, 2, 0, 0, 0, 0)),
    ("clip_policy=zclip", (2, 1, 1, 0, 0, 0)),
    ("clip_policy=arc", (2, 1, 2, 0, 0, 0)),
    ("clip_policy=spam", (2, 1, 3, 0, 0, 0)),
    ("momentum_reset", (2, 1, 0, 1, 0, 0)),
    ("data_reorder", (2, 1, 0, 0, 1, 0)),
)
NEUTRAL: tuple[int, ...] = (2, 1, 0, 0, 0, 0)


def effect_summary(effects: np.ndarray, names: Sequence[str]) -> dict[str, Any]:
    """Summarise predicted effects ``(n_states, n_actions)`` (loss@N of the action minus that of the
    neutral action, per state) named by ``names``.

    Returns ``per_action`` (name -> ``mean``, ``sd`` across states, ``share_helps``: the share of
    states where the effect is negative), ``best`` (name -> share of states where it is the best
    choice, the neutral action included under ``"neutral"``), ``modal_best`` and its
    ``modal_best_share`` (1.0: one ranking for every state), ``distinct_best`` (how many choices are
    best somewhere) and ``n_states``.
    """
    e = np.asarray(effects, dtype=np.float64)
    if e.ndim != 2 or e.shape[1] != len(names) or e.shape[0] == 0:
        raise DataError(f"effects: expected shape (n_states > 0, {len(names)}), got {e.shape}")
    if not np.isfinite(e).all():
        raise DataError("effects: contain NaN or infinity; score only states the proxy predicts finitely")
    per_action = {name: {"mean": float(e[:, j].mean()), "sd": float(e[:, j].std()),
                         "share_helps": float((e[:, j] < 0).mean())} for j, name in enumerate(names)}
    # column 0 is the neutral action (effect 0); a tie goes to it, as the shield's rule would
    choices = ["neutral", *names]
    best = np.argmin(np.concatenate([np.zeros((e.shape[0], 1)), e], axis=1), axis=1)
    counts = np.bincount(best, minlength=len(choices))
    shares = {choices[i]: float(c / e.shape[0]) for i, c in enumerate(counts) if c}
    modal = int(np.argmax(counts))
    return {"n_states": int(e.shape[0]), "per_action": per_action, "best": shares,
            "modal_best": choices[modal], "modal_best_share": float(counts[modal] / e.shape[0]),
            "distinct_best": int((counts > 0).sum())}


def action_effects(model: Any, states: np.ndarray,
                   candidates: Sequence[tuple[str, Sequence[int]]] = DEVIATIONS,
                   neutral: Sequence[int] = NEUTRAL) -> dict[str, Any]:
    """Predicted effect of each candidate against ``neutral`` on ``loss_at_n`` in every one of ``states``
    (one batched call of ``model.predict``), summarised by :func:`effect_summary`.

    ``model`` is a :class:`~stso_env.proxy.model.ProxyEnsemble`; a plan proxy scores each action as a
    plan that holds its settings over the horizon (:func:`~stso_env.proxy.dataset.as_plan`), as the
    shield and the branch method do.
    """
    from stso_env.proxy.dataset import PLAN_NVEC, as_plan

    x = np.asarray(states, dtype=np.float32)
    if x.ndim != 2 or x.shape[0] == 0:
        raise DataError(f"states: expected a non-empty (n, state_dim) array, got shape {x.shape}")
    acts = np.asarray([neutral] + [a for _, a in candidates], dtype=np.int64)
    if tuple(model.nvec) == tuple(PLAN_NVEC):
        acts = as_plan(acts)
    n, k = x.shape[0], acts.shape[0]
    pred = model.predict(np.repeat(x, k, axis=0), np.tile(acts, (n, 1)))["loss_at_n"]
    loss = np.asarray(pred, dtype=np.float64).reshape(n, k)
    keep = np.isfinite(loss).all(axis=1)
    if not keep.any():
        raise DataError("states: the proxy predicts no finite loss@N for any of them")
    return effect_summary(loss[keep, 1:] - loss[keep, :1], [name for name, _ in candidates])
