"""NIfTI volumes in and out: safe decoding of uploads, input checks, geometry-preserving output, label volumes.

Uploads are decoded in memory. The header is read first (only the first few hundred bytes are decompressed), so a
small gzip that expands to a huge volume is refused before it is inflated.
"""

from __future__ import annotations

import gzip
import io
import math
import re
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from mlops.errors import DatasetError, MlopsError

GZIP_MAGIC = b"\x1f\x8b"
HEADER_BYTES = 540  # NIfTI-2 header; NIfTI-1 is 348
MAX_DATA_OFFSET = 16 << 20  # vox_offset beyond the header: extensions, never megabytes
NIFTI_SUFFIXES = (".nii.gz", ".nii")  # longest first: stripping ".nii" from "x.nii.gz" would leave "x.nii"
MM_PER_UNIT = {"mm": 1.0, "meter": 1000.0, "micron": 0.001, "unknown": 1.0}
FLOAT32_MAX = float(np.finfo(np.float32).max)
CHANNEL_SUFFIX = re.compile(r"_0000(\.nii(\.gz)?)$", re.IGNORECASE)  # nnU-Net's channel 0: case_0000.nii.gz
CHANNEL_ANY = re.compile(r"_(\d{4})\.nii(\.gz)?$", re.IGNORECASE)  # any channel: case_0001.nii.gz


class InputError(MlopsError):
    """An input volume that cannot be segmented; ``status`` is the HTTP status the service answers with."""

    def __init__(self, message: str, status: int = 422) -> None:
        super().__init__(message)
        self.status = status


def is_nifti_name(name: str) -> bool:
    """``.nii`` or ``.nii.gz`` in any letter case (``CASE.NII.GZ`` from a scanner export is a NIfTI too)."""
    return name.lower().endswith(NIFTI_SUFFIXES)


def strip_suffix(name: str) -> str:
    """``case.nii.gz`` (any letter case) -> ``case``; other names unchanged."""
    for suffix in NIFTI_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def output_name(path: Path) -> str:
    """nnU-Net's convention: ``case_0000.nii.gz`` (channel 0) is segmented as ``case.nii.gz``."""
    return strip_suffix(CHANNEL_SUFFIX.sub(r"\1", path.name)) + ".nii.gz"


@dataclass(frozen=True)
class HeaderInfo:
    """What the header promises, validated before any voxel is inflated."""

    shape: tuple[int, ...]
    dtype: np.dtype
    zooms: tuple[float, ...]  # spacing of the spatial axes (header units, as the model is given them)
    offset: int
    scaled: bool  # scl_slope/scl_inter apply: nibabel returns floats

    @property
    def voxels(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    @property
    def nbytes(self) -> int:
        return self.voxels * self.dtype.itemsize

    @property
    def loaded_itemsize(self) -> int:
        """Bytes per voxel of the array nibabel hands back (scaled integers come back as float64)."""
        return 8 if self.scaled else self.dtype.itemsize


@dataclass(frozen=True)
class ModelGrid:
    """What a request costs depends on: the grid the network works at and the arrays it keeps per voxel."""

    target_spacing: tuple[float, float, float]  # mm per voxel, nibabel's i, j, k order
    patch_size: tuple[int, int, int]
    num_channels: int
    num_classes: int  # background included
    passes_per_tile: int = 1  # network passes over one tile: mirrored passes (if mirroring may be asked) x folds
    tile_step_size: float = 0.5

    @classmethod
    def of(cls, segmenter: object) -> ModelGrid:
        s: Any = segmenter
        mirrors = 2 ** len(s.model.mirror_axes or ()) if hasattr(s, "model") else 1
        passes = mirrors * max(1, len(getattr(s, "folds", ()) or ()))
        step = float(getattr(s, "tile_step_size", 0.5))
        return cls(tuple(s.target_spacing), tuple(s.patch_size), int(s.num_channels), max(2, len(s.labels)), passes,
                   step)  # fmt: skip

    def tiles(self, resampled: tuple[int, ...]) -> int:
        """Sliding-window tiles over a volume of ``resampled`` voxels at this grid (nnU-Net's step rule)."""
        count = 1
        for n, p in zip(resampled, self.patch_size, strict=False):
            count *= math.ceil((n - p) / (p * self.tile_step_size)) + 1 if n > p else 1
        return count


@dataclass(frozen=True)
class Budget:
    """A ceiling on a request's working memory, estimated after resampling to the model's spacing.

    ``serve.max_voxels`` counts input voxels only; a 16³ volume with 300 mm voxels is 4800³ at 1 mm. The estimate
    (bytes per voxel of the input grid plus bytes per voxel of the model's grid) counts the arrays inference holds:
    the decoded input and its float32 copy, the preprocessed float32 input, the float32 logits summed over tiles, the
    logits resampled back to the input grid, and the label map. It is an estimate of the same order as the measured
    peak (benchmarks/bench_load.py), not an exact figure.
    """

    grid: ModelGrid
    max_bytes: int
    max_passes: int | None = None

    def resampled_shape(self, shape: tuple[int, ...], zooms: tuple[float, ...]) -> tuple[int, ...]:
        return tuple(round(n * z / t) for n, z, t in zip(shape[:3], zooms[:3], self.grid.target_spacing, strict=False))

    def estimate(self, shape: tuple[int, ...], zooms: tuple[float, ...], itemsize: int) -> tuple[int, tuple]:
        """(bytes, resampled shape) of segmenting a volume of ``shape`` and spacing ``zooms``."""
        g = self.grid
        resampled = self.resampled_shape(shape, zooms)
        padded = [max(n, p) for n, p in zip(resampled, g.patch_size, strict=False)]  # nnU-Net pads to the patch
        original = int(np.prod([int(n) for n in shape[:3]], dtype=np.float64))
        model = int(np.prod(padded, dtype=np.float64))
        per_original = g.num_channels * (itemsize + 4) + 8 * g.num_classes + 1
        per_model = 8 * g.num_channels + 12 * g.num_classes + 4  # fp32 logits: per fold, summed, and returned
        return original * per_original + model * per_model, resampled

    def check(self, name: str, shape: tuple[int, ...], zooms: tuple[float, ...], itemsize: int) -> int:
        """The estimated bytes, or InputError: 422 when resampling leaves nothing to segment, 413 above budget."""
        cost, resampled = self.estimate(shape, zooms, itemsize)
        target = "x".join(f"{t:g}" for t in self.grid.target_spacing)
        if min(resampled, default=0) < 1:
            raise InputError(
                f"{name}: spacing {_fmt_zooms(zooms)} mm makes {tuple(shape[:3])} less than one voxel "
                f"({tuple(resampled)}) at the model's {target} mm grid"
            )
        if cost > self.max_bytes:
            raise InputError(
                f"{name}: {tuple(shape[:3])} voxels of {_fmt_zooms(zooms)} mm are {tuple(resampled)} at the model's "
                f"{target} mm grid, about {cost / 2**20:,.0f} MiB of working memory, above the limit of "
                f"{self.max_bytes / 2**20:,.0f} MiB",
                413,
            )
        tiles = self.grid.tiles(resampled)
        passes = tiles * self.grid.passes_per_tile
        if self.max_passes is not None and passes > self.max_passes:
            raise InputError(
                f"{name}: {tuple(shape[:3])} voxels of {_fmt_zooms(zooms)} mm are {tuple(resampled)} at the model's "
                f"{target} mm grid: {tiles} tiles x {self.grid.passes_per_tile} passes (mirrors x folds) = {passes:,} "
                f"network passes, above the limit of {self.max_passes:,} (serve.max_passes)",
                413,
            )
        return cost


def _fmt_zooms(zooms: tuple[float, ...]) -> str:
    return "x".join(f"{z:.4g}" for z in zooms[:3])


def _header_from(head: bytes, name: str) -> nib.Nifti1Header:
    if len(head) < 348:
        raise InputError(f"{name}: not a NIfTI file (only {len(head)} header bytes)", 400)
    for order in ("<", ">"):
        size = int.from_bytes(head[:4], "little" if order == "<" else "big")
        if size not in (348, 540) or (size == 540 and len(head) < 540):
            continue
        klass = nib.Nifti1Header if size == 348 else nib.Nifti2Header
        try:
            header = klass.from_fileobj(io.BytesIO(head[:size]), check=False)
        except Exception as exc:
            raise InputError(f"{name}: unreadable NIfTI header ({type(exc).__name__})", 400) from None
        if header.endianness != order:  # nibabel guesses the byte order from dim[0]; sizeof_hdr settles it
            at, kind = (40, "i2") if size == 348 else (16, "i8")
            dim0 = int(np.frombuffer(head, order + kind, count=1, offset=at)[0])
            raise InputError(f"{name}: dim[0]={dim0} is not a number of dimensions (1-7)", 400)
        return header
    raise InputError(f"{name}: not a NIfTI-1/NIfTI-2 file (bad header size field)", 400)


def inspect_header(header: nib.Nifti1Header, name: str) -> HeaderInfo:
    """Validate every header field decoding relies on; each problem is an InputError naming the field."""
    dim = [int(d) for d in header["dim"]]
    if not 1 <= dim[0] <= 7:
        raise InputError(f"{name}: dim[0]={dim[0]} is not a number of dimensions (1-7)", 400)
    shape = tuple(dim[1 : dim[0] + 1])
    if any(n < 0 for n in shape):
        raise InputError(f"{name}: negative dimension in the header (shape {shape})", 400)
    if 0 in shape:
        raise InputError(f"{name}: the header declares no voxels (shape {shape})", 400)
    code = int(header["datatype"])
    try:
        dtype = np.dtype(header.get_data_dtype())
    except Exception:
        raise InputError(f"{name}: unknown NIfTI datatype code {code}", 400) from None
    if dtype.kind not in "biuf":
        raise InputError(
            f"{name}: voxel type {dtype} (NIfTI datatype {code}) is not supported; the model takes integer or "
            "real-valued scans"
        )
    offset = float(header["vox_offset"])
    if offset == 0:  # older writers leave it 0 in single files; nibabel reads the data right after the header
        offset = float(header.single_vox_offset)
    minimum = header.sizeof_hdr
    if not np.isfinite(offset) or offset < minimum or offset > MAX_DATA_OFFSET:
        raise InputError(
            f"{name}: vox_offset {offset:g} is not a data offset (expected {minimum} to {MAX_DATA_OFFSET:,} bytes)", 400
        )
    pixdim = [float(p) for p in header["pixdim"][1 : 1 + min(3, len(shape))]]
    if not all(np.isfinite(p) and p > 0 for p in pixdim):
        raise InputError(f"{name}: voxel spacing (pixdim) {pixdim} must be positive and finite")
    codes = sorted(nib.nifti1.xform_codes.value_set())
    for field in ("qform_code", "sform_code"):
        if int(header[field]) not in codes:
            raise InputError(f"{name}: {field} {int(header[field])} is not a NIfTI transform code {codes}", 400)
    quatern = [float(header[f]) for f in ("quatern_b", "quatern_c", "quatern_d", "qoffset_x", "qoffset_y", "qoffset_z")]
    srows = [float(v) for f in ("srow_x", "srow_y", "srow_z") for v in header[f]]
    if not all(np.isfinite(v) for v in quatern + srows):
        raise InputError(f"{name}: the orientation (quatern_*, qoffset_*, srow_*) holds NaN or infinite values", 400)
    if sum(q * q for q in quatern[:3]) > 1 + 1e-6:
        raise InputError(f"{name}: quatern_b/c/d {quatern[:3]} are not a unit quaternion", 400)
    slope, inter = float(header["scl_slope"]), float(header["scl_inter"])
    scaled = False
    if not (np.isnan(slope) or slope == 0):  # NIfTI: slope 0 or NaN means unscaled
        inter = 0.0 if np.isnan(inter) else inter
        if not (np.isfinite(slope) and np.isfinite(inter)):
            raise InputError(f"{name}: scl_slope {slope:g} / scl_inter {inter:g} must be finite")
        scaled = slope != 1 or inter != 0
    if scaled and dtype.kind in "iu":
        info = np.iinfo(dtype)
        if max(abs(info.min * slope + inter), abs(info.max * slope + inter)) > FLOAT32_MAX:
            raise InputError(
                f"{name}: scl_slope {slope:g} scales {dtype} voxels beyond the float32 range the model works in"
            )
    return HeaderInfo(shape, dtype, tuple(pixdim), int(offset), bool(scaled))


def _inflate(raw: bytes, name: str, limit: int) -> bytes:
    """At most ``limit`` bytes of a gzip stream, across members (multi-member gzip is valid gzip)."""
    out = bytearray()
    data = raw
    while data[:2] == GZIP_MAGIC and len(out) < limit:
        inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)
        try:
            out += inflater.decompress(data, limit - len(out))
        except zlib.error as exc:
            raise InputError(f"{name}: corrupt gzip stream ({exc})", 400) from None
        if not inflater.eof:  # the limit was reached, or the stream ends early (reported as truncation)
            break
        data = inflater.unused_data
    return bytes(out)


def decode_nifti(raw: bytes, name: str, max_voxels: int | None = None, budget: Budget | None = None) -> nib.Nifti1Image:
    """A NIfTI image from the bytes of a ``.nii`` or ``.nii.gz`` file.

    Everything that bounds the cost (voxel count, voxel type, the budget after resampling) is checked from the header
    before the data is inflated; a hostile header is an InputError, never an exception from deep inside nibabel.
    """
    if not raw:
        raise InputError(f"{name}: empty file", 400)
    compressed = raw[:2] == GZIP_MAGIC
    head = _inflate(raw, name, HEADER_BYTES) if compressed else raw[:HEADER_BYTES]
    if compressed and len(head) < 348:
        raise InputError(f"{name}: corrupt or truncated gzip stream ({len(head)} bytes inflate)", 400)
    header = _header_from(head, name)
    info = inspect_header(header, name)
    if max_voxels is not None and info.voxels > max_voxels:
        raise InputError(f"{name}: {info.shape} is {info.voxels:,} voxels, above the limit of {max_voxels:,}", 413)
    if budget is not None and len(info.shape) >= 3:
        budget.check(name, info.shape, info.zooms, info.loaded_itemsize)
    expected = info.offset + info.nbytes
    if compressed:
        raw = _inflate(raw, name, expected + 1)
    if len(raw) < expected:
        raise InputError(f"{name}: truncated: {len(raw):,} of {expected:,} bytes of image data", 400)
    try:
        klass = nib.Nifti2Image if isinstance(header, nib.Nifti2Header) else nib.Nifti1Image
        return klass.from_bytes(raw[:expected])
    except Exception as exc:
        raise InputError(f"{name}: unreadable NIfTI ({type(exc).__name__})", 400) from None


def load_nifti(path: Path, max_voxels: int | None = None, budget: Budget | None = None) -> nib.Nifti1Image:
    if not path.is_file():
        raise InputError(f"{path}: no such file", 400)
    if not is_nifti_name(path.name):
        raise InputError(f"{path}: expected a .nii or .nii.gz file", 400)
    return decode_nifti(path.read_bytes(), str(path), max_voxels, budget)


def check_volume(img: nib.Nifti1Image, name: str, num_channels: int = 1, budget: Budget | None = None) -> np.ndarray:
    """The voxel array a model with ``num_channels`` inputs can segment: 3D, or 4D with channels last; finite.

    With a ``budget``, the decoded array is checked again (its real shape and dtype, after nibabel's scaling).
    """
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
        raise InputError(f"{name}: unreadable voxel data ({type(exc).__name__})", 400) from None
    if data.dtype.kind not in "biuf":
        raise InputError(f"{name}: unsupported voxel type {data.dtype}")
    if budget is not None:
        zooms = tuple(float(z) for z in img.header.get_zooms()[:3])
        budget.check(name, data.shape, zooms, data.dtype.itemsize)
    if data.dtype.kind == "f":
        if not np.isfinite(data).all():
            raise InputError(f"{name}: contains NaN or infinite voxels")
        if data.dtype.itemsize > 4 and data.size and float(np.abs(data).max()) > FLOAT32_MAX:
            slope = img.header["scl_slope"]
            raise InputError(
                f"{name}: voxel values beyond the float32 range the model works in (scl_slope {float(slope):g})"
            )
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
    try:
        unit = img.header.get_xyzt_units()[0] or "unknown"
    except KeyError:  # a unit code NIfTI does not define: taken as mm, like "unknown"
        unit = "unknown"
    scale = MM_PER_UNIT.get(unit, 1.0)
    return float(np.prod([float(z) * scale for z in img.header.get_zooms()[:3]]))


def label_volumes(seg: np.ndarray, img: nib.Nifti1Image, labels: dict[int, str]) -> dict[str, float]:
    """Volume of each foreground label in mm³ (voxel count times voxel volume)."""
    counts = np.bincount(seg.ravel(), minlength=max(labels, default=0) + 1)
    unit = voxel_volume_mm3(img)
    return {name: round(float(counts[v]) * unit, 3) for v, name in sorted(labels.items()) if v != 0}


def label_names(labels: dict[int, str]) -> dict[str, str]:
    """Label id -> name with string keys in id order, as JSON clients (the CLI's --json, /info, the page) read it."""
    return {str(k): v for k, v in sorted(labels.items())}


def case_id(path: Path) -> str:
    """``hippocampus_001.nii.gz`` and nnU-Net's ``hippocampus_001_0000.nii.gz`` -> ``hippocampus_001``."""
    return strip_suffix(path.name).removesuffix("_0000")


def channel_files(first: Path, channels: int) -> list[Path]:
    """``case_0000.nii.gz`` -> the files of every channel of an nnU-Net raw case."""
    name = first.name
    return (
        [first.with_name(name.replace("_0000.nii", f"_{c:04d}.nii")) for c in range(channels)]
        if channels > 1
        else [first]
    )


def read_case_arrays(path: Path, channels: int) -> tuple[np.ndarray, tuple[float, ...], np.ndarray]:
    """(data (i, j, k[, c]), spacing, affine) of a case; errors name the file."""
    try:
        imgs = [nib.load(p) for p in channel_files(path, channels)]
        arrays = [np.asanyarray(i.dataobj).astype(np.float32) for i in imgs]
    except Exception as exc:
        raise DatasetError(f"{path}: unreadable volume ({type(exc).__name__}: {exc})") from exc
    data = arrays[0] if len(arrays) == 1 else np.stack(arrays, axis=-1)
    return data, tuple(float(z) for z in imgs[0].header.get_zooms()[:3]), imgs[0].affine
