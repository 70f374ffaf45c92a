"""Files written whole or not at all, and their digests.

Every report, summary, profile, stamp and record is written to a hidden temporary file beside its target and moved
into place in one rename, so a reader (a dashboard, DVC, a concurrent run) never sees half a file and an interrupted
write leaves the previous version intact.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path


def write_atomic(path: Path, data: str | bytes) -> Path:
    """Write ``data`` to ``path`` through a temporary file in the same folder and one rename; the folder is created."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.part")
    try:
        if isinstance(data, bytes):
            tmp.write_bytes(data)
        else:
            tmp.write_text(data)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def sha256(path: Path) -> str:
    """Hex SHA-256 of a file's content."""
    with Path(path).open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()
