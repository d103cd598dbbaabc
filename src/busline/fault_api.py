"""The fault API and `python -m busline fault ...`: starting, stopping and listing faults
over HTTP on the supervisor (its own port and token, `run/faults.json`), and the client the
command line and scenarios use. The kinds, the registry and the ground truth are in
`busline.faults`.
"""

from __future__ import annotations

import argparse
import contextlib
import hmac
import json
import math
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from busline import kit
from busline.faults import (
    KINDS,
    RefusedError,
    Registry,
    kind_name,
    parse_duration,
    read_ground_truth,
)
from busline.kit import Invalid

API = "/faults/v1"
#: Where `lookout demo` keeps busline's state, relative to where it runs.
DEMO_STATE = Path(".lookout-demo") / "busline"


# ---------------------------------------------------------------- HTTP


def kinds_view() -> list[dict[str, Any]]:
    out = []
    for kind in KINDS.values():
        spec = kind.intensity
        out.append(
            {
                "kind": kind.name,
                "summary": kind.summary,
                "targets": list(kind.targets),
                "intensity": None
                if spec is None
                else {
                    "default": spec.default,
                    "low": spec.low,
                    "high": spec.high,
                    "unit": spec.unit,
                },
                "expected_verdict": kind.verdict,
            }
        )
    return out


def start_request(body: Mapping[str, Any]) -> dict[str, Any]:
    """`Registry.start`'s arguments from a `POST /faults/v1/faults` body, or `Invalid`
    naming the field."""
    intensity = body.get("intensity")
    if intensity is not None:
        if isinstance(intensity, bool) or not isinstance(intensity, (int, float)):
            raise Invalid("intensity", "must be a number")
        try:
            intensity = float(intensity)
        except OverflowError:
            raise Invalid("intensity", "is out of range") from None
    duration: float | None = None
    if body.get("for") is not None:
        try:
            duration = parse_duration(body["for"])
        except (TypeError, ValueError) as exc:
            raise Invalid("for", str(exc)) from None
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise Invalid("seed", "must be an integer")
    return {
        "kind_name": kit.text_field(body, "kind", max_len=40),
        "target": kit.text_field(body, "target", required=False, max_len=40),
        "intensity": intensity,
        "duration_s": duration,
        "scenario_id": kit.text_field(body, "scenario_id", required=False, max_len=120) or None,
        "seed": seed,
    }


def create_app(registry: Registry, token: str | None = None) -> Any:
    """The fault API (docs/busline.md); with `token`, every call needs `Bearer token`."""
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse, Response
    from starlette.routing import Route

    def guarded(handler: Callable[[Request], Any]) -> Callable[[Request], Any]:
        async def route(request: Request) -> Response:
            if token is not None:
                given = request.headers.get("authorization", "").encode()
                if not hmac.compare_digest(given, f"Bearer {token}".encode()):
                    return kit.error(401, "unauthorized", "send Authorization: Bearer <token>")
            try:
                result: Response = await handler(request)
            except RefusedError as exc:
                return kit.error(exc.status, exc.code, exc.message, field=exc.field)
            except Invalid:
                raise  # answered 4xx by the app's handler
            except Exception as exc:  # noqa: BLE001 - into faults.log, not the process's logs
                registry.note("fault_api_failed", error=f"{type(exc).__name__}: {exc}")
                return kit.error(500, "internal_error", "the fault API failed; see faults.log")
            return result

        return route

    async def index(_: Request) -> Response:
        return JSONResponse({"api": "busline-faults", "version": "v1", "kinds": kinds_view()})

    async def listing(_: Request) -> Response:
        ended = read_ground_truth()[-50:]
        return JSONResponse(
            {"active": registry.active(), "ended": [r for r in ended if r.get("end_ms")]}
        )

    async def start(request: Request) -> Response:
        started = registry.start(**start_request(await kit.json_object(request)))
        return JSONResponse(started, status_code=201)

    async def stop(request: Request) -> Response:
        fault_id = str(request.path_params["id"])
        try:
            return JSONResponse(registry.stop(fault_id))
        except LookupError:
            return kit.error(404, "unknown_fault", "no fault in force has this id", field="id")

    async def healthz(_: Request) -> Response:
        return JSONResponse({"status": "ok", "service": "faults"})

    app = Starlette(
        routes=[
            Route("/healthz", healthz),
            Route(API, guarded(index)),
            Route(f"{API}/faults", guarded(listing)),
            Route(f"{API}/faults", guarded(start), methods=["POST"]),
            Route(f"{API}/faults/{{id}}", guarded(stop), methods=["DELETE"]),
            Route(f"{API}/faults/{{id}}/stop", guarded(stop), methods=["POST"]),
        ]
    )
    kit.handles_invalid(app)
    return app


# ---------------------------------------------------------------- the command line


class Client:
    """The fault API of the running platform, found through `run/faults.json`."""

    def __init__(self, url: str | None = None, token: str | None = None) -> None:
        import httpx

        if url is None:
            if not os.environ.get("BUSLINE_STATE") and DEMO_STATE.joinpath("run").is_dir():
                # `lookout demo` (python3 dev.py demo) from this directory: its busline.
                os.environ["BUSLINE_STATE"] = str(DEMO_STATE)
            found = kit.listening("faults")
            if found is None:
                raise SystemExit(
                    f"busline fault: busline is not running in {kit.state_dir()} "
                    "(no run/faults.json); start it with `python -m busline up` or "
                    "`lookout demo`, or say where with --state or $BUSLINE_STATE"
                )
            url = found.url
        self.url = url.rstrip("/") + API
        token = token or os.environ.get("BUSLINE_FAULTS_TOKEN") or None
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.http = httpx.Client(headers=headers, timeout=30.0)

    def call(self, method: str, path: str, body: Any = None) -> Any:
        import httpx

        try:
            response = self.http.request(method, self.url + path, json=body)
        except httpx.HTTPError as exc:
            raise SystemExit(f"busline fault: the fault API did not answer: {exc}") from None
        try:
            data = response.json()
        except ValueError:
            data = None
        if not isinstance(data, dict):
            data = {"error": "bad_answer", "message": response.text[:200]}
        if response.status_code >= 400:
            where = f"{data['field']}: " if data.get("field") else ""
            raise SystemExit(f"busline fault: {where}{data.get('message', data)}")
        return data

    def start(self, **body: Any) -> dict[str, Any]:
        started: dict[str, Any] = self.call(
            "POST", "/faults", {k: v for k, v in body.items() if v is not None}
        )
        return started

    def stop(self, fault_id: str) -> dict[str, Any]:
        stopped: dict[str, Any] = self.call("POST", f"/faults/{fault_id}/stop")
        return stopped

    def list(self) -> dict[str, Any]:
        listed: dict[str, Any] = self.call("GET", "/faults")
        return listed

    def close(self) -> None:
        self.http.close()


def _intensity_arg(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if math.isnan(value):
        raise argparse.ArgumentTypeError("nan is not an intensity")
    return value


def _duration_arg(text: str) -> float:
    try:
        return parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m busline fault",
        description="Start, stop and list faults in the running platform (docs/busline.md).",
    )
    parser.add_argument("--state", type=Path, help="state directory (default: $BUSLINE_STATE)")
    parser.add_argument("--url", help="the fault API (default: from $BUSLINE_STATE/run)")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.required = True
    start = commands.add_parser("start", help="start a fault")
    start.add_argument(
        "kind", type=kind_name, choices=list(KINDS), metavar="KIND", help=", ".join(KINDS)
    )
    start.add_argument("--target", help="required unless the kind has only one target")
    start.add_argument("--intensity", type=_intensity_arg)
    start.add_argument("--for", dest="duration", type=_duration_arg, help="e.g. 90s, 3m, 1h")
    stop = commands.add_parser("stop", help="stop a fault")
    stop.add_argument("id")
    listing = commands.add_parser("list", help="faults in force and recently ended")
    listing.add_argument("--json", action="store_true")
    commands.add_parser("kinds", help="the kinds, their targets and intensities")
    args = parser.parse_args(argv)
    if args.state is not None:
        os.environ["BUSLINE_STATE"] = str(args.state)
    if args.command == "kinds":
        for kind in kinds_view():
            spec = kind["intensity"]
            scale = (
                ""
                if spec is None
                else f"  intensity {spec['unit']}, {spec['low']:g}..{spec['high']:g} "
                f"(default {spec['default']:g})"
            )
            print(f"{kind['kind']:20} {'|'.join(kind['targets'])}{scale}\n    {kind['summary']}")
        return 0
    with contextlib.closing(Client(args.url)) as client:
        return _command(args, client)


def _command(args: argparse.Namespace, client: Client) -> int:
    if args.command == "start":
        fault = client.start(
            kind=args.kind, target=args.target, intensity=args.intensity, **{"for": args.duration}
        )
        print(json.dumps(fault))
        return 0
    if args.command == "stop":
        print(json.dumps(client.stop(args.id)))
        return 0
    listed = client.list()
    if args.json:
        print(json.dumps(listed, indent=1))
        return 0
    ended = listed.get("ended") or []
    for record in ended[-10:]:
        print(
            f"{record['id']}  {record['kind']:20} {record['target']:22} "
            f"ended {record.get('end')}  (ran from {record.get('start')})"
        )
    if not listed["active"]:
        print("no fault in force")
    for fault in listed["active"]:
        params = " ".join(f"{k}={v}" for k, v in fault["params"].items())
        print(
            f"{fault['id']}  {fault['kind']:20} {fault['target']:22} "
            f"until {fault['until']}  {params}"
        )
    return 0
