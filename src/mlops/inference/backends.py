"""Who runs the network on a batch of tiles: PyTorch, OpenVINO or ONNX Runtime, at a chosen precision.

Each runner maps a float32 batch (n, c, *patch) to float32 logits (n, k, *patch); one runner per fold. Which
combination ``auto`` picks is decided by :func:`choose`, from what this device runs fastest among the combinations
that passed the parity check against nnU-Net's own predictor (see benchmarks/bench_predict.py and the README).
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from loguru import logger

from mlops.errors import PipelineError

Runner = Callable[[torch.Tensor], torch.Tensor]

BACKENDS = ("auto", "torch", "openvino", "onnxruntime", "nnunet")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")


@dataclass(frozen=True)
class Choice:
    backend: str
    precision: str


def cpu_has_bf16() -> bool:
    """Native bf16 instructions (AVX512-BF16 or AMX). Without them PyTorch emulates bf16 convolutions: measured on
    the reference AVX2-only CPU, one 40x56x40 patch took 184 s in bf16 against about 0.2 s in fp32."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError) as exc:  # a torch build without oneDNN: bf16 would be emulated
        logger.debug(f"bf16 support unknown ({type(exc).__name__}: {exc}); treated as absent")
        return False


def openvino_has_bf16() -> bool:
    import openvino as ov

    return "BF16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")


def native_bf16(backend: str) -> bool:
    return openvino_has_bf16() if backend == "openvino" else cpu_has_bf16()


EXPORT_FORMAT = {"openvino": "openvino", "onnxruntime": "onnx"}


def choose(
    backend: str, precision: str, device: torch.device, exported: set[str], passed: list[dict] | None = None
) -> Choice:
    """Resolve ``auto`` for backend and precision; refuse combinations a backend cannot run.

    On the CPU, with a parity check of these weights (``passed``: the combinations that passed it, fastest first,
    from :mod:`mlops.inference.check`), ``auto`` is the fastest passed combination this CPU can run now (its export
    present, bf16 only with native instructions). Without a check, ``auto`` is fp32: OpenVINO when an export is there
    (the fastest fp32 combination measured on the reference 2-core CPU by benchmarks/bench_predict.py), else PyTorch;
    bf16 is never picked unchecked. On CUDA ``auto`` is PyTorch with fp16 autocast, the precision nnU-Net's own
    predictor uses there.
    """
    if backend not in BACKENDS:
        raise PipelineError(f"predict.backend={backend!r}: choose one of {', '.join(BACKENDS)}")
    if precision not in PRECISIONS:
        raise PipelineError(f"predict.precision={precision!r}: choose one of {', '.join(PRECISIONS)}")
    if device.type == "cpu" and passed and "auto" in (backend, precision) and backend != "nnunet":
        for r in passed:
            b, p = str(r["backend"]), str(r["precision"])
            if backend not in ("auto", b) or precision not in ("auto", p):
                continue
            if b in EXPORT_FORMAT and EXPORT_FORMAT[b] not in exported:
                continue
            if p == "bf16" and not native_bf16(b):
                continue
            logger.info(f"Inference: {b} {p}, the fastest combination that passed this model's parity check "
                        f"({float(r['speed_vs_nnunet']):.2f}x nnU-Net's time per case when checked)")  # fmt: skip
            backend, precision = b, p
            break
    if backend == "auto":
        if device.type == "cpu" and "openvino" in exported:
            backend = "openvino"
        else:
            backend = "torch"
            if device.type == "cpu":
                logger.info("No OpenVINO export beside the checkpoint: using PyTorch (`mlops export` is faster on CPU)")
    if precision == "auto":
        precision = "fp16" if device.type == "cuda" and backend == "torch" else "fp32"
    if backend in ("openvino", "onnxruntime") and device.type != "cpu":
        raise PipelineError(f"predict.backend={backend} runs on the CPU here; use predict.device=cpu or backend=torch")
    if backend == "onnxruntime" and precision != "fp32":
        raise PipelineError("predict.backend=onnxruntime runs fp32 only (its CPU provider has no bf16/fp16 kernels)")
    if backend == "openvino" and precision == "fp16":
        raise PipelineError("predict.backend=openvino on CPU: choose fp32 or bf16")
    if backend == "nnunet" and precision != "fp32":
        raise PipelineError("predict.backend=nnunet uses nnU-Net's own precision; leave predict.precision at fp32/auto")
    if backend == "torch" and device.type == "cpu" and precision == "fp16":
        raise PipelineError("predict.precision=fp16 needs a CUDA GPU; on CPU choose fp32 or bf16")
    if precision == "bf16" and device.type == "cpu" and not native_bf16(backend):
        raise PipelineError(
            f"predict.precision=bf16: this CPU has no native bf16 instructions (AVX512-BF16/AMX) for {backend}; "
            "it would be emulated, hundreds of times slower than fp32. Use predict.precision=fp32"
        )
    return Choice(backend, precision)


class TorchRunner:
    """The PyTorch network of one fold, on the device, under autocast for bf16/fp16."""

    def __init__(self, network: torch.nn.Module, weights: dict, device: torch.device, precision: str) -> None:
        self.net = copy.deepcopy(network)
        self.net.load_state_dict(weights)
        self.net = self.net.to(device).eval()
        self.device = device
        self.dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)

    @torch.inference_mode()
    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        batch = batch.to(self.device)
        if self.dtype is None:
            return self.net(batch).float()
        with torch.autocast(self.device.type, dtype=self.dtype):
            return self.net(batch).float()


class OpenVinoRunner:
    """An OpenVINO IR of one fold compiled for the CPU; one compiled model per batch size, made on first use."""

    def __init__(self, xml: Path, precision: str) -> None:
        import openvino as ov

        self.core = ov.Core()
        self.model = self.core.read_model(str(xml))
        # OpenVINO runs bf16 by default on CPUs that have it: ask for f32 explicitly unless bf16 was chosen.
        self.config = {
            "INFERENCE_PRECISION_HINT": "bf16" if precision == "bf16" else "f32",
            "PERFORMANCE_HINT": "LATENCY",
            "INFERENCE_NUM_THREADS": str(torch.get_num_threads()),
        }
        self.compiled: dict[int, object] = {}

    def _for_batch(self, n: int) -> object:
        if n not in self.compiled:  # the export has a dynamic batch axis; a static shape compiles faster code
            import openvino as ov

            model = self.model.clone()
            dims = [n, *(d.get_length() for d in list(model.input(0).get_partial_shape())[1:])]
            model.reshape({model.input(0): ov.PartialShape(dims)})
            self.compiled[n] = self.core.compile_model(model, "CPU", self.config)
        return self.compiled[n]

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        compiled = self._for_batch(int(batch.shape[0]))
        result = compiled(batch.cpu().numpy())  # type: ignore[operator]
        return torch.from_numpy(result[0].copy())


class OnnxRunner:
    """An ONNX graph of one fold on ONNX Runtime's CPU provider."""

    def __init__(self, path: Path) -> None:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = torch.get_num_threads()
        opts.inter_op_num_threads = 1
        opts.log_severity_level = 3
        self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        self.input = self.session.get_inputs()[0].name

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        (out,) = self.session.run(None, {self.input: batch.cpu().numpy()})
        return torch.from_numpy(out)


def set_cpu_threads(threads: int | None = None) -> None:
    """Every core for the one case in flight (nnU-Net caps at nnUNet_def_n_proc; one case is all the work here).

    ``threads`` caps it where several engines share a machine (Ray actors, each given its share of the cores).
    """
    torch.set_num_threads(int(threads) if threads else os.cpu_count() or 1)
