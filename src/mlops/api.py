"""The segmentation service: `POST /predict` takes a NIfTI upload and returns its segmentation as `.nii.gz`.

The model is loaded once at start-up and stays warm; uploads are decoded and the answer encoded in memory (no
subprocess, no reload, no files written). Work in flight is bounded: beyond ``serve.max_in_flight`` requests the
service answers 503 with ``Retry-After`` rather than queueing without limit. Every bad input is a 4xx with a JSON
``detail``; nothing a client sends can take the server down.
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI, File, HTTPException, Query, Request, Response, UploadFile
from fastapi.responses import JSONResponse
from loguru import logger
from omegaconf import DictConfig
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.concurrency import run_in_threadpool

from mlops import __version__
from mlops.drift import RequestLog
from mlops.errors import MlopsError
from mlops.volumes import InputError, check_volume, decode_nifti, label_volumes, segmentation_like, to_gzip_bytes

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64)


class Metrics:
    """Prometheus metrics in a registry of the app's own (several apps can live in one process, e.g. in tests)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "mlops_http_requests_total", "HTTP requests", ["method", "path", "status"], registry=self.registry
        )
        self.latency = Histogram(
            "mlops_http_request_duration_seconds", "Request latency", ["path"], buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )  # fmt: skip
        self.errors = Counter("mlops_http_errors_total", "Error responses", ["status"], registry=self.registry)
        self.in_flight = Gauge("mlops_predict_in_flight", "Predictions being served", registry=self.registry)
        self.inference = Histogram(
            "mlops_inference_duration_seconds", "Model time per prediction", buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )  # fmt: skip


class Slots:
    """A non-blocking counter of requests in flight: acquire fails at once when full (-> 503)."""

    def __init__(self, size: int) -> None:
        self.size, self.used, self._lock = size, 0, threading.Lock()

    def try_acquire(self) -> bool:
        with self._lock:
            if self.used >= self.size:
                return False
            self.used += 1
            return True

    def release(self) -> None:
        with self._lock:
            self.used -= 1


def _safe_stem(filename: str | None) -> str:
    name = Path(filename or "upload").name
    for suffix in (".nii.gz", ".nii"):
        name = name.removesuffix(suffix)
    return re.sub(r"[^A-Za-z0-9._-]", "_", name)[:100] or "upload"


def create_app(cfg: DictConfig, segmenter_factory: Callable[[], Any] | None = None) -> FastAPI:
    """The app for a composed config. ``segmenter_factory`` defaults to loading the configured nnU-Net model."""
    from mlops.predict import load_segmenter, model_dir

    serve = cfg.serve
    max_bytes, max_voxels = int(serve.max_upload_bytes), int(serve.max_voxels)
    metrics, slots = Metrics(), Slots(int(serve.max_in_flight))
    request_log = RequestLog(Path(cfg.drift.requests_log)) if serve.get("record_stats") else None

    def default_factory() -> Any:
        folder = fetch_model(cfg) if serve.get("model_uri") else model_dir(cfg)
        return load_segmenter(cfg, folder)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.segmenter = (segmenter_factory or default_factory)()
        yield

    app = FastAPI(
        title="mlops segmentation service",
        version=__version__,
        description="nnU-Net v2 segmentation of 3D NIfTI volumes (Medical Segmentation Decathlon models).",
        lifespan=lifespan,
    )

    known_paths: set[str] = set()  # filled on the first request, once every route exists

    @app.middleware("http")
    async def observe(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        if not known_paths:
            known_paths.update(r.path for r in app.routes)
        path = request.url.path if request.url.path in known_paths else "other"  # bounded metric labels
        t0 = time.perf_counter()
        declared = request.headers.get("content-length")
        if path == "/predict" and declared and declared.isdigit() and int(declared) > max_bytes + 4096:
            response: Response = JSONResponse(
                {"detail": f"upload of {int(declared):,} bytes is above the limit of {max_bytes:,}"}, status_code=413
            )
        else:
            try:
                response = await call_next(request)
            except Exception:  # last resort: never let one request take the server down
                logger.exception(f"unhandled error on {request.method} {request.url.path}")
                response = JSONResponse({"detail": "internal server error"}, status_code=500)
        metrics.requests.labels(request.method, path, str(response.status_code)).inc()
        metrics.latency.labels(path).observe(time.perf_counter() - t0)
        if response.status_code >= 400:
            metrics.errors.labels(str(response.status_code)).inc()
        return response

    @app.get("/health", summary="Liveness: the process answers")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/ready", summary="Readiness: the model is loaded and warm")
    async def ready(request: Request) -> JSONResponse:
        seg = getattr(request.app.state, "segmenter", None)
        if seg is None:
            return JSONResponse({"ready": False}, status_code=503)
        return JSONResponse(
            {
                "ready": True,
                "model": str(seg.model_dir),
                "folds": [str(f) for f in seg.folds],
                "device": str(seg.device),
            }
        )

    @app.get("/metrics", summary="Prometheus metrics")
    async def prometheus() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.post(
        "/predict",
        summary="Segment a NIfTI volume",
        response_class=Response,
        responses={
            200: {"content": {"application/gzip": {}}, "description": "The segmentation as .nii.gz"},
            400: {"description": "Not a readable NIfTI (empty, truncated, corrupt)"},
            413: {"description": "Upload or volume above the configured limits"},
            422: {"description": "A NIfTI the model cannot segment (dimensionality, NaN/Inf)"},
            503: {"description": "Busy: too many requests in flight; retry after the given seconds"},
        },
    )
    async def predict(
        request: Request,
        file: UploadFile = File(..., description="A .nii or .nii.gz volume"),
        tta: bool | None = Query(None, description="Mirroring test-time augmentation (default: predict.tta)"),
    ) -> Response:
        if not slots.try_acquire():
            raise HTTPException(503, "busy: too many predictions in flight; retry shortly", {"Retry-After": "1"})
        metrics.in_flight.inc()
        try:
            name = file.filename or "upload"
            if not name.endswith((".nii", ".nii.gz")):
                raise InputError(f"{name}: expected a .nii or .nii.gz file", 400)
            raw = await file.read(max_bytes + 1)
            if len(raw) > max_bytes:
                raise InputError(f"{name}: upload above the limit of {max_bytes:,} bytes", 413)
            segmenter = request.app.state.segmenter
            t0 = time.perf_counter()
            body, volumes = await run_in_threadpool(_segment, segmenter, raw, name, max_voxels, tta, request_log)
            metrics.inference.observe(time.perf_counter() - t0)
        except InputError as exc:
            raise HTTPException(exc.status, str(exc)) from None
        except MlopsError as exc:
            logger.error(f"prediction failed: {exc}")
            raise HTTPException(500, f"prediction failed: {exc}") from None
        finally:
            await file.close()
            metrics.in_flight.dec()
            slots.release()
        return Response(
            body,
            media_type="application/gzip",
            headers={
                "Content-Disposition": f'attachment; filename="{_safe_stem(file.filename)}_seg.nii.gz"',
                "X-Label-Volumes-mm3": json.dumps(volumes),
                "X-Inference-Seconds": f"{time.perf_counter() - t0:.3f}",
            },
        )

    return app


def _segment(
    segmenter: Any, raw: bytes, name: str, max_voxels: int, tta: bool | None, request_log: RequestLog | None
) -> tuple[bytes, dict]:
    img = decode_nifti(raw, name, max_voxels)
    data = check_volume(img, name, segmenter.num_channels)
    zooms = tuple(float(z) for z in img.header.get_zooms()[:3])
    seg = segmenter.segment(data, zooms, tta=tta)
    if request_log is not None:
        try:  # drift monitoring must never fail a prediction
            request_log.record(name, data, zooms)
        except Exception as exc:
            logger.warning(f"could not record request statistics: {exc}")
    return to_gzip_bytes(segmentation_like(seg, img), level=1), label_volumes(seg, img, segmenter.labels)


def fetch_model(cfg: DictConfig) -> Path:
    """Copy the model folder at ``serve.model_uri`` (``gs://...`` or any fsspec URL) to ``serve.model_cache``."""
    import fsspec

    uri = str(cfg.serve.model_uri).rstrip("/")
    dest = Path(cfg.serve.model_cache) / Path(uri).name
    if (dest / "plans.json").is_file():
        logger.info(f"Model {uri} already cached in {dest}")
        return dest
    fs, root = fsspec.core.url_to_fs(uri)
    if not fs.exists(f"{root}/plans.json"):
        raise MlopsError(f"{uri}: no nnU-Net model folder there (no plans.json)")
    tmp = dest.with_name(dest.name + ".part")
    logger.info(f"Fetching model {uri} -> {dest}")
    fs.get(root, str(tmp), recursive=True)
    tmp.replace(dest)
    return dest
