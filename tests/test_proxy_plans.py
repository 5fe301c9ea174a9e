"""Plans as proxy inputs: the first window's action followed by the continuation of the horizon."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from stso_env.proxy.dataset import PLAN_NVEC, as_plan, build_targets, hold_continuation
from stso_env.proxy.logdb import load_log_schema
from stso_env.proxy.model import ProxyConfig, ProxyEnsemble
from tests.test_proxy import synth_rows


def table_with_actions(actions: list[list[int]]) -> pa.Table:
    rows = synth_rows(7, steps=len(actions))
    assert len(rows) == len(actions)  # seed 7 does not diverge within these steps
    for row, a in zip(rows, actions):
        row["action"] = a
    schema, _ = load_log_schema()
    return pa.Table.from_pylist(rows, schema=schema)


ACTIONS = [
    [2, 1, 0, 1, 0, 0],  # momentum reset now ...
    [1, 1, 2, 0, 0, 0],  # ... then LR x0.9 with ARC, twice, then neutral
    [1, 1, 2, 0, 0, 0],
    [2, 1, 0, 0, 0, 0],
    [3, 0, 1, 0, 1, 0],
    [3, 0, 1, 0, 1, 0],
]


def test_continuation_is_the_per_dimension_mode_of_the_later_windows():
    ds = build_targets(table_with_actions(ACTIONS), horizon=4, plans=True)
    assert ds.action_nvec == PLAN_NVEC and ds.action.shape == (3, 12)  # rows 0-2 see 4 windows ahead
    np.testing.assert_array_equal(ds.action[0], ACTIONS[0] + [1, 1, 2, 0, 0, 0])  # rows 1-3: mode of 1, 1, 2 ...
    # row 1 sees rows 2-4: lr 1, 2, 3 -> a three-way tie goes to the smallest, 1; wd 1, 1, 0 -> 1; clip 2, 0, 1 -> 0
    np.testing.assert_array_equal(ds.action[1], ACTIONS[1] + [1, 1, 0, 0, 0, 0])
    np.testing.assert_array_equal(ds.action[2], ACTIONS[2] + [3, 0, 1, 0, 1, 0])
    single = build_targets(table_with_actions(ACTIONS), horizon=4)
    np.testing.assert_array_equal(single.action, ds.action[:, :6])  # plans change the input, not the targets
    np.testing.assert_array_equal(single.loss_at_n, ds.loss_at_n)


def test_horizon_one_holds_the_settings_and_drops_one_shots():
    ds = build_targets(table_with_actions(ACTIONS), horizon=1, plans=True)
    np.testing.assert_array_equal(ds.action[0], ACTIONS[0] + [2, 1, 0, 0, 0, 0])
    np.testing.assert_array_equal(ds.action[4], ACTIONS[4] + [3, 0, 1, 0, 0, 0])
    np.testing.assert_array_equal(hold_continuation(np.array(ACTIONS[4])), [[3, 0, 1, 0, 0, 0]])
    np.testing.assert_array_equal(as_plan(np.array([ACTIONS[4]])), [ACTIONS[4] + [3, 0, 1, 0, 0, 0]])


def test_a_plan_proxy_fits_and_scores_plans():
    ds = build_targets(pa.concat_tables([table_with_actions(ACTIONS)] * 1), horizon=2, plans=True)
    model = ProxyEnsemble(ProxyConfig(horizon=2, hidden=8, ensemble=2, epochs=2), state_dim=ds.state.shape[1],
                          nvec=ds.action_nvec)
    model.fit(ds, ds)
    out = model.predict(ds.state, ds.action)
    assert out["loss_at_n"].shape == (len(ds),) and np.isfinite(out["loss_at_n"]).all()
    with pytest.raises(Exception, match="action"):
        model.predict(ds.state, ds.action[:, :6])  # a single action is not a plan
