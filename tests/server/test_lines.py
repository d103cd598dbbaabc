"""The shipped-lines wire format (`lookout run` → POST /api/lookout/lines): a golden."""

from __future__ import annotations

import json
import os
from pathlib import Path

from lookout.ingest.limits import Limits
from lookout.ingest.lines import read_batch

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "lines"
RECORD = os.environ.get("LOOKOUT_RECORD_FIXTURES") == "1"
NOW_NS = 1_795_800_000_000_000_000


def test_golden_batch_parses_to_its_expected_records() -> None:
    document = json.loads((FIXTURES / "batch.json").read_text())
    key, outcome, dropped = read_batch(document, Limits(), NOW_NS)
    records = [
        {"ts_ns": r.ts_ns, "service": r.service, "level": r.level, "body": r.body,
         "trace_id": r.trace_id, "span_id": r.span_id, "attributes": r.attributes, "source": r.source}
        for r in outcome.records
    ]  # fmt: skip
    expected_path = FIXTURES / "batch.expected.json"
    if RECORD:
        expected_path.write_text(json.dumps(records, indent=2) + "\n")
    assert (key, dropped) == ("run:9f1c2a:7", 3)
    assert records == json.loads(expected_path.read_text())
