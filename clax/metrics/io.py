"""Atomic file writes for run directories (standard library only).

A file is written to a temporary file in the same directory, flushed, fsynced and renamed over
its final name with ``os.replace``, so a crash never leaves a half-written file under a final
name. Used by :mod:`clax.metrics.report` and :mod:`clax.metrics.plots`; imports no other metrics
module.
"""

from __future__ import annotations

import os
import pathlib
import tempfile

__all__ = [
    "PathLike",
    "atomic_write_bytes",
    "atomic_write_text",
]

PathLike = str | os.PathLike[str]


def atomic_write_bytes(path: PathLike, data: bytes) -> pathlib.Path:
    """Writes ``data`` to ``path`` atomically, creating parent directories.

    The bytes go to a temporary file in the same directory, which is flushed, fsynced and then
    renamed over ``path`` with ``os.replace`` (atomic on POSIX and Windows). On any error the
    temporary file is removed and ``path`` is left as it was.

    Args:
        path: Destination file.
        data: Contents.

    Returns:
        ``path`` as a ``pathlib.Path``.
    """
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return path


def atomic_write_text(path: PathLike, text: str) -> pathlib.Path:
    """Writes ``text`` (UTF-8) to ``path`` atomically; see :func:`atomic_write_bytes`."""
    return atomic_write_bytes(path, text.encode("utf-8"))
