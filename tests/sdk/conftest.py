"""Fixtures for SDK tests: an in-process instrumented app with captured spans and logs."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from prometheus_client import CollectorRegistry

import lookout.sdk
from lookout.sdk import testing


@dataclass
class Instrumented:
    app: Any
    spans: testing.CapturedSpans
    logs: list[dict[str, Any]]
    registry: CollectorRegistry

    def client(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(
            transport=httpx.ASGITransport(app=self.app), base_url="http://testserver"
        )

    def sample(self, name: str, **labels: str) -> float | None:
        return self.registry.get_sample_value(name, labels)


Instrument = Callable[..., Instrumented]


@pytest.fixture
def instrument(registry: CollectorRegistry) -> Iterator[Instrument]:
    """`instrument(app, **init_options)`: init the SDK for `app`, capturing its output."""
    stack = ExitStack()

    def make(app: Any = None, **options: Any) -> Instrumented:
        options.setdefault("metrics_addr", "off")
        options.setdefault("traces_exporter", "none")
        options.setdefault("environ", {})
        wrapped = lookout.sdk.init(options.pop("service", "svc"), app=app, **options)
        spans = stack.enter_context(testing.capture_spans())
        logs = stack.enter_context(testing.capture_logs())
        return Instrumented(wrapped, spans, logs, registry)

    with stack:
        yield make
