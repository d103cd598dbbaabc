"""`python -m busline load`: customers' journeys through the gateway, started as a Poisson
process at a rate (2 a second by default), with a pool of returning customers whose
sessions are kept.

Each journey kind has a weight (`KINDS`): most people only search, some look at a trip,
a few hold a seat and leave, some buy, and a few come back to look at their ticket. A buyer
pays through the platform's payment route (M-Pesa first) most of the time, or picks Airtel
Money or card (`PAYMENTS`). The rate is multiplied by the platform's current load factor
(`busline.faults.surge_factor`), re-read about once a second; nothing about it is printed.

stdout gets one JSON line per finished journey and a summary line at the end; stderr gets a
progress line refreshed every second when it is a terminal, and a summary at the end. At
most `--max-in-flight` journeys run at once: an arrival past that is shed and counted.
SIGINT or SIGTERM stops the arrivals, gives the journeys in flight `GRACE_S` seconds to
finish, cancels the rest, prints the summary and exits 0.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import random
import signal
import sys
from collections import Counter, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TextIO, TypeVar

import httpx

from busline import faults, kit
from busline.journeys import JOURNEYS, Customer, Journey, buy, new_customer

T = TypeVar("T")

#: Journey kinds and their weights: browse (search only), look (search, view a trip),
#: abandon (up to a held seat, never paid), buy (all the way), check (a returning customer
#: looks at a ticket; a `look` until somebody has bought one).
KINDS: tuple[tuple[str, float], ...] = (
    ("browse", 0.45),
    ("look", 0.25),
    ("abandon", 0.08),
    ("buy", 0.17),
    ("check", 0.05),
)
#: How buyers pay: None is the platform's payment route (M-Pesa first, and whatever the
#: operators route to); the others are customers choosing Airtel Money or a card.
PAYMENTS: tuple[tuple[str | None, float], ...] = ((None, 0.80), ("airtel", 0.15), ("card", 0.05))

DEFAULT_RATE = 2.0
MAX_RATE = 100.0
DEFAULT_MAX_IN_FLIGHT = 60
CUSTOMERS = 50
GRACE_S = 5.0
FACTOR_EVERY_S = 1.0
PROGRESS_EVERY_S = 1.0
RATE_WINDOW_S = 10.0
GATEWAY_WAIT_S = 60.0


def choose(rng: random.Random, weighted: Sequence[tuple[T, float]]) -> T:
    """One of the choices, drawn by weight."""
    return rng.choices([c for c, _ in weighted], weights=[w for _, w in weighted])[0]


class Arrivals:
    """When journeys start: a Poisson process at `base_rate` times the load factor, which
    is re-read every `every_s` seconds. Pure: the caller passes the time and waits."""

    def __init__(
        self,
        rng: random.Random,
        base_rate: float,
        read_factor: Callable[[], float],
        every_s: float = FACTOR_EVERY_S,
    ) -> None:
        self.rng = rng
        self.base_rate = base_rate
        self.read_factor = read_factor
        self.every_s = every_s
        self.factor = 1.0
        self.read_at = -math.inf

    def rate(self, now: float) -> float:
        """Journeys a second at `now`, reading the factor when the last read is stale."""
        if now - self.read_at >= self.every_s:
            self.read_at = now
            # A half-written file keeps the last factor until the next read.
            with contextlib.suppress(OSError, ValueError, TypeError, AttributeError):
                self.factor = max(0.0, float(self.read_factor()))
        return self.base_rate * self.factor

    def next(self, now: float) -> tuple[float, bool]:
        """(seconds to wait, whether a journey starts then). When the draw falls past the
        next read of the factor, the wait ends there with False and the caller asks again:
        arrivals are memoryless, so drawing afresh at the new rate is exact."""
        rate = self.rate(now)
        until_read = max(0.0, self.read_at + self.every_s - now)
        if rate <= 0:
            return until_read, False
        wait = self.rng.expovariate(rate)
        if wait > until_read:
            return until_read, False
        return wait, True


@dataclass
class Tally:
    """What the run has done so far."""

    started: int = 0
    shed: int = 0
    in_flight: int = 0
    by_kind: Counter[str] = field(default_factory=Counter)
    results: Counter[str] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)
    sessions: Counter[str] = field(default_factory=Counter)
    recent: deque[float] = field(default_factory=deque)  # finish times in the last window

    @property
    def finished(self) -> int:
        return sum(self.results.values())

    def record(self, journey: Journey, now: float) -> None:
        self.by_kind[journey.kind] += 1
        self.results[str(journey.result)] += 1
        if journey.error_kind:
            self.errors[journey.error_kind] += 1
        if journey.session:
            self.sessions[journey.session] += 1
        self.recent.append(now)
        self._forget(now)

    def _forget(self, now: float) -> None:
        while self.recent and self.recent[0] < now - RATE_WINDOW_S:
            self.recent.popleft()

    def per_second(self, now: float, elapsed: float) -> float:
        """Journeys finished a second, over the last `RATE_WINDOW_S` seconds."""
        self._forget(now)
        window = min(RATE_WINDOW_S, elapsed)
        return len(self.recent) / window if window > 0 else 0.0

    def progress_line(self, now: float, elapsed: float) -> str:
        results = " ".join(f"{k} {v}" for k, v in sorted(self.results.items())) or "none yet"
        errors = " ".join(f"{k} {v}" for k, v in sorted(self.errors.items())) or "none"
        return (
            f"[{elapsed:5.0f} s] {self.per_second(now, elapsed):4.1f} journeys/s, "
            f"{self.in_flight} in flight | {results} | shed {self.shed} | errors: {errors}"
        )

    def summary_line(self, elapsed: float) -> str:
        def listed(counter: Counter[str]) -> str:
            return ", ".join(f"{k} {v}" for k, v in sorted(counter.items())) or "none"

        rate = self.finished / elapsed if elapsed > 0 else 0.0
        return (
            f"busline load: {self.finished} journeys in {elapsed:.0f} s ({rate:.1f}/s); "
            f"kinds: {listed(self.by_kind)}; results: {listed(self.results)}; "
            f"shed {self.shed}; errors: {listed(self.errors)}; "
            f"logins {self.sessions['new']}, sessions reused {self.sessions['reused']}"
        )

    def summary(self, elapsed: float) -> dict[str, Any]:
        return {
            "event": "summary",
            "journeys": self.finished,
            "elapsed_s": round(elapsed, 3),
            "kinds": dict(sorted(self.by_kind.items())),
            "results": dict(sorted(self.results.items())),
            "errors": dict(sorted(self.errors.items())),
            "shed": self.shed,
            "sessions": dict(sorted(self.sessions.items())),
        }


class Progress:
    """The live line on a terminal: rewritten in place with `\\r`; nothing elsewhere."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        try:
            self.live = stream.isatty()
        except (OSError, ValueError):
            self.live = False
        self.width = 0

    def show(self, tally: Tally, now: float, elapsed: float) -> None:
        if not self.live:
            return
        line = tally.progress_line(now, elapsed)[:160]
        self.width = max(self.width, len(line))
        self.stream.write("\r" + line.ljust(self.width))
        self.stream.flush()

    def finish(self, tally: Tally, elapsed: float) -> None:
        """Clear the live line, then the summary (on a terminal or not)."""
        if self.live and self.width:
            self.stream.write("\r" + " " * self.width + "\r")
        self.stream.write(tally.summary_line(elapsed) + "\n")
        self.stream.flush()


@dataclass(frozen=True)
class Options:
    gateway: str | None
    rate: float = DEFAULT_RATE
    duration_s: float | None = None
    seed: int = 1
    max_in_flight: int = DEFAULT_MAX_IN_FLIGHT
    customers: int = CUSTOMERS


def journey_line(journey: Journey, duration_s: float) -> dict[str, Any]:
    """The JSON line of a finished journey: no customer's name, email, phone or session."""
    return {
        "event": "journey",
        "journey": journey.kind,
        "result": journey.result,
        "duration_s": round(duration_s, 3),
        "trace_id": journey.trace_id,
        "error": journey.error,
        "error_kind": journey.error_kind,
        "session": journey.session,
    }


class Runner:
    """One load run: arrivals, the journeys in flight, their lines and the tally."""

    def __init__(
        self,
        options: Options,
        out: TextIO,
        err: TextIO,
        read_factor: Callable[[], float] = faults.surge_factor,
    ) -> None:
        self.options = options
        self.out = out
        self.progress = Progress(err)
        self.rng = random.Random(options.seed)  # noqa: S311 - a reproducible load, not secrets
        self.customers = [new_customer(self.rng) for _ in range(options.customers)]
        self.arrivals = Arrivals(
            random.Random(self.rng.getrandbits(64)),  # noqa: S311 - not secrets
            options.rate,
            read_factor,
        )
        self.tally = Tally()
        self.stop = asyncio.Event()
        self.tasks: set[asyncio.Task[None]] = set()

    def emit(self, line: dict[str, Any]) -> None:
        try:
            self.out.write(json.dumps(line) + "\n")
            self.out.flush()
        except (BrokenPipeError, ValueError):  # nobody reads stdout any more
            self.stop.set()

    async def find_gateway(self) -> str | None:
        if self.options.gateway:
            return self.options.gateway
        loop = asyncio.get_running_loop()
        deadline = loop.time() + GATEWAY_WAIT_S
        while loop.time() < deadline and not self.stop.is_set():
            try:
                return kit.url_of("gateway")
            except kit.Unavailable:
                await self._pause(0.5)
        return None

    async def _pause(self, seconds: float) -> bool:
        """Sleep `seconds`; True when told to stop meanwhile."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.stop.wait(), timeout=max(0.0, seconds))
        return self.stop.is_set()

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        started = loop.time()
        gateway = await self.find_gateway()
        if gateway is None:
            if self.stop.is_set():
                return 0
            print("busline load: the gateway has not started", file=sys.stderr)
            return 1
        end = math.inf if self.options.duration_s is None else started + self.options.duration_s
        limits = httpx.Limits(
            max_connections=max(10, self.options.max_in_flight), max_keepalive_connections=20
        )
        async with httpx.AsyncClient(limits=limits) as http:
            ticker = asyncio.create_task(self._tick(started))
            while not self.stop.is_set():
                now = loop.time()
                if now >= end:
                    break
                wait, starts = self.arrivals.next(now)
                if await self._pause(min(wait, end - now)):
                    break
                if starts and loop.time() < end:
                    self.launch(gateway, http)
            ticker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await ticker
            await self.drain()
        elapsed = loop.time() - started
        self.emit(self.tally.summary(elapsed))
        self.progress.finish(self.tally, elapsed)
        return 0

    def launch(self, gateway: str, http: httpx.AsyncClient) -> None:
        """Start one journey, or shed it when `max_in_flight` are running."""
        kind = choose(self.rng, KINDS)
        customer = self.rng.choice(self.customers)
        journey_rng = random.Random(self.rng.getrandbits(64))  # noqa: S311 - not secrets
        provider = choose(self.rng, PAYMENTS)
        if len(self.tasks) >= self.options.max_in_flight:
            self.tally.shed += 1
            return
        if kind == "check":
            returning = [c for c in self.customers if c.bookings]
            if returning:
                customer = self.rng.choice(returning)
            else:
                kind = "look"
        task = asyncio.create_task(
            self.one(kind, customer, journey_rng, provider=provider, gateway=gateway, http=http)
        )
        self.tasks.add(task)
        self.tally.started += 1
        self.tally.in_flight = len(self.tasks)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        self.tasks.discard(task)
        self.tally.in_flight = len(self.tasks)

    async def one(
        self,
        kind: str,
        customer: Customer,
        rng: random.Random,
        *,
        provider: str | None,
        gateway: str,
        http: httpx.AsyncClient,
    ) -> None:
        loop = asyncio.get_running_loop()
        began = loop.time()
        try:
            if kind == "buy":
                journey = await buy(gateway, http, customer, rng, provider)
            else:
                journey = await JOURNEYS[kind](gateway, http, customer, rng)
        except asyncio.CancelledError:
            journey = Journey(kind=kind, result="cancelled")
            self.finish(journey, loop.time() - began)
            raise
        except Exception as exc:  # noqa: BLE001 - one journey's bug must not stop the load
            journey = Journey(kind=kind, result="failed", error=f"{type(exc).__name__}: {exc}")
            journey.error_kind = "internal"
        self.finish(journey, loop.time() - began)

    def finish(self, journey: Journey, duration_s: float) -> None:
        self.tally.record(journey, asyncio.get_running_loop().time())
        self.emit(journey_line(journey, duration_s))

    async def _tick(self, started: float) -> None:
        loop = asyncio.get_running_loop()
        while True:
            now = loop.time()
            self.progress.show(self.tally, now, now - started)
            await asyncio.sleep(PROGRESS_EVERY_S)

    async def drain(self) -> None:
        """Give the journeys in flight `GRACE_S` seconds, then cancel the rest."""
        if not self.tasks:
            return
        _, pending = await asyncio.wait(set(self.tasks), timeout=GRACE_S)
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.wait(pending, timeout=1.0)


# ---------------------------------------------------------------- the command line


def _rate(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0 < value <= MAX_RATE:
        raise argparse.ArgumentTypeError(
            f"'{text}' is not a rate in (0, {MAX_RATE:g}]. Expected journeys a second, such as 2."
        )
    return value


def _duration(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0 < value < math.inf:
        raise argparse.ArgumentTypeError(
            f"'{text}' is not a duration. Expected seconds greater than 0, such as 60."
        )
    return value


def _whole(what: str, low: int, high: int, example: int) -> Callable[[str], int]:
    """An argparse type: a whole number of `what` from `low` to `high`."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = low - 1
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(
                f"'{text}' is not a number of {what}. Expected a whole number from {low} to "
                f"{high}, such as {example}."
            )
        return value

    return parse


_in_flight = _whole("journeys", 1, 10_000, DEFAULT_MAX_IN_FLIGHT)
_customers = _whole("customers", 1, 100_000, CUSTOMERS)


def _gateway(text: str) -> str:
    if not text.startswith(("http://", "https://")):
        raise argparse.ArgumentTypeError(
            f"'{text}' is not a URL. Expected the gateway's, such as http://127.0.0.1:8080."
        )
    return text


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m busline load",
        description="Customers' journeys (browse, look, abandon, buy, check) through the "
        "gateway, as a Poisson process; one JSON line per finished journey on stdout.",
    )
    parser.add_argument(
        "--rate",
        type=_rate,
        default=DEFAULT_RATE,
        help=f"journeys a second, in (0, {MAX_RATE:g}] (default {DEFAULT_RATE:g})",
    )
    parser.add_argument(
        "--duration", type=_duration, help="seconds to run (default: until stopped)"
    )
    parser.add_argument("--seed", type=int, default=1, help="seed of every choice (default 1)")
    parser.add_argument(
        "--gateway", type=_gateway, help="gateway URL (default: from $BUSLINE_STATE)"
    )
    parser.add_argument(
        "--max-in-flight",
        type=_in_flight,
        default=DEFAULT_MAX_IN_FLIGHT,
        help="journeys running at once; arrivals past it are shed and counted "
        f"(default {DEFAULT_MAX_IN_FLIGHT})",
    )
    parser.add_argument(
        "--customers",
        type=_customers,
        default=CUSTOMERS,
        help=f"returning customers, each logging in once (default {CUSTOMERS})",
    )
    return parser


async def _main(options: Options) -> int:
    runner = Runner(options, sys.stdout, sys.stderr)
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, runner.stop.set)
    return await runner.run()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    options = Options(
        gateway=args.gateway,
        rate=args.rate,
        duration_s=args.duration,
        seed=args.seed,
        max_in_flight=args.max_in_flight,
        customers=args.customers,
    )
    try:
        return asyncio.run(_main(options))
    except KeyboardInterrupt:  # before the handlers were in place
        return 130
