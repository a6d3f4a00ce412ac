"""Mapping request targets to configured upstreams, and nothing else.

Only origin-form targets (``/path?query``) under a configured prefix reach an
upstream: idemproxy must never act as an open proxy.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from yarl import URL

from idemproxy.config.settings import RouteConfig
from idemproxy.protocol.errors import AbsoluteFormRefused, InvalidTarget, MethodNotAllowed, NoRoute

# Percent-escapes that would let a target change meaning once an upstream
# decodes it: dot segments, slashes, backslashes and control characters.
_DANGEROUS_ESCAPE = re.compile(r"%(?:2[eEfF]|5[cC]|[01][0-9a-fA-F]|7[fF])")


@dataclass(frozen=True, slots=True, init=False)
class Target:
    path: str  # raw (still percent-encoded) path
    query: str  # raw query string, without '?'

    def __init__(self, path: str, query: str) -> None:  # compiled by mypyc, unlike a generated one
        object.__setattr__(self, "path", path)
        object.__setattr__(self, "query", query)

    @property
    def raw(self) -> str:
        return f"{self.path}?{self.query}" if self.query else self.path


def parse_target(method: str, raw_target: str) -> Target:
    """Validate a request target; raise a 4xx problem for anything but a plain path."""
    if method == "CONNECT":
        raise MethodNotAllowed("CONNECT is not supported: idemproxy forwards only to its configured upstreams.")
    if not raw_target.startswith("/") or raw_target.startswith("//"):
        raise AbsoluteFormRefused(
            "Only origin-form request targets ('/path?query') are accepted; idemproxy "
            "forwards only to its configured upstreams."
        )
    path, _, query = raw_target.partition("?")
    if "#" in raw_target or "\\" in path or not path.isascii() or not path.isprintable():
        raise InvalidTarget("The request path contains characters that are not allowed.")
    if "." in path:
        for segment in path.split("/"):
            # Some servers treat "..;param" as ".." (path parameters), so those count too.
            if segment.split(";", 1)[0] in (".", ".."):
                raise InvalidTarget("Dot segments ('.' and '..') are not allowed in the request path.")
    if "%" in path and _DANGEROUS_ESCAPE.search(path):
        raise InvalidTarget("Encoded dots, slashes, backslashes and control characters are not allowed in the path.")
    return Target(path=path, query=query)


class RouteTable:
    """Longest-prefix match at segment boundaries: ``/tickets`` matches ``/tickets/7``, not ``/ticketsx``."""

    def __init__(self, routes: tuple[RouteConfig, ...]) -> None:
        self._routes = sorted(routes, key=lambda route: len(route.prefix), reverse=True)

    def match(self, path: str) -> RouteConfig:
        for route in self._routes:
            prefix = route.prefix
            if prefix in ("/", path) or path.startswith(prefix + "/"):
                return route
        raise NoRoute(f"No route is configured for {path!r}.")


def upstream_target(route: RouteConfig, target: Target) -> str:
    """The request target sent to ``route``'s upstream (``/base/path?query``, still encoded)."""
    path = target.path
    if route.strip_prefix and route.prefix != "/":
        path = path[len(route.prefix) :] or "/"
    base = route.upstream.raw_path.rstrip("/")
    return f"{base}{path}?{target.query}" if target.query else f"{base}{path}"


def upstream_url(route: RouteConfig, target: Target) -> URL:
    return URL(str(route.upstream.origin()) + upstream_target(route, target), encoded=True)
