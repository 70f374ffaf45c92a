"""The page at ``/`` (NiiVue viewer of a scan and its segmentation) and Swagger UI / ReDoc, all from ``static/``.

FastAPI's own ``/docs`` and ``/redoc`` load their scripts from a CDN, which is a blank page behind a firewall; these
serve the same pages from the files shipped in the package.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import FileResponse, HTMLResponse
from fastapi.staticfiles import StaticFiles

STATIC = Path(__file__).resolve().parent / "static"
# The pages may load only from this service: a vendored bundle that reached for the internet (ReDoc's footer logo
# comes from cdn.redoc.ly) is refused by the browser instead of leaking a request out of a hospital network.
# 'unsafe-inline' scripts: FastAPI's Swagger UI page starts Swagger UI inline; blob: workers: ReDoc's search.
CSP = (
    "default-src 'self'; script-src 'self' 'unsafe-inline'; style-src 'self' 'unsafe-inline'; "
    "img-src 'self' data: blob:; worker-src 'self' blob:; connect-src 'self' blob:; font-src 'self' data:; "
    "object-src 'none'; base-uri 'self'; frame-ancestors 'self'"
)
HEADERS = {"Content-Security-Policy": CSP, "Cache-Control": "no-cache"}


def add_page_routes(app: FastAPI) -> None:
    """``/``, ``/static/...``, ``/docs`` and ``/redoc`` (the app must be built with ``docs_url=redoc_url=None``)."""
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    title = app.title

    @app.api_route("/", methods=["GET", "HEAD"], include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(STATIC / "index.html", media_type="text/html", headers=HEADERS)

    @app.get("/favicon.ico", include_in_schema=False)
    async def favicon() -> FileResponse:
        return FileResponse(STATIC / "favicon.svg", media_type="image/svg+xml")

    @app.get("/docs", include_in_schema=False)
    async def swagger() -> HTMLResponse:
        html = get_swagger_ui_html(
            openapi_url="openapi.json",  # relative: works behind a path prefix too
            title=f"{title} - Swagger UI",
            swagger_js_url="static/vendor/swagger-ui/swagger-ui-bundle.js",
            swagger_css_url="static/vendor/swagger-ui/swagger-ui.css",
            swagger_favicon_url="static/vendor/swagger-ui/favicon-32x32.png",
            swagger_ui_parameters={"validatorUrl": None},  # no badge fetched from validator.swagger.io
        )
        html.headers.update(HEADERS)
        return html

    @app.get("/redoc", include_in_schema=False)
    async def redoc() -> HTMLResponse:
        html = get_redoc_html(
            openapi_url="openapi.json",
            title=f"{title} - ReDoc",
            redoc_js_url="static/vendor/redoc/redoc.standalone.js",
            redoc_favicon_url="favicon.ico",
            with_google_fonts=False,
        )
        html.headers.update(HEADERS)
        return html
