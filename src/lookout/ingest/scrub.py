"""Server-side scrubbing: the SDK's scrubber run on every record before it is stored.

Services that do not use the SDK (a collector, Promtail, a plain sentry-sdk) send raw data,
and an SDK can be misconfigured, so the server applies the same rules again (idempotent:
scrubbed text stays as it is). Config key `scrub` turns it off.
"""

from __future__ import annotations

import bisect
import itertools
import json
from collections.abc import Callable
from typing import Any

import orjson
import pyarrow as pa
import pyarrow.compute as pc

from lookout.model import Batch, LogColumns, SpanColumns, json_text
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
        text, mapping = self._text, self._mapping
        self._spans(batch.spans)
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

    def _spans(self, spans: SpanColumns) -> None:
        """Scrub span columns, as _logs() does log columns."""
        if not spans:
            return
        resources = _distinct(spans.resource)
        names, messages = _matching_each([spans.name, spans.status_message], TEXT_GATE)
        attributes, events, links, shared = _matching_each(
            [spans.attributes, spans.events, spans.links, resources], MAP_GATE
        )
        self._rows(spans.name, names, self._text)
        self._rows(spans.status_message, messages, self._text)
        self._rows(spans.attributes, attributes, self._json_map)
        self._rows(spans.events, events, self._json_value)
        self._rows(spans.links, links, self._json_value)
        spans.resource = self._shared(spans.resource, resources, shared)

    def _logs(self, logs: LogColumns) -> None:
        """Scrub log columns: Arrow's regex engine finds, over a request's columns at once,
        the values the rules could change (the gates); only those go through the scrubber.
        Most log lines hold nothing to scrub, and testing each in Python cost more than
        storing it. One call per gate: Arrow compiles the pattern at every call."""
        if not logs:
            return
        resources = _distinct(logs.resource)
        (bodies,) = _matching_each([logs.body], TEXT_GATE)
        attributes, shared = _matching_each([logs.attributes, resources], MAP_GATE)
        self._rows(logs.body, bodies, self._text)
        self._rows(logs.attributes, attributes, self._json_map)
        logs.resource = self._shared(logs.resource, resources, shared)

    @staticmethod
    def _rows(column: list[str], rows: list[int], scrub: Callable[[str], str]) -> None:
        for row in rows:
            column[row] = scrub(column[row])

    def _shared(self, column: list[str], distinct: list[str], rows: list[int]) -> list[str]:
        """A column of JSON maps that rows share (a resource), with each of its `distinct`
        texts at `rows` scrubbed once: the same list when nothing changed."""
        changed = {id(distinct[row]): self._json_map(distinct[row]) for row in rows}
        return [changed.get(id(text), text) for text in column] if changed else column

    def _json_map(self, text: str) -> str:
        return self._json(text, self._mapping)

    def _json_value(self, text: str) -> str:
        return self._json(text, self.scrubber.scrub_value)

    def _json(self, text: str, scrub: Callable[[Any], Any]) -> str:
        """JSON text, scrubbed by `scrub`: the same text when nothing changed."""
        try:
            value = orjson.loads(text)
        except orjson.JSONDecodeError:  # an integer beyond 64 bits (json_text wrote it)
            value = json.loads(text)
        found = json_text(scrub(value))
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


def _matching_each(columns: list[list[str]], pattern: str) -> list[list[int]]:
    """_matching() of each column, in one call over them all."""
    found = _matching(list(itertools.chain.from_iterable(columns)), pattern)
    ends = list(itertools.accumulate(len(column) for column in columns))
    rows: list[list[int]] = [[] for _ in columns]
    for index in found:
        which = bisect.bisect_right(ends, index)
        rows[which].append(index - (ends[which - 1] if which else 0))
    return rows


def _distinct(texts: list[str]) -> list[str]:
    """The distinct objects in `texts` (rows share a resource's text), in order."""
    return list({id(text): text for text in texts}.values())
