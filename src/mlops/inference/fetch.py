"""A model folder at any fsspec URL (``gs://...``) copied once into a local cache, for the service and batch actors.

Several processes on one node (Ray actors, service instances sharing a volume) may fetch the same model at once:
each copies into its own temporary folder and the first rename wins; the others find the cached copy.
"""

from __future__ import annotations

import shutil
import uuid
from pathlib import Path

import fsspec
from loguru import logger

from mlops.errors import MlopsError


def fetch_model(uri: str, cache: Path) -> Path:
    """The local copy of the nnU-Net model folder at ``uri`` under ``cache`` (fetched only if not there yet)."""
    uri = str(uri).rstrip("/")
    dest = Path(cache) / Path(uri).name
    if (dest / "plans.json").is_file():
        logger.info(f"Model {uri} already cached in {dest}")
        return dest
    fs, root = fsspec.core.url_to_fs(uri)
    if not fs.exists(f"{root}/plans.json"):
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
