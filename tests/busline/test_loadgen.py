"""The load generator: weighted journey kinds, Poisson arrivals multiplied by the load
factor, sessions kept across journeys, JSON lines on stdout, progress only on a terminal,
clear flag errors, shedding, a graceful stop, and a short real run against real services."""

from __future__ import annotations

import asyncio
import io
import itertools
import json
import os
import pty
import random
import select
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest

from busline import faults, journeys, loadgen
from tests.busline.conftest import Platform
from tests.support import ROOT, free_port

FAST_PROVIDERS = {
    "BUSLINE_PROVIDERS_LATENCY_SCALE": "0.05",
    "BUSLINE_CALLBACK_DELAY_S": "0.3,0.5",
    "BUSLINE_DECLINE_RATE": "0",
}
LINE_KEYS = {
    "event",
    "journey",
    "result",
    "duration_s",
    "trace_id",
    "error",
    "error_kind",
    "session",
}
ENV = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "PYTHONUNBUFFERED": "1"}


def journey_lines(stdout: str) -> list[dict[str, Any]]:
    lines = [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]
    return [line for line in lines if line.get("event") == "journey"]


def summary_of(stdout: str) -> dict[str, Any]:
    [summary] = [
        json.loads(line) for line in stdout.splitlines() if line.startswith('{"event": "summary"')
    ]
    return summary


# ---------------------------------------------------------------- pure parts


def test_journey_kinds_and_payments_follow_their_weights() -> None:
    """20,000 seeded draws land within one point of each kind's and provider's weight."""
    rng = random.Random(11)
    draws = 20_000
    kinds = Counter(loadgen.choose(rng, loadgen.KINDS) for _ in range(draws))
    payments = Counter(loadgen.choose(rng, loadgen.PAYMENTS) for _ in range(draws))
    assert {k: abs(kinds[k] / draws - w) < 0.01 for k, w in loadgen.KINDS} == {
        k: True for k, _ in loadgen.KINDS
    }
    assert {p: abs(payments[p] / draws - w) < 0.01 for p, w in loadgen.PAYMENTS} == {
        p: True for p, _ in loadgen.PAYMENTS
    }
    assert kinds.most_common(1)[0][0] == "browse"
    assert payments.most_common(1)[0][0] is None  # the platform's route: M-Pesa first


def simulate(arrivals: loadgen.Arrivals, seconds: float) -> list[float]:
    """Start times over `seconds` of virtual time, as the runner waits them."""
    now, starts = 0.0, []
    while now < seconds:
        wait, start = arrivals.next(now)
        now += wait
        if start:
            starts.append(now)
    return starts


def test_arrivals_are_poisson_with_mean_gap_one_over_the_rate() -> None:
    """At 2 a second the gaps average 0.5 s and vary as an exponential's do (sd ≈ mean)."""
    arrivals = loadgen.Arrivals(random.Random(5), 2.0, lambda: 1.0)
    starts = simulate(arrivals, 2000.0)
    gaps = [b - a for a, b in itertools.pairwise(starts)]
    assert abs(statistics.fmean(gaps) - 0.5) < 0.025
    assert abs(statistics.stdev(gaps) / statistics.fmean(gaps) - 1.0) < 0.05


def test_the_load_factor_multiplies_the_rate(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An active traffic-surge of intensity 3 in $BUSLINE_STATE makes 2 a second into 6;
    its end is seen at the next read, about a second later."""
    monkeypatch.setenv("BUSLINE_STATE", str(tmp_path))
    fault = {
        "id": "f1",
        "kind": "traffic-surge",
        "target": "gateway",
        "params": {"intensity": 3.0},
        "start_ms": int(time.time() * 1000),
        "end_ms": None,
    }
    faults.active_path().write_text(json.dumps({"faults": [fault]}))
    arrivals = loadgen.Arrivals(random.Random(8), 2.0, faults.surge_factor)
    assert arrivals.rate(0.0) == 6.0
    starts = simulate(arrivals, 300.0)
    assert abs(len(starts) / 300.0 - 6.0) < 0.4
    assert arrivals.rate(1000.0) == 6.0  # a fresh read
    faults.active_path().write_text(json.dumps({"faults": []}))
    assert arrivals.rate(1000.5) == 6.0  # read at 1000.0: not stale yet
    assert arrivals.rate(1001.0) == 2.0


def test_the_load_factor_is_read_about_once_a_second() -> None:
    """Over 10 s of virtual time at 50 a second, the factor is read 10 times, not 500."""
    reads = []

    def factor() -> float:
        reads.append(1)
        return 1.0

    starts = simulate(loadgen.Arrivals(random.Random(2), 50.0, factor), 10.0)
    assert len(starts) > 400
    assert len(reads) in (10, 11)


class FakeTTY(io.StringIO):
    def __init__(self, tty: bool) -> None:
        super().__init__()
        self.tty = tty

    def isatty(self) -> bool:
        return self.tty


def sample_tally() -> loadgen.Tally:
    tally = loadgen.Tally()
    tally.record(journeys.Journey(kind="browse", result="ok"), 1.0)
    tally.record(
        journeys.Journey(kind="buy", result="failed", error="pay: 502", error_kind="http_5xx"),
        1.5,
    )
    return tally


def test_progress_is_a_line_rewritten_in_place_on_a_terminal() -> None:
    """On a TTY each second's line starts with \\r and counts results and errors by kind;
    the end clears it and prints the summary."""
    stream = FakeTTY(tty=True)
    progress = loadgen.Progress(stream)
    tally = sample_tally()
    progress.show(tally, 2.0, 2.0)
    progress.show(tally, 3.0, 3.0)
    shown = stream.getvalue()
    assert shown.count("\r") == 2
    assert "\n" not in shown
    first = shown.split("\r")[1].rstrip()
    assert (
        first
        == "[    2 s]  1.0 journeys/s, 0 in flight | failed 1 ok 1 | shed 0 | errors: http_5xx 1"
    )
    progress.finish(tally, 3.0)
    assert stream.getvalue().endswith(tally.summary_line(3.0) + "\n")


def test_no_progress_line_when_stderr_is_not_a_terminal() -> None:
    """Not a TTY: nothing while running, only the summary line at the end."""
    stream = FakeTTY(tty=False)
    progress = loadgen.Progress(stream)
    tally = sample_tally()
    progress.show(tally, 2.0, 2.0)
    assert stream.getvalue() == ""
    progress.finish(tally, 3.0)
    assert stream.getvalue() == tally.summary_line(3.0) + "\n"
    assert stream.getvalue() == (
        "busline load: 2 journeys in 3 s (0.7/s); kinds: browse 1, buy 1; "
        "results: failed 1, ok 1; shed 0; errors: http_5xx 1; logins 0, sessions reused 0\n"
    )


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--rate", "0"], "argument --rate: '0' is not a rate in (0, 100]"),
        (["--rate", "101"], "argument --rate: '101' is not a rate in (0, 100]"),
        (["--rate", "fast"], "argument --rate: 'fast' is not a rate in (0, 100]"),
        (["--duration", "-1"], "argument --duration: '-1' is not a duration"),
        (["--max-in-flight", "0"], "argument --max-in-flight: '0' is not a number of journeys"),
        (["--gateway", "localhost:80"], "argument --gateway: 'localhost:80' is not a URL"),
    ],
)
def test_bad_flags_are_usage_errors_naming_the_flag(
    flags: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """Exit 2 with argparse's usage line and a message naming the flag and value."""
    with pytest.raises(SystemExit) as exited:
        loadgen.main(flags)
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert message in err
    assert "Traceback" not in err


# ---------------------------------------------------------------- a slow stand-in gateway


class SlowGateway:
    """A real HTTP server answering every request after `delay_s` (or at release)."""

    def __init__(self, delay_s: float) -> None:
        release = self.release = threading.Event()

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                release.wait(delay_s)
                body = json.dumps({"trips": []}).encode()
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *_: Any) -> None:
                return

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True).start()

    def close(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def slow_gateway() -> Iterator[SlowGateway]:
    gateway = SlowGateway(delay_s=30.0)
    try:
        yield gateway
    finally:
        gateway.close()


def test_arrivals_past_max_in_flight_are_shed_and_counted(slow_gateway: SlowGateway) -> None:
    """With 2 journeys allowed and every request hanging, the other arrivals are shed:
    counted in the summary, never started; the two in flight are cancelled at the end."""
    out, err = io.StringIO(), io.StringIO()
    options = loadgen.Options(
        gateway=slow_gateway.url, rate=40.0, duration_s=1.0, seed=4, max_in_flight=2
    )
    runner = loadgen.Runner(options, out, err, read_factor=lambda: 1.0)
    loadgen_grace = loadgen.GRACE_S
    loadgen.GRACE_S = 0.2
    try:
        assert asyncio.run(runner.run()) == 0
    finally:
        loadgen.GRACE_S = loadgen_grace
    summary = summary_of(out.getvalue())
    assert runner.tally.started == 2
    assert summary["shed"] > 10
    assert summary["results"] == {"cancelled": 2}
    assert [line["result"] for line in journey_lines(out.getvalue())] == ["cancelled"] * 2


def test_sigterm_stops_within_the_grace_period_with_a_summary(slow_gateway: SlowGateway) -> None:
    """SIGTERM with journeys hanging: arrivals stop, the journeys in flight are cancelled
    after GRACE_S, the summary is printed and the exit status is 0, all within ~5 s."""
    process = subprocess.Popen(
        [sys.executable, "-m", "busline", "load", "--rate", "5", "--gateway", slow_gateway.url],
        cwd=ROOT,
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    time.sleep(1.5)  # let journeys start: the point is to stop while they hang
    signalled = time.monotonic()
    process.send_signal(signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=15)
    took = time.monotonic() - signalled
    assert process.returncode == 0, stderr
    assert took < loadgen.GRACE_S + 2.5
    lines = journey_lines(stdout)
    assert lines
    assert {line["result"] for line in lines} == {"cancelled"}
    assert summary_of(stdout)["journeys"] == len(lines)
    assert "Traceback" not in stderr
    assert stderr.startswith("busline load: ")


def test_progress_on_a_real_terminal_counts_connection_errors() -> None:
    """Under a pty, stderr gets \\r-refreshed progress lines naming connection errors (the
    gateway's port is closed), then the summary; stdout stays JSON."""
    closed = f"http://127.0.0.1:{free_port()}"
    leader, follower = pty.openpty()
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "busline",
            "load",
            "--rate",
            "10",
            "--duration",
            "2.5",
            "--gateway",
            closed,
        ],
        cwd=ROOT,
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=follower,
        text=True,
    )
    os.close(follower)
    seen = b""
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        ready, _, _ = select.select([leader], [], [], 0.5)
        if ready:
            try:
                chunk = os.read(leader, 4096)
            except OSError:  # the child closed the terminal
                break
            if not chunk:
                break
            seen += chunk
        elif process.poll() is not None:
            break
    os.close(leader)
    stdout, _ = process.communicate(timeout=10)
    assert process.returncode == 0
    terminal = seen.decode()
    progress = [part for part in terminal.split("\r") if part.startswith("[")]
    assert len(progress) >= 2
    assert "errors: connection" in progress[-1]
    assert "busline load: " in terminal
    lines = journey_lines(stdout)
    assert lines
    assert {line["error_kind"] for line in lines} == {"connection"}


class SessionGateway:
    """A real HTTP server where session `old` has ended and a login gives `fresh`."""

    def __init__(self) -> None:
        class Handler(BaseHTTPRequestHandler):
            def _answer(self, status: int, body: dict[str, Any]) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                self.send_header("x-trace-id", "ab" * 16)
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:
                if self.headers.get("authorization") != "Bearer fresh":
                    self._answer(401, {"error": "unauthorized"})
                else:
                    self._answer(200, {"booking_id": "b1", "status": "confirmed"})

            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("content-length") or 0))
                self._answer(200, {"token": "fresh"})

            def log_message(self, *_: Any) -> None:
                return

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_an_ended_session_is_renewed_once() -> None:
    """A returning customer whose session has ended (401) logs in again and goes on."""
    gateway = SessionGateway()
    customer = journeys.new_customer(random.Random(3))
    customer.token, customer.bookings = "old", ["b1"]

    async def go() -> journeys.Journey:
        async with httpx.AsyncClient() as http:
            return await journeys.check(gateway.url, http, customer, random.Random(1))

    try:
        journey = asyncio.run(go())
    finally:
        gateway.close()
    assert (journey.result, journey.error, journey.session) == ("ok", None, "new")
    assert [(name, status) for name, status, _ in journey.steps] == [
        ("booking", 401),
        ("login", 200),
        ("booking", 200),
        ("ticket", 200),
    ]
    assert customer.token == "fresh"


# ---------------------------------------------------------------- against real services


@pytest.fixture(scope="module")
def services(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Platform]:
    """The services a journey passes through (no notifier), once for this module."""
    platform = Platform(tmp_path_factory.mktemp("loadgen") / "state", FAST_PROVIDERS)
    try:
        for name in ("providers", "auth", "fleet", "payments", "ticketing", "gateway"):
            platform.start(name)
        yield platform
    finally:
        platform.stop_all()


def test_a_customer_logs_in_once_across_journeys(services: Platform) -> None:
    """One customer abandons, buys, checks their ticket and abandons again: one login (and
    one register) in all, the later journeys reuse the session."""

    async def go() -> list[journeys.Journey]:
        rng = random.Random(21)
        customer = journeys.new_customer(rng)
        done = []
        async with httpx.AsyncClient() as http:
            for kind in ("abandon", "buy", "check", "abandon"):
                fn = journeys.JOURNEYS[kind]
                done.append(await fn(services.url("gateway"), http, customer, rng))
        return done

    done = asyncio.run(go())
    assert [(j.kind, j.result, j.error) for j in done] == [
        ("abandon", "abandoned", None),
        ("buy", "success", None),
        ("check", "ok", None),
        ("abandon", "abandoned", None),
    ]
    assert [j.session for j in done] == ["new", "reused", "reused", "reused"]
    steps = [name for j in done for name, _, _ in j.steps]
    assert Counter(steps)["login"] == 2  # the first, refused (401), then after register
    assert Counter(steps)["register"] == 1
    assert all(j.trace_id for j in done)


def test_a_short_real_run_prints_journey_lines(services: Platform) -> None:
    """`python -m busline load --rate 4 --duration 6 --seed 3` against real services:
    exit 0, one JSON line per journey of several kinds, sessions reused, no traceback, no
    progress line (stderr is a pipe), and a summary that adds up."""
    process = subprocess.run(
        [
            sys.executable,
            "-m",
            "busline",
            "load",
            "--rate",
            "4",
            "--duration",
            "6",
            "--seed",
            "3",
            "--customers",
            "4",
        ],
        cwd=ROOT,
        env={**services.env, "BUSLINE_STATE": str(services.state)},
        capture_output=True,
        text=True,
        timeout=40,
        check=False,
    )
    assert process.returncode == 0, process.stderr
    assert "Traceback" not in process.stdout + process.stderr
    lines = journey_lines(process.stdout)
    assert len(lines) >= 8
    assert all(set(line) == LINE_KEYS for line in lines)
    assert len({line["journey"] for line in lines}) >= 3
    assert {line["session"] for line in lines} >= {"new", "reused"}
    finished = [line for line in lines if line["result"] != "cancelled"]
    assert [line for line in finished if line["result"] == "failed"] == []
    assert all(line["trace_id"] for line in finished)
    summary = summary_of(process.stdout)
    assert summary["journeys"] == len(lines)
    assert summary["shed"] == 0
    assert "\r" not in process.stderr
    assert process.stderr.startswith("busline load: ")
    assert "surge" not in (process.stdout + process.stderr).lower()
