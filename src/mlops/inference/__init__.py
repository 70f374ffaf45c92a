"""The inference engine: one path from a NIfTI array to labels for `mlops predict`, `POST /predict` and batch.

- ``segmenter``: :class:`Segmenter`, the warm model behind every prediction (loads once, picks backend/precision).
- ``window``: our sliding-window driver: mirrors and tiles batched into few forward passes, fp32 accumulation.
- ``backends``: who runs the network: PyTorch (fp32/bf16/fp16), OpenVINO IR, ONNX Runtime, or nnU-Net's predictor.
- ``export``: ``mlops export`` writes the network as ONNX / OpenVINO IR beside its checkpoint, with a staleness stamp.
- ``check``: the parity check against nnU-Net's predictor that ``mlops export`` runs; ``auto`` picks from its result.

nnU-Net's own preprocessing, tile positions, Gaussian weighting and export stay the source of the answer; they are
called through :mod:`mlops.nnunet`, the only module that imports ``nnunetv2``.
"""

from mlops.inference.segmenter import Segmenter

__all__ = ["Segmenter"]
