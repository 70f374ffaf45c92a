"""The warm model behind every prediction: loaded once, segments one volume at a time, in memory.

Arrays come in and go out in nibabel's voxel order (i, j, k). nnU-Net was planned with SimpleITK's reader, whose
arrays are (k, j, i) with reversed spacing, so both are transposed at this edge (as nnU-Net's docs require).
Preprocessing (:meth:`Segmenter.prepare`) may run in another thread while the network works on the previous case;
network calls are serialised, since one case already uses every core (or the GPU).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from loguru import logger

from mlops import nnunet
from mlops.errors import Cancelled, PipelineError
from mlops.inference import backends
from mlops.inference.export import export_status, exported_file
from mlops.inference.record import CHECK_NAME, check_entry, passed_fastest_first
from mlops.inference.window import sliding_window_logits


@dataclass
class Prepared:
    """One case after nnU-Net's preprocessing, ready for the network."""

    data: torch.Tensor  # (c, z, y, x) float32
    props: dict
    seconds: float


class Segmenter:
    """A trained nnU-Net model on one device with one backend and precision (``auto`` resolved at load)."""

    def __init__(
        self,
        model_dir: Path,
        folds: list[int | str] | None = None,
        checkpoint: str = "checkpoint_final.pth",
        device: str = "auto",
        tta: bool = True,
        tile_step_size: float = 0.5,
        backend: str = "auto",
        precision: str = "auto",
        max_batch: int | None = None,
        threads: int | None = None,
    ) -> None:
        self.device = nnunet.resolve_device(device)
        if self.device.type == "cpu":
            backends.set_cpu_threads(threads)
        self.model = nnunet.load_trained_network(Path(model_dir), folds, checkpoint)
        m = self.model
        self.model_dir, self.folds, self.default_tta = m.model_dir, m.folds, tta
        self.tile_step_size = float(tile_step_size)
        self.num_channels, self.labels = m.num_channels, m.labels
        # Spacing (mm) and patch the network works at, in nibabel's i, j, k order: inputs are resampled to this
        # spacing, so a request costs its physical extent divided by it, not its voxel count.
        self.target_spacing = tuple(reversed(m.target_spacing))
        self.patch_size = tuple(reversed(m.patch_size))
        # On the CPU a larger batch buys little speed and costs memory: one 40x56x40 tile x 8 mirrors measured 3.34 s
        # at batch 8 and 3.38 s at batch 2 (OpenVINO fp32), holding 528 against 248 MiB. On a GPU, batch.
        self.max_batch = int(max_batch or (32 if self.device.type == "cuda" else 2))

        checkpoints = m.checkpoint_files()
        statuses = [export_status(c) for c in checkpoints]
        formats = set.intersection(*(fresh for fresh, _ in statuses))  # usable only if every fold has it
        problems = [problem for _, problem in statuses if problem]
        wanted = backend
        if wanted in ("openvino", "onnxruntime"):
            fmt = "openvino" if wanted == "openvino" else "onnx"
            if fmt not in formats:
                why = "; ".join(problems) or f"no {fmt} export beside {m.checkpoint} of fold(s) {m.folds}"
                raise PipelineError(f"{m.model_dir}: predict.backend={wanted}: {why} (run `mlops export`)")
        elif wanted == "auto" and problems:
            logger.warning("; ".join(problems) + " - using PyTorch meanwhile")
        check = check_entry(m.model_dir, checkpoints) if self.device.type == "cpu" else None
        choice = backends.choose(backend, precision, self.device, formats, passed_fastest_first(check))
        self.backend, self.precision = choice.backend, choice.precision
        failed = [r for r in (check or {}).get("results", []) if not r.get("passed")]
        if any((r["backend"], r["precision"]) == (self.backend, self.precision) for r in failed):
            logger.warning(f"{m.model_dir}: {self.backend} {self.precision} did not pass this model's parity check "
                           f"against nnU-Net ({CHECK_NAME}); its labels may differ")  # fmt: skip
        self._predictor = None
        self._runners: list[backends.Runner] = []
        if self.backend == "torch":
            self._runners = [backends.TorchRunner(m.network, w, self.device, self.precision) for w in m.fold_weights]
        elif self.backend == "openvino":
            self._runners = [backends.OpenVinoRunner(exported_file(c, "openvino"), self.precision) for c in checkpoints]
        elif self.backend == "onnxruntime":
            self._runners = [backends.OnnxRunner(exported_file(c, "onnx")) for c in checkpoints]
        else:
            self._predictor = nnunet.nnunet_predictor(m, self.device, tta, self.tile_step_size)
        if self._runners:
            m.release_weights()
        self._lock = threading.Lock()
        # Applied to each finished label map (i, j, k), e.g. nnU-Net's post-processing chosen by `mlops find-best`.
        self.postprocessing: Callable[[np.ndarray], np.ndarray] | None = None
        logger.debug(f"Inference: {self.backend} {self.precision} on {self.device}, batch {self.max_batch}")

    def describe(self) -> dict[str, object]:
        return {
            "model": self.model_dir.name,
            "folds": [str(f) for f in self.folds],
            "device": str(self.device),
            "backend": self.backend,
            "precision": self.precision,
        }

    def prepare(self, image: np.ndarray, spacing: tuple[float, ...]) -> Prepared:
        """nnU-Net's preprocessing of ``image`` (i, j, k[, c]) with voxel ``spacing`` (i, j, k). Thread-safe."""
        t0 = time.perf_counter()
        data = image[..., None] if image.ndim == 3 else image
        data = np.ascontiguousarray(data.transpose(3, 2, 1, 0), dtype=np.float32)  # -> (c, k, j, i)
        pre, props = nnunet.preprocess(self.model, data, tuple(float(s) for s in reversed(spacing[:3])))
        return Prepared(torch.from_numpy(np.ascontiguousarray(pre)), props, time.perf_counter() - t0)

    def logits(
        self,
        prepared: Prepared,
        tta: bool | None = None,
        cancel: Callable[[], bool] | None = None,
        members: list[torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Logits (k, z, y, x) of a prepared case, on the CPU, fp32 (nnU-Net's backend: its own fp16).

        ``members``: a list that receives each fold's (or, with one fold, each mirrored pass's) argmax labels, for
        :mod:`mlops.monitoring`'s disagreement signal; nnU-Net's own predictor backend leaves it empty."""
        tta = self.default_tta if tta is None else tta
        with self._lock:
            if cancel is not None and cancel():
                raise Cancelled("segmentation cancelled before it started")
            if self._predictor is not None:
                self._predictor.use_mirroring = tta
                with torch.no_grad():
                    return self._predictor.predict_logits_from_preprocessed_data(prepared.data).cpu()
            out = sliding_window_logits(
                prepared.data,
                self._runners,
                self.model.patch_size,
                self.model.num_classes,
                self.tile_step_size,
                self.model.mirror_axes if tta else None,
                self.max_batch,
                self.device,
                cancel,
                members,
            )
            return out.cpu()

    def finish(self, prepared: Prepared, logits: torch.Tensor) -> np.ndarray:
        """nnU-Net's export of the logits: back to the input grid, argmax, uint8 labels in (i, j, k)."""
        seg = nnunet.logits_to_segmentation(self.model, logits, prepared.props)
        seg = np.ascontiguousarray(np.asarray(seg).transpose(2, 1, 0)).astype(np.uint8)
        return seg if self.postprocessing is None else np.ascontiguousarray(self.postprocessing(seg), np.uint8)

    def finish_with_probabilities(self, prepared: Prepared, logits: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """:meth:`finish` plus the softmax on the input grid in nnU-Net's layout (classes, z, y, x), as nnU-Net's
        ``--save_probabilities`` writes it (the post-processing, as in nnU-Net, changes the labels only)."""
        seg, probs = nnunet.logits_to_segmentation(self.model, logits, prepared.props, probabilities=True)
        seg = np.ascontiguousarray(np.asarray(seg).transpose(2, 1, 0)).astype(np.uint8)
        if self.postprocessing is not None:
            seg = np.ascontiguousarray(self.postprocessing(seg), np.uint8)
        return seg, np.asarray(probs)

    def segment(
        self,
        image: np.ndarray,
        spacing: tuple[float, ...],
        tta: bool | None = None,
        cancel: Callable[[], bool] | None = None,
    ) -> np.ndarray:
        """Labels (i, j, k) of ``image``. ``cancel`` is polled between tiles; True raises :class:`Cancelled`."""
        prepared = self.prepare(image, spacing)
        return self.finish(prepared, self.logits(prepared, tta, cancel))
