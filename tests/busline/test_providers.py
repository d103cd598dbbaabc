"""The providers simulator as a real process: Daraja-shaped STK push, query and callback,
Airtel and card, the SMS gateway, the ledger, and the behaviour knobs."""

from __future__ import annotations

import base64
import json
import random
import signal
import statistics
import threading
from collections.abc import Iterator
from datetime import datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pytest

from busline.providers import MPESA_PASSKEY, MPESA_SHORTCODE, behaviours_from_env
from tests.busline.conftest import Platform
from tests.support import wait_until

FAST = {"BUSLINE_PROVIDERS_LATENCY_SCALE": "0.02", "BUSLINE_CALLBACK_DELAY_S": "0.2,0.4"}
PHONE = "254712345678"
TRACE_HEADERS = {"traceparent", "tracestate", "baggage", "x-trace-id"}


class Receiver:
    """A callback receiver on a real socket: records each request's path, headers and
    JSON body, and answers `status`."""

    def __init__(self) -> None:
        self.status = 200
        self.requests: list[tuple[str, dict[str, str], Any]] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length") or 0))
                headers = {k.lower(): v for k, v in self.headers.items()}
                receiver.requests.append((self.path, headers, json.loads(body or b"null")))
                self.send_response(receiver.status)
                self.send_header("content-length", "2")
                self.end_headers()
                self.wfile.write(b"{}")

            def log_message(self, *_: Any) -> None:
                return

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, args=(0.02,), daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    peer = Receiver()
    try:
        yield peer
    finally:
        peer.close()


def stk_body(callback_url: str, **overrides: Any) -> dict[str, Any]:
    stamp = datetime.now().strftime("%Y%m%d%H%M%S")
    password = base64.b64encode(f"{MPESA_SHORTCODE}{MPESA_PASSKEY}{stamp}".encode()).decode()
    body = {
        "BusinessShortCode": MPESA_SHORTCODE,
        "Password": password,
        "Timestamp": stamp,
        "TransactionType": "CustomerPayBillOnline",
        "Amount": 1500,
        "PartyA": PHONE,
        "PartyB": MPESA_SHORTCODE,
        "PhoneNumber": PHONE,
        "CallBackURL": callback_url,
        "AccountReference": "BLb0123456",
        "TransactionDesc": "Bus ticket",
    }
    body.update(overrides)
    return body


def query_body(checkout_id: str) -> dict[str, Any]:
    body = stk_body("http://unused")
    return {k: body[k] for k in ("BusinessShortCode", "Password", "Timestamp")} | {
        "CheckoutRequestID": checkout_id
    }


def ledger(platform: Platform) -> dict[str, Any]:
    answer: dict[str, Any] = httpx.get(platform.url("providers") + "/_sim/ledger").json()
    return answer


def test_stk_push_is_confirmed_later_by_a_callback_without_trace_headers(
    platform: Platform, receiver: Receiver
) -> None:
    """A valid push answers Daraja's acknowledgement; the query says "being processed"
    until the customer answers; then the callback arrives in Daraja's shape, carrying no
    trace context, and the ledger records the delivery. Logs never show the phone."""
    proc = platform.start("providers", BUSLINE_DECLINE_RATE="0", **FAST)
    url = platform.url("providers")
    assert url.startswith("http://127.0.0.2:")
    answer = httpx.post(
        f"{url}/mpesa/stkpush/v1/processrequest", json=stk_body(f"{receiver.url}/cb/mpesa")
    )
    assert answer.status_code == 200
    ack = answer.json()
    checkout = ack["CheckoutRequestID"]
    assert checkout.startswith("ws_CO_")
    assert {
        k: v for k, v in ack.items() if k not in ("MerchantRequestID", "CheckoutRequestID")
    } == {
        "ResponseCode": "0",
        "ResponseDescription": "Success. Request accepted for processing",
        "CustomerMessage": "Success. Request accepted for processing",
    }
    pending = httpx.post(f"{url}/mpesa/stkpushquery/v1/query", json=query_body(checkout))
    assert (pending.status_code, pending.json()["errorCode"]) == (500, "500.001.1001")

    wait_until(lambda: receiver.requests, 10.0, "the callback")
    path, headers, body = receiver.requests[0]
    assert path == "/cb/mpesa"
    assert TRACE_HEADERS & set(headers) == set()
    callback = body["Body"]["stkCallback"]
    items = {i["Name"]: i["Value"] for i in callback.pop("CallbackMetadata")["Item"]}
    assert callback == {
        "MerchantRequestID": ack["MerchantRequestID"],
        "CheckoutRequestID": checkout,
        "ResultCode": 0,
        "ResultDesc": "The service request is processed successfully.",
    }
    assert (items["Amount"], items["PhoneNumber"]) == (1500, int(PHONE))
    assert len(items["MpesaReceiptNumber"]) == 10

    final = httpx.post(f"{url}/mpesa/stkpushquery/v1/query", json=query_body(checkout)).json()
    assert (final["ResultCode"], final["CheckoutRequestID"]) == ("0", checkout)
    [entry] = ledger(platform)["payments"]
    assert (entry["id"], entry["provider"], entry["amount"], entry["result"]) == (
        checkout,
        "mpesa",
        1500,
        "success",
    )
    assert (entry["status"], entry["callback_delivered"]) == ("completed", True)
    assert [a["status"] for a in entry["callback_attempts"]] == [200]
    assert not any(PHONE in line for line in proc.lines)
    assert any(checkout in line for line in proc.lines)  # the negative control: logs exist


def test_daraja_refuses_bad_requests_naming_the_field(platform: Platform) -> None:
    """Each missing or malformed field is a 400 in Daraja's own error shape, naming it;
    nothing reaches the ledger."""
    platform.start("providers", **FAST)
    push = platform.url("providers") + "/mpesa/stkpush/v1/processrequest"
    cases = {
        "BusinessShortCode": {"BusinessShortCode": None},
        "Password": {"Password": base64.b64encode(b"174379wrong20260101000000").decode()},
        "Timestamp": {"Timestamp": "yesterday"},
        "TransactionType": {"TransactionType": "Refund"},
        "Amount": {"Amount": 0},
        "PhoneNumber": {"PhoneNumber": "255712345678"},
        "PartyA": {"PartyA": "254700000001"},
        "PartyB": {"PartyB": ""},
        "CallBackURL": {"CallBackURL": "not a url"},
        "AccountReference": {"AccountReference": "x" * 13},
        "TransactionDesc": {"TransactionDesc": ""},
    }
    seen = {}
    for name, override in cases.items():
        answer = httpx.post(push, json=stk_body("http://127.0.0.1:9/cb", **override))
        body = answer.json()
        assert set(body) == {"requestId", "errorCode", "errorMessage"}
        seen[name] = (answer.status_code, body["errorCode"], body["errorMessage"])
    assert seen == {name: (400, "400.002.02", f"Bad Request - Invalid {name}") for name in cases}
    not_json = httpx.post(push, content=b"{", headers={"content-type": "application/json"})
    assert (not_json.status_code, not_json.json()["errorMessage"]) == (
        400,
        "Bad Request - Invalid JSON",
    )
    assert ledger(platform)["payments"] == []


def test_declines_follow_the_configured_split_on_every_provider(
    platform: Platform, receiver: Receiver
) -> None:
    """With every push declined as "customer unreachable", each provider reports it in its
    own words: M-Pesa 1037, Airtel TF DP00800001024, card authentication_timeout."""
    platform.start(
        "providers",
        BUSLINE_DECLINE_RATE="1",
        BUSLINE_DECLINE_SPLIT="user_unreachable=1",
        **FAST,
    )
    url = platform.url("providers")
    httpx.post(f"{url}/mpesa/stkpush/v1/processrequest", json=stk_body(f"{receiver.url}/mpesa"))
    airtel = httpx.post(
        f"{url}/airtel/merchant/v1/payments/",
        headers={"X-Country": "KE", "X-Currency": "KES"},
        json={
            "reference": "ticket",
            "subscriber": {"country": "KE", "currency": "KES", "msisdn": "733123456"},
            "transaction": {"amount": 900, "country": "KE", "currency": "KES", "id": "pay-1"},
            "callback_url": f"{receiver.url}/airtel",
        },
    )
    assert airtel.json()["data"]["transaction"] == {"id": "pay-1", "status": "Success."}
    card = httpx.post(
        f"{url}/card/v1/charges",
        json={
            "amount": 120000,
            "currency": "KES",
            "reference": "pay-2",
            "callback_url": f"{receiver.url}/card",
        },
    )
    assert (card.status_code, card.json()["status"]) == (202, "processing")
    wait_until(lambda: len(receiver.requests) == 3, 10.0, "three callbacks")
    bodies = {path: body for path, _, body in receiver.requests}
    assert bodies["/mpesa"]["Body"]["stkCallback"]["ResultCode"] == 1037
    assert "CallbackMetadata" not in bodies["/mpesa"]["Body"]["stkCallback"]
    assert bodies["/airtel"] == {
        "transaction": {
            "id": "pay-1",
            "message": "Transaction timed out",
            "status_code": "TF",
            "response_code": "DP00800001024",
            "airtel_money_id": "",
        }
    }
    charge = bodies["/card"]["data"]["object"]
    assert (
        bodies["/card"]["type"],
        charge["status"],
        charge["failure_code"],
        charge["amount"],
    ) == (
        "charge.failed",
        "failed",
        "authentication_timeout",
        120000,
    )
    status = httpx.get(f"{url}/airtel/standard/v1/payments/pay-1").json()
    assert status["data"]["transaction"]["status"] == "TF"
    charge_now = httpx.get(f"{url}/card/v1/charges/{charge['id']}").json()
    assert charge_now["failure_code"] == "authentication_timeout"
    assert {e["result"] for e in ledger(platform)["payments"]} == {"user_unreachable"}


def test_airtel_and_card_refuse_bad_requests_in_their_own_shapes(platform: Platform) -> None:
    """Airtel answers its status envelope; the card acquirer names the parameter."""
    platform.start("providers", **FAST)
    url = platform.url("providers")
    good = {
        "reference": "ticket",
        "subscriber": {"country": "KE", "currency": "KES", "msisdn": "733123456"},
        "transaction": {"amount": 900, "country": "KE", "currency": "KES", "id": "pay-9"},
        "callback_url": "http://127.0.0.1:9/airtel",
    }
    no_country = httpx.post(f"{url}/airtel/merchant/v1/payments/", json=good)
    assert (no_country.status_code, no_country.json()["status"]["success"]) == (400, False)
    bad_msisdn = httpx.post(
        f"{url}/airtel/merchant/v1/payments/",
        headers={"X-Country": "KE", "X-Currency": "KES"},
        json={**good, "subscriber": {"msisdn": "255712345678"}},
    )
    assert bad_msisdn.json() == {
        "status": {
            "code": "400",
            "message": "Invalid msisdn: 9 digits without the country code",
            "result_code": "ESB000008",
            "success": False,
        }
    }
    card = httpx.post(
        f"{url}/card/v1/charges",
        json={"amount": 150, "currency": "KES", "reference": "r", "callback_url": "http://x/y"},
    )
    assert (card.status_code, card.json()["error"]["param"]) == (400, "amount")
    missing = httpx.get(f"{url}/card/v1/charges/ch_nope")
    assert (missing.status_code, missing.json()["error"]["code"]) == (404, "resource_missing")
    assert ledger(platform)["payments"] == []


def test_a_failing_callback_url_is_retried_then_given_up(
    platform: Platform, receiver: Receiver
) -> None:
    """A callback answered 500 is retried (4 attempts in all); each attempt is in the ledger."""
    receiver.status = 500
    platform.start("providers", BUSLINE_DECLINE_RATE="0", **FAST)
    url = platform.url("providers")
    httpx.post(f"{url}/mpesa/stkpush/v1/processrequest", json=stk_body(f"{receiver.url}/cb"))

    def attempts() -> list[Any]:
        [entry] = ledger(platform)["payments"]
        found: list[Any] = entry["callback_attempts"]
        return found if len(found) == 4 else []

    assert [a["status"] for a in wait_until(attempts, 10.0, "four attempts")] == [500] * 4
    assert len(receiver.requests) == 4
    assert ledger(platform)["payments"][0]["callback_delivered"] is False


def test_sms_with_a_repeated_client_ref_is_sent_once(platform: Platform) -> None:
    """A repeated client_ref answers the first message id and sends nothing new."""
    platform.start("providers", **FAST)
    send = platform.url("providers") + "/sms/v1/messages"
    first = httpx.post(send, json={"to": PHONE, "message": "Seat 4A", "client_ref": "evt-1"})
    again = httpx.post(send, json={"to": PHONE, "message": "Seat 4A", "client_ref": "evt-1"})
    other = httpx.post(send, json={"to": PHONE, "message": "Seat 5B", "client_ref": "evt-2"})
    assert (first.status_code, again.status_code, other.status_code) == (201, 201, 201)
    assert again.json() == first.json()
    assert again.headers.get("idempotent-replayed") == "true"
    assert other.json()["message_id"] != first.json()["message_id"]
    sms = ledger(platform)["sms"]
    assert [(s["to"], s["message"], s["client_ref"], s["duplicates"]) for s in sms] == [
        (PHONE, "Seat 4A", "evt-1", 1),
        (PHONE, "Seat 5B", "evt-2", 0),
    ]
    assert sms[0]["message_id"] == first.json()["message_id"]
    bad = httpx.post(send, json={"to": "call me", "message": "x"})
    assert (bad.status_code, bad.json()["code"]) == (400, "invalid_to")


def test_the_ledger_survives_a_restart_and_pending_callbacks_still_arrive(
    platform: Platform, receiver: Receiver
) -> None:
    """Killed before the customer answered, the simulator keeps its ledger (the JSONL
    file) and, restarted, still delivers the callback; SMS dedup survives too."""
    platform.start(
        "providers",
        BUSLINE_DECLINE_RATE="0",
        BUSLINE_PROVIDERS_LATENCY_SCALE="0.02",
        BUSLINE_CALLBACK_DELAY_S="1.5,1.5",
    )
    url = platform.url("providers")
    ack = httpx.post(f"{url}/mpesa/stkpush/v1/processrequest", json=stk_body(f"{receiver.url}/c"))
    sms = httpx.post(
        f"{url}/sms/v1/messages", json={"to": PHONE, "message": "m", "client_ref": "e"}
    )
    platform.stop("providers", signal.SIGKILL)
    assert (platform.state / "providers" / "ledger.jsonl").exists()
    platform.start("providers", **FAST)
    book = ledger(platform)
    assert [e["id"] for e in book["payments"]] == [ack.json()["CheckoutRequestID"]]
    wait_until(lambda: receiver.requests, 10.0, "the callback after the restart")
    again = httpx.post(
        platform.url("providers") + "/sms/v1/messages",
        json={"to": PHONE, "message": "m", "client_ref": "e"},
    )
    assert again.json()["message_id"] == sms.json()["message_id"]
    assert wait_until(lambda: ledger(platform)["payments"][0]["callback_delivered"], 5.0)


def test_the_error_rate_knob_answers_5xx_for_that_provider_only(platform: Platform) -> None:
    """BUSLINE_ERROR_RATE=mpesa=1 fails every M-Pesa call in Daraja's 5xx shape; the SMS
    gateway still works."""
    platform.start("providers", BUSLINE_ERROR_RATE="mpesa=1", **FAST)
    url = platform.url("providers")
    failed = httpx.post(f"{url}/mpesa/stkpush/v1/processrequest", json=stk_body("http://x/cb"))
    assert (failed.status_code, failed.json()["errorCode"]) == (500, "500.003.1001")
    sms = httpx.post(f"{url}/sms/v1/messages", json={"to": PHONE, "message": "m"})
    assert sms.status_code == 201
    assert ledger(platform)["payments"] == []


def test_behaviour_follows_the_documented_distributions() -> None:
    """Default M-Pesa: request latency median about 600 ms, answers within 3-20 s, about
    5 % declined split 60/25/15; the same seed makes the same decisions."""
    mpesa = behaviours_from_env({})["mpesa"]
    rng = random.Random(1)
    latencies = [mpesa.request_delay(rng) for _ in range(4000)]
    assert 0.57 < statistics.median(latencies) < 0.63
    answers = [mpesa.answer_after(rng) for _ in range(4000)]
    assert min(answers) >= 3.0
    assert max(answers) <= 20.0
    outcomes = [mpesa.outcome(rng) for _ in range(40000)]
    declined = [o for o in outcomes if o != "success"]
    assert 0.045 < len(declined) / len(outcomes) < 0.055
    share = {r: declined.count(r) / len(declined) for r in set(declined)}
    assert abs(share["user_cancelled"] - 0.6) < 0.04
    assert abs(share["insufficient_funds"] - 0.25) < 0.04
    assert abs(share["user_unreachable"] - 0.15) < 0.04
    first, second = random.Random(7), random.Random(7)
    assert [mpesa.outcome(first) for _ in range(500)] == [mpesa.outcome(second) for _ in range(500)]
    knobs = behaviours_from_env({"BUSLINE_CALLBACK_DELAY_S": "1,2", "BUSLINE_ERROR_RATE": "0.5"})
    assert {(b.callback_delay_s, b.error_rate) for b in knobs.values()} == {((1.0, 2.0), 0.5)}
    with pytest.raises(ValueError, match="BUSLINE_DECLINE_RATE"):
        behaviours_from_env({"BUSLINE_DECLINE_RATE": "lots"})
