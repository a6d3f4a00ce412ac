"""What every request to the operator's console passes: sign-in, CSRF, security headers.

The console lives on the admin listener under ``/_idem/console`` and is guarded by the
listener's own authentication, exactly as ``/_idem/ops`` is: this gate never decides who
someone is. It is installed outermost (``console_gate``), and for a console request it
only translates what a browser can carry into what the admin authentication reads:

- the console's session cookie holds the bearer token an operator signed in with
  (HttpOnly, SameSite=Strict, scoped to ``/_idem/console``, Secure behind TLS). The gate
  sends it on as ``Authorization: Bearer``, and the admin authentication checks it on every
  request, so a token taken out of the identities file stops working at once. Nothing is
  kept on the server: every worker of ``--workers N`` accepts the cookie, and so does the
  process after a restart.
- the sign-in form (``POST /_idem/console/login``) is the one body the gate reads itself
  (a few KiB at most): its token goes on as the bearer token of that request, and the
  session cookie is set only when the admin authentication accepted it.
- with admin authentication off (a loopback admin listener), there is no sign-in; the pages
  then answer only requests addressed to a loopback host (no DNS rebinding).

Every form carries a CSRF token: an HMAC, keyed with a random value in an HttpOnly
SameSite=Strict cookie, of the bearer token the request presents. A POST from another
site (``Sec-Fetch-Site``, ``Origin``) is refused before anything else. An answer the admin
listener gives as problem+json becomes an HTML page (the sign-in form for a 401), and every
console answer carries a Content-Security-Policy without inline scripts or styles, framing
refused and no referrer. Only the console's two static files and its sign-in form are
served to a request without credentials.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import hmac
import secrets
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import resources
from typing import Any

import aiohttp_jinja2
import orjson
from aiohttp import web
from aiohttp.typedefs import Handler, Middleware
from multidict import CIMultiDict

from idemproxy.edge.auth import IDENTITY, OpsAccess, addressed_to_loopback
from idemproxy.protocol import PROBLEM_CONTENT_TYPE
from idemproxy.protocol.errors import Forbidden

PREFIX = "/_idem/console"
HOME = PREFIX + "/"
LOGIN = PREFIX + "/login"
STATIC = PREFIX + "/static/"
SESSION_COOKIE = "idem_console_session"
CSRF_COOKIE = "idem_console_csrf"
#: A browser forgets the session after this; the token itself may well live longer.
SESSION_MAX_AGE_S = 8 * 3600

#: The vendored htmx (``static/README.md`` says where it comes from).
HTMX_VERSION = "2.0.11"
HTMX_SHA256 = "d6fdc75f204e6bdefa99b69bf1e6d4ac69b8a364f77929f45c13476b4000f717"

SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
        "form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
    ),
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cross-Origin-Resource-Policy": "same-origin",
}

#: The random value the request's CSRF tokens are keyed with (from its cookie, or new).
CSRF_NONCE = web.RequestKey("console_csrf_nonce", str)
#: Set when ``viewer`` found admin authentication off (the pages say so).
AUTH_OFF = web.RequestKey("console_auth_off", bool)
#: Where the sign-in form asked to go next (a console path).
LOGIN_NEXT = web.RequestKey("console_login_next", str)

_ASSET_TYPES = {".js": "text/javascript", ".css": "text/css"}
_LOGIN_MAX_BYTES = 8 * 1024
_LOGIN_BODY_TIMEOUT_S = 10.0
_MAX_TOKEN_CHARS = 1024
_NONCE_CHARS = 43  # secrets.token_urlsafe(32)


def is_console(path: str) -> bool:
    return path == PREFIX or path.startswith(PREFIX + "/")


# -- static files ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Asset:
    body: bytes
    content_type: str
    digest: str


class Assets:
    """The console's static files, read once from the package and served from memory."""

    def __init__(self) -> None:
        folder = resources.files("idemproxy.ops").joinpath("static")
        self._files: dict[str, _Asset] = {}
        for name in ("htmx.min.js", "console.css"):
            body = folder.joinpath(name).read_bytes()
            suffix = name[name.rindex(".") :]
            self._files[name] = _Asset(body, _ASSET_TYPES[suffix], hashlib.sha256(body).hexdigest())

    def url(self, name: str) -> str:
        """The file's URL, versioned by its content (so it can be cached for good)."""
        return f"{STATIC}{name}?v={self._files[name].digest[:16]}"

    def response(self, path: str) -> web.Response | None:
        asset = self._files.get(path.removeprefix(STATIC)) if path.startswith(STATIC) else None
        if asset is None:
            return None
        return web.Response(
            body=asset.body,
            content_type=asset.content_type,
            charset="utf-8",
            headers={"Cache-Control": "public, max-age=31536000, immutable", "ETag": f'"{asset.digest}"'},
        )


ASSETS_KEY = web.AppKey("console_assets", Assets)


# -- sessions and CSRF -----------------------------------------------------------------------


def bearer_token(request: web.Request) -> str | None:
    """The bearer token the request presents (its own, or the one the gate sent on)."""
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    return token.strip() or None if scheme.lower() == "bearer" else None


def session_token(request: web.Request) -> str | None:
    """The token in the request's session cookie, if it holds one."""
    raw = request.cookies.get(SESSION_COOKIE, "")
    if not raw.startswith("v1.") or len(raw) > 4 * _MAX_TOKEN_CHARS:
        return None
    try:
        token = base64.urlsafe_b64decode(raw[3:].encode("ascii")).decode("utf-8")
    except (ValueError, UnicodeError, binascii.Error):
        return None
    return token if token and token.isprintable() else None


def set_session(response: web.StreamResponse, request: web.Request, token: str) -> None:
    value = "v1." + base64.urlsafe_b64encode(token.encode("utf-8", "surrogateescape")).decode("ascii")
    response.set_cookie(SESSION_COOKIE, value, max_age=SESSION_MAX_AGE_S, **_cookie_flags(request))


def clear_session(response: web.StreamResponse, request: web.Request) -> None:
    response.del_cookie(SESSION_COOKIE, **_cookie_flags(request))


def _cookie_flags(request: web.Request) -> dict[str, Any]:
    # Behind a proxy that terminates TLS the listener sees plain HTTP; the forwarded scheme
    # can only make the cookie stricter, so it is taken as it comes.
    secure = request.secure or request.headers.get("X-Forwarded-Proto", "").lower() == "https"
    return {"path": PREFIX, "httponly": True, "samesite": "Strict", "secure": secure}


def csrf_token(request: web.Request, bound_to: str | None = None) -> str:
    """The CSRF token for a form this request shows: keyed with the request's CSRF cookie and
    bound to the bearer token it presents (``bound_to``: the sign-in form binds to none)."""
    token = bearer_token(request) if bound_to is None else bound_to
    message = b"idemproxy-console-csrf\n" + (token or "").encode("utf-8", "surrogateescape")
    return hmac.new(request[CSRF_NONCE].encode("ascii"), message, hashlib.sha256).hexdigest()


def csrf_valid(request: web.Request, sent: object, bound_to: str | None = None) -> bool:
    if not isinstance(sent, str) or not sent.isascii():
        return False
    return hmac.compare_digest(csrf_token(request, bound_to), sent)


def _nonce(request: web.Request) -> str:
    cookie = request.cookies.get(CSRF_COOKIE, "")
    if len(cookie) == _NONCE_CHARS and all(char.isascii() and (char.isalnum() or char in "-_") for char in cookie):
        return cookie
    return secrets.token_urlsafe(32)


def _cross_site(request: web.Request) -> bool:
    """A request a page of another origin made (another port of this host counts as one)."""
    if request.headers.get("Sec-Fetch-Site", "same-origin") not in ("same-origin", "none"):
        return True
    origin = request.headers.get("Origin")
    # With Referrer-Policy no-referrer a browser sends "Origin: null" on its own forms.
    return origin not in (None, "null", f"{request.scheme}://{request.host}")


def safe_next(value: object) -> str:
    """A console path to go to after signing in, or the console's home (never another site)."""
    if not isinstance(value, str) or not is_console(value) or "//" in value or "\\" in value:
        return HOME
    return value if value.isascii() and value.isprintable() else HOME


# -- who is looking ----------------------------------------------------------------------------


def viewer(request: web.Request) -> str | None:
    """The signed-in identity's name; ``None`` with admin authentication off, where only a
    request addressed to a loopback host is answered (a page on another site that had its name
    re-pointed at 127.0.0.1 must not be able to read the console or its CSRF token)."""
    identity = request.get(IDENTITY)
    if identity is not None:
        name: str = identity.name
        return name
    if not addressed_to_loopback(request.host):
        raise Forbidden(
            f"Without admin authentication the console answers only requests addressed to a loopback "
            f"host (127.0.0.1, [::1], localhost), not {request.host!r}."
        )
    request[AUTH_OFF] = True
    return None


def may_resolve(request: web.Request) -> bool:
    identity = request.get(IDENTITY)
    return identity is None or identity.ops is OpsAccess.ADMIN


def page_context(request: web.Request) -> dict[str, Any]:
    """What every page shows: who is signed in, and the CSRF token of its forms."""
    identity = request.get(IDENTITY)
    return {
        "viewer": None if identity is None else identity.name,
        "signed_in": identity is not None and bearer_token(request) is not None,
        "auth_off": request.get(AUTH_OFF, False),
        "csrf": csrf_token(request),
    }


# -- the gate ---------------------------------------------------------------------------------


def console_gate() -> Middleware:
    """The middleware every console request passes, outermost on the admin listener."""

    @web.middleware
    async def gate(request: web.Request, handler: Handler) -> web.StreamResponse:
        if not is_console(request.path):
            return await handler(request)
        if request.method in ("GET", "HEAD") and (asset := request.app[ASSETS_KEY].response(request.path)):
            asset.headers.update(SECURITY_HEADERS)
            return asset
        request[CSRF_NONCE] = nonce = _nonce(request)
        try:
            response = await _pass(request, handler)
        except web.HTTPException as exc:
            exc.headers.update(SECURITY_HEADERS)
            raise
        response.headers.update(SECURITY_HEADERS)
        response.headers.setdefault("Cache-Control", "no-store")
        if request.cookies.get(CSRF_COOKIE) != nonce:
            response.set_cookie(CSRF_COOKIE, nonce, **_cookie_flags(request))
        return response

    return gate


async def _pass(request: web.Request, handler: Handler) -> web.StreamResponse:
    if request.method not in ("GET", "HEAD") and _cross_site(request):
        return _page(request, "error.html", 403, title="Refused", detail="A form of another site cannot act here.")
    presents_own = "Authorization" in request.headers or "X-Idem-Key-Id" in request.headers
    token: str | None = None
    if request.path == LOGIN and request.method == "POST":
        form = await _login_form(request)
        if isinstance(form, web.Response):
            return form
        token = form.get("token", "").strip()
        if not csrf_valid(request, form.get("csrf"), bound_to=""):
            return _login_page(request, 403, "The sign-in form expired; please sign in again.")
        if not token or len(token) > _MAX_TOKEN_CHARS or not token.isprintable():
            return _login_page(request, 401, "Enter a bearer token of an identity with 'ops' access.")
        request[LOGIN_NEXT] = safe_next(form.get("next"))
    elif not presents_own:
        token = session_token(request)
    if token is not None:
        headers = CIMultiDict(request.headers)
        headers["Authorization"] = f"Bearer {token}"
        request = request.clone(headers=headers)
    response = await handler(request)
    if not (isinstance(response, web.Response) and response.content_type == PROBLEM_CONTENT_TYPE):
        return response
    return _problem_page(request, response)


async def _login_form(request: web.Request) -> dict[str, str] | web.Response:
    """The sign-in form's fields, read before authentication (so: small, and soon)."""
    length = request.content_length
    if length is None or length > _LOGIN_MAX_BYTES:
        return _login_page(request, 413, "The sign-in form is too large.")
    try:
        async with asyncio.timeout(_LOGIN_BODY_TIMEOUT_S):
            raw = await request.content.readexactly(length)
    except (TimeoutError, asyncio.IncompleteReadError):
        return _login_page(request, 400, "The sign-in form did not arrive whole.")
    try:
        fields = urllib.parse.parse_qs(raw.decode("utf-8", "replace"), max_num_fields=8)
    except ValueError:  # more fields than the form has
        return _login_page(request, 400, "That is not the sign-in form.")
    return {name: values[0] for name, values in fields.items()}


def _problem_page(request: web.Request, response: web.Response) -> web.Response:
    """An HTML page for the admin listener's problem+json answer (the sign-in form for a 401)."""
    problem = _problem(response)
    if response.status == 401:
        if request.headers.get("HX-Request") == "true":  # a live update: htmx loads the page instead
            page = web.Response(status=401, headers={"HX-Redirect": HOME})
        else:
            signing_in = request.path == LOGIN and request.method == "POST"
            page = _login_page(request, 401, "That token is not valid." if signing_in else None)
        if session_token(request) is not None:
            clear_session(page, request)
        return page
    if request.headers.get("HX-Request") == "true":
        return response
    if request.path == LOGIN and request.method == "POST":  # e.g. an identity without ops access
        return _login_page(request, response.status, str(problem.get("detail", "")))
    return _page(
        request,
        "error.html",
        response.status,
        title=str(problem.get("title", "Error")),
        detail=str(problem.get("detail", "")),
        headers={name: value for name, value in response.headers.items() if name in ("Allow", "Retry-After")},
    )


def _problem(response: web.Response) -> Mapping[str, Any]:
    try:
        problem = orjson.loads(response.body if isinstance(response.body, bytes) else b"{}")
    except orjson.JSONDecodeError:
        return {}
    return problem if isinstance(problem, dict) else {}


def _login_page(request: web.Request, status: int, error: str | None) -> web.Response:
    target = request.path_qs if request.method == "GET" and request.path != LOGIN else request.get(LOGIN_NEXT, HOME)
    return _page(
        request,
        "login.html",
        status,
        error=error,
        next=safe_next(target),
        login_csrf=csrf_token(request, bound_to=""),
        signed_in=False,
        headers={"WWW-Authenticate": 'Bearer realm="idemproxy"'} if status == 401 else None,
    )


def _page(
    request: web.Request, template: str, status: int, *, headers: Mapping[str, str] | None = None, **context: Any
) -> web.Response:
    response = aiohttp_jinja2.render_template(
        template, request, {**page_context(request), **context, "status": status}, status=status
    )
    response.headers.update(headers or {})
    return response
