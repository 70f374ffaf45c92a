"""`mlops export`: the trained network of each fold as ONNX and OpenVINO IR, beside its checkpoint.

Layout: ``fold_N/export/network.onnx``, ``network.xml`` + ``network.bin`` and ``export.json``. The export holds only
the network; plans.json and dataset.json stay the source of truth for everything around it. ``export.json`` records
the SHA-256 of the checkpoint it came from, so a checkpoint retrained after the export is detected as stale rather
than silently served with old weights.

OpenVINO's model converter (``ovc``) reports telemetry over the network by default; the IR is therefore made from the
ONNX graph by the OpenVINO runtime (``read_model`` + ``save_model``), which sends nothing.
"""

from __future__ import annotations

import functools
import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from loguru import logger

from mlops import __version__
from mlops.errors import PipelineError
from mlops.files import sha256 as file_sha256

FORMATS = ("onnx", "openvino")
OPSET = 17
STAMP = "export.json"


@dataclass
class ExportedFold:
    fold: int | str
    folder: Path
    files: list[Path]
    seconds: float


def sha256(path: Path) -> str:
    """SHA-256 of a file, remembered while its size and modification time stay (a checkpoint is hashed by the export
    stamp, the parity check and the batch records of one load)."""
    st = Path(path).stat()
    return _sha256(str(Path(path).resolve()), st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=64)
def _sha256(path: str, size: int, mtime_ns: int) -> str:
    return file_sha256(Path(path))


def weights_sha256(checkpoints: list[Path]) -> str:
    """One hash of the weights of every fold a prediction uses (and of its post-processing file, if any): what says
    two outputs came from the same model."""
    digest = hashlib.sha256()
    for checkpoint in checkpoints:
        digest.update(f"{checkpoint.parent.name}/{checkpoint.name}:{sha256(checkpoint)}\n".encode())
    return digest.hexdigest()


def export_fold(
    network: torch.nn.Module,
    weights: dict,
    checkpoint: Path,
    fold: int | str,
    patch_size: tuple[int, ...],
    num_channels: int,
    formats: tuple[str, ...] = FORMATS,
) -> ExportedFold:
    """Write one fold's network as ONNX (dynamic batch axis) and, from it, OpenVINO IR. Atomic per folder."""
    import copy

    unknown = [f for f in formats if f not in FORMATS]
    if unknown:
        raise PipelineError(f"unknown export format(s) {unknown}; choose from {', '.join(FORMATS)}")
    t0 = time.perf_counter()
    dest = checkpoint.parent / "export"
    tmp = checkpoint.parent / ".export.part"
    if tmp.exists():
        import shutil

        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    net = copy.deepcopy(network).cpu().eval()
    net.load_state_dict(weights)
    dummy = torch.zeros((2, num_channels, *patch_size), dtype=torch.float32)
    onnx_path = tmp / "network.onnx"
    try:
        with torch.inference_mode(False), torch.no_grad():
            torch.onnx.export(
                net,
                (dummy,),
                str(onnx_path),
                input_names=["image"],
                output_names=["logits"],
                dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}},
                opset_version=OPSET,
                dynamo=False,
            )
        files = [onnx_path]
        if "openvino" in formats:
            import openvino as ov

            ov.save_model(ov.Core().read_model(str(onnx_path)), str(tmp / "network.xml"), compress_to_fp16=False)
            files += [tmp / "network.xml", tmp / "network.bin"]
        if "onnx" not in formats:
            onnx_path.unlink()
            files.remove(onnx_path)
    except Exception as exc:
        raise PipelineError(f"{checkpoint}: export failed ({type(exc).__name__}: {exc})") from exc
    stamp = {
        "checkpoint": checkpoint.name,
        "checkpoint_sha256": sha256(checkpoint),
        "patch_size": list(patch_size),
        "num_channels": num_channels,
        "formats": [f for f in FORMATS if f in formats],
        "opset": OPSET,
        "torch": torch.__version__,
        "mlops": __version__,
    }
    (tmp / STAMP).write_text(json.dumps(stamp, indent=2))
    if dest.exists():
        import shutil

        shutil.rmtree(dest)
    tmp.replace(dest)
    seconds = time.perf_counter() - t0
    logger.info(f"Exported fold {fold} ({', '.join(stamp['formats'])}) to {dest} in {seconds:.1f} s")
    return ExportedFold(fold, dest, [dest / f.name for f in files] + [dest / STAMP], seconds)


FILES = {"onnx": "network.onnx", "openvino": "network.xml"}


def export_status(checkpoint: Path) -> tuple[set[str], str | None]:
    """Fresh formats exported beside ``checkpoint``, and why none can be used when an export exists but is stale."""
    stamp_file = checkpoint.parent / "export" / STAMP
    if not stamp_file.is_file():
        return set(), None
    try:
        stamp = json.loads(stamp_file.read_text())
    except (OSError, ValueError) as exc:
        return set(), f"{stamp_file}: unreadable export stamp ({exc}); run `mlops export` again"
    if stamp.get("checkpoint") != checkpoint.name:
        return set(), None  # exported from another checkpoint of this fold (e.g. best vs final): not this one's
    if stamp.get("checkpoint_sha256") != sha256(checkpoint):
        return set(), (
            f"{stamp_file.parent}: stale export ({checkpoint.name} changed after it was exported); "
            "run `mlops export` again"
        )
    return {f for f in stamp.get("formats", []) if (stamp_file.parent / FILES[f]).is_file()}, None


def exported_file(checkpoint: Path, fmt: str) -> Path:
    return checkpoint.parent / "export" / FILES[fmt]


def export_model(
    model_dir: Path, folds: list[int | str] | None, checkpoint: str, formats: tuple[str, ...] = FORMATS
) -> list[ExportedFold]:
    """Export every requested fold of a trained model folder (all trained folds when ``folds`` is None)."""
    from mlops import nnunet

    model = nnunet.load_trained_network(Path(model_dir), folds, checkpoint)
    return [
        export_fold(model.network, weights, ckpt, fold, model.patch_size, model.num_channels, formats)
        for fold, weights, ckpt in zip(model.folds, model.fold_weights, model.checkpoint_files(), strict=True)
    ]
