"""Quantum checkpoint store: compact, checksummed, pickle-free ``cp_{step}.ptz`` files.

- :func:`save` / :func:`load` / :func:`read_manifest` / :func:`verify` work on one file.
- :class:`CheckpointStore` manages a run's directory: background writes with measured
  blocking time, retention of the newest ``keep`` (>= 2) files, the newest intact checkpoint,
  and the run's ``seed_manifest.json``.

Lossless mode groups bytes by position and compresses each chunk with zstd (see
:mod:`stso_env.cp.codec`); ``quantize="bf16"`` / ``"int8"`` store Adam moments lossily (see
:mod:`stso_env.cp.quant`). Loading parses JSON and raw bytes only and never runs code from
the file.
"""

from stso_env.cp.codec import DEFAULT_LEVEL
from stso_env.cp.format import (
    DEFAULT_CHUNK_BYTES,
    FORMAT_NAME,
    FORMAT_VERSION,
    MAGIC,
    MIN_CHUNK_BYTES,
    PREFIX_BYTES,
    SCHEMA_VERSION,
    load,
    read_manifest,
    save,
    verify,
)
from stso_env.cp.quant import INT8_BLOCK, MOMENT_KEYS, QUANTIZE_MODES
from stso_env.cp.store import (
    CHECKPOINT_PREFIX,
    CHECKPOINT_SUFFIX,
    MIN_KEEP,
    SEED_MANIFEST_NAME,
    CheckpointStore,
    checkpoint_path,
    remove_stale_temp_files,
)
from stso_env.errors import CheckpointCorruptError, CheckpointError

__all__ = [
    "CHECKPOINT_PREFIX",
    "CHECKPOINT_SUFFIX",
    "DEFAULT_CHUNK_BYTES",
    "DEFAULT_LEVEL",
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "INT8_BLOCK",
    "MAGIC",
    "MIN_CHUNK_BYTES",
    "MIN_KEEP",
    "MOMENT_KEYS",
    "PREFIX_BYTES",
    "QUANTIZE_MODES",
    "SCHEMA_VERSION",
    "SEED_MANIFEST_NAME",
    "CheckpointCorruptError",
    "CheckpointError",
    "CheckpointStore",
    "checkpoint_path",
    "load",
    "read_manifest",
    "remove_stale_temp_files",
    "save",
    "verify",
]
