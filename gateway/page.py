"""The web page at `/`: plain HTML, CSS and JS from `gateway/static/` (package data), no build
step and nothing from a CDN.

The page and its assets need no key: the key is the user's, pasted into the page and kept in
the tab's session storage, and every API call the page makes sends it as a bearer token, like
any other client. Nothing here is in the API description (`include_in_schema=False`): these
are not API routes.

Every answer carries a strict Content-Security-Policy: scripts, styles and connections to this
origin only, no inline script or style. Images may come from anywhere over HTTP(S): a job's
image is its presigned object-store URL, on whichever origin the store has.
"""

from __future__ import annotations

from importlib.resources import files

from fastapi import FastAPI
from fastapi.responses import Response

from imagegen.gateway.problems import Problem

CONTENT_SECURITY_POLICY = "; ".join(
    [
        "default-src 'self'",
        "script-src 'self'",
        "style-src 'self'",
        "connect-src 'self'",
        "img-src 'self' http: https: data:",
        "object-src 'none'",
        "base-uri 'none'",
        "form-action 'self'",
        "frame-ancestors 'none'",
    ]
)
HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    # The page's URL holds nothing secret, but a presigned image URL should not travel on.
    "Referrer-Policy": "no-referrer",
    # Small files that change with the release: always revalidate rather than serve stale JS.
    "Cache-Control": "no-cache",
}
#: The assets under /static/, by name: a fixed list, so no request names a path of its own.
ASSETS: dict[str, str] = {
    "app.css": "text/css; charset=utf-8",
    "app.js": "text/javascript; charset=utf-8",
    "api.js": "text/javascript; charset=utf-8",
    "events.js": "text/javascript; charset=utf-8",
    "jobs.js": "text/javascript; charset=utf-8",
    "icon.svg": "image/svg+xml",
}
PAGE = "index.html"


def _read(name: str) -> bytes:
    return (files("imagegen.gateway") / "static" / name).read_bytes()


def install(app: FastAPI) -> None:
    """Serve the page at `/` and its assets at `/static/<name>`, read once at start."""
    page = _read(PAGE)
    assets = {name: (_read(name), media_type) for name, media_type in ASSETS.items()}

    @app.api_route("/", methods=["GET", "HEAD"], include_in_schema=False)
    async def index() -> Response:
        return Response(page, media_type="text/html; charset=utf-8", headers=HEADERS)

    @app.api_route("/static/{name}", methods=["GET", "HEAD"], include_in_schema=False)
    async def asset(name: str) -> Response:
        if name not in assets:
            raise Problem("not-found", f"no asset {name}")
        body, media_type = assets[name]
        return Response(body, media_type=media_type, headers=HEADERS)
