"""kill -9 trials against a real `lookout server`, shared by bench/crash.py and
tests/server/test_crash.py.

One trial: SENDERS threads post OTLP/JSON log requests, every record of a request carrying
the request's unique marker. Once at least MIN_ACKED records are acknowledged, after a
random delay, at a moment with at least MIN_IN_FLIGHT requests in flight, the server gets
SIGKILL. It restarts on the same data directory and the trial's records are counted per
marker through the read API. Two properties must hold:

- every acknowledged marker has all its records (nothing acknowledged is lost);
- every marker has all its records or none (no request half-stored, none stored twice).

The restarted server carries the next trial's load, so each trial also survives the
recoveries of all the trials after it; `count_markers` checks them all once more at the
end, through a read-only DuckDB connection to the stopped store.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import httpx

SENDERS = 12
MIN_IN_FLIGHT = 8
MIN_ACKED = 1_000
MAX_DELAY_S = 1.0
MARKER = "crash.marker"
DAY_NS = 86_400 * 10**9


class Server(Protocol):
    url: str
    process: subprocess.Popen[bytes]

    def stop(self) -> int: ...


Start = Callable[[Path, dict[str, str]], Server]


@dataclass
class Sent:
    marker: str
    records: int
    acked: bool = False


@dataclass
class Trial:
    """What one trial sent, what was acknowledged, and what the restarted store held."""

    number: int
    seed: int
    sent: list[Sent] = field(default_factory=list)
    in_flight_at_kill: int = 0
    lost: list[str] = field(default_factory=list)  # acknowledged, records missing
    partial: list[str] = field(default_factory=list)  # some records, not all (or extra)
    seconds: float = 0.0

    @property
    def service(self) -> str:
        return f"crash-{self.seed}"

    @property
    def acked(self) -> list[Sent]:
        return [s for s in self.sent if s.acked]

    @property
    def acked_records(self) -> int:
        return sum(s.records for s in self.acked)

    @property
    def ok(self) -> bool:
        return not self.lost and not self.partial

    def summary(self) -> str:
        return (
            f"trial {self.number} (seed {self.seed}): {len(self.sent)} requests, "
            f"{len(self.acked)} acknowledged ({self.acked_records} records), "
            f"{self.in_flight_at_kill} in flight at the kill; lost {len(self.lost)}, "
            f"partial {len(self.partial)}"
        )


def request_body(service: str, marker: str, records: int, old: bool) -> bytes:
    """One OTLP/JSON logs request; with `old`, half its records fall two days back (so one
    request spans two day partitions)."""
    now = time.time_ns()
    rows = [
        {"timeUnixNano": str(now - (DAY_NS * 2 if old and i % 2 else 0) + i),
         "severityNumber": 9, "body": {"stringValue": f"{marker} record {i}"},
         "attributes": [{"key": MARKER, "value": {"stringValue": marker}},
                        {"key": "crash.index", "value": {"intValue": str(i)}}]}
        for i in range(records)
    ]  # fmt: skip
    return json.dumps({"resourceLogs": [{
        "resource": {"attributes": [{"key": "service.name", "value": {"stringValue": service}}]},
        "scopeLogs": [{"logRecords": rows}]}]}).encode()  # fmt: skip


class Load:
    """SENDERS threads posting marked requests until told to stop."""

    def __init__(self, url: str, trial: Trial) -> None:
        self.url = url
        self.trial = trial
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.in_flight = 0
        self.acked_records = 0
        self.threads = [
            threading.Thread(target=self._send, args=(k,), daemon=True) for k in range(SENDERS)
        ]

    def start(self) -> None:
        for thread in self.threads:
            thread.start()

    def stop(self) -> None:
        self.stopping.set()
        for thread in self.threads:
            thread.join(30)

    def _send(self, sender: int) -> None:
        rng = random.Random(self.trial.seed * 1000 + sender)
        headers = {"content-type": "application/json"}
        with httpx.Client(timeout=30) as client:
            number = 0
            while not self.stopping.is_set():
                sent = Sent(f"{self.trial.seed}-{sender}-{number}", rng.randint(20, 80))
                number += 1
                old = rng.random() < 0.3
                body = request_body(self.trial.service, sent.marker, sent.records, old)
                with self.lock:
                    self.trial.sent.append(sent)
                    self.in_flight += 1
                try:
                    answer = client.post(f"{self.url}/v1/logs", content=body, headers=headers)
                    ok = answer.status_code == 200 and not answer.json().get("partialSuccess")
                except (httpx.HTTPError, ValueError):
                    ok = False
                with self.lock:
                    self.in_flight -= 1
                    if ok:
                        sent.acked = True
                        self.acked_records += sent.records
                if not ok and not self.stopping.is_set():
                    time.sleep(0.01)  # the server is gone: the trial is ending


def _wait(predicate: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {timeout_s}s waiting for {what}")
        time.sleep(0.0005)


def load_and_kill(server: Server, trial: Trial) -> None:
    """Load the server, then SIGKILL it at a random moment with requests in flight."""
    rng = random.Random(trial.seed)
    load = Load(server.url, trial)
    load.start()
    try:
        _wait(lambda: load.acked_records >= MIN_ACKED, 60, f"{MIN_ACKED} acknowledged records")
        time.sleep(rng.uniform(0, MAX_DELAY_S))
        _wait(lambda: load.in_flight >= MIN_IN_FLIGHT, 30, f"{MIN_IN_FLIGHT} requests in flight")
        with load.lock:  # no answer is counted while the kill lands
            trial.in_flight_at_kill = load.in_flight
            server.process.send_signal(signal.SIGKILL)
            server.process.wait(30)
    finally:
        load.stop()
        if server.process.poll() is None:
            server.process.kill()
        server.stop()  # reaps the process and its output pipe


def stored_markers(url: str, service: str) -> collections.Counter[str]:
    """Records per marker of one trial, counted through the read API."""
    counts: collections.Counter[str] = collections.Counter()
    now_s = time.time()
    params: dict[str, Any] = {
        "service": service, "start": str(int(now_s - 4 * 86400)), "end": str(int(now_s + 3600)),
        "limit": "1000",
    }  # fmt: skip
    with httpx.Client(timeout=60) as client:
        while True:
            page = client.get(f"{url}/api/lookout/logs", params=params)
            page.raise_for_status()
            found = page.json()
            counts.update(str(r["attributes"].get(MARKER)) for r in found["logs"])
            if not found["next_cursor"]:
                return counts
            params["cursor"] = found["next_cursor"]


def judge(trial: Trial, counts: collections.Counter[str]) -> None:
    """Fill in the trial's lost and partial markers from what the store holds."""
    for sent in trial.sent:
        held = counts.get(sent.marker, 0)
        if sent.acked and held < sent.records:
            trial.lost.append(sent.marker)
        if held not in (0, sent.records):
            trial.partial.append(sent.marker)
    known = {s.marker for s in trial.sent}
    trial.partial.extend(m for m in counts if m not in known)


def run_trials(
    data_dir: Path,
    trials: int,
    base_seed: int,
    start: Start,
    *,
    env: dict[str, str] | None = None,
    progress: Callable[[Trial], None] | None = None,
    stop_at_first_violation: bool = False,
) -> list[Trial]:
    """Run `trials` kill -9 trials on one data directory; the store is stopped after."""
    env = env or {}
    done: list[Trial] = []
    server = start(data_dir, env)
    try:
        for number in range(trials):
            began = time.monotonic()
            trial = Trial(number, base_seed + number)
            load_and_kill(server, trial)
            server = start(data_dir, env)  # the restart: replay, recovery, compaction
            judge(trial, stored_markers(server.url, trial.service))
            trial.seconds = time.monotonic() - began
            done.append(trial)
            if progress is not None:
                progress(trial)
            if stop_at_first_violation and not trial.ok:
                break
    finally:
        server.stop()
    return done


def count_markers(data_dir: Path) -> collections.Counter[str]:
    """Records per marker over the whole stopped store, read-only."""
    import duckdb

    connection = duckdb.connect(str(data_dir / "lookout.duckdb"), read_only=True)
    try:
        rows = connection.execute(
            "SELECT json_extract_string(attributes, ?), count(*) FROM logs "
            "WHERE service LIKE 'crash-%' GROUP BY 1",
            [f'$."{MARKER}"'],
        ).fetchall()
    finally:
        connection.close()
    return collections.Counter({str(marker): int(count) for marker, count in rows})


def rejudge(trials: list[Trial], counts: collections.Counter[str]) -> list[str]:
    """Check every trial again against the final store; the violations, each with its seed."""
    violations = []
    for trial in trials:
        again = dataclasses.replace(trial, lost=[], partial=[])
        judge(again, collections.Counter({m: c for m, c in counts.items() if
                                          m.split("-")[0] == str(trial.seed)}))  # fmt: skip
        if not again.ok:
            violations.append(f"{again.summary()} (in the final store)")
    return violations


@dataclass
class LookoutProcess:
    """A `lookout server` subprocess (bench/crash.py's; the tests use their own fixture)."""

    url: str
    process: subprocess.Popen[bytes]

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=60)


def start_lookout(data_dir: Path, env: dict[str, str]) -> LookoutProcess:
    """Start `lookout server` on `data_dir` and wait for /readyz."""
    import os
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = int(sock.getsockname()[1])
    log = data_dir.parent / "server.log"  # every start appends: the trials' whole story
    with log.open("ab") as output:
        process = subprocess.Popen(
            [sys.executable, "-m", "lookout", "server", "--data-dir", str(data_dir),
             "--port", str(port), "--otlp-port", "0"],
            env={**os.environ, **env}, stdout=output, stderr=subprocess.STDOUT,
        )  # fmt: skip
    server = LookoutProcess(f"http://127.0.0.1:{port}", process)

    def ready() -> bool:
        if process.poll() is not None:
            tail = "\n".join(log.read_text(errors="replace").splitlines()[-20:])
            raise RuntimeError(f"lookout server exited with {process.returncode}:\n{tail}")
        try:
            return httpx.get(f"{server.url}/readyz", timeout=1).status_code == 200
        except httpx.TransportError:
            return False

    deadline = time.monotonic() + 60
    while not ready():
        if time.monotonic() > deadline:
            raise RuntimeError("lookout server did not become ready in 60 s")
        time.sleep(0.05)
    return server
