"""A small synthetic Decathlon task: hippocampus-like curved structures with two labels (anterior, posterior).

It is laid out exactly as the Decathlon distributes a task, so every command can be exercised end to end without
downloading anything. Cases vary in size, intensity scale (orders of magnitude, as in the real Task04) and noise;
the two labels differ in contrast so that a few seconds of training already learn something measurable.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from loguru import logger
from scipy.ndimage import gaussian_filter

from mlops.errors import DatasetError

LABELS = {"0": "background", "1": "Anterior", "2": "Posterior"}
MODALITIES = ("MRI", "MRI_T2")


@dataclass(frozen=True)
class SynthSpec:
    """What to generate; defaults give a task that prepares and trains in seconds."""

    num_train: int = 16
    num_test: int = 4
    channels: int = 1
    seed: int = 0
    intensity_shift: float = 0.0


def make_case(rng: np.random.Generator, channels: int = 1) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One synthetic case: (image ``X,Y,Z`` or ``X,Y,Z,C`` float32, label ``X,Y,Z`` uint8, affine)."""
    shape = (int(rng.integers(28, 41)), int(rng.integers(36, 53)), int(rng.integers(24, 37)))
    x, y, z = np.meshgrid(*(np.arange(s, dtype=np.float32) for s in shape), indexing="ij")
    # A tube curving along y: centre line bends in x, radius tapers from head to tail.
    y0, y1 = shape[1] * 0.15, shape[1] * 0.85
    t = np.clip((y - y0) / (y1 - y0), 0, 1)
    cx = shape[0] / 2 + rng.uniform(-3, 3) + rng.uniform(2, 5) * np.sin(np.pi * t + rng.uniform(-0.5, 0.5))
    cz = shape[2] / 2 + rng.uniform(-2, 2)
    radius = rng.uniform(3.5, 5.5) * (1.0 - 0.45 * t)
    inside = ((x - cx) ** 2 + (z - cz) ** 2 <= radius**2) & (y >= y0) & (y <= y1)
    split = y0 + rng.uniform(0.35, 0.55) * (y1 - y0)
    label = np.zeros(shape, dtype=np.uint8)
    label[inside & (y < split)] = 1
    label[inside & (y >= split)] = 2

    bias = gaussian_filter(rng.normal(0, 1, shape).astype(np.float32), sigma=6)
    bias = 1 + 0.15 * bias / (np.abs(bias).max() + 1e-6)
    base = np.where(label == 1, 0.78, np.where(label == 2, 0.55, 0.25)).astype(np.float32)
    base = gaussian_filter(base, sigma=0.7) * bias
    scale = float(10 ** rng.uniform(1.7, 3.7))  # ~50 .. ~5000, like the real task's varying scanners
    chans = []
    for c in range(channels):
        contrast = base if c == 0 else (1.1 - base)  # second channel: inverted contrast, as a T2-like image
        noisy = contrast + rng.normal(0, 0.04, shape).astype(np.float32)
        chans.append(np.clip(noisy, 0, None) * scale)
    image = chans[0] if channels == 1 else np.stack(chans, axis=-1)

    spacing = rng.uniform(0.9, 1.1, 3)
    affine = np.diag([*spacing, 1.0])
    affine[:3, 3] = rng.uniform(-60, 60, 3)
    return image.astype(np.float32), label, affine


def _save(data: np.ndarray, affine: np.ndarray, path: Path) -> None:
    img = nib.Nifti1Image(data, affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    nib.save(img, path)


def generate_task(out_dir: Path, spec: SynthSpec = SynthSpec(), overwrite: bool = False) -> Path:
    """Write a Decathlon-layout task folder at ``out_dir`` and its test labels beside it (``<name>_labelsTs``).

    The folder name should follow the Decathlon convention ``TaskNN_Name`` so `mlops prepare` can derive the id.
    """
    if spec.num_train < 2 or spec.num_test < 0 or spec.channels not in (1, 2):
        raise DatasetError(f"synth: need num_train >= 2, num_test >= 0 and 1 or 2 channels, got {spec}")
    labels_ts = out_dir.with_name(out_dir.name + "_labelsTs")
    if out_dir.exists():
        if not overwrite:
            raise DatasetError(f"{out_dir}: already exists; pass --force to overwrite it")
        shutil.rmtree(out_dir)
        shutil.rmtree(labels_ts, ignore_errors=True)
    for sub in ("imagesTr", "labelsTr", "imagesTs"):
        (out_dir / sub).mkdir(parents=True)
    labels_ts.mkdir(parents=True, exist_ok=True)

    rng = np.random.default_rng(spec.seed)
    training, test = [], []
    for i in range(spec.num_train + spec.num_test):
        case = f"synth_{i:03d}.nii.gz"
        image, label, affine = make_case(rng, spec.channels)
        if i < spec.num_train:
            _save(image, affine, out_dir / "imagesTr" / case)
            _save(label, affine, out_dir / "labelsTr" / case)
            training.append({"image": f"./imagesTr/{case}", "label": f"./labelsTr/{case}"})
        else:
            _save(image * np.float32(1.0 + spec.intensity_shift), affine, out_dir / "imagesTs" / case)
            _save(label, affine, labels_ts / case)
            test.append(f"./imagesTs/{case}")

    name = out_dir.name.split("_", 1)[1] if "_" in out_dir.name else out_dir.name
    dataset = {
        "name": name,
        "description": "Synthetic hippocampus-like structures generated by `mlops synth`",
        "reference": "mlops",
        "licence": "CC0",
        "release": "1.0",
        "tensorImageSize": "3D" if spec.channels == 1 else "4D",
        "modality": {str(c): MODALITIES[c] for c in range(spec.channels)},
        "labels": LABELS,
        "numTraining": len(training),
        "numTest": len(test),
        "training": training,
        "test": test,
    }
    (out_dir / "dataset.json").write_text(json.dumps(dataset, indent=4))
    logger.info(f"Synthetic task: {len(training)} training and {len(test)} test cases in {out_dir}")
    return out_dir
