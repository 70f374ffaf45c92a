"""`mlops predict --preview`: a PNG beside a segmentation, to see a result without a viewer.

Three orthogonal slices (sagittal, coronal, axial, in RAS orientation) through the segmentation's centre of mass,
the scan in grey and each label filled opaque in its colour from :mod:`mlops.palette` (the page's colours), the label
volumes in the title. matplotlib's Agg backend: no display needed.
"""

from __future__ import annotations

import os
from pathlib import Path

import nibabel as nib
import numpy as np

from mlops.palette import colour


def preview_path(output: Path) -> Path:
    """``case_seg.nii.gz`` -> ``case_seg.png`` beside it."""
    name = output.name
    for suffix in (".nii.gz", ".nii"):
        if name.lower().endswith(suffix):
            name = name[: -len(suffix)]
            break
    return output.with_name(name + ".png")


def centre_of_mass(seg: np.ndarray) -> tuple[int, int, int]:
    """Voxel centre of mass of the foreground; the volume's centre when nothing was segmented."""
    idx = np.argwhere(seg > 0)
    if len(idx) == 0:
        return tuple(int(s) // 2 for s in seg.shape[:3])  # type: ignore[return-value]
    return tuple(round(float(c)) for c in idx.mean(axis=0))  # type: ignore[return-value]


def overlay_rgba(seg2d: np.ndarray) -> np.ndarray:
    """Opaque label colours where a label is, transparent elsewhere (uint8 RGBA)."""
    rgba = np.zeros((*seg2d.shape, 4), np.uint8)
    for value in np.unique(seg2d):
        if value == 0:
            continue
        rgba[seg2d == value] = (*colour(int(value)), 255)
    return rgba


def write_preview(image: Path, segmentation: Path, labels: dict[int, str], volumes_mm3: dict[str, float]) -> Path:
    """Render the PNG for ``segmentation`` of ``image`` next to the segmentation (atomically); returns its path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    img = nib.as_closest_canonical(nib.load(image))
    seg_img = nib.as_closest_canonical(nib.load(segmentation))
    data = np.asanyarray(img.dataobj, dtype=np.float32)
    if data.ndim == 4:
        data = data[..., 0]  # first channel for the picture
    seg = np.asanyarray(seg_img.dataobj).astype(np.int32)
    zooms = [float(z) for z in seg_img.header.get_zooms()[:3]]
    ci, cj, ck = centre_of_mass(seg)
    lo, hi = (float(v) for v in np.percentile(data, [0.5, 99.5])) if data.size else (0.0, 1.0)
    # (slice of scan, slice of seg, aspect = height spacing / width spacing); arrays are transposed so that
    # rows run superior (or anterior) -> inferior with origin="lower".
    views = [
        ("sagittal", data[ci, :, :].T, seg[ci, :, :].T, zooms[2] / zooms[1]),
        ("coronal", data[:, cj, :].T, seg[:, cj, :].T, zooms[2] / zooms[0]),
        ("axial", data[:, :, ck].T, seg[:, :, ck].T, zooms[1] / zooms[0]),
    ]
    fig, axes = plt.subplots(1, 3, figsize=(12, 4.6), dpi=100)
    for ax, (title, scan2d, seg2d, aspect) in zip(axes, views, strict=True):
        ax.imshow(scan2d, cmap="gray", vmin=lo, vmax=hi if hi > lo else lo + 1, origin="lower", aspect=aspect,
                  interpolation="nearest")  # fmt: skip
        ax.imshow(overlay_rgba(seg2d), origin="lower", aspect=aspect, interpolation="nearest")
        ax.set_title(title, fontsize=10)
        ax.set_axis_off()
    handles = [
        Patch(facecolor=np.array(colour(v)) / 255, label=f"{v} {name}") for v, name in sorted(labels.items()) if v
    ]
    fig.legend(handles=handles, loc="lower center", ncol=max(1, len(handles)), frameon=False)
    volumes = ", ".join(f"{name} {mm3:,.0f} mm³ ({mm3 / 1000:.2f} mL)" for name, mm3 in volumes_mm3.items())
    fig.suptitle(f"{Path(image).name}: {volumes or 'no labels'}", fontsize=11)
    out = preview_path(segmentation)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.part.png")
    try:
        fig.savefig(tmp, format="png")
        tmp.replace(out)
    finally:
        plt.close(fig)
        tmp.unlink(missing_ok=True)
    return out
