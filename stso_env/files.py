"""File helpers: atomic writes (a crash mid-write never leaves a half-written file that looks complete) and
content digests of artefacts (a run records *what* it read, not only where)."""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` through a temp file in the same folder, fsync, then ``os.replace``.

    The file gets the usual permissions (0666 minus the umask), not the private 0600 of a temp file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def content_digest(path: str | os.PathLike | None) -> str | None:
    """SHA-256 of a file's bytes, or of a folder's files (relative names and bytes, in sorted order);
    ``None`` for ``None`` or a path that does not exist. Retraining an artefact in place changes its
    digest, though not its path."""
    if path is None:
        return None
    root = Path(path)
    if root.is_file():
        files = [(root.name, root)]
    elif root.is_dir():
        files = sorted((f.relative_to(root).as_posix(), f) for f in root.rglob("*") if f.is_file())
    else:
        return None
    h = hashlib.sha256()
    for name, f in files:
        h.update(name.encode() + b"\0")
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
        h.update(b"\0")
    return h.hexdigest()
