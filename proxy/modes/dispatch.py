"""The proxy listener's endpoint: find the request's route, hand it to the route's mode."""

from __future__ import annotations

from idemproxy.config.mcp import RouteMode
from idemproxy.config.routes import RouteTable, parse_target
from idemproxy.edge.observe import OBSERVATION, RouteMatched
from idemproxy.modes.http import HttpMode
from idemproxy.modes.mcp import McpMode
from idemproxy.pipeline.operations import Pipeline
from idemproxy.wire.http_messages import Request, StreamResponse


class ProxyHandler:
    """Handles every request on the proxy listener."""

    def __init__(self, routes: RouteTable, pipeline: Pipeline) -> None:
        self.routes = routes
        self.http = HttpMode(pipeline)
        self.mcp = McpMode(pipeline)

    async def handle(self, request: Request) -> StreamResponse:
        target = parse_target(request.method, request.raw_path)
        route = self.routes.match(target.path)
        request[OBSERVATION].record(RouteMatched(route.name))
        if route.mode is RouteMode.MCP:  # the body, not the method, says what is recorded
            return await self.mcp.handle(request, route, target)
        return await self.http.handle(request, route, target)
