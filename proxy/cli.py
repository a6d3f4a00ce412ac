"""``idemproxy``: run the proxy, or check a configuration file."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Mapping, Sequence

from idemproxy import __version__
from idemproxy.config.explain import explain
from idemproxy.config.settings import (
    ConfigError,
    DeriveScope,
    KeyMode,
    LoadedConfig,
    Overrides,
    load_config_explained,
)
from idemproxy.logs import configure_logging
from idemproxy.ops.cli import add_ops_commands, run_ops
from idemproxy.supervisor import WORKER_FLAG


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    if args.command == "ops":
        return run_ops(args)
    return int(args.func(args))


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="idemproxy", description="Idempotent tool-proxy sidecar.")
    parser.add_argument("--version", action="version", version=f"idemproxy {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    run = commands.add_parser("run", help="run the proxy")
    run.add_argument("--config", "-c", metavar="FILE", help="YAML configuration file")
    run.add_argument("--upstream", metavar="URL", help="single upstream for sidecar use (route '/')")
    run.add_argument("--listen", metavar="HOST:PORT", help="proxy listener (default 127.0.0.1:8080)")
    run.add_argument(
        "--admin-listen",
        metavar="HOST:PORT",
        help="admin listener: the operations API, health and metrics (default 127.0.0.1:8081; "
        "a non-loopback address needs 'auth')",
    )
    run.add_argument(
        "--metrics-listen",
        metavar="HOST:PORT",
        help="a listener with /metrics, /healthz and /readyz only, for Prometheus and the kubelet (default: off)",
    )
    run.add_argument(
        "--store",
        metavar="URL",
        help="redis://..., rediss://..., unix:///SOCKET, redis+sentinel://..., redis+cluster://... or sqlite:///PATH",
    )
    run.add_argument("--log-level", metavar="LEVEL", help="debug, info, warning or error")
    run.add_argument("--workers", type=_positive, default=1, metavar="N", help="worker processes (default 1)")
    run.add_argument(WORKER_FLAG, action="store_true", help=argparse.SUPPRESS)
    run.set_defaults(func=_run)

    check = commands.add_parser(
        "check-config",
        help="validate a configuration file and exit",
        description="Validate FILE as written (IDEMPROXY_* variables are not applied): every problem on a line "
        "of its own on stderr, 'FILE:LINE: key.path: what was expected' (a misspelt key gets the nearest "
        "valid one), and exit status 2; or a short OK summary and exit status 0.",
    )
    check.add_argument("file", metavar="FILE")
    check.add_argument(
        "--explain",
        action="store_true",
        help="print the effective configuration, IDEMPROXY_* environment applied as 'run' would, "
        "each value followed by where it came from: FILE:LINE, env IDEMPROXY_..., or default",
    )
    check.set_defaults(func=_check_config)

    add_ops_commands(commands)
    return parser


def _run(args: argparse.Namespace) -> int:
    overrides = Overrides(
        listen=args.listen,
        admin_listen=args.admin_listen,
        metrics_listen=args.metrics_listen,
        store=args.store,
        upstream=args.upstream,
        log_level=args.log_level,
    )
    loaded = _load_or_report(args.config, overrides)
    if loaded is None:
        return 2
    config = loaded.config
    configure_logging(config.log_level)
    if args.workers > 1:
        from idemproxy.supervisor import supervise

        return supervise(_worker_args(args), args.workers)
    from idemproxy.app import serve
    from idemproxy.store import StoreUnsafe

    _install_uvloop()
    try:
        asyncio.run(serve(config, reuse_port=args.worker))
    except StoreUnsafe as unsafe:  # its message names the node, the setting and the fix
        print(f"idemproxy: {unsafe}", file=sys.stderr)
        return 1
    return 0


def _worker_args(args: argparse.Namespace) -> list[str]:
    """The ``run`` arguments each worker gets (everything but --workers)."""
    forwarded: list[str] = []
    for flag, value in (
        ("--config", args.config),
        ("--upstream", args.upstream),
        ("--listen", args.listen),
        ("--admin-listen", args.admin_listen),
        ("--metrics-listen", args.metrics_listen),
        ("--store", args.store),
        ("--log-level", args.log_level),
    ):
        if value is not None:
            forwarded += [flag, value]
    return forwarded


def _positive(value: str) -> int:
    if not value.isdigit() or int(value) < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number of at least 1, got {value!r}")
    return int(value)


def _check_config(args: argparse.Namespace) -> int:
    if args.explain:  # what `run` would use: the environment too
        loaded = _load_or_report(args.file, Overrides(), environ=os.environ)
        if loaded is None:
            return 2
        print(f"# {args.file}: OK; the effective configuration, each value's origin after '#'")
        print("\n".join(explain(loaded)))
        return 0
    loaded = _load_or_report(args.file, Overrides(), environ={})
    if loaded is None:
        return 2
    config = loaded.config
    routes = ", ".join(f"{route.name} ({route.prefix} -> {route.upstream})" for route in config.routes)
    print(f"{args.file}: OK: {len(config.routes)} route(s): {routes}")
    task = config.headers.task
    for route in config.routes:
        if route.key_mode is not KeyMode.DERIVE:
            continue
        if route.derive_scope is DeriveScope.TASK:
            scope = f"keys derived per {task}; a call without a key or {task} is refused (400 missing-task)"
        else:
            scope = f"without {task}, a caller's identical calls are one operation, across runs (opted in)"
        print(f"  route {route.name}: key_mode derive, derive_scope {route.derive_scope.value}: {scope}")
    for note in config.store.notes():
        print(f"  store: {note}")
    return 0


def _load_or_report(
    path: str | None, overrides: Overrides, environ: Mapping[str, str] | None = None
) -> LoadedConfig | None:
    """The configuration, or ``None`` once each of its problems is on a line of stderr."""
    try:
        return load_config_explained(path, overrides, environ)
    except ConfigError as exc:
        for line in exc.lines():
            print(f"idemproxy: {line}", file=sys.stderr)
        return None


def _install_uvloop() -> None:
    try:
        import uvloop
    except ImportError:  # optional on platforms without it
        return
    uvloop.install()


if __name__ == "__main__":
    sys.exit(main())
