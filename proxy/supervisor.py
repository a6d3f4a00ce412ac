"""``idemproxy run --workers N``: N worker processes sharing the listening ports.

Each worker binds the proxy and admin ports with ``SO_REUSEPORT`` (the kernel
spreads connections over them) and shares the one store. Metrics are
aggregated across workers through ``PROMETHEUS_MULTIPROC_DIR``, which the
supervisor creates when it is not set. SIGINT/SIGTERM are passed on to every
worker, which drains its in-flight requests; a worker that dies unexpectedly
is replaced.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from types import FrameType

log = logging.getLogger(__name__)

_RESTART_DELAY_S = 1.0
WORKER_FLAG = "--worker"


def supervise(worker_args: Sequence[str], workers: int) -> int:
    """Run ``idemproxy run <worker_args> --worker`` ``workers`` times until signalled."""
    own_metrics_dir = "PROMETHEUS_MULTIPROC_DIR" not in os.environ
    metrics_dir = os.environ.get("PROMETHEUS_MULTIPROC_DIR") or tempfile.mkdtemp(prefix="idemproxy-metrics-")
    # Values left by a previous run would be added to this one's.
    for stale in Path(metrics_dir).glob("*.db"):
        stale.unlink()
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": metrics_dir}
    command = [sys.executable, "-m", "idemproxy", "run", *worker_args, WORKER_FLAG]
    stopping = False

    def start() -> subprocess.Popen[bytes]:
        return subprocess.Popen(command, env=env)

    def stop(signum: int, _frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True
        for child in children:
            if child.poll() is None:
                child.send_signal(signum)

    children = [start() for _ in range(workers)]
    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    log.info("supervising workers", extra={"workers": workers, "pids": [child.pid for child in children]})
    try:
        while True:
            for index, child in enumerate(children):
                code = child.poll()
                if code is None or stopping:
                    continue
                log.error("worker exited; starting a new one", extra={"pid": child.pid, "code": code})
                _mark_dead(child.pid, metrics_dir)
                time.sleep(_RESTART_DELAY_S)
                children[index] = start()
            if stopping:
                codes = [child.wait() for child in children]
                # A worker stopped by the signal itself had not installed its handlers
                # yet, so it was serving nothing: that is a clean stop too.
                clean = {0, -signal.SIGTERM, -signal.SIGINT}
                return 0 if all(code in clean for code in codes) else 1
            time.sleep(0.2)
    finally:
        for child in children:
            if child.poll() is None:
                child.kill()
        if own_metrics_dir:
            shutil.rmtree(metrics_dir, ignore_errors=True)


def _mark_dead(pid: int, metrics_dir: str) -> None:
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(pid, metrics_dir)  # type: ignore[no-untyped-call]
