"""The `lookout` command (also `python -m lookout`).

Exit codes: 0 success, 1 failure, 2 usage error. A user's mistake prints one line
naming the problem and the fix, never a traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from lookout import __version__
from lookout.errors import LookoutError


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        self.print_usage(sys.stderr)
        self.exit(2, f"{self.prog}: error: {message}\n")


def _cmd_version(_: argparse.Namespace) -> int:
    print(f"lookout {__version__}")
    return 0


def _cmd_sdk_env(args: argparse.Namespace) -> int:
    from lookout.sdk._settings import VARIABLES

    if args.format == "markdown":
        print("| Variable | Default | Meaning |")
        print("| --- | --- | --- |")
        for var in VARIABLES:
            default = f"`{var.default}`" if var.default else "(unset)"
            print(f"| `{var.name}` | {default} | {var.meaning} |")
    else:
        for var in VARIABLES:
            print(var.name)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="lookout", description="Lookout: observability for microservices.")
    parser.add_argument("--version", action="version", version=f"lookout {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    commands.required = True

    version = commands.add_parser("version", help="print the version")
    version.set_defaults(func=_cmd_version)

    sdk_env = commands.add_parser(
        "sdk-env", help="list the environment variables lookout.sdk reads"
    )
    sdk_env.add_argument("--format", choices=("names", "markdown"), default="markdown")
    sdk_env.set_defaults(func=_cmd_sdk_env)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        code: int = args.func(args)
    except LookoutError as exc:
        print(f"lookout: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return code
