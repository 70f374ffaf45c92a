"""Near ties: the one rule for comparing our labels with nnU-Net's on the same weights (parity tests, benchmarks).

Two faithful implementations of one network round differently: nnU-Net sums Gaussian-weighted tiles into a float16
array even on the CPU, we sum in float32; OpenVINO and ONNX Runtime fuse operations in their own order; bf16 keeps 8
bits of mantissa. So a voxel may get another label only where nnU-Net's own two most probable classes are nearly
tied. The rule, stated once: **every voxel whose label differs from nnU-Net's must have a top-two probability gap
(p1 - p2 of nnU-Net's softmax on the input grid) below the precision's margin.** A flip where nnU-Net was sure is a
real difference and fails, however few; any number of near-tie flips passes, so a weakly trained model (many near
ties) cannot make the test flaky, and a confident one cannot hide a bug behind a voxel budget.

Margins, and where they come from (`python -m tests.parity MODEL_DIR IMAGES [N]` prints, per backend, the voxels
that flipped and the largest nnU-Net gap at a flip, for checking them on any model):
- fp32 (torch, OpenVINO, ONNX Runtime): 0.02. nnU-Net's float16 sum is off by at most ~4e-3 x the largest logit where
  tiles overlap well (test_fp32_torch_gives_nnunet_labels bounds it), a few hundredths for logits of ~10; two
  logits that close give a top-two probability gap of at most ~0.01 (p1 - p2 = tanh(d / 2) for two classes).
  Measured on the synthetic model (8 mirrored passes; 3 cases, one spanning many tiles): no voxel flipped. At tile
  rims, where the summed Gaussian weight is tiny, nnU-Net's error can reach ~0.3 (a gap of ~0.15): no flip was seen
  there either; one would fail with its gap, and then this margin needs the rim's own figure, not a looser count.
- bf16: 0.15. Eight mantissa bits put ~2^-8 of relative error on each logit (~0.04 at 10, ~0.08 on a difference),
  accumulated over the network's layers; 0.15 allows about twice that. On this machine (AVX512-BF16) the bf16 tests
  run: torch and OpenVINO bf16 passed the rule on the synthetic cases; the largest gap at a flip was not recorded.
"""

from __future__ import annotations

import numpy as np

MARGIN = {"fp32": 0.02, "bf16": 0.15}


def top_two_gap(probabilities: np.ndarray) -> np.ndarray:
    """p1 - p2 per voxel of a softmax in nnU-Net's layout (classes, z, y, x), returned in nibabel's (i, j, k)."""
    top = np.sort(probabilities, axis=0)
    return np.ascontiguousarray((top[-1] - top[-2]).transpose(2, 1, 0))


def flips_outside_near_ties(got: np.ndarray, reference: np.ndarray, gap: np.ndarray, precision: str) -> dict:
    """Figures of a comparison: voxels that differ, and those of them where nnU-Net was not nearly tied."""
    differ = got != reference
    gaps = gap[differ]
    return {
        "flipped": int(differ.sum()),
        "not_near_ties": int((gaps >= MARGIN[precision]).sum()),
        "largest_gap_at_a_flip": float(gaps.max()) if gaps.size else 0.0,
        "margin": MARGIN[precision],
    }


def assert_same_labels(got: np.ndarray, reference: np.ndarray, gap: np.ndarray, precision: str, what: str) -> int:
    """The rule above; returns the number of (near-tie) flips for the caller's own bookkeeping."""
    assert got.shape == reference.shape, (what, got.shape, reference.shape)
    figures = flips_outside_near_ties(got, reference, gap, precision)
    assert figures["not_near_ties"] == 0, f"{what}: labels differ from nnU-Net where it was sure: {figures}"
    return figures["flipped"]


if __name__ == "__main__":  # python -m tests.parity MODEL_DIR IMAGES [N]: measure the gaps at flips per backend
    import shutil
    import subprocess
    import sys
    import tempfile
    from pathlib import Path

    import nibabel as nib
    from loguru import logger

    from mlops.inference import Segmenter

    source, images = Path(sys.argv[1]), Path(sys.argv[2])
    count = int(sys.argv[3]) if len(sys.argv) > 3 else 30
    with tempfile.TemporaryDirectory() as tmp:
        model = Path(tmp) / source.name
        shutil.copytree(source, model)
        mlops = Path(sys.executable).parent / "mlops"
        subprocess.run([str(mlops), "export", "--model", str(model)], check=True, capture_output=True)
        reference = Segmenter(model, backend="nnunet", device="cpu")
        others = {b: Segmenter(model, backend=b, precision="fp32", device="cpu") for b in ("torch", "openvino")}
        others["onnxruntime"] = Segmenter(model, backend="onnxruntime", precision="fp32", device="cpu")
        worst = {b: [0, 0, 0.0] for b in others}
        for path in sorted(images.glob("*.nii.gz"))[:count]:
            img = nib.load(path)
            data, spacing = np.asanyarray(img.dataobj), tuple(float(z) for z in img.header.get_zooms()[:3])
            prepared = reference.prepare(data, spacing)
            labels, probabilities = reference.finish_with_probabilities(prepared, reference.logits(prepared))
            gap = top_two_gap(probabilities)
            for backend, seg in others.items():
                f = flips_outside_near_ties(seg.segment(data, spacing), labels, gap, "fp32")
                w = worst[backend]
                w[0], w[1], w[2] = w[0] + f["flipped"], w[1] + int(labels.size), max(w[2], f["largest_gap_at_a_flip"])
        for backend, (flipped, voxels, largest) in worst.items():
            logger.info(
                f"{backend} fp32: {flipped} of {voxels} voxels flipped, largest nnU-Net gap at a flip {largest:.4f}"
            )
