"""File helpers: atomic writes (a crash mid-write never leaves a half-written file that looks complete) and
content digests of artefacts (a run records *what* it read, not only where)."""

from __future__ import annotations

import hashlib
import os
import tempfile
import zipfile
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


#: Files of an artefact folder that report on the artefact and are never loaded with it (a fit's timing
#: changes from run to run): left out of :func:`content_digest`.
REPORT_SUFFIX = "_report.json"


def _hash_file(h: "hashlib._Hash", f: Path, every_byte: bool) -> None:
    if not every_byte and zipfile.is_zipfile(f):
        with zipfile.ZipFile(f) as z:
            names = sorted(z.namelist())
            if "policy.pth" in names:  # a Stable-Baselines3 save: its tensors, not its bookkeeping
                names = [n for n in names if n.endswith(".pth")]
            for name in names:
                h.update(name.encode() + b"\0" + z.read(name) + b"\0")
        return
    with open(f, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)


def content_digest(path: str | os.PathLike | None, *, every_byte: bool = False) -> str | None:
    """SHA-256 of what an artefact holds: a file's contents, or a folder's files (relative names and
    contents, in sorted order); ``None`` for ``None`` or a path that does not exist.

    Retraining an artefact in place changes its digest, though not its path; retraining it with the same
    seed and code does not, so a suite resumed after ``make train`` reran keeps its runs. For that, reports
    beside the artefact (``*_report.json``) are left out, a zip archive counts by its members' contents, and
    a Stable-Baselines3 save (a zip holding ``policy.pth``) by its tensors (``*.pth``: the policy's weights,
    its optimizer's state), not by its ``data`` member, where SB3 records the start time, the last
    episodes' wall times, the log folder and object addresses.
    ``every_byte=True`` hashes every byte of every file, the rule runs were recorded with before."""
    if path is None:
        return None
    root = Path(path)
    if root.is_file():
        files = [(root.name, root)]
    elif root.is_dir():
        files = sorted((f.relative_to(root).as_posix(), f) for f in root.rglob("*")
                       if f.is_file() and (every_byte or not f.name.endswith(REPORT_SUFFIX)))
    else:
        return None
    h = hashlib.sha256()
    for name, f in files:
        h.update(name.encode() + b"\0")
        _hash_file(h, f, every_byte)
        h.update(b"\0")
    return h.hexdigest()


def write_text_or_print(path: str | os.PathLike | None, text: str) -> None:
    """A command's Markdown output: written atomically to ``path``, or printed when there is none."""
    if path is None:
        print(text)
    else:
        write_text_atomic(path, text)
