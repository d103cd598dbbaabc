"""What the parsers now do with the inputs the fuzzer found breaking them (the inputs
themselves are in regressions.py); and the one blowup too big for a fuzz input."""

from __future__ import annotations

import json
import time

import cramjam
import pytest

from lookout.errors import IngestError
from lookout.ingest import jsonbody, loki, scrape, sentry
from lookout.ingest.limits import Limits
from lookout.ingest.lines import read_batch
from tests.fuzz import regressions, seeds

NOW_NS = seeds.NOW_NS


def test_an_envelope_of_many_small_items_parses_in_linear_time() -> None:
    """160,000 items (3.5 MB): 0.7 s walking by offset, about 25 s when each item sliced
    the rest of the body off."""
    body = b"{}\n" + b'{"type":"session"}\n{}\n' * 160_000
    started = time.perf_counter()
    envelope = sentry.parse_envelope(body)
    assert len(envelope.items) == 160_000
    assert time.perf_counter() - started < 5


def test_envelope_items_keep_their_boundaries() -> None:
    body = b'{"event_id":"ab"}\n{"type":"a","length":3}\nx\ny\n\n{"type":"b"}\nz\n{"type":"c"}'
    assert [(i.type, i.payload) for i in sentry.parse_envelope(body).items] == [
        ("a", b"x\ny"),
        ("b", b"z"),
        ("c", b""),
    ]


def test_lone_surrogates_become_replacement_characters() -> None:
    assert jsonbody.load_json(b'{"a\\ud800": ["x\\udfffy", 1]}', "body") == {
        "a\ufffd": ["x\ufffdy", 1]
    }
    assert jsonbody.load_json(b'"\\ud83d\\ude00"', "body") == "\U0001f600"  # a pair is kept


def test_json_nested_too_deeply_is_a_clear_ingest_error() -> None:
    with pytest.raises(IngestError) as caught:
        jsonbody.load_json(b"[" * 100_000 + b"]" * 100_000, "Loki JSON push")
    assert str(caught.value) == "Loki JSON push is nested too deeply to parse."


def test_odd_shapes_of_sentry_sub_fields_count_as_absent() -> None:
    event = {"message": "boom", "contexts": [1], "logentry": "x",
             "exception": {"values": [{"type": "E", "stacktrace": {"frames": 3}}]}}  # fmt: skip
    intake = sentry.read_store(json.dumps(event).encode(), 1, NOW_NS)
    assert [(e.title, e.trace_id) for e in intake.batch.events] == [("E: boom", "")]


def test_a_client_report_count_that_is_not_a_whole_number_counts_as_zero() -> None:
    report = b'{"discarded_events": [{"reason": "r", "category": "c", "quantity": "3"}, ' \
             b'{"reason": "r", "category": "c", "quantity": -2}]}'  # fmt: skip
    body = b"{}\n" + b'{"type":"client_report"}\n' + report
    assert sentry.read_envelope(body, 1, NOW_NS).discarded == [("r", "c", 0), ("r", "c", 0)]


def test_a_shipped_line_with_an_impossible_time_gets_the_server_time() -> None:
    line = '{"event": "x", "timestamp": 1' + "0" * 400 + "}"
    batch = {"source": "s", "seq": 1, "lines": [{"ts_ns": 2**70, "text": line}]}
    _, outcome, _ = read_batch(batch, Limits(), NOW_NS)
    assert [(r.ts_ns, r.observed_ns) for r in outcome.records] == [(NOW_NS, NOW_NS)]


def test_loki_protobuf_strings_that_are_not_utf8_are_kept_with_replacement_characters() -> None:
    (body,) = regressions.REGRESSIONS["loki_protobuf"]
    (record,) = loki.read_push(body, "application/x-protobuf", None, Limits(), NOW_NS).records
    assert (record.body, record.service) == ("\ufffd" * 4, "\ufffd" * 5)


def test_a_loki_timestamp_of_infinity_is_a_clear_ingest_error() -> None:
    body = b'{"streams": [{"stream": {"a": "b"}, "values": [[1e999, "x"]]}]}'
    with pytest.raises(IngestError) as caught:
        loki.read_push(body, "application/json", None, Limits(), NOW_NS)
    assert str(caught.value) == "Timestamp inf is not Unix nanoseconds."


def test_relabel_templates_expand_as_prometheus_does() -> None:
    """`$n` of a group the regex lacks is empty; backslashes are literal."""
    (config,) = scrape.parse_scrape_configs([{"job_name": "a", "relabel_configs": [
        {"source_labels": ["__address__"], "regex": "([^:]+):(.*)", "target_label": "x\\y",
         "replacement": "${2}\\$1$7"}]}])  # fmt: skip
    assert scrape.relabel({"__address__": "h:9"}, config.relabel) == {
        "__address__": "h:9",
        "x\\y": "9\\h",
    }


def test_relabeling_the_address_away_drops_the_target() -> None:
    (config,) = scrape.parse_scrape_configs([{"job_name": "a",
        "static_configs": [{"targets": ["h:1"]}],
        "relabel_configs": [{"target_label": "__address__", "replacement": ""}]}])  # fmt: skip
    active, dropped = scrape.targets_of(config)
    assert (active, [d["__address__"] for d in dropped]) == ([], ["h:1"])


def test_what_the_exposition_library_raises_on_a_broken_body_is_a_value_error() -> None:
    (text,) = regressions.REGRESSIONS["openmetrics"]
    with pytest.raises(ValueError, match=r"^The exposition does not parse: KeyError"):
        scrape.parse_exposition(text, "application/openmetrics-text")


def test_snappy_seed_round_trips() -> None:
    """The Loki seed the mutators start from is the golden push, re-dated."""
    raw = seeds.loki_raw(seeds.loki_protobuf(NOW_NS)[0])
    assert bytes(cramjam.snappy.decompress_raw(seeds.loki_push_request(raw))) == raw
