"""The `mailmesh` command: `up`, `status`, `dev gen`, and the admin commands (cli/admin.py).

Every subcommand sets `func(args) -> int`; its return value is the exit code. A bad setting is
one line on stderr and exit 2, never a traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from mailmesh_common.cli.admin import add_admin_commands
from mailmesh_common.cli.command import add_group, usage
from mailmesh_common.cli.search import add_search_commands
from mailmesh_common.cli.send import add_send_commands
from mailmesh_common.cli.spam import add_spam_commands
from mailmesh_common.cli.status import add_status_command
from mailmesh_common.cli.up import add_up_command
from mailmesh_common.errors import ConfigError

EXIT_CONFIG = 2


def run_gen(args: argparse.Namespace) -> int:
    from mailmesh_common.devtools.gen import GEN, ROOT, generate

    out = Path(args.out).resolve() if args.out else GEN
    for path in generate(out=out):
        try:
            print(path.relative_to(ROOT))
        except ValueError:
            print(path)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mailmesh", description="Run and administer a mailmesh.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    add_up_command(sub)
    add_status_command(sub)
    dev_sub = add_group(sub, "dev", "developer tools")
    gen = dev_sub.add_parser("gen", help="regenerate gen/ from protos/ (grpcio-tools, mypy-protobuf)")
    gen.add_argument("--out", help="output directory (default: the checkout's gen/)")
    gen.set_defaults(func=run_gen)
    add_admin_commands(sub)
    add_search_commands(sub)
    add_spam_commands(sub)
    add_send_commands(sub)
    parser.set_defaults(func=usage(parser))
    return parser


def run(argv: Sequence[str] | None = None) -> int:
    """Parses `argv` and runs the subcommand; returns the exit code."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except ConfigError as exc:
        print(f"mailmesh: configuration error: {exc.message}", file=sys.stderr)
        return EXIT_CONFIG
    except KeyboardInterrupt:
        return 130


def main(argv: Sequence[str] | None = None) -> None:
    """Console-script entry point."""
    sys.exit(run(argv))


if __name__ == "__main__":
    main()
