"""The control API: the actions an operator (or Lookout's diagnosis) may take on busline,
as a versioned HTTP contract. docs/actions.md documents it; other platforms can implement
the same contract so diagnosis drives them too.

Every action takes `actor`, `reason` and `dry_run`; it answers what it did (or would do)
as `before` and `after`, and an `undo_id` (the audit entry's id) that
`POST /control/audit/{id}/revert` uses to restore the state before it. The audit log is
append-only JSON lines under `$BUSLINE_STATE/control/`; the state the services read
(maintenance, payment route) is `$BUSLINE_STATE/control.json`.
"""

from __future__ import annotations

import datetime as dt
import hmac
import json
import math
import os
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from busline import kit
from busline.kit import Invalid

API_VERSION = "v1"
FEATURES = ("global", "auth", "trips", "bookings", "payments", "fleet")
#: Services an operator may restart, roll back or deploy (not the providers: not ours).
MANAGED = tuple(name for name in kit.SERVICES if name != "providers")
VERSION_CHARS = set("0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ.-+_")


class Services(Protocol):
    """What the supervisor lets the control API do to processes."""

    def releases(self, name: str) -> list[str]:
        """The release history of `name`, oldest first; the last is running."""
        ...

    def restart(self, name: str, reason: str) -> None: ...

    def deploy(self, name: str, version: str, reason: str) -> None:
        """Restart `name` on `version`, appending it to the history (or, when `version` is
        the one before the current, stepping back: a rollback)."""
        ...

    def rollback(self, name: str, reason: str) -> str:
        """Restart `name` on its previous release; returns that version."""
        ...

    def status(self) -> dict[str, Any]: ...


class RefusedError(Exception):
    """The action cannot be taken as asked (409, or `status`, with `code`)."""

    def __init__(self, code: str, message: str, status: int = 409) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.status = status


@dataclass(frozen=True)
class Caller:
    actor: str
    reason: str
    dry_run: bool


def _caller(body: Mapping[str, Any]) -> Caller:
    actor = kit.text_field(body, "actor", max_len=100)
    reason = kit.text_field(body, "reason", max_len=500)
    dry_run = body.get("dry_run", False)
    if not isinstance(dry_run, bool):
        raise Invalid("dry_run", "must be true or false")
    return Caller(actor, reason, dry_run)


def now_iso() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class Control:
    """The control state, the audit log and the actions, for one state directory."""

    def __init__(self, services: Services) -> None:
        self.services = services
        self.state_path = kit.state_dir() / "control.json"
        audit_dir = kit.state_dir() / "control"
        audit_dir.mkdir(parents=True, exist_ok=True)
        self.audit_path = audit_dir / "audit.jsonl"
        self._lock = threading.RLock()
        if not self.state_path.exists():
            kit.write_atomically(self.state_path, json.loads(json.dumps(kit.CONTROL_DEFAULTS)))

    # ------------------------------------------------------------ state and audit

    def state(self) -> dict[str, Any]:
        data = kit.read_json(self.state_path, {})
        merged: dict[str, Any] = json.loads(json.dumps(kit.CONTROL_DEFAULTS))
        if isinstance(data, dict):
            merged.update({k: v for k, v in data.items() if k in kit.CONTROL_DEFAULTS})
        return merged

    def _write_state(self, state: Mapping[str, Any]) -> None:
        kit.write_atomically(self.state_path, dict(state))

    def audit(self, since_ms: int = 0) -> list[dict[str, Any]]:
        entries = []
        try:
            with self.audit_path.open() as handle:
                for line in handle:
                    try:
                        entry = json.loads(line)
                    except ValueError:
                        continue  # a torn last line after a crash
                    if isinstance(entry, dict) and entry.get("at_ms", 0) >= since_ms:
                        entries.append(entry)
        except FileNotFoundError:
            pass
        return entries

    def _record(
        self, action: str, caller: Caller, target: str, before: Any, after: Any, **extra: Any
    ) -> dict[str, Any]:
        entry = {
            "id": uuid.uuid4().hex[:16],
            "at": now_iso(),
            "at_ms": int(time.time() * 1000),
            "action": action,
            "target": target,
            "actor": caller.actor,
            "reason": caller.reason,
            "dry_run": caller.dry_run,
            "before": before,
            "after": after,
            **extra,
        }
        if not caller.dry_run:
            line = json.dumps(entry, sort_keys=True) + "\n"
            with self.audit_path.open("a") as handle:
                handle.write(line)
                handle.flush()
                os.fsync(handle.fileno())
        return entry

    @staticmethod
    def _answer(entry: Mapping[str, Any]) -> dict[str, Any]:
        return {
            "undo_id": None if entry["dry_run"] else entry["id"],
            "dry_run": entry["dry_run"],
            "action": entry["action"],
            "target": entry["target"],
            "before": entry["before"],
            "after": entry["after"],
        }

    # ------------------------------------------------------------ actions

    def maintenance(
        self, caller: Caller, scope: str, enabled: bool, message: str
    ) -> dict[str, Any]:
        with self._lock:
            state = self.state()
            scopes = dict(state.get("maintenance") or {})
            before = scopes.get(scope)
            if enabled:
                scopes[scope] = message
            else:
                scopes.pop(scope, None)
            entry = self._record(
                "maintenance",
                caller,
                scope,
                {"enabled": before is not None, "message": before},
                {"enabled": enabled, "message": message if enabled else None},
            )
            if not caller.dry_run:
                self._write_state({**state, "maintenance": scopes})
            return self._answer(entry)

    def payment_route(self, caller: Caller, primary: str, fallback: list[str]) -> dict[str, Any]:
        with self._lock:
            state = self.state()
            before = state["payment_route"]
            after = {"primary": primary, "fallback": fallback}
            entry = self._record("payment_route", caller, "payments", before, after)
            if not caller.dry_run:
                self._write_state({**state, "payment_route": after})
            return self._answer(entry)

    def restart(self, caller: Caller, name: str) -> dict[str, Any]:
        version = self.services.releases(name)[-1]
        entry = self._record(
            "restart",
            caller,
            name,
            {"version": version},
            {"version": version},
            revertible=False,
        )
        if not caller.dry_run:
            self.services.restart(name, caller.reason)
        return self._answer(entry)

    def rollback(self, caller: Caller, name: str) -> dict[str, Any]:
        releases = self.services.releases(name)
        if len(releases) < 2:
            raise RefusedError("no_previous_version", f"{name} has run only {releases[-1]}")
        entry = self._record(
            "rollback", caller, name, {"version": releases[-1]}, {"version": releases[-2]}
        )
        if not caller.dry_run:
            self.services.rollback(name, caller.reason)
        return self._answer(entry)

    def deploy(self, caller: Caller, name: str, version: str) -> dict[str, Any]:
        current = self.services.releases(name)[-1]
        if version == current:
            raise RefusedError("already_running", f"{name} runs {version} already")
        entry = self._record("deploy", caller, name, {"version": current}, {"version": version})
        if not caller.dry_run:
            self.services.deploy(name, version, caller.reason)
        return self._answer(entry)

    def revert(self, caller: Caller, undo_id: str) -> dict[str, Any]:
        """Restore the state an audited action changed, as a new audited action."""
        entry = self.entry_view(undo_id)
        if entry is None:
            raise LookupError(undo_id)
        if entry.get("revertible") is False:
            raise RefusedError("not_revertible", f"a {entry['action']} cannot be undone")
        if entry.get("reverted_by"):
            by = entry["reverted_by"]
            raise RefusedError("already_reverted", f"{undo_id} was reverted by {by}")
        action, target, before = entry["action"], entry["target"], entry["before"]
        if action == "maintenance":
            answer = self.maintenance(
                caller, target, bool(before["enabled"]), str(before["message"] or "")
            )
        elif action == "payment_route":
            answer = self.payment_route(caller, before["primary"], list(before["fallback"]))
        elif action in ("rollback", "deploy"):
            releases = self.services.releases(target)
            if releases[-1] != entry["after"]["version"]:
                raise RefusedError(
                    "state_moved_on",
                    f"{target} runs {releases[-1]} now, not {entry['after']['version']}",
                )
            answer = self.deploy(caller, target, str(before["version"]))
        else:
            raise RefusedError("not_revertible", f"a {action} cannot be undone")
        if not caller.dry_run:
            self._mark_reverted(undo_id, str(answer["undo_id"]))
        return {**answer, "reverts": undo_id}

    def _mark_reverted(self, undo_id: str, by: str) -> None:
        # Append-only: a revert is its own entry; this marker entry says which it undid.
        marker = {
            "id": f"{undo_id}-reverted",
            "at": now_iso(),
            "at_ms": int(time.time() * 1000),
            "action": "reverted",
            "target": undo_id,
            "reverted_by": by,
        }
        with self.audit_path.open("a") as handle:
            handle.write(json.dumps(marker, sort_keys=True) + "\n")

    def audit_view(self, since_ms: int) -> list[dict[str, Any]]:
        entries = self.audit()
        reverted = {e["target"]: e["reverted_by"] for e in entries if e["action"] == "reverted"}
        return [
            {**e, "reverted_by": reverted.get(e["id"])}
            for e in entries
            if e["action"] != "reverted" and e.get("at_ms", 0) >= since_ms
        ]

    def entry_view(self, undo_id: str) -> dict[str, Any] | None:
        for entry in self.audit_view(0):
            if entry["id"] == undo_id:
                return entry
        return None


# ---------------------------------------------------------------- HTTP


def _since_ms(text: str | None) -> int:
    """`since=` as epoch milliseconds, epoch seconds or RFC 3339; `Invalid` otherwise."""
    if not text:
        return 0
    try:
        number = float(text)
        if not math.isfinite(number) or abs(number) > 1e15:
            raise Invalid("since", "an RFC 3339 time or epoch seconds/milliseconds")
    except ValueError:
        try:
            parsed = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
        except ValueError:
            raise Invalid("since", "an RFC 3339 time or epoch seconds/milliseconds") from None
        if parsed.tzinfo is None:
            parsed = parsed.replace(tzinfo=dt.UTC)
        return int(parsed.timestamp() * 1000)
    return int(number if number > 1e11 else number * 1000)


def create_app(control: Control, token: str | None = None) -> Starlette:  # noqa: PLR0915
    """The control API over `control`; with `token`, every call needs `Bearer token`."""

    def authorised(request: Request) -> bool:
        if token is None:
            return True
        given = request.headers.get("authorization", "").encode()
        return hmac.compare_digest(given, f"Bearer {token}".encode())

    def refusal(exc: RefusedError) -> JSONResponse:
        return kit.error(exc.status, exc.code, exc.message)

    async def body_of(request: Request) -> dict[str, Any]:
        return await kit.json_object(request)

    def service_of(request: Request) -> str:
        name = str(request.path_params["name"])
        running = [n for n in control.services.status() if n in MANAGED]
        if name not in running:
            raise RefusedError(
                "unknown_service", f"{name!r} is not one of {', '.join(running)}", status=404
            )
        return name

    def guarded(handler: Callable[[Request], Awaitable[Response]]) -> Any:
        async def route(request: Request) -> Response:
            if not authorised(request):
                return kit.error(401, "unauthorized", "send Authorization: Bearer <token>")
            try:
                return await handler(request)
            except RefusedError as exc:
                return refusal(exc)
            except Invalid as exc:
                return exc.response()

        return route

    async def index(_: Request) -> Response:
        return JSONResponse(
            {
                "api": "busline-control",
                "version": API_VERSION,
                "actions": [
                    "POST /control/v1/maintenance",
                    "POST /control/v1/payment-route",
                    "POST /control/v1/services/{name}/restart",
                    "POST /control/v1/services/{name}/rollback",
                    "POST /control/v1/services/{name}/deploy",
                    "GET /control/audit?since=",
                    "POST /control/audit/{id}/revert",
                ],
                "features": list(FEATURES),
                "services": list(MANAGED),
            }
        )

    async def state(_: Request) -> Response:
        return JSONResponse({**control.state(), "services": control.services.status()})

    async def maintenance(request: Request) -> Response:
        body = await body_of(request)
        caller = _caller(body)
        scope = kit.text_field(body, "scope", choices=FEATURES)
        enabled = body.get("enabled")
        if not isinstance(enabled, bool):
            raise Invalid("enabled", "must be true or false")
        message = kit.text_field(body, "message", required=False, max_len=300) or (
            "Busline is down for maintenance. Please try again shortly."
        )
        return JSONResponse(control.maintenance(caller, scope, enabled, message))

    async def payment_route(request: Request) -> Response:
        body = await body_of(request)
        caller = _caller(body)
        primary = kit.text_field(body, "primary", choices=kit.PROVIDERS)
        fallback = body.get("fallback", [])
        if not isinstance(fallback, list) or not all(
            isinstance(p, str) and p in kit.PROVIDERS for p in fallback
        ):
            raise Invalid("fallback", f"must be a list of {', '.join(kit.PROVIDERS)}")
        if primary in fallback or len(set(fallback)) != len(fallback):
            raise Invalid("fallback", "must not repeat a provider or the primary")
        return JSONResponse(control.payment_route(caller, primary, list(fallback)))

    async def restart(request: Request) -> Response:
        name = service_of(request)
        return JSONResponse(control.restart(_caller(await body_of(request)), name))

    async def rollback(request: Request) -> Response:
        name = service_of(request)
        return JSONResponse(control.rollback(_caller(await body_of(request)), name))

    async def deploy(request: Request) -> Response:
        name = service_of(request)
        body = await body_of(request)
        caller = _caller(body)
        version = kit.text_field(
            body,
            "version",
            max_len=40,
            check=lambda v: set(v) <= VERSION_CHARS,
            hint="letters, digits and . - + _ only",
        )
        return JSONResponse(control.deploy(caller, name, version))

    async def audit(request: Request) -> Response:
        since = _since_ms(request.query_params.get("since"))
        return JSONResponse({"entries": control.audit_view(since)})

    async def audit_entry(request: Request) -> Response:
        found = control.entry_view(str(request.path_params["id"]))
        if found is None:
            return kit.error(404, "unknown_undo_id", "no audit entry has this id", field="id")
        return JSONResponse(found)

    async def revert(request: Request) -> Response:
        caller = _caller(await body_of(request))
        undo_id = str(request.path_params["id"])
        try:
            return JSONResponse(control.revert(caller, undo_id))
        except LookupError:
            return kit.error(404, "unknown_undo_id", "no audit entry has this id", field="id")

    async def healthz(_: Request) -> Response:
        return JSONResponse({"status": "ok", "service": "supervisor", "version": kit.version()})

    routes = [
        Route("/healthz", healthz),
        Route("/control/v1", guarded(index)),
        Route("/control/v1/state", guarded(state)),
        Route("/control/v1/maintenance", guarded(maintenance), methods=["POST"]),
        Route("/control/v1/payment-route", guarded(payment_route), methods=["POST"]),
        Route("/control/v1/services/{name}/restart", guarded(restart), methods=["POST"]),
        Route("/control/v1/services/{name}/rollback", guarded(rollback), methods=["POST"]),
        Route("/control/v1/services/{name}/deploy", guarded(deploy), methods=["POST"]),
        Route("/control/audit", guarded(audit)),
        Route("/control/audit/{id}", guarded(audit_entry)),
        Route("/control/audit/{id}/revert", guarded(revert), methods=["POST"]),
    ]
    app = Starlette(routes=routes)
    kit.handles_invalid(app)
    return app
