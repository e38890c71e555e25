"""What keeps the dashboard read-only and its files inside the run directories.

* :func:`safe_file` resolves a requested path (following symbolic links) and serves it
  only if it still lies inside the folder it was asked of, is a regular file and has
  a listed suffix;
* :func:`install_guard` adds, to every response, headers that forbid inline scripts,
  framing and content sniffing, and -- when the dashboard has a token -- checks the
  token on every request (``Authorization: Bearer``, ``X-Medfed-Token``, ``?token=``,
  then the cookie that ``?token=`` sets).
"""

from __future__ import annotations

import ipaddress
import logging
import secrets
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlencode

if TYPE_CHECKING:
    from fastapi import FastAPI

logger = logging.getLogger(__name__)

TOKEN_COOKIE = "medfed_dashboard_token"
TOKEN_HEADER = "x-medfed-token"
#: Files the dashboard serves from a run or sweep folder, by suffix, with their media type.
MEDIA_TYPES = {
    ".md": "text/plain; charset=utf-8", ".txt": "text/plain; charset=utf-8", ".csv": "text/plain; charset=utf-8",
    ".yaml": "text/plain; charset=utf-8", ".yml": "text/plain; charset=utf-8",
    ".json": "application/json", ".jsonl": "text/plain; charset=utf-8",
    ".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg",
}
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
                               "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


class FileRefused(LookupError):
    """A requested file is outside its folder, missing, or not a kind the dashboard serves."""


def is_loopback(host: str) -> bool:
    """Whether binding to ``host`` reaches this machine only (``localhost``, 127.0.0.0/8, ``::1``)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def new_token() -> str:
    """A fresh random access token (URL-safe, 192 bits)."""
    return secrets.token_urlsafe(24)


def safe_file(base: Path, relative: str) -> Path:
    """The file ``relative`` inside ``base``, resolved; raise :class:`FileRefused` if it is not one to serve.

    Args:
        base: A run or sweep folder.
        relative: The requested path inside it (already URL-decoded).
    """
    refused = FileRefused(f"no file {relative!r} in this run (the dashboard serves {', '.join(MEDIA_TYPES)} "
                          "files inside the run directory only)")
    if not relative or "\x00" in relative or relative.startswith(("/", "\\")) or "\\" in relative:
        raise refused
    root = base.resolve()
    try:
        target = (root / relative).resolve(strict=True)
        target.relative_to(root)  # after following every symbolic link
    except (OSError, RuntimeError, ValueError):
        raise refused from None  # one answer for missing and outside: no probing of other folders
    if not target.is_file() or target.suffix.lower() not in MEDIA_TYPES:
        raise refused
    return target


def _given_token(request) -> tuple[str | None, bool]:  # noqa: ANN001 - a starlette Request
    """The token a request carries and whether it came in the query string."""
    auth = request.headers.get("authorization", "")
    if auth.lower().startswith("bearer "):
        return auth[7:].strip(), False
    if request.headers.get(TOKEN_HEADER):
        return request.headers[TOKEN_HEADER], False
    if request.query_params.get("token"):
        return request.query_params["token"], True
    return request.cookies.get(TOKEN_COOKIE), False


def install_guard(app: FastAPI, *, token: str | None) -> None:
    """Check ``token`` on every request (when set) and add :data:`SECURITY_HEADERS` to every response."""
    from starlette.responses import PlainTextResponse, RedirectResponse  # noqa: PLC0415

    @app.middleware("http")
    async def guard(request, call_next):  # noqa: ANN001, ANN202
        if token is not None:
            given, in_query = _given_token(request)
            if not given or not secrets.compare_digest(given.encode(), token.encode()):
                response = PlainTextResponse(
                    "401 Unauthorized: this dashboard needs the token printed when it started "
                    "(open the URL it printed, or send the header X-Medfed-Token).", status_code=401)
                return _secured(response)
            if in_query:  # set the cookie and drop the token from the address bar
                rest = [(k, v) for k, v in request.query_params.multi_items() if k != "token"]
                url = request.url.path + (f"?{urlencode(rest)}" if rest else "")
                response = RedirectResponse(url, status_code=303)
                response.set_cookie(TOKEN_COOKIE, token, httponly=True, samesite="strict", path="/")
                return _secured(response)
        if request.method not in ("GET", "HEAD"):
            return _secured(PlainTextResponse("405: the dashboard is read-only", status_code=405))
        return _secured(await call_next(request))


def _secured(response):  # noqa: ANN001, ANN202
    for name, value in SECURITY_HEADERS.items():
        response.headers.setdefault(name, value)
    return response
