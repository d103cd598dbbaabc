"""`lookout run`: the container log driver, end to end against a real server."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from lookout.run import Line, MultilineJoiner
from tests.server import conftest as server_fixtures
from tests.server.conftest import RunningServer, server, start_server

__all__ = ["server"]  # the fixture, shared with tests/server/
from tests.support import ROOT, free_port, wait_until


def _feed(lines: list[str]) -> list[str]:
    joiner = MultilineJoiner()
    out = []
    for text in lines:
        done = joiner.feed(Line(0, "stderr", text))
        if done is not None:
            out.append(done.text)
    last = joiner.flush()
    if last is not None:
        out.append(last.text)
    return out


def test_a_traceback_stays_one_record() -> None:
    records = _feed([
        "starting",
        "Traceback (most recent call last):",
        '  File "app.py", line 3, in <module>',
        "    charge()",
        "ConnectionRefusedError: [Errno 111] Connection refused",
        "next line",
    ])  # fmt: skip
    assert records == [
        "starting",
        'Traceback (most recent call last):\n  File "app.py", line 3, in <module>\n'
        "    charge()\nConnectionRefusedError: [Errno 111] Connection refused",
        "next line",
    ]


def test_indented_continuations_join_the_line_before() -> None:
    assert _feed(["java.lang.Error: x", "\tat Foo.bar(Foo.java:1)", "done"]) == [
        "java.lang.Error: x\n\tat Foo.bar(Foo.java:1)",
        "done",
    ]


def test_a_last_line_is_shipped_without_waiting_for_another() -> None:
    joiner = MultilineJoiner()
    assert joiner.feed(Line(0, "stdout", "only line")) is None
    assert joiner.flush_if_quiet() is None
    time.sleep(MultilineJoiner.QUIET_S * 1.5)
    done = joiner.flush_if_quiet()
    assert done is not None
    assert done.text == "only line"


CHILD = """
import json, signal, sys, time
print("plain line")
print("plain line")
print(json.dumps({"timestamp": "2026-11-27T10:00:00Z", "level": "warning", "event": "seat_hold_expired",
                  "trace_id": "ab" * 16, "span_id": "cd" * 8, "seat": 12}))
print("to stderr", file=sys.stderr)
sys.stdout.flush()
sys.exit(int(sys.argv[1]))
"""


def _run(
    url: str, *child_args: str, extra: tuple[str, ...] = ()
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "lookout", "run", "--url", url, "--service", "demo", *extra,
         "--", sys.executable, "-c", CHILD, *child_args],
        cwd=ROOT, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip


def _logs(server: RunningServer, **params: str) -> list[dict[str, object]]:
    answer = httpx.get(
        f"{server.url}/api/lookout/logs",
        params={"service": "demo", "start": "0", **params},
        timeout=10,
    )
    return list(answer.json()["logs"])


def test_lines_are_shipped_parsed_and_the_exit_code_is_the_childs(server: RunningServer) -> None:
    result = _run(server.url, "3")
    assert result.returncode == 3
    assert "plain line" in result.stdout, "lines are echoed"
    logs = wait_until(lambda: len(_logs(server)) == 4 and _logs(server), 10, "4 records")
    bodies = sorted(str(r["body"]) for r in logs)
    assert bodies == ["plain line", "plain line", "seat_hold_expired", "to stderr"], (
        "two identical lines are two records"
    )
    parsed = next(r for r in logs if r["body"] == "seat_hold_expired")
    assert parsed["level"] == "warning"
    assert parsed["trace_id"] == "ab" * 16
    assert parsed["span_id"] == "cd" * 8
    assert parsed["ts_ns"] == 1795773600000000000
    assert parsed["attributes"] == {"seat": 12, "stream": "stdout"}
    stderr = next(r for r in logs if r["body"] == "to stderr")
    assert stderr["level"] == "error"


def test_no_echo(server: RunningServer) -> None:
    result = _run(server.url, "0", extra=("--no-echo",))
    assert (result.returncode, result.stdout) == (0, "")


def test_a_child_killed_by_a_signal_exits_128_plus_n(server: RunningServer) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "lookout", "run", "--url", server.url, "--",
         sys.executable, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGKILL)"],
        cwd=ROOT, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 128 + signal.SIGKILL


def test_signals_are_forwarded_to_the_child(server: RunningServer, tmp_path: Path) -> None:
    marker = tmp_path / "ready"
    child = (
        "import signal, sys, time, pathlib\n"
        "def term(*_):\n    print('got SIGTERM', flush=True); sys.exit(0)\n"
        "signal.signal(signal.SIGTERM, term)\n"
        f"pathlib.Path({str(marker)!r}).touch()\n"
        "time.sleep(60)\n"
    )
    process = subprocess.Popen(
        [sys.executable, "-m", "lookout", "run", "--url", server.url, "--service", "demo", "--",
         sys.executable, "-c", child],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    wait_until(marker.exists, 20, "the child to start")
    process.send_signal(signal.SIGTERM)
    out, _ = process.communicate(timeout=30)
    assert process.returncode == 0
    assert b"got SIGTERM" in out
    wait_until(lambda: any(r["body"] == "got SIGTERM" for r in _logs(server)), 10, "the line")


def test_a_down_server_never_holds_up_the_child() -> None:
    """10,000 lines to a server that is not there: the child finishes at its own pace and
    lookout run gives up delivery within its flush deadline."""
    down = f"http://127.0.0.1:{free_port()}"
    begin = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "lookout", "run", "--url", down, "--no-echo", "--",
         sys.executable, "-c", "import sys\nfor i in range(10000): print(i)\nsys.exit(5)"],
        cwd=ROOT, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 5
    assert time.monotonic() - begin < 20
    assert "lines not delivered" in result.stderr


def test_lines_wait_for_a_server_that_comes_up_later(tmp_path: Path) -> None:
    port = free_port()
    child = (
        "import time\nfor i in range(20):\n    print(f'line {i}', flush=True); time.sleep(0.1)\n"
    )
    process = subprocess.Popen(
        [sys.executable, "-m", "lookout", "run", "--url", f"http://127.0.0.1:{port}",
         "--service", "late", "--no-echo", "--", sys.executable, "-c", child],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        env={**os.environ},
    )  # fmt: skip
    time.sleep(1.0)
    server = _server_on(tmp_path, port)
    try:
        process.wait(timeout=60)
        logs = wait_until(
            lambda: (r := httpx.get(f"{server.url}/api/lookout/logs",
                                    params={"service": "late", "start": "0", "limit": "100"},
                                    timeout=5).json()["logs"]) and len(r) == 20 and r,
            20, "all 20 lines",
        )  # fmt: skip
        assert sorted(str(r["body"]) for r in logs) == sorted(f"line {i}" for i in range(20))
    finally:
        server.stop()
        if process.stdout:
            process.stdout.close()
        if process.stderr:
            process.stderr.close()


def _server_on(tmp_path: Path, port: int) -> RunningServer:
    original = server_fixtures.free_port
    ports = iter([port, free_port()])
    server_fixtures.free_port = lambda: next(ports)  # type: ignore[assignment]
    try:
        return start_server(tmp_path / "data")
    finally:
        server_fixtures.free_port = original  # type: ignore[assignment]


def test_the_lines_endpoint_dedups_batches_and_rejects_bad_ones(server: RunningServer) -> None:
    batch = {"source": "s1", "seq": 0, "service": "demo",
             "lines": [{"ts_ns": time.time_ns(), "stream": "stdout", "text": "once"}]}  # fmt: skip
    url = f"{server.url}/api/lookout/lines"
    for _ in range(3):
        assert httpx.post(url, json=batch, timeout=5).status_code == 200
    assert [r["body"] for r in _logs(server)] == ["once"]
    cases = [
        (b"not json", 400, "malformed"),
        (json.dumps({"seq": 1, "lines": []}).encode(), 400, "malformed"),
        (json.dumps({**batch, "seq": 2, "lines": [{"text": "x" * (256 * 1024 + 1)}]}).encode(), 400, "line_too_long"),
    ]  # fmt: skip
    for body, status, code in cases:
        response = httpx.post(url, content=body, timeout=5)
        assert response.status_code == status
        assert response.json()["error"]["code"] == code


def test_exit_grace_bounds_delivery_after_the_child_exits() -> None:
    """With the server down, `--exit-grace 0.5` gives up half a second after the child
    exits; the default keeps trying for 5 s (the control: it takes longer)."""
    down = f"http://127.0.0.1:{free_port()}"

    def took(*grace: str) -> float:
        begin = time.monotonic()
        result = subprocess.run(
            [sys.executable, "-m", "lookout", "run", "--url", down, "--no-echo", *grace, "--",
             sys.executable, "-c", "print('one line')"],
            cwd=ROOT, capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        assert result.returncode == 0
        assert "1 lines not delivered" in result.stderr
        return time.monotonic() - begin

    short, default = took("--exit-grace", "0.5"), took()
    assert short < default - 2.5, (short, default)
    bad = subprocess.run(
        [sys.executable, "-m", "lookout", "run", "--exit-grace", "-1", "--", "true"],
        cwd=ROOT, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert bad.returncode == 2
    assert "--exit-grace" in bad.stderr


def test_usage_error_without_a_command() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "lookout", "run"], cwd=ROOT, capture_output=True, text=True,
        timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 2
    assert "Traceback" not in result.stderr


def test_scrape_auto_registers_the_sdks_metrics_endpoint(server: RunningServer) -> None:
    """The SDK reports its metrics address at start; `--scrape auto` makes it a target."""
    child = (
        "import time, lookout.sdk\n"
        "lookout.sdk.init('fleet-sim', traces_exporter='none')\n"
        "lookout.sdk.gauge('active_buses', 'Buses.').set(7)\n"
        "time.sleep(30)\n"
    )
    process = subprocess.Popen(
        [sys.executable, "-m", "lookout", "run", "--url", server.url, "--service", "fleet-sim",
         "--scrape", "auto", "--no-echo", "--", sys.executable, "-c", child],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:

        def gauge() -> list[dict[str, object]]:
            return list(httpx.get(f"{server.url}/api/lookout/series",
                                  params={"match": 'active_buses{job="fleet-sim"}'}, timeout=5).json()["series"])  # fmt: skip

        (series,) = wait_until(gauge, 20, "the child's gauge, scraped")
        samples = series["samples"]
        assert isinstance(samples, list)
        assert samples[-1]["value"] == 7.0
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=30)


_CUSTOM_PATH_CHILD = """
import http.server, sys
class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        found = self.path == "/internal/prom"
        self.send_response(200 if found else 404)
        self.send_header("Content-Type", "text/plain; version=0.0.4")
        self.end_headers()
        self.wfile.write(b"seats_left 41\\n" if found else b"")
    def log_message(self, *args):
        pass
http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), Handler).serve_forever()
"""


def test_scrape_url_keeps_the_urls_path(server: RunningServer) -> None:
    """`--scrape URL` scrapes that URL, not host:port/metrics."""
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "lookout", "run", "--url", server.url, "--service", "seatmap",
         "--scrape", f"http://127.0.0.1:{port}/internal/prom", "--no-echo", "--",
         sys.executable, "-c", _CUSTOM_PATH_CHILD, str(port)],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:

        def seats() -> list[dict[str, object]]:
            return list(httpx.get(f"{server.url}/api/lookout/series",
                                  params={"match": 'seats_left{job="seatmap"}'}, timeout=5).json()["series"])  # fmt: skip

        (series,) = wait_until(seats, 30, "the gauge scraped from the URL's own path")
        samples = series["samples"]
        assert isinstance(samples, list)
        assert samples[-1]["value"] == 41.0
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=30)


def test_a_scrape_value_that_is_not_a_url_is_a_usage_error() -> None:
    for value in ("/etc/prometheus.yml", "ftp://host:21/metrics", "http://"):
        result = subprocess.run(
            [sys.executable, "-m", "lookout", "run", "--scrape", value, "--", "true"],
            cwd=ROOT, capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        assert result.returncode == 2, value
        assert "--scrape" in result.stderr, result.stderr
        assert "Traceback" not in result.stderr
