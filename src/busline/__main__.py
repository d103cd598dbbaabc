"""`python -m busline up` runs the platform; `python -m busline service NAME` runs one of
its services (what the supervisor starts, each through `lookout run`); `python -m busline
load` runs customers' buy journeys through the gateway."""

from __future__ import annotations

import argparse
import importlib
import sys

from busline.kit import SERVICES


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m busline", description=__doc__)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.required = True
    service = commands.add_parser("service", help="run one service in the foreground")
    service.add_argument("name", choices=SERVICES)
    up = commands.add_parser("up", help="run every service under the supervisor")
    commands.add_parser("load", help="run buy journeys through the gateway", add_help=False)
    from busline import supervisor

    supervisor.add_arguments(up)
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["load"]:
        from busline import journeys

        return journeys.main(argv[1:])
    args = parser.parse_args(argv)
    if args.command == "service":
        module = importlib.import_module(f"busline.{args.name}")
        module.main()
        return 0
    return supervisor.up(args)


if __name__ == "__main__":
    sys.exit(main())
