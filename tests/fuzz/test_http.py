"""Each ingest endpoint family, sent 300 mutated requests through the real app and store,
never answers 5xx, and is ready and still takes a valid request afterwards. (The 2,000
examples per parser are in test_parsers.py; these are whole requests with a commit each.)"""

from __future__ import annotations

import time

import pytest

from tests.fuzz import http
from tests.server.conftest import InProcess

# A failing example of 200 kB is still worth showing (shortened in the assertion message).
pytestmark = pytest.mark.filterwarnings(
    "ignore:Generating overly large repr:hypothesis.errors.HypothesisWarning"
)


@pytest.mark.parametrize("family", list(http.FAMILIES))
def test_mutated_requests_get_no_5xx_and_leave_the_server_healthy(
    served: InProcess, family: str
) -> None:
    now_ns = time.time_ns()
    http.http_property(served.client, family, http.CI_REQUESTS, now_ns=now_ns)()
    http.check_healthy(served.client, family, now_ns)
    assert served.runtime.ready()
