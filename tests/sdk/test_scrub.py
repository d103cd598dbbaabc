"""One scrubber for logs, span attributes and error events: the corpus and the paths."""

from __future__ import annotations

import hashlib
import hmac
import json
import re
from pathlib import Path
from typing import Any

import pytest

import lookout.sdk
from lookout.sdk import testing
from lookout.sdk._scrub import FILTERED, Scrubber, is_sensitive_key
from tests.support import http_peer, wait_until

CORPUS = json.loads(
    (Path(__file__).resolve().parents[1] / "fixtures" / "scrub" / "corpus.json").read_text()
)
KEY = b"test-key"
HASHED = re.compile(r"msisdn:([0-9a-f]{12})…(\d{3})")


def _id(case: dict[str, str]) -> str:
    return f"{case['kind']}:{case['key']}={case['value'][:40]}"


def test_the_corpus_is_big_enough() -> None:
    assert len(CORPUS["positives"]) >= 60
    assert len(CORPUS["negatives"]) >= 60
    kinds = {case["kind"] for case in CORPUS["negatives"]}
    for required in ("epoch_ms", "receipt", "booking", "idempotency"):
        assert any(required in kind for kind in kinds), required


@pytest.mark.parametrize("case", CORPUS["positives"], ids=_id)
def test_every_positive_is_scrubbed(case: dict[str, str]) -> None:
    scrubbed = Scrubber(KEY).scrub_field(case["key"], case["value"])
    assert case["secret"] not in str(scrubbed)


@pytest.mark.parametrize("case", CORPUS["negatives"], ids=_id)
def test_no_negative_is_altered(case: dict[str, str]) -> None:
    assert Scrubber(KEY).scrub_field(case["key"], case["value"]) == case["value"]


def test_negative_control_scrubbing_off_leaves_every_secret() -> None:
    """The switch that breaks the guard: with it, the positive test above goes red."""
    off = Scrubber(KEY, enabled=False)
    survived = [
        c for c in CORPUS["positives"] if c["secret"] in str(off.scrub_field(c["key"], c["value"]))
    ]
    assert len(survived) == len(CORPUS["positives"])


@pytest.mark.parametrize(
    "written",
    [
        "0712345678",
        "254712345678",
        "+254712345678",
        "+254 712 345 678",
        "0712-345-678",
        "0712 345678",
    ],
)
def test_every_form_of_a_number_hashes_the_same_searchable_way(written: str) -> None:
    """Support searches by number: the server hashes the E.164 form with the same key."""
    expected = hmac.new(KEY, b"+254712345678", hashlib.sha256).hexdigest()[:12]
    scrubbed = Scrubber(KEY).scrub_text(f"STK push to {written} failed")
    assert scrubbed == f"STK push to msisdn:{expected}…678 failed"
    assert Scrubber(KEY).hash_msisdn(written) == f"msisdn:{expected}…678"


def test_airtel_and_new_safaricom_ranges_are_numbers_too() -> None:
    assert HASHED.fullmatch(Scrubber(KEY).scrub_text("0110123456"))
    assert HASHED.fullmatch(Scrubber(KEY).scrub_text("+254733123456"))


@pytest.mark.parametrize(
    ("key", "sensitive"),
    [
        ("pin", True), ("mpesa_pin", True), ("user.pin", True), ("pinCode", True),
        ("mapping", False), ("shipping", False), ("spinner", False), ("pinned", False),
        ("api_key", True), ("apiKey", True), ("x-api-key", True), ("private_key", True),
        ("refreshToken", True), ("tokens", True), ("author", False), ("authority", False),
        ("tokenizer", False), ("passenger", False), ("monkey", False), ("keyboard", False),
    ],
)  # fmt: skip
def test_keys_match_by_whole_tokens(key: str, sensitive: bool) -> None:
    assert is_sensitive_key(key) == sensitive


def test_id_keys_keep_hex_values_but_a_session_id_is_a_credential() -> None:
    scrubber = Scrubber(KEY)
    assert scrubber.scrub_field("trace_id", "4111111111111111") == "4111111111111111"
    assert scrubber.scrub_field("booking_id", "0712345678") == "0712345678"
    assert scrubber.scrub_field("auth_request_id", "9f3a") == "9f3a"
    assert scrubber.scrub_field("session_id", "9f3a77c2") == FILTERED


def test_header_pairs_are_matched_by_name() -> None:
    scrubbed = Scrubber(KEY).scrub_value(
        [["authorization", "Basic dTpw"], [b"x-mpesa-pin", b"4321"], ["accept", "*/*"]]
    )
    assert scrubbed == [["authorization", FILTERED], [b"x-mpesa-pin", FILTERED], ["accept", "*/*"]]


def test_nested_structures_are_scrubbed() -> None:
    event = {
        "user": {"email": "wanjiku@example.co.ke", "phone": "0712345678"},
        "n": [4111111111111111],
    }
    scrubbed = Scrubber(KEY).scrub_mapping(event)
    assert scrubbed["user"]["email"] == FILTERED
    assert HASHED.fullmatch(scrubbed["user"]["phone"])
    assert scrubbed["n"] == [FILTERED]


def _init(**options: Any) -> None:
    options.setdefault("metrics_addr", "off")
    options.setdefault("traces_exporter", "none")
    lookout.sdk.init("payments", **options)


def test_log_lines_are_scrubbed() -> None:
    _init(environ={"LOOKOUT_SCRUB_KEY": "test-key"})
    with testing.capture_logs() as logs:
        lookout.sdk.get_logger().info(
            "stk_push_failed to 0712345678", card="4111 1111 1111 1111", mpesa_pin="1234"
        )
    (line,) = logs
    assert HASHED.fullmatch(line["event"].split(" to ")[1])
    assert line["card"] == FILTERED
    assert line["mpesa_pin"] == FILTERED


def test_negative_control_lookout_scrub_off_leaves_logs_raw() -> None:
    _init(environ={"LOOKOUT_SCRUB": "false"})
    with testing.capture_logs() as logs:
        lookout.sdk.get_logger().info("x", mpesa_pin="1234")
    assert logs[0]["mpesa_pin"] == "1234"


def test_span_attributes_are_scrubbed_before_export() -> None:
    with http_peer() as (sink, recorder):
        _init(
            traces_exporter="otlp",
            environ={"OTEL_EXPORTER_OTLP_ENDPOINT": sink, "OTEL_BSP_SCHEDULE_DELAY": "20"},
        )
        with lookout.sdk.tracer().start_as_current_span("charge") as span:
            span.set_attribute("payer.msisdn", "+254712345678")
            span.set_attribute("payment.card", "5555555555554444")
            span.add_event("retry", {"authorization": "Bearer abcdefghijk"})
        (exported,) = wait_until(lambda: list(recorder.spans), 10, "the span")
    assert HASHED.fullmatch(exported.attributes["payer.msisdn"])
    assert exported.attributes["payment.card"] == FILTERED
    body = str(recorder.requests)
    assert "5555555555554444" not in body


def test_captured_spans_are_what_would_be_exported() -> None:
    _init()
    with testing.capture_spans() as spans:
        with lookout.sdk.tracer().start_as_current_span("s") as span:
            span.set_attribute("customer.email", "otieno@example.com")
    assert spans()[0].attributes == {"customer.email": FILTERED}
