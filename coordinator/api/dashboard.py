"""The dashboard at ``GET /``: one page, its script and its style, all served from this package.

The page polls ``/v1/status`` (public, like the page) and draws its charts as SVG by hand: a few dozen lines
of script instead of a vendored chart library, nothing to keep up to date, nothing fetched from elsewhere
(the Content-Security-Policy header allows this origin only).
"""

from __future__ import annotations

from functools import cache
from importlib.resources import files

from fastapi import APIRouter, Path, Response

from coordinator.errors import NotFound

ASSETS = {"dashboard.js": "text/javascript", "dashboard.css": "text/css"}
HEADERS = {
    "Cache-Control": "no-cache",
    "Content-Security-Policy": "default-src 'self'; base-uri 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
}

router = APIRouter(include_in_schema=False)


@cache
def _asset(name: str) -> bytes:
    return files("coordinator.api").joinpath("static", name).read_bytes()


@router.get("/")
async def page() -> Response:
    return Response(_asset("dashboard.html"), media_type="text/html; charset=utf-8", headers=HEADERS)


@router.get("/dashboard/{name}")
async def asset(name: str = Path(max_length=32)) -> Response:
    if name not in ASSETS:
        raise NotFound("not_found", f"no dashboard file {name[:32]}")
    return Response(_asset(name), media_type=f"{ASSETS[name]}; charset=utf-8", headers=HEADERS)
