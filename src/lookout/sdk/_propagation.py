"""Trace context in and out: W3C traceparent, tracestate and baggage, plus X-Trace-Id.

Inbound, an internal service continues the caller's trace; the edge
(`trust_inbound_context=False`) always starts a new one and keeps a client's id as a
link. Outbound, headers go only to hosts on the allow-list (LOOKOUT_PROPAGATE_TO).
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, MutableMapping
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

from opentelemetry import baggage, context, trace
from opentelemetry.baggage.propagation import W3CBaggagePropagator
from opentelemetry.propagators.textmap import TextMapPropagator
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

X_TRACE_ID = "x-trace-id"
PROPAGATION_HEADERS = ("traceparent", "tracestate", "baggage", X_TRACE_ID)
_INBOUND_HEADERS = ("traceparent", "baggage", X_TRACE_ID)
_TRACE_ID_RE = re.compile(r"[0-9a-f]{32}")
_INTERNAL_SUFFIXES = (".internal", ".local", ".svc", ".cluster.local", ".localhost")


def parse_trace_id(value: str | None) -> int | None:
    """A valid X-Trace-Id is exactly 32 lowercase hex digits and not all zero."""
    if value is None or not _TRACE_ID_RE.fullmatch(value):
        return None
    number = int(value, 16)
    return number or None


def format_trace_id(trace_id: int) -> str:
    return format(trace_id, "032x")


def format_span_id(span_id: int) -> str:
    return format(span_id, "016x")


@dataclass
class Inbound:
    """What an inbound request carried, decided for one server span."""

    parent: context.Context
    root_trace_id: int | None = None
    links: list[trace.Link] = field(default_factory=list)
    attributes: dict[str, Any] = field(default_factory=dict)


class Propagation:
    """Extracts and injects context by the configured propagators and allow-list."""

    def __init__(self, propagators: Iterable[str], allow: Iterable[str]) -> None:
        chosen: list[TextMapPropagator] = []
        names = set(propagators)
        if "none" not in names:
            if "tracecontext" in names:
                chosen.append(TraceContextTextMapPropagator())
            if "baggage" in names:
                chosen.append(W3CBaggagePropagator())
        self.propagators: tuple[TextMapPropagator, ...] = tuple(chosen)
        self.allow = AllowList(allow)

    def extract(self, headers: dict[str, str], *, trust: bool) -> Inbound:
        """Decide the parent of a server span from the request's headers."""
        if not any(name in headers for name in _INBOUND_HEADERS):
            return Inbound(parent=context.Context())  # the common case at the edge
        extracted = context.Context()
        for propagator in self.propagators:
            extracted = propagator.extract(headers, context=extracted)
        remote = trace.get_current_span(extracted).get_span_context()
        raw_x = headers.get(X_TRACE_ID)
        x_trace_id = parse_trace_id(raw_x)
        inbound = Inbound(parent=extracted if trust else context.Context())
        if raw_x is not None and x_trace_id is None:
            inbound.attributes["http.request.header.x-trace-id"] = (raw_x[:64],)
        if trust:
            if not remote.is_valid and x_trace_id is not None:
                inbound.root_trace_id = x_trace_id
            return inbound
        # The edge: a client's context is a hint, never a parent; its baggage is dropped.
        client_id = remote.trace_id if remote.is_valid else x_trace_id
        if client_id:
            inbound.attributes["lookout.client_trace_id"] = format_trace_id(client_id)
            link_ctx = (
                remote
                if remote.is_valid
                else trace.SpanContext(client_id, 1, is_remote=True)  # span unknown
            )
            inbound.links.append(trace.Link(link_ctx, {"lookout.link.reason": "client_context"}))
        return inbound

    def inject(self, headers: MutableMapping[str, str], host: str, port: int | None) -> bool:
        """Add context headers for an allowed host; strip them for any other. True if added."""
        if not self.allow.permits(host, port):
            for name in PROPAGATION_HEADERS:
                headers.pop(name, None)
            return False
        ctx = context.get_current()
        span_context = trace.get_current_span(ctx).get_span_context()
        if not span_context.is_valid:
            return False
        for propagator in self.propagators:
            propagator.inject(headers, context=ctx)
        headers[X_TRACE_ID] = format_trace_id(span_context.trace_id)
        return True


def current_baggage() -> dict[str, object]:
    return dict(baggage.get_all())


class AllowList:
    """Which hosts may receive trace headers.

    Patterns: `host` (any port), `host:port`, `[v6]:port`, `*.domain`, a CIDR such as
    `10.0.0.0/8`, `internal` (loopback, single-label names, *.internal, *.local, *.svc,
    *.cluster.local) and `none`.
    """

    def __init__(self, patterns: Iterable[str]) -> None:
        self.patterns = tuple(p.strip().lower() for p in patterns if p.strip())
        self._networks: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = []
        self._hosts: set[str] = set()
        self._host_ports: set[tuple[str, int]] = set()
        self._suffixes: list[str] = []
        self._internal = False
        for pattern in self.patterns:
            self._add(pattern)
        self.permits = lru_cache(maxsize=1024)(self._permits)

    def _add(self, pattern: str) -> None:
        if pattern == "none":
            return
        if pattern == "internal":
            self._internal = True
        elif "/" in pattern:
            self._networks.append(ipaddress.ip_network(pattern, strict=False))
        elif pattern.startswith("*."):
            self._suffixes.append(pattern[1:])
        elif re.fullmatch(r"\[[^\]]+\]:\d+|[^:\[\]]+:\d+", pattern):
            host, _, port = pattern.rpartition(":")
            self._host_ports.add((host.strip("[]"), int(port)))
        else:
            self._hosts.add(pattern.strip("[]"))

    def _permits(self, host: str, port: int | None) -> bool:
        host = host.lower().strip("[]").rstrip(".")
        if host in self._hosts or (port is not None and (host, port) in self._host_ports):
            return True
        if any(host.endswith(suffix) for suffix in self._suffixes):
            return True
        address = _ip(host)
        if address is not None and any(address in net for net in self._networks):
            return True
        return self._internal and _is_internal(host, address)


def _ip(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


def _is_internal(host: str, address: ipaddress.IPv4Address | ipaddress.IPv6Address | None) -> bool:
    if address is not None:
        return address.is_loopback
    if host == "localhost" or "." not in host:
        return True
    return host.endswith(_INTERNAL_SUFFIXES)
