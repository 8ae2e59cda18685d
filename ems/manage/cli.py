"""Command lines of the management plane.

    ems manage init --dir DIR          create a service directory and its admin account
    ems manage serve --dir DIR         run the service over HTTPS
    ems account [show|create|list|topup]
    ems access-key [create|list|revoke]
    ems cluster [create|list|show|delete]
    ems credential [create|list|revoke]
    ems bill [--month YYYY-MM] [--cluster ID]

Client commands sign their requests with the settings of ems.manage.client (a config file
or EMS_* variables). Each prints a table, or the service's JSON with --json. Exit codes:
0 success, 1 the service returned an error or could not be reached, 2 bad usage.
"""
from __future__ import annotations

import argparse
import http.client
import json
import logging
import os
import re
import signal
import sys
import threading
import time
from urllib.parse import quote

from ems import logs
from ems.admin import format_table

DURATION = re.compile(r"(\d+)([smhd])")
DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str) -> int:
    """Seconds from '90s', '45m', '12h', '30d'."""
    match = DURATION.fullmatch(text.strip())
    if not match:
        raise argparse.ArgumentTypeError(f"duration {text!r} must be a number and a unit "
                                         f"s, m, h or d, e.g. 30d")
    return int(match.group(1)) * DURATION_UNITS[match.group(2)]


def resource_path(collection: str, resource_id: str, *rest: str) -> str:
    """Return the API path of one resource with its id percent-encoded. An id typed with a
    space or '?' then reaches the service as typed, and gets a 404 instead of a traceback
    or a signature mismatch."""
    return "/".join([collection, quote(resource_id, safe=""), *rest])


def when(t: int | None) -> str:
    return "-" if t is None else time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(t))


# ---- ems manage --------------------------------------------------------------------------

def manage_main(argv: list[str] | None = None) -> int:
    from ems.manage.server import DEFAULT_METRICS_PORT, DEFAULT_PORT

    parser = argparse.ArgumentParser(prog="ems manage",
                                     description="Run the EMS management service.")
    sub = parser.add_subparsers(dest="command", required=True)
    init = sub.add_parser("init", help="create a service directory: keys, a self-signed "
                                       "TLS certificate, the database and the admin account")
    init.add_argument("--dir", required=True, help="service directory (created, mode 0700)")
    init.add_argument("--hostname", action="append",
                      help="name or IP address clients use to reach the service; repeat for "
                           "several (default: 127.0.0.1 and localhost)")
    init.add_argument("--port", type=int, default=DEFAULT_PORT,
                      help=f"port written into the admin's config (default {DEFAULT_PORT})")
    serve = sub.add_parser("serve", help="serve the REST API over HTTPS, sample clusters "
                                         "every 5 minutes and bill them")
    serve.add_argument("--dir", required=True, help="service directory from `ems manage init`")
    serve.add_argument("--host", default="127.0.0.1", help="HTTPS listen address "
                                                           "(default 127.0.0.1)")
    serve.add_argument("--port", type=int, default=DEFAULT_PORT,
                       help=f"HTTPS port (default {DEFAULT_PORT})")
    serve.add_argument("--tls-cert", help="certificate chain PEM (default: DIR/tls.crt)")
    serve.add_argument("--tls-key", help="its private key PEM (default: DIR/tls.key)")
    serve.add_argument("--metrics-host", default="127.0.0.1",
                       help="Prometheus endpoint address (default 127.0.0.1)")
    serve.add_argument("--metrics-port", type=int, default=DEFAULT_METRICS_PORT,
                       help=f"Prometheus endpoint port (default {DEFAULT_METRICS_PORT}; "
                            f"-1: none)")
    logs.add_arguments(serve)
    args = parser.parse_args(argv)
    if args.command == "init":
        return _init(parser, args)
    return _serve(parser, args)


def _init(parser, args) -> int:
    from ems.manage.server import init_directory

    hostnames = args.hostname or ["127.0.0.1", "localhost"]
    try:
        config = init_directory(args.dir, hostnames, args.port)
    except (OSError, ValueError) as exc:
        parser.error(str(exc))
    directory = os.path.abspath(args.dir)
    print(f"created management service directory {directory}")
    print(f"  TLS certificate   {directory}/tls.crt (self-signed for {', '.join(hostnames)})")
    print(f"  signing key       {directory}/signing.key; daemons verify with "
          f"{directory}/signing.pub")
    print(f"  admin account     {config['account']}, access key {config['access_key_id']}")
    print(f"  admin settings    {directory}/admin.json (contains the secret key; mode 0600)")
    print(f"next: ems manage serve --dir {args.dir}")
    print(f"      export EMS_MANAGE_CONFIG={directory}/admin.json")
    return 0


def _serve(parser, args) -> int:
    from ems.manage.server import ManageServer

    try:
        # The management service has no node id: node_id is null in JSON lines.
        logs.configure(args.log_format, args.log_level, node_id=None)
        server = ManageServer(args.dir, args.host, args.port, args.tls_cert, args.tls_key,
                              args.metrics_host,
                              None if args.metrics_port < 0 else args.metrics_port)
    except (OSError, ValueError) as exc:
        parser.error(str(exc))
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, frame: stop.set())
    try:
        server.start()
    except RuntimeError as exc:
        logging.getLogger("ems.manage").error("%s", exc)
        server.stop()
        return 1
    logging.getLogger("ems.manage").info(
        "management service on https://%s:%d, metrics on %s", args.host, server.port,
        f"http://{args.metrics_host}:{server.metrics.port}/metrics" if server.metrics else "none")
    stop.wait()
    server.stop()
    return 0


# ---- client commands ---------------------------------------------------------------------

def _client_parser(prog: str, description: str) -> tuple[argparse.ArgumentParser, object]:
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--config", help="settings file (default: EMS_MANAGE_CONFIG or "
                                         "~/.config/ems/manage.json)")
    parser.add_argument("--json", action="store_true", help="print the service's JSON reply")
    return parser, parser.add_subparsers(dest="command")


def _parse(parser: argparse.ArgumentParser, sub, argv) -> argparse.Namespace:
    """Parse, accepting --config and --json after the subcommand too."""
    for command in sub.choices.values():
        command.add_argument("--config", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
        command.add_argument("--json", action="store_true", default=argparse.SUPPRESS,
                             help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def _run(parser, args, call) -> int:
    """Load settings, run call(client), print its result; map failures to exit codes."""
    from ems.manage.client import ApiError, ManageClient, load_settings

    try:
        client = ManageClient.from_settings(load_settings(args.config))
    except (OSError, ValueError) as exc:
        parser.error(str(exc))
    try:
        reply, text = call(client)
    except ApiError as exc:
        print(f"{parser.prog}: {exc.reason} (HTTP {exc.status})", file=sys.stderr)
        return 1
    except (OSError, http.client.HTTPException) as exc:
        print(f"{parser.prog}: cannot reach the management service at "
              f"https://{client.host}:{client.port}: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(reply, indent=2) if args.json else text)
    return 0


def _account_text(a: dict) -> str:
    rows = [["account", f"{a['id']} ({a['name']})"],
            ["price per node-hour", a["price_per_node_hour"]],
            ["balance", a["balance"]], ["bill due", a["bill_due"]],
            ["available", a["available"]],
            ["state", "IN ARREARS: clusters do not serve until a top-up covers the bill"
             if a["in_arrears"] else "in good standing"],
            ["clusters", str(a["clusters"])]]
    return format_table(["field", "value"], rows, left=2)


def account_main(argv: list[str] | None = None) -> int:
    parser, sub = _client_parser("ems account", "Show accounts; create them and record "
                                                "top-ups (admin).")
    sub.add_parser("show", help="your account: price, balance, bill due, arrears")
    create = sub.add_parser("create", help="create an account and its first access key (admin)")
    create.add_argument("name")
    create.add_argument("--price", required=True, help="price per node-hour, e.g. 0.50")
    sub.add_parser("list", help="every account (admin)")
    topup = sub.add_parser("topup", help="add a payment to an account's balance (admin)")
    topup.add_argument("account", help="account id (acct-...)")
    topup.add_argument("amount", help="decimal amount, e.g. 100.00")
    topup.add_argument("--note", default="", help="free text kept with the payment")
    args = _parse(parser, sub, argv)
    command = args.command or "show"

    def call(client):
        if command == "show":
            reply = client.call("GET", "/v1/account")
            return reply, _account_text(reply)
        if command == "create":
            reply = client.call("POST", "/v1/accounts", {"name": args.name,
                                                         "price_per_node_hour": args.price})
            return reply, (_account_text(reply) + "\n\naccess key id      "
                           f"{reply['access_key_id']}\nsecret access key  "
                           f"{reply['secret_access_key']}\n(the secret is shown only now)")
        if command == "list":
            reply = client.call("GET", "/v1/accounts")
            rows = [[a["id"], a["name"], a["price_per_node_hour"], a["balance"], a["bill_due"],
                     "yes" if a["in_arrears"] else "no"] for a in reply["accounts"]]
            return reply, format_table(["id", "name", "price", "balance", "bill due",
                                        "arrears"], rows, left=2)
        reply = client.call("POST", resource_path("/v1/accounts", args.account, "topups"),
                            {"amount": args.amount, "note": args.note})
        return reply, _account_text(reply)

    return _run(parser, args, call)


def access_key_main(argv: list[str] | None = None) -> int:
    parser, sub = _client_parser("ems access-key", "Manage your account's access keys.")
    sub.add_parser("list", help="your access keys")
    sub.add_parser("create", help="a new access key (the secret is shown once)")
    revoke = sub.add_parser("revoke", help="revoke an access key")
    revoke.add_argument("key_id")
    args = _parse(parser, sub, argv)
    command = args.command or "list"

    def call(client):
        if command == "create":
            reply = client.call("POST", "/v1/access-keys")
            return reply, (f"access key id      {reply['access_key_id']}\nsecret access key  "
                           f"{reply['secret_access_key']}\n(the secret is shown only now)")
        if command == "revoke":
            reply = client.call("DELETE", resource_path("/v1/access-keys", args.key_id))
            return reply, f"revoked access key {args.key_id}"
        reply = client.call("GET", "/v1/access-keys")
        rows = [[k["id"], when(k["created"]), when(k["revoked"])] for k in reply["access_keys"]]
        return reply, format_table(["id", "created", "revoked"], rows, left=3)

    return _run(parser, args, call)


def _cluster_rows(clusters: list[dict]) -> str:
    rows = []
    for c in clusters:
        sample = c["last_sample"]
        rows.append([c["id"], c["name"], c["zookeeper"], when(c["activated"]),
                     when(c["deleted"]),
                     f"{sample['nodes']} at {when(sample['time'])}" if sample else "-"])
    return format_table(["id", "name", "zookeeper", "activated", "deleted", "last sample"],
                        rows, left=6)


def cluster_main(argv: list[str] | None = None) -> int:
    parser, sub = _client_parser("ems cluster", "Register, list and delete your clusters.")
    sub.add_parser("list", help="your clusters")
    create = sub.add_parser("create", help="register a cluster (the daemons' --cluster name)")
    create.add_argument("name")
    create.add_argument("--zookeeper", required=True, help="its ZooKeeper, host:port[,...]")
    show = sub.add_parser("show", help="one cluster")
    show.add_argument("cluster_id")
    delete = sub.add_parser("delete", help="stop billing a cluster; its daemons stop serving")
    delete.add_argument("cluster_id")
    args = _parse(parser, sub, argv)
    command = args.command or "list"

    def call(client):
        if command == "create":
            reply = client.call("POST", "/v1/clusters", {"name": args.name,
                                                         "zookeeper": args.zookeeper})
        elif command == "show":
            reply = client.call("GET", resource_path("/v1/clusters", args.cluster_id))
        elif command == "delete":
            reply = client.call("DELETE", resource_path("/v1/clusters", args.cluster_id))
        else:
            reply = client.call("GET", "/v1/clusters")
            return reply, _cluster_rows(reply["clusters"])
        return reply, _cluster_rows([reply])

    return _run(parser, args, call)


def _credential_rows(credentials: list[dict]) -> str:
    rows = [[c["id"], c["cluster_name"], c["state"], when(c["issued"]), when(c["expires"])]
            for c in credentials]
    return format_table(["id", "cluster", "state", "issued", "expires"], rows, left=5)


def credential_main(argv: list[str] | None = None) -> int:
    parser, sub = _client_parser("ems credential", "Issue, list and revoke activation "
                                                   "credentials.")
    sub.add_parser("list", help="your credentials")
    create = sub.add_parser("create", help="issue a credential for one of your clusters")
    create.add_argument("--cluster", required=True, help="cluster id (clu-...)")
    create.add_argument("--lifetime", type=parse_duration, default="365d",
                        help="time until it expires, e.g. 30d or 12h (default 365d)")
    create.add_argument("--out", required=True,
                        help="file to write the credential to (mode 0600); pass it to "
                             "`ems activate --credential`")
    revoke = sub.add_parser("revoke", help="revoke a credential: the cluster stops serving")
    revoke.add_argument("credential_id")
    args = _parse(parser, sub, argv)
    command = args.command or "list"
    out = None      # the --out file, created before the call
    written = False
    if command == "create":
        if os.path.exists(args.out):
            parser.error(f"--out {args.out} exists already; choose a new file")
        # Created before the call, so that a path that cannot be written fails here and no
        # credential is issued whose token would be lost.
        try:
            out = os.fdopen(os.open(args.out, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w")
        except OSError as exc:
            parser.error(f"--out {args.out} cannot be created: {exc.strerror}")

    def call(client):
        nonlocal written
        if command == "create":
            reply = client.call("POST", "/v1/credentials", {"cluster": args.cluster,
                                                            "lifetime_s": args.lifetime})
            with out:
                out.write(reply["token"] + "\n")
            written = True
            return reply, (_credential_rows([reply]) + f"\n\nwritten to {args.out}; activate "
                           f"with: ems activate --credential {args.out}")
        if command == "revoke":
            reply = client.call("DELETE", resource_path("/v1/credentials",
                                                        args.credential_id))
            return reply, (_credential_rows([reply]) + f"\n\nstanding notice to the "
                           f"cluster's daemons: {reply['notice']}")
        reply = client.call("GET", "/v1/credentials")
        return reply, _credential_rows(reply["credentials"])

    try:
        return _run(parser, args, call)
    finally:
        if out is not None and not written:   # the call failed: leave no empty file
            out.close()
            os.unlink(args.out)


def bill_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ems bill", description="Your itemised bill: "
                                     "node-hours per hour and cluster, for one month (UTC).")
    parser.add_argument("--month", help="YYYY-MM (default: the current month)")
    parser.add_argument("--cluster", help="only this cluster id")
    parser.add_argument("--config", help="settings file (default: EMS_MANAGE_CONFIG or "
                                         "~/.config/ems/manage.json)")
    parser.add_argument("--json", action="store_true", help="print the service's JSON reply")
    args = parser.parse_args(argv)

    def call(client):
        reply = client.call("GET", "/v1/bill", query={"month": args.month,
                                                      "cluster": args.cluster})
        rows = [[i["hour"][:16].replace("T", " ") + "-" + i["hour_end"][11:16], i["cluster_name"],
                 str(i["samples"]), str(i["node_sum"]), str(i["node_hours"]),
                 i["price_per_node_hour"], i["amount"]] for i in reply["items"]]
        state = reply["account_state"]
        text = "\n".join([
            f"bill of {reply['account']} for {reply['month']} (UTC)", "",
            format_table(["hour", "cluster", "samples", "node sum", "node-hours", "price",
                          "amount"], rows, left=2),
            "", f"total: {reply['node_hours']} node-hours, {reply['total']}",
            f"balance {state['balance']}, bill due (all months) {state['bill_due']}"
            + (" -- IN ARREARS" if state["in_arrears"] else "")])
        return reply, text

    return _run(parser, args, call)
