"""SQLAlchemy instrumentation, sync and async: a CLIENT span and a duration sample per
statement, and the connection pool's state with the semantic-convention names.

    engine = lookout.sdk.instrument_sqlalchemy(create_async_engine(url, pool_size=5))

The pool gauges are updated by pool events; pending checkouts and their wait are measured
by wrapping the pool's `_do_get`, the one place every checkout waits.
"""

from __future__ import annotations

import re
import time
from typing import Any

from opentelemetry import trace
from opentelemetry.trace import SpanKind, Status, StatusCode

from lookout.sdk._guard import guard
from lookout.sdk._metrics import exemplar_for_current_span

MAX_STATEMENT = 1024
_OPERATIONS = frozenset(
    (
        "SELECT", "INSERT", "UPDATE", "DELETE", "UPSERT", "MERGE", "WITH", "CREATE", "ALTER",
        "DROP", "TRUNCATE", "BEGIN", "COMMIT", "ROLLBACK", "SAVEPOINT", "RELEASE", "SET",
        "SHOW", "CALL", "EXPLAIN", "COPY", "LOCK", "VACUUM", "ANALYZE", "PRAGMA", "GRANT",
        "REVOKE", "LISTEN", "NOTIFY", "DECLARE", "FETCH", "CLOSE",
    )
)  # fmt: skip
_STRING = re.compile(r"'(?:[^']|'')*'|\$(\w*)\$[\s\S]*?\$\1\$")
_NUMBER = re.compile(r"(?<![\w$.:])-?\d+(?:\.\d+)?(?:[eE][+-]?\d+)?\b")
_HEX = re.compile(r"\b[xX]'[0-9a-fA-F]*'")
_SPACE = re.compile(r"\s+")
_COMMENT = re.compile(r"--[^\n]*|/\*[\s\S]*?\*/")
_SPAN_KEY = "_lookout_span"


def sanitize(statement: str) -> str:
    """The statement with literals replaced by `?`, comments dropped, at most 1 KB."""
    text = _COMMENT.sub(" ", statement)
    text = _HEX.sub("?", text)
    text = _STRING.sub("?", text)
    text = _NUMBER.sub("?", text)
    text = _SPACE.sub(" ", text).strip()
    encoded = text.encode()
    if len(encoded) > MAX_STATEMENT:
        text = encoded[: MAX_STATEMENT - 3].decode("utf-8", "ignore") + "..."
    return text


def operation_of(statement: str) -> str:
    words = _COMMENT.sub(" ", statement).lstrip(" \t\r\n(").split(None, 1)
    word = words[0].upper() if words else ""
    return word if word in _OPERATIONS else "OTHER"


class SqlAlchemyInstrumentation:
    """Event listeners for one engine; `runtime` gives the tracer and the instruments."""

    def __init__(self, runtime: Any, engine: Any, pool_name: str | None) -> None:
        self.runtime = runtime
        self.engine = engine
        url = engine.url
        self.system = engine.dialect.name
        self.attributes: dict[str, Any] = {"db.system.name": self.system}
        if url.database:
            self.attributes["db.namespace"] = url.database
        if url.host:
            self.attributes["server.address"] = url.host
        if url.port:
            self.attributes["server.port"] = url.port
        self.pool_name = (
            pool_name or f"{self.system}://{url.host or ''}:{url.port or ''}/{url.database or ''}"
        )

    # -- statements ----------------------------------------------------------------------
    def before_cursor_execute(  # noqa: PLR0917 - SQLAlchemy's event signature
        self, conn: Any, cursor: Any, statement: str, params: Any, context: Any, many: bool
    ) -> None:
        with guard("sqlalchemy span start"):
            operation = operation_of(statement)
            attributes = {
                **self.attributes,
                "db.operation.name": operation,
                "db.query.text": sanitize(statement),
            }
            name = f"{operation} {self.attributes.get('db.namespace', self.system)}"
            span = self.runtime.tracer.start_span(name, kind=SpanKind.CLIENT, attributes=attributes)
            setattr(context, _SPAN_KEY, (span, operation, time.perf_counter()))

    def after_cursor_execute(  # noqa: PLR0917 - SQLAlchemy's event signature
        self, conn: Any, cursor: Any, statement: str, params: Any, context: Any, many: bool
    ) -> None:
        self._finish(context, None)

    def handle_error(self, exception_context: Any) -> None:
        context = exception_context.execution_context
        if context is not None:
            self._finish(context, exception_context.original_exception)

    def _finish(self, context: Any, error: BaseException | None) -> None:
        started = getattr(context, _SPAN_KEY, None)
        if started is None:
            return
        setattr(context, _SPAN_KEY, None)
        with guard("sqlalchemy span end"):
            span, operation, begin = started
            error_type = ""
            if error is not None:
                error_type = type(error).__qualname__
                span.record_exception(error)
                span.set_attribute("error.type", error_type)
                span.set_status(Status(StatusCode.ERROR))
            with trace.use_span(span, end_on_exit=False):
                exemplar = exemplar_for_current_span()
            self.runtime.instruments.db_duration.labels(self.system, operation, error_type).observe(
                time.perf_counter() - begin, exemplar
            )
            span.end()

    # -- the pool ------------------------------------------------------------------------
    def pool_state(self) -> tuple[int, int, int | None]:
        """(used, idle, max) read from the pool at scrape time."""
        pool = self.engine.pool
        used, idle = int(pool.checkedout()), int(pool.checkedin())
        size = getattr(pool, "size", None)
        limit = None
        if callable(size):
            limit = int(size()) + max(0, int(getattr(pool, "_max_overflow", 0)))
        return used, idle, limit

    def wrap_pool(self, *_: Any) -> None:
        """Measure waiting checkouts on the engine's (possibly new) pool."""
        pool = self.engine.pool
        if getattr(pool, "_lookout_wrapped", False) or not hasattr(pool, "_do_get"):
            return
        instruments = self.runtime.instruments
        pending = instruments.db_pending.labels(self.pool_name)
        wait = instruments.db_wait.labels(self.pool_name)
        original = pool._do_get

        def _do_get() -> Any:
            pending.inc()
            begin = time.perf_counter()
            try:
                return original()
            finally:
                pending.dec()
                wait.observe(time.perf_counter() - begin)

        pool._do_get = _do_get
        pool._lookout_wrapped = True


def instrument(runtime: Any, engine: Any, pool_name: str | None = None) -> Any:
    """Attach statement spans, metrics and pool metrics to a (sync or async) engine."""
    from sqlalchemy import event

    sync_engine = getattr(engine, "sync_engine", engine)
    if getattr(sync_engine, "_lookout_instrumented", False):
        return engine
    hooks = SqlAlchemyInstrumentation(runtime, sync_engine, pool_name)
    event.listen(sync_engine, "before_cursor_execute", hooks.before_cursor_execute)
    event.listen(sync_engine, "after_cursor_execute", hooks.after_cursor_execute)
    event.listen(sync_engine, "handle_error", hooks.handle_error)
    event.listen(sync_engine, "engine_disposed", hooks.wrap_pool)
    hooks.wrap_pool()
    runtime.instruments.pools.add(hooks)
    sync_engine._lookout_instrumented = True
    return engine
