"""The half of fault injection that runs inside each busline process.

`busline.faults` keeps the faults in force in `$BUSLINE_STATE/faults/active.json`; each
process's agent reads that file (a quarter-second poll) and applies the faults
aimed at it at the boundary their names say, from outside the business logic:

- the process itself: `crash-loop` exits it, `service-unavailable` closes its listening
  socket (and its keep-alive connections), `memory-leak` allocates and `cpu-hog` burns a
  thread;
- the database layer (`install_db`): `db-slow` sleeps around each statement (`pg_sleep` on
  PostgreSQL), `pool-exhaustion` checks pool connections out and holds them;
- the consumer loop (`gated`): `consumer-stuck` stops taking messages, `consumer-slow`
  waits before each;
- the HTTP edge of a service (`FaultGate`): `gateway-latency` and `auth-failures`;
- the providers simulator (`provider`, and one listening port per provider): down,
  slow, erroring, callbacks held;
- fleet's GPS feed (`stale_buses`), the job runner (`job_fails`), and the one fault that
  branches inside service code, a bad release's `release_bug`.

The agent never logs, prints or labels anything: what it does must be seen only through
its symptoms. Its own failures go to `$BUSLINE_STATE/faults/agent.log`, never to stdout.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import threading
import time
import traceback
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

from busline import kit

POLL_S = 0.25
#: A leak stops growing here unless the fault says less; the machine has no swap.
MEMORY_CAP_MB_DEFAULT = 300.0
#: A crash-looping process lives this long after its start before it exits.
CRASH_AFTER_S = 1.0

Fault = dict[str, Any]


def _note(text: str) -> None:
    """The agent's own trouble, to its own file (never to the service's output)."""
    with contextlib.suppress(OSError):
        path = kit.state_dir() / "faults" / "agent.log"
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a") as handle:
            handle.write(f"{time.time():.3f} pid={os.getpid()} {text}\n")


class Listener:
    """One listening socket of a uvicorn server, which can stop listening and start again
    on the same port (closing the asyncio server; then a new one on a new socket)."""

    def __init__(
        self, name: str, loop: asyncio.AbstractEventLoop, uvicorn_server: Any, index: int
    ) -> None:
        self.name = name
        self.loop = loop
        self.uvicorn_server = uvicorn_server
        self.index = index
        server = uvicorn_server.servers[index]
        host, port = server.sockets[0].getsockname()[:2]
        self.host = str(host)
        self.port = int(port)
        self.factory = server._protocol_factory  # asyncio keeps it nowhere else
        self.backlog = int(uvicorn_server.config.backlog)
        self.closed = False  # the state applied
        self._want = False  # the state asked for
        self._changing = asyncio.Lock()

    def set_closed(self, closed: bool) -> None:
        """Ask for the listening state `closed` (from the agent's thread)."""
        if closed != self._want:
            self._want = closed
            asyncio.run_coroutine_threadsafe(self._converge(), self.loop)

    async def _converge(self) -> None:
        """Reach the state last asked for, one change at a time; a change that fails (the
        port taken meanwhile, say) is noted and tried again a second later."""
        async with self._changing:
            while self.closed != self._want:
                want = self._want
                try:
                    await self._apply(want)
                except Exception:  # noqa: BLE001 - noted, and tried again
                    _note(f"listener {self.name}:{self.port}: {traceback.format_exc()}")
                    await asyncio.sleep(1.0)
                    continue
                self.closed = want

    async def _apply(self, closed: bool) -> None:
        servers = self.uvicorn_server.servers
        if closed:
            servers[self.index].close()
            # Keep-alive connections to this port would go on being served: drop them,
            # as a dead process's would be (a request in progress finishes first).
            for connection in list(self.uvicorn_server.server_state.connections):
                transport = getattr(connection, "transport", None)
                sockname = transport.get_extra_info("sockname") if transport else None
                if sockname and sockname[1] == self.port:
                    with contextlib.suppress(Exception):
                        connection.shutdown()
        else:
            sock = await asyncio.to_thread(kit.bind, self.host, self.port)
            servers[self.index] = await self.loop.create_server(
                self.factory, sock=sock, backlog=self.backlog
            )


class Agent:
    """The faults aimed at this process, and what applies them."""

    def __init__(self, service: str) -> None:
        self.service = service
        self.started = time.monotonic()
        self.faults: dict[str, list[Fault]] = {}
        self._mtime: tuple[int, int, int] | None = None
        self._rng = random.Random()  # noqa: S311 - fault dice, not secrets
        self._lock = threading.Lock()
        self._listeners: list[Listener] = []
        self._engines: list[Any] = []
        self._held: list[tuple[Any, Any]] = []  # (engine, checked-out connection)
        self._held_for: str | None = None
        self._filler: threading.Thread | None = None
        self._leak: list[bytearray] = []
        self._hog: threading.Thread | None = None
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------ reading the faults

    def start(self) -> None:
        self.refresh()
        self._thread = threading.Thread(target=self._run, name="busline-agent", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            try:
                self.refresh()
                self.apply()
            except Exception:  # noqa: BLE001 - the agent must never take its service down
                _note(traceback.format_exc())
            time.sleep(POLL_S)

    def refresh(self) -> None:
        from busline import faults

        path = faults.active_path()
        try:
            # Each write replaces the file (a new inode): two writes within one tick of a
            # coarse clock still differ.
            found = path.stat()
            mtime: tuple[int, int, int] | None = (found.st_ino, found.st_mtime_ns, found.st_size)
        except OSError:
            mtime = None
        now_ms = int(time.time() * 1000)
        if mtime == self._mtime and not any(
            f.get("end_ms") and f["end_ms"] <= now_ms for fs in self.faults.values() for f in fs
        ):
            return
        self._mtime = mtime
        mine: dict[str, list[Fault]] = {}
        for fault in faults.read_active(now_ms):
            kind = faults.KINDS.get(str(fault.get("kind")))
            if kind is not None and kind.process(str(fault.get("target"))) == self.service:
                mine.setdefault(kind.name, []).append(fault)
        with self._lock:
            self.faults = mine

    def active(self, kind: str, target: str | None = None) -> Fault | None:
        for fault in self.faults.get(kind, ()):
            if target is None or fault.get("target") == target:
                return fault
        return None

    @staticmethod
    def intensity(fault: Fault, default: float = 0.0) -> float:
        try:
            return float(fault.get("params", {}).get("intensity", default))
        except (TypeError, ValueError):
            return default

    # ------------------------------------------------------------ the process

    def apply(self) -> None:
        if self.active("crash-loop") and time.monotonic() - self.started >= CRASH_AFTER_S:
            os._exit(1)
        closed = self.active("service-unavailable") is not None
        for listener in self._listeners:
            down = closed or (
                self.service == "providers" and self.active("provider-down", listener.name)
            )
            listener.set_closed(bool(down))
        self._apply_leak()
        self._apply_hog()
        self._apply_pool()

    def _apply_leak(self) -> None:
        fault = self.active("memory-leak")
        if fault is None:
            self._leak.clear()
            return
        rate_mb_min = self.intensity(fault, 60.0)
        cap = float(fault.get("params", {}).get("cap_mb", MEMORY_CAP_MB_DEFAULT))
        minutes = max(0.0, time.time() * 1000 - float(fault.get("start_ms", 0))) / 60000.0
        want = int(min(cap, rate_mb_min * minutes))
        while len(self._leak) < want:
            # Written, not just reserved: the pages are really resident.
            self._leak.append(bytearray(b"\xa5") * (1 << 20))

    def _apply_hog(self) -> None:
        if self.active("cpu-hog") is None or (self._hog is not None and self._hog.is_alive()):
            return
        self._hog = threading.Thread(target=self._burn, name="worker-7", daemon=True)
        self._hog.start()

    def _burn(self) -> None:
        period = 0.1
        while True:
            fault = self.active("cpu-hog")
            if fault is None:
                return
            duty = min(1.0, max(0.0, self.intensity(fault, 90.0) / 100.0))
            end = time.perf_counter() + period * duty
            spins = 0
            while time.perf_counter() < end:
                spins += 1
            time.sleep(period * (1.0 - duty))

    # ------------------------------------------------------------ the database layer

    def install_db(self, engine: Any) -> None:
        """Put `db-slow` around each statement of `engine`, and let `pool-exhaustion`
        hold its connections. Registered after the SDK's hooks, so the wait is inside
        the statement's span."""
        import sqlalchemy as sa

        postgres = engine.dialect.name == "postgresql"

        def before(_conn: Any, cursor: Any, *_: Any) -> None:
            seconds = self.statement_wait()
            if seconds <= 0:
                return
            if postgres:
                cursor.execute("SELECT pg_sleep(%s)", (seconds,))
            else:
                time.sleep(seconds)

        sa.event.listen(engine, "before_cursor_execute", before)
        self._engines.append(engine)

    def statement_wait(self) -> float:
        """Seconds each statement waits (`db-slow`), 0 when none."""
        fault = self.active("db-slow")
        return 0.0 if fault is None else self.intensity(fault, 0.5)

    def _apply_pool(self) -> None:
        fault = self.active("pool-exhaustion")
        fault_id = None if fault is None else str(fault.get("id"))
        with self._lock:
            if fault_id != self._held_for:
                for _, connection in self._held:
                    with contextlib.suppress(Exception):
                        connection.close()
                self._held.clear()
                self._held_for = fault_id
        if fault is None or (self._filler is not None and self._filler.is_alive()):
            return
        # Taking a connection from a busy pool waits up to its timeout: not on this thread,
        # which has the other faults to apply.
        self._filler = threading.Thread(
            target=self._fill, args=(fault_id, self.intensity(fault, 1e9)), daemon=True
        )
        self._filler.start()

    def _fill(self, fault_id: str, most: float) -> None:
        for engine in self._engines:
            size = engine.pool.size() + max(0, getattr(engine.pool, "_max_overflow", 0))
            want = min(size, int(most))
            while True:
                with self._lock:
                    if self._held_for != fault_id:
                        return
                    held = sum(1 for owner, _ in self._held if owner is engine)
                if held >= want:
                    break
                try:
                    connection = engine.raw_connection()
                except Exception:  # noqa: BLE001 - the pool is busy: the next pass tries again
                    return
                with self._lock:
                    if self._held_for == fault_id:
                        self._held.append((engine, connection))
                        continue
                connection.close()  # the fault ended while we waited
                return

    # ------------------------------------------------------------ the consumer loop

    async def _before_message(self) -> None:
        """`consumer-stuck` holds each message while it lasts; `consumer-slow` waits
        before each."""
        while self.active("consumer-stuck") is not None:  # noqa: ASYNC110 - a file poll
            await asyncio.sleep(POLL_S)
        slow = self.active("consumer-slow")
        if slow is not None:
            await asyncio.sleep(self.intensity(slow, 5.0))

    # An error in the handler reports the lines around `await handler(...)` and the frame's
    # local variables: they name nothing but the handler and its message.

    def gated(
        self, handler: Callable[[Any, Any], Awaitable[None]]
    ) -> Callable[[Any, Any], Awaitable[None]]:
        """`handler`, after this process's own wait."""

        async def handle(body: Any, headers: Any) -> None:
            await self._before_message()
            await handler(body, headers)

        return handle

    # ------------------------------------------------------------ fleet, jobs, releases

    def stale_buses(self, bus_ids: Iterable[str]) -> set[str]:
        """The buses whose GPS feed `stale-gps` stops: the first k of a fixed shuffle."""
        fault = self.active("stale-gps")
        if fault is None:
            return set()
        ordered = sorted(bus_ids)
        random.Random(str(fault.get("id"))).shuffle(ordered)  # noqa: S311 - not secrets
        return set(ordered[: int(self.intensity(fault, 5.0))])

    def job_fails(self, job: str) -> bool:
        """Whether this run of `job` fails: once per `job-failure` fault."""
        fault = self.active("job-failure", job)
        if fault is None:
            return False
        marker = kit.state_dir() / "faults" / f"used-{fault.get('id')}"
        if marker.exists():
            return False
        with contextlib.suppress(OSError):
            marker.touch()
        return True

    def release_bug(self) -> bool:
        """Whether the code path a bad release broke fails this time (n % of calls, and
        only in the release the fault deployed)."""
        fault = self.active("buggy-release")
        if fault is None or fault.get("params", {}).get("version") != kit.version():
            return False
        return self._rng.random() < self.intensity(fault, 0.3)

    # ------------------------------------------------------------ the providers

    def provider(self, name: str) -> tuple[float, float, float]:
        """(latency factor, error rate, extra callback wait) for provider `name`."""
        slow = self.active("provider-slow", name)
        errors = self.active("provider-errors", name)
        held = self.active("callback-delay", name)
        return (
            1.0 if slow is None else self.intensity(slow, 10.0),
            0.0 if errors is None else self.intensity(errors, 0.5),
            0.0 if held is None else self.intensity(held, 60.0),
        )

    def add_listener(self, listener: Listener) -> None:
        self._listeners.append(listener)


class FaultGate:
    """ASGI middleware at a service's HTTP edge, around every request: `gateway-latency`
    delays every API call through the gateway; `auth-failures` refuses n % of session
    checks as an invalid token would be. The fault work happens in `_intercept`, whose
    frame is gone by the time the app runs: an error report of the app carries this
    frame's source lines and locals, and they must not name a fault."""

    def __init__(self, app: Any, agent: Agent) -> None:
        self.app = app
        self.agent = agent

    async def _intercept(self, scope: Any, receive: Any, send: Any) -> bool:
        """Apply the edge faults; True when the request was answered here."""
        path = str(scope.get("path", ""))
        slow = self.agent.active("gateway-latency")
        if slow is not None and path.startswith("/api/"):
            await asyncio.sleep(self.agent.intensity(slow, 1.0))
        failing = self.agent.active("auth-failures")
        if (
            failing is None
            or path != "/internal/sessions/current"
            or self.agent._rng.random() >= self.agent.intensity(failing, 0.5)
        ):
            return False
        self._name_route(scope)
        response = kit.error(
            401,
            "invalid_token",
            "send a valid session as Authorization: Bearer <token>",
            field="authorization",
            headers={"WWW-Authenticate": "Bearer"},
        )
        await response(scope, receive, send)
        return True

    def _name_route(self, scope: Any) -> None:
        """Set the matched route, as the router would, so the refusal is measured and
        traced under its route like a real one."""
        from starlette.routing import Match

        for route in getattr(self.app, "routes", ()):
            match, child = route.matches(scope)
            if match == Match.FULL:
                scope.update(child)
                scope["route"] = route
                return

    # The app runs from here: the lines around it stay plain.

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope.get("type") == "http" and await self._intercept(scope, receive, send):
            return
        await self.app(scope, receive, send)


_agent: Agent | None = None


def agent() -> Agent:
    """This process's agent (started by `kit.instrument`, or by the providers process)."""
    global _agent  # noqa: PLW0603 - one per process
    if _agent is None:
        _agent = Agent(os.environ.get("BUSLINE_SERVICE", "unknown"))
    return _agent


def start(service: str) -> Agent:
    global _agent  # noqa: PLW0603 - one per process
    if _agent is None or _agent.service != service:
        _agent = Agent(service)
        _agent.start()
    return _agent
