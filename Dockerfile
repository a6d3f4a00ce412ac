# syntax=docker/dockerfile:1
# Build: docker build -t idemproxy .
# Run:   docker run -p 8080:8080 -p 8081:8081 -e IDEMPROXY_UPSTREAM=http://tool:9000 \
#          -e IDEMPROXY_STORE=redis://redis:6379/0 idemproxy

FROM python:3.11-slim-bookworm AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY proxy ./proxy
COPY adapters ./adapters
RUN python -m venv /opt/idemproxy \
    && /opt/idemproxy/bin/pip install --no-compile . \
    && /opt/idemproxy/bin/python -c "import idemproxy, redis, aiohttp, uvloop"

FROM python:3.11-slim-bookworm
ENV PATH=/opt/idemproxy/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    IDEMPROXY_LISTEN=0.0.0.0:8080 \
    IDEMPROXY_ADMIN_LISTEN=0.0.0.0:8081 \
    IDEMPROXY_STORE=sqlite:////var/lib/idemproxy/ledger.db
RUN groupadd --system --gid 10001 idemproxy \
    && useradd --system --uid 10001 --gid idemproxy --home-dir /var/lib/idemproxy --create-home idemproxy
COPY --from=build /opt/idemproxy /opt/idemproxy
USER 10001:10001
WORKDIR /var/lib/idemproxy
EXPOSE 8080 8081
HEALTHCHECK --interval=10s --timeout=3s --start-period=5s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8081/healthz', timeout=2)"]
# SIGTERM drains in-flight requests (shutdown_grace), then exits.
STOPSIGNAL SIGTERM
ENTRYPOINT ["idemproxy", "run"]
