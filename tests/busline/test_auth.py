"""auth as a real process: accounts, scrypt hashes, bearer sessions stored hashed, and
the active-users gauge."""

from __future__ import annotations

import hashlib
import statistics
import time
from typing import Any

import httpx
import sqlalchemy as sa
from prometheus_client.parser import text_string_to_metric_families

from busline.auth import ScryptCost, cost_of, hash_password, verify_password
from tests.busline.conftest import Platform, Proc
from tests.support import wait_until

PASSWORD = "mvua-ya-kesho-42"


def metric_samples(proc: Proc) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """The process's metrics, read from the URL its `lookout_sdk_started` line gives."""
    started = [line for line in proc.json_lines() if line.get("event") == "lookout_sdk_started"]
    assert started, "no lookout_sdk_started line"
    text = httpx.get(started[0]["metrics_url"], timeout=5).text
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def gauge(proc: Proc, name: str, **labels: str) -> float | None:
    return metric_samples(proc).get((name, tuple(sorted(labels.items()))))


def register(url: str, email: str, phone: str = "0712345678", **extra: Any) -> httpx.Response:
    body = {"email": email, "password": PASSWORD, "name": "Wanjiru", "phone": phone, **extra}
    return httpx.post(f"{url}/auth/register", json=body, timeout=10)


def login(url: str, email: str, password: str = PASSWORD) -> httpx.Response:
    return httpx.post(f"{url}/auth/login", json={"email": email, "password": password}, timeout=10)


def current(url: str, token: str) -> httpx.Response:
    return httpx.get(
        f"{url}/internal/sessions/current",
        headers={"Authorization": f"Bearer {token}"},
        timeout=10,
    )


def stored_hash(platform: Platform, email: str) -> str:
    engine = sa.create_engine(f"sqlite:///{platform.state / 'db' / 'auth.sqlite'}")
    try:
        with engine.connect() as conn:
            value = conn.execute(
                sa.text("SELECT password_hash FROM users WHERE email = :email"), {"email": email}
            ).scalar_one()
    finally:
        engine.dispose()
    return str(value)


def test_register_login_and_validate_a_session(platform: Platform) -> None:
    """A registered user logs in, and the token names them, with email and phone
    normalised (lower-case; 2547XXXXXXXX from +254 7.. with spaces)."""
    platform.start("auth")
    url = platform.url("auth")

    registered = register(url, "  Wanjiru.K@Example.CO.KE ", phone="+254 712-345 678")
    assert registered.status_code == 201
    user_id = registered.json()["user_id"]

    logged_in = login(url, "wanjiru.k@example.co.ke")
    assert logged_in.status_code == 200
    body = logged_in.json()
    assert {"token", "user_id", "expires_at"} == set(body)
    assert body["user_id"] == user_id
    assert len(body["token"]) >= 43  # 32 random bytes, URL-safe base64

    session = current(url, body["token"])
    assert session.status_code == 200
    assert session.json() == {
        "user_id": user_id,
        "email": "wanjiru.k@example.co.ke",
        "phone": "254712345678",
    }
    assert "x-trace-id" in session.headers

    health = httpx.get(f"{url}/healthz", timeout=5).json()
    assert health["status"] == "ok"
    assert health["service"] == "auth"


def test_bad_credentials_are_one_answer_whether_the_email_exists_or_not(
    platform: Platform,
) -> None:
    """A wrong password and an unknown email both answer 401 `bad_credentials` with the
    same body, and both count in auth_logins_total{result="bad_credentials"}."""
    proc = platform.start("auth")
    url = platform.url("auth")
    assert register(url, "otieno@example.com").status_code == 201

    wrong_password = login(url, "otieno@example.com", "not-the-password")
    unknown_email = login(url, "nobody@example.com")
    assert wrong_password.status_code == 401
    assert unknown_email.status_code == 401
    assert wrong_password.json() == unknown_email.json()
    assert wrong_password.json()["error"] == "bad_credentials"
    assert login(url, "otieno@example.com").status_code == 200

    assert gauge(proc, "auth_logins_total", result="bad_credentials") == 2.0
    assert gauge(proc, "auth_logins_total", result="success") == 1.0


def test_a_taken_email_is_409_whatever_its_case(platform: Platform) -> None:
    platform.start("auth")
    url = platform.url("auth")
    assert register(url, "akinyi@example.com").status_code == 201
    again = register(url, "AKINYI@example.com", phone="0722000111")
    assert again.status_code == 409
    assert again.json()["error"] == "email_taken"
    assert again.json()["field"] == "email"


def test_every_validation_error_names_its_field(platform: Platform) -> None:
    platform.start("auth")
    url = platform.url("auth")
    good = {
        "email": "a@example.com",
        "password": PASSWORD,
        "name": "Achieng",
        "phone": "0712345678",
    }
    cases: list[tuple[str, Any, str, int]] = [
        ("/auth/register", {**good, "email": None}, "email", 400),
        ("/auth/register", {**good, "email": "not-an-email"}, "email", 400),
        ("/auth/register", {**good, "email": 42}, "email", 400),
        ("/auth/register", {**good, "password": "short"}, "password", 400),
        ("/auth/register", {**good, "password": None}, "password", 400),
        ("/auth/register", {**good, "password": "x" * 300}, "password", 400),
        ("/auth/register", {**good, "name": ""}, "name", 400),
        ("/auth/register", {**good, "phone": "0812345678"}, "phone", 400),
        ("/auth/register", {**good, "phone": "+1 202 555 0100"}, "phone", 400),
        ("/auth/register", [good], "body", 400),
        ("/auth/login", {"password": PASSWORD}, "email", 400),
        ("/auth/login", {"email": "a@example.com"}, "password", 400),
    ]
    for path, body, field, status in cases:
        answer = httpx.post(url + path, json=body, timeout=10)
        assert (path, field, status) == (path, answer.json().get("field"), answer.status_code), body
    not_json = httpx.post(
        url + "/auth/login", content=b"{", headers={"content-type": "application/json"}
    )
    assert (not_json.status_code, not_json.json()["field"]) == (400, "body")
    huge = httpx.post(url + "/auth/login", json={"email": "a" * 70_000})
    assert (huge.status_code, huge.json()["field"]) == (413, "body")
    no_token = httpx.get(url + "/internal/sessions/current", timeout=10)
    assert (no_token.status_code, no_token.json()["field"]) == (401, "authorization")


def test_the_default_hash_costs_about_20_ms() -> None:
    """scrypt at the default cost (N=2**13, r=8, p=1) takes about 20 ms here: measured,
    with a loose bound for a busy machine."""
    cost = ScryptCost.from_env({})
    assert (cost.n, cost.r, cost.p) == (8192, 8, 1)
    timings = []
    for _ in range(5):
        begin = time.perf_counter()
        stored = hash_password(PASSWORD, cost)
        timings.append(time.perf_counter() - begin)
    assert 0.005 <= statistics.median(timings) <= 0.200, timings
    assert stored.startswith("$scrypt$ln=13,r=8,p=1$")
    assert verify_password(PASSWORD, stored)
    assert not verify_password(PASSWORD + "x", stored)
    assert cost_of(stored) == cost


def test_a_cost_change_keeps_old_hashes_valid(platform: Platform) -> None:
    """A password hashed at N=1024 still logs in after the cost goes back to the default,
    and that login re-hashes it at the new cost."""
    platform.start("auth", BUSLINE_SCRYPT_N="1024")
    url = platform.url("auth")
    assert register(url, "kamau@example.com").status_code == 201
    assert stored_hash(platform, "kamau@example.com").startswith("$scrypt$ln=10,r=8,p=1$")
    platform.stop("auth")

    platform.start("auth")
    assert login(platform.url("auth"), "kamau@example.com").status_code == 200
    assert stored_hash(platform, "kamau@example.com").startswith("$scrypt$ln=13,r=8,p=1$")
    assert login(platform.url("auth"), "kamau@example.com").status_code == 200


def test_tokens_are_stored_only_as_their_sha256(platform: Platform) -> None:
    """The database files hold the token's SHA-256 (the positive control) and never the
    token itself; the logs carry neither the token, the password nor the phone (with the
    SDK's scrubber off: auth's own code must not log them)."""
    proc = platform.start("auth", LOOKOUT_SCRUB="false")
    url = platform.url("auth")
    assert register(url, "njeri@example.com", phone="0798765432").status_code == 201
    token = login(url, "njeri@example.com").json()["token"]
    assert current(url, token).status_code == 200

    files = sorted((platform.state / "db").glob("auth.sqlite*"))
    assert files
    raw = b"".join(path.read_bytes() for path in files)
    assert hashlib.sha256(token.encode()).hexdigest().encode() in raw
    assert token.encode() not in raw
    assert PASSWORD.encode() not in raw

    logs = "\n".join(proc.lines)
    assert "user_registered" in logs
    for secret in (token, PASSWORD, "254798765432", "0798765432"):
        assert secret not in logs


def test_sessions_expire(platform: Platform) -> None:
    platform.start("auth", BUSLINE_SESSION_TTL_S="1")
    url = platform.url("auth")
    assert register(url, "muthoni@example.com").status_code == 201
    token = login(url, "muthoni@example.com").json()["token"]
    assert current(url, token).status_code == 200
    expired = wait_until(lambda: current(url, token).status_code == 401, 10, "the session to end")
    assert expired
    assert current(url, token).json()["error"] == "invalid_token"


def test_active_users_counts_distinct_users_and_forgets_them(platform: Platform) -> None:
    """Two users (one seen twice) count 2 while their sessions are in use, and 0 once the
    window (shortened to 2 s here; 5 minutes by default) has passed."""
    proc = platform.start("auth", BUSLINE_ACTIVE_WINDOW_S="2")
    url = platform.url("auth")
    assert gauge(proc, "auth_active_users") == 0.0
    tokens = []
    for email in ("chebet@example.com", "kiprop@example.com"):
        assert register(url, email).status_code == 201
        tokens.append(login(url, email).json()["token"])
    for token in (*tokens, tokens[0]):
        assert current(url, token).status_code == 200
    assert gauge(proc, "auth_active_users") == 2.0
    wait_until(lambda: gauge(proc, "auth_active_users") == 0.0, 10, "the users to be forgotten")
    assert login(url, "chebet@example.com").status_code == 200  # logging in is activity
    assert gauge(proc, "auth_active_users") == 1.0
    assert current(url, tokens[1]).status_code == 200
    assert gauge(proc, "auth_active_users") == 2.0


def test_accounts_and_sessions_work_on_postgresql(platform: Platform, own_postgres: str) -> None:
    """The same code on PostgreSQL (auth's own schema): register, a taken email, login,
    a session, and a hash that survives a restart."""
    platform.start("auth", BUSLINE_DATABASE_URL=own_postgres, BUSLINE_SCRYPT_N="1024")
    url = platform.url("auth")
    user_id = register(url, "wairimu@example.com").json()["user_id"]
    assert register(url, "Wairimu@example.com").status_code == 409
    platform.stop("auth")
    platform.start("auth", BUSLINE_DATABASE_URL=own_postgres, BUSLINE_SCRYPT_N="1024")
    url = platform.url("auth")
    token = login(url, "wairimu@example.com").json()["token"]
    assert current(url, token).json()["user_id"] == user_id
    assert login(url, "wairimu@example.com", "wrong-password").status_code == 401
