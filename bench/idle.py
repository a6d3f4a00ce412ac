"""The CPUs' idle states: what the machine does between wake-ups, and a way to
keep the CPUs out of idle while a run is measured.

At concurrency 1 every request is a chain of wake-ups (wrk, the proxy, Redis,
the upstream), and what each costs depends on the machine more than on the
code. A virtual machine's vCPU that halts when idle exits to the hypervisor and
is woken by an interrupt; kernels poll a while before halting to avoid that
(``haltpoll.guest_halt_poll_ns``), unless the platform turned it off. Holding
``/dev/cpu_dma_latency`` open with 0 written to it (Linux PM QoS, what tuned's
``latency-performance`` profile does) keeps every CPU polling instead of
halting, which shows how much of a latency is the code and how much the
wake-ups.
"""

from __future__ import annotations

import contextlib
import os
import struct
from collections.abc import Iterator
from pathlib import Path

from bench.procs import BenchError

CPU_DMA_LATENCY = Path("/dev/cpu_dma_latency")
_CPUIDLE = Path("/sys/devices/system/cpu/cpuidle")
_HALT_POLL_NS = Path("/sys/module/haltpoll/parameters/guest_halt_poll_ns")


class CannotKeepAwake(BenchError):
    """The PM QoS device cannot be opened (not root, or no such device)."""


@contextlib.contextmanager
def cpus_kept_awake(device: Path = CPU_DMA_LATENCY) -> Iterator[None]:
    """No CPU enters an idle state while this is held (a latency bound of 0 µs)."""
    try:
        fd = os.open(device, os.O_WRONLY)
    except OSError as exc:
        raise CannotKeepAwake(f"cannot keep the CPUs out of idle: {device}: {exc.strerror} (it needs root)") from exc
    try:
        os.write(fd, struct.pack("=i", 0))
        yield
    finally:
        os.close(fd)  # the bound lasts exactly as long as the file is open


def describe_idle(cpuidle: Path = _CPUIDLE, halt_poll_ns: Path = _HALT_POLL_NS) -> str:
    """The cpuidle driver and governor, and the guest halt-polling window where there is one."""
    driver = _read(cpuidle / "current_driver") or "none"
    governor = _read(cpuidle / "current_governor") or _read(cpuidle / "current_governor_ro")
    described = f"cpuidle {driver}" + (f" ({governor})" if governor else "")
    if (polling := _read(halt_poll_ns)) is not None:
        described += f", guest halt polling {polling} ns"
    return described


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None
