"""NIfTI volumes in and out: safe decoding of uploads, input checks, geometry-preserving output, label volumes.

Uploads are decoded in memory. The header is read first (only the first few hundred bytes are decompressed), so a
small gzip that expands to a huge volume is refused before it is inflated.
"""

from __future__ import annotations

import gzip
import io
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np

from mlops.errors import MlopsError

GZIP_MAGIC = b"\x1f\x8b"
HEADER_BYTES = 540  # NIfTI-2 header; NIfTI-1 is 348
MM_PER_UNIT = {"mm": 1.0, "meter": 1000.0, "micron": 0.001, "unknown": 1.0}


class InputError(MlopsError):
    """An input volume that cannot be segmented; ``status`` is the HTTP status the service answers with."""

    def __init__(self, message: str, status: int = 422) -> None:
        super().__init__(message)
        self.status = status


def _header_from(head: bytes, name: str) -> nib.Nifti1Header:
    if len(head) < 348:
        raise InputError(f"{name}: not a NIfTI file (only {len(head)} header bytes)", 400)
    for order in ("<", ">"):
        size = int.from_bytes(head[:4], "little" if order == "<" else "big")
        if size == 348:
            return nib.Nifti1Header.from_fileobj(io.BytesIO(head[:348]), check=False)
        if size == 540 and len(head) >= 540:
            return nib.Nifti2Header.from_fileobj(io.BytesIO(head[:540]), check=False)
    raise InputError(f"{name}: not a NIfTI-1/NIfTI-2 file (bad header size field)", 400)


def decode_nifti(raw: bytes, name: str, max_voxels: int | None = None) -> nib.Nifti1Image:
    """A NIfTI image from the bytes of a ``.nii`` or ``.nii.gz`` file, refusing oversized volumes before inflating."""
    if not raw:
        raise InputError(f"{name}: empty file", 400)
    compressed = raw[:2] == GZIP_MAGIC
    try:
        head = zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(raw, HEADER_BYTES) if compressed else raw[:540]
    except zlib.error as exc:
        raise InputError(f"{name}: corrupt gzip stream ({exc})", 400) from exc
    if compressed and len(head) < 348:
        raise InputError(f"{name}: corrupt or truncated gzip stream ({len(head)} bytes inflate)", 400)
    header = _header_from(head, name)
    shape = tuple(int(d) for d in header.get_data_shape())
    voxels = int(np.prod(shape, dtype=np.int64)) if shape else 0
    if voxels == 0:
        raise InputError(f"{name}: the header declares no voxels (shape {shape})", 400)
    if max_voxels is not None and voxels > max_voxels:
        raise InputError(f"{name}: {shape} is {voxels:,} voxels, above the limit of {max_voxels:,}", 413)
    expected = int(header.get_data_offset()) + voxels * header.get_data_dtype().itemsize
    if compressed:
        inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)
        try:
            raw = inflater.decompress(raw, expected + 1)
        except zlib.error as exc:
            raise InputError(f"{name}: corrupt gzip stream ({exc})", 400) from exc
    if len(raw) < expected:
        raise InputError(f"{name}: truncated: {len(raw):,} of {expected:,} bytes of image data", 400)
    try:
        klass = nib.Nifti2Image if isinstance(header, nib.Nifti2Header) else nib.Nifti1Image
        return klass.from_bytes(raw[:expected])
    except Exception as exc:
        raise InputError(f"{name}: unreadable NIfTI ({type(exc).__name__}: {exc})", 400) from exc


def load_nifti(path: Path, max_voxels: int | None = None) -> nib.Nifti1Image:
    if not path.is_file():
        raise InputError(f"{path}: no such file", 400)
    if not path.name.endswith((".nii", ".nii.gz")):
        raise InputError(f"{path}: expected a .nii or .nii.gz file", 400)
    return decode_nifti(path.read_bytes(), str(path), max_voxels)


def check_volume(img: nib.Nifti1Image, name: str, num_channels: int = 1) -> np.ndarray:
    """The voxel array a model with ``num_channels`` inputs can segment: 3D, or 4D with channels last; finite."""
    shape = img.shape
    while len(shape) > 3 and shape[-1] == 1 and (num_channels == 1 or len(shape) > 4):
        shape = shape[:-1]  # trailing singleton dimensions (x, y, z, 1) are still a 3D volume
    if len(shape) < 3:
        raise InputError(f"{name}: {len(shape)}D image {img.shape}; the model segments 3D volumes")
    if num_channels == 1 and len(shape) != 3:
        raise InputError(f"{name}: {len(shape)}D image {img.shape}; the model segments single-channel 3D volumes")
    if num_channels > 1 and (len(shape) != 4 or shape[3] != num_channels):
        raise InputError(f"{name}: image {img.shape}; the model expects 4D with {num_channels} channels last")
    if min(shape[:3]) < 2:
        raise InputError(f"{name}: image {img.shape} is too thin to segment as a volume")
    try:
        data = np.asanyarray(img.dataobj).reshape(shape)
    except Exception as exc:
        raise InputError(f"{name}: unreadable voxel data ({type(exc).__name__}: {exc})", 400) from exc
    if data.dtype.kind == "f" and not np.isfinite(data).all():
        raise InputError(f"{name}: contains NaN or infinite voxels")
    if data.dtype.kind not in "biuf":
        raise InputError(f"{name}: unsupported voxel type {data.dtype}")
    return data


def like(data: np.ndarray, src: nib.Nifti1Image) -> nib.Nifti1Image:
    """``data`` as an image with ``src``'s exact geometry: qform, sform and their codes, pixdim, units."""
    header = src.header.copy()
    header.set_data_dtype(data.dtype)
    header.set_slope_inter(None, None)
    img = type(src)(data, None, header=header)
    img.set_qform(src.get_qform(), code=int(src.header["qform_code"]))
    img.set_sform(src.get_sform(), code=int(src.header["sform_code"]))
    return img


def segmentation_like(seg: np.ndarray, src: nib.Nifti1Image) -> nib.Nifti1Image:
    img = like(seg.astype(np.uint8), src)
    img.header["cal_min"], img.header["cal_max"] = 0, float(seg.max()) if seg.size else 0
    img.header["intent_code"] = 1002  # NIFTI_INTENT_LABEL
    return img


def to_gzip_bytes(img: nib.Nifti1Image, level: int = 6) -> bytes:
    return gzip.compress(img.to_bytes(), compresslevel=level)


def voxel_volume_mm3(img: nib.Nifti1Image) -> float:
    unit = img.header.get_xyzt_units()[0] or "unknown"
    scale = MM_PER_UNIT.get(unit, 1.0)
    return float(np.prod([float(z) * scale for z in img.header.get_zooms()[:3]]))


def label_volumes(seg: np.ndarray, img: nib.Nifti1Image, labels: dict[int, str]) -> dict[str, float]:
    """Volume of each foreground label in mm³ (voxel count times voxel volume)."""
    counts = np.bincount(seg.ravel(), minlength=max(labels, default=0) + 1)
    unit = voxel_volume_mm3(img)
    return {name: round(float(counts[v]) * unit, 3) for v, name in sorted(labels.items()) if v != 0}
