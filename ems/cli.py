"""The `ems` command: one entry point for EMS's tools.

    ems serve ...                  run a node daemon (python -m ems.serve)
    ems replay --model DIR ...     multi-turn replay through vLLM (python -m ems.replay)
    ems build-model DIR ...        the local random-weight model (python -m ems.tools.build_model)
    ems plan --model CONFIG.json   KV bytes, contexts per tier (python -m ems.tools.plan)
    ems stats [--watch SECONDS]    pool statistics of every daemon (python -m ems.admin stats)
    ems nodes                      cluster members and PING times (python -m ems.admin nodes)
    ems route --tokens ... ...     the node with the longest cached prefix (python -m ems.admin route)
    ems manage init|serve ...      the management service (ems.manage.cli)
    ems account|access-key|cluster|credential|bill ...
                                   signed calls to the management API (ems.manage.cli)
    ems activate --credential ...  activate a cluster (python -m ems.manage.activate_cli)
    ems uninstall [--zookeeper ... --cluster ...]
                                   remove EMS from this host and the cluster (python -m ems.uninstall)
    ems upgrade --restart-cmd ...  restart the daemons one at a time (python -m ems.upgrade)

Each subcommand takes the options of the module it runs; `ems SUBCOMMAND --help` lists them.
"""
from __future__ import annotations

import sys

SUBCOMMANDS = {
    "serve": ("ems.serve", "run a node daemon: DRAM pool, transfer server, directory shard"),
    "stats": ("ems.admin:stats_main", "pool statistics of every daemon, by node and tier"),
    "nodes": ("ems.admin:nodes_main", "cluster members, their addresses and PING times"),
    "route": ("ems.admin:route_main", "find the node with the longest cached prefix of a prompt"),
    "manage": ("ems.manage.cli:manage_main", "management service: `init` a directory, `serve` "
               "the REST API over HTTPS"),
    "account": ("ems.manage.cli:account_main", "your account, balance and arrears; accounts "
                "and top-ups (admin)"),
    "access-key": ("ems.manage.cli:access_key_main", "your access keys for the management API"),
    "cluster": ("ems.manage.cli:cluster_main", "register, list and delete clusters"),
    "credential": ("ems.manage.cli:credential_main", "issue, list and revoke activation "
                   "credentials"),
    "bill": ("ems.manage.cli:bill_main", "itemised bill: node-hours per hour and cluster"),
    "activate": ("ems.manage.activate_cli", "activate a cluster with a credential from the "
                 "management service"),
    "uninstall": ("ems.uninstall", "stop this host's daemons, delete a cluster's ZooKeeper "
                  "records and remove spill directories"),
    "upgrade": ("ems.upgrade", "rolling upgrade: drain and restart the daemons one at a "
                "time, checking each comes back healthy"),
    "replay": ("ems.replay.__main__", "multi-turn replay of real conversations through vLLM"),
    "build-model": ("ems.tools.build_model", "build the small random-weight model and tokenizer"),
    "plan": ("ems.tools.plan", "KV-cache bytes of a model and the contexts each tier holds"),
}


def usage() -> str:
    lines = ["usage: ems SUBCOMMAND [OPTIONS]", "", "subcommands:"]
    lines += [f"  {name:<12} {text}" for name, (_, text) in SUBCOMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in SUBCOMMANDS:
        print(f"ems: unknown subcommand {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    import importlib

    # An entry names "module" (its main() runs) or "module:function".
    module_name, _, function = SUBCOMMANDS[name][0].partition(":")
    module = importlib.import_module(module_name)
    return getattr(module, function or "main")(rest) or 0


if __name__ == "__main__":
    sys.exit(main())
