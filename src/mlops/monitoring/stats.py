"""Per-case input statistics: raw intensities, what the network sees after nnU-Net's normalisation, and geometry.

The model z-scores each MRI case, so the raw scale barely matters to it; noise, bias field, resolution and orientation
do. Those show in the normalised image: its percentiles, a noise index (neighbour differences relative to the spread)
and a bias index (the largest difference between the two halves of the volume along one axis).
"""

from __future__ import annotations

import nibabel as nib
import numpy as np

PERCENTILES = (1, 5, 50, 95, 99)
MAX_SAMPLE = 2_000_000  # voxels used for percentiles; larger volumes are sampled with a fixed stride

RAW_COLUMNS = [
    "intensity_mean",
    "intensity_std",
    "intensity_min",
    "intensity_max",
    *(f"intensity_p{p}" for p in PERCENTILES),
    "zero_fraction",
]
GEOMETRY_COLUMNS = ["shape_x", "shape_y", "shape_z", "spacing_x", "spacing_y", "spacing_z"]
NORM_COLUMNS = ["norm_std", *(f"norm_p{p}" for p in PERCENTILES), "norm_noise", "norm_bias"]
CATEGORICAL_COLUMNS = ["orientation"]
INTENSITY_COLUMNS = {c for c in RAW_COLUMNS if c.startswith("intensity")}  # plotted on a log scale


def _sample(values: np.ndarray) -> np.ndarray:
    step = max(1, values.size // MAX_SAMPLE)
    return values[::step]


def raw_stats(data: np.ndarray, zooms: tuple[float, ...]) -> dict[str, float]:
    """Raw intensity statistics and shape/spacing of one volume (i, j, k[, c]); first channel of a 4D volume."""
    if data.ndim == 4:
        data = data[..., 0]
    if data.ndim != 3:
        raise ValueError(f"expected a 3D volume, got shape {data.shape}")
    values = np.asarray(data).astype(np.float64, copy=False).ravel()
    sample = _sample(values)
    pct = np.percentile(sample, PERCENTILES)
    row = {
        "intensity_mean": float(values.mean()),
        "intensity_std": float(values.std()),
        "intensity_min": float(values.min()),
        "intensity_max": float(values.max()),
        **{f"intensity_p{p}": float(v) for p, v in zip(PERCENTILES, pct, strict=True)},
        "zero_fraction": float(np.count_nonzero(values == 0) / values.size),
    }
    row.update({f"shape_{a}": float(s) for a, s in zip("xyz", data.shape, strict=True)})
    row.update({f"spacing_{a}": float(z) for a, z in zip("xyz", zooms[:3], strict=True)})
    return row


def orientation(affine: np.ndarray) -> str:
    """Orientation code of the voxel axes (e.g. ``RAS``, ``LPS``), from the affine nibabel reads."""
    return "".join(nib.aff2axcodes(affine))


def normalised_stats(prepared: np.ndarray) -> dict[str, float]:
    """Statistics of the first channel of nnU-Net's preprocessed case (c, z, y, x): what the network sees."""
    vol = np.asarray(prepared[0], dtype=np.float32)
    sample = _sample(vol.ravel()).astype(np.float64)
    std = float(sample.std()) or 1.0
    pct = np.percentile(sample, PERCENTILES)
    # Noise: median absolute difference of neighbours (along every axis), relative to the spread. Smooth anatomy
    # gives small differences; added noise raises them everywhere.
    diffs = [np.median(np.abs(np.diff(vol, axis=a))) for a in range(vol.ndim) if vol.shape[a] > 1]
    noise = float(np.mean(diffs)) / std if diffs else 0.0
    # Bias: the largest difference between the means of the two halves of the volume along one axis.
    halves = []
    for a in range(vol.ndim):
        n = vol.shape[a] // 2
        if n:
            lo, hi = np.take(vol, range(n), axis=a), np.take(vol, range(vol.shape[a] - n, vol.shape[a]), axis=a)
            halves.append(abs(float(lo.mean()) - float(hi.mean())) / std)
    return {
        "norm_std": float(sample.std()),
        **{f"norm_p{p}": float(v) for p, v in zip(PERCENTILES, pct, strict=True)},
        "norm_noise": noise,
        "norm_bias": max(halves) if halves else 0.0,
    }


def input_statistics(data: np.ndarray, spacing: tuple[float, ...], affine: np.ndarray, normalised: np.ndarray) -> dict:
    """Everything monitoring records of an input: raw statistics, geometry, orientation and what the network sees
    (``normalised``: the case after nnU-Net's normalisation and resampling)."""
    return {**raw_stats(data, spacing), "orientation": orientation(affine), **normalised_stats(normalised)}
