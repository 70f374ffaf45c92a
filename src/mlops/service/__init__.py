"""The service around `POST /predict` (the app itself is :func:`mlops.api.create_app`).

What a person or a client meets: the viewer page at ``/`` (``page``), Swagger UI and ReDoc from local assets,
``GET /info`` (``info``), CORS, the optional bearer token and the access log (``access``), JSON answers (``results``).
What keeps it standing: Prometheus metrics (``metrics``), requests in flight, the SIGTERM drain and the upload guard
(``limits``), and uvicorn around it all (``server``).

:func:`install` adds the page, the docs, ``/info`` and the middleware to the app; nothing here loads from the
internet at run time (the page's NiiVue, Swagger UI and ReDoc are shipped in ``static/vendor/`` with their licences).
"""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse
from omegaconf import DictConfig

from mlops.service.access import AccessLog, BearerToken
from mlops.service.info import model_info
from mlops.service.page import add_page_routes

# Headers the page and a browser client read from a /predict answer (exposed to other origins under CORS).
EXPOSED_HEADERS = ["X-Label-Volumes-mm3", "X-Inference-Seconds", "X-Output-Signals", "Content-Disposition"]


def install(app: FastAPI, cfg: DictConfig) -> None:
    """Add the page, the docs, ``/info`` and the middleware (outermost first: access log, CORS, token)."""
    add_page_routes(app)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        """FastAPI's 422 without the offending ``input``: it echoed a whole upload part (2 MB for 1 MB sent)."""
        errors = [{k: v for k, v in e.items() if k not in ("input", "ctx", "url")} for e in exc.errors()]
        return JSONResponse(jsonable_encoder({"detail": errors}), status_code=422)

    @app.get(
        "/info",
        summary="The model behind the service",
        description="Labels (id -> name) and their colours, channels, model folder, folds, configuration, training "
        "Dice if known, mlops and nnU-Net versions, device and backend.",
    )
    async def info(request: Request) -> dict:
        # pacs: whether the page may offer to open a series from the configured PACS (dicom.url; never its address)
        return {**model_info(request.app.state.segmenter), "pacs": bool(cfg.get("dicom", {}).get("url"))}

    token = cfg.serve.get("api_token") or None
    if token:
        app.add_middleware(BearerToken, token=str(token))
    origins = [str(o) for o in cfg.serve.get("cors_origins") or []]
    if origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=origins,
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "Content-Type", "Accept"],
            expose_headers=EXPOSED_HEADERS,
            max_age=600,
        )
    app.add_middleware(AccessLog)
