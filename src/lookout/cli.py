"""The `lookout` command (also `python -m lookout`).

Exit codes: 0 success, 1 failure, 2 usage error. A user's mistake prints one line
naming the problem and the fix, never a traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

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


def _cmd_server(args: argparse.Namespace) -> int:
    import json

    from lookout import config as server_config
    from lookout.errors import ConfigError, StoreError

    flags = {
        "host": args.host,
        "port": args.port,
        "otlp_port": args.otlp_port,
        "data_dir": args.data_dir,
        "tls_cert": args.tls_cert,
        "tls_key": args.tls_key,
    }
    try:
        config = server_config.load(args.config, flags=flags)
    except ConfigError as exc:
        print(f"lookout server: {exc}", file=sys.stderr)
        return 2
    if args.print_config:
        print(json.dumps(server_config.redacted(config), indent=2))
        return 0
    problems = server_config.exposure_problems(config)
    if problems:
        print(
            f"lookout server: refusing to listen on {config.host} (beyond loopback) without "
            "credentials. Set:",
            file=sys.stderr,
        )
        for key, wanted in problems:
            print(f"  {key}: {wanted}", file=sys.stderr)
        return 2
    if args.check_config:
        print("config OK")
        return 0
    from lookout.server.run import run

    try:
        return run(config)
    except StoreError as exc:
        print(f"lookout server: {exc}", file=sys.stderr)
        return 1


def _cmd_run(args: argparse.Namespace) -> int:
    import os

    from lookout.run import RunOptions, run, scrape_target

    command = list(args.command)
    if command and command[0] == "--":
        command = command[1:]
    if not command:
        print(
            "lookout run: give the command to run after --, e.g. lookout run -- python app.py",
            file=sys.stderr,
        )
        return 2
    if args.scrape not in (None, "auto"):
        try:
            scrape_target(args.scrape)
        except ValueError as exc:
            print(f"lookout run: --scrape: {exc}", file=sys.stderr)
            return 2
    url = args.url or os.environ.get("LOOKOUT_URL") or "http://127.0.0.1:8686"
    token = args.token or os.environ.get("LOOKOUT_TOKEN") or None
    if not 0 <= args.exit_grace <= 3600:
        print("lookout run: --exit-grace must be 0..3600 seconds", file=sys.stderr)
        return 2
    options = RunOptions(
        command, url, token, args.service, echo=not args.no_echo, scrape=args.scrape,
        exit_grace_s=args.exit_grace,
    )  # fmt: skip
    return run(options)


def _cmd_store_ack(args: argparse.Namespace) -> int:
    import getpass
    from datetime import UTC, datetime

    from lookout import config as server_config
    from lookout.errors import ConfigError
    from lookout.store import acknowledge

    try:
        config = server_config.load(args.config, flags={"data_dir": args.data_dir})
    except ConfigError as exc:
        print(f"lookout store: {exc}", file=sys.stderr)
        return 2
    folders = acknowledge(config.data_dir, datetime.now(UTC), by=getpass.getuser())
    for folder in folders:
        print(f"acknowledged {folder} (its files stay there until you delete them)")
    if not folders:
        print(f"Nothing to acknowledge in {config.data_dir / 'quarantine'}.")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from lookout import demo

    return demo.main(args)


def _cmd_promql_test(args: argparse.Namespace) -> int:
    from lookout.query.promql.promqltest import run_cli

    return run_cli(args.paths, verbose=args.verbose, as_json=args.json)


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

    server = commands.add_parser(
        "server", help="run the server: OTLP and Sentry intake, the store and the read API"
    )
    server.add_argument("--config", type=Path, help="YAML config file")
    server.add_argument("--data-dir", help="where the store keeps its files")
    server.add_argument("--host", help="address to listen on (default 127.0.0.1)")
    server.add_argument("--port", help="API and UI port (default 8686)")
    server.add_argument("--otlp-port", help="OTLP-only port (default 4318; 0 turns it off)")
    server.add_argument("--tls-cert", help="PEM certificate: serve HTTPS (with --tls-key)")
    server.add_argument("--tls-key", help="PEM private key of --tls-cert")
    server.add_argument(
        "--check-config", action="store_true", help="validate the config and exit (2 on error)"
    )
    server.add_argument(
        "--print-config", action="store_true", help="print the effective config, secrets redacted"
    )
    server.set_defaults(func=_cmd_server)

    run = commands.add_parser(
        "run",
        help="run a command and ship its stdout and stderr lines to the server",
        usage="lookout run [--service NAME] [--scrape auto|URL] [--url URL] [--token TOKEN] "
        "[--no-echo] [--exit-grace S] -- CMD ...",
    )
    run.add_argument("--service", help="service name of the lines (default: the command's name)")
    run.add_argument("--url", help="server URL (default: LOOKOUT_URL, else http://127.0.0.1:8686)")
    run.add_argument("--token", help="ingest credential (default: LOOKOUT_TOKEN)")
    run.add_argument("--no-echo", action="store_true", help="do not copy the lines to our output")
    run.add_argument(
        "--exit-grace",
        type=float,
        default=5.0,
        metavar="S",
        help="after CMD exits, keep trying to deliver what is left for S seconds (default 5)",
    )
    run.add_argument(
        "--scrape",
        metavar="auto|URL",
        help="register the child's metrics as a scrape target: `auto` takes the address the "
        "SDK reports at start, a URL is registered as given",
    )
    run.add_argument("command", nargs=argparse.REMAINDER, help="-- CMD ARGS...")
    run.set_defaults(func=_cmd_run)

    store = commands.add_parser("store", help="look after the server's store")
    store_commands = store.add_subparsers(dest="store_command", metavar="ACTION")
    store_commands.required = True
    ack = store_commands.add_parser(
        "ack-corruption",
        help="acknowledge the damaged files moved to quarantine/: /readyz is ready again",
    )
    ack.add_argument("--config", type=Path, help="YAML config file (for its data_dir)")
    ack.add_argument("--data-dir", help="the server's data directory")
    ack.set_defaults(func=_cmd_store_ack)

    demo = commands.add_parser(
        "demo",
        help="run lookout server, busline and its customers, and show that data flows",
    )
    from lookout import demo as demo_module

    demo_module.add_arguments(demo)
    demo.set_defaults(func=_cmd_demo)

    promql_test = commands.add_parser(
        "promql-test",
        help="run PromQL test scripts (Prometheus's promqltest format) against the engine",
    )
    promql_test.add_argument(
        "paths", nargs="+", metavar="PATH", help="a .test script, or a folder of *.test scripts"
    )
    promql_test.add_argument(
        "--verbose", action="store_true", help="list every failure and every skipped eval"
    )
    promql_test.add_argument(
        "--json",
        action="store_true",
        help="print one JSON document (per-file counts, failures, skips with reasons)",
    )
    promql_test.set_defaults(func=_cmd_promql_test)
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
