"""The log database: environment transitions as a Parquet dataset.

``RUN_DIR/log_db.parquet`` is a *folder* of Parquet part files (the layout
Spark, pandas and pyarrow all read as one table). Rows are buffered and every
``flush_rows`` rows (and on :meth:`LogDB.flush` / :meth:`LogDB.close`) a new
part file is written to a temporary name and renamed into place, so a reader
(:func:`read_log_db`) sees complete row groups while the run goes on, and a
killed run loses at most the unflushed rows. Columns and types come from
``assets/log_schema.json``; a row with a missing or unknown column, or an
existing dataset written with another schema, is refused with a clear error.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from stso_env.config import ASSETS_DIR
from stso_env.errors import DataError

_TYPES = {
    "string": pa.string(), "int64": pa.int64(), "float64": pa.float64(), "bool": pa.bool_(),
    "list<float32>": pa.list_(pa.float32()), "list<int64>": pa.list_(pa.int64()),
}


def load_log_schema(path: str | Path | None = None) -> tuple[pa.Schema, int]:
    """The Arrow schema and version described by ``assets/log_schema.json``."""
    spec = json.loads(Path(path or ASSETS_DIR / "log_schema.json").read_text(encoding="utf-8"))
    fields = [pa.field(c["name"], _TYPES[c["type"]]) for c in spec["columns"]]
    return pa.schema(fields), int(spec["schema_version"])


class LogDB:
    """Append-only writer of one run's transitions."""

    def __init__(self, path: str | Path, *, observation_names: tuple[str, ...] | list[str],
                 flush_rows: int = 64, schema_path: str | Path | None = None) -> None:
        self.path = Path(path)
        self.schema, self.version = load_log_schema(schema_path)
        self.names = list(observation_names)
        meta = {b"schema_version": str(self.version).encode(),
                b"observation_names": json.dumps(self.names).encode()}
        self.schema = self.schema.with_metadata(meta)
        self.flush_rows = flush_rows
        self._rows: list[dict[str, Any]] = []
        if self.path.exists() and not self.path.is_dir():
            raise DataError(f"{self.path}: expected a log database folder of Parquet parts, found a file; "
                            "move it away or choose another run folder")
        self.path.mkdir(parents=True, exist_ok=True)
        self._check_existing()

    def _check_existing(self) -> None:
        parts = sorted(self.path.glob("part-*.parquet"))
        if not parts:
            return
        existing = pq.read_schema(parts[0])
        meta = existing.metadata or {}
        version = meta.get(b"schema_version", b"?").decode()
        names = json.loads(meta.get(b"observation_names", b"[]"))
        if version != str(self.version) or not existing.remove_metadata().equals(self.schema.remove_metadata()):
            raise DataError(
                f"{self.path}: the existing log database has schema version {version} with columns "
                f"{existing.names}, which does not match assets/log_schema.json (version {self.version}); "
                "write to a new run folder or convert the old logs"
            )
        if names != self.names:
            raise DataError(f"{self.path}: existing rows were logged with other observation names "
                            f"({len(names)} features); write to a new run folder")

    def append(self, row: dict[str, Any]) -> None:
        missing = [n for n in self.schema.names if n not in row]
        unknown = [k for k in row if k not in self.schema.names]
        if missing or unknown:
            raise DataError(f"log row: missing columns {missing}, unknown columns {unknown} "
                            "(see assets/log_schema.json)")
        self._rows.append(row)
        if len(self._rows) >= self.flush_rows:
            self.flush()

    def flush(self) -> None:
        """Write buffered rows as a new part file (atomic rename)."""
        if not self._rows:
            return
        table = pa.Table.from_pylist(self._rows, schema=self.schema)
        # time first: part files sort chronologically; the uuid keeps parallel writers apart
        name = f"part-{time.time_ns():020d}-{uuid.uuid4().hex[:8]}.parquet"
        tmp = self.path / f".{name}.tmp"
        pq.write_table(table, tmp)
        os.replace(tmp, self.path / name)
        self._rows = []

    def close(self) -> None:
        self.flush()


def read_log_db(path: str | Path) -> pa.Table:
    """All complete rows of a log database (works while a writer is still appending)."""
    p = Path(path)
    parts = sorted(p.glob("part-*.parquet")) if p.is_dir() else [p]
    if not parts or not parts[0].exists():
        raise DataError(f"{p}: no log database here (expected part-*.parquet files)")
    return pa.concat_tables([pq.read_table(x) for x in parts])
