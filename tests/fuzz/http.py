"""HTTP-level fuzzing: mutated bodies posted to every ingest endpoint family of a real
server (in process in tests, a `lookout server` process in bench/fuzz.py). Every answer must
be below 500, and the server must be ready and still take a valid request afterwards.

The parser properties (targets.py) carry the 2,000 examples per parser; these carry fewer,
since each one is a whole request with a store commit.
"""

from __future__ import annotations

import gzip
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from tests.fuzz import mutators, seeds
from tests.fuzz.targets import ingest_inputs

DSN_KEY = "test-public-key"  # as tests/server/conftest.py; bench/fuzz.py starts with it too
SENTRY_AUTH = {"x-sentry-auth": f"Sentry sentry_version=7, sentry_key={DSN_KEY}"}
CI_REQUESTS = 300


class ServerError(AssertionError):
    """The server answered a mutated request with a 5xx, or stopped being ready."""


@dataclass(frozen=True)
class Post:
    """One request: where, with which headers, and the body."""

    path: str
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""


_ROUTES = {
    "otlp_protobuf_traces": ("/v1/traces", {"content-type": "application/x-protobuf"}),
    "otlp_json_traces": ("/v1/traces", {"content-type": "application/json"}),
    "otlp_protobuf_logs": ("/v1/logs", {"content-type": "application/x-protobuf"}),
    "otlp_json_logs": ("/v1/logs", {"content-type": "application/json"}),
    "otlp_protobuf_metrics": ("/v1/metrics", {"content-type": "application/x-protobuf"}),
    "otlp_json_metrics": ("/v1/metrics", {"content-type": "application/json"}),
    "sentry_envelope": ("/api/1/envelope/", SENTRY_AUTH),
    "sentry_store": ("/api/1/store/", SENTRY_AUTH),
    "lines": ("/api/lookout/lines", {"content-type": "application/json"}),
    "loki_json": ("/loki/api/v1/push", {"content-type": "application/json"}),
    "loki_protobuf": ("/loki/api/v1/push", {"content-type": "application/x-protobuf"}),
}
FAMILIES = {
    "otlp": [name for name in _ROUTES if name.startswith("otlp_")],
    "sentry": ["sentry_envelope", "sentry_store"],
    "lines": ["lines"],
    "loki": ["loki_json", "loki_protobuf"],
}


def posts(family: str, now_ns: int) -> st.SearchStrategy[Post]:
    """Mutated requests of one endpoint family, from seeds dated `now_ns`; one in eight
    gzip-compressed, as clients often send them."""
    inputs = ingest_inputs(now_ns)

    @st.composite
    def post(draw: st.DrawFn) -> Post:
        name = mutators.pick(draw, FAMILIES[family])
        path, headers = _ROUTES[name]
        body = draw(inputs[name])
        if draw(st.integers(0, 7)) == 0:
            body, headers = gzip.compress(body, 1), {**headers, "content-encoding": "gzip"}
        return Post(path, headers, body)

    return post()


def valid_posts(now_ns: int) -> dict[str, Post]:
    """One valid request per family: the server must still take it after the fuzzing."""
    return {
        "otlp": Post("/v1/logs", _ROUTES["otlp_json_logs"][1], seeds.otlp_json("logs", now_ns)[0]),
        "sentry": Post("/api/1/envelope/", SENTRY_AUTH, seeds.sentry_envelopes(now_ns)[0]),
        "lines": Post("/api/lookout/lines", _ROUTES["lines"][1], seeds.lines_batches(now_ns)[0]),
        "loki": Post("/loki/api/v1/push", _ROUTES["loki_json"][1], seeds.loki_json(now_ns)[0]),
    }


@dataclass(frozen=True)
class Answer:
    status: int
    seconds: float


def send(client: httpx.Client, post: Post) -> Answer:
    """Post one request; raise ServerError on a 5xx."""
    started = time.perf_counter()
    response = client.post(post.path, content=post.body, headers=post.headers)
    seconds = time.perf_counter() - started
    if response.status_code >= 500:
        shown = repr(post.body[:400]) + (f"... ({len(post.body)} bytes)" if post.body[400:] else "")
        raise ServerError(
            f"{post.path} answered {response.status_code} {response.text[:300]} to {shown}"
        )
    return Answer(response.status_code, seconds)


def check_healthy(client: httpx.Client, family: str, now_ns: int) -> None:
    """/readyz is 200 and a valid request of the family is taken (2xx)."""
    ready = client.get("/readyz")
    if ready.status_code != 200:
        raise ServerError(f"/readyz answered {ready.status_code} {ready.text[:300]}")
    answer = send(client, valid_posts(now_ns)[family])
    if not 200 <= answer.status < 300:
        raise ServerError(f"a valid {family} request answered {answer.status} afterwards")


def http_property(
    client: httpx.Client,
    family: str,
    examples: int = CI_REQUESTS,
    *,
    now_ns: int | None = None,
    observe: Callable[[Post, Answer], Any] | None = None,
    derandomize: bool = True,
) -> Callable[[], None]:
    """The property: every mutated request of `family` is answered below 500."""

    @settings(
        max_examples=examples,
        deadline=None,
        derandomize=derandomize,
        database=None,
        phases=[Phase.generate, Phase.shrink],
        suppress_health_check=list(HealthCheck),
        print_blob=False,
    )
    @given(post=posts(family, time.time_ns() if now_ns is None else now_ns))
    def prop(post: Post) -> None:
        answer = send(client, post)
        if observe is not None:
            observe(post, answer)

    return prop
