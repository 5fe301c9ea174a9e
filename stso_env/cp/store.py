"""A directory of ``cp_{step}.ptz`` checkpoints with retention and a background writer.

Habits borrowed from torchtitan's checkpointer: keep at least two checkpoints (the newest
can be damaged by a crash mid-write or a full disk), delete old ones only after the new one
is durably in place, and measure how long the training thread is blocked per save.
"""

from __future__ import annotations

import json
import os
import re
import threading
import time
import warnings
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

from stso_env.cp import codec, quant
from stso_env.cp import format as container
from stso_env.cp.writer import DEFAULT_WRITER_NICE, BackgroundWriter
from stso_env.errors import CheckpointCorruptError, CheckpointError, ConfigError

if TYPE_CHECKING:
    from typing_extensions import Self

#: Checkpoint file names are ``cp_{step}.ptz``.
CHECKPOINT_PREFIX = "cp_"
CHECKPOINT_SUFFIX = ".ptz"
#: Seed manifest written next to the checkpoints by :meth:`CheckpointStore.write_seed_manifest`.
SEED_MANIFEST_NAME = "seed_manifest.json"
#: Fewest checkpoints a store keeps.
MIN_KEEP = 2

_CP_RE = re.compile(rf"^{CHECKPOINT_PREFIX}(0|[1-9][0-9]*){re.escape(CHECKPOINT_SUFFIX)}$")


def checkpoint_path(directory: str | os.PathLike, step: int) -> Path:
    """``directory / f"cp_{step}.ptz"``."""
    return Path(directory) / f"{CHECKPOINT_PREFIX}{step}{CHECKPOINT_SUFFIX}"


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    if os.name != "posix":
        return True  # cannot probe safely: leave other processes' files alone
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temp_files(directory: str | os.PathLike) -> list[Path]:
    """Delete temp files left by interrupted writes in ``directory``; returns what was removed.

    A temp file is stale when the process named in it is gone, or when it is this process's
    and no write of this process is using it. Temp files of live processes (another store
    writing into the same directory) are left alone.
    """
    removed = []
    directory = Path(directory)
    for entry in directory.iterdir():
        m = container.TMP_RE.match(entry.name)
        if m is None or not entry.is_file():
            continue
        pid = int(m.group("pid"))
        stale = not container.is_active_temp(entry) if pid == os.getpid() else not _pid_alive(pid)
        if stale:
            try:
                entry.unlink()
                removed.append(entry)
            except FileNotFoundError:
                pass
    return removed


class CheckpointStore:
    """Saves, lists, prunes and loads the checkpoints of one run directory.

    Args:
        directory: where ``cp_{step}.ptz`` files live (created if missing).
        keep: how many checkpoints to retain (>= 2).
        async_write: snapshot on the calling thread, write on a background thread.
        quantize: ``"none"`` (lossless), ``"bf16"`` or ``"int8"`` for Adam moments.
        level: zstd level (1 is fastest and smallest on fp32 weights).
        chunk_bytes: raw bytes per independently decodable chunk.
        config_hash: recorded in every manifest to tie checkpoints to their configuration.
        writer_nice: niceness increment of the writer thread (Linux; None leaves it alone),
            so background compression yields the cores to training.

    Example::

        with CheckpointStore("runs/a/checkpoints") as store:
            blocked = store.save(step, {"model": model.state_dict(), "optim": opt.state_dict()})
            state = store.load()  # newest intact checkpoint
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        *,
        keep: int = MIN_KEEP,
        async_write: bool = True,
        quantize: str = "none",
        level: int = codec.DEFAULT_LEVEL,
        chunk_bytes: int = container.DEFAULT_CHUNK_BYTES,
        config_hash: str | None = None,
        writer_nice: int | None = DEFAULT_WRITER_NICE,
    ) -> None:
        if isinstance(keep, bool) or not isinstance(keep, int) or keep < MIN_KEEP:
            raise ConfigError(
                f"keep={keep!r}: a checkpoint store keeps at least {MIN_KEEP} checkpoints, because the newest "
                f"can be lost to a crash or a full disk while it is written; pass keep>={MIN_KEEP}"
            )
        if quantize not in quant.QUANTIZE_MODES:
            raise ConfigError(f"quantize={quantize!r} is unknown; use one of {quant.QUANTIZE_MODES}")
        if config_hash is not None and not isinstance(config_hash, str):
            raise ConfigError(f"config_hash must be a str or None, got {type(config_hash).__name__}")
        try:
            container.check_options(quantize, level, chunk_bytes)
        except CheckpointError as err:
            raise ConfigError(str(err)) from None
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.keep = keep
        self.async_write = async_write
        self.quantize = quantize
        self.level = level
        self.chunk_bytes = chunk_bytes
        self.config_hash = config_hash
        self.removed_temp_files = remove_stale_temp_files(self.directory)
        self._writer = BackgroundWriter(nice=writer_nice) if async_write else None
        self._staging = container.StagingBuffers() if async_write else None
        self._snapshot: tuple[threading.Event, list[BaseException]] | None = None
        self._stats_lock = threading.Lock()
        self._closed = False
        #: Seconds the caller of the last :meth:`save` was blocked.
        self.last_blocking_seconds = 0.0
        #: Seconds the last completed write took (encode, compress, write, fsync, rename).
        self.last_write_seconds = 0.0
        #: Size in bytes of the last written checkpoint.
        self.last_bytes = 0
        self.total_blocking_seconds = 0.0
        self.total_write_seconds = 0.0
        self.total_bytes = 0
        #: Number of :meth:`save` calls accepted.
        self.n_saves = 0
        #: Number of writes completed.
        self.n_written = 0

    # -- saving --------------------------------------------------------------------------------

    def save(self, step: int, state: dict, *, extras: dict | None = None, overlap: bool = False) -> float:
        """Checkpoint ``state`` as step ``step``; returns the seconds the caller was blocked.

        In async mode the caller waits for the previous write (if still running), copies every
        tensor into reusable CPU buffers and returns; compression and writing run on the
        writer thread. In sync mode everything happens here. An error of an earlier background
        write is raised here (and this save is not started).

        Args:
            step: training step (non-negative int); the file is ``cp_{step}.ptz``.
            state: the state tree (see :func:`stso_env.cp.save` for supported types).
            extras: small JSON-like metadata stored in the manifest.
            overlap: (async mode) copy the tensors on a helper thread while the caller goes
                on, CheckFreq-style (Mohan et al., FAST 2021): the caller may read ``state``
                (a forward/backward pass) but must call :meth:`barrier` before it changes any
                tensor or array in it (an optimizer step); the barrier's wait counts as
                blocking time. Python scalars are captured at once.
        """
        if self._closed:
            raise CheckpointError(f"{self.directory}: the checkpoint store is closed")
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise CheckpointError(f"step must be a non-negative int, got {step!r}")
        t0 = time.perf_counter()
        path = self.path(step)
        if self._writer is not None:
            self.barrier()
            self._writer.wait()
            if overlap:
                flat = container.flatten(state, copy=False, extras=extras)
                done, errors = threading.Event(), []
                staging = self._staging

                def snapshot() -> None:
                    try:
                        container.stage(flat, staging)
                    except BaseException as exc:  # surfaced by barrier() and by the write job
                        errors.append(exc)
                    finally:
                        done.set()

                threading.Thread(target=snapshot, name="stso-cp-snapshot", daemon=True).start()
                self._snapshot = (done, errors)

                def write_after_snapshot() -> None:
                    done.wait()
                    if errors:
                        raise errors[0]
                    self._write(step, flat)

                self._writer.submit(write_after_snapshot, label=str(path))
            else:
                flat = container.flatten(state, copy=True, staging=self._staging, extras=extras)
                self._writer.submit(lambda: self._write(step, flat), label=str(path))
        else:
            flat = container.flatten(state, copy=False, extras=extras)
            self._write(step, flat)
        blocked = time.perf_counter() - t0
        with self._stats_lock:
            self.last_blocking_seconds = blocked
            self.total_blocking_seconds += blocked
            self.n_saves += 1
        return blocked

    def _write(self, step: int, flat: container.FlatState) -> None:
        t0 = time.perf_counter()
        size = container.write_flat(
            self.path(step),
            flat,
            step=step,
            quantize=self.quantize,
            level=self.level,
            chunk_bytes=self.chunk_bytes,
            config_hash=self.config_hash,
        )
        self._prune(protect=step)
        elapsed = time.perf_counter() - t0
        with self._stats_lock:
            self.last_write_seconds = elapsed
            self.total_write_seconds += elapsed
            self.last_bytes = size
            self.total_bytes += size
            self.n_written += 1

    def _prune(self, protect: int) -> None:
        # The checkpoint just written is never deleted, even if older checkpoints have higher
        # steps (a run resumed from an earlier step): keep it plus the keep-1 newest others.
        others = [s for s in self._steps_on_disk() if s != protect]
        for step in others[: max(0, len(others) - (self.keep - 1))]:
            try:
                self.path(step).unlink()
            except FileNotFoundError:
                pass
        container.fsync_directory(self.directory)

    def barrier(self) -> float:
        """Wait until an overlapped snapshot has copied the state; returns the seconds waited.

        Call it before changing any tensor or array of the state last passed to
        ``save(..., overlap=True)``. A no-op when no overlapped snapshot is in flight.
        """
        snap = self._snapshot
        if snap is None:
            return 0.0
        t0 = time.perf_counter()
        snap[0].wait()
        self._snapshot = None
        waited = time.perf_counter() - t0
        with self._stats_lock:
            self.last_blocking_seconds += waited
            self.total_blocking_seconds += waited
        if snap[1]:
            raise CheckpointError(f"{self.directory}: snapshot copy failed: {snap[1][0]!r}") from snap[1][0]
        return waited

    def wait(self) -> None:
        """Block until pending writes are on disk; re-raise a background write error."""
        self.barrier()
        if self._writer is not None:
            self._writer.wait()

    def close(self) -> None:
        """Flush pending writes (re-raising their errors) and stop the writer thread."""
        if self._closed:
            return
        self._closed = True
        try:
            self.barrier()
            if self._writer is not None:
                self._writer.close()
        finally:
            if self._staging is not None:
                self._staging.clear()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # -- queries -------------------------------------------------------------------------------

    def path(self, step: int) -> Path:
        """File of checkpoint ``step`` (whether or not it exists)."""
        return checkpoint_path(self.directory, step)

    def _steps_on_disk(self) -> list[int]:
        steps = []
        for entry in self.directory.iterdir():
            m = _CP_RE.match(entry.name)
            if m is not None:
                steps.append(int(m.group(1)))
        return sorted(steps)

    def list(self) -> list[int]:
        """Steps with a checkpoint file, ascending (waits for pending writes first)."""
        self.wait()
        return self._steps_on_disk()

    def latest(self) -> int | None:
        """Highest step with a checkpoint file, without checking it; None if there is none."""
        steps = self.list()
        return steps[-1] if steps else None

    def latest_intact(self) -> int | None:
        """Highest step whose file passes every checksum; damaged newer files are skipped.

        Each skipped file is reported with ``warnings.warn`` (and left on disk for inspection).
        """
        for step in reversed(self.list()):
            try:
                container.verify(self.path(step))
            except CheckpointCorruptError as err:
                warnings.warn(f"skipping damaged checkpoint: {err}", RuntimeWarning, stacklevel=2)
                continue
            return step
        return None

    def load(self, step: int | None = None, *, verify: bool = True) -> dict:
        """Load checkpoint ``step``, or the newest intact one when ``step`` is None.

        Raises:
            CheckpointError: no such step, or no intact checkpoint at all.
            CheckpointCorruptError: the requested ``step`` is damaged.
        """
        steps = self.list()
        if step is not None:
            if step not in steps:
                raise CheckpointError(f"{self.path(step)}: no checkpoint for step {step}; present: {steps}")
            return container.load(self.path(step), verify=verify)
        for candidate in reversed(steps):
            try:
                return container.load(self.path(candidate), verify=verify)
            except CheckpointCorruptError as err:
                warnings.warn(f"skipping damaged checkpoint: {err}", RuntimeWarning, stacklevel=2)
        raise CheckpointError(f"{self.directory}: no intact checkpoint (found steps {steps})")

    def read_manifest(self, step: int) -> dict:
        """Manifest of checkpoint ``step`` (extras included) without reading chunk data."""
        self.wait()
        return container.read_manifest(self.path(step))

    # -- seed manifest -------------------------------------------------------------------------

    @property
    def seed_manifest_path(self) -> Path:
        """``directory / "seed_manifest.json"``."""
        return self.directory / SEED_MANIFEST_NAME

    def write_seed_manifest(self, manifest: dict[str, Any]) -> Path:
        """Atomically write ``seed_manifest.json`` (the seeds a run was started with)."""
        if not isinstance(manifest, dict):
            raise CheckpointError(f"the seed manifest must be a dict, got {type(manifest).__name__}")
        try:
            text = json.dumps(manifest, indent=2, sort_keys=True, allow_nan=False) + "\n"
        except (TypeError, ValueError) as err:
            raise CheckpointError(f"the seed manifest is not plain JSON: {err}") from err
        path = self.seed_manifest_path
        try:
            container.atomic_write(path, lambda f: f.write(text.encode("utf-8")))
        except OSError as err:
            raise CheckpointError(f"{path}: cannot write seed manifest: {err}") from err
        return path

    def read_seed_manifest(self) -> dict[str, Any] | None:
        """The seed manifest, or None if none was written."""
        path = self.seed_manifest_path
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return None
        try:
            data = json.loads(text)
        except ValueError as err:
            raise CheckpointCorruptError(f"{path}: not valid JSON: {err}") from err
        if not isinstance(data, dict):
            raise CheckpointCorruptError(f"{path}: expected a JSON object")
        return data

    # -- statistics ----------------------------------------------------------------------------

    def stats(self) -> dict[str, float]:
        """Timing and size counters, for benchmarks and logs."""
        with self._stats_lock:
            return {
                "last_blocking_seconds": self.last_blocking_seconds,
                "last_write_seconds": self.last_write_seconds,
                "last_bytes": self.last_bytes,
                "total_blocking_seconds": self.total_blocking_seconds,
                "total_write_seconds": self.total_write_seconds,
                "total_bytes": self.total_bytes,
                "n_saves": self.n_saves,
                "n_written": self.n_written,
            }

    def __repr__(self) -> str:
        mode = "async" if self.async_write else "sync"
        return (
            f"CheckpointStore({str(self.directory)!r}, keep={self.keep}, {mode}, quantize={self.quantize!r})"
        )
