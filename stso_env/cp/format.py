"""The ``cp_{step}.ptz`` container: a JSON manifest plus checksummed, compressed chunks.

Layout (all integers little-endian)::

    offset 0   prefix, 64 bytes: magic (8) | container version u16 | flags u16 (0)
               | header offset u64 | header length u64 | sha256 of the header (32) | 4 zero bytes
    offset 64  chunk bytes, back to back
    header     UTF-8 JSON manifest, the last bytes of the file

The manifest is written after the chunks so a writer streams chunks to disk as it compresses
them and never holds a second copy of the state in memory; the fixed prefix points at it, so
:func:`read_manifest` still reads only the prefix and the manifest. The prefix is written
last, so an interrupted write never has a valid magic. Every byte of a file is covered by a
check: prefix fields are validated against the file size, the manifest carries its sha256 in
the prefix, and every chunk's sha256 is in the manifest.

The manifest holds the state tree as JSON with placeholders for arrays, and per array its
dtype, shape, encoding and chunks. Loading parses JSON and copies raw bytes into tensors; it
never unpickles and never looks up a name given by the file outside fixed whitelists, so a
file cannot make the loader run code.
"""

from __future__ import annotations

import collections
import hashlib
import itertools
import json
import math
import os
import re
import struct
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch

from stso_env.cp import codec, quant
from stso_env.errors import CheckpointCorruptError, CheckpointError

#: First bytes of every checkpoint. The 0x89 lead byte differs from a pickle (0x80) and from
#: a zip archive such as ``torch.save`` output ("PK"); the newline catches text-mode copies.
MAGIC = b"\x89STSOCP\n"
#: Binary layout version of the prefix; bumped only when the layout above changes.
FORMAT_VERSION = 1
#: Version of the manifest's JSON schema.
SCHEMA_VERSION = 1
#: ``format`` field of the manifest.
FORMAT_NAME = "stso-quantum-checkpoint"
#: Default raw bytes per chunk; large enough that zstd and sha256 run at full speed,
#: small enough that a damaged chunk names a small region.
DEFAULT_CHUNK_BYTES = 4 << 20
#: Smallest chunk size accepted (must hold the widest element, complex128).
MIN_CHUNK_BYTES = 64

_PREFIX = struct.Struct("<8sHHQQ32s4x")
PREFIX_BYTES = _PREFIX.size

_INT_DTYPES = ("uint8", "int8", "int16", "int32", "int64", "uint16", "uint32", "uint64")
_FLOAT_DTYPES = ("float16", "bfloat16", "float32", "float64", "float8_e4m3fn", "float8_e5m2")
_TORCH_DTYPE_NAMES = ("bool", *_INT_DTYPES, *_FLOAT_DTYPES, "complex64", "complex128")
# Names are resolved through this table only: a manifest can never name an arbitrary
# attribute of the torch module.
TORCH_DTYPES: dict[str, torch.dtype] = {
    name: getattr(torch, name)
    for name in _TORCH_DTYPE_NAMES
    if isinstance(getattr(torch, name, None), torch.dtype)
}
_TORCH_DTYPE_TO_NAME = {dt: name for name, dt in TORCH_DTYPES.items()}
_NUMPY_DTYPE_RE = re.compile(r"^[<>|=][biufc][0-9]{1,2}$")
_SHA_RE = re.compile(r"^[0-9a-f]{64}$")

_TAG = "$"
_KIND_TORCH = "torch"
_KIND_NUMPY = "numpy"


# ---------------------------------------------------------------------------------------------
# Flattening a state tree into JSON plus array leaves
# ---------------------------------------------------------------------------------------------


@dataclass
class Leaf:
    """One array of a flattened state: stored once however often the tree refers to it."""

    name: str
    kind: str  # "torch" or "numpy"
    value: torch.Tensor | np.ndarray
    role: str | None  # "m"/"v" when stored under an Adam moment key, else None
    aliases: list[str] = field(default_factory=list)


@dataclass
class FlatState:
    """A state tree as JSON-ready data plus its array leaves, detached from the caller's objects."""

    tree: Any
    leaves: list[Leaf]
    extras: Any = None

    @property
    def raw_bytes(self) -> int:
        """Uncompressed size of all leaves."""
        return sum(_nbytes(leaf.value) for leaf in self.leaves)


def _nbytes(value: torch.Tensor | np.ndarray) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    return int(value.nbytes)


def _copy_into(dst: torch.Tensor, src: torch.Tensor) -> None:
    """``dst.copy_(src)``, done as one single-threaded memcpy when possible.

    torch's copy is OpenMP-parallel; on a machine whose cores are busy (training, the
    background writer, other jobs) its threads wait on each other: a 130 MB snapshot took
    0.9 s with ``copy_`` and 20 ms with numpy's plain memcpy on 2 busy cores here.
    """
    plain = (
        src.device.type == "cpu"
        and src.dtype == dst.dtype
        and src.is_contiguous()
        and not src.is_conj()
        and not src.is_neg()
        and src.numel() > 0
    )
    if plain:
        np.copyto(dst.reshape(-1).view(torch.uint8).numpy(), src.reshape(-1).view(torch.uint8).numpy())
    else:
        dst.copy_(src)


class StagingBuffers:
    """CPU buffers reused from one snapshot to the next.

    Copying into memory that is already mapped runs at memcpy speed; a fresh allocation
    first faults in every page, which is what makes a snapshot slow (130 MB here: 40 ms
    fresh vs 6-20 ms reused on an idle machine, up to 0.5 s fresh when the cores are busy).
    The buffers are only reused after the write that read them has finished.
    """

    def __init__(self) -> None:
        self._buffers: list[torch.Tensor | np.ndarray] = []
        self._next: list[torch.Tensor | np.ndarray] = []

    def tensor_like(self, src: torch.Tensor) -> torch.Tensor:
        """A contiguous CPU tensor holding a copy of ``src``."""
        idx = len(self._next)
        old = self._buffers[idx] if idx < len(self._buffers) else None
        if isinstance(old, torch.Tensor) and old.dtype == src.dtype and old.shape == src.shape:
            dst = old
        else:
            dst = torch.empty(src.shape, dtype=src.dtype, device="cpu")
        _copy_into(dst, src.detach())
        self._next.append(dst)
        return dst

    def array_like(self, src: np.ndarray) -> np.ndarray:
        """A C-contiguous copy of ``src``."""
        idx = len(self._next)
        old = self._buffers[idx] if idx < len(self._buffers) else None
        if isinstance(old, np.ndarray) and old.dtype == src.dtype and old.shape == src.shape:
            dst = old
            np.copyto(dst, src)
        else:
            dst = np.array(src, order="C", copy=True)
        self._next.append(dst)
        return dst

    def commit(self) -> None:
        """End a snapshot: keep exactly the buffers it used for the next one."""
        self._buffers, self._next = self._next, []

    def clear(self) -> None:
        """Release all buffers."""
        self._buffers, self._next = [], []


def stage(flat: FlatState, staging: StagingBuffers) -> None:
    """Replace every leaf of ``flat`` (flattened with ``copy=False``) by a copy in ``staging``.

    Used by overlapped snapshots: the copy runs on another thread while the caller
    keeps computing, as long as it changes none of the referenced arrays meanwhile.
    """
    try:
        for leaf in flat.leaves:
            if isinstance(leaf.value, torch.Tensor):
                leaf.value = staging.tensor_like(leaf.value)
            else:
                leaf.value = staging.array_like(leaf.value)
    finally:
        staging.commit()


class _Flattener:
    """Turns a state tree into JSON-ready data, collecting (and deduplicating) arrays."""

    def __init__(self, copy: bool, staging: StagingBuffers | None, allow_arrays: bool, what: str) -> None:
        self.copy = copy
        self.staging = staging
        self.allow_arrays = allow_arrays
        self.what = what
        self.leaves: list[Leaf] = []
        self._index: dict[tuple, int] = {}
        self._open: set[int] = set()

    def _fail(self, path: str, message: str) -> CheckpointError:
        where = f"'{path}'" if path else "the top level"
        return CheckpointError(f"cannot store {self.what}: {where} {message}")

    @contextmanager
    def _enter(self, obj: Any, path: str) -> Iterator[None]:
        # A container that contains itself would recurse forever; name where it happens.
        if id(obj) in self._open:
            raise self._fail(path, f"refers back to a {type(obj).__name__} that contains it (a cycle)")
        self._open.add(id(obj))
        try:
            yield
        finally:
            self._open.discard(id(obj))

    def encode(self, obj: Any, path: str = "", role: str | None = None) -> Any:
        if obj is None or isinstance(obj, bool):
            return obj
        if isinstance(obj, torch.Tensor):
            return self._tensor(obj, path, role)
        if isinstance(obj, np.ndarray):
            return self._array(obj, path)
        if isinstance(obj, np.generic):
            return self._np_scalar(obj, path)
        if isinstance(obj, int):
            return int(obj)
        if isinstance(obj, float):
            value = float(obj)
            if math.isfinite(value):
                # json writes float.__repr__, which round-trips every finite double exactly.
                return value
            return {_TAG: "float", "hex": struct.pack(">d", value).hex()}
        if isinstance(obj, str):
            return str(obj)
        if isinstance(obj, (bytes, bytearray)):
            return {_TAG: type(obj).__name__, "hex": bytes(obj).hex()}
        if isinstance(obj, dict):
            return self._dict(obj, path)
        if isinstance(obj, list):
            with self._enter(obj, path):
                return [self.encode(v, f"{path}/{i}" if path else str(i)) for i, v in enumerate(obj)]
        if isinstance(obj, tuple):
            with self._enter(obj, path):
                items = [self.encode(v, f"{path}/{i}" if path else str(i)) for i, v in enumerate(obj)]
            return {_TAG: "tuple", "items": items}
        raise self._fail(
            path,
            f"holds a {type(obj).__module__}.{type(obj).__qualname__}; supported are dict, list, tuple, str, "
            "int, float, bool, None, bytes, torch.Tensor, numpy.ndarray and numpy scalars",
        )

    def _key(self, key: Any, path: str) -> Any:
        if isinstance(key, tuple):
            return {_TAG: "tuple", "items": [self._key(k, path) for k in key]}
        if key is None or isinstance(key, (bool, int, float, str, np.generic)):
            return self.encode(key, path)
        raise self._fail(
            path,
            f"has a dict key of type {type(key).__name__}; keys must be str, int, float, "
            "bool, None, numpy scalars or tuples of those",
        )

    def _dict(self, obj: dict, path: str) -> Any:
        with self._enter(obj, path):
            node: dict[str, Any] = {_TAG: "dict"}
            entries = []
            for key, value in obj.items():
                child = f"{path}/{key}" if path else str(key)
                role = quant.MOMENT_KEYS.get(key) if isinstance(key, str) else None
                entries.append((key, self.encode(value, child, role)))
            if all(type(k) is str for k, _ in entries):
                node["str"] = dict(entries)
            else:
                node["items"] = [[self._key(k, path), v] for k, v in entries]
            if isinstance(obj, collections.OrderedDict):
                node["ordered"] = True
                # nn.Module.state_dict() attaches per-module versions that load_state_dict
                # consults; torch.save keeps them, so do we.
                meta = getattr(obj, "_metadata", None)
                if isinstance(meta, dict):
                    node["metadata"] = self.encode(meta, f"{path}/<_metadata>")
            return node

    def _no_arrays(self, path: str, obj: Any) -> None:
        if not self.allow_arrays:
            raise self._fail(
                path, f"holds a {type(obj).__name__}; only small JSON-like values are allowed here"
            )

    def _tensor(self, t: torch.Tensor, path: str, role: str | None) -> Any:
        self._no_arrays(path, t)
        if t.layout != torch.strided:
            raise self._fail(path, f"is a {t.layout} tensor; only dense (strided) tensors can be stored")
        if t.device.type == "meta":
            raise self._fail(path, "is a meta tensor and has no data")
        if t.dtype not in _TORCH_DTYPE_TO_NAME:
            raise self._fail(path, f"has dtype {t.dtype}, which the checkpoint format does not support")
        key = None
        if t.numel() > 0:
            # Identical views of one storage (tied weights) are stored once.
            key = (
                _KIND_TORCH,
                t.device,
                t.untyped_storage().data_ptr(),
                t.storage_offset(),
                tuple(t.shape),
                t.stride(),
                t.dtype,
            )
        idx = self._index.get(key) if key is not None else None
        if idx is not None:
            leaf = self.leaves[idx]
            leaf.aliases.append(path)
            if leaf.role != role:
                leaf.role = None  # shared with a non-moment: keep it exact
            return {_TAG: "tensor", "id": idx}
        if self.copy:
            value = (
                self.staging.tensor_like(t) if self.staging is not None else t.detach().to("cpu", copy=True)
            )
        else:
            value = t.detach().to("cpu")
        return self._add(Leaf(path or "<root>", _KIND_TORCH, value, role), key, "tensor")

    def _array(self, a: np.ndarray, path: str) -> Any:
        self._no_arrays(path, a)
        if a.dtype.kind not in "biufc" or a.dtype.fields is not None or a.dtype.hasobject:
            raise self._fail(
                path,
                f"is a numpy array of dtype {a.dtype}; only bool/int/uint/float/complex "
                "arrays can be stored (object arrays would need pickle)",
            )
        key = None
        if a.size > 0:
            key = (_KIND_NUMPY, a.__array_interface__["data"][0], a.shape, a.strides, a.dtype.str)
        idx = self._index.get(key) if key is not None else None
        if idx is not None:
            self.leaves[idx].aliases.append(path)
            return {_TAG: "ndarray", "id": idx}
        if self.copy:
            value = (
                self.staging.array_like(a) if self.staging is not None else np.array(a, order="C", copy=True)
            )
        else:
            value = np.ascontiguousarray(a)
        return self._add(Leaf(path or "<root>", _KIND_NUMPY, value, None), key, "ndarray")

    def _add(self, leaf: Leaf, key: tuple | None, tag: str) -> Any:
        idx = len(self.leaves)
        self.leaves.append(leaf)
        if key is not None:
            self._index[key] = idx
        return {_TAG: tag, "id": idx}

    def _np_scalar(self, x: np.generic, path: str) -> Any:
        dt = x.dtype
        if dt.kind not in "biufc":
            raise self._fail(path, f"is a numpy scalar of dtype {dt}, which cannot be stored without pickle")
        return {_TAG: "npscalar", "dtype": dt.str, "hex": x.tobytes().hex()}


def flatten(
    state: Any, *, copy: bool, staging: StagingBuffers | None = None, extras: dict | None = None
) -> FlatState:
    """Flatten a state tree (and optional ``extras``) for writing.

    Args:
        state: nested dict/list/tuple/scalars/tensors/arrays.
        copy: copy every array into CPU memory now, so the caller may change ``state``
            while a background thread writes the snapshot. Without it, CPU arrays are
            referenced as they are (and GPU tensors are copied to CPU).
        staging: reusable copy buffers (only with ``copy``).
        extras: small JSON-like metadata to store in the manifest.

    Raises:
        CheckpointError: an unsupported type, naming where it sits in the tree.
    """
    flat = _Flattener(copy, staging, allow_arrays=True, what="state")
    try:
        tree = flat.encode(state)
        encoded_extras = None
        if extras is not None:
            if not isinstance(extras, dict):
                raise CheckpointError(f"extras must be a dict, got {type(extras).__name__}")
            encoded_extras = _Flattener(False, None, allow_arrays=False, what="extras").encode(extras)
    finally:
        if staging is not None:
            staging.commit()
    return FlatState(tree=tree, leaves=flat.leaves, extras=encoded_extras)


# ---------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------

_tmp_counter = itertools.count()
_active_tmp_lock = threading.Lock()
_active_tmp: set[str] = set()

TMP_RE = re.compile(r"^\.(?P<target>.+)\.tmp-(?P<pid>\d+)-(?P<n>\d+)$")


def temp_path_for(path: Path) -> Path:
    """A fresh temp name next to ``path`` (hidden, and never matching ``cp_{step}.ptz``)."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}-{next(_tmp_counter)}")


def is_active_temp(path: Path) -> bool:
    """Whether this process is writing ``path`` right now."""
    with _active_tmp_lock:
        return str(path) in _active_tmp


def fsync_directory(directory: Path) -> None:
    """Make a rename inside ``directory`` durable (no-op where directories cannot be opened)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: Path, write: Callable[[BinaryIO], None]) -> None:
    """Write ``path`` so that readers see either the old file or the complete new one.

    ``write`` fills a temp file in the same directory; the temp file is fsynced, renamed over
    ``path`` and the directory fsynced. On any error the temp file is removed and ``path``
    is left as it was.
    """
    path = Path(path)
    tmp = temp_path_for(path)
    with _active_tmp_lock:
        _active_tmp.add(str(tmp))
    try:
        with open(tmp, "xb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_directory(path.parent)
    except BaseException:
        try:
            tmp.unlink()
        except FileNotFoundError:
            pass
        raise
    finally:
        with _active_tmp_lock:
            _active_tmp.discard(str(tmp))


def _width(dtype_itemsize: int, is_complex: bool) -> int:
    # Complex numbers are pairs of floats: group by the float's bytes.
    return dtype_itemsize // 2 if is_complex else dtype_itemsize


def _encode_leaf(leaf: Leaf, quantize: str) -> tuple[dict, list[quant.Part]]:
    value = leaf.value
    if isinstance(value, torch.Tensor):
        entry = {
            "name": leaf.name,
            "kind": _KIND_TORCH,
            "dtype": _TORCH_DTYPE_TO_NAME[value.dtype],
            "shape": list(value.shape),
        }
        if quant.eligible(value, leaf.role, quantize):
            encoding, parts = quant.encode_moment(value, leaf.role, quantize)  # type: ignore[arg-type]
        else:
            t = value.resolve_conj().resolve_neg().contiguous()
            data = t.reshape(-1).view(torch.uint8).numpy() if t.numel() else np.empty(0, np.uint8)
            encoding = quant.ENC_GROUPED
            parts = [("data", _width(t.element_size(), t.is_complex()), data)]
    else:
        a = np.ascontiguousarray(value)
        entry = {"name": leaf.name, "kind": _KIND_NUMPY, "dtype": a.dtype.str, "shape": list(a.shape)}
        data = a.reshape(-1).view(np.uint8)
        encoding = quant.ENC_GROUPED
        parts = [("data", _width(a.dtype.itemsize, a.dtype.kind == "c"), data)]
    entry["encoding"] = encoding
    if leaf.aliases:
        entry["aliases"] = list(leaf.aliases)
    return entry, parts


def check_options(quantize: str, level: int, chunk_bytes: int) -> None:
    """Raise CheckpointError unless the quantize mode, zstd level and chunk size are usable."""
    if quantize not in quant.QUANTIZE_MODES:
        raise CheckpointError(f"quantize={quantize!r} is unknown; use one of {quant.QUANTIZE_MODES}")
    if (
        isinstance(level, bool)
        or not isinstance(level, int)
        or not codec.MIN_LEVEL <= level <= codec.MAX_LEVEL
    ):
        raise CheckpointError(
            f"level={level!r} is not a zstd level in [{codec.MIN_LEVEL}, {codec.MAX_LEVEL}]; "
            f"{codec.DEFAULT_LEVEL} is fastest and smallest on fp32"
        )
    if isinstance(chunk_bytes, bool) or not isinstance(chunk_bytes, int) or chunk_bytes < MIN_CHUNK_BYTES:
        raise CheckpointError(f"chunk_bytes={chunk_bytes!r} must be an int >= {MIN_CHUNK_BYTES}")


def write_flat(
    path: str | os.PathLike,
    flat: FlatState,
    *,
    step: int | None = None,
    quantize: str = "none",
    level: int = codec.DEFAULT_LEVEL,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    config_hash: str | None = None,
) -> int:
    """Encode, compress and atomically write a flattened state; returns the file size."""
    check_options(quantize, level, chunk_bytes)
    path = Path(path)
    size = 0

    def write(f: BinaryIO) -> None:
        nonlocal size
        f.write(bytes(PREFIX_BYTES))  # placeholder: no valid magic until the file is complete
        pos = PREFIX_BYTES
        entries = []
        raw_total = 0
        for leaf in flat.leaves:
            entry, parts = _encode_leaf(leaf, quantize)
            entry_parts = []
            for role, width, data in parts:
                chunks = []
                for start, end in codec.chunk_spans(data.nbytes, width, chunk_bytes):
                    pieces, planes = codec.encode_chunk(data[start:end], width, level)
                    digest = hashlib.sha256()
                    length = 0
                    for piece in pieces:
                        digest.update(piece)
                        f.write(piece)
                        length += len(piece)
                    chunks.append(
                        {
                            "offset": pos,
                            "length": length,
                            "raw": end - start,
                            "sha256": digest.hexdigest(),
                            "planes": planes,
                        }
                    )
                    pos += length
                entry_parts.append(
                    {"role": role, "width": width, "nbytes": int(data.nbytes), "chunks": chunks}
                )
                raw_total += int(data.nbytes)
            entry["parts"] = entry_parts
            entries.append(entry)
        manifest = {
            "schema_version": SCHEMA_VERSION,
            "format": FORMAT_NAME,
            "created_unix": time.time(),
            "step": step,
            "config_hash": config_hash,
            "quantize": quantize,
            "level": level,
            "chunk_bytes": chunk_bytes,
            "torch_version": torch.__version__,
            "data_bytes": pos - PREFIX_BYTES,
            "raw_bytes": raw_total,
            "extras": flat.extras,
            "tree": flat.tree,
            "tensors": entries,
        }
        header = json.dumps(manifest, separators=(",", ":"), allow_nan=False).encode("utf-8")
        f.write(header)
        f.seek(0)
        f.write(_PREFIX.pack(MAGIC, FORMAT_VERSION, 0, pos, len(header), hashlib.sha256(header).digest()))
        size = pos + len(header)

    try:
        atomic_write(path, write)
    except CheckpointError:
        raise
    except OSError as err:
        raise CheckpointError(f"{path}: cannot write checkpoint: {err}") from err
    return size


def save(
    state: Any,
    path: str | os.PathLike,
    *,
    step: int | None = None,
    quantize: str = "none",
    level: int = codec.DEFAULT_LEVEL,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    config_hash: str | None = None,
    extras: dict | None = None,
) -> int:
    """Write ``state`` to ``path`` atomically and synchronously.

    Args:
        state: nested dict/list/tuple of str, int, float, bool, None, bytes, tensors,
            numpy arrays and numpy scalars. Dict keys may be str, int, float, bool, None.
        path: destination file (conventionally ``cp_{step}.ptz``).
        step: training step recorded in the manifest.
        quantize: ``"none"`` (lossless), ``"bf16"`` or ``"int8"`` for Adam moments.
        level: zstd level.
        chunk_bytes: raw bytes per independently decodable chunk.
        config_hash: identifies the run configuration; recorded verbatim.
        extras: small JSON-like metadata returned by :func:`read_manifest`.

    Returns:
        The size of the written file in bytes.
    """
    check_options(quantize, level, chunk_bytes)
    flat = flatten(state, copy=False, extras=extras)
    return write_flat(
        path,
        flat,
        step=step,
        quantize=quantize,
        level=level,
        chunk_bytes=chunk_bytes,
        config_hash=config_hash,
    )


# ---------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------


class _Bad(Exception):
    """Internal: what is wrong with a file, before the path is attached."""


def _corrupt(path: Path, message: str) -> CheckpointCorruptError:
    return CheckpointCorruptError(f"{path}: {message}")


def _reject_constant(name: str) -> Any:
    raise _Bad(f"header contains the non-JSON constant {name}")


@dataclass
class _Header:
    manifest: dict
    header_offset: int
    file_size: int
    extras: Any


def _read_header(f: BinaryIO, path: Path) -> _Header:
    f.seek(0, os.SEEK_END)
    size = f.tell()
    f.seek(0)
    if size == 0:
        raise _Bad("the file is empty (0 bytes); it is not a checkpoint, or its write never started")
    prefix = f.read(PREFIX_BYTES)
    if prefix[: len(MAGIC)] != MAGIC:
        if len(prefix) < len(MAGIC) and MAGIC.startswith(prefix):
            raise _Bad(f"truncated: the file has only {size} bytes")
        hint = ""
        if prefix.startswith(b"PK\x03\x04") or prefix[:1] == b"\x80":
            hint = " (it looks like a torch.save/pickle file, which is never unpickled here)"
        elif prefix == bytes(len(prefix)):
            hint = " (it starts with zero bytes, as an interrupted write does)"
        raise _Bad(f"not an STSO checkpoint: wrong magic bytes {prefix[: len(MAGIC)]!r}{hint}")
    if len(prefix) < PREFIX_BYTES:
        raise _Bad(f"truncated: the file has {size} bytes, fewer than the {PREFIX_BYTES}-byte prefix")
    _magic, version, flags, header_offset, header_len, header_sha = _PREFIX.unpack(prefix)
    if prefix[-4:] != bytes(4):
        raise _Bad("the prefix's reserved bytes are not zero")
    if version != FORMAT_VERSION:
        raise _Bad(f"container version {version} is unknown (this code reads version {FORMAT_VERSION})")
    if flags != 0:
        raise _Bad(f"prefix flags are {flags:#06x}, expected 0")
    expected = header_offset + header_len
    if header_offset < PREFIX_BYTES or header_len == 0:
        raise _Bad(f"the prefix points at an impossible header (offset {header_offset}, length {header_len})")
    if expected > size:
        raise _Bad(f"truncated: the file has {size} bytes but its prefix promises {expected}")
    if expected < size:
        raise _Bad(f"the file has {size} bytes but its prefix accounts for {expected}")
    f.seek(header_offset)
    header = f.read(header_len)
    if len(header) != header_len:
        raise _Bad(f"truncated: read {len(header)} of {header_len} header bytes")
    if hashlib.sha256(header).digest() != header_sha:
        raise _Bad("the header fails its checksum; the file is damaged, use an older checkpoint")
    try:
        manifest = json.loads(header.decode("utf-8"), parse_constant=_reject_constant)
    except (UnicodeDecodeError, ValueError, RecursionError) as err:
        raise _Bad(f"the header is not valid JSON: {err}") from err
    _validate_manifest(manifest, header_offset)
    try:
        extras = _decode_tree(manifest.get("extras"), [], [])
    except _Bad as err:
        raise _Bad(f"the extras are invalid: {err}") from None
    except RecursionError:
        raise _Bad("the extras are nested too deeply") from None
    return _Header(manifest, header_offset, size, extras)


def _is_int(x: Any, minimum: int = 0) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= minimum


def _expect(cond: bool, message: str) -> None:
    if not cond:
        raise _Bad(message)


def _dtype_info(kind: str, name: Any) -> tuple[int, bool, bool]:
    """``(itemsize, is_complex, is_float)`` of a whitelisted dtype name."""
    _expect(isinstance(name, str), f"dtype {name!r} is not a string")
    if kind == _KIND_TORCH:
        _expect(name in TORCH_DTYPES, f"dtype {name!r} is not a supported torch dtype")
        dt = TORCH_DTYPES[name]
        return dt.itemsize, dt.is_complex, dt.is_floating_point
    _expect(bool(_NUMPY_DTYPE_RE.match(name)), f"dtype {name!r} is not a supported numpy dtype")
    try:
        ndt = np.dtype(name)
    except TypeError as err:
        raise _Bad(f"dtype {name!r} is not a numpy dtype") from err
    _expect(ndt.kind in "biufc" and not ndt.hasobject, f"dtype {name!r} is not a plain numeric dtype")
    return ndt.itemsize, ndt.kind == "c", ndt.kind == "f"


def _validate_manifest(m: Any, header_offset: int) -> None:
    _expect(isinstance(m, dict), "the header is not a JSON object")
    version = m.get("schema_version")
    _expect(
        version == SCHEMA_VERSION and _is_int(version),
        f"schema version {version!r} is unknown (this code reads version {SCHEMA_VERSION}); "
        "it was written by another STSO version",
    )
    _expect(m.get("format") == FORMAT_NAME, f"format {m.get('format')!r} is not {FORMAT_NAME!r}")
    _expect(m.get("quantize") in quant.QUANTIZE_MODES, f"quantize mode {m.get('quantize')!r} is unknown")
    _expect(m.get("step") is None or _is_int(m.get("step")), f"step {m.get('step')!r} is not an int")
    _expect(
        m.get("config_hash") is None or isinstance(m.get("config_hash"), str), "config_hash is not a string"
    )
    _expect(
        m.get("data_bytes") == header_offset - PREFIX_BYTES,
        f"data_bytes {m.get('data_bytes')!r} disagrees with the prefix ({header_offset - PREFIX_BYTES})",
    )
    tensors = m.get("tensors")
    _expect(isinstance(tensors, list), "the tensor table is missing")
    for i, entry in enumerate(tensors):
        _expect(isinstance(entry, dict) and isinstance(entry.get("name"), str), f"tensor {i} has no name")
        try:
            _validate_entry(entry, header_offset)
        except _Bad as err:
            raise _Bad(f"tensor {i} ('{entry['name']}'): {err}") from None


def _validate_entry(e: dict, header_offset: int) -> None:
    kind = e.get("kind")
    _expect(kind in (_KIND_TORCH, _KIND_NUMPY), f"kind {kind!r} is unknown")
    itemsize, is_complex, is_float = _dtype_info(kind, e.get("dtype"))
    shape = e.get("shape")
    _expect(isinstance(shape, list) and all(_is_int(d) for d in shape), f"shape {shape!r} is invalid")
    numel = math.prod(shape)
    encoding = e.get("encoding")
    if encoding == quant.ENC_GROUPED:
        expected = {"data": (_width(itemsize, is_complex), numel * itemsize)}
    else:
        _expect(encoding in quant.LOSSY_ENCODINGS, f"encoding {encoding!r} is unknown")
        _expect(kind == _KIND_TORCH and is_float and numel > 0, f"encoding {encoding!r} needs a float tensor")
        widths = {"data": 2, "codes": 1, "absmax": 4}
        expected = {role: (widths[role], n) for role, n in quant.part_sizes(encoding, numel).items()}
    parts = e.get("parts")
    _expect(isinstance(parts, list) and len(parts) == len(expected), "parts do not match the encoding")
    for part, (role, (width, nbytes)) in zip(parts, expected.items()):
        _expect(isinstance(part, dict) and part.get("role") == role, f"part {role!r} is missing")
        _expect(
            part.get("width") == width and part.get("nbytes") == nbytes,
            f"part {role!r} has width/size {part.get('width')!r}/{part.get('nbytes')!r}, "
            f"expected {width}/{nbytes}",
        )
        chunks = part.get("chunks")
        _expect(isinstance(chunks, list), f"part {role!r} has no chunk list")
        total = 0
        for c in chunks:
            _expect(isinstance(c, dict), "a chunk record is not an object")
            offset, length, raw, planes = c.get("offset"), c.get("length"), c.get("raw"), c.get("planes")
            _expect(
                _is_int(offset, PREFIX_BYTES) and _is_int(length) and offset + length <= header_offset,
                f"a chunk lies outside the data region (offset {offset!r}, length {length!r})",
            )
            _expect(_is_int(raw) and raw % width == 0, f"a chunk's raw size {raw!r} is invalid")
            _expect(
                isinstance(c.get("sha256"), str) and bool(_SHA_RE.match(c["sha256"])),
                "a chunk checksum is invalid",
            )
            _expect(
                isinstance(planes, list)
                and len(planes) == width
                and all(
                    isinstance(p, list) and len(p) == 2 and p[0] in codec.PLANE_CODECS and _is_int(p[1])
                    for p in planes
                )
                and sum(p[1] for p in planes) == length,
                "a chunk's plane table is invalid",
            )
            total += raw
        _expect(total == nbytes, f"part {role!r} chunks hold {total} bytes, expected {nbytes}")


def _decode_tree(node: Any, arrays: list[Any], kinds: list[str]) -> Any:
    if node is None or isinstance(node, (bool, int, float, str)):
        return node
    if isinstance(node, list):
        return [_decode_tree(v, arrays, kinds) for v in node]
    _expect(isinstance(node, dict), f"unexpected JSON value {type(node).__name__} in the state tree")
    tag = node.get(_TAG)
    if tag == "dict":
        if "str" in node:
            _expect(isinstance(node["str"], dict), "a dict node is malformed")
            items = [(k, _decode_tree(v, arrays, kinds)) for k, v in node["str"].items()]
        else:
            raw_items = node.get("items")
            _expect(
                isinstance(raw_items, list) and all(isinstance(p, list) and len(p) == 2 for p in raw_items),
                "a dict node is malformed",
            )
            items = []
            for k, v in raw_items:
                key = _decode_tree(k, arrays, kinds)
                _expect(
                    key is None or isinstance(key, (str, int, float, tuple, np.generic)),
                    "a dict key has an invalid type",
                )
                try:
                    hash(key)
                except TypeError:
                    raise _Bad("a dict key is not hashable") from None
                items.append((key, _decode_tree(v, arrays, kinds)))
        if node.get("ordered"):
            out: dict = collections.OrderedDict(items)
            if "metadata" in node:
                meta = _decode_tree(node["metadata"], arrays, kinds)
                _expect(isinstance(meta, dict), "state-dict metadata is not a dict")
                out._metadata = meta  # type: ignore[attr-defined]
            return out
        return dict(items)
    if tag == "tuple":
        _expect(isinstance(node.get("items"), list), "a tuple node is malformed")
        return tuple(_decode_tree(v, arrays, kinds) for v in node["items"])
    if tag in ("tensor", "ndarray"):
        idx = node.get("id")
        _expect(_is_int(idx) and idx < len(arrays), f"{tag} reference {idx!r} is out of range")
        _expect(
            kinds[idx] == (_KIND_TORCH if tag == "tensor" else _KIND_NUMPY),
            f"{tag} reference {idx} has the wrong kind",
        )
        return arrays[idx]
    if tag == "float":
        hx = node.get("hex")
        _expect(isinstance(hx, str) and len(hx) == 16, "a float node is malformed")
        try:
            return struct.unpack(">d", bytes.fromhex(hx))[0]
        except ValueError:
            raise _Bad("a float node is malformed") from None
    if tag in ("bytes", "bytearray"):
        hx = node.get("hex")
        _expect(isinstance(hx, str), "a bytes node is malformed")
        try:
            data = bytes.fromhex(hx)
        except ValueError:
            raise _Bad("a bytes node is malformed") from None
        return data if tag == "bytes" else bytearray(data)
    if tag == "npscalar":
        itemsize, _, _ = _dtype_info(_KIND_NUMPY, node.get("dtype"))
        hx = node.get("hex")
        _expect(isinstance(hx, str) and len(hx) == 2 * itemsize, "a numpy scalar node is malformed")
        try:
            return np.frombuffer(bytes.fromhex(hx), dtype=np.dtype(node["dtype"]))[0]
        except ValueError:
            raise _Bad("a numpy scalar node is malformed") from None
    raise _Bad(f"the state tree contains an unknown node type {tag!r}")


def _read_entry(f: BinaryIO, path: Path, entry: dict, verify: bool) -> torch.Tensor | np.ndarray:
    name = entry["name"]
    buffers: dict[str, bytearray] = {}
    chunk_no = 0
    for part in entry["parts"]:
        buf = bytearray(part["nbytes"])
        out = memoryview(buf)
        start = 0
        for c in part["chunks"]:
            what = f"chunk {chunk_no}" + (f" ({part['role']})" if len(entry["parts"]) > 1 else "")
            f.seek(c["offset"])
            payload = f.read(c["length"])
            if len(payload) != c["length"]:
                raise _corrupt(path, f"{what} of tensor '{name}' is truncated")
            if verify and hashlib.sha256(payload).hexdigest() != c["sha256"]:
                raise _corrupt(
                    path,
                    f"{what} of tensor '{name}' fails its checksum; "
                    "the file is damaged, use an older checkpoint",
                )
            try:
                codec.decode_chunk(payload, part["width"], c["planes"], out[start : start + c["raw"]])
            except codec.CodecError as err:
                raise _corrupt(path, f"{what} of tensor '{name}' does not decode: {err}") from err
            start += c["raw"]
            chunk_no += 1
        buffers[part["role"]] = buf
    shape = entry["shape"]
    numel = math.prod(shape)
    if entry["kind"] == _KIND_NUMPY:
        dt = np.dtype(entry["dtype"])
        if numel == 0:
            return np.empty(shape, dtype=dt)
        return np.frombuffer(buffers["data"], dtype=dt).reshape(shape)
    dtype = TORCH_DTYPES[entry["dtype"]]
    if numel == 0:
        return torch.empty(shape, dtype=dtype)
    if entry["encoding"] == quant.ENC_GROUPED:
        return torch.frombuffer(buffers["data"], dtype=torch.uint8).view(dtype).reshape(shape)
    return quant.decode_moment(entry["encoding"], buffers, dtype, numel).reshape(shape)


def _open(path: Path) -> BinaryIO:
    try:
        return open(path, "rb")
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such checkpoint file") from None
    except OSError as err:
        raise CheckpointError(f"{path}: cannot open checkpoint: {err}") from err


def _header(f: BinaryIO, path: Path) -> _Header:
    try:
        return _read_header(f, path)
    except _Bad as err:
        raise _corrupt(path, str(err)) from None
    except OSError as err:
        raise CheckpointError(f"{path}: cannot read checkpoint: {err}") from err


def _public_manifest(h: _Header) -> dict:
    manifest = dict(h.manifest)
    manifest["extras"] = h.extras
    manifest["file_bytes"] = h.file_size
    return manifest


def read_manifest(path: str | os.PathLike) -> dict:
    """The manifest of a checkpoint, reading only its prefix and header (never chunk data).

    Returns the JSON manifest (``schema_version``, ``format``, ``created_unix``, ``step``,
    ``config_hash``, ``quantize``, ``tensors`` with per-tensor dtype/shape/encoding/chunks,
    the encoded ``tree``) with ``extras`` decoded to Python values and ``file_bytes`` added.

    Raises:
        CheckpointCorruptError: the header is damaged, truncated or not a checkpoint's.
        CheckpointError: the file cannot be opened.
    """
    path = Path(path)
    with _open(path) as f:
        return _public_manifest(_header(f, path))


def verify(path: str | os.PathLike) -> dict:
    """Check every checksum of a checkpoint without decoding it; returns its manifest.

    Raises:
        CheckpointCorruptError: naming the first damaged header field or chunk.
    """
    path = Path(path)
    with _open(path) as f:
        h = _header(f, path)
        try:
            for entry in h.manifest["tensors"]:
                chunk_no = 0
                for part in entry["parts"]:
                    for c in part["chunks"]:
                        f.seek(c["offset"])
                        payload = f.read(c["length"])
                        if len(payload) != c["length"] or hashlib.sha256(payload).hexdigest() != c["sha256"]:
                            raise _corrupt(
                                path,
                                f"chunk {chunk_no} of tensor '{entry['name']}' fails its "
                                "checksum; the file is damaged, use an older checkpoint",
                            )
                        chunk_no += 1
        except OSError as err:
            raise CheckpointError(f"{path}: cannot read checkpoint: {err}") from err
        return _public_manifest(h)


def load(path: str | os.PathLike, *, verify: bool = True) -> Any:
    """Load a checkpoint written by :func:`save` (JSON and raw bytes only; no pickle).

    Args:
        path: the checkpoint file.
        verify: check every chunk's sha256 before decoding it (the header is always checked).

    Returns:
        The saved state: tuples stay tuples, int keys stay ints, tensors come back as CPU
        tensors (arrays shared in the saved tree are one object again), numpy arrays as numpy
        arrays of the same dtype. Lossless entries are bit-identical.

    Raises:
        CheckpointCorruptError: truncation, damage, wrong magic or unknown version, naming the
            file and the damaged part.
        CheckpointError: the file does not exist or cannot be read.
    """
    path = Path(path)
    with _open(path) as f:
        h = _header(f, path)
        try:
            arrays = [_read_entry(f, path, entry, verify) for entry in h.manifest["tensors"]]
        except OSError as err:
            raise CheckpointError(f"{path}: cannot read checkpoint: {err}") from err
    kinds = [entry["kind"] for entry in h.manifest["tensors"]]
    try:
        return _decode_tree(h.manifest.get("tree"), arrays, kinds)
    except _Bad as err:
        raise _corrupt(path, f"the state tree is invalid: {err}") from None
    except RecursionError:
        raise _corrupt(path, "the state tree is nested too deeply") from None
