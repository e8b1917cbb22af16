"""The live dashboard: "/" and the files under "/static/", public because they hold no data.

Only the regular files found in `static/` at first use, with a known type, are served:
a request names one of them exactly or gets 404, so no path can climb out of the folder.
The page itself asks for the token and sends it in a header, never in a URL.
"""

from __future__ import annotations

import functools
from pathlib import Path

from starlette.requests import Request
from starlette.responses import FileResponse, Response

from adapters.http.errors import problem_response

STATIC_DIR = Path(__file__).parent / "static"
CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
    ".png": "image/png",
    ".ico": "image/x-icon",
}
# The page runs only its own files; it talks to this origin only; nobody may frame it.
CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


@functools.cache
def static_files() -> dict[str, Path]:
    """Every servable file under static/, by its path relative to the folder."""
    root = STATIC_DIR.resolve()
    found: dict[str, Path] = {}
    for path in sorted(root.rglob("*")):
        if path.is_file() and not path.is_symlink() and path.suffix in CONTENT_TYPES:
            found[path.relative_to(root).as_posix()] = path
    return found


def file_response(name: str) -> Response:
    """The static file `name` with its content type and the page's security headers."""
    path = static_files().get(name)
    if path is None:  # answered here: a raised error would reach the 500 handler's path
        return problem_response(404, f"no static file named {name!r}")
    return FileResponse(path, media_type=CONTENT_TYPES[path.suffix], headers=HEADERS)


async def index(request: Request) -> Response:
    """GET /: the dashboard page."""
    return file_response("index.html")


async def static(request: Request) -> Response:
    """GET /static/{path}: the page's script, style sheet and images."""
    return file_response(request.path_params["path"])
