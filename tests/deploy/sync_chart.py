"""The chart's copies of the monitoring kit, and the step that refreshes them.

Helm reads only files inside the chart, so ``helm/idemproxy/files/`` holds copies
of the dashboard and the alert rules from ``monitoring/``. ``test_chart_render.py`` fails
when they drift; ``python -m tests.deploy.sync_chart`` copies them again.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "helm" / "idemproxy"

#: (the source in monitoring/, its copy inside the chart)
COPIES: tuple[tuple[Path, Path], ...] = (
    (REPO / "monitoring" / "grafana" / "idemproxy-dashboard.json", CHART / "files" / "idemproxy-dashboard.json"),
    (REPO / "monitoring" / "prometheus" / "alerts.yml", CHART / "files" / "alerts.yml"),
)


def stale_copies() -> list[Path]:
    """The chart copies that differ from their source (or are missing)."""
    return [copy for source, copy in COPIES if not copy.is_file() or copy.read_bytes() != source.read_bytes()]


def sync() -> list[Path]:
    """Copy every stale source into the chart; returns the copies written."""
    written = []
    for source, copy in COPIES:
        if not copy.is_file() or copy.read_bytes() != source.read_bytes():
            copy.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, copy)
            written.append(copy)
    return written


def main() -> int:
    missing = [source for source, _ in COPIES if not source.is_file()]
    if missing:
        for source in missing:
            print(f"sync_chart: {source.relative_to(REPO)} does not exist", file=sys.stderr)
        return 1
    for copy in sync():
        print(f"sync_chart: updated {copy.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
