"""The web console: static files served at `/ui` by the API's own app.

The console is plain JavaScript modules (no build step) that call only the public HTTP API
with the key the user pasted, so it can show nothing that key could not fetch itself. The
files get a strict Content-Security-Policy: scripts and styles from this origin only (no
inline script or style), requests to this origin only, no framing; every API value is
rendered as text by the scripts, and the policy is the second line of defence should one
ever be rendered as HTML.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from starlette.responses import Response
from starlette.staticfiles import StaticFiles
from starlette.types import Scope

STATIC_DIR = Path(__file__).parent / "static"

CONTENT_SECURITY_POLICY = "; ".join(
    (
        "default-src 'none'",
        "script-src 'self'",
        "style-src 'self'",
        "img-src 'self'",  # the chart is a canvas: no image but the browser's favicon request
        "connect-src 'self'",
        "base-uri 'none'",
        "form-action 'none'",
        "frame-ancestors 'none'",
    )
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
}


class ConsoleFiles(StaticFiles):
    """StaticFiles with the console's security headers. The HTML is never cached, so a new
    server version's page always loads; scripts and styles revalidate (ETag) every time,
    so the page never runs an older script than the server ships."""

    async def get_response(self, path: str, scope: Scope) -> Response:
        response = await super().get_response(path, scope)
        response.headers.update(SECURITY_HEADERS)
        is_html = response.media_type == "text/html" or path in ("", ".") or path.endswith(".html")
        response.headers["Cache-Control"] = "no-store" if is_html else "no-cache"
        return response


def mount_console(app: FastAPI) -> None:
    """Serve the console at `/ui/` (`/ui` redirects there)."""
    app.mount("/ui", ConsoleFiles(directory=STATIC_DIR, html=True), name="ui")
