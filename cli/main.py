"""The `stylerec` command: local stack control and client commands.

Each command group lives in its own module with a ``register(subparsers)``
function; this file only assembles them.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from cli.errors import UsageError

# Modules contributing sub-commands. Each exposes register(subparsers).
COMMAND_MODULES = [
    "cli.localstack.stack_commands",
    "cli.client.commands",
    "cli.evaluation.eval_commands",
    "cli.evaluation.style_commands",
    "cli.bench.commands",
    "cli.evaluation.experiment_commands",
    "cli.client.forget_commands",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="stylerec", description="StyleRec local stack and client.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        rc = args.func(args)
    except UsageError as exc:
        print(f"stylerec: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
