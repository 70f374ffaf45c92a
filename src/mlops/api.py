"""The segmentation service: `POST /predict` takes a NIfTI upload and returns its segmentation as `.nii.gz`.

The model is loaded once at start-up and stays warm; uploads are decoded and the answer encoded in memory (no
subprocess, no reload, no files written). Work in flight is bounded: beyond ``serve.max_in_flight`` requests the
service answers 503 with ``Retry-After`` rather than queueing without limit. Every bad input is a 4xx with a JSON
``detail``; nothing a client sends can take the server down.
"""

from __future__ import annotations

import asyncio
import functools
import json
import re
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import FastAPI, File, HTTPException, Query, Request, Response, UploadFile
from fastapi import Path as PathParam
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse
from loguru import logger
from omegaconf import DictConfig
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool

from mlops import __version__
from mlops.dicom import web
from mlops.dicom.series import Limits, Series, assemble, dataset_instances, is_zip_name, part10, zip_stem
from mlops.errors import Cancelled, MlopsError
from mlops.models import model_dir
from mlops.monitoring.live import LiveMonitor
from mlops.monitoring.report import render as render_report
from mlops.monitoring.signals import SIGNAL_COLUMNS
from mlops.pipeline import case_statistics, decode_upload, load_segmenter, open_case, seg_for, segment_case
from mlops.service import install as install_service
from mlops.service.limits import Drain, Guard, Slots
from mlops.service.metrics import Metrics
from mlops.service.results import json_result, wants_json
from mlops.volumes import Budget, InputError, ModelGrid, is_nifti_name, label_names, strip_suffix, to_gzip_bytes


def _safe_stem(filename: str | None) -> str:
    name = zip_stem(strip_suffix(Path(filename or "upload").name))
    return re.sub(r"[^A-Za-z0-9._-]", "_", name)[:100] or "upload"


def create_app(cfg: DictConfig, segmenter_factory: Callable[[], Any] | None = None) -> FastAPI:
    """The app for a composed config. ``segmenter_factory`` defaults to loading the configured nnU-Net model."""
    serve = cfg.serve
    max_bytes, max_voxels = int(serve.max_upload_bytes), int(serve.max_voxels)
    max_request_bytes = int(float(serve.max_request_mib) * 2**20)
    timeout_s = float(serve.timeout_s)
    metrics, slots = Metrics(), Slots(int(serve.max_in_flight))
    drain = Drain(float(serve.shutdown_grace_s))

    def default_factory() -> Any:
        folder = fetch_model(cfg) if serve.get("model_uri") else model_dir(cfg)
        return load_segmenter(cfg, folder)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.segmenter = (segmenter_factory or default_factory)()
        max_passes = int(serve.max_passes) if serve.get("max_passes") else None
        app.state.budget = Budget(ModelGrid.of(app.state.segmenter), max_request_bytes, max_passes)
        app.state.monitor = LiveMonitor(cfg, app.state.segmenter)
        for name in app.state.segmenter.labels.values():
            if name != "background":
                metrics.volume.labels(name)
        grid = app.state.budget.grid
        logger.info(
            f"Model grid {grid.target_spacing} mm, patch {grid.patch_size}; request budget "
            f"{max_request_bytes / 2**20:,.0f} MiB, time limit {timeout_s:g} s, {slots.size} in flight"
        )
        refresh = asyncio.create_task(refresh_drift(app.state.monitor, metrics, float(cfg.monitor.drift_refresh_s)))
        yield
        refresh.cancel()
        drain.start()
        app.state.monitor.close()

    app = FastAPI(
        title="mlops segmentation service",
        version=__version__,
        description="nnU-Net v2 segmentation of 3D NIfTI volumes (Medical Segmentation Decathlon models).",
        lifespan=lifespan,
        docs_url=None,  # served from local assets by mlops.service (FastAPI's load from a CDN)
        redoc_url=None,
    )
    app.state.drain = drain
    app.add_middleware(
        Guard, max_bytes=max_bytes + 4096, upload_timeout_s=float(serve.upload_timeout_s), metrics=metrics
    )
    install_service(app, cfg)  # the page, /docs, /redoc, /info, CORS, bearer token, access log

    @app.api_route("/health", methods=["GET", "HEAD"], summary="Liveness: the process answers")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.api_route("/ready", methods=["GET", "HEAD"], summary="Readiness: the model is loaded and warm")
    async def ready(request: Request) -> JSONResponse:
        seg = getattr(request.app.state, "segmenter", None)
        if seg is None:
            return JSONResponse({"ready": False}, status_code=503)
        return JSONResponse(
            {
                "ready": True,
                "model": seg.model_dir.name,  # open to probes without a token: no absolute path
                "folds": [str(f) for f in seg.folds],
                "device": str(seg.device),
                "backend": seg.backend,
                "precision": seg.precision,
            }
        )

    @app.get(
        "/metrics",
        summary="Prometheus metrics",
        response_class=PlainTextResponse,
        responses={200: {"content": {CONTENT_TYPE_LATEST: {"schema": {"type": "string"}}}}},
    )
    async def prometheus() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    async def guarded(request: Request, label: str, work: Callable[[Callable[[], bool]], Any]) -> tuple[Any, float]:
        """Run ``work(cancel)`` in a worker thread within a slot, the time limit and the client's patience; library
        errors become 4xx/5xx. Returns its result and the seconds it took."""
        if drain.expired or not slots.try_acquire():
            raise HTTPException(503, "busy: too many predictions in flight; retry shortly", {"Retry-After": "1"})
        metrics.in_flight.inc()
        gone = threading.Event()
        deadline = time.monotonic() + timeout_s
        rid = uuid.uuid4().hex[:8]  # names the request in logs: an upload's file name can identify a patient

        def cancel() -> bool:  # polled by the engine between tiles, from its worker thread
            return gone.is_set() or time.monotonic() > deadline or drain.expired

        try:
            t0 = time.perf_counter()
            task = asyncio.ensure_future(run_in_threadpool(work, cancel))
            while not task.done():  # watch the client while the worker runs; the slot is held until it stops
                await asyncio.wait({task}, timeout=0.5)
                if not gone.is_set() and not task.done() and await request.is_disconnected():
                    gone.set()
                    logger.info(f"request {rid}: client disconnected; cancelling its prediction")
            result = task.result()
            metrics.inference.observe(time.perf_counter() - t0)
            return result, t0
        except InputError as exc:
            raise HTTPException(exc.status, str(exc)) from None
        except Cancelled:
            if gone.is_set():
                raise HTTPException(499, "client closed request") from None  # nginx's code: nobody reads it
            if drain.expired:
                raise HTTPException(503, "the service is shutting down; retry", {"Retry-After": "1"}) from None
            logger.warning(f"request {rid}: cancelled at the time limit of {timeout_s:g} s")
            raise HTTPException(
                503, f"prediction exceeded the time limit of {timeout_s:g} s (serve.timeout_s)"
            ) from None
        except MlopsError as exc:  # the message may carry client text (an upload's name): only its type is logged
            logger.error(f"request {rid}: {label} failed ({type(exc).__name__})")
            raise HTTPException(500, f"{label} failed: {exc}") from None
        finally:
            metrics.in_flight.dec()
            slots.release()

    @app.post(
        "/predict",
        summary="Segment a NIfTI volume or a DICOM series (.zip)",
        response_class=Response,
        responses={
            200: {
                "content": {"application/gzip": {}, "application/json": {}, "application/dicom": {}},
                "description": "The segmentation as .nii.gz; with `Accept: application/json` or `format=json`, "
                "a JSON body of label volumes, timing and model instead; for a DICOM series (a .zip upload) with "
                "`Accept: application/dicom` or `format=dicom-seg`, a DICOM Segmentation (SEG) of it",
            },
            401: {"description": "serve.api_token is set and the bearer token is missing or wrong"},
            400: {"description": "Not a readable NIfTI or DICOM zip (empty, truncated, corrupt, malformed header)"},
            406: {"description": "A DICOM SEG asked for a NIfTI upload: a SEG references the DICOM images it segments"},
            408: {"description": "The upload did not arrive within serve.upload_timeout_s"},
            413: {"description": "Upload, volume, series or estimated working memory above the configured limits"},
            422: {"description": "A volume the model cannot segment (dimensionality, voxel type, spacing, NaN/Inf; "
                  "a series with several orientations, missing slices, uneven spacing, gantry tilt)"},
            503: {"description": "Busy, shutting down, or over the time limit; retry after the given seconds"},
        },
    )  # fmt: skip
    async def predict(
        request: Request,
        file: UploadFile | None = File(None, description="A .nii or .nii.gz volume, or a .zip of one DICOM series"),
        image: UploadFile | None = File(None, description="The same as `file`, for clients that name it `image`"),
        tta: bool | None = Query(None, description="Mirroring test-time augmentation (default: predict.tta)"),
        format: str | None = Query(
            None, pattern="^(json|nifti|dicom-seg)$", description="json: volumes as JSON, no image; dicom-seg: a SEG"
        ),
        series: str | None = Query(None, description="SeriesInstanceUID, when the .zip holds several series"),
    ) -> Response:
        upload = file or image
        if upload is None:
            raise HTTPException(422, "no upload: send the volume as multipart form field 'file' (or 'image')")
        accept = request.headers.get("accept", "")
        as_json = wants_json(format, accept)
        as_seg = not as_json and (format == "dicom-seg" or (format is None and "application/dicom" in accept.lower()))
        name = upload.filename or "upload"
        try:
            dicom = is_zip_name(name)
            if not dicom and not is_nifti_name(name):
                raise HTTPException(400, f"{name}: expected a .nii or .nii.gz file, or a .zip of a DICOM series")
            if as_seg and not dicom:
                raise HTTPException(406, f"{name}: a DICOM SEG references the DICOM images it segments; upload the "
                                         "series as a .zip (or ask for NIfTI)")  # fmt: skip
            raw = await upload.read(max_bytes + 1)
            if len(raw) > max_bytes:
                raise HTTPException(413, f"{name}: upload above the limit of {max_bytes:,} bytes")
            state = request.app.state

            work = functools.partial(_segment, state, cfg, raw, name, max_voxels, tta, as_seg=as_seg, series_uid=series)
            del raw  # the worker holds the only reference: freed with it
            answer, t0 = await guarded(request, "prediction", work)
        finally:
            await upload.close()
        metrics.observe_signals(answer.signals)
        shown = public_signals(answer.signals)
        signals_header = json.dumps(shown, separators=(",", ":"))
        if as_json:
            seconds = time.perf_counter() - t0  # one reading for the body and the header
            return JSONResponse(
                {**json_result(answer.volumes, seconds, state.segmenter), "signals": shown},
                headers={"X-Inference-Seconds": f"{seconds:.3f}", "X-Output-Signals": signals_header},
            )
        suffix = ".dcm" if as_seg else ".nii.gz"
        return Response(
            answer.body,
            media_type="application/dicom" if as_seg else "application/gzip",
            headers={
                "Content-Disposition": f'attachment; filename="{_safe_stem(upload.filename)}_seg{suffix}"',
                "X-Label-Volumes-mm3": json.dumps(answer.volumes),
                "X-Inference-Seconds": f"{time.perf_counter() - t0:.3f}",
                "X-Output-Signals": signals_header,
            },
        )

    @app.get(
        "/dicomweb/studies/{study}/series/{series}/volume",
        summary="A series of the configured PACS as the NIfTI volume the model sees (for the page's viewer)",
        response_class=Response,
        responses={
            200: {"content": {"application/gzip": {}}, "description": "The series as .nii.gz (RAS affine, rescaled)"},
            404: {"description": "The PACS has no such series, or no PACS is configured (dicom.url)"},
            422: {"description": "A series that is not one regular volume (see POST /predict)"},
            502: {"description": "The PACS could not be reached or refused the request"},
        },
    )
    async def dicomweb_volume(
        request: Request,
        study: str = PathParam(pattern=UID_PATTERN, description="StudyInstanceUID"),
        series: str = PathParam(pattern=UID_PATTERN, description="SeriesInstanceUID"),
    ) -> Response:
        ref = pacs_ref(study, series)
        state = request.app.state

        def work(cancel: Callable[[], bool]) -> bytes:
            pulled = _series_from_pacs(state, cfg, ref, max_voxels)
            return to_gzip_bytes(pulled.image, level=1)

        body, _ = await guarded(request, "reading the series", work)
        return Response(body, media_type="application/gzip",
                        headers={"Content-Disposition": f'attachment; filename="{series}.nii.gz"'})  # fmt: skip

    def pacs_ref(study: str, series: str) -> web.SeriesRef:
        root = cfg.dicom.get("url")
        if not root:
            raise HTTPException(404, "no PACS configured: set dicom.url (MLOPS_DICOMWEB_URL) to its DICOMweb root")
        return web.SeriesRef(str(root).rstrip("/"), study, series)

    @app.post(
        "/dicomweb/segment",
        summary="Segment a series in the configured PACS and store its SEG there (DICOMweb)",
        responses={
            200: {"description": "The SEG's identity, where it was stored, label volumes and timing"},
            404: {"description": "The PACS has no such series, or no PACS is configured (dicom.url)"},
            422: {"description": "A series the model cannot segment (see POST /predict)"},
            502: {"description": "The PACS could not be reached or refused the request"},
        },
    )
    async def dicomweb_segment(request: Request, body: SeriesRequest) -> JSONResponse:
        ref = pacs_ref(body.study, body.series)
        state = request.app.state

        def work(cancel: Callable[[], bool]) -> dict[str, Any]:
            return _segment_from_pacs(state, cfg, ref, max_voxels, body.tta, cancel, body.store)

        result, _ = await guarded(request, "DICOMweb segmentation", work)
        return JSONResponse(result)

    @app.get(
        "/monitoring/drift",
        summary="Live drift report: this model's request records against its reference profile",
        response_class=HTMLResponse,
        responses={200: {"content": {"text/html": {}, "application/json": {}}},
                   404: {"description": "The model folder has no reference profile"}},
    )  # fmt: skip
    async def monitoring_drift(
        request: Request,
        format: str | None = Query(None, pattern="^(json|html)$", description="json: the summary only"),
    ) -> Response:
        monitor: LiveMonitor | None = getattr(request.app.state, "monitor", None)
        if monitor is None:
            raise HTTPException(503, "the model is not loaded yet", {"Retry-After": "1"})
        try:
            summary, reference, current = await run_in_threadpool(monitor.drift)
        except MlopsError as exc:
            raise HTTPException(404, str(exc)) from None
        metrics.set_drift(summary)
        if format == "json" or (format is None and wants_json(None, request.headers.get("accept", ""))):
            return Response(summary.to_json(), media_type="application/json")
        page = await run_in_threadpool(render_report, summary, reference, current)  # Evidently: about a second
        return HTMLResponse(page)

    return app


async def refresh_drift(monitor: LiveMonitor, metrics: Metrics, every_s: float) -> None:
    """Recompute the live drift gauges every ``every_s`` seconds (0: only on /monitoring/drift), so the drift-share
    alert fires without anyone opening the report. Needs a profile; a failure is logged and retried next time."""
    if every_s <= 0 or monitor.profile is None:
        return
    while True:
        await asyncio.sleep(every_s)
        try:
            summary, _, _ = await run_in_threadpool(monitor.drift)
        except Exception as exc:  # the service keeps serving; the gauges keep their last value
            logger.warning(f"drift refresh failed: {type(exc).__name__}: {exc}")
            continue
        metrics.set_drift(summary)


def public_signals(signals: dict[str, Any]) -> dict[str, Any]:
    """The output signals a client sees (rounded); input statistics stay in the request record."""
    keys = (*SIGNAL_COLUMNS,)
    return {k: (None if signals.get(k) is None else round(float(signals[k]), 5)) for k in keys}


@dataclass
class Answer:
    """One segmented upload: the body to send, its label volumes and output signals."""

    body: bytes
    volumes: dict[str, float]
    signals: dict[str, Any]


UID_PATTERN = r"^[0-9][0-9.]{0,63}$"  # a DICOM UID: digits and dots, at most 64 characters


class SeriesRequest(BaseModel):
    """A series in the configured PACS, by its study and series UIDs."""

    study: str = Field(pattern=UID_PATTERN, description="StudyInstanceUID")
    series: str = Field(pattern=UID_PATTERN, description="SeriesInstanceUID")
    store: bool = Field(True, description="Store the SEG back to the PACS (STOW-RS)")
    tta: bool | None = Field(None, description="Mirroring test-time augmentation (default: predict.tta)")


def _record(state: Any, case: Any, signals: dict[str, Any]) -> None:
    monitor: LiveMonitor = state.monitor
    if monitor.store is not None:
        try:  # monitoring must never fail a prediction
            monitor.record({**case_statistics(case), **signals})
        except Exception as exc:
            logger.warning(f"could not compute request statistics: {type(exc).__name__}")


def _segment(
    state: Any,
    cfg: DictConfig,
    raw: bytes,
    name: str,
    max_voxels: int,
    tta: bool | None,
    cancel: Callable[[], bool],
    as_seg: bool = False,
    series_uid: str | None = None,
) -> Answer:
    """An upload segmented: a NIfTI (decoded in memory) or a zipped DICOM series; the answer as NIfTI or SEG."""
    segmenter = state.segmenter
    case, series = decode_upload(
        segmenter, raw, name, max_voxels, state.budget, cancel, Limits.of(cfg.dicom), series_uid
    )
    del raw
    result = segment_case(segmenter, case, tta, cancel, state.monitor.max_member_mib)
    _record(state, case, result.signals)
    if as_seg and series is not None:
        body = part10(seg_for(segmenter, series, result.labels, cfg))
    else:
        body = to_gzip_bytes(result.image, level=1)
    return Answer(body, result.volumes, result.signals)


def _series_from_pacs(state: Any, cfg: DictConfig, ref: web.SeriesRef, max_voxels: int) -> Series:
    """A series retrieved (WADO-RS) and checked within the service's limits."""
    datasets = web.retrieve_series(ref, Limits.of(cfg.dicom).max_files, float(cfg.dicom.timeout_s))
    name = f"series {ref.series}"
    return assemble(dataset_instances(datasets, name), name, ref.series, max_voxels, state.budget)


def _segment_from_pacs(
    state: Any,
    cfg: DictConfig,
    ref: web.SeriesRef,
    max_voxels: int,
    tta: bool | None,
    cancel: Callable[[], bool],
    store: bool,
) -> dict[str, Any]:
    """Retrieve a series (WADO-RS), segment it, store its SEG (STOW-RS); what a client needs to find it again."""
    segmenter, timeout = state.segmenter, float(cfg.dicom.timeout_s)
    seconds = {}
    t0 = time.perf_counter()
    series = _series_from_pacs(state, cfg, ref, max_voxels)
    seconds["retrieve"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    case = open_case(segmenter, series.image, series.name, state.budget, cancel=cancel)
    result = segment_case(segmenter, case, tta, cancel, state.monitor.max_member_mib)
    _record(state, case, result.signals)
    seg = seg_for(segmenter, series, result.labels, cfg)
    seconds["segment"] = time.perf_counter() - t0
    stored = None
    if store:
        t0 = time.perf_counter()
        stored = web.store_seg(ref, seg, timeout)
        seconds["store"] = time.perf_counter() - t0
    return {
        "study": ref.study,
        "series": ref.series,
        "seg_series": str(seg.SeriesInstanceUID),
        "seg_sop_instance": str(seg.SOPInstanceUID),
        "stored": stored,
        "volumes_mm3": result.volumes,
        "labels": label_names(segmenter.labels),
        "seconds": {k: round(v, 3) for k, v in seconds.items()},
        "model": segmenter.model_dir.name,
    }


def fetch_model(cfg: DictConfig) -> Path:
    """Copy the model folder at ``serve.model_uri`` (``gs://...`` or any fsspec URL) to ``serve.model_cache``."""
    from mlops.inference.fetch import fetch_model as fetch

    return fetch(str(cfg.serve.model_uri), Path(cfg.serve.model_cache), float(cfg.serve.model_fetch_timeout_s))
