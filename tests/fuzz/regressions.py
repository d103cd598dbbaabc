"""Inputs that once broke a parser, by fuzz target: each property tries them first (as
hypothesis `@example`s), so a fixed bug stays fixed. The comment says what each one raised.
"""

from __future__ import annotations

import datetime
import json
from typing import Any

from lookout.ingest.loki import PushRequest
from tests.fuzz import seeds


def _deep(depth: int = 50_000) -> bytes:
    return b"[" * depth + b"]" * depth


def _envelope(item_type: str, payload: bytes) -> bytes:
    return b"{}\n" + json.dumps({"type": item_type}).encode() + b"\n" + payload


def _loki_protobuf_with_invalid_utf8() -> bytes:
    """A push whose labels, line and metadata carry bytes that are not UTF-8."""
    request = PushRequest()
    stream = request.streams.add()
    stream.labels = '{job="LABEL"}'
    entry = stream.entries.add()
    entry.timestamp.seconds = seeds.NOW_NS // 10**9
    entry.line = "LINE"
    pair = entry.structuredMetadata.add()
    pair.name, pair.value = "KEY", "VALUE"
    raw = request.SerializeToString()
    for marker in (b"LABEL", b"LINE", b"KEY", b"VALUE"):
        raw = raw.replace(marker, b"\xff" * len(marker))
    return seeds.loki_push_request(raw)


_TRACE = {"trace_id": "ab" * 16, "span_id": "cd" * 8}
_SENTRY_EVENTS = [
    b'{"message": "plain\\ud800"}',  # UnicodeEncodeError (fingerprint hashing)
    b'{"contexts": [1]}',  # AttributeError: 'list' object has no attribute 'get'
    b'{"logentry": "x", "message": ""}',  # AttributeError on a string
    b'{"exception": {"values": [{"type": "E", "stacktrace": [1]}]}}',  # AttributeError
    b'{"exception": {"values": [{"type": "E", "stacktrace": {"frames": 3}}]}}',  # TypeError
    b'{"exception": 5}',  # TypeError: 'int' object is not iterable
    b'{"message": ' + _deep() + b"}",  # RecursionError
]
_OTLP_KEYS = {"traces": "resourceSpans", "logs": "resourceLogs", "metrics": "resourceMetrics"}
# An integer or enum field given as infinity: OverflowError from protobuf's ParseDict.
_OTLP_INFINITE = {
    "traces": b'{"resourceSpans": [{"scopeSpans": [{"spans": [{"kind": 1e999}]}]}]}',
    "logs": b'{"resourceLogs": [{"scopeLogs": [{"logRecords": [{"severityNumber": -1e999}]}]}]}',
    "metrics": b'{"resourceMetrics": [{"scopeMetrics": [{"metrics": [{"sum": '
    b'{"aggregationTemporality": 1e999}}]}]}]}',
}


def otlp_json(signal: str) -> tuple[bytes, ...]:
    key = _OTLP_KEYS[signal].encode()
    return (
        b'{"' + key + b'": ' + _deep() + b"}",  # RecursionError from json.loads
        b'{"\\ud800": []}',  # SystemError from protobuf's ParseDict: a 500
        b'{"' + key + b'": [["\\ud800"]]}',  # SystemError, the surrogate as a value
        b'{"' + key + b'": [{"x\\udfff": 1}]}',  # SystemError, deeper down
        _OTLP_INFINITE[signal],
    )


REGRESSIONS: dict[str, tuple[Any, ...]] = {
    **{f"otlp_json_{signal}": otlp_json(signal) for signal in _OTLP_KEYS},
    "sentry_envelope": (
        *(_envelope("event", event) for event in _SENTRY_EVENTS),
        b"{}\n" + _deep(),  # RecursionError in an item header
        _envelope(
            "transaction",
            json.dumps(
                {  # TypeError: 'list' is not a mapping (**data)
                    "contexts": {"trace": _TRACE},
                    "spans": [{"span_id": "ef" * 8, "data": [1]}],
                }
            ).encode(),
        ),
        _envelope("transaction", json.dumps({"contexts": {"trace": _TRACE}, "spans": 5}).encode()),
        # TypeError: unhashable type: 'dict' (a status looked up in a set)
        _envelope(
            "transaction",
            json.dumps(
                {
                    "contexts": {"trace": {**_TRACE, "status": {}}},
                    "spans": [{"span_id": "ef" * 8, "status": []}],
                }
            ).encode(),
        ),
        _envelope("client_report", b'{"discarded_events": 7}'),  # TypeError
        # OverflowError: int too large to convert to float
        _envelope("check_in", b'{"duration": 1' + b"0" * 400 + b"}"),
        # ValueError, TypeError, OverflowError; a negative count failed the metric's inc()
        _envelope(
            "client_report",
            b'{"discarded_events": [{"quantity": "3"}, '
            b'{"quantity": [1]}, {"quantity": 1e999}, {"quantity": -2}]}',
        ),
    ),
    "sentry_store": tuple(_SENTRY_EVENTS),
    "lines": (
        b'{"source": "s", "seq": 1, "lines": [{"text": "a\\ud800"}]}',  # UnicodeEncodeError
        # OverflowError: a line's timestamp past float; a `dropped` count past int64
        b'{"source": "s", "seq": 1, "dropped": 1' + b"0" * 400 + b', "lines": [{"text": '
        b'"{\\"timestamp\\": 1' + b"0" * 400 + b', \\"event\\": 1}"}]}',
        b'{"source": "\\ud800", "seq": 1, "service": "\\udfff", "lines": [{"text": "a"}]}',
        # A JSON-looking line nested too deeply: RecursionError lost the whole batch
        json.dumps(
            {
                "source": "s",
                "seq": 1,
                "lines": [{"text": '{"a": ' + "[" * 50_000 + "]" * 50_000 + "}"}],
            }
        ).encode(),
        json.dumps({"source": "s", "seq": 1, "lines": [{"text": '{"event": "\\ud800"}'}]}).encode(),
        # A 503 from the store: a ts_ns past int64 became the record's observed time
        json.dumps(
            {
                "source": "s",
                "seq": 1,
                "lines": [
                    {"ts_ns": 2**70, "text": '{"event": "x", "timestamp": "2026-11-27T16:00:00Z"}'}
                ],
            }
        ).encode(),
    ),
    "loki_json": (
        b'{"streams": ' + _deep() + b"}",  # RecursionError
        b'{"streams": [{"stream": {"a": "b"}, "values": 5}]}',  # TypeError
        b'{"streams": [{"stream": {"a": "b"}, "values": [[1e999, "x"]]}]}',  # OverflowError
        b'{"streams": [{"stream": {"a": "b"}, "values": [[-1e999, "x"]]}]}',
        # UnicodeEncodeError on the line's length
        b'{"streams": [{"stream": {"a\\ud800": "b"}, "values": [["1795799990000000000", '
        b'"x\\ud800"]]}]}',
    ),
    "loki_protobuf": (
        # AttributeError: 'bytes' object has no attribute 'encode' (protobuf hands over
        # bytes for a string field that is not UTF-8)
        _loki_protobuf_with_invalid_utf8(),
    ),
    "openmetrics": (
        # KeyError: 'count' from prometheus_client, which killed the target's scrape loop
        "# TYPE http_server_request_duration_seconds histogram\n"
        'http_s erver_request_duration_seconds_,count{http_route="/api/trips"} 42',
    ),
    "scrape_config": (
        # KeyError: '__address__' when relabeling empties the address
        [
            {
                "job_name": "a",
                "static_configs": [{"targets": ["h:1"]}],
                "relabel_configs": [{"target_label": "__address__", "replacement": ""}],
            }
        ],
        # re.error: a backslash, or a group the regex does not have, in a template
        [
            {
                "job_name": "a",
                "static_configs": [{"targets": ["h:1"]}],
                "relabel_configs": [
                    {
                        "source_labels": ["__address__"],
                        "target_label": "x\\",
                        "replacement": "$7\\q",
                    },
                    {"regex": "(.*)", "action": "labelmap", "replacement": "$5"},
                    {"target_label": "$x", "replacement": "${1}"},
                ],
            }
        ],
        # TypeError and AttributeError on lists that are not lists, labels that are not a map
        [{"job_name": "a", "file_sd_configs": datetime.date(2026, 1, 1)}],
        [{"job_name": "a", "static_configs": 5}],
        [{"job_name": "a", "relabel_configs": True}],
        [{"job_name": "a", "static_configs": [{"targets": [], "labels": ["x"]}]}],
        # TypeError: sorting unknown keys of mixed types (YAML keys may be numbers)
        [{"job_name": "a", 1: "x", "b": 2}],
    ),
}
