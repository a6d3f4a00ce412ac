"""``idemproxy ops list|show|resolve``: the admin API from the shell.

With admin authentication on, it signs in the ways the admin API accepts: a
bearer token (``--token`` or ``IDEMPROXY_ADMIN_TOKEN``), or an HMAC signature
(``--hmac-key-id`` with the secret from ``--hmac-secret-file`` or
``IDEMPROXY_ADMIN_HMAC_SECRET``; never on the command line, where other users
of the machine can read it). The connection options go before or after the verb.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

import orjson

from idemproxy.edge.auth import KEY_ID_HEADER, SIGNATURE_HEADER, TIMESTAMP_HEADER, sign

DEFAULT_ADMIN_URL = "http://127.0.0.1:8081"


class OpsError(Exception):
    """A one-line message for the user; the command exits non-zero."""


def _connection_options(parser: argparse.ArgumentParser, *, defaults: bool) -> None:
    """The options every verb shares. Given to ``ops`` with their defaults and to each verb
    without (SUPPRESS), so a value written after the verb wins and one before it still counts."""

    def default(value: Any) -> Any:
        return value if defaults else argparse.SUPPRESS

    parser.add_argument(
        "--admin",
        metavar="URL",
        default=default(os.environ.get("IDEMPROXY_ADMIN_URL", DEFAULT_ADMIN_URL)),
        help=f"admin listener URL (default $IDEMPROXY_ADMIN_URL or {DEFAULT_ADMIN_URL})",
    )
    parser.add_argument(
        "--token",
        metavar="TOKEN",
        default=default(os.environ.get("IDEMPROXY_ADMIN_TOKEN")),
        help="a bearer token of an identity with ops access (default $IDEMPROXY_ADMIN_TOKEN)",
    )
    parser.add_argument(
        "--hmac-key-id",
        metavar="ID",
        default=default(os.environ.get("IDEMPROXY_ADMIN_HMAC_KEY_ID")),
        help="sign each request with this HMAC key id (default $IDEMPROXY_ADMIN_HMAC_KEY_ID)",
    )
    parser.add_argument(
        "--hmac-secret-file",
        metavar="FILE",
        default=default(None),
        help="the HMAC key's secret, from a file (default: $IDEMPROXY_ADMIN_HMAC_SECRET)",
    )
    parser.add_argument(
        "-o",
        "--output",
        choices=("table", "json"),
        default=default("table"),
        help="table (the default, for people) or json (the API's JSON, for scripts)",
    )
    parser.add_argument(
        "--json",
        dest="output",
        action="store_const",
        const="json",
        default=argparse.SUPPRESS,
        help="the same as -o json",
    )


_OPERATION_HELP = "an operation id, or the first 6 or more of its characters when no other id starts so"


def add_ops_commands(commands: Any) -> None:
    ops = commands.add_parser("ops", help="list, show and resolve operations (admin API)")
    _connection_options(ops, defaults=True)
    verbs = ops.add_subparsers(dest="verb", metavar="VERB", required=True)

    def verb(name: str, help: str) -> argparse.ArgumentParser:
        parser: argparse.ArgumentParser = verbs.add_parser(name, help=help)
        _connection_options(parser, defaults=False)
        return parser

    listing = verb("list", help="list operations")
    listing.add_argument("--state", help="PENDING, COMPLETED, RELEASED, UNKNOWN or NEEDS_ATTENTION")
    listing.add_argument("--route")
    listing.add_argument("--task")
    listing.add_argument("--older-than", metavar="DURATION", help="last updated longer ago than this, e.g. 10m")
    listing.add_argument("--limit", type=int, default=100)
    listing.set_defaults(func=_list)

    show = verb("show", help="show one operation, its evidence and what it needs to move on")
    show.add_argument("op_id", metavar="OPERATION", help=_OPERATION_HELP)
    show.set_defaults(func=_show)

    resolve = verb("resolve", help="settle an UNKNOWN or NEEDS_ATTENTION operation")
    resolve.add_argument("op_id", metavar="OPERATION", help=_OPERATION_HELP)
    outcome = resolve.add_mutually_exclusive_group(required=True)
    outcome.add_argument("--done", action="store_true", help="the effect happened (give the response to replay)")
    outcome.add_argument("--not-done", action="store_true", help="the effect did not happen: allow a new attempt")
    resolve.add_argument("--status", type=int, help="with --done: status to replay (default 200)")
    resolve.add_argument("--body", help="with --done: body to replay (JSON text, or @FILE)")
    resolve.add_argument("--header", action="append", default=[], metavar="NAME:VALUE", help="with --done")
    resolve.add_argument("--by", default=os.environ.get("USER"), help="who resolves (default $USER)")
    resolve.add_argument("--reason", help="why, for the evidence")
    resolve.set_defaults(func=_resolve)

    ledger = verb("ledger", help="the ledger's epoch, and whether this instance found the ledger lost")
    ledger.set_defaults(func=_ledger)

    confirm = verb("confirm-ledger", help="accept a ledger loss: reservations resume everywhere")
    confirm.add_argument("--by", default=os.environ.get("USER") or "unknown", help="who confirms (default $USER)")
    confirm.set_defaults(func=_confirm_ledger)


def run_ops(args: argparse.Namespace) -> int:
    try:
        args.func(args)
    except OpsError as exc:
        print(f"idemproxy ops: {exc}", file=sys.stderr)
        return 1
    return 0


def _list(args: argparse.Namespace) -> None:
    params = {
        name: value
        for name, value in (
            ("state", args.state),
            ("route", args.route),
            ("task", args.task),
            ("older_than", args.older_than),
            ("limit", str(args.limit)),
        )
        if value is not None
    }
    data = _call(args, "GET", "/_idem/ops?" + urllib.parse.urlencode(params))
    if args.output == "json":
        _print_json(data)
        return
    now = time.time() * 1000
    rows = [
        [
            op["operation"],
            op["state"],
            op["route"],
            op["task"] or "-",
            f"{op['method']} {op['target']}",
            str(op["attempt"]),
            str(op["probes"]),
            op["retry_class"] or "-",
            _age(now - op["updated_ms"]),
        ]
        for op in data["operations"]
    ]
    header = ["OPERATION", "STATE", "ROUTE", "TASK", "REQUEST", "ATTEMPT", "PROBES", "RETRY CLASS", "UPDATED"]
    print(_table(header, rows) if rows else "no operations match")


def _show(args: argparse.Namespace) -> None:
    data = _call(args, "GET", f"/_idem/ops/{_op_id(args.op_id)}")  # a unique prefix will do
    if args.output == "json":
        _print_json(data)
        return
    _print_record(data)


def _resolve(args: argparse.Namespace) -> None:
    payload: dict[str, Any] = {"outcome": "done" if args.done else "not_done", "by": args.by, "reason": args.reason}
    if args.done:
        response: dict[str, Any] = {"status": args.status or 200, "headers": _headers(args.header)}
        if args.body is not None:
            response["body"] = _body(args.body)
        payload["response"] = response
    elif args.status is not None or args.body is not None or args.header:
        raise OpsError("--status, --body and --header go with --done")
    op_id = _op_id(args.op_id)
    if len(op_id) < _FULL_ID:  # the API settles only a whole id: look the prefix up first
        op_id = _call(args, "GET", f"/_idem/ops/{op_id}")["operation"]
    data = _call(args, "POST", f"/_idem/ops/{op_id}/resolve", payload)
    if args.output == "json":
        _print_json(data)
        return
    print(f"resolved: {data['operation']} is now {data['state']}")


def _ledger(args: argparse.Namespace) -> None:
    data = _call(args, "GET", "/_idem/ledger")
    if args.output == "json":
        _print_json(data)
        return
    print(f"epoch {data['epoch']} (generation {data['generation']})")
    if data["lost"] is not None:
        print(f"LOST: {data['lost']}")
        print("New reservations are refused. Once the cause is understood, accept the loss with:")
        print("  idemproxy ops confirm-ledger")
        print("(retries of operations the lost records answered will then be forwarded again)")


def _confirm_ledger(args: argparse.Namespace) -> None:
    data = _call(args, "POST", "/_idem/ledger/confirm", {"by": args.by})
    if args.output == "json":
        _print_json(data)
        return
    print(f"confirmed: epoch {data['epoch']} (generation {data['generation']}); reservations resume")


def _call(args: argparse.Namespace, method: str, path: str, payload: Any = None) -> Any:
    base: str = args.admin
    url = base.rstrip("/") + path
    body = orjson.dumps(payload) if payload is not None else b""
    headers = {"Content-Type": "application/json", **_credentials(args, method, url, body)}
    request = urllib.request.Request(url, data=body if payload is not None else None, method=method, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return orjson.loads(response.read())
    except urllib.error.HTTPError as exc:
        hint = _AUTH_HINTS.get(exc.code, "")
        try:
            problem = orjson.loads(exc.read())
        except orjson.JSONDecodeError:
            problem = None
        if not isinstance(problem, dict):  # not problem+json: whatever answered is not the admin API
            raise OpsError(f"{exc.code} {exc.reason} from {url}{hint}") from None
        raise OpsError(f"{exc.code} {problem.get('title', '')}: {problem.get('detail', '')}{hint}") from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise OpsError(f"cannot reach the admin API at {base}: {reason} (set --admin or IDEMPROXY_ADMIN_URL)") from None


_AUTH_HINTS = {
    401: " (admin authentication is on: pass --token or set IDEMPROXY_ADMIN_TOKEN, or sign with "
    "--hmac-key-id and IDEMPROXY_ADMIN_HMAC_SECRET)",
    403: " (the identity needs 'ops: read' to look, 'ops: admin' to resolve)",
}


def _credentials(args: argparse.Namespace, method: str, url: str, body: bytes) -> dict[str, str]:
    """The headers that authenticate one request: a bearer token, or an HMAC signature over it."""
    if args.token and args.hmac_key_id:
        raise OpsError("give a token or an HMAC key id, not both")
    if args.token:
        return {"Authorization": f"Bearer {args.token}"}
    if not args.hmac_key_id:
        return {}
    secret = _hmac_secret(args.hmac_secret_file)
    split = urllib.parse.urlsplit(url)
    target = split.path + (f"?{split.query}" if split.query else "")
    timestamp = str(int(time.time()))
    return {
        KEY_ID_HEADER: args.hmac_key_id,
        TIMESTAMP_HEADER: timestamp,
        SIGNATURE_HEADER: sign(secret, method, target, timestamp, "", body),
    }


def _hmac_secret(path: str | None) -> bytes:
    if path is not None:
        try:
            with open(path, encoding="utf-8") as file:
                # As the proxy reads a 'file:PATH' secret: one trailing newline is not part of it.
                return file.read().rstrip("\r\n").encode()
        except OSError as exc:
            raise OpsError(f"cannot read the HMAC secret from {path}: {exc.strerror}") from None
    secret = os.environ.get("IDEMPROXY_ADMIN_HMAC_SECRET")
    if not secret:
        raise OpsError("--hmac-key-id needs the secret: --hmac-secret-file FILE or IDEMPROXY_ADMIN_HMAC_SECRET")
    return secret.encode()


_FULL_ID = 32
_SHORTEST_ID = 6


def _op_id(value: str) -> str:
    """An operation id, or the first 6 or more of its characters (the API finds the one it names)."""
    if not _SHORTEST_ID <= len(value) <= _FULL_ID or any(char not in "0123456789abcdef" for char in value):
        raise OpsError(
            f"{value[:64]!r} is not an operation id (32 hex characters, as in the Idempotency-Operation "
            f"header, or the first {_SHORTEST_ID} or more of them)"
        )
    return value


def _headers(values: list[str]) -> dict[str, str]:
    headers = {}
    for value in values:
        name, sep, content = value.partition(":")
        if not sep or not name.strip():
            raise OpsError(f"--header takes NAME:VALUE, got {value!r}")
        headers[name.strip()] = content.strip()
    return headers


def _body(value: str) -> Any:
    if value.startswith("@"):
        try:
            with open(value[1:], encoding="utf-8") as file:
                value = file.read()
        except OSError as exc:
            raise OpsError(f"cannot read {value[1:]}: {exc.strerror}") from None
    try:
        return orjson.loads(value)
    except orjson.JSONDecodeError:
        return value  # sent as text


def _print_record(data: dict[str, Any]) -> None:
    fields = [
        ("operation", data["operation"]),
        ("state", data["state"] + (" (reconciled)" if data["reconciled"] else "")),
        ("route", data["route"]),
        ("caller", data["caller"]),
        ("key", data["key"]),
        ("task", data["task"] or "-"),
        ("request", f"{data['method']} {data['target']}"),
        ("attempt", data["attempt"]),
        ("retry class", data["retry_class"] or "-"),
        ("owner", f"{data['owner'] or '-'} (fence {data['fence']})"),
        ("probes", data["probes"]),
    ]
    if (response := data["response"]) is not None:
        fields.append(("response", f"{response['status']}, {response['size']} bytes, sha256 {response['sha256'][:16]}"))
    width = max(len(name) for name, _ in fields)
    for name, value in fields:
        print(f"{name:<{width}}  {value}")
    if (sent := data.get("request")) is not None:
        print("\nrequest as forwarded (credentials redacted):")
        _print_message(f"{data['method']} {data['target']}", sent)
    if response is not None:
        print("\nthe tool's answer:")
        _print_message(f"{response['status']}", response)
    print(f"\nnext: {data['next']}\n\nevidence:")
    for entry in data["evidence"]:
        detail = {name: value for name, value in entry.items() if name not in ("at_ms", "kind")}
        stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(entry["at_ms"] / 1000))
        print(f"  {stamp}Z  {entry['kind']:<12} {orjson.dumps(detail).decode()}")
    if data["state"] in _SETTLEABLE:
        op_id = data["operation"]
        print(
            "\nto resolve it, once you know what the tool did:\n"
            f"  idemproxy ops resolve {op_id} --done --status STATUS --body @ANSWER.json --reason '...'\n"
            f"  idemproxy ops resolve {op_id} --not-done --reason '...'"
        )


#: States an operator may settle (a PENDING one only once its lease has ended).
_SETTLEABLE = frozenset({"UNKNOWN", "NEEDS_ATTENTION", "PENDING"})


def _print_message(first_line: str, message: dict[str, Any]) -> None:
    """A stored request or answer: its first line, headers and body (or size and digest)."""
    print(f"  {first_line}")
    for name, value in message["headers"].items():
        print(f"  {name}: {value}")
    if "body" in message:
        print(f"\n  {message['body']}")
    else:
        shown = "base64 " + message["body_base64"] if "body_base64" in message else "not shown"
        print(f"\n  ({message['size']} bytes, sha256 {message['sha256'][:16]}...: {shown})")


def _print_json(data: Any) -> None:
    sys.stdout.write(orjson.dumps(data, option=orjson.OPT_INDENT_2).decode() + "\n")


def _table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in [header, *rows]
    )


def _age(ms: float) -> str:
    seconds = max(0, int(ms / 1000))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit} ago"
    return f"{seconds}s ago"
