"""A model folder at any fsspec URL (``gs://...``) copied once into a local cache, for the service and batch actors.

Several processes on one node (Ray actors, service instances sharing a volume) may fetch the same model at once:
each copies into its own temporary folder and the first rename wins; the others find the cached copy.
"""

from __future__ import annotations

import shutil
import uuid
from pathlib import Path
from typing import Any

import fsspec
from loguru import logger

from mlops.deadline import call_within
from mlops.errors import MlopsError


def fetch_model(uri: str, cache: Path, timeout_s: float = 30.0) -> Path:
    """The local copy of the nnU-Net model folder at ``uri`` under ``cache`` (fetched only if not there yet)."""
    uri = str(uri).rstrip("/")
    dest = Path(cache) / Path(uri).name
    if (dest / "plans.json").is_file():
        logger.info(f"Model {uri} already cached in {dest}")
        return dest

    def look() -> tuple[Any, str, bool]:
        fs, root = fsspec.core.url_to_fs(uri)
        return fs, root, fs.exists(f"{root}/plans.json")

    try:
        fs, root, found = call_within(look, timeout_s, lambda: MlopsError(
            f"{uri}: no answer within {timeout_s:g} s (no network, a missing bucket, or no credentials?)"
        ))  # fmt: skip
    except MlopsError:
        raise
    except ImportError as exc:
        raise MlopsError(f"{uri}: no filesystem for this URL ({exc})") from None
    except Exception as exc:  # fsspec backends raise their own types: network, credentials, missing bucket
        raise MlopsError(f"{uri}: cannot reach the model ({type(exc).__name__}: {str(exc)[:200]})") from None
    if not found:
        raise MlopsError(f"{uri}: no nnU-Net model folder there (no plans.json)")
    tmp = dest.with_name(f".{dest.name}.{uuid.uuid4().hex[:8]}.part")
    logger.info(f"Fetching model {uri} -> {dest}")
    try:
        fs.get(root, str(tmp), recursive=True)
        try:
            tmp.replace(dest)
        except OSError:
            if not (dest / "plans.json").is_file():  # not another process's finished copy: a real failure
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest
