"""Which build of idemproxy is installed: pure Python, or with the hot path
compiled by mypyc (``IDEMPROXY_COMPILE=1``, see ``setup.py``).

``python -m idemproxy.build_info`` prints it; ``--require-compiled`` fails
unless the compiled modules are the ones Python imports.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import pkgutil
import sys

import idemproxy


def compiled_modules() -> list[str]:
    """The idemproxy modules Python would import from a compiled extension."""
    compiled: list[str] = []
    for module in pkgutil.walk_packages(idemproxy.__path__, "idemproxy."):
        spec = importlib.util.find_spec(module.name)
        origin = spec.origin if spec is not None else None
        if origin is not None and origin.endswith(tuple(importlib.machinery.EXTENSION_SUFFIXES)):
            compiled.append(module.name)
    return compiled


def describe() -> str:
    compiled = compiled_modules()
    return f"compiled ({len(compiled)} modules)" if compiled else "pure Python"


def main(argv: list[str]) -> int:
    if argv not in ([], ["--require-compiled"]):
        print("usage: python -m idemproxy.build_info [--require-compiled]", file=sys.stderr)
        return 2
    if argv and not compiled_modules():
        print("idemproxy.build_info: this is the pure-Python build; no module was compiled", file=sys.stderr)
        return 1
    print(f"idemproxy {idemproxy.__version__}: {describe()}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
