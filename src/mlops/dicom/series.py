"""A DICOM image series as the volume the model segments.

Instances come from a folder (searched recursively), a ``.zip`` (read in memory: no entry name is ever used as a
path) or a DICOMweb response. Headers are read first (no pixel data), the series is chosen and every geometric rule
checked, and the size bounded, before any pixel is decoded. The volume is a NIfTI image in memory whose axes are
(columns, rows, slices) and whose affine maps them to RAS millimetres, so the rest of the pipeline treats it exactly
like the same scan saved as NIfTI; the slices' headers are kept, in volume order, for the SEG that references them.

Messages name the series by its SeriesInstanceUID and the files by their path; never by a patient attribute.
"""

from __future__ import annotations

import io
import zipfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pydicom
from loguru import logger
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from mlops.volumes import Budget, InputError

# Tolerances (mm, or direction cosines): scanners write positions with a few decimals; beyond these, the series is
# not one regular volume and resampling it silently would misplace the segmentation.
ORIENTATION_TOL = 1e-4
SPACING_REL_TOL = 0.01  # a slice gap may differ from the median by 1% (and 0.01 mm)
TILT_TOL = 1e-3  # sideways drift of the slices per mm along the normal (about 0.06 degrees)
DICOM_SUFFIXES = (".zip",)


@dataclass
class Instance:
    """One image's header, and how to read it whole when its pixels are needed."""

    label: str  # a path or a zip entry: what messages name
    header: Dataset
    load: Callable[[], Dataset]


@dataclass
class Series:
    """A checked, decoded series: the image the model sees and the slices' headers in its slice order."""

    image: nib.Nifti1Image  # (columns, rows, slices), float32, RAS affine in mm
    datasets: list[Dataset]  # headers of the slices, slice k of the volume first-to-last (no pixel data)
    name: str  # how messages name it (a folder, an upload, a URL): never a patient attribute

    @property
    def series_uid(self) -> str:
        return str(self.datasets[0].SeriesInstanceUID)

    @property
    def study_uid(self) -> str:
        return str(self.datasets[0].StudyInstanceUID)


def is_dicom_file(path: Path) -> bool:
    """A DICOM Part 10 file: the ``DICM`` marker after the 128-byte preamble."""
    try:
        with path.open("rb") as f:
            head = f.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:132] == b"DICM"


def holds_dicom(folder: Path, max_files: int) -> bool:
    """Whether a folder (searched recursively, at most ``max_files`` files looked at) holds DICOM files."""
    for i, path in enumerate(p for p in folder.rglob("*") if p.is_file()):
        if i >= max_files:
            return False
        if is_dicom_file(path):
            return True
    return False


def _header(fp: io.BufferedIOBase | io.BytesIO) -> Dataset | None:
    try:
        return pydicom.dcmread(fp, stop_before_pixels=True)
    except (InvalidDicomError, EOFError, ValueError, OSError, KeyError, TypeError, AttributeError):
        return None


def folder_instances(folder: Path, max_files: int) -> list[Instance]:
    """The DICOM files under ``folder`` (recursively; anything else is skipped), at most ``max_files``."""
    files = sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith("."))
    if len(files) > max_files:
        raise InputError(f"{folder}: {len(files):,} files, above the limit of {max_files:,} (dicom.max_files)", 413)
    found = []
    for path in files:
        with path.open("rb") as f:
            if f.read(132)[128:132] != b"DICM":
                continue
            f.seek(0)
            header = _header(f)
        if header is not None:
            found.append(Instance(str(path), header, lambda p=path: pydicom.dcmread(p)))
    if not found:
        raise InputError(f"{folder}: no DICOM files (Part 10, with the DICM marker)", 400)
    return found


def zip_instances(raw: bytes, name: str, max_files: int, max_bytes: int) -> list[Instance]:
    """The DICOM files in a zip archive, read in memory; the archive's declared and real sizes are both bounded."""
    try:
        archive = zipfile.ZipFile(io.BytesIO(raw))
        entries = [e for e in archive.infolist() if not e.is_dir() and not e.filename.startswith("__MACOSX/")]
    except (zipfile.BadZipFile, ValueError, OSError) as exc:
        raise InputError(f"{name}: not a readable zip archive ({exc})", 400) from None
    if len(entries) > max_files:
        raise InputError(f"{name}: {len(entries):,} files, above the limit of {max_files:,} (dicom.max_files)", 413)
    declared = sum(e.file_size for e in entries)
    if declared > max_bytes:
        raise InputError(
            f"{name}: {declared:,} bytes uncompressed, above the limit of {max_bytes:,} (dicom.max_unzipped_bytes)", 413
        )
    found, total = [], 0
    for entry in entries:
        try:
            with archive.open(entry) as f:
                data = f.read(max_bytes - total + 1)
        except (zipfile.BadZipFile, NotImplementedError, RuntimeError, OSError, EOFError) as exc:
            raise InputError(f"{name}: entry {entry.filename!r} is unreadable ({type(exc).__name__})", 400) from None
        total += len(data)
        if total > max_bytes:
            raise InputError(f"{name}: more than {max_bytes:,} bytes uncompressed (dicom.max_unzipped_bytes)", 413)
        if data[128:132] != b"DICM":
            continue
        header = _header(io.BytesIO(data))
        if header is not None:
            found.append(Instance(f"{name}:{entry.filename}", header, lambda d=data: pydicom.dcmread(io.BytesIO(d))))
    if not found:
        raise InputError(f"{name}: no DICOM files in the archive", 400)
    return found


def dataset_instances(datasets: Iterable[Dataset], name: str) -> list[Instance]:
    """Instances already in memory (a DICOMweb retrieve)."""
    return [Instance(f"{name} instance {i + 1}", ds, lambda d=ds: d) for i, ds in enumerate(datasets)]


def _is_image(ds: Dataset) -> bool:
    return "Rows" in ds and "Columns" in ds and "SeriesInstanceUID" in ds


def _describe(ds: Dataset) -> str:
    parts = [str(ds.get("Modality", "?"))]
    if ds.get("SeriesNumber") is not None:
        parts.append(f"#{ds.SeriesNumber}")
    if ds.get("SeriesDescription"):
        parts.append(repr(str(ds.SeriesDescription)[:64]))
    return " ".join(parts)


def choose_series(instances: list[Instance], name: str, series_uid: str | None) -> list[Instance]:
    """The instances of one image series: the one asked for, or the only one there is."""
    images = [i for i in instances if _is_image(i.header)]
    if len(images) < len(instances):
        logger.debug(f"{name}: {len(instances) - len(images)} non-image DICOM object(s) skipped")
    groups: dict[str, list[Instance]] = {}
    for inst in images:
        groups.setdefault(str(inst.header.SeriesInstanceUID), []).append(inst)
    if not groups:
        raise InputError(f"{name}: no DICOM image series (only non-image objects)", 400)
    if series_uid is not None:
        if series_uid not in groups:
            raise InputError(f"{name}: no series {series_uid}; found {_listing(groups)}", 404)
        return groups[series_uid]
    if len(groups) > 1:
        raise InputError(
            f"{name}: {len(groups)} series; choose one by SeriesInstanceUID (--series): {_listing(groups)}", 400
        )
    return next(iter(groups.values()))


def _listing(groups: dict[str, list[Instance]]) -> str:
    return "; ".join(f"{uid} ({_describe(g[0].header)}, {len(g)} images)" for uid, g in sorted(groups.items()))


def _floats(ds: Dataset, keyword: str, count: int, label: str) -> np.ndarray:
    value = ds.get(keyword)
    try:
        arr = np.array([float(v) for v in value], dtype=np.float64)
    except (TypeError, ValueError):
        arr = np.array([])
    if arr.shape != (count,) or not np.isfinite(arr).all():
        raise InputError(
            f"{label}: {keyword} is missing or malformed; a volume needs the position, orientation and spacing of "
            "every slice",
            422,
        )
    return arr


@dataclass(frozen=True)
class Geometry:
    order: list[int]  # instance indices in slice order
    affine: np.ndarray  # RAS
    shape: tuple[int, int, int]  # (columns, rows, slices)
    zooms: tuple[float, float, float]


def check_geometry(instances: list[Instance], name: str) -> Geometry:
    """One orientation, one pixel grid, slices evenly spaced along the normal with none missing or doubled."""
    first = instances[0].header
    uid = str(first.SeriesInstanceUID)
    where = f"{name} (series {uid})"
    for inst in instances:
        ds = inst.header
        if int(ds.get("NumberOfFrames", 1) or 1) > 1:
            raise InputError(
                f"{inst.label}: a multi-frame (enhanced) image; only single-frame series (one file a slice) are "
                "supported",
                422,
            )
        if int(ds.get("SamplesPerPixel", 1)) != 1:
            raise InputError(f"{inst.label}: {ds.get('PhotometricInterpretation', 'colour')} pixels; the model "
                             "segments grey-scale images", 422)  # fmt: skip
    if len(instances) < 2:
        raise InputError(f"{where}: 1 image; a volume needs at least 2 slices", 422)
    iop = _floats(first, "ImageOrientationPatient", 6, instances[0].label)
    spacing = _floats(first, "PixelSpacing", 2, instances[0].label)
    rows, cols = int(first.Rows), int(first.Columns)
    positions = []
    for inst in instances:
        ds = inst.header
        if not np.allclose(_floats(ds, "ImageOrientationPatient", 6, inst.label), iop, atol=ORIENTATION_TOL):
            raise InputError(f"{where}: more than one orientation (e.g. {inst.label}); not one volume", 422)
        if not np.allclose(_floats(ds, "PixelSpacing", 2, inst.label), spacing, rtol=1e-4, atol=1e-5):
            raise InputError(f"{where}: more than one pixel spacing (e.g. {inst.label}); not one volume", 422)
        if (int(ds.Rows), int(ds.Columns)) != (rows, cols):
            raise InputError(
                f"{where}: images of {rows}x{cols} and {int(ds.Rows)}x{int(ds.Columns)} ({inst.label}); not one volume",
                422,
            )
        positions.append(_floats(ds, "ImagePositionPatient", 3, inst.label))
    if min(spacing) <= 0:
        raise InputError(f"{where}: PixelSpacing {spacing.tolist()} must be positive", 422)
    row_dir, col_dir = iop[:3], iop[3:]
    normal = np.cross(row_dir, col_dir)
    if not (np.isclose(np.linalg.norm(row_dir), 1, atol=1e-3) and np.isclose(np.linalg.norm(col_dir), 1, atol=1e-3)
            and abs(float(row_dir @ col_dir)) < 1e-3):  # fmt: skip
        raise InputError(f"{where}: ImageOrientationPatient {iop.tolist()} is not two orthogonal unit vectors", 422)
    pos = np.array(positions)
    along = pos @ normal
    order = np.argsort(along, kind="stable")
    along, pos = along[order], pos[order]
    gaps = np.diff(along)
    if gaps.min() < 0.01:
        k = int(np.argmin(gaps))
        raise InputError(
            f"{where}: two images at the same slice position {along[k]:.2f} mm ({instances[order[k]].label}, "
            f"{instances[order[k + 1]].label}): duplicates or more than one volume in the series",
            422,
        )
    step = float(np.median(gaps))
    bad = np.abs(gaps - step) > max(0.01, SPACING_REL_TOL * step)
    if bad.any():
        k = int(np.argmax(bad))
        missing = gaps[k] / step
        kind = (f"about {round(missing) - 1} slice(s) missing" if np.isclose(missing, round(missing), rtol=0.05)
                and missing > 1.5 else "non-uniform slice spacing")  # fmt: skip
        raise InputError(
            f"{where}: {kind}: a gap of {gaps[k]:.3f} mm between slices at {along[k]:.2f} and {along[k + 1]:.2f} mm "
            f"where the others are {step:.3f} mm; only evenly spaced, complete series are supported",
            422,
        )
    span = pos[-1] - pos[0]
    sideways = span - (span @ normal) * normal
    if np.linalg.norm(sideways) > TILT_TOL * float(span @ normal) + 0.01:
        raise InputError(
            f"{where}: the slices shift sideways by {np.linalg.norm(sideways):.2f} mm over {float(span @ normal):.1f} "
            "mm (gantry tilt or a sheared stack); not supported: resample it to an orthogonal grid first",
            422,
        )
    lps = np.eye(4)
    lps[:3, 0] = row_dir * spacing[1]  # i: along a row, one column to the next (PixelSpacing[1])
    lps[:3, 1] = col_dir * spacing[0]  # j: down a column, one row to the next (PixelSpacing[0])
    lps[:3, 2] = span / (len(pos) - 1)
    lps[:3, 3] = pos[0]
    affine = np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps  # DICOM's LPS -> NIfTI's RAS
    zooms = (float(spacing[1]), float(spacing[0]), float(np.linalg.norm(lps[:3, 2])))
    return Geometry([int(i) for i in order], affine, (cols, rows, len(pos)), zooms)


def _pixels(ds: Dataset, label: str) -> np.ndarray:
    try:
        arr = ds.pixel_array
    except Exception as exc:  # pydicom raises several types for unsupported or corrupt encodings
        syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
        what = f"transfer syntax {syntax.name}" if syntax is not None else "pixel data"
        raise InputError(f"{label}: cannot decode its {what} ({type(exc).__name__})", 422) from None
    slope = float(ds.get("RescaleSlope", 1) or 1)
    intercept = float(ds.get("RescaleIntercept", 0) or 0)
    return arr.astype(np.float64) * slope + intercept


def assemble(
    instances: list[Instance],
    name: str,
    series_uid: str | None = None,
    max_voxels: int | None = None,
    budget: Budget | None = None,
) -> Series:
    """Choose, check and decode a series; every limit is checked from the headers before pixels are decoded."""
    chosen = choose_series(instances, name, series_uid)
    geometry = check_geometry(chosen, name)
    voxels = int(np.prod(geometry.shape, dtype=np.int64))
    if max_voxels is not None and voxels > max_voxels:
        raise InputError(f"{name}: {geometry.shape} is {voxels:,} voxels, above the limit of {max_voxels:,}", 413)
    if budget is not None:
        budget.check(name, geometry.shape, geometry.zooms, 4)
    data = np.empty(geometry.shape, dtype=np.float32)
    headers = []
    for k, index in enumerate(geometry.order):
        inst = chosen[index]
        full = inst.load()
        frame = _pixels(full, inst.label)
        if frame.shape != (geometry.shape[1], geometry.shape[0]):
            raise InputError(f"{inst.label}: pixel data of shape {frame.shape} for {geometry.shape[1]}x"
                             f"{geometry.shape[0]} declared", 422)  # fmt: skip
        data[:, :, k] = frame.T
        headers.append(inst.header)
    if not np.isfinite(data).all():
        raise InputError(f"{name}: the rescaled pixel values are not finite (RescaleSlope/RescaleIntercept)", 422)
    image = nib.Nifti1Image(data, geometry.affine)
    image.header.set_xyzt_units("mm")
    image.set_qform(geometry.affine, code=1)  # scanner coordinates
    image.set_sform(geometry.affine, code=1)
    return Series(image, headers, name)


def read_folder(
    folder: Path,
    series_uid: str | None = None,
    max_voxels: int | None = None,
    budget: Budget | None = None,
    max_files: int = 10000,
) -> Series:
    return assemble(folder_instances(folder, max_files), str(folder), series_uid, max_voxels, budget)


def read_zip(
    raw: bytes,
    name: str,
    series_uid: str | None = None,
    max_voxels: int | None = None,
    budget: Budget | None = None,
    max_files: int = 10000,
    max_bytes: int = 2 << 30,
) -> Series:
    return assemble(zip_instances(raw, name, max_files, max_bytes), name, series_uid, max_voxels, budget)


def part10(ds: Dataset) -> bytes:
    """A dataset as the bytes of a DICOM Part 10 file (preamble, DICM, file meta)."""
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def is_zip_name(name: str) -> bool:
    return name.lower().endswith(DICOM_SUFFIXES)


def zip_stem(name: str) -> str:
    """``study7.zip`` (any letter case) -> ``study7``: what a zipped series' outputs are named after."""
    return name[:-4] if is_zip_name(name) else name


@dataclass(frozen=True)
class Limits:
    """What one series may hold: instances, and a zip's uncompressed bytes (``dicom.max_files``,
    ``dicom.max_unzipped_mib``)."""

    max_files: int = 10000
    max_unzipped_bytes: int = 2 << 30

    @classmethod
    def of(cls, dicom: Any) -> Limits:
        return cls(int(dicom.max_files), int(float(dicom.max_unzipped_mib) * 2**20))
