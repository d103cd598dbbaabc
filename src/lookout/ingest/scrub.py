"""Server-side scrubbing: the SDK's scrubber run on every record before it is stored.

Services that do not use the SDK (a collector, Promtail, a plain sentry-sdk) send raw data,
and an SDK can be misconfigured, so the server applies the same rules again (idempotent:
scrubbed text stays as it is). Config key `scrub` turns it off.
"""

from __future__ import annotations

import json
from typing import Any

import orjson
import pyarrow as pa
import pyarrow.compute as pc

from lookout.model import Batch, LogColumns, json_text
from lookout.sdk._scrub import MAP_GATE, TEXT_GATE, Scrubber

_LABEL_CACHE_MAX = 200_000
# Strings up to this long are remembered once scrubbed (names, routes, label values).
_CACHED_TEXT = 256


class BatchScrubber:
    """Scrubs a batch in place: free text, attribute maps, event payloads, metric labels.

    One instance serves the whole server: what a short string became is remembered (a
    bounded cache), since names, routes and attribute values repeat from batch to batch."""

    def __init__(self, scrubber: Scrubber) -> None:
        self.scrubber = scrubber
        # Label pairs repeat on every scrape and export: scrub each distinct one once.
        self._labels: dict[tuple[str, str], str] = {}

    def __call__(self, batch: Batch) -> None:
        scrub = self.scrubber
        text, value, mapping = self._text, scrub.scrub_value, self._mapping
        # Records of one resource share its attribute map: scrub each map once.
        resources: dict[int, dict[str, Any]] = {}

        def resource(attributes: dict[str, Any]) -> dict[str, Any]:
            found = resources.get(id(attributes))
            if found is None:
                found = resources[id(attributes)] = mapping(attributes)
            return found

        for span in batch.spans:
            span.name = text(span.name)
            span.status_message = text(span.status_message)
            span.attributes = mapping(span.attributes)
            span.resource = resource(span.resource)
            if span.events:
                span.events = value(span.events)
            if span.links:
                span.links = value(span.links)
        self._logs(batch.logs)
        for event in batch.events:
            event.title = text(event.title)
            event.message = text(event.message)
            event.user = mapping(event.user)
            event.tags = {k: str(v) for k, v in mapping(event.tags).items()}
            event.payload = mapping(event.payload)
        for sample in batch.samples:
            labels = sample.labels
            if any(self._label(k, v) != v for k, v in labels.items()):
                sample.labels = {k: self._label(k, v) for k, v in labels.items()}
            if sample.exemplar:
                sample.exemplar = mapping(sample.exemplar)
        for run in batch.job_runs:
            run.monitor = text(run.monitor)

    def _logs(self, logs: LogColumns) -> None:
        """Scrub log columns: Arrow's regex engine finds, a column at a time, the values the
        rules could change (the gates); only those go through the scrubber. Most log lines
        hold nothing to scrub, and testing each in Python cost more than storing it."""
        if not logs:
            return
        bodies = logs.body
        for row in _matching(bodies, TEXT_GATE):
            bodies[row] = self._text(bodies[row])
        attributes = logs.attributes
        for row in _matching(attributes, MAP_GATE):
            attributes[row] = self._json_map(attributes[row])
        resources = logs.resource
        distinct = list({id(text): text for text in resources}.values())  # shared texts
        changed = {
            id(distinct[i]): self._json_map(distinct[i]) for i in _matching(distinct, MAP_GATE)
        }
        if changed:
            logs.resource = [changed.get(id(text), text) for text in resources]

    def _json_map(self, text: str) -> str:
        """A JSON map, scrubbed: the same text when nothing changed."""
        try:
            value = orjson.loads(text)
        except orjson.JSONDecodeError:  # an integer beyond 64 bits (json_text wrote it)
            value = json.loads(text)
        scrubbed = self._mapping(value)
        found = json_text(scrubbed)
        return text if found == text else found

    def _text(self, text: str) -> str:
        if len(text) > _CACHED_TEXT:
            return self.scrubber.scrub_text(text)
        return self._label("", text)

    def _mapping(self, mapping: dict[str, Any]) -> dict[str, Any]:
        """scrub_mapping, remembering short string values: attribute values repeat."""
        field = self.scrubber.scrub_field
        return {
            key: self._label(key, value)
            if isinstance(value, str) and len(value) <= _CACHED_TEXT
            else field(str(key), value)
            for key, value in mapping.items()
        }

    def _label(self, key: str, label: str) -> str:
        """The scrubbed value of one key and string value (free text: key ""), remembered."""
        found = self._labels.get((key, label))
        if found is None:
            if len(self._labels) >= _LABEL_CACHE_MAX:
                self._labels.clear()
            scrub = self.scrubber
            scrubbed = scrub.scrub_field(key, label) if key else scrub.scrub_text(label)
            found = label if scrubbed == label else str(scrubbed)
            self._labels[key, label] = found
        return found


def _matching(values: list[str], pattern: str) -> list[int]:
    """The indexes of `values` where RE2 `pattern` matches."""
    if not values:
        return []
    found = pc.match_substring_regex(pa.array(values, type=pa.string()), pattern)
    return pc.indices_nonzero(found).to_pylist()  # type: ignore[no-any-return]
