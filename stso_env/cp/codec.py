"""Lossless byte codec for checkpoint chunks: byte grouping plus zstd.

A float32 tensor is a stream of 4-byte words whose high byte (sign and most of the exponent)
varies little while the low mantissa bytes are close to random. Compressing the raw stream
lets the random bytes break up every match, so zstd gains only ~8 %. Splitting each chunk
into byte planes (all byte-0s, then all byte-1s, ...) puts the predictable exponent bytes
next to each other, and compressing each plane as its own zstd frame lets the random planes
fall back to stored blocks without disturbing the compressible ones.

Measured on this machine (GPT-2 6x384 weights plus AdamW moments, 130 MB, vs ``torch.save``):
raw stream at level 1: 0.923; planes in one frame: 0.843; one frame per plane: 0.838.
Level 3 is both slower and larger (0.845) on fp32 planes, hence level 1 by default.

Each chunk decodes on its own, so a reader can stop, verify or parallelise per chunk.
One-shot ``ZstdCompressor.compress`` releases the GIL, so a background writer thread
compresses while the training thread keeps running Python.
"""

from __future__ import annotations

import threading

import numpy as np
import zstandard

#: zstd level used unless the caller picks another; level 1 beats 3 on fp32 byte planes.
DEFAULT_LEVEL = 1
#: Accepted zstd levels (negative levels are zstd's "fast" modes).
MIN_LEVEL = -7
MAX_LEVEL = 22

#: Plane codecs written into the manifest.
PLANE_ZSTD = "zstd"
PLANE_RAW = "raw"
PLANE_CODECS = (PLANE_ZSTD, PLANE_RAW)

# zstd compressor/decompressor objects must not be shared between threads, and creating one
# per plane costs more than compressing a small plane, so each thread keeps its own.
_local = threading.local()


class CodecError(ValueError):
    """Stored bytes do not decode to what the manifest promises."""


def _compressor(level: int) -> zstandard.ZstdCompressor:
    cache: dict[int, zstandard.ZstdCompressor] | None = getattr(_local, "compressors", None)
    if cache is None:
        cache = {}
        _local.compressors = cache
    comp = cache.get(level)
    if comp is None:
        # The content size in the frame lets the reader check every plane's length; the
        # frame checksum is redundant with the chunk's sha256, so it is left off.
        comp = zstandard.ZstdCompressor(level=level, write_content_size=True, write_checksum=False)
        cache[level] = comp
    return comp


def _decompressor() -> zstandard.ZstdDecompressor:
    dec: zstandard.ZstdDecompressor | None = getattr(_local, "decompressor", None)
    if dec is None:
        dec = zstandard.ZstdDecompressor()
        _local.decompressor = dec
    return dec


def chunk_spans(nbytes: int, width: int, chunk_bytes: int) -> list[tuple[int, int]]:
    """Split ``nbytes`` of ``width``-byte elements into ``[start, end)`` spans.

    Spans hold whole elements so every chunk can be byte-grouped on its own; each span has
    at most ``chunk_bytes`` bytes (rounded down to whole elements, at least one element).
    """
    if nbytes % width:
        raise ValueError(f"{nbytes} bytes is not a whole number of {width}-byte elements")
    step = max(width, chunk_bytes - chunk_bytes % width)
    return [(start, min(start + step, nbytes)) for start in range(0, nbytes, step)]


def encode_chunk(raw: np.ndarray, width: int, level: int) -> tuple[list[bytes], list[list]]:
    """Compress one chunk of bytes grouped by position within ``width``-byte elements.

    Args:
        raw: 1-D ``uint8`` array whose length is a multiple of ``width``.
        width: element size used for grouping (1 disables grouping).
        level: zstd level.

    Returns:
        ``(pieces, planes)``: the byte strings to write back to back, and per plane
        ``[codec, stored_length]`` for the manifest. A plane that zstd cannot shrink is
        stored raw, which also spares the reader a pointless decompression.
    """
    if raw.dtype != np.uint8 or raw.ndim != 1:
        raise TypeError("encode_chunk expects a 1-D uint8 array")
    if width > 1:
        planes_arr = raw.reshape(-1, width).T.copy()
    else:
        planes_arr = raw.reshape(1, -1)
    comp = _compressor(level)
    pieces: list[bytes] = []
    planes: list[list] = []
    for plane in planes_arr:
        packed = comp.compress(plane)
        if len(packed) < plane.nbytes:
            pieces.append(packed)
            planes.append([PLANE_ZSTD, len(packed)])
        else:
            pieces.append(plane.tobytes())
            planes.append([PLANE_RAW, plane.nbytes])
    return pieces, planes


def decode_chunk(payload: memoryview | bytes, width: int, planes: list[list], out: memoryview) -> None:
    """Decode one chunk written by :func:`encode_chunk` into ``out``.

    Args:
        payload: the chunk's stored bytes (all planes back to back).
        width: element size the chunk was grouped by.
        planes: ``[codec, stored_length]`` per plane, as in the manifest.
        out: writable buffer of exactly the chunk's raw length.

    Raises:
        CodecError: a plane does not decompress or has the wrong length.
    """
    raw_len = len(out)
    if len(planes) != width or raw_len % width:
        raise CodecError(f"chunk has {len(planes)} planes for width {width} and {raw_len} raw bytes")
    plane_len = raw_len // width
    view = memoryview(payload)
    pos = 0
    dest = np.frombuffer(out, dtype=np.uint8)
    grouped = dest.reshape(-1, width) if width > 1 else None
    for i, (codec, stored) in enumerate(planes):
        piece = view[pos : pos + stored]
        pos += stored
        if codec == PLANE_RAW:
            if stored != plane_len:
                raise CodecError(f"raw plane {i} holds {stored} bytes, expected {plane_len}")
            plane = np.frombuffer(piece, dtype=np.uint8)
        elif codec == PLANE_ZSTD:
            try:
                data = _decompressor().decompress(piece, max_output_size=plane_len)
            except zstandard.ZstdError as err:
                raise CodecError(f"plane {i} does not decompress: {err}") from err
            if len(data) != plane_len:
                raise CodecError(f"plane {i} decompresses to {len(data)} bytes, expected {plane_len}")
            plane = np.frombuffer(data, dtype=np.uint8)
        else:
            raise CodecError(f"plane {i} has unknown codec {codec!r}")
        if grouped is None:
            dest[:] = plane
        else:
            grouped[:, i] = plane
    if pos != len(view):
        raise CodecError(f"chunk holds {len(view)} bytes but its planes account for {pos}")
