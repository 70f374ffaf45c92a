"""What a batch run segments: every NIfTI (or zipped DICOM series) under a folder or fsspec prefix, or the rows of a
CSV/Parquet manifest.

Inputs and outputs are fsspec URLs (a plain path is a local one), so the same run reads ``gs://`` on a cluster and a
folder on a laptop. Case ids name the outputs (nnU-Net's convention: ``case_0000.nii.gz`` -> ``case.nii.gz``) and
must be unique in a run; a manifest may give them in its case column when file names repeat (``sub-01/T1w.nii.gz``).
"""

from __future__ import annotations

import posixpath
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TypeVar

import fsspec
from fsspec.implementations.local import LocalFileSystem

from mlops.deadline import call_within
from mlops.dicom.series import is_zip_name, zip_stem
from mlops.errors import DatasetError
from mlops.outputs import is_within, real, safe_case_id, same_or_inside
from mlops.volumes import is_nifti_name, output_name

MANIFEST_SUFFIXES = (".csv", ".parquet", ".pq")
T = TypeVar("T")
RECORDS = ".mlops_batch"  # one JSON record per finished case, beside the outputs


@dataclass
class Case:
    """One input of a run and where its results go (all fsspec URLs or local paths)."""

    case: str
    subject: str
    input: str
    output: str
    record: str
    error: str | None = None  # a problem found while listing (an empty manifest cell): the case fails, the run goes on

    def to_row(self) -> dict[str, str | None]:
        return asdict(self)


def is_local(fs: fsspec.AbstractFileSystem) -> bool:
    return isinstance(fs, LocalFileSystem)


def url_of(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """A path on ``fs`` as a URL another process can open (plain for local paths)."""
    return path if is_local(fs) else fs.unstrip_protocol(path)


def case_id(name: str) -> str:
    """nnU-Net's case id of an image file name or URL (``gs://b/case_0000.nii.gz`` -> ``case``); a zipped DICOM
    series is named by its archive (``gs://b/series7.zip`` -> ``series7``)."""
    base = posixpath.basename(name)
    if is_zip_name(base):
        return zip_stem(base)
    return output_name(Path(name)).removesuffix(".nii.gz")


def is_manifest(source: str) -> bool:
    return source.lower().endswith(MANIFEST_SUFFIXES)


def list_cases(
    source: str,
    dest: str,
    path_column: str = "path",
    subject_column: str = "subject",
    case_column: str = "case",
    timeout_s: float = 20.0,
) -> list[Case]:
    """Every case of ``source`` (a folder/prefix of NIfTI files, or a manifest) with its output under ``dest``.

    Listing must answer within ``timeout_s``: an object store that cannot be reached (no network, a missing bucket
    that its client retries for minutes) is one clear error in seconds, before Ray starts."""
    if is_manifest(source):
        found = _bounded(lambda: _manifest(source, path_column, subject_column, case_column), source, timeout_s)
    else:
        found = _bounded(lambda: _folder(source, dest), source, timeout_s)
    dest_fs, dest_root = fsspec.core.url_to_fs(dest)
    dest_root = dest_root.rstrip("/")
    cases: list[Case] = []
    seen: dict[str, str] = {}
    duplicates: list[str] = []
    for case, subject, url, error in found:
        if case in seen:
            duplicates.append(f"{case!r}: {seen[case]} and {url}")
            continue
        seen[case] = url
        output = url_of(dest_fs, f"{dest_root}/{case}.nii.gz")
        record = url_of(dest_fs, f"{dest_root}/{RECORDS}/{case}.json")
        cases.append(Case(case, subject, url, output, record, error))
    if duplicates:
        shown = "\n  - ".join(duplicates[:10]) + ("\n  - ..." if len(duplicates) > 10 else "")
        raise DatasetError(
            f"{source}: {len(duplicates)} case id(s) occur twice, so their outputs would overwrite each other:\n"
            f"  - {shown}\nGive each row a unique id in a '{case_column}' column of a manifest."
        )
    if not cases:
        raise DatasetError(f"{source}: nothing to segment (no .nii, .nii.gz or .zip files, or an empty manifest)")
    inputs = {_identity(c.input) for c in cases if c.input}
    overwritten = [c for c in cases if _identity(c.output) in inputs]
    if overwritten:
        shown = ", ".join(f"{c.case} -> {c.output}" for c in overwritten[:10])
        raise DatasetError(f"{dest}: {len(overwritten)} output(s) would replace input scans ({shown}); choose another")
    return cases


def _bounded(work: Callable[[], T], source: str, timeout_s: float) -> T:
    """``work()`` within ``timeout_s``, else a DatasetError that says what to check."""
    return call_within(work, timeout_s, lambda: DatasetError(
        f"{source}: no answer within {timeout_s:g} s while listing it (no network, a missing bucket, or no "
        "credentials?); batch.list_timeout_s sets the limit"
    ))  # fmt: skip


def _identity(url: str) -> str:
    """A local path's real path, a URL as it is: what two names of one file have in common."""
    return url if "://" in url else str(real(Path(url)))


def _folder(source: str, dest: str) -> list[tuple[str, str, str, str | None]]:
    fs, root = fsspec.core.url_to_fs(source)
    root = root.rstrip("/") or "/"
    try:
        if not fs.isdir(root):
            what = "is a file, not a folder or manifest" if fs.exists(root) else "no such folder"
            raise DatasetError(f"{source}: {what} (expected a folder or prefix of NIfTI files, or a .csv/.parquet)")
        entries = fs.ls(root, detail=True)
    except DatasetError:
        raise
    except Exception as exc:  # a bucket we may not read, a bad URL: say which and why
        raise DatasetError(f"{source}: cannot list it ({type(exc).__name__}: {exc})") from exc
    dest_fs, dest_root = fsspec.core.url_to_fs(dest)
    if type(dest_fs) is type(fs) and (
        is_within(Path(dest_root), Path(root)) if is_local(fs) else same_or_inside(dest_root, root)
    ):
        raise DatasetError(f"{dest}: the output folder is, or is inside, the input folder {source}; choose another")
    files = sorted(
        e["name"]
        for e in entries
        if (e.get("type") == "file" or (e.get("islink") and fs.isfile(e["name"])))  # fsspec: a symlink is "other"
        and (is_nifti_name(posixpath.basename(e["name"])) or is_zip_name(posixpath.basename(e["name"])))
        and not posixpath.basename(e["name"]).startswith(".")
    )
    return [(case_id(f), case_id(f), url_of(fs, f), None) for f in files]


def _manifest(
    source: str, path_column: str, subject_column: str, case_column: str
) -> list[tuple[str, str, str, str | None]]:
    import pandas as pd

    fs, root = fsspec.core.url_to_fs(source)
    try:
        with fs.open(root, "rb") as fh:
            table = pd.read_csv(fh, dtype=str) if source.lower().endswith(".csv") else pd.read_parquet(fh)
    except FileNotFoundError:
        raise DatasetError(f"{source}: no such manifest") from None
    except Exception as exc:
        raise DatasetError(f"{source}: unreadable manifest ({type(exc).__name__}: {exc})") from exc
    if path_column not in table.columns:
        raise DatasetError(
            f"{source}: no '{path_column}' column (columns: {', '.join(map(str, table.columns)) or 'none'}); "
            "name the column of image paths with batch.path_column=..."
        )
    base = posixpath.dirname(root)
    rows: list[tuple[str, str, str, str | None]] = []
    for i, row in enumerate(table.to_dict("records")):
        raw = _cell(row.get(path_column))
        given_case = _cell(row.get(case_column))
        subject = _cell(row.get(subject_column))
        where = f"{source}: row {i + 1}"
        case = safe_case_id(given_case, where) if given_case else (case_id(raw) if raw else f"row{i + 1}")
        if not raw:
            rows.append((case, subject or case, "", f"{where} has no {path_column}"))
            continue
        if "://" in raw:
            url = raw
        else:
            path = raw if posixpath.isabs(raw) else posixpath.normpath(posixpath.join(base, raw))
            url = url_of(fs, path)
            if is_local(fs) and not Path(path).is_file():  # known now: no Ray task needed to find out
                rows.append((case, subject or case, url, f"{url}: no such file (row {i + 1} of {source})"))
                continue
        rows.append((case, subject or case, url, None))
    if rows and all(error for *_, error in rows):
        shown = "; ".join(error for *_, error in rows[:3] if error)
        raise DatasetError(f"{source}: none of its {len(rows)} row(s) names a readable file ({shown}, ...)")
    return rows


def _cell(value: object) -> str:
    """A manifest cell as text; empty for a missing value (NaN, None, blank)."""
    if value is None or (isinstance(value, float) and value != value):
        return ""
    return str(value).strip()
