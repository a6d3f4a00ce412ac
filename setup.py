"""Build hook: with ``IDEMPROXY_COMPILE=1`` the hot path is compiled with mypyc.

Everything else about the package is in ``pyproject.toml``. A plain build (and
every editable install) is pure Python; the container image and ``make bench``
use the compiled build, and ``make test-compiled`` runs the suite against it.
The compiled modules are the same source, so both builds behave alike; the
``.py`` files ship too, and Python imports the compiled module when present.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from setuptools import setup

#: Modules on the per-request path, relative to ``proxy/``. Left out: modules
#: that define exceptions deriving from built-in ones (mypyc cannot compile
#: them) and those decorated with aiohttp's ``@middleware`` (it sets an
#: attribute on the function, which a compiled function does not allow).
COMPILED = (
    "config/routes",
    "edge/observe",
    "ledger/completed_cache",
    "ledger/forwarder",
    "ledger/leases",
    "ledger/ledger",
    "lifecycle/decisions",
    "lifecycle/records",
    "lifecycle/transitions",
    "logs",
    "metric_families",
    "metrics",
    "modes/dispatch",
    "modes/http",
    "modes/mcp",
    "modes/mcp_messages",
    "pipeline/answers",
    "pipeline/operations",
    "pipeline/relay",
    "protocol/exact_json",
    "protocol/keys",
    "store/clock",
    "store/codec",
    "store/group_commit",
    "store/redis",
    "store/redis_mux",
    "store/redis_record",
    "store/redis_schema",
    "store/sqlite",
    "wire/headers",
    "wire/http_messages",
    "wire/http_server",
    "wire/upstream_client",
)


#: Its own build tree, emptied first: a module dropped from ``COMPILED`` must
#: not ship as a stale extension, nor any compiled module in a pure build.
BUILD_BASE = Path("build") / "compiled"


def compiled_setup() -> dict[str, object]:
    if os.environ.get("IDEMPROXY_COMPILE") != "1":
        return {}
    from mypyc.build import mypycify

    shutil.rmtree(BUILD_BASE, ignore_errors=True)
    # mypyc names modules after their directories; the source lives in proxy/
    # but is the package ``idemproxy``, so it is compiled from a copy named so.
    source = BUILD_BASE / "src" / "idemproxy"
    shutil.copytree("proxy", source, ignore=shutil.ignore_patterns("__pycache__"))
    extensions = mypycify(
        ["--config-file", "pyproject.toml", *(str(source / f"{name}.py") for name in COMPILED)],
        opt_level="3",
        target_dir=str(BUILD_BASE / "c"),
    )
    return {"ext_modules": extensions, "options": {"build": {"build_base": str(BUILD_BASE)}}}


setup(**compiled_setup())
