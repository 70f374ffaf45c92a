"""What a batch run segments: every NIfTI under a folder or fsspec prefix, or the rows of a CSV/Parquet manifest.

Inputs and outputs are fsspec URLs (a plain path is a local one), so the same run reads ``gs://`` on a cluster and a
folder on a laptop. Case ids name the outputs (nnU-Net's convention: ``case_0000.nii.gz`` -> ``case.nii.gz``) and
must be unique in a run; a manifest may give them in its case column when file names repeat (``sub-01/T1w.nii.gz``).
"""

from __future__ import annotations

import posixpath
from dataclasses import asdict, dataclass
from pathlib import Path

import fsspec
from fsspec.implementations.local import LocalFileSystem

from mlops.errors import DatasetError
from mlops.volumes import is_nifti_name, output_name

MANIFEST_SUFFIXES = (".csv", ".parquet", ".pq")
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
    """nnU-Net's case id of an image file name or URL (``gs://b/case_0000.nii.gz`` -> ``case``)."""
    return output_name(Path(name)).removesuffix(".nii.gz")


def is_manifest(source: str) -> bool:
    return source.lower().endswith(MANIFEST_SUFFIXES)


def list_cases(
    source: str,
    dest: str,
    path_column: str = "path",
    subject_column: str = "subject",
    case_column: str = "case",
) -> list[Case]:
    """Every case of ``source`` (a folder/prefix of NIfTI files, or a manifest) with its output under ``dest``."""
    if is_manifest(source):
        found = _manifest(source, path_column, subject_column, case_column)
    else:
        found = _folder(source, dest)
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
        raise DatasetError(f"{source}: nothing to segment (no .nii or .nii.gz files, or an empty manifest)")
    return cases


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
    if type(dest_fs) is type(fs) and dest_root.rstrip("/") == root:
        raise DatasetError(f"{dest}: the output folder must differ from the input folder")
    files = sorted(
        e["name"]
        for e in entries
        if (e.get("type") == "file" or (e.get("islink") and fs.isfile(e["name"])))  # fsspec: a symlink is "other"
        and is_nifti_name(posixpath.basename(e["name"]))
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
        if not raw:
            case = given_case or f"row{i + 1}"
            rows.append((case, subject or case, "", f"{source}: row {i + 1} has no {path_column}"))
            continue
        if "://" in raw:
            url = raw
        else:
            path = raw if posixpath.isabs(raw) else posixpath.normpath(posixpath.join(base, raw))
            url = url_of(fs, path)
        case = given_case or case_id(raw)
        rows.append((case, subject or case, url, None))
    return rows


def _cell(value: object) -> str:
    """A manifest cell as text; empty for a missing value (NaN, None, blank)."""
    if value is None or (isinstance(value, float) and value != value):
        return ""
    return str(value).strip()
