"""What a run measures from /proc, and the machine it ran on.

CPU time is read from ``/proc/PID/stat`` (user + system, all threads) for a
process and all its descendants, so a proxy with worker processes is
measured whole; peak memory is each process's ``VmHWM``.
"""

from __future__ import annotations

import os
import platform
import re
import resource
import sqlite3
import subprocess
import sys
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
#: Python distributions whose versions the report records, and their labels.
PACKAGES = {
    "idemproxy": "idemproxy",
    "aiohttp": "aiohttp",
    "redis": "redis-py",
    "hiredis": "hiredis",
    "orjson": "orjson",
    "msgpack": "msgpack",
    "uvloop": "uvloop",
}
_PROC = Path("/proc")
_CPUS = Path("/sys/devices/system/cpu")


def _stat_fields(pid: int) -> list[str] | None:
    try:
        raw = (_PROC / str(pid) / "stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may contain spaces and parentheses.
    return raw[raw.rindex(")") + 2 :].split()


def process_tree(pid: int) -> list[int]:
    """``pid`` and every live descendant."""
    parents: dict[int, list[int]] = {}
    for entry in _PROC.iterdir():
        if not entry.name.isdigit():
            continue
        fields = _stat_fields(int(entry.name))
        if fields is not None:
            parents.setdefault(int(fields[1]), []).append(int(entry.name))
    tree, queue = [], [pid]
    while queue:
        current = queue.pop()
        tree.append(current)
        queue.extend(parents.get(current, ()))
    return tree


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of ``pid`` and its descendants."""
    total = 0
    for member in process_tree(pid):
        fields = _stat_fields(member)
        if fields is not None:
            total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15)
    return total / _CLOCK_TICKS


def peak_rss_mb(pid: int) -> float:
    """The largest ``VmHWM`` among ``pid`` and its descendants (peak per process)."""
    peak = 0
    for member in process_tree(pid):
        try:
            status = (_PROC / str(member) / "status").read_text()
        except OSError:
            continue
        if match := re.search(r"^VmHWM:\s+(\d+) kB", status, re.MULTILINE):
            peak = max(peak, int(match.group(1)))
    return peak / 1024


@dataclass(frozen=True, slots=True)
class HostCpu:
    """Whole-machine CPU counters from ``/proc/stat``, in ticks."""

    busy: int
    total: int

    @classmethod
    def sample(cls) -> HostCpu:
        values = [int(v) for v in (_PROC / "stat").read_text().split("\n", 1)[0].split()[1:]]
        idle = values[3] + (values[4] if len(values) > 4 else 0)  # idle + iowait
        total = sum(values[:8])  # guest time is already counted in user
        return cls(total - idle, total)

    def busy_pct_since(self, earlier: HostCpu) -> float:
        """Busy share of all cores since ``earlier`` (100% = every core busy)."""
        elapsed = self.total - earlier.total
        return 100.0 * (self.busy - earlier.busy) / elapsed if elapsed else 0.0


@dataclass(frozen=True, slots=True)
class CpuSnapshot:
    """CPU time so far of named processes (with descendants), of the harness's
    reaped children (wrk), and of the whole machine."""

    processes: dict[str, float]
    reaped_children: float
    host: HostCpu

    @classmethod
    def take(cls, pids: dict[str, int]) -> CpuSnapshot:
        usage = resource.getrusage(resource.RUSAGE_CHILDREN)
        processes = {role: cpu_seconds(pid) for role, pid in pids.items()}
        return cls(processes, usage.ru_utime + usage.ru_stime, HostCpu.sample())


@dataclass(frozen=True, slots=True)
class CpuSpent:
    processes: dict[str, float]
    #: Busy share of all cores (100% = every core busy the whole time).
    host_busy_pct: float
    #: CPU seconds the machine spent on anything but the benchmark's processes.
    foreign_s: float
    #: ``foreign_s`` per second of wall time: how many cores other work took.
    foreign_cores: float
    #: Cores' worth of CPU the benchmark's own processes took (subject, store, upstream, wrk).
    bench_cores: float

    @classmethod
    def between(cls, before: CpuSnapshot, after: CpuSnapshot) -> CpuSpent:
        processes = {role: after.processes[role] - before.processes[role] for role in before.processes}
        ticks = after.host.total - before.host.total
        busy_s = (after.host.busy - before.host.busy) / _CLOCK_TICKS
        ours = sum(processes.values()) + after.reaped_children - before.reaped_children
        cores = os.cpu_count() or 1
        wall_s = ticks / _CLOCK_TICKS / cores
        foreign = max(0.0, busy_s - ours)
        return cls(
            processes,
            after.host.busy_pct_since(before.host),
            foreign,
            foreign / wall_s if wall_s else 0.0,
            ours / wall_s if wall_s else 0.0,
        )


def machine_info(tools: dict[str, str]) -> dict[str, str]:
    """Cores, memory, OS and versions, for the report header."""
    info = {
        "cpu": _cpu_model(),
        "cores": str(os.cpu_count()),
        "frequency": describe_frequency(),
        "memory": f"{_meminfo_kb('MemTotal') / 1024 / 1024:.1f} GiB",
        "kernel": platform.release(),
        "os": _os_release(),
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "load average before the run": "{:.2f} {:.2f} {:.2f}".format(*os.getloadavg()),
    }
    for package, label in PACKAGES.items():
        try:
            info[label] = metadata.version(package)
        except metadata.PackageNotFoundError:
            info[label] = "not installed"
    info["sqlite"] = sqlite3.sqlite_version
    for name, binary in tools.items():
        info[name] = tool_version(binary)
    info["commit"] = _git_commit()
    return info


def tool_version(binary: str) -> str:
    try:
        done = subprocess.run([binary, "-v"], capture_output=True, text=True, timeout=10, check=False)
    except OSError:
        return "unavailable"
    text = (done.stdout + done.stderr).strip()
    # redis-server -v: "v=7.0.15"; nginx -v: "nginx/1.22.1"; wrk -v: "wrk debian/4.1.0-3+b2"
    match = re.search(r"v=(\S+)|nginx/(\S+)|wrk (?:\w+/)?(\S+)", text)
    if match is None:
        return text.splitlines()[0] if text else "unknown"
    return next(group for group in match.groups() if group)


def _cpu_model() -> str:
    try:
        for line in (_PROC / "cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def describe_frequency(cpus: Path = _CPUS, cpuinfo: Path = _PROC / "cpuinfo") -> str:
    """The cpufreq governor and frequencies, or, without cpufreq, what ``/proc/cpuinfo`` says."""
    policies = sorted(cpus.glob("cpu[0-9]*/cpufreq"))
    governors = sorted({governor for policy in policies if (governor := _read(policy / "scaling_governor"))})
    if not governors:
        mhz = _cpuinfo_mhz(cpuinfo)
        return "no cpufreq governor (fixed, or set by the host)" + (f", cpuinfo {_span(mhz)} MHz" if mhz else "")
    lowest, highest = _mhz(policies, "scaling_min_freq"), _mhz(policies, "scaling_max_freq")
    allowed = _span([min(lowest), max(highest)]) if lowest and highest else "?"
    now = _mhz(policies, "scaling_cur_freq")
    return f"governor {'/'.join(governors)}, {allowed} MHz allowed, {_span(now) if now else '?'} MHz now"


def _mhz(policies: list[Path], name: str) -> list[int]:
    """Each policy's ``name`` file (kHz) in MHz."""
    return [int(khz) // 1000 for policy in policies if (khz := _read(policy / name)) and khz.isdigit()]


def _cpuinfo_mhz(cpuinfo: Path) -> list[int]:
    text = _read(cpuinfo) or ""
    values = re.findall(r"^cpu MHz\s*:\s*([0-9.]+)", text, re.MULTILINE)
    return [round(float(value)) for value in values]


def _span(values: list[int]) -> str:
    low, high = min(values), max(values)
    return f"{low:,}" if low == high else f"{low:,}-{high:,}"


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def _meminfo_kb(field: str) -> int:
    for line in (_PROC / "meminfo").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def _os_release() -> str:
    try:
        for line in Path("/etc/os-release").read_text().splitlines():
            if line.startswith("PRETTY_NAME="):
                return line.split("=", 1)[1].strip('"')
    except OSError:
        pass
    return sys.platform


def _git_commit() -> str:
    repo = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(
            ["git", "-C", str(repo), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return head + (" (with uncommitted changes)" if dirty else "")
