"""The operator's web dashboard and the API docs, served by the controller itself so both work
with no internet: one HTML page, its script and style (``controller/dashboard/``), and Swagger
UI's files from the ``swagger-ui-bundle-v2`` package.

The page carries no data: its script asks the JSON API with the operator token the operator
logs in with (kept in the tab's sessionStorage, sent as a bearer header, never a cookie, so no
other site can make the browser act with it), and the API checks the token's role as for any
caller. Only a fixed set of files is served, by name.
"""
from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import FileResponse, HTMLResponse, RedirectResponse, Response
from swagger_ui_bundle import swagger_ui_path

from ..errors import NotFound

router = APIRouter(include_in_schema=False)

PAGES = Path(__file__).resolve().parent.parent / "dashboard"
SWAGGER = Path(str(swagger_ui_path))
# name -> (folder, media type): nothing else is served
FILES = {
    "app.js": (PAGES, "text/javascript"),
    "app.css": (PAGES, "text/css"),
    "favicon.svg": (PAGES, "image/svg+xml"),
    "swagger-ui-bundle.js": (SWAGGER, "text/javascript"),
    "swagger-ui.css": (SWAGGER, "text/css"),
}
# The dashboard runs only its own script, draws only its own styles, and talks only to this controller.
PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
                               "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-cache",
}


@router.get("/")
def home() -> RedirectResponse:
    return RedirectResponse("/ui/")


@router.get("/ui/")
def page() -> HTMLResponse:
    return HTMLResponse((PAGES / "index.html").read_text(), headers=PAGE_HEADERS)


@router.get("/ui/static/{name}")
def static(name: str) -> Response:
    if name not in FILES:
        raise NotFound(f"no dashboard file {name!r}")
    folder, media_type = FILES[name]
    return FileResponse(folder / name, media_type=media_type, headers={"X-Content-Type-Options": "nosniff"})


@router.get("/docs")
def docs(request: Request) -> HTMLResponse:
    return get_swagger_ui_html(
        openapi_url=request.app.openapi_url, title=f"{request.app.title} API",
        swagger_js_url="/ui/static/swagger-ui-bundle.js", swagger_css_url="/ui/static/swagger-ui.css",
        swagger_favicon_url="/ui/static/favicon.svg",
    )
