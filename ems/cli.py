"""The `ems` command: one entry point for EMS's tools.

    ems serve ...                  run a node daemon (python -m ems.serve)
    ems replay --model DIR ...     multi-turn replay through vLLM (python -m ems.replay)
    ems build-model DIR ...        the local random-weight model (python -m ems.tools.build_model)

Each subcommand takes the options of the module it runs; `ems SUBCOMMAND --help` lists them.
"""
from __future__ import annotations

import sys

SUBCOMMANDS = {
    "serve": ("ems.serve", "run a node daemon: DRAM pool, transfer server, directory shard"),
    "replay": ("ems.replay.__main__", "multi-turn replay of real conversations through vLLM"),
    "build-model": ("ems.tools.build_model", "build the small random-weight model and tokenizer"),
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

    module = importlib.import_module(SUBCOMMANDS[name][0])
    return module.main(rest) or 0


if __name__ == "__main__":
    sys.exit(main())
