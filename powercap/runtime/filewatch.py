"""Has a file changed since the last look? One answer for certificates, snapshots and policy files.

A file's stamp is ``(device, inode, size, mtime in ns)``, or None while it cannot be
stat'ed. The inode matters: Kubernetes updates a mounted Secret or ConfigMap by swapping a
symlink, and editors and ``powercap certs`` replace files by rename, which may keep the
size and, within the clock's resolution, the mtime.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

FileStamp = tuple[int, int, int, int]


def file_stamp(path: str | Path) -> FileStamp | None:
    """``(device, inode, size, mtime_ns)`` of ``path`` (symlinks followed), None if it cannot be stat'ed."""
    try:
        info = os.stat(path)
    except OSError:
        return None
    return info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns


class FileWatch:
    """The stamps of some files, as last seen; :meth:`changed` compares and remembers.

    Not thread-safe by itself: callers that share one hold their own lock.
    """

    def __init__(self, paths: Iterable[str | Path]) -> None:
        self.paths = tuple(paths)
        self._stamps = self.stamps()

    def stamps(self) -> tuple[FileStamp | None, ...]:
        return tuple(file_stamp(path) for path in self.paths)

    def changed(self) -> bool:
        """True when any file's stamp moved since the last call (or since construction)."""
        stamps = self.stamps()
        if stamps == self._stamps:
            return False
        self._stamps = stamps
        return True
