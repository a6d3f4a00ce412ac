"""Optional py-spy profiles of idemproxy during a measurement (``--profile``).

py-spy pauses the proxy for each sample (so stacks are consistent), which
slows a profiled run by a few percent; the table marks such runs.
The collapsed stacks (for speedscope, inferno or flamegraph.pl) are written
next to the table, with a short summary of where the proxy's time goes.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from bench.procs import Child, Children

RATE_HZ = 200


def find_py_spy() -> str | None:
    beside_python = Path(sys.executable).parent / "py-spy"
    return str(beside_python) if beside_python.is_file() else shutil.which("py-spy")


@dataclass
class Profiler:
    binary: str
    children: Children

    def start(self, pid: int, duration_s: int, output: Path) -> Child:
        argv = [
            self.binary, "record",
            "--pid", str(pid),
            "--duration", str(duration_s),
            "--rate", str(RATE_HZ),
            "--format", "raw",
            "--output", str(output),
        ]  # fmt: skip
        return self.children.spawn(f"py-spy-{output.stem}", argv)

    def finish(self, child: Child, output: Path, timeout_s: float = 30.0) -> str:
        """Wait for py-spy and write the summary next to the collapsed stacks."""
        try:
            child.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.children.stop(child)
            return "py-spy did not finish"
        self.children.stop(child)
        if not output.is_file():
            return f"py-spy wrote no profile: {child.log_tail(300)}"
        summary = summarize(output.read_text(errors="replace"))
        output.with_suffix(".summary.txt").write_text(summary)
        return summary


def summarize(collapsed: str, top: int = 25) -> str:
    """Top functions by own samples and by inclusive samples, from py-spy's raw format."""
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    for line in collapsed.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = stack.split(";")
        total += count
        own[_short(frames[-1])] += count
        for frame in {_short(frame) for frame in frames}:
            inclusive[frame] += count
    if not total:
        return "no samples"
    lines = [f"{total} samples at {RATE_HZ} Hz", "", "own time:"]
    lines += [f"  {100 * n / total:5.1f}%  {name}" for name, n in own.most_common(top)]
    lines += ["", "inclusive time:"]
    lines += [f"  {100 * n / total:5.1f}%  {name}" for name, n in inclusive.most_common(top)]
    return "\n".join(lines) + "\n"


def _short(frame: str) -> str:
    # "function (/long/path/to/module.py:123)" -> "function (module.py:123)"
    name, _, where = frame.partition(" (")
    return f"{name} ({Path(where.rstrip(')')).name})" if where else name
