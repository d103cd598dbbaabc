"""Who may send and who may read: the credential each route needs, and checking it.

- Ingest (OTLP, shipped lines, Loki push, scrape target registration):
  `Authorization: Bearer <token>`, one of a
  project's `ingest_tokens`; Loki clients may send it as basic auth, the token as the
  password (Promtail's and Alloy's `basic_auth`).
- Sentry: the DSN key, checked by the Sentry routes themselves.
- Queries (the read API, the Prometheus API, later the UI): one of
  `query_tokens` as a bearer token, or one of `query_users` by basic auth, since Grafana's
  data source can send either.
- `/healthz` and `/readyz` are open: load balancers probe them.

A kind of credential that is not configured is not asked for; the server refuses to listen
beyond loopback without them (config.exposure_problems). Tokens are compared in constant
time, against every configured token.
"""

from __future__ import annotations

import base64
import binascii
import enum
import hmac
import re
from dataclasses import dataclass, field

from lookout.errors import IngestError


class Access(enum.Enum):
    OPEN = "open"
    INGEST = "ingest"
    SENTRY = "sentry"
    QUERY = "query"


_OPEN = frozenset({"/healthz", "/readyz"})
# Target registration too: `lookout run --scrape auto` holds an ingest token only.
_INGEST = frozenset({"/v1/traces", "/v1/logs", "/v1/metrics", "/api/lookout/lines",
                     "/loki/api/v1/push", "/api/targets"})  # fmt: skip
_SENTRY = re.compile(r"/api/\d+/(envelope|store)/?")


def access_of(path: str) -> Access:
    """The credential a path needs. Anything not named is a query: unknown paths too."""
    if path in _OPEN:
        return Access.OPEN
    if path in _INGEST:
        return Access.INGEST
    if _SENTRY.fullmatch(path):
        return Access.SENTRY
    return Access.QUERY


def _same(given: str, secrets: list[str]) -> bool:
    """Whether `given` is one of `secrets`, looking at all of them whatever matches."""
    found = False
    for secret in secrets:
        found |= hmac.compare_digest(given.encode(), secret.encode())
    return found


@dataclass(frozen=True)
class Credentials:
    ingest_tokens: dict[str, int] = field(default_factory=dict)  # token -> project id
    query_tokens: tuple[str, ...] = ()
    query_users: dict[str, str] = field(default_factory=dict)

    def check(self, access: Access, authorization: str | None) -> int | None:
        """The project an ingest token belongs to (None otherwise), or IngestError 401/403."""
        if access is Access.INGEST and self.ingest_tokens:
            return self._ingest(authorization)
        if access is Access.QUERY and (self.query_tokens or self.query_users):
            self._query(authorization)
        return None

    def _ingest(self, authorization: str | None) -> int:
        scheme, secret = _split(authorization, "an ingest token: Authorization: Bearer <token>")
        if scheme == "basic":
            secret = _basic(secret)[1]
        tokens = list(self.ingest_tokens)
        if not _same(secret, tokens):
            raise _forbidden("The ingest token is not one of this server's tokens.")
        return next(p for t, p in self.ingest_tokens.items() if hmac.compare_digest(t, secret))

    def _query(self, authorization: str | None) -> None:
        scheme, secret = _split(
            authorization, "the query credential: Authorization: Bearer <token> or basic auth"
        )
        if scheme == "bearer":
            if not _same(secret, list(self.query_tokens)):
                raise _forbidden("The bearer token is not one of this server's query tokens.")
            return
        user, password = _basic(secret)
        expected = self.query_users.get(user, "")
        if not (_same(password, [expected]) and user in self.query_users):
            raise _forbidden("Unknown user or wrong password.")


def _split(authorization: str | None, wanted: str) -> tuple[str, str]:
    if not authorization or not authorization.strip():
        raise IngestError(f"Missing credentials: send {wanted}.", 401, "unauthenticated")
    scheme, _, secret = authorization.strip().partition(" ")
    scheme = scheme.lower()
    if scheme not in ("bearer", "basic") or not secret.strip():
        raise IngestError(
            f"Unsupported Authorization scheme {scheme!r}: send {wanted}.", 401, "unauthenticated"
        )
    return scheme, secret.strip()


def _basic(encoded: str) -> tuple[str, str]:
    try:
        user, sep, password = base64.b64decode(encoded, validate=True).decode().partition(":")
    except (binascii.Error, UnicodeDecodeError, ValueError):
        raise IngestError(
            "Basic credentials must be base64 of user:password.", 401, "unauthenticated"
        ) from None
    if not sep:
        raise IngestError("Basic credentials must be user:password.", 401, "unauthenticated")
    return user, password


def _forbidden(message: str) -> IngestError:
    return IngestError(message, 403, "forbidden")
