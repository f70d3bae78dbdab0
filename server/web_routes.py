"""The web client: static files under /web/, the role table it reads, and (development mode
only) the demo identities to sign in with."""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path
from urllib.parse import quote

from aiohttp import web

from rooms.consultations import ConsultationService
from rooms.roles import ROLE_PERMISSIONS
from server.auth import TokenService
from server.config import Config
from server.dev_routes import register_dev

# Package data beside the server (pyproject.toml), so a plain `pip install .` serves it.
WEB_DIR = Path(str(files("web"))).resolve()

_TYPES = {
    ".html": "text/html",
    ".js": "text/javascript",
    ".css": "text/css",
    ".json": "application/json",
    ".png": "image/png",
    ".svg": "image/svg+xml",
}
# The page loads nothing from elsewhere; media elements play blob/MediaStream sources and the
# recording's short-lived link on this origin.
_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; connect-src 'self' ws: wss:; media-src 'self' blob:; "
        "img-src 'self' data: blob:; style-src 'self'; object-src 'none'; "
        "base-uri 'none'; frame-ancestors 'none'"
    ),
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-cache",
}


def register_web(
    app: web.Application, config: Config, service: ConsultationService, tokens: TokenService
) -> None:
    async def index(_: web.Request) -> web.StreamResponse:
        return _file(WEB_DIR / "index.html")

    async def root(_: web.Request) -> web.StreamResponse:
        raise web.HTTPFound("/web/")

    async def join(request: web.Request) -> web.StreamResponse:
        # A short address to say aloud; `?code=` is carried over to prefill the code.
        code = request.query.get("code", "")[:64]
        raise web.HTTPFound(f"/web/join.html?code={quote(code)}" if code else "/web/join.html")

    async def static(request: web.Request) -> web.StreamResponse:
        path = _web_file(request.match_info["path"])
        if path is None:
            raise web.HTTPNotFound(text="no such file under /web/")
        return _file(path)

    permissions = {
        role.value: sorted(p.value for p in perms) for role, perms in ROLE_PERMISSIONS.items()
    }

    async def roles(_: web.Request) -> web.Response:
        # The client shows only the controls a role may use; the server still decides.
        return web.json_response(permissions, headers={"Cache-Control": "no-cache"})

    app.router.add_get("/", root)
    app.router.add_get("/join", join)
    app.router.add_get("/web/", index)
    app.router.add_get("/web/roles.json", roles)
    app.router.add_get("/web/{path:.+}", static)
    if config.dev:
        register_dev(app, service, tokens)


def _web_file(relative: str) -> Path | None:
    """The file under WEB_DIR that `relative` names, or None. A name the file system cannot
    hold (an embedded NUL, a component longer than NAME_MAX) names nothing."""
    try:
        path = (WEB_DIR / relative).resolve()
        if path.is_relative_to(WEB_DIR) and path.suffix in _TYPES and path.is_file():
            return path
    except (OSError, ValueError):
        pass
    return None


def _file(path: Path) -> web.FileResponse:
    response = web.FileResponse(path, headers=_HEADERS)
    response.content_type = _TYPES[path.suffix]
    return response
