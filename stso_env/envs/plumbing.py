"""What the environments share: their own global-RNG streams, their transition logs, action checks.

Training code draws from the process-global python / numpy / torch RNGs (dropout, sampling,
data order). An env that swaps in its own streams around every piece of work keeps forks and
several envs in one process from drawing from each other's streams, which bit-exact replay
needs. Transition logs go to the Parquet log database and to TensorBoard, opened on first use.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np


class OwnRNG:
    """Mixin: ``with self._own_rng():`` runs with this object's RNG streams (``_rng_state``) swapped in."""

    _rng_state: dict[str, Any] | None = None

    @contextmanager
    def _own_rng(self) -> Iterator[None]:
        from stso_env.train.trainer import capture_rng, restore_rng

        outer = capture_rng()
        if self._rng_state is not None:
            restore_rng(self._rng_state)
        try:
            yield
        finally:
            self._rng_state = capture_rng()
            restore_rng(outer)


class TransitionLogs:
    """``run_dir/log_db.parquet`` (a :class:`~stso_env.proxy.logdb.LogDB`) and ``run_dir/tb``, opened lazily."""

    def __init__(self, run_dir: Path, observation_names: tuple[str, ...] | list[str],
                 schema_path: str | Path | None = None) -> None:
        self.run_dir, self.names, self.schema_path = Path(run_dir), observation_names, schema_path
        self._db = None
        self._tb = None

    def append(self, row: dict[str, Any]) -> None:
        if self._db is None:
            from stso_env.proxy.logdb import LogDB

            self._db = LogDB(self.run_dir / "log_db.parquet", observation_names=self.names,
                             schema_path=self.schema_path)
        self._db.append(row)

    def scalars(self, tag: str, values: list[tuple[str, Any]], step: int) -> None:
        """TensorBoard scalars ``tag/name`` at ``step``; non-finite values are left out."""
        import math

        if self._tb is None:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(self.run_dir / "tb"))
        for name, val in values:
            if val is not None and math.isfinite(val):
                self._tb.add_scalar(f"{tag}/{name}", val, step)

    def flush(self) -> None:
        if self._db is not None:
            self._db.flush()
        if self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._db is not None:
            self._db.close()
            self._db = None


def checked_action(action: Any, nvec: tuple[int, ...], fields: tuple[str, ...]) -> np.ndarray:
    """A MultiDiscrete action as int64, or a ``ValueError`` naming the bad dimensions and their ranges."""
    a = np.asarray(action)
    if a.shape != (len(nvec),) or not np.issubdtype(a.dtype, np.integer) and not (
            np.issubdtype(a.dtype, np.floating) and np.all(a == np.round(a))):
        raise ValueError(f"action {action!r}: expected {len(nvec)} integers (MultiDiscrete{list(nvec)}), "
                         f"got shape {a.shape} dtype {a.dtype}")
    a = a.astype(np.int64)
    bad = [f"{fields[i]}={a[i]} (allowed 0..{n - 1})" for i, n in enumerate(nvec) if not 0 <= a[i] < n]
    if bad:
        raise ValueError(f"action {a.tolist()} is outside the action space: {', '.join(bad)}")
    return a
