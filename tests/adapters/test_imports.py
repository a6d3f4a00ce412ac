"""``idemproxy.adapters`` imports without any agent framework; framework modules say what to install."""

from __future__ import annotations

import subprocess
import sys

import idemproxy.adapters

# Run in a fresh interpreter where the frameworks (and httpx) cannot be imported.
WITHOUT_FRAMEWORKS = """
import sys
for name in ("autogen_core", "autogen_agentchat", "autogen_ext", "camel", "httpx", "pydantic"):
    sys.modules[name] = None  # makes `import name` raise ImportError
import idemproxy.adapters
print("adapters imported")
for module in ("autogen", "camel", "httpx_auth"):
    try:
        __import__(f"idemproxy.adapters.{module}")
    except ImportError as exc:
        print(exc)
"""


def test_the_package_imports_without_frameworks_and_names_the_extra_to_install() -> None:
    finished = subprocess.run(
        [sys.executable, "-W", "error", "-c", WITHOUT_FRAMEWORKS],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    lines = finished.stdout.splitlines()
    assert lines[0] == "adapters imported"
    assert "pip install 'idemproxy[autogen]'" in lines[1]
    assert "pip install 'idemproxy[camel]'" in lines[2]
    assert "pip install httpx" in lines[3]


def test_the_public_surface_is_exported() -> None:
    for name in idemproxy.adapters.__all__:
        assert getattr(idemproxy.adapters, name) is not None


def test_the_pinned_mcp_is_one_both_frameworks_can_import() -> None:
    """mcp 2.x removed APIs these modules import; the extras pin mcp below 2."""
    import autogen_ext.tools.mcp
    from camel.toolkits import MCPToolkit

    assert autogen_ext.tools.mcp.McpWorkbench is not None
    assert MCPToolkit is not None
