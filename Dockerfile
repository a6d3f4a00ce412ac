# syntax=docker/dockerfile:1
# idemproxy container image.
#
#   docker build -t idemproxy .
#   docker run --rm -p 8080:8080 -p 8082:8082 -e IDEMPROXY_UPSTREAM=http://tool:9000 \
#       -e IDEMPROXY_STORE=redis://redis:6379/0 idemproxy
#   docker run --rm -p 8080:8080 -p 8082:8082 -v "$PWD/idemproxy.yaml:/etc/idemproxy/config.yaml:ro" \
#       idemproxy --config /etc/idemproxy/config.yaml --workers 2
#
# Configuration: a file (--config) and IDEMPROXY_* variables, which win over the
# file. The image publishes the proxy (8080) and the metrics listener (8082:
# /metrics, /healthz, /readyz and nothing else) on 0.0.0.0. The admin listener
# (8081, the operations API) stays on loopback: `docker exec` or a port-forward
# reaches it. To publish it, set IDEMPROXY_ADMIN_LISTEN=0.0.0.0:8081 and configure
# `auth` (the proxy refuses to start with an exposed admin listener and no auth).
# Without a store setting the ledger is SQLite under /var/lib/idemproxy (mount a
# volume there to keep it).
# tests/deploy/test_image.py runs the build stage's RUN steps in a clean virtual
# environment and starts the result; keep those steps plain shell.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm
# The build stage runs on the full image of the same Python and Debian release:
# it has the C compiler that mypyc needs to compile the hot path (setup.py).
ARG BUILD_IMAGE=python:3.11-bookworm

FROM ${BUILD_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore
WORKDIR /src
COPY pyproject.toml setup.py README.md LICENSE ./
COPY requirements/image-build.txt requirements/runtime.txt ./requirements/
COPY proxy ./proxy
COPY adapters ./adapters
# Every dependency comes from the lock (requirements/, `make lock`): pinned, each
# file checked against its hash, wheels only. mypyc type-checks against them, so
# the wheel is built in a venv that has them (and mypy), without build isolation;
# the venv the final stage copies gets the runtime lock, that wheel and no installer.
RUN python -m venv /opt/build \
    && /opt/build/bin/pip install --require-hashes --only-binary=:all: -r requirements/image-build.txt \
    && IDEMPROXY_COMPILE=1 /opt/build/bin/pip wheel --no-build-isolation --no-deps --wheel-dir /opt/wheels . \
    && python -m venv /opt/idemproxy \
    && /opt/idemproxy/bin/pip install --require-hashes --only-binary=:all: -r requirements/runtime.txt \
    && /opt/idemproxy/bin/pip install --no-deps /opt/wheels/idemproxy-*.whl \
    && /opt/idemproxy/bin/pip uninstall --yes pip setuptools \
    && /opt/idemproxy/bin/python -m idemproxy.build_info --require-compiled \
    && /opt/idemproxy/bin/python -c "import idemproxy.cli, aiohttp, hiredis, msgpack, orjson, redis, uvloop, yaml"

FROM ${PYTHON_IMAGE}
ARG PYTHON_IMAGE
# The release this image is built from: pyproject.toml's version (tests/release checks it).
ARG VERSION=0.1.0
LABEL org.opencontainers.image.title="idemproxy" \
      org.opencontainers.image.description="Idempotent tool-proxy sidecar: at most one side effect per operation id for AI agent tool calls" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.source="https://github.com/idemproxy/idemproxy" \
      org.opencontainers.image.url="https://github.com/idemproxy/idemproxy" \
      org.opencontainers.image.documentation="https://github.com/idemproxy/idemproxy/tree/main/docs" \
      org.opencontainers.image.vendor="The idemproxy authors" \
      org.opencontainers.image.base.name="${PYTHON_IMAGE}"
ENV PATH=/opt/idemproxy/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    IDEMPROXY_LISTEN=0.0.0.0:8080 \
    IDEMPROXY_ADMIN_LISTEN=127.0.0.1:8081 \
    IDEMPROXY_METRICS_LISTEN=0.0.0.0:8082
# The base image's own pip, setuptools and wheel are installers, not runtime
# dependencies: removed (where the base has them), so the final image holds no
# tool to build or fetch code.
RUN if python -m pip --version >/dev/null 2>&1; then \
        python -m pip uninstall --yes --no-cache-dir pip setuptools wheel; \
    fi \
    && groupadd --system --gid 10001 idemproxy \
    && useradd --system --uid 10001 --gid idemproxy --no-log-init \
        --home-dir /var/lib/idemproxy --create-home --shell /usr/sbin/nologin idemproxy \
    && mkdir -p /etc/idemproxy
COPY --from=build /opt/idemproxy /opt/idemproxy
USER 10001:10001
WORKDIR /var/lib/idemproxy
EXPOSE 8080 8082
# Liveness, from the metrics listener on the port IDEMPROXY_METRICS_LISTEN names.
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; port = os.environ.get('IDEMPROXY_METRICS_LISTEN', ':8082').rpartition(':')[2]; urllib.request.urlopen(f'http://127.0.0.1:{port}/healthz', timeout=2)"]
# idemproxy is PID 1 (exec form, no shell): it handles SIGTERM itself, stops
# accepting connections, lets in-flight requests finish for `shutdown_grace`
# (10 s by default) and exits. Give `docker stop -t` / the pod's grace period more.
STOPSIGNAL SIGTERM
ENTRYPOINT ["idemproxy", "run"]
CMD []
