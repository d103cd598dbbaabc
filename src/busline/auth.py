"""auth: accounts and bearer sessions.

Passwords are hashed with scrypt (`hashlib.scrypt`, RFC 7914) and a 16-byte random salt.
The cost is `BUSLINE_SCRYPT_N` (default 2**13 = 8192, with r = 8 and p = 1: 8 MiB of
memory and about 20 ms of one core per hash on the demo machine, measured at 19-22 ms on
a 2-core VM). Each hash is stored with its parameters in the PHC string format,
`$scrypt$ln=13,r=8,p=1$<salt>$<hash>`, so changing the cost keeps old hashes valid; a
successful login re-hashes a password stored at another cost. Hashes are compared in
constant time, and a login for an unknown email still pays for one hash, so the answer
and its timing are the same whether the email exists or not.

A session is a random 32-byte bearer token (URL-safe base64). Only its SHA-256 is stored,
so a copy of the database opens no session. Sessions last `BUSLINE_SESSION_TTL_S`
(default 24 h). `GET /internal/sessions/current` (called by the gateway) validates a
token and marks its user active; `auth_active_users` counts the distinct users active in
the last `BUSLINE_ACTIVE_WINDOW_S` (default 300 s), computed when it is scraped.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import re
import secrets
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

import lookout.sdk
from busline import db, kit

NAME = "auth"

log = lookout.sdk.get_logger("busline.auth")
logins_total = lookout.sdk.counter(
    "auth_logins_total", "Login attempts, by result (success, bad_credentials).", ["result"]
)
active_users_gauge = lookout.sdk.gauge(
    "auth_active_users", "Distinct users whose session was used in the last 5 minutes."
)

# ---------------------------------------------------------------- configuration

DEFAULT_SCRYPT_N = 2**13
SCRYPT_R = 8
SCRYPT_P = 1
SALT_BYTES = 16
HASH_BYTES = 32
TOKEN_BYTES = 32
DEFAULT_SESSION_TTL_S = 24 * 3600.0
DEFAULT_ACTIVE_WINDOW_S = 300.0


@dataclass(frozen=True)
class ScryptCost:
    """scrypt's parameters: N (CPU and memory cost, a power of two), r (block size) and p
    (parallelism). Memory per hash is 128 * N * r bytes."""

    n: int = DEFAULT_SCRYPT_N
    r: int = SCRYPT_R
    p: int = SCRYPT_P

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> ScryptCost:
        n = int(
            kit.env_number(
                environ, "BUSLINE_SCRYPT_N", DEFAULT_SCRYPT_N, low=2, high=2**20, unit="a number"
            )
        )
        if n & (n - 1):
            raise ValueError(
                f"BUSLINE_SCRYPT_N has value {n}. Expected a power of two such as 8192."
            )
        return cls(n=n)

    @property
    def maxmem(self) -> int:
        return 128 * self.n * self.r * self.p + 1024 * 1024


@dataclass(frozen=True)
class Settings:
    cost: ScryptCost
    session_ttl_s: float
    active_window_s: float

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> Settings:
        return cls(
            cost=ScryptCost.from_env(environ),
            session_ttl_s=kit.env_number(
                environ,
                "BUSLINE_SESSION_TTL_S",
                DEFAULT_SESSION_TTL_S,
                low=1,
                high=90 * 86400,
                unit="seconds",
            ),
            active_window_s=kit.env_number(
                environ,
                "BUSLINE_ACTIVE_WINDOW_S",
                DEFAULT_ACTIVE_WINDOW_S,
                low=0.1,
                high=86400,
                unit="seconds",
            ),
        )


# ---------------------------------------------------------------- passwords


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode().rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.b64decode(text + "=" * (-len(text) % 4), validate=True)


def hash_password(password: str, cost: ScryptCost, salt: bytes | None = None) -> str:
    """`password` hashed with scrypt at `cost`, as a PHC string carrying its parameters."""
    salt = os.urandom(SALT_BYTES) if salt is None else salt
    digest = hashlib.scrypt(
        password.encode(),
        salt=salt,
        n=cost.n,
        r=cost.r,
        p=cost.p,
        maxmem=cost.maxmem,
        dklen=HASH_BYTES,
    )
    ln = cost.n.bit_length() - 1
    return f"$scrypt$ln={ln},r={cost.r},p={cost.p}${_b64(salt)}${_b64(digest)}"


_PHC = re.compile(
    r"^\$scrypt\$ln=(\d{1,2}),r=(\d{1,2}),p=(\d{1,2})\$([A-Za-z0-9+/]+)\$([A-Za-z0-9+/]+)$"
)


def cost_of(stored: str) -> ScryptCost | None:
    """The parameters a stored hash was made with, or None when it is not ours."""
    match = _PHC.match(stored)
    if match is None:
        return None
    ln, r, p = (int(g) for g in match.group(1, 2, 3))
    return ScryptCost(n=2**ln, r=r, p=p)


def verify_password(password: str, stored: str) -> bool:
    """Whether `password` matches `stored`, recomputed at the stored cost and compared in
    constant time."""
    match = _PHC.match(stored)
    cost = cost_of(stored)
    if match is None or cost is None:
        return False
    try:
        salt, expected = _unb64(match.group(4)), _unb64(match.group(5))
    except (binascii.Error, ValueError):
        return False
    digest = hashlib.scrypt(
        password.encode(),
        salt=salt,
        n=cost.n,
        r=cost.r,
        p=cost.p,
        maxmem=cost.maxmem,
        dklen=len(expected),
    )
    return hmac.compare_digest(digest, expected)


def token_digest(token: str) -> str:
    """What the database keeps of a session token: its SHA-256, in hex."""
    return hashlib.sha256(token.encode()).hexdigest()


# ---------------------------------------------------------------- active users


class ActiveUsers:
    """Distinct users seen in the last `window_s` seconds of a monotonic clock. Written
    by request handlers, read by the metrics listener's thread at scrape time."""

    def __init__(self, window_s: float) -> None:
        self.window_s = window_s
        self._last_seen: dict[str, float] = {}
        self._lock = threading.Lock()

    def seen(self, user_id: str, now: float) -> None:
        with self._lock:
            self._last_seen[user_id] = now

    def count(self, now: float) -> int:
        """How many users were seen within the window; older ones are forgotten."""
        cutoff = now - self.window_s
        with self._lock:
            for user_id in [u for u, at in self._last_seen.items() if at < cutoff]:
                del self._last_seen[user_id]
            return len(self._last_seen)


# ---------------------------------------------------------------- validation

_EMAIL = re.compile(
    r"^[^@\s]{1,64}@[A-Za-z0-9](?:[A-Za-z0-9-]{0,62}[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,62}[A-Za-z0-9])?)+$"
)
PASSWORD_MIN = 8
PASSWORD_MAX = 256


def normalise_email(value: str) -> str | None:
    """`value` trimmed and lower-cased when it looks like an email address, else None."""
    email = value.strip().lower()
    if len(email) > 254 or not _EMAIL.match(email):
        return None
    return email


def email_field(data: Mapping[str, Any]) -> str:
    email = normalise_email(kit.text_field(data, "email", max_len=254))
    if email is None:
        raise kit.Invalid("email", "is not an email address such as wanjiru@example.co.ke")
    return email


def password_field(data: Mapping[str, Any], *, check_length: bool) -> str:
    value = data.get("password")
    if value is None:
        raise kit.Invalid("password", "is required")
    if not isinstance(value, str) or not value:
        raise kit.Invalid("password", "must be a non-empty string")
    if len(value) > PASSWORD_MAX:
        raise kit.Invalid("password", f"longer than {PASSWORD_MAX} characters")
    if check_length and len(value) < PASSWORD_MIN:
        raise kit.Invalid("password", f"must be at least {PASSWORD_MIN} characters")
    return value


# ---------------------------------------------------------------- storage

metadata = sa.MetaData()
users = sa.Table(
    "users",
    metadata,
    sa.Column("user_id", sa.String(32), primary_key=True),
    sa.Column("email", sa.String(254), nullable=False, unique=True),
    sa.Column("name", sa.String(100), nullable=False),
    sa.Column("phone", sa.String(12), nullable=False),
    sa.Column("password_hash", sa.String(200), nullable=False),
    sa.Column("created_at", sa.Float, nullable=False),
)
sessions = sa.Table(
    "sessions",
    metadata,
    sa.Column("token_sha256", sa.String(64), primary_key=True),
    sa.Column("user_id", sa.String(32), sa.ForeignKey("users.user_id"), nullable=False),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("expires_at", sa.Float, nullable=False, index=True),
)
MIGRATIONS: list[db.Migration] = [(1, db.create_tables(metadata, "users", "sessions"))]


class EmailTakenError(Exception):
    """An account with this email exists already."""


@dataclass(frozen=True)
class Session:
    token: str
    user_id: str
    expires_at: float


class Accounts:
    """Accounts and sessions in auth's database. Methods block (hashing, SQL): call them
    from a worker thread."""

    def __init__(self, engine: Engine, settings: Settings, clock: Callable[[], float]) -> None:
        self.engine = engine
        self.settings = settings
        self.clock = clock
        # A login for an unknown email verifies against this, so it costs one hash too.
        self._decoy = hash_password(secrets.token_hex(16), settings.cost)

    def register(self, email: str, password: str, name: str, phone: str) -> str:
        with self.engine.connect() as conn:
            taken = conn.execute(sa.select(users.c.user_id).where(users.c.email == email)).first()
        if taken is not None:
            raise EmailTakenError(email)
        user_id = uuid.uuid4().hex
        stored = hash_password(password, self.settings.cost)
        try:
            with self.engine.begin() as conn:
                conn.execute(
                    users.insert().values(
                        user_id=user_id,
                        email=email,
                        name=name,
                        phone=phone,
                        password_hash=stored,
                        created_at=self.clock(),
                    )
                )
        except sa.exc.IntegrityError:
            raise EmailTakenError(email) from None
        return user_id

    def login(self, email: str, password: str) -> Session | None:
        """A new session when the credentials match, else None (after the same work)."""
        with self.engine.connect() as conn:
            row = conn.execute(
                sa.select(users.c.user_id, users.c.password_hash).where(users.c.email == email)
            ).first()
        if row is None:
            verify_password(password, self._decoy)
            return None
        user_id, stored = str(row.user_id), str(row.password_hash)
        if not verify_password(password, stored):
            return None
        now = self.clock()
        token = secrets.token_urlsafe(TOKEN_BYTES)
        expires_at = now + self.settings.session_ttl_s
        with self.engine.begin() as conn:
            conn.execute(sessions.delete().where(sessions.c.expires_at < now))
            conn.execute(
                sessions.insert().values(
                    token_sha256=token_digest(token),
                    user_id=user_id,
                    created_at=now,
                    expires_at=expires_at,
                )
            )
            if cost_of(stored) != self.settings.cost:
                conn.execute(
                    users.update()
                    .where(users.c.user_id == user_id)
                    .values(password_hash=hash_password(password, self.settings.cost))
                )
        return Session(token=token, user_id=user_id, expires_at=expires_at)

    def session_user(self, token: str) -> dict[str, str] | None:
        """The user of a live session, or None for an unknown or expired token."""
        with self.engine.connect() as conn:
            row = conn.execute(
                sa.select(users.c.user_id, users.c.email, users.c.phone)
                .select_from(sessions.join(users, sessions.c.user_id == users.c.user_id))
                .where(
                    sessions.c.token_sha256 == token_digest(token),
                    sessions.c.expires_at > self.clock(),
                )
            ).first()
        if row is None:
            return None
        return {"user_id": str(row.user_id), "email": str(row.email), "phone": str(row.phone)}


# ---------------------------------------------------------------- HTTP


def iso(epoch_s: float) -> str:
    return datetime.fromtimestamp(epoch_s, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def bearer_token(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token or len(token) > 200:
        return None
    return token


def _accounts(request: Request) -> Accounts:
    accounts: Accounts = request.app.state.accounts
    return accounts


async def register(request: Request) -> Response:
    data = await kit.json_object(request)
    email = email_field(data)
    password = password_field(data, check_length=True)
    name = kit.text_field(data, "name", max_len=100).strip()
    phone = kit.phone_field(data)
    try:
        user_id = await run_in_threadpool(_accounts(request).register, email, password, name, phone)
    except EmailTakenError:
        log.info("registration_refused", reason="email_taken")
        return kit.error(409, "email_taken", "an account with this email exists", field="email")
    lookout.sdk.set_user(id=user_id)
    log.info("user_registered", user_id=user_id)
    return JSONResponse({"user_id": user_id}, status_code=201)


async def login(request: Request) -> Response:
    data = await kit.json_object(request)
    email = email_field(data)
    password = password_field(data, check_length=False)
    session = await run_in_threadpool(_accounts(request).login, email, password)
    if session is None:
        logins_total.labels(result="bad_credentials").inc()
        log.info("login_failed", reason="bad_credentials")
        return kit.error(401, "bad_credentials", "email or password is wrong")
    logins_total.labels(result="success").inc()
    active: ActiveUsers = request.app.state.active
    active.seen(session.user_id, time.monotonic())  # logging in is activity too
    lookout.sdk.set_user(id=session.user_id)
    log.info("login_succeeded", user_id=session.user_id)
    return JSONResponse(
        {
            "token": session.token,
            "user_id": session.user_id,
            "expires_at": iso(session.expires_at),
        }
    )


async def current_session(request: Request) -> Response:
    token = bearer_token(request)
    user = (
        None if token is None else await run_in_threadpool(_accounts(request).session_user, token)
    )
    if user is None:
        return kit.error(
            401,
            "invalid_token",
            "send a valid session as Authorization: Bearer <token>",
            field="authorization",
            headers={"WWW-Authenticate": "Bearer"},
        )
    active: ActiveUsers = request.app.state.active
    active.seen(user["user_id"], time.monotonic())
    lookout.sdk.set_user(id=user["user_id"])
    return JSONResponse(user)


def create_app(environ: Mapping[str, str] | None = None) -> Starlette:
    """auth's app; its database opens (and migrates) at lifespan startup."""
    settings = Settings.from_env(os.environ if environ is None else environ)
    active = ActiveUsers(settings.active_window_s)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        engine = db.engine_for(NAME)
        await run_in_threadpool(db.migrate, engine, MIGRATIONS)
        app.state.accounts = await run_in_threadpool(Accounts, engine, settings, time.time)
        log.info(
            "auth_ready",
            scrypt_n=settings.cost.n,
            scrypt_r=settings.cost.r,
            scrypt_p=settings.cost.p,
            session_ttl_s=settings.session_ttl_s,
        )
        try:
            yield
        finally:
            engine.dispose()

    app = Starlette(
        routes=[
            Route("/healthz", kit.healthz(NAME), methods=["GET"]),
            Route("/auth/register", register, methods=["POST"]),
            Route("/auth/login", login, methods=["POST"]),
            Route("/internal/sessions/current", current_session, methods=["GET"]),
        ],
        lifespan=lifespan,
    )
    app.state.active = active
    active_users_gauge.set_function(lambda: float(active.count(time.monotonic())))
    kit.handles_invalid(app)
    return app


def main() -> None:
    app = create_app()
    kit.serve(NAME, kit.instrument(NAME, app))
