#!/bin/sh
# Installs what `make` needs and a fresh Debian/Ubuntu machine may lack:
#   bootstrap.sh venv PYTHON DIR   create a virtual environment (python3-venv if missing)
#   bootstrap.sh uv DIR            the locked uv (requirements/uv.txt) in DIR/.uv, for the venv DIR
#   bootstrap.sh sync DIR LOCK     make the venv DIR hold exactly what LOCK pins, hashes checked
#   bootstrap.sh redis             make redis-server available on PATH
#   bootstrap.sh bench-tools       make nginx and wrk available on PATH (for `make bench`)
#   bootstrap.sh test-tools        make nginx (the conformance corpus) and chromium with chromium-driver
#                                  (the console's browser tests) and libfaketime (the clock-skew
#                                  faults) available for `make test`
#   bootstrap.sh monitoring        make prometheus and promtool available on PATH (for the monitoring tests)
#   bootstrap.sh compiler PYTHON   a C compiler and PYTHON's headers (for the mypyc-compiled build)
#   bootstrap.sh has-compiler PYTHON  exit 0 when both are present (installs nothing)
set -eu

as_root() {
    if [ "$(id -u)" = 0 ]; then "$@"
    elif command -v sudo >/dev/null 2>&1; then sudo "$@"
    else return 1
    fi
}

apt_install() {
    command -v apt-get >/dev/null 2>&1 || return 1
    echo "bootstrap: installing $* with apt-get" >&2
    as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq >/dev/null &&
        as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

has_headers() {
    "$1" -c 'import os, sys, sysconfig; sys.exit(not os.path.isfile(os.path.join(sysconfig.get_paths()["include"], "Python.h")))'
}

case "${1:-}" in
venv)
    python=$2 dir=$3
    if ! "$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
        echo "bootstrap: idemproxy needs Python 3.11 or newer; '$python' is $("$python" --version 2>&1 || echo missing)" >&2
        exit 1
    fi
    [ -x "$dir/bin/python" ] && exit 0
    if ! "$python" -m venv "$dir" 2>/dev/null; then
        rm -rf "$dir"
        version=$("$python" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
        apt_install "python$version-venv" || apt_install python3-venv || {
            echo "bootstrap: '$python -m venv' failed; install python3-venv (apt-get install python3-venv) and retry" >&2
            exit 1
        }
        "$python" -m venv "$dir"
    fi
    ;;
uv)
    dir=$2
    # Kept beside the venv's packages, not among them: a sync leaves it alone.
    if [ -x "$dir/.uv/bin/uv" ] && cmp -s requirements/uv.txt "$dir/.uv/uv.txt"; then exit 0; fi
    rm -rf "$dir/.uv"
    # A venv synced to a lock without pip (the runtime set) gets it back from ensurepip, offline.
    "$dir/bin/python" -m pip --version >/dev/null 2>&1 || "$dir/bin/python" -m ensurepip --default-pip >/dev/null
    "$dir/bin/python" -m pip install --quiet --disable-pip-version-check --require-hashes --no-deps \
        --only-binary=:all: --target "$dir/.uv" -r requirements/uv.txt
    cp requirements/uv.txt "$dir/.uv/uv.txt"
    ;;
sync)
    dir=$2 lock=$3
    sh "$0" uv "$dir"
    # Exactly the lock (what it does not pin is removed), every file checked against its hash;
    # a source distribution is built with the build backend pinned in build-system.txt.
    "$dir/.uv/bin/uv" pip sync --quiet --python "$dir/bin/python" --require-hashes \
        --build-constraints requirements/build-system.txt "$lock"
    ;;
redis)
    command -v redis-server >/dev/null 2>&1 && exit 0
    apt_install redis-server || {
        echo "bootstrap: redis-server is not on PATH and could not be installed; install it (apt-get install redis-server) and retry" >&2
        exit 1
    }
    # The Debian package starts a system service; the tests start their own servers.
    as_root service redis-server stop >/dev/null 2>&1 || true
    ;;
bench-tools)
    missing=""
    # Debian installs nginx under /usr/sbin, which is not on every user's PATH.
    command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || missing="$missing nginx"
    command -v wrk >/dev/null 2>&1 || missing="$missing wrk"
    [ -z "$missing" ] && exit 0
    # shellcheck disable=SC2086  # one word per package
    apt_install $missing || {
        echo "bootstrap: could not install$missing; install nginx and wrk (apt-get install nginx wrk) and retry" >&2
        exit 1
    }
    # The Debian package starts a system nginx on :80; the benchmark runs its own.
    case "$missing" in *nginx*) as_root service nginx stop >/dev/null 2>&1 || true ;; esac
    ;;
test-tools)
    # tests/hostile/test_conformance_corpus.py sends its corpus through nginx as well, which
    # it starts itself. Debian installs nginx under /usr/sbin, which is not on every user's PATH.
    # tests/ops/test_console.py drives the operator's console in Debian's headless Chromium,
    # through Debian's chromedriver (both under /usr/bin).
    missing=""
    command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || missing="$missing nginx"
    [ -x /usr/bin/chromium ] || missing="$missing chromium"
    [ -x /usr/bin/chromedriver ] || missing="$missing chromium-driver"
    # tests/faults/test_clock_skew.py shifts one proxy's wall clock with libfaketime.
    ls /usr/lib/*/faketime/libfaketime.so.1 >/dev/null 2>&1 || missing="$missing libfaketime"
    [ -z "$missing" ] && exit 0
    # shellcheck disable=SC2086  # one word per package
    apt_install $missing || {
        echo "bootstrap: could not install$missing; install them (apt-get install$missing) and retry" >&2
        exit 1
    }
    # The Debian package starts a system nginx on :80; the tests run their own.
    case "$missing" in *nginx*) as_root service nginx stop >/dev/null 2>&1 || true ;; esac
    ;;
monitoring)
    command -v prometheus >/dev/null 2>&1 && command -v promtool >/dev/null 2>&1 && exit 0
    # Debian's prometheus package ships both binaries; its recommended node exporter is not needed.
    apt_install --no-install-recommends prometheus || {
        echo "bootstrap: prometheus/promtool are not on PATH and could not be installed; install them (apt-get install prometheus) and retry" >&2
        exit 1
    }
    # The Debian package starts a system service on :9090; the tests start their own server.
    as_root service prometheus stop >/dev/null 2>&1 || true
    ;;
deploy-tools)
    # tests/deploy needs nothing beyond its PyPI packages; the opt-in image smoke test
    # (IDEMPROXY_PODMAN_SMOKE=1) builds and runs the image with podman.
    [ "${IDEMPROXY_PODMAN_SMOKE:-}" = 1 ] || exit 0
    command -v podman >/dev/null 2>&1 && exit 0
    apt_install --no-install-recommends podman runc || {
        echo "bootstrap: IDEMPROXY_PODMAN_SMOKE=1 needs podman; install it (apt-get install podman runc) and retry" >&2
        exit 1
    }
    ;;
has-compiler)
    # Exit 0 when a C compiler and PYTHON's headers are present; installs nothing.
    command -v cc >/dev/null 2>&1 && has_headers "$2"
    ;;
compiler)
    python=$2
    missing=""
    command -v cc >/dev/null 2>&1 || missing="$missing gcc"
    if ! has_headers "$python"; then
        version=$("$python" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
        missing="$missing python$version-dev"
    fi
    [ -z "$missing" ] && exit 0
    # shellcheck disable=SC2086  # one word per package
    apt_install $missing && command -v cc >/dev/null 2>&1 && has_headers "$python" || {
        echo "bootstrap: the compiled build needs a C compiler and Python headers; install$missing and retry" >&2
        exit 1
    }
    ;;
*)
    echo "usage: bootstrap.sh venv PYTHON DIR | uv DIR | sync DIR LOCK | redis | bench-tools | test-tools | monitoring | deploy-tools | compiler PYTHON | has-compiler PYTHON" >&2
    exit 2
    ;;
esac
