"""`python -m busline up` runs the platform; `python -m busline service NAME` runs one of
its services (what the supervisor starts, each through `lookout run`); `python -m busline
load` runs customers' journeys through the gateway (`busline.loadgen`)."""

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
    commands.add_parser("load", help="run customers' journeys through the gateway", add_help=False)
    commands.add_parser("fault", help="start, stop and list faults", add_help=False)
    commands.add_parser("scenario", help="run faults on a timeline", add_help=False)
    from busline import supervisor

    supervisor.add_arguments(up)
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["load"]:
        from busline import loadgen

        return loadgen.main(argv[1:])
    if argv[:1] == ["fault"]:
        from busline import fault_api

        return fault_api.main(argv[1:])
    if argv[:1] == ["scenario"]:
        from busline import scenarios

        return scenarios.main(argv[1:])
    args = parser.parse_args(argv)
    if args.command == "service":
        module = importlib.import_module(f"busline.{args.name}")
        module.main()
        return 0
    return supervisor.up(args)


if __name__ == "__main__":
    sys.exit(main())
