"""`mlops download`: fetch a Decathlon archive, streaming with progress and verifying its SHA-256.

The body is streamed to ``<dest>.part`` and renamed to ``dest`` only after the checksum matched, so a user never
finds a half-downloaded or corrupt archive under the final name.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import httpx
from loguru import logger

from mlops.errors import DownloadError
from mlops.files import sha256 as file_sha256
from mlops.progress import progress_bar


def download(url: str, dest: Path, sha256: str | None, timeout_s: float = 60, chunk_bytes: int = 1 << 20) -> Path:
    """Download ``url`` to ``dest``; skip if ``dest`` already has the expected checksum."""
    dest = Path(dest)
    if dest.is_file() and sha256 and file_sha256(dest) == sha256.lower():
        logger.info(f"{dest} already downloaded (SHA-256 verified)")
        return dest
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DownloadError(f"{dest}: cannot create its folder {dest.parent} ({exc.strerror or exc})") from None
    if dest.is_dir():
        raise DownloadError(f"{dest}: is a folder; give the archive's file name (e.g. {dest / 'Task.tar'})")
    part = dest.with_name(dest.name + ".part")
    h = hashlib.sha256()
    try:
        with httpx.stream("GET", url, follow_redirects=True, timeout=timeout_s) as resp:
            if resp.status_code != 200:
                raise DownloadError(f"{url}: server answered HTTP {resp.status_code}; nothing was saved")
            total = int(resp.headers.get("Content-Length", 0)) or None
            with part.open("wb") as f, progress_bar() as bar:
                tid = bar.add_task(f"Downloading {dest.name}", total=total)
                for block in resp.iter_bytes(chunk_bytes):
                    f.write(block)
                    h.update(block)
                    bar.advance(tid, len(block))
            if total is not None and part.stat().st_size != total:
                raise DownloadError(f"{url}: connection closed after {part.stat().st_size} of {total} bytes")
    except httpx.HTTPError as exc:
        part.unlink(missing_ok=True)
        raise DownloadError(f"{url}: download failed ({type(exc).__name__}: {exc}); nothing was saved") from exc
    except OSError as exc:
        part.unlink(missing_ok=True)
        raise DownloadError(f"{part}: cannot write the download ({exc.strerror or exc}); nothing was saved") from None
    except BaseException:  # Ctrl-C, or SIGTERM turned into KeyboardInterrupt by the CLI
        part.unlink(missing_ok=True)
        raise
    digest = h.hexdigest()
    if sha256 and digest != sha256.lower():
        part.unlink(missing_ok=True)
        raise DownloadError(
            f"{url}: SHA-256 mismatch (expected {sha256.lower()}, got {digest}); the file was discarded"
        )
    if not sha256:
        logger.warning(f"No checksum configured for {url}; SHA-256 of the download is {digest}")
    part.replace(dest)
    logger.info(f"Saved {dest} ({dest.stat().st_size / 1e6:.1f} MB, SHA-256 {digest[:12]}...)")
    return dest
