"""Known vulnerabilities in the locked dependencies, by pip-audit.

    python scripts/audit.py [--strict] LOCK...

Fails (exit 1) on a vulnerability that has a fixed version: `make lock` then
takes the fix, or the range in pyproject.toml has to move. A vulnerability with
no fix yet is reported and does not fail. pip-audit asks PyPI's JSON API per
pinned version; where that service cannot be reached (a machine that reaches
only a package mirror) nothing is checked, which is said loudly, and fails
only with --strict (`make audit`).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Any


def run_pip_audit(locks: list[Path]) -> dict[str, Any]:
    command = [sys.executable, "-m", "pip_audit", "--disable-pip", "--format", "json", "--progress-spinner", "off"]
    for lock in locks:
        command += ["--requirement", str(lock)]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if not result.stdout.strip():
        raise SystemExit(f"audit: pip-audit gave no report (exit {result.returncode}): {result.stderr.strip()}")
    report: dict[str, Any] = json.loads(result.stdout)
    return report


def verdict(report: dict[str, Any], *, strict: bool) -> tuple[int, list[str]]:
    """The exit code and the lines to print for pip-audit's JSON report."""
    lines: list[str] = []
    fixable = unfixed = 0
    dependencies = report.get("dependencies", [])
    skipped = [dep for dep in dependencies if dep.get("skip_reason")]
    for dep in dependencies:
        for vuln in dep.get("vulns", []):
            fixes = vuln.get("fix_versions") or []
            where = f"{dep['name']} {dep.get('version', '?')}: {vuln['id']}"
            if fixes:
                fixable += 1
                lines.append(f"audit: {where}, fixed in {', '.join(fixes)}: run `make lock`")
            else:
                unfixed += 1
                lines.append(f"audit: {where}, no fixed version yet (not failing)")
    audited = len(dependencies) - len(skipped)
    if dependencies and not audited:
        lines.append(
            f"audit: WARNING: the vulnerability service answered for none of the {len(dependencies)} pinned "
            "packages, so nothing was checked (no route to PyPI's JSON API from here?)"
        )
        return (1 if strict or fixable else 0), lines
    if skipped:
        names = ", ".join(sorted(dep["name"] for dep in skipped))
        lines.append(f"audit: {len(skipped)} package(s) could not be audited: {names}")
    lines.append(f"audit: {audited} package(s) audited, {fixable} fixable and {unfixed} unfixed vulnerabilities")
    return (1 if fixable or (strict and skipped) else 0), lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.partition("\n")[0])
    parser.add_argument("--strict", action="store_true", help="also fail when a package could not be audited")
    parser.add_argument("--report", type=Path, help="judge this pip-audit JSON report instead of running pip-audit")
    parser.add_argument("locks", nargs="*", type=Path)
    args = parser.parse_args(argv)
    if args.report is not None:
        report = json.loads(args.report.read_text(encoding="utf-8"))
    elif args.locks:
        report = run_pip_audit(args.locks)
    else:
        parser.error("name the lock files to audit (or --report)")
    code, lines = verdict(report, strict=args.strict)
    for line in lines:
        print(line, file=sys.stderr if code else sys.stdout)
    return code


if __name__ == "__main__":
    sys.exit(main())
