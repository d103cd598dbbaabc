"""The supervisor and the control API, on real processes: restarts with stable ports and a
counter, the actions and their audit log, undo, and no child outliving the supervisor."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.busline.conftest import QUIET, alive, descendants
from tests.support import ROOT, wait_until

WHO = {"actor": "test@busline", "reason": "a test"}


class Supervised:
    def __init__(self, state: Path, process: subprocess.Popen[bytes]) -> None:
        self.state = state
        self.process = process
        self.lines: list[str] = []

    def port_file(self, name: str) -> dict[str, Any]:
        try:
            data = json.loads((self.state / "run" / f"{name}.json").read_text())
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    @property
    def control(self) -> str:
        data = self.port_file("supervisor")
        return f"http://{data['host']}:{data['port']}"

    def post(self, path: str, body: dict[str, Any], **kw: Any) -> httpx.Response:
        return httpx.post(f"{self.control}{path}", json=body, timeout=10, **kw)

    def metrics(self) -> str:
        for line in self.lines:
            if "lookout_sdk_started" in line:
                url = json.loads(line)["metrics_url"]
                return httpx.get(url, timeout=5).text
        raise AssertionError("the supervisor reported no metrics URL")

    def descendants(self) -> list[int]:
        return descendants(self.process.pid)


@pytest.fixture
def supervised(tmp_path: Path) -> Iterator[Supervised]:
    """`busline up` running auth and fleet through `lookout run` (no server: the lines are
    buffered and dropped, which never holds the services up)."""
    state = tmp_path / "state"
    process = subprocess.Popen(
        [sys.executable, "-m", "busline", "up", "--state", str(state), "--services", "auth,fleet"],
        cwd=ROOT,
        env={
            **os.environ,
            "PYTHONPATH": str(ROOT / "src"),
            **QUIET,
            "LOOKOUT_URL": "http://127.0.0.1:9",
        },
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    sup = Supervised(state, process)

    def drain() -> None:
        assert process.stdout is not None
        for raw in process.stdout:
            sup.lines.append(raw.decode("utf-8", "replace").rstrip("\n"))

    threading.Thread(target=drain, daemon=True).start()

    def ready() -> bool:
        if process.poll() is not None:
            raise AssertionError("busline up exited:\n" + "\n".join(sup.lines))
        if not all(sup.port_file(n) for n in ("supervisor", "auth", "fleet")):
            return False
        try:
            return all(
                httpx.get(url + "/healthz", timeout=1).status_code == 200
                for url in (sup.control, *(service_url(sup, n) for n in ("auth", "fleet")))
            )
        except httpx.TransportError:
            return False

    try:
        wait_until(ready, 60, "the supervisor and its services")
        yield sup
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(10)
        assert process.stdout is not None
        process.stdout.close()


def service_url(sup: Supervised, name: str) -> str:
    data = sup.port_file(name)
    return f"http://{data['host']}:{data['port']}"


def test_a_crashed_service_restarts_on_its_port_and_is_counted(supervised: Supervised) -> None:
    before = supervised.port_file("auth")
    os.kill(before["pid"], signal.SIGKILL)
    wait_until(
        lambda: supervised.port_file("auth").get("pid") not in (None, before["pid"]),
        30,
        "auth to be restarted",
    )
    after = supervised.port_file("auth")
    assert after["port"] == before["port"]
    wait_until(lambda: httpx.get(service_url(supervised, "auth") + "/healthz").status_code == 200)
    assert 'busline_service_restarts_total{service="auth"} 1.0' in supervised.metrics()
    assert 'busline_service_restarts_total{service="fleet"} 0.0' in supervised.metrics()


def test_maintenance_dry_run_audit_and_revert(supervised: Supervised) -> None:
    dry = supervised.post(
        "/control/v1/maintenance", {**WHO, "scope": "payments", "enabled": True, "dry_run": True}
    )
    assert dry.status_code == 200, dry.text
    assert dry.json()["undo_id"] is None
    assert httpx.get(f"{supervised.control}/control/v1/state").json()["maintenance"] == {}

    on = supervised.post(
        "/control/v1/maintenance",
        {**WHO, "scope": "payments", "enabled": True, "message": "Back at 10:00."},
    ).json()
    assert on["before"] == {"enabled": False, "message": None}
    assert on["after"] == {"enabled": True, "message": "Back at 10:00."}
    state = json.loads((supervised.state / "control.json").read_text())
    assert state["maintenance"] == {"payments": "Back at 10:00."}

    entries = httpx.get(f"{supervised.control}/control/audit", params={"since": "0"}).json()
    assert [e["id"] for e in entries["entries"]] == [on["undo_id"]]
    assert entries["entries"][0]["actor"] == "test@busline"
    future = httpx.get(f"{supervised.control}/control/audit", params={"since": "2100-01-01T00:00Z"})
    assert future.json()["entries"] == []

    revert = supervised.post(f"/control/audit/{on['undo_id']}/revert", WHO)
    assert revert.status_code == 200, revert.text
    assert revert.json()["reverts"] == on["undo_id"]
    assert json.loads((supervised.state / "control.json").read_text())["maintenance"] == {}
    again = supervised.post(f"/control/audit/{on['undo_id']}/revert", WHO)
    assert again.status_code == 409
    assert again.json()["error"] == "already_reverted"
    listed = httpx.get(f"{supervised.control}/control/audit").json()["entries"]
    assert listed[0]["reverted_by"] == revert.json()["undo_id"]


def test_payment_route_is_validated_and_revertible(supervised: Supervised) -> None:
    bad = supervised.post("/control/v1/payment-route", {**WHO, "primary": "paypal"})
    assert bad.status_code == 400
    assert bad.json()["field"] == "primary"
    repeat = supervised.post(
        "/control/v1/payment-route", {**WHO, "primary": "airtel", "fallback": ["airtel"]}
    )
    assert repeat.json()["field"] == "fallback"
    done = supervised.post(
        "/control/v1/payment-route", {**WHO, "primary": "airtel", "fallback": ["mpesa"]}
    ).json()
    assert done["before"] == {"primary": "mpesa", "fallback": ["airtel", "card"]}
    route = json.loads((supervised.state / "control.json").read_text())["payment_route"]
    assert route == {"primary": "airtel", "fallback": ["mpesa"]}
    supervised.post(f"/control/audit/{done['undo_id']}/revert", WHO)
    route = json.loads((supervised.state / "control.json").read_text())["payment_route"]
    assert route == {"primary": "mpesa", "fallback": ["airtel", "card"]}


def test_every_field_is_checked_and_named(supervised: Supervised) -> None:
    cases: list[tuple[str, dict[str, Any], str]] = [
        ("/control/v1/maintenance", {"reason": "x", "scope": "global", "enabled": True}, "actor"),
        ("/control/v1/maintenance", {"actor": "a", "scope": "global", "enabled": True}, "reason"),
        ("/control/v1/maintenance", {**WHO, "scope": "moon", "enabled": True}, "scope"),
        ("/control/v1/maintenance", {**WHO, "scope": "global", "enabled": "yes"}, "enabled"),
        (
            "/control/v1/maintenance",
            {**WHO, "scope": "global", "enabled": True, "dry_run": "no"},
            "dry_run",
        ),
        ("/control/v1/services/auth/deploy", {**WHO, "version": "1.0; rm -rf"}, "version"),
    ]
    for path, body, field in cases:
        answer = supervised.post(path, body)
        assert answer.status_code == 400, (path, body, answer.text)
        assert answer.json()["field"] == field, answer.text
    for name in ("providers", "payments", "moon"):  # not ours; not run here; no such service
        unknown = supervised.post(f"/control/v1/services/{name}/restart", WHO)
        assert unknown.status_code == 404, name
        assert unknown.json()["error"] == "unknown_service"
    for since in ("nan", "inf", "1e400", "yesterday"):
        answer = httpx.get(f"{supervised.control}/control/audit", params={"since": since})
        assert answer.status_code == 400, since
        assert answer.json()["field"] == "since"
    nested = supervised.post("/control/v1/maintenance", {**WHO, "scope": "global"})
    deep = httpx.post(f"{supervised.control}/control/v1/maintenance", content=b"[" * 50_000,
                      headers={"content-type": "application/json"})  # fmt: skip
    assert deep.status_code == 400
    assert nested.json()["field"] == "enabled"
    nul = supervised.post("/control/v1/maintenance", {**WHO, "actor": "a\x00b", "scope": "global",
                                                      "enabled": True})  # fmt: skip
    assert nul.json()["field"] == "actor"
    assert httpx.get(f"{supervised.control}/control/v2").status_code == 404
    assert httpx.get(f"{supervised.control}/control/v2").json()["error"] == "not_found"
    not_json = httpx.post(f"{supervised.control}/control/v1/maintenance", content=b"{",
                          headers={"content-type": "application/json"})  # fmt: skip
    assert not_json.status_code == 400
    assert not_json.json()["field"] == "body"
    missing = supervised.post("/control/audit/nope/revert", WHO)
    assert missing.status_code == 404


def test_restart_rollback_and_its_revert_change_process_and_version(
    supervised: Supervised,
) -> None:
    first = supervised.port_file("fleet")
    restart = supervised.post("/control/v1/services/fleet/restart", WHO).json()
    wait_until(lambda: supervised.port_file("fleet").get("pid") != first["pid"], 30, "restart")
    assert supervised.port_file("fleet")["port"] == first["port"]
    not_undoable = supervised.post(f"/control/audit/{restart['undo_id']}/revert", WHO)
    assert not_undoable.json()["error"] == "not_revertible"

    current = supervised.port_file("fleet")["version"]
    back = supervised.post("/control/v1/services/fleet/rollback", WHO).json()
    assert back["before"] == {"version": current}
    previous = back["after"]["version"]
    wait_until(lambda: supervised.port_file("fleet").get("version") == previous, 30, "rollback")
    nothing_left = supervised.post("/control/v1/services/fleet/rollback", WHO)
    assert nothing_left.status_code == 409
    assert nothing_left.json()["error"] == "no_previous_version"

    supervised.post(f"/control/audit/{back['undo_id']}/revert", WHO)
    wait_until(lambda: supervised.port_file("fleet").get("version") == current, 30, "roll forward")
    state = httpx.get(f"{supervised.control}/control/v1/state").json()
    assert state["services"]["fleet"]["version"] == current
    assert state["services"]["fleet"]["restarts"] == 3


def test_a_token_guards_the_control_api(tmp_path: Path) -> None:
    state = tmp_path / "state"
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), **QUIET,
           "BUSLINE_CONTROL_TOKEN": "s3cret", "LOOKOUT_URL": "http://127.0.0.1:9"}  # fmt: skip
    process = subprocess.Popen(
        [sys.executable, "-m", "busline", "up", "--state", str(state), "--services", "fleet"],
        cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True,
    )  # fmt: skip
    try:
        sup = Supervised(state, process)
        wait_until(lambda: sup.port_file("supervisor"), 30, "the control API")
        url = sup.control
        wait_until(lambda: _answers(url + "/healthz"), 30, "the control API")
        assert httpx.get(f"{url}/control/v1/state").status_code == 401
        ok = httpx.get(f"{url}/control/v1/state", headers={"Authorization": "Bearer s3cret"})
        assert ok.status_code == 200
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(20)


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=1).status_code == 200
    except httpx.TransportError:
        return False


def test_no_child_outlives_a_killed_supervisor(supervised: Supervised) -> None:
    children = supervised.descendants()
    assert len(children) >= 4  # two `lookout run`, two services
    os.kill(supervised.process.pid, signal.SIGKILL)
    supervised.process.wait(5)
    started = time.monotonic()
    wait_until(lambda: not any(alive(pid) for pid in children), 5, "every child to exit")
    assert time.monotonic() - started <= 5


def test_sigterm_stops_everything_within_ten_seconds(supervised: Supervised) -> None:
    children = supervised.descendants()
    started = time.monotonic()
    supervised.process.send_signal(
        signal.SIGTERM
    )  # the demo's Ctrl-C is tests/busline/test_demo.py
    supervised.process.wait(10)
    wait_until(lambda: not any(alive(pid) for pid in children), 10, "every child to exit")
    assert time.monotonic() - started <= 10
    assert supervised.process.returncode == 0


def test_usage_errors_exit_2(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    for args in (["up", "--services", "moon"], ["up", "--control-port", "70000"], ["nope"]):
        done = subprocess.run(
            [sys.executable, "-m", "busline", *args], cwd=ROOT, env=env,
            capture_output=True, timeout=60, check=False,
        )  # fmt: skip
        assert done.returncode == 2, (args, done.stderr)
        assert b"Traceback" not in done.stderr
