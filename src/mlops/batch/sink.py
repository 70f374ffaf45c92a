"""Where a batch run's results go, through fsspec: whole files only, never half of one.

A local file is written beside its target and renamed into place; an object store (GCS, S3) makes an object visible
only once its upload completes, so one ``pipe`` is already atomic there. After a segmentation is written, a small
JSON record of its row (volumes, the model's checkpoint hash) lands in ``.mlops_batch/``: a case is done exactly when
both exist, which is what lets a re-run, or Ray retrying a killed actor's work, skip it.
"""

from __future__ import annotations

import io
import json
import os
import uuid

import fsspec

from mlops.batch.sources import is_local, url_of

TABLE = "volumes"


def write_bytes(url: str, data: bytes) -> None:
    fs, path = fsspec.core.url_to_fs(url)
    parent = path.rsplit("/", 1)[0]
    if is_local(fs):
        fs.makedirs(parent, exist_ok=True)
        tmp = f"{parent}/.{path.rsplit('/', 1)[1]}.{uuid.uuid4().hex[:8]}.part"
        try:
            with open(tmp, "wb") as fh:
                fh.write(data)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    else:
        fs.pipe_file(path, data)


def read_bytes(url: str) -> bytes:
    fs, path = fsspec.core.url_to_fs(url)
    return fs.cat_file(path)


def exists(url: str) -> bool:
    fs, path = fsspec.core.url_to_fs(url)
    return bool(fs.exists(path))


def read_record(url: str) -> dict | None:
    """The record of a finished case, or None when there is none (or it cannot be read: then the case is redone)."""
    try:
        return json.loads(read_bytes(url))
    except (FileNotFoundError, ValueError):
        return None


def write_record(url: str, row: dict) -> None:
    write_bytes(url, json.dumps(row, sort_keys=True).encode())


def write_table(dest: str, rows: list[dict]) -> tuple[str, str]:
    """The cohort table as ``volumes.parquet`` and ``volumes.csv`` under ``dest`` (each written whole)."""
    import pandas as pd

    table = pd.DataFrame(rows)
    fs, root = fsspec.core.url_to_fs(dest)
    root = root.rstrip("/")
    urls = []
    for suffix in ("parquet", "csv"):
        buf = io.BytesIO()
        if suffix == "parquet":
            table.to_parquet(buf, index=False)
        else:
            table.to_csv(buf, index=False)
        url = url_of(fs, f"{root}/{TABLE}.{suffix}")
        write_bytes(url, buf.getvalue())
        urls.append(url)
    return urls[0], urls[1]
