"""Error capture through sentry-sdk, linked to OpenTelemetry traces and scrubbed.

sentry-sdk starts only when a DSN is given. Each event carries the stack trace with local
variables, the scrubbed request, the user set through `set_user()`, the service,
environment and release, and the trace_id and span_id of the span that failed, so the
error links to its trace. Error logs are breadcrumbs only (one failure makes one issue),
and sentry-sdk's own performance tracing stays off unless SENTRY_TRACES_SAMPLE_RATE asks.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterator, Mapping, MutableMapping
from typing import Any

from opentelemetry import trace
from opentelemetry.sdk import trace as sdk_trace

from lookout.sdk._guard import guard
from lookout.sdk._scrub import Scrubber
from lookout.sdk._settings import Settings

_SPAN_ATTR = "_lookout_span"
_enabled = False
# Set by lookout.sdk.testing.capture_errors(): finished events go here instead of the wire.
captured: list[dict[str, Any]] | None = None
_original_record_exception = sdk_trace.Span.record_exception


def _record_exception(
    self: sdk_trace.Span, exception: BaseException, *args: Any, **kw: Any
) -> None:
    """Remember on the exception which span it failed first (the innermost one)."""
    if getattr(exception, _SPAN_ATTR, None) is None:
        context = self.get_span_context()
        with contextlib.suppress(AttributeError, TypeError):
            setattr(exception, _SPAN_ATTR, (context.trace_id, context.span_id))
    _original_record_exception(self, exception, *args, **kw)


sdk_trace.Span.record_exception = _record_exception  # type: ignore[method-assign]


def enabled() -> bool:
    return _enabled


def span_ids_of(exc: BaseException | None) -> tuple[int, int] | None:
    """The span an exception failed in, else the current span, as (trace_id, span_id)."""
    ids = getattr(exc, _SPAN_ATTR, None) if exc is not None else None
    if ids is not None:
        return (int(ids[0]), int(ids[1]))
    context = trace.get_current_span().get_span_context()
    return (context.trace_id, context.span_id) if context.is_valid else None


def _before_send(scrubber: Scrubber) -> Any:
    def before_send(event: MutableMapping[str, Any], hint: Mapping[str, Any]) -> Any:
        exc_info = hint.get("exc_info") if hint else None
        ids = span_ids_of(exc_info[1] if exc_info else None)
        if ids is not None:
            trace_id, span_id = format(ids[0], "032x"), format(ids[1], "016x")
            contexts = event.setdefault("contexts", {})
            contexts["trace"] = {
                **contexts.get("trace", {}),
                "trace_id": trace_id,
                "span_id": span_id,
            }
            event.setdefault("tags", {})["trace_id"] = trace_id
        final = scrubber.scrub_mapping(event) if scrubber.enabled else event
        if captured is not None:
            captured.append(dict(final))
            return None
        return final

    return before_send


def _before_breadcrumb(scrubber: Scrubber) -> Any:
    def before_breadcrumb(crumb: MutableMapping[str, Any], _: Any) -> Any:
        return scrubber.scrub_mapping(crumb) if scrubber.enabled else crumb

    return before_breadcrumb


def start(settings: Settings, scrubber: Scrubber) -> bool:
    """Start sentry-sdk when a DSN is configured; True when it runs."""
    global _enabled  # noqa: PLW0603 - sentry-sdk itself is process-global
    if not settings.sentry_dsn:
        _enabled = False
        return False
    import sentry_sdk
    from sentry_sdk.integrations.argv import ArgvIntegration
    from sentry_sdk.integrations.dedupe import DedupeIntegration
    from sentry_sdk.integrations.excepthook import ExcepthookIntegration
    from sentry_sdk.integrations.logging import LoggingIntegration
    from sentry_sdk.integrations.modules import ModulesIntegration
    from sentry_sdk.integrations.threading import ThreadingIntegration

    sentry_sdk.init(
        dsn=settings.sentry_dsn,
        release=settings.version,
        environment=settings.environment,
        # Only what we choose: no auto-enabled Starlette/FastAPI integration (the SDK's
        # middleware captures request errors) and no stdlib HTTP spans.
        default_integrations=False,
        auto_enabling_integrations=False,
        integrations=[
            LoggingIntegration(level=logging.INFO, event_level=None),
            ThreadingIntegration(propagate_scope=True),
            ExcepthookIntegration(),
            DedupeIntegration(),
            ModulesIntegration(),
            ArgvIntegration(),
        ],
        traces_sample_rate=settings.sentry_traces_sample_rate,
        include_local_variables=True,  # PII stays off: sentry-sdk's default
        before_send=_before_send(scrubber),
        before_breadcrumb=_before_breadcrumb(scrubber),
        shutdown_timeout=2,  # lookout.sdk.shutdown() flushes it, within its own budget
    )
    sentry_sdk.get_global_scope().set_tag("service", settings.service)
    _enabled = True
    enable_asyncio()
    return True


def enable_asyncio() -> None:
    """Capture exceptions in asyncio tasks; works only once a loop runs, so it is called
    from init(), at ASGI lifespan startup and on the first request or message."""
    if not _enabled:
        return
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return
    with guard("sentry asyncio integration"):
        from sentry_sdk.integrations.asyncio import enable_asyncio_integration

        enable_asyncio_integration()


def capture(exc: BaseException, request: Mapping[str, Any] | None = None) -> None:
    """Send one error event for `exc` (with the request it failed, when given)."""
    if not _enabled:
        return
    with guard("error capture"):
        import sentry_sdk

        with sentry_sdk.new_scope() as scope:
            if request is not None:
                scope.add_event_processor(lambda event, _: {**event, "request": dict(request)})
            sentry_sdk.capture_exception(exc)


@contextlib.contextmanager
def job_run(job: str, interval_minutes: int | None) -> Iterator[None]:
    """Report the block as one run of the scheduled job `job`: an in-progress check-in,
    then ok or error with its duration (Sentry's cron monitors). A failing block raises."""
    if not _enabled:
        yield
        return
    import sentry_sdk.crons

    config: Any = None
    if interval_minutes is not None:
        config = {"schedule": {"type": "interval", "value": interval_minutes, "unit": "minute"}}
    with sentry_sdk.crons.monitor(monitor_slug=job, monitor_config=config):
        yield


def set_user(fields: Mapping[str, Any]) -> None:
    if _enabled:
        with guard("error user context"):
            import sentry_sdk

            sentry_sdk.set_user(dict(fields))


@contextlib.contextmanager
def request_scope() -> Iterator[None]:
    """Isolate user and tags per request, so one request's user never tags another's error."""
    if not _enabled:
        yield
        return
    import sentry_sdk

    with sentry_sdk.isolation_scope():
        yield


def stop(timeout_s: float) -> None:
    global _enabled  # noqa: PLW0603 - sentry-sdk itself is process-global
    if not _enabled:
        return
    _enabled = False
    with guard("error capture shutdown"):
        import sentry_sdk

        client = sentry_sdk.get_client()
        client.close(timeout=timeout_s)
