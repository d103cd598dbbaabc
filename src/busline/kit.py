"""What every busline service shares: where state lives, how a service finds another, how
it serves HTTP, and how it answers a bad request.

A service binds port 0 (or `BUSLINE_PORT`, which the supervisor passes on a restart so a
port stays stable) and reports it by writing `$BUSLINE_STATE/run/<service>.json`. Other
services read those files to find it: a registry of files, with nothing to run.
"""

from __future__ import annotations

import json
import os
import re
import socket
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

from starlette.requests import Request
from starlette.responses import JSONResponse

#: The company's services, in the order the supervisor starts them. `providers` is not the
#: company's: it plays M-Pesa, Airtel, the card acquirer and the SMS gateway.
SERVICES = ("providers", "auth", "fleet", "payments", "ticketing", "notifier", "gateway")

#: Company services listen on 127.0.0.1; the providers simulator on another loopback
#: address, so that it is a different host: off the SDK's propagation allow-list.
COMPANY_HOST = "127.0.0.1"
PROVIDERS_HOST_DEFAULT = "127.0.0.2"

DEFAULT_VERSION = "1.4.2"

#: The company's time zone: timetables, and the times Daraja wants (EAT, UTC+3).
NAIROBI = ZoneInfo("Africa/Nairobi")


def state_dir() -> Path:
    """`$BUSLINE_STATE` (default `.busline/`): databases, the embedded queue, port files,
    the control state and the audit log."""
    path = Path(os.environ.get("BUSLINE_STATE", ".busline")).resolve()
    path.mkdir(parents=True, exist_ok=True)
    return path


def run_dir() -> Path:
    path = state_dir() / "run"
    path.mkdir(parents=True, exist_ok=True)
    return path


def version() -> str:
    return os.environ.get("BUSLINE_VERSION", DEFAULT_VERSION)


def providers_host() -> str:
    return os.environ.get("BUSLINE_PROVIDERS_HOST", PROVIDERS_HOST_DEFAULT)


def write_atomically(path: Path, data: Any) -> None:
    """Write JSON so a reader sees the old file or the new one, never half of one."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
    os.replace(tmp, path)


def read_json(path: Path, default: Any = None) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return default


@dataclass(frozen=True)
class Listening:
    service: str
    host: str
    port: int
    pid: int
    version: str
    started_at: float

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"


def report_listening(service: str, host: str, port: int) -> None:
    write_atomically(
        run_dir() / f"{service}.json",
        {
            "service": service,
            "host": host,
            "port": port,
            "pid": os.getpid(),
            "version": version(),
            "started_at": time.time(),
        },
    )


def report_worker(service: str) -> None:
    """A worker (no HTTP port) reports that it runs: its pid and version, port 0."""
    report_listening(service, "", 0)


def listening(service: str) -> Listening | None:
    """What `service` last reported, or None when it never started."""
    data = read_json(run_dir() / f"{service}.json")
    if not isinstance(data, dict):
        return None
    try:
        return Listening(
            service=service,
            host=str(data["host"]),
            port=int(data["port"]),
            pid=int(data["pid"]),
            version=str(data["version"]),
            started_at=float(data["started_at"]),
        )
    except (KeyError, TypeError, ValueError):
        return None


class Unavailable(Exception):  # noqa: N818 - reads as what happened: kit.Unavailable
    """A service another one needs has not reported a port."""


def url_of(service: str) -> str:
    """`http://host:port` of `service`, from its port file."""
    found = listening(service)
    if found is None:
        raise Unavailable(f"{service} has not started")
    return found.url


def bind(host: str, port: int | None = None) -> socket.socket:
    """A listening socket on `port`, else on `BUSLINE_PORT` when set (a restart keeps its
    port), else on port 0. SO_REUSEADDR lets a restart take the port back at once."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if port is None:
        port = int(os.environ.get("BUSLINE_PORT", "0") or 0)
    deadline = time.monotonic() + 10.0
    while True:
        try:
            sock.bind((host, port))
            break
        except OSError:
            # The previous process may still hold the port for a moment after a kill.
            if port == 0 or time.monotonic() > deadline:
                raise
            time.sleep(0.2)
    sock.listen(1024)
    sock.set_inheritable(True)
    return sock


def serve(service: str, app: Any, host: str = COMPANY_HOST, *, also: tuple[str, ...] = ()) -> None:
    """Serve `app` with uvicorn on a bound socket, after reporting the port. Each name in
    `also` gets a socket (and a port file) of its own, serving the same app: the providers
    simulator listens once per provider. The fault agent may close and reopen each."""
    import uvicorn

    from busline import fault_agent

    names = (service, *also)
    # BUSLINE_PORT keeps the service's own port over a restart; the others take any port.
    sockets = [bind(host), *(bind(host, 0) for _ in also)]
    config = uvicorn.Config(app, log_config=None, access_log=False, lifespan="on")

    class Server(uvicorn.Server):
        async def startup(self, sockets: list[socket.socket] | None = None) -> None:
            await super().startup(sockets=sockets)
            if self.should_exit:  # the app's startup failed: nothing to listen on
                return
            import asyncio

            loop = asyncio.get_running_loop()
            agent = fault_agent.agent()
            for index, name in enumerate(names):
                agent.add_listener(fault_agent.Listener(name, loop, self, index))

    server = Server(config)
    for name, sock in zip(names, sockets, strict=True):
        report_listening(name, host, int(sock.getsockname()[1]))
    server.run(sockets=sockets)


# ---------------------------------------------------------------- errors and validation


def error(
    status: int,
    code: str,
    message: str,
    *,
    field: str | None = None,
    headers: Mapping[str, str] | None = None,
    **extra: Any,
) -> JSONResponse:
    """The one error shape of every busline API:
    `{"error": code, "message": text, "field": name?}`."""
    body: dict[str, Any] = {"error": code, "message": message, **extra}
    if field is not None:
        body["field"] = field
    return JSONResponse(body, status_code=status, headers=dict(headers or {}))


class Invalid(Exception):  # noqa: N818 - reads as what happened: kit.Invalid
    """A request field is missing or wrong; answered 400 (or 422) naming the field."""

    def __init__(self, field: str, message: str, status: int = 400) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message
        self.status = status

    def response(self) -> JSONResponse:
        return error(self.status, "invalid_request", self.message, field=self.field)


async def json_object(request: Request, max_bytes: int = 64 * 1024) -> dict[str, Any]:
    """The request body as a JSON object, or `Invalid` naming what is wrong with it."""
    content_type = request.headers.get("content-type", "")
    body = await request.body()
    if len(body) > max_bytes:
        raise Invalid("body", f"larger than {max_bytes} bytes", status=413)
    if not body:
        return {}
    if content_type and "json" not in content_type:
        raise Invalid("content-type", "send application/json", status=415)
    try:
        value = json.loads(body)
    except ValueError as exc:
        raise Invalid("body", f"not JSON: {exc}") from None
    except RecursionError:
        raise Invalid("body", "nested too deeply") from None
    if not isinstance(value, dict):
        raise Invalid("body", "must be a JSON object")
    return value


def text_field(
    data: Mapping[str, Any],
    name: str,
    *,
    required: bool = True,
    max_len: int = 200,
    choices: tuple[str, ...] | None = None,
    check: Callable[[str], bool] | None = None,
    hint: str = "",
) -> str:
    """`data[name]` as a non-empty string, or `Invalid` naming `name`."""
    value = data.get(name)
    if value is None:
        if required:
            raise Invalid(name, "is required")
        return ""
    if not isinstance(value, str) or not value.strip():
        raise Invalid(name, "must be a non-empty string")
    if len(value) > max_len:
        raise Invalid(name, f"longer than {max_len} characters")
    if any(ord(c) < 32 or ord(c) == 127 for c in value):
        # PostgreSQL refuses NUL in text, and no field of ours wants control characters.
        raise Invalid(name, "must not contain control characters")
    if choices is not None and value not in choices:
        raise Invalid(name, f"must be one of {', '.join(choices)}")
    if check is not None and not check(value):
        raise Invalid(name, hint or "is not valid")
    return value


def int_field(
    data: Mapping[str, Any], name: str, *, low: int, high: int, default: int | None = None
) -> int:
    value = data.get(name, default)
    if value is None:
        raise Invalid(name, "is required")
    if isinstance(value, bool) or not isinstance(value, int):
        raise Invalid(name, "must be an integer")
    if not low <= value <= high:
        raise Invalid(name, f"must be between {low} and {high}")
    return value


def query_text(request: Request, name: str, *, required: bool = True, max_len: int = 100) -> str:
    return text_field(dict(request.query_params), name, required=required, max_len=max_len)


def handles_invalid(app: Any) -> None:
    """Answer `Invalid` anywhere in a handler with its 4xx JSON error, `Unavailable` with a
    503, and Starlette's own 404 and 405 in the same JSON shape."""
    from starlette.exceptions import HTTPException

    async def on_http(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, HTTPException)
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return error(exc.status_code, code, str(exc.detail), headers=exc.headers)

    app.add_exception_handler(HTTPException, on_http)

    async def on_invalid(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, Invalid)
        return exc.response()

    async def on_unavailable(_: Request, exc: Exception) -> JSONResponse:
        return error(503, "dependency_unavailable", str(exc), headers={"Retry-After": "5"})

    app.add_exception_handler(Invalid, on_invalid)
    app.add_exception_handler(Unavailable, on_unavailable)


def healthz(service: str) -> Callable[[Request], Any]:
    """The `GET /healthz` handler of `service`."""

    async def handler(_: Request) -> JSONResponse:
        return JSONResponse({"status": "ok", "service": service, "version": version()})

    return handler


def env_number(
    environ: Mapping[str, str], name: str, default: float, *, low: float, high: float, unit: str
) -> float:
    """`environ[name]` as a number within [low, high] (`default` when unset), or
    `ValueError` naming the variable, its value and what is expected."""
    raw = environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not low <= value <= high:  # also refuses nan
        raise ValueError(f"{name} has value {raw!r}. Expected {unit} between {low:g} and {high:g}.")
    return value


# ---------------------------------------------------------------- phone numbers

_KENYAN_MOBILE = re.compile(r"^(?:\+?254|0)([17]\d{8})$")
PHONE_HINT = "must be a Kenyan mobile number: 2547XXXXXXXX, 07XXXXXXXX or 01XXXXXXXX"


def normalise_phone(text: str) -> str | None:
    """A Kenyan mobile number as `2547XXXXXXXX` / `2541XXXXXXXX` (what M-Pesa and the SMS
    gateway take), from `07…`, `01…`, `+254…` or `254…` with spaces or dashes; else None."""
    digits = re.sub(r"[\s-]", "", text)
    found = _KENYAN_MOBILE.match(digits)
    return None if found is None else "254" + found.group(1)


def phone_field(data: Mapping[str, Any], name: str = "phone") -> str:
    """`data[name]` normalised by `normalise_phone`, or `Invalid` naming the field."""
    phone = normalise_phone(text_field(data, name, max_len=20))
    if phone is None:
        raise Invalid(name, PHONE_HINT)
    return phone


def mask_phone(phone: str) -> str:
    """`254712345678` -> `2547****5678`: enough to tell numbers apart in a log, not
    enough to call one."""
    if len(phone) <= 8:
        return "*" * len(phone)
    return phone[:4] + "*" * (len(phone) - 8) + phone[-4:]


# ---------------------------------------------------------------- the control state

CONTROL_DEFAULTS: dict[str, Any] = {
    # Maintenance: `global` closes everything, a feature name (payments, bookings, auth,
    # trips, fleet) closes that feature; the value is the message shown.
    "maintenance": {},
    "payment_route": {"primary": "mpesa", "fallback": ["airtel", "card"]},
}

PROVIDERS = ("mpesa", "airtel", "card")


class ControlState:
    """The control state the supervisor writes (`$BUSLINE_STATE/control.json`) and the
    services read: maintenance scopes and the payment route. Re-read when it changes."""

    def __init__(self, min_interval_s: float = 0.25) -> None:
        self._path = state_dir() / "control.json"
        self._mtime = -1.0
        self._checked = 0.0
        self._min_interval_s = min_interval_s
        self._data: dict[str, Any] = json.loads(json.dumps(CONTROL_DEFAULTS))

    def get(self) -> dict[str, Any]:
        now = time.monotonic()
        if now - self._checked >= self._min_interval_s:
            self._checked = now
            try:
                mtime = self._path.stat().st_mtime
            except OSError:
                mtime = -1.0
            if mtime != self._mtime:
                self._mtime = mtime
                data = read_json(self._path, {})
                merged = json.loads(json.dumps(CONTROL_DEFAULTS))
                if isinstance(data, dict):
                    merged.update({k: v for k, v in data.items() if k in CONTROL_DEFAULTS})
                self._data = merged
        return self._data

    def maintenance(self, feature: str) -> str | None:
        """The message when `feature` (or everything) is in maintenance, else None."""
        scopes = self.get()["maintenance"]
        if not isinstance(scopes, dict):
            return None
        found = scopes.get("global") or scopes.get(feature)
        return str(found) if found else None

    def payment_route(self) -> list[str]:
        """Providers to try, in order: the primary, then the fallbacks."""
        route = self.get()["payment_route"]
        order = [route.get("primary", "mpesa"), *route.get("fallback", [])]
        seen: list[str] = []
        for name in order:
            if name in PROVIDERS and name not in seen:
                seen.append(name)
        return seen or ["mpesa"]


# ---------------------------------------------------------------- scheduled jobs


def _lease_held(job: str) -> bool:
    # A `job-failure` fault takes the lease away from one run (busline.fault_agent). This
    # stays apart from job_preflight: an error report carries the lines around the line
    # that raised, and those must not name a fault.
    from busline import fault_agent

    return not fault_agent.agent().job_fails(job)


JOB_RETRY_DEFAULT_S = 30.0


def job_retry_s() -> float:
    """How long a scheduled job waits after a failed run before it tries again
    (`BUSLINE_JOB_RETRY_S`), instead of its whole interval."""
    return env_number(
        os.environ, "BUSLINE_JOB_RETRY_S", JOB_RETRY_DEFAULT_S, low=0.1, high=3600, unit="seconds"
    )


def job_preflight(job: str) -> None:
    """What a run of a scheduled job checks before its work: that it still holds the
    run's lease. A run without it fails; the job tries again after `job_retry_s()`."""
    if not _lease_held(job):
        raise TimeoutError(f"{job}: the run's lease expired before its work started")


# ---------------------------------------------------------------- instrumentation


def instrument(service: str, app: Any = None, *, edge: bool = False) -> Any:
    """`lookout.sdk.init` for a company service: its version, context propagated only to
    the company's own host, and inbound context trusted except at the edge (the gateway).
    Returns the instrumented app: serve that one."""
    import lookout.sdk
    from busline import fault_agent

    if service in SERVICES:  # the supervisor applies no fault to itself: no agent there
        agent = fault_agent.start(service)
        if app is not None:
            app = fault_agent.FaultGate(app, agent)
    return lookout.sdk.init(
        service=service,
        app=app,
        version=version(),
        trust_inbound_context=not edge,
        propagate_to=[COMPANY_HOST],
    )
