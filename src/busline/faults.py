"""Fault injection with sealed ground truth: the kinds, the registry of faults in force,
and the files it keeps (`busline.fault_api` serves it over HTTP and as
`python -m busline fault ...`).

A fault is started (`fault start KIND --target T [--intensity X] [--for 3m]`), lasts its
duration or until stopped, and is applied by the agent in the process it is aimed at
(`busline.fault_agent`), at the boundary its name says. The registry lives in the
supervisor: it writes the faults in force to `$BUSLINE_STATE/faults/active.json` (which
the agents read), and each start and end to `$BUSLINE_STATE/ground_truth.jsonl` with the
verdict, target and actions a diagnosis should arrive at. It logs to
`$BUSLINE_STATE/faults/faults.log`, never through `lookout run`: nothing Lookout ingests
names a fault.
"""

from __future__ import annotations

import json
import os
import re
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from busline import kit
from busline.kit import Invalid

DEFAULT_DURATION_S = 600.0
MAX_DURATION_S = 24 * 3600.0
MAX_SURGE_DEFAULT = 5.0
COMPANY = ("gateway", "auth", "ticketing", "payments", "fleet", "notifier")
HTTP_SERVICES = ("gateway", "auth", "ticketing", "payments", "fleet")
DATABASES = ("auth", "ticketing", "payments", "notifier")
PAYMENT_PROVIDERS = ("mpesa", "airtel", "card")
JOBS = {"seat-hold-sweeper": "ticketing", "mpesa-reconciliation": "payments"}
#: The services with a code path a bad release breaks (`fault_agent.Agent.release_bug`).
RELEASABLE = ("ticketing", "payments")

Action = dict[str, Any]


# ---------------------------------------------------------------- the kinds


@dataclass(frozen=True)
class Intensity:
    default: float
    low: float
    high: float
    unit: str


def _away_from(provider: str) -> list[Action]:
    """Route payments around `provider` (the strategy's step 6), or close payments."""
    others = [p for p in PAYMENT_PROVIDERS if p != provider]
    return [
        {"action": "payment_route", "primary": others[0], "fallback": others[1:]},
        {"action": "maintenance", "scope": "payments"},
    ]


def _none(_: str) -> list[Action]:
    """Nothing busline's control API can do: escalate, or wait it out."""
    return []


def _restart(target: str) -> list[Action]:
    return [{"action": "restart", "service": target}]


def _rollback(target: str) -> list[Action]:
    return [{"action": "rollback", "service": target}]


def _same(target: str) -> str:
    return target


@dataclass(frozen=True)
class Kind:
    name: str
    summary: str
    targets: tuple[str, ...]
    verdict: str
    intensity: Intensity | None = None
    process: Callable[[str], str] = _same
    actions: Callable[[str], list[Action]] = _none


def _provider_actions(target: str) -> list[Action]:
    return _away_from(target) if target in PAYMENT_PROVIDERS else []


KINDS: dict[str, Kind] = {
    k.name: k
    for k in (
        Kind(
            "provider-down",
            "the provider's port stops listening: connection refused",
            (*PAYMENT_PROVIDERS, "sms"),
            "provider_down",
            process=lambda _: "providers",
            actions=_provider_actions,
        ),
        Kind(
            "provider-slow",
            "the provider answers slower, by a factor",
            (*PAYMENT_PROVIDERS, "sms"),
            "provider_slow",
            Intensity(10.0, 1.5, 100.0, "x its usual latency"),
            process=lambda _: "providers",
            actions=_provider_actions,
        ),
        Kind(
            "provider-errors",
            "the provider answers a fraction of calls with a 5xx",
            (*PAYMENT_PROVIDERS, "sms"),
            "provider_errors",
            Intensity(0.5, 0.01, 1.0, "fraction of calls"),
            process=lambda _: "providers",
            actions=_provider_actions,
        ),
        Kind(
            "callback-delay",
            "the provider holds its callbacks",
            PAYMENT_PROVIDERS,
            "callback_delay",
            Intensity(60.0, 1.0, 3600.0, "seconds held"),
            process=lambda _: "providers",
        ),
        Kind(
            "db-slow",
            "every statement of the service's database waits",
            DATABASES,
            "database_slow",
            Intensity(0.5, 0.01, 10.0, "seconds per statement"),
        ),
        Kind(
            "pool-exhaustion",
            "connections of the service's pool are checked out and never returned",
            DATABASES,
            "pool_exhaustion",
            Intensity(100.0, 1.0, 100.0, "connections held (at most the pool's size)"),
            actions=_restart,
        ),
        Kind(
            "consumer-stuck",
            "the notifier stops taking messages; the backlog grows",
            ("notifier",),
            "consumer_stuck",
            actions=_restart,
        ),
        Kind(
            "consumer-slow",
            "the notifier waits before each message",
            ("notifier",),
            "consumer_slow",
            Intensity(5.0, 0.1, 120.0, "seconds per message"),
        ),
        Kind(
            "memory-leak",
            "the process allocates and keeps memory, up to a cap",
            COMPANY,
            "memory_leak",
            Intensity(60.0, 1.0, 1000.0, "MB a minute"),
            actions=_restart,
        ),
        Kind(
            "cpu-hog",
            "a thread of the process burns CPU at a duty cycle",
            COMPANY,
            "cpu_saturation",
            Intensity(90.0, 1.0, 100.0, "% duty cycle"),
            actions=_restart,
        ),
        Kind(
            "crash-loop",
            "the process exits a second after each start; the supervisor restarts it",
            COMPANY,
            "crash_loop",
        ),
        Kind(
            "service-unavailable",
            "the process stops listening (and drops its connections), but runs",
            HTTP_SERVICES,
            "service_unavailable",
            actions=_restart,
        ),
        Kind(
            "auth-failures",
            "auth refuses a fraction of valid sessions as invalid tokens",
            ("auth",),
            "auth_token_failures",
            Intensity(0.5, 0.01, 1.0, "fraction of session checks"),
        ),
        Kind(
            "stale-gps",
            "k buses stop reporting positions",
            ("fleet",),
            "stale_gps",
            Intensity(5.0, 1.0, 34.0, "buses"),
        ),
        Kind(
            "gateway-latency",
            "the gateway waits before every API call",
            ("gateway",),
            "gateway_latency",
            Intensity(1.0, 0.01, 30.0, "seconds per call"),
        ),
        Kind(
            "traffic-surge",
            "the load generator runs k times its rate",
            ("gateway",),
            "traffic_surge",
            Intensity(3.0, 1.1, MAX_SURGE_DEFAULT, "x the load"),
            process=lambda _: "load",
        ),
        Kind(
            "buggy-release",
            "a new version is deployed; one code path raises n % of the time",
            RELEASABLE,
            "bad_release",
            Intensity(0.3, 0.01, 1.0, "fraction of calls of the broken path"),
            actions=_rollback,
        ),
        Kind(
            "job-failure",
            "the job's next run fails once; its retry succeeds",
            tuple(JOBS),
            "job_failure",
            process=lambda target: JOBS[target],
        ),
    )
}


def max_surge() -> float:
    return kit.env_number(
        os.environ, "BUSLINE_MAX_SURGE", MAX_SURGE_DEFAULT, low=1.1, high=50.0, unit="a factor"
    )


def memory_cap_mb() -> float:
    return kit.env_number(
        os.environ, "BUSLINE_FAULT_MEMORY_CAP_MB", 300.0, low=1.0, high=4096.0, unit="megabytes"
    )


# ---------------------------------------------------------------- durations

_DURATION = re.compile(r"^(?:(\d+(?:\.\d+)?)h)?(?:(\d+(?:\.\d+)?)m)?(?:(\d+(?:\.\d+)?)s?)?$")


def parse_duration(text: str | float | int) -> float:
    """`90`, `90s`, `3m`, `1h`, `2m30s` -> seconds; `ValueError` otherwise."""
    if isinstance(text, bool) or not isinstance(text, (str, int, float)):
        raise TypeError("a duration such as 90s, 3m or 1h")
    if isinstance(text, (int, float)):
        try:
            seconds = float(text)
        except OverflowError:
            raise ValueError(f"must be between 1 s and {MAX_DURATION_S / 3600:g} h") from None
    else:
        found = _DURATION.match(text.strip())
        if not text.strip() or found is None or not any(found.groups()):
            raise ValueError(f"{text!r} is not a duration such as 90s, 3m or 1h")
        h, m, s = (float(g) if g else 0.0 for g in found.groups())
        seconds = h * 3600 + m * 60 + s
    if not 0 < seconds <= MAX_DURATION_S:  # also refuses nan
        raise ValueError(f"must be between 1 s and {MAX_DURATION_S / 3600:g} h")
    return seconds


# ---------------------------------------------------------------- the files


def faults_dir() -> Path:
    path = kit.state_dir() / "faults"
    path.mkdir(parents=True, exist_ok=True)
    return path


def active_path() -> Path:
    """`$BUSLINE_STATE/faults/active.json`: the faults in force, which each process reads."""
    return faults_dir() / "active.json"


def ground_truth_path() -> Path:
    return kit.state_dir() / "ground_truth.jsonl"


def read_active(now_ms: int | None = None) -> list[dict[str, Any]]:
    """The faults in force now: `{"id", "kind", "target", "params", "start_ms", "end_ms"}`."""
    now_ms = int(time.time() * 1000) if now_ms is None else now_ms
    data = kit.read_json(active_path(), {})
    faults = data.get("faults") if isinstance(data, dict) else None
    if not isinstance(faults, list):
        return []
    out = []
    for fault in faults:
        if not isinstance(fault, dict):
            continue
        end = fault.get("end_ms")
        if end is None or (isinstance(end, (int, float)) and end > now_ms):
            out.append(fault)
    return out


def surge_factor() -> float:
    """The load multiplier of an active `traffic-surge` (1.0 when there is none)."""
    factor = 1.0
    for fault in read_active():
        if fault.get("kind") == "traffic-surge":
            try:
                factor = max(factor, float(fault.get("params", {}).get("intensity", 1.0)))
            except (TypeError, ValueError):
                continue
    return factor


def read_ground_truth(path: Path | None = None) -> list[dict[str, Any]]:
    """Each fault's latest record (its end once it ended), in start order."""
    latest: dict[str, dict[str, Any]] = {}
    try:
        with (path or ground_truth_path()).open() as handle:
            for line in handle:
                try:
                    record = json.loads(line)
                except ValueError:
                    continue  # a torn last line after a crash
                if isinstance(record, dict) and "id" in record:
                    latest[str(record["id"])] = record
    except FileNotFoundError:
        return []
    return sorted(latest.values(), key=lambda r: (r.get("start_ms", 0), r["id"]))


def iso_ms(ms: int | None) -> str | None:
    if ms is None:
        return None
    import datetime as dt

    stamp = dt.datetime.fromtimestamp(ms / 1000, dt.UTC)
    return stamp.isoformat(timespec="milliseconds").replace("+00:00", "Z")


# ---------------------------------------------------------------- the registry


def kind_name(text: str) -> str:
    """A kind as people type it: `provider_down` and `Provider-Down` are `provider-down`."""
    return text.strip().lower().replace("_", "-")


def validate(
    kind_name_text: str, target: str, intensity: float | None, duration_s: float | None
) -> tuple[Kind, dict[str, Any], float]:
    """The kind, the parameters and the duration of a fault as asked, or `Invalid`
    naming the field that is wrong."""
    kind = KINDS.get(kind_name(kind_name_text))
    if kind is None:
        raise Invalid("kind", f"must be one of {', '.join(KINDS)}")
    if not target and len(kind.targets) == 1:
        target = kind.targets[0]  # the one target it can have
    if target not in kind.targets:
        raise Invalid("target", f"{kind.name} takes one of {', '.join(kind.targets)}")
    params: dict[str, Any] = {}
    if kind.intensity is None:
        if intensity is not None:
            raise Invalid("intensity", f"{kind.name} takes no intensity")
    else:
        spec = kind.intensity
        high = max_surge() if kind.name == "traffic-surge" else spec.high
        value = spec.default if intensity is None else intensity
        if not spec.low <= value <= high:  # also refuses nan
            raise Invalid("intensity", f"{spec.unit}, between {spec.low:g} and {high:g}")
        params["intensity"] = value
    if kind.name == "memory-leak":
        params["cap_mb"] = memory_cap_mb()
    if duration_s is None:
        # A job may run only every ten minutes: its fault waits for the run it fails.
        duration = MAX_DURATION_S if kind.name == "job-failure" else DEFAULT_DURATION_S
    else:
        duration = duration_s
    if not 1.0 <= duration <= MAX_DURATION_S:
        raise Invalid("for", f"between 1 s and {MAX_DURATION_S / 3600:g} h")
    return kind, params, duration


class Releases(Protocol):
    """What a bad release needs of the supervisor (and a crash loop's end)."""

    def releases(self, name: str) -> list[str]: ...

    def kick(self, name: str) -> None:
        """Start `name` now if it waits out a restart backoff."""
        ...


class Deployer(Protocol):
    def deploy_release(self, name: str, version: str) -> None: ...

    def withdraw_release(self, name: str, version: str) -> None: ...


class RefusedError(Exception):
    def __init__(self, status: int, code: str, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.field = field


def next_version(current: str) -> str:
    """The release after `current`: its last number plus one (`1.4.2` -> `1.4.3`)."""
    found = re.match(r"^(.*?)(\d+)([^\d]*)$", current)
    if found is None:
        return current + ".1"
    head, number, tail = found.groups()
    return f"{head}{int(number) + 1}{tail}"


class Registry:
    """The faults in force and their ground truth, for one state directory. Thread-safe;
    the supervisor's loop calls `expire()` to end faults whose time is up."""

    def __init__(
        self, supervisor: Releases | None = None, deployer: Deployer | None = None
    ) -> None:
        self.supervisor = supervisor
        self.deployer = deployer
        self._lock = threading.RLock()
        self.log_path = faults_dir() / "faults.log"
        data = kit.read_json(active_path(), {})
        self._faults: list[dict[str, Any]] = (
            [f for f in data.get("faults", []) if isinstance(f, dict)]
            if isinstance(data, dict)
            else []
        )

    def note(self, event: str, **fields: Any) -> None:
        """A line of the fault tool's own log, `faults/faults.log` (never the process's
        output, which `lookout run` ships)."""
        line = json.dumps({"at": iso_ms(int(time.time() * 1000)), "event": event, **fields})
        with self.log_path.open("a") as handle:
            handle.write(line + "\n")

    def _save(self) -> None:
        kit.write_atomically(active_path(), {"faults": self._faults})

    def _truth(self, event: str, fault: Mapping[str, Any]) -> None:
        kind = KINDS[fault["kind"]]
        record = {
            "event": event,
            "id": fault["id"],
            "scenario_id": fault.get("scenario_id"),
            "seed": fault.get("seed"),
            "kind": fault["kind"],
            "target": fault["target"],
            "parameters": fault["params"],
            "start_ms": fault["start_ms"],
            "end_ms": fault.get("ended_ms"),
            "planned_end_ms": fault["end_ms"],
            "start": iso_ms(fault["start_ms"]),
            "end": iso_ms(fault.get("ended_ms")),
            "expected_verdict": kind.verdict,
            "expected_target": fault["target"],
            "expected_actions": kind.actions(fault["target"]),
        }
        with ground_truth_path().open("a") as handle:
            handle.write(json.dumps(record, sort_keys=True) + "\n")
            handle.flush()
            os.fsync(handle.fileno())

    def start(
        self,
        kind_name: str,
        target: str,
        intensity: float | None = None,
        duration_s: float | None = None,
        *,
        scenario_id: str | None = None,
        seed: int | None = None,
    ) -> dict[str, Any]:
        kind, params, duration = validate(kind_name, target, intensity, duration_s)
        target = target or kind.targets[0]
        with self._lock:
            self.expire()
            for fault in self._faults:
                if fault["kind"] == kind.name and fault["target"] == target:
                    raise RefusedError(
                        409, "already_active", f"{fault['id']} is {kind.name} on {target} already"
                    )
            now_ms = int(time.time() * 1000)
            fault = {
                "id": "flt-" + uuid.uuid4().hex[:12],
                "kind": kind.name,
                "target": target,
                "params": params,
                "start_ms": now_ms,
                "end_ms": now_ms + int(duration * 1000),
                "scenario_id": scenario_id,
                "seed": seed,
            }
            if kind.name == "buggy-release":
                if self.supervisor is None or self.deployer is None:
                    raise RefusedError(409, "needs_supervisor", "a release needs `busline up`")
                try:
                    params["from_version"] = self.supervisor.releases(target)[-1]
                except KeyError:
                    raise RefusedError(
                        409, "not_running", f"{target} does not run under this supervisor"
                    ) from None
                params["version"] = next_version(params["from_version"])
                self.deployer.deploy_release(target, params["version"])
            self._faults.append(fault)
            self._save()
            self._truth("started", fault)
            self.note("fault_started", **fault)
            return self.view(fault)

    def stop(self, fault_id: str) -> dict[str, Any]:
        with self._lock:
            for fault in self._faults:
                if fault["id"] == fault_id:
                    return self._end(fault, "stopped")
        raise LookupError(fault_id)

    def _end(self, fault: dict[str, Any], how: str) -> dict[str, Any]:
        now_ms = int(time.time() * 1000)
        fault["ended_ms"] = min(now_ms, fault["end_ms"]) if how == "expired" else now_ms
        self._faults.remove(fault)
        self._save()
        self._truth("ended", fault)
        self.note("fault_ended", how=how, **fault)
        try:
            self._undo(fault)
        except Exception as exc:  # noqa: BLE001 - an ended fault must never stop the platform
            self.note("fault_undo_failed", id=fault["id"], error=f"{type(exc).__name__}: {exc}")
        return {**self.view(fault), "ended_ms": fault["ended_ms"], "how": how}

    def _undo(self, fault: Mapping[str, Any]) -> None:
        """What ending a fault does beyond the agents: withdraw a bad release (unless someone
        rolled it back already), start a crash-looping service at once."""
        kind, target = fault["kind"], fault["target"]
        if kind == "buggy-release" and self.deployer is not None and self.supervisor is not None:
            version = fault["params"]["version"]
            if self.supervisor.releases(target)[-1] == version:
                self.deployer.withdraw_release(target, version)
        if kind == "crash-loop" and self.supervisor is not None:
            self.supervisor.kick(target)

    def expire(self) -> list[dict[str, Any]]:
        """End the faults whose time is up, and job failures whose failed run and retry are
        over; what ended."""
        now_ms = int(time.time() * 1000)
        with self._lock:
            due = [f for f in self._faults if f["end_ms"] <= now_ms]
            done = [f for f in self._faults if f not in due and self._job_failed(f)]
            return [self._end(f, "expired") for f in due] + [self._end(f, "done") for f in done]

    @staticmethod
    def _job_failed(fault: Mapping[str, Any]) -> bool:
        """A job failure whose run failed (the agent's marker) and whose retry is due."""
        if fault["kind"] != "job-failure":
            return False
        try:
            failed_at = (faults_dir() / f"used-{fault['id']}").stat().st_mtime
        except OSError:
            return False
        return time.time() - failed_at > kit.job_retry_s() + 5.0

    def stop_all(self) -> list[dict[str, Any]]:
        with self._lock:
            return [self._end(f, "stopped") for f in list(self._faults)]

    def active(self) -> list[dict[str, Any]]:
        with self._lock:
            self.expire()
            return [self.view(f) for f in self._faults]

    @staticmethod
    def view(fault: Mapping[str, Any]) -> dict[str, Any]:
        return {
            "id": fault["id"],
            "kind": fault["kind"],
            "target": fault["target"],
            "params": fault["params"],
            "start_ms": fault["start_ms"],
            "end_ms": fault["end_ms"],
            "start": iso_ms(fault["start_ms"]),
            "until": iso_ms(fault["end_ms"]),
            "scenario_id": fault.get("scenario_id"),
            "seed": fault.get("seed"),
        }
