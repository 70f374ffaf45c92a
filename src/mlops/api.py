"""The segmentation service: `POST /predict` takes a NIfTI upload and returns its segmentation as `.nii.gz`.

The model is loaded once at start-up and stays warm; uploads are decoded and the answer encoded in memory (no
subprocess, no reload, no files written). Work in flight is bounded: beyond ``serve.max_in_flight`` requests the
service answers 503 with ``Retry-After`` rather than queueing without limit. Every bad input is a 4xx with a JSON
``detail``; nothing a client sends can take the server down.
"""

from __future__ import annotations

import asyncio
import json
import re
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI, File, HTTPException, Query, Request, Response, UploadFile
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse
from loguru import logger
from omegaconf import DictConfig
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.concurrency import run_in_threadpool
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from mlops import __version__
from mlops.errors import Cancelled, MlopsError
from mlops.logs import client_text
from mlops.monitoring.live import LiveMonitor
from mlops.monitoring.report import render as render_report
from mlops.monitoring.signals import SIGNAL_COLUMNS, observe, volume_signals
from mlops.monitoring.stats import normalised_stats, orientation, raw_stats
from mlops.service import install as install_service
from mlops.service.results import json_result, wants_json
from mlops.volumes import (
    Budget,
    InputError,
    ModelGrid,
    check_volume,
    decode_nifti,
    is_nifti_name,
    label_volumes,
    segmentation_like,
    to_gzip_bytes,
)

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64)
PROBABILITY_BUCKETS = (0.3, 0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95, 0.98, 0.99, 1.0)
ENTROPY_BUCKETS = (0.01, 0.02, 0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.6, 0.8, 1.0)
VOLUME_BUCKETS = (0.01, 0.1, 0.5, 1, 2, 5, 10, 50, 100, 500, 1000, 5000)


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
        # Output signals of every prediction (mlops.monitoring.signals): no labels needed to watch them.
        self.confidence = Histogram(
            "mlops_prediction_confidence", "Mean max-softmax probability of a prediction", ["region"],
            buckets=PROBABILITY_BUCKETS, registry=self.registry,
        )  # fmt: skip
        for region in ("foreground", "overall"):
            self.confidence.labels(region)
        self.entropy = Histogram(
            "mlops_prediction_entropy", "Mean normalised softmax entropy over the predicted foreground",
            buckets=ENTROPY_BUCKETS, registry=self.registry,
        )  # fmt: skip
        self.agreement = Histogram(
            "mlops_prediction_agreement_dice", "Mean pairwise foreground Dice between mirrored passes or folds",
            buckets=PROBABILITY_BUCKETS, registry=self.registry,
        )  # fmt: skip
        self.volume = Histogram(
            "mlops_prediction_volume_ml", "Predicted volume of each label (mL)", ["label"], buckets=VOLUME_BUCKETS,
            registry=self.registry,
        )  # fmt: skip
        self.drift_share = Gauge(
            "mlops_drift_share", "Share of drifted statistics at the last drift comparison (0 without a verdict)",
            registry=self.registry,
        )  # fmt: skip
        self.drift_samples = Gauge(
            "mlops_drift_current_samples", "Current cases in the last drift comparison",
            registry=self.registry,
        )  # fmt: skip
        self.drift_out_of_range = Gauge(
            "mlops_drift_cases_out_of_range",
            "Current cases outside the reference's range (monitor.range_margin) at the last drift comparison",
            registry=self.registry,
        )  # fmt: skip

    def set_drift(self, summary: Any) -> None:
        """The gauges of a drift comparison (from /monitoring/drift or the periodic refresh)."""
        self.drift_share.set(summary.drift_share)
        self.drift_samples.set(summary.current_rows)
        self.drift_out_of_range.set(len(summary.cases_out_of_range))

    def observe_signals(self, signals: dict[str, Any]) -> None:
        for region in ("foreground", "overall"):
            value = signals.get(f"confidence_{region}")
            if value is not None:
                self.confidence.labels(region).observe(value)
        if signals.get("entropy_foreground") is not None:
            self.entropy.observe(signals["entropy_foreground"])
        if signals.get("agreement_dice_mean") is not None:
            self.agreement.observe(signals["agreement_dice_mean"])
        for key, value in signals.items():
            if key.startswith("volume_ml_"):
                self.volume.labels(key.removeprefix("volume_ml_")).observe(value)


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


class Drain:
    """SIGTERM: the server stops accepting at once; work in flight gets ``grace_s`` to finish, then is cancelled.

    Cloud Run allows 10 s between SIGTERM and SIGKILL; uvicorn's graceful shutdown waits slightly longer than the
    grace so the cancelled requests can still be answered.
    """

    def __init__(self, grace_s: float) -> None:
        self.grace_s, self.deadline = grace_s, float("inf")

    def start(self) -> None:
        self.deadline = min(self.deadline, time.monotonic() + self.grace_s)

    @property
    def expired(self) -> bool:
        return time.monotonic() >= self.deadline


class Guard:
    """Pure ASGI middleware: request metrics, a bounded and time-limited request body, and a last-resort 500.

    The body limit counts the bytes as they arrive, so a chunked upload without Content-Length is cut off at the
    limit instead of being spooled to disk in full; a client that stops sending gets 408 after ``upload_timeout_s``.
    Both answers close the connection. (Pure ASGI rather than ``@app.middleware``: the endpoint keeps the real
    ``receive``, so ``request.is_disconnected()`` sees a client that went away.)
    """

    def __init__(self, app: ASGIApp, max_bytes: int, upload_timeout_s: float, metrics: Metrics) -> None:
        self.app, self.max_bytes, self.upload_timeout_s, self.metrics = app, max_bytes, upload_timeout_s, metrics
        self.known_paths: set[str] = set()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if not self.known_paths:
            self.known_paths.update(getattr(r, "path", "") for r in scope["app"].routes)
        path = scope["path"] if scope["path"] in self.known_paths else "other"  # bounded metric labels
        t0, status = time.perf_counter(), [500]
        started = [False]

        async def send_observed(message: Message) -> None:
            if message["type"] == "http.response.start":
                started[0], status[0] = True, int(message["status"])
            await send(message)

        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length", b"").decode("latin-1")
        try:
            if declared.isdigit() and int(declared) > self.max_bytes:
                detail = f"upload of {int(declared):,} bytes is above the limit of {self.max_bytes:,}"
                await _json(send_observed, 413, detail)
            else:
                await self.app(scope, self._bounded(receive), send_observed)
        except Exception:  # last resort: never let one request take the server down (no locals: no voxel data)
            logger.opt(exception=True).error(
                f"unhandled error on {client_text(scope['method'], 20)} {client_text(scope['path'])}"
            )
            if not started[0]:
                await _json(send_observed, 500, "internal server error")
        finally:
            code = str(status[0])
            self.metrics.requests.labels(scope["method"], path, code).inc()
            self.metrics.latency.labels(path).observe(time.perf_counter() - t0)
            if status[0] >= 400:
                self.metrics.errors.labels(code).inc()

    def _bounded(self, receive: Receive) -> Receive:
        received, done = [0], [False]
        deadline = time.monotonic() + self.upload_timeout_s
        limit, timeout = self.max_bytes, self.upload_timeout_s

        async def bounded_receive() -> Message:
            if done[0]:
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - time.monotonic()))
            except TimeoutError:
                raise HTTPException(
                    408, f"upload incomplete after {timeout:g} s (serve.upload_timeout_s)", {"Connection": "close"}
                ) from None
            if message["type"] == "http.request":
                received[0] += len(message.get("body", b""))
                if received[0] > limit:
                    raise HTTPException(
                        413, f"upload above the limit of {limit:,} bytes", {"Connection": "close"}
                    ) from None
                done[0] = not message.get("more_body", False)
            else:
                done[0] = True
            return message

        return bounded_receive


async def _json(send: Send, status: int, detail: str) -> None:
    body = json.dumps({"detail": detail}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def _safe_stem(filename: str | None) -> str:
    name = Path(filename or "upload").name
    for suffix in (".nii.gz", ".nii"):
        if name.lower().endswith(suffix):
            name = name[: -len(suffix)]
            break
    return re.sub(r"[^A-Za-z0-9._-]", "_", name)[:100] or "upload"


def create_app(cfg: DictConfig, segmenter_factory: Callable[[], Any] | None = None) -> FastAPI:
    """The app for a composed config. ``segmenter_factory`` defaults to loading the configured nnU-Net model."""
    from mlops.predict import load_segmenter, model_dir

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

    @app.post(
        "/predict",
        summary="Segment a NIfTI volume",
        response_class=Response,
        responses={
            200: {
                "content": {"application/gzip": {}, "application/json": {}},
                "description": "The segmentation as .nii.gz; with `Accept: application/json` or `format=json`, "
                "a JSON body of label volumes, timing and model instead",
            },
            401: {"description": "serve.api_token is set and the bearer token is missing or wrong"},
            400: {"description": "Not a readable NIfTI (empty, truncated, corrupt, malformed header)"},
            408: {"description": "The upload did not arrive within serve.upload_timeout_s"},
            413: {"description": "Upload, volume or estimated working memory above the configured limits"},
            422: {"description": "A NIfTI the model cannot segment (dimensionality, voxel type, spacing, NaN/Inf)"},
            503: {"description": "Busy, shutting down, or over the time limit; retry after the given seconds"},
        },
    )
    async def predict(
        request: Request,
        file: UploadFile | None = File(None, description="A .nii or .nii.gz volume"),
        image: UploadFile | None = File(None, description="The same as `file`, for clients that name it `image`"),
        tta: bool | None = Query(None, description="Mirroring test-time augmentation (default: predict.tta)"),
        format: str | None = Query(None, pattern="^(json|nifti)$", description="json: volumes as JSON, no image"),
    ) -> Response:
        upload = file or image
        if upload is None:
            raise HTTPException(422, "no upload: send the volume as multipart form field 'file' (or 'image')")
        file = upload
        as_json = wants_json(format, request.headers.get("accept", ""))
        if drain.expired or not slots.try_acquire():
            raise HTTPException(503, "busy: too many predictions in flight; retry shortly", {"Retry-After": "1"})
        metrics.in_flight.inc()
        gone = threading.Event()
        deadline = time.monotonic() + timeout_s
        name = file.filename or "upload"
        rid = uuid.uuid4().hex[:8]  # names the request in logs: an upload's file name can identify a patient
        try:
            if not is_nifti_name(name):
                raise InputError(f"{name}: expected a .nii or .nii.gz file", 400)
            raw = await file.read(max_bytes + 1)
            if len(raw) > max_bytes:
                raise InputError(f"{name}: upload above the limit of {max_bytes:,} bytes", 413)
            state = request.app.state

            def cancel() -> bool:  # polled by the engine between tiles, from its worker thread
                return gone.is_set() or time.monotonic() > deadline or drain.expired

            t0 = time.perf_counter()
            work = asyncio.ensure_future(
                run_in_threadpool(
                    _segment, state.segmenter, state.budget, raw, name, max_voxels, tta, state.monitor, cancel
                )
            )
            del raw
            while not work.done():  # watch the client while the worker runs; the slot is held until it stops
                await asyncio.wait({work}, timeout=0.5)
                if not gone.is_set() and not work.done() and await request.is_disconnected():
                    gone.set()
                    logger.info(f"request {rid}: client disconnected; cancelling its prediction")
            body, volumes, signals = work.result()
            metrics.inference.observe(time.perf_counter() - t0)
            metrics.observe_signals(signals)
        except InputError as exc:
            raise HTTPException(exc.status, str(exc)) from None
        except Cancelled:
            if gone.is_set():
                return Response(status_code=499)  # nginx's "client closed request": nobody reads it
            if drain.expired:
                raise HTTPException(503, "the service is shutting down; retry", {"Retry-After": "1"}) from None
            logger.warning(f"request {rid}: cancelled at the time limit of {timeout_s:g} s")
            raise HTTPException(
                503, f"prediction exceeded the time limit of {timeout_s:g} s (serve.timeout_s)"
            ) from None
        except MlopsError as exc:
            logger.error(f"request {rid}: prediction failed: {client_text(str(exc).replace(name, '<upload>'), 500)}")
            raise HTTPException(500, f"prediction failed: {exc}") from None
        finally:
            await file.close()
            metrics.in_flight.dec()
            slots.release()
        shown = public_signals(signals)
        signals_header = json.dumps(shown, separators=(",", ":"))
        if as_json:
            seconds = time.perf_counter() - t0  # one reading for the body and the header
            return JSONResponse(
                {**json_result(volumes, seconds, state.segmenter), "signals": shown},
                headers={"X-Inference-Seconds": f"{seconds:.3f}", "X-Output-Signals": signals_header},
            )
        return Response(
            body,
            media_type="application/gzip",
            headers={
                "Content-Disposition": f'attachment; filename="{_safe_stem(file.filename)}_seg.nii.gz"',
                "X-Label-Volumes-mm3": json.dumps(volumes),
                "X-Inference-Seconds": f"{time.perf_counter() - t0:.3f}",
                "X-Output-Signals": signals_header,
            },
        )

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


def _segment(
    segmenter: Any,
    budget: Budget,
    raw: bytes,
    name: str,
    max_voxels: int,
    tta: bool | None,
    monitor: LiveMonitor,
    cancel: Callable[[], bool],
) -> tuple[bytes, dict, dict]:
    img = decode_nifti(raw, name, max_voxels, budget)
    del raw
    data = check_volume(img, name, segmenter.num_channels, budget)
    zooms = tuple(float(z) for z in img.header.get_zooms()[:3])
    if cancel():
        raise Cancelled(f"{name}: cancelled before segmentation")
    prepared = segmenter.prepare(data, zooms)
    logits, signals = observe(segmenter, prepared, tta, cancel, monitor.max_member_mib)
    seg = segmenter.finish(prepared, logits)
    del logits
    volumes = label_volumes(seg, img, segmenter.labels)
    signals.update(volume_signals(volumes))
    if monitor.store is not None:
        try:  # monitoring must never fail a prediction
            stats = {**raw_stats(data, zooms), "orientation": orientation(img.affine)}
            stats.update(normalised_stats(prepared.data.numpy()))
            monitor.record({**stats, **signals})
        except Exception as exc:
            logger.warning(f"could not compute request statistics: {type(exc).__name__}")
    return to_gzip_bytes(segmentation_like(seg, img), level=1), volumes, signals


def build_server(app: FastAPI, cfg: DictConfig) -> Any:
    """uvicorn on ``serve.host:serve.port`` with bounded connections and idle keep-alive, and a SIGTERM that drains.

    On SIGTERM (Cloud Run, docker stop) uvicorn stops accepting at once; work in flight gets ``serve.shutdown_grace_s``
    to finish and is then cancelled at its next tile, so the process exits within Cloud Run's 10 s. The server is
    returned, not run, so tests can run the very same server in a thread (uvicorn installs no signal handlers there).
    """
    import uvicorn

    drain: Drain = app.state.drain

    class DrainingServer(uvicorn.Server):
        def handle_exit(self, sig: int, frame: object) -> None:
            if not self.should_exit:
                logger.info(f"Signal {sig}: no new requests; in-flight work has {drain.grace_s:g} s to finish")
            drain.start()
            super().handle_exit(sig, frame)  # type: ignore[arg-type]

    config = uvicorn.Config(
        app,
        host=str(cfg.serve.host),
        port=int(cfg.serve.port),
        log_config=None,
        access_log=False,
        limit_concurrency=int(cfg.serve.max_connections),
        timeout_keep_alive=5,
        timeout_graceful_shutdown=int(float(cfg.serve.shutdown_grace_s)) + 1,
    )
    return DrainingServer(config)


def run_server(app: FastAPI, cfg: DictConfig) -> None:
    """Serve until SIGTERM/Ctrl-C (:func:`build_server`)."""
    build_server(app, cfg).run()


def fetch_model(cfg: DictConfig) -> Path:
    """Copy the model folder at ``serve.model_uri`` (``gs://...`` or any fsspec URL) to ``serve.model_cache``."""
    from mlops.inference.fetch import fetch_model as fetch

    return fetch(str(cfg.serve.model_uri), Path(cfg.serve.model_cache))
