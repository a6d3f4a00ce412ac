"""Who is calling: identities, their credentials and scopes, and how a request proves one.

Identities come from ``auth.identities`` in the main configuration and/or an
identities file (``auth.identities_file``). The file can be rotated without a
restart: it is re-read on SIGHUP and when its modification time changes
(looked at, at most, every ``reload_check``). A new file that is invalid never
replaces the identities in force; the reason is logged.

A request proves an identity in one of two ways:

- ``Authorization: Bearer TOKEN``. Only ``sha256:<hex>`` hashes of tokens are
  ever stored; the presented token's hash is compared, in constant time, with
  every stored hash (no early exit that would tell which identity came close).
- HMAC: ``X-Idem-Key-Id``, ``X-Idem-Timestamp`` (unix seconds) and
  ``X-Idem-Signature``, the hex HMAC-SHA256 of ``string_to_sign``::

      METHOD \\n PATH[?QUERY] \\n TIMESTAMP \\n IDEMPOTENCY-KEY (or empty) \\n hex SHA256(BODY)

  A request without a body signs the SHA256 of the empty body. The timestamp
  must be within ``max_skew`` of the proxy's clock, and each signature is
  accepted once: the store remembers it (across instances) until it would be
  stale anyway.

Everything but the signature itself is checked from the head, before the body
is read: a caller refused for its credentials is never invited (``100
Continue``) to send its body. Credentials are untrusted text: a value that is
not what its scheme allows (a signature that is not 64 hex digits, a token or
key id with characters beyond ASCII) is a bad credential, a ``401``, never an
error of the proxy (``hmac.compare_digest`` raises ``TypeError`` on a str that
is not ASCII).

Secrets are referenced as ``env:NAME`` or ``file:PATH``, never written in the
main configuration; the configuration itself is read by ``idemproxy.config.auth``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import ipaddress
import logging
import re
import signal
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass

from aiohttp import HttpVersion11, web
from aiohttp.typedefs import Handler, Middleware

from idemproxy.config.auth import (
    AuthConfig,
    AuthConfigError,
    Grant,
    Identity,
    OpsAccess,
    load_identities_file,
    merge,
    parse_auth,
    resolve_secret,
)
from idemproxy.config.routes import RouteTable, parse_target
from idemproxy.edge.observe import RouteMatched, record
from idemproxy.edge.problems import problem_response
from idemproxy.protocol.errors import ExpectationFailed, Forbidden, LedgerUnavailable, ProblemError, Unauthenticated
from idemproxy.store.base import Store, StoreUnavailable
from idemproxy.wire.http_messages import Handler as ProxyHandler
from idemproxy.wire.http_messages import Request, Step, StreamResponse

__all__ = [
    "CHALLENGE",
    "CREDENTIAL_HEADERS",
    "IDENTITY",
    "READ_BODY",
    "AuthConfig",
    "AuthConfigError",
    "Authenticator",
    "Grant",
    "Identity",
    "IdentityStore",
    "OpsAccess",
    "admin_auth_middleware",
    "parse_auth",
    "proxy_auth_step",
    "resolve_secret",
    "sign",
    "string_to_sign",
]

log = logging.getLogger(__name__)

KEY_ID_HEADER = "X-Idem-Key-Id"
TIMESTAMP_HEADER = "X-Idem-Timestamp"
SIGNATURE_HEADER = "X-Idem-Signature"
#: Never forwarded to an upstream while authentication is on: they are idemproxy's credentials.
CREDENTIAL_HEADERS = frozenset(
    {"authorization", KEY_ID_HEADER.lower(), TIMESTAMP_HEADER.lower(), SIGNATURE_HEADER.lower()}
)
CHALLENGE = 'Bearer realm="idemproxy", IDEM-HMAC-SHA256 realm="idemproxy"'
EMPTY_BODY_SHA256 = hashlib.sha256(b"").hexdigest()
#: An ``X-Idem-Signature``: hex SHA256, in either case. ``[0-9a-fA-F]`` is ASCII only, unlike
#: ``str.isalnum`` or ``\w``; checked before ``lower()``, which maps "\u212a" (Kelvin) to "k".
_SIGNATURE = re.compile(r"[0-9a-fA-F]{64}")

#: aiohttp's per-route ``Expect`` step: a response refuses the request, ``None`` lets it in.
ExpectHandler = Callable[[web.Request], Awaitable[web.StreamResponse | None]]

#: The body, when authentication had to read it to check a signature.
READ_BODY = web.RequestKey("read_body", bytes)

#: The identity a request proved (absent when authentication is off).
IDENTITY = web.RequestKey("identity", Identity)


# -- the identities in force -------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Lookup:
    identities: tuple[Identity, ...]
    tokens: tuple[tuple[str, Identity], ...]
    keys: Mapping[str, tuple[Identity, bytes]]

    @classmethod
    def of(cls, identities: tuple[Identity, ...]) -> _Lookup:
        return cls(
            identities,
            tuple((digest, identity) for identity in identities for digest in identity.token_hashes),
            {key_id: (identity, secret) for identity in identities for key_id, secret in identity.hmac_keys.items()},
        )


class IdentityStore:
    """The identities in force; re-reads the identities file on SIGHUP or when it changes."""

    def __init__(self, config: AuthConfig, route_names: frozenset[str]) -> None:
        self.config = config
        self.route_names = route_names
        self.reloads = 0  # successful reloads, for operators and tests
        self.reloaded = asyncio.Event()  # set after each reload attempt (successful or not)
        self._file_state = self._stat()
        self._next_check = time.monotonic() + config.reload_check_s
        file_identities = (
            () if config.identities_file is None else load_identities_file(config.identities_file, route_names)
        )
        self._lookup = _Lookup.of(merge(config.identities, file_identities))

    @property
    def identities(self) -> tuple[Identity, ...]:
        return self._lookup.identities

    def reload(self) -> bool:
        """Re-read the identities file; keep the current identities if it is invalid."""
        self.reloaded.set()
        path = self.config.identities_file
        if path is None:
            return False
        self._file_state = self._stat()
        try:
            identities = merge(self.config.identities, load_identities_file(path, self.route_names))
        except AuthConfigError as exc:
            log.error("identities file rejected; keeping the identities in force", extra={"problems": exc.problems})
            return False
        self._lookup = _Lookup.of(identities)
        self.reloads += 1
        log.info("identities reloaded", extra={"identities": len(identities), "file": str(path)})
        return True

    def check_file(self) -> bool:
        """Reload if the file changed since it was last read (``True`` when reloaded)."""
        if self.config.identities_file is None or self._stat() == self._file_state:
            return False
        return self.reload()

    def _maybe_check(self) -> None:
        now = time.monotonic()
        if now >= self._next_check:
            self._next_check = now + self.config.reload_check_s
            self.check_file()

    def _stat(self) -> tuple[int, int, int] | None:
        if self.config.identities_file is None:
            return None
        try:
            stat = self.config.identities_file.stat()
        except OSError:
            return None
        return stat.st_mtime_ns, stat.st_size, stat.st_ino

    # -- lookups ---------------------------------------------------------------------

    def by_token(self, token: str) -> Identity | None:
        self._maybe_check()
        # The bytes as sent: bytes that are not UTF-8 arrive as lone surrogates (listeners refuse
        # such headers before authentication; this never raises on one that gets here anyway).
        presented = "sha256:" + hashlib.sha256(token.encode("utf-8", "surrogateescape")).hexdigest()
        found: Identity | None = None
        for stored, identity in self._lookup.tokens:  # every hash is compared: no early exit
            if hmac.compare_digest(stored, presented) and found is None:
                found = identity
        return found

    def by_key_id(self, key_id: str) -> tuple[Identity, bytes] | None:
        self._maybe_check()
        return self._lookup.keys.get(key_id)

    # -- SIGHUP ----------------------------------------------------------------------

    def start(self) -> None:
        """Reload on SIGHUP (one handler for every live store in this process). Installed even
        without a file, so a SIGHUP meant for rotation never terminates the proxy."""
        if not _HUP_STORES:
            with contextlib.suppress(NotImplementedError, RuntimeError):
                asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, _reload_all)
        _HUP_STORES.append(self)

    def stop(self) -> None:
        if self in _HUP_STORES:
            _HUP_STORES.remove(self)
            if not _HUP_STORES:
                with contextlib.suppress(NotImplementedError, RuntimeError):
                    asyncio.get_running_loop().remove_signal_handler(signal.SIGHUP)


_HUP_STORES: list[IdentityStore] = []


def _reload_all() -> None:
    log.info("SIGHUP: reloading identities")
    for store in list(_HUP_STORES):
        store.reload()


# -- proving an identity -----------------------------------------------------------------


def string_to_sign(method: str, target: str, timestamp: str, key: str, body: bytes) -> bytes:
    """What an HMAC signature covers; ``target`` is the path with its query, as sent (bytes that are
    not UTF-8, which the listeners refuse anyway, would be covered as sent, never raise)."""
    line = "\n".join((method.upper(), target, timestamp, key, hashlib.sha256(body).hexdigest()))
    return line.encode("utf-8", "surrogateescape")


def sign(secret: bytes, method: str, target: str, timestamp: str, key: str, body: bytes) -> str:
    """The ``X-Idem-Signature`` value a client sends."""
    return hmac.new(secret, string_to_sign(method, target, timestamp, key, body), hashlib.sha256).hexdigest()


class Authenticator:
    """Turns a request's credentials into an ``Identity``, or a 401."""

    def __init__(
        self, identities: IdentityStore, store: Store, key_header: str, *, clock: Callable[[], float] = time.time
    ) -> None:
        self.identities = identities
        self.store = store
        self.key_header = key_header
        self.max_skew_s = identities.config.max_skew_s
        self._clock = clock

    async def authenticate(self, request: web.Request | Request) -> Identity:
        headers = request.headers
        if SIGNATURE_HEADER in headers or KEY_ID_HEADER in headers:
            return await self._hmac(request)
        return self.by_head(headers)

    def by_head(self, headers: Mapping[str, str]) -> Identity:
        """The identity the head's credentials claim, checked as far as the head allows: a bearer
        token completely; an HMAC signature up to the body it covers. Raises ``Unauthenticated``."""
        if SIGNATURE_HEADER in headers or KEY_ID_HEADER in headers:
            return self._hmac_head(headers)[0]
        scheme, _, token = headers.get("Authorization", "").partition(" ")
        if scheme.lower() == "bearer" and token.strip():
            identity = self.identities.by_token(token.strip())
            if identity is None:
                raise _unauthenticated("The bearer token is not valid.")
            return identity
        raise _unauthenticated("Authentication is required: a bearer token or an HMAC signature.")

    async def _hmac(self, request: web.Request | Request) -> Identity:
        headers = request.headers
        identity, secret = self._hmac_head(headers)
        timestamp = headers[TIMESTAMP_HEADER]
        body = await request.read() if request.body_exists else b""
        request[READ_BODY] = body
        signature = headers[SIGNATURE_HEADER].lower()  # ASCII: compare_digest takes it, and the store key is canonical
        expected = sign(secret, request.method, request.raw_path, timestamp, headers.get(self.key_header, ""), body)
        if not hmac.compare_digest(expected, signature):
            raise _unauthenticated("The signature is not valid.")
        # Remember it until it would be refused as stale anyway.
        ttl_s = max(1.0, int(timestamp) + self.max_skew_s - self._clock() + 1)
        try:
            fresh = await self.store.remember_once(f"hmac:{headers[KEY_ID_HEADER]}:{signature}", ttl_s)
        except StoreUnavailable as exc:
            raise LedgerUnavailable(
                "The store that remembers used signatures is unreachable, so the request was refused.",
                headers={"Retry-After": "1"},
            ) from exc
        if not fresh:
            raise _unauthenticated("This signature was already used; sign each request afresh.")
        return identity

    def _hmac_head(self, headers: Mapping[str, str]) -> tuple[Identity, bytes]:
        """The signing identity and its secret, once everything but the signature over the body checks."""
        key_id = headers.get(KEY_ID_HEADER, "")
        timestamp = headers.get(TIMESTAMP_HEADER, "")
        sent = headers.get(SIGNATURE_HEADER, "")
        if not (key_id and timestamp and sent):
            raise _unauthenticated(f"HMAC needs {KEY_ID_HEADER}, {TIMESTAMP_HEADER} and {SIGNATURE_HEADER}.")
        # ASCII digits, and few of them: str.isdigit() also takes "²", and int() of thousands of
        # digits raises (or overflows a float when compared with the clock).
        if not (timestamp.isascii() and timestamp.isdigit() and len(timestamp) <= 12):
            raise _unauthenticated(f"{TIMESTAMP_HEADER} must be whole unix seconds.")
        if not _SIGNATURE.fullmatch(sent):
            raise _unauthenticated(f"{SIGNATURE_HEADER} must be the 64 hex digits of an HMAC-SHA256.")
        age = self._clock() - int(timestamp)
        if abs(age) > self.max_skew_s:
            raise _unauthenticated(
                f"{TIMESTAMP_HEADER} is {abs(age):.0f}s off the proxy's clock; "
                f"at most {self.max_skew_s:g}s is accepted."
            )
        # Refused before the body is read, so the caller is not invited to send it. That an
        # answer comes sooner for an unknown key id than for a wrong signature tells a caller
        # which key ids exist: they name keys, like user names, and are not secrets.
        found = self.identities.by_key_id(key_id)
        if found is None:
            raise _unauthenticated("The signature is not valid.")
        return found


def _unauthenticated(detail: str) -> Unauthenticated:
    return Unauthenticated(detail, headers={"WWW-Authenticate": CHALLENGE})


# -- middlewares ---------------------------------------------------------------------------


def proxy_auth_step(authenticator: Authenticator, routes: RouteTable) -> Step:
    """Authenticate every proxied request and check its route and method against the identity's scopes."""

    async def authenticated(request: Request, handler: ProxyHandler) -> StreamResponse:
        identity = await authenticator.authenticate(request)
        route = routes.match(parse_target(request.method, request.raw_path).path)
        record(request, RouteMatched(route.name))
        if not identity.allows(route.name, request.method):
            raise Forbidden(f"Identity {identity.name!r} may not use {request.method} on route {route.name!r}.")
        request[IDENTITY] = identity
        return await handler(request)

    return authenticated


_LOOPBACK_NAMES = frozenset({"localhost", "localhost."})


def addressed_to_loopback(host: str | None) -> bool:
    """Whether a request's ``Host`` names this machine's loopback (``127.0.0.1:8081``,
    ``[::1]``, ``localhost``): what a browser sends only to a page it loaded from there."""
    host = (host or "").lower()
    name = host[1:].partition("]")[0] if host.startswith("[") else host.rsplit(":", 1)[0]
    if name in _LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def loopback_only_middleware() -> Middleware:
    """The admin listener without authentication (it is bound to loopback): every request must
    also be *addressed* to loopback. A web page the operator has open elsewhere can re-point its
    own name at 127.0.0.1 (DNS rebinding) and then read and post to the API as same-origin; its
    requests carry that name as ``Host``, never a loopback one."""

    @web.middleware
    async def loopback_only(request: web.Request, handler: Handler) -> web.StreamResponse:
        if not addressed_to_loopback(request.host):
            raise Forbidden(
                "Without admin authentication the admin listener answers only requests addressed to a "
                f"loopback host (127.0.0.1, [::1], localhost), not {request.host!r}."
            )
        response: web.StreamResponse = await handler(request)
        return response

    return loopback_only


def admin_auth_middleware(authenticator: Authenticator) -> Middleware:
    """``/_idem/`` needs an identity with ``ops`` access; health and metrics stay open to orchestrators."""

    @web.middleware
    async def auth_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path.startswith("/_idem/"):
            identity = _with_ops_access(await authenticator.authenticate(request))
            request[IDENTITY] = identity
        response: web.StreamResponse = await handler(request)
        return response

    return auth_middleware


def admin_expect_handler(authenticator: Authenticator | None) -> ExpectHandler:
    """aiohttp's ``Expect: 100-continue`` step for the admin listener: the head's credentials
    are checked first, and a caller they refuse gets its 401/403 instead of an invitation to
    send its body (aiohttp's default handler invites everyone, before any middleware runs)."""

    async def expect(request: web.Request) -> web.StreamResponse | None:
        if request.headers.get("Expect", "").lower() != "100-continue":
            return problem_response(ExpectationFailed(f"Expect: {request.headers.get('Expect')!r} is not supported."))
        if authenticator is not None and request.path.startswith("/_idem/"):
            try:
                _with_ops_access(authenticator.by_head(request.headers))
            except ProblemError as refused:
                return problem_response(refused)
        if request.version == HttpVersion11:  # as aiohttp's own: HTTP/1.0 has no interim answers
            await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            request.writer.output_size = 0  # the response proper has not started
        return None

    return expect


def _with_ops_access(identity: Identity) -> Identity:
    if identity.ops is OpsAccess.NONE:
        raise Forbidden(f"Identity {identity.name!r} has no access to the operations API.")
    return identity
