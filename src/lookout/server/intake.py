"""The ingest routes: OTLP/HTTP (`/v1/traces`, `/v1/logs`, `/v1/metrics`) and Sentry
(`/api/<project_id>/envelope/`, `/api/<project_id>/store/`).

A 2xx goes out only after the request's records are committed. A client's mistake gets a
4xx naming the problem, never a 500; a full writer queue gets 503 with Retry-After.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Protocol

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from lookout.errors import DiskFullError, IngestError, StoreBusyError, StoreError
from lookout.ingest import lines, loki, otlp, sentry
from lookout.ingest.bodies import Inflater
from lookout.ingest.jsonbody import load_json
from lookout.model import Batch, LogColumns
from lookout.server.decoding import DecoderLostError
from lookout.server.errors import error_response
from lookout.server.runtime import ServerRuntime


def _runtime(request: Request) -> ServerRuntime:
    runtime: ServerRuntime = request.app.state.runtime
    return runtime


async def _body(request: Request, runtime: ServerRuntime) -> bytes:
    """The request body, refused with 413 as soon as it passes the limit: it is never held
    in memory whole first, whatever Content-Length claims or chunking hides."""
    limit = runtime.limits.max_body_bytes
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise IngestError(
            f"Body of {declared} bytes is over the {limit}-byte limit.",
            status=413,
            reason="too_large",
        )
    # Decompressed as it arrives: a bomb is refused at `limit` bytes of output, and the
    # compressed body is never held whole beside its expansion.
    inflater = Inflater(request.headers.get("content-encoding", ""), limit)
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise IngestError(
                f"Body is over the {limit}-byte limit.", status=413, reason="too_large"
            )
        inflater.feed(chunk)
    return inflater.finish()


class ErrorBody(Protocol):
    def __call__(
        self, status: int, code: str, message: str, headers: dict[str, str] | None = None
    ) -> Response: ...


async def _guarded(
    request: Request,
    endpoint: str,
    handle: Callable[[ServerRuntime], Awaitable[Response]],
    error_response: ErrorBody = error_response,
) -> Response:
    runtime = _runtime(request)
    try:
        response = await handle(runtime)
    except IngestError as exc:
        runtime.metrics.rejected.labels(endpoint, exc.reason).inc()
        response = error_response(exc.status, exc.reason, str(exc))
    except (ValueError, TypeError, KeyError, AttributeError, OverflowError, RecursionError) as exc:
        # A payload of the right syntax but the wrong shape is still the client's mistake.
        runtime.metrics.rejected.labels(endpoint, "malformed").inc()
        message = f"The payload does not have the expected shape: {exc!r}"
        response = error_response(400, "malformed", message[:500])
    except DecoderLostError as exc:
        runtime.metrics.rejected.labels(endpoint, "decoder_lost").inc()
        response = error_response(503, "decoder_lost", str(exc), {"Retry-After": "1"})
    except StoreBusyError as exc:
        runtime.metrics.rejected.labels(endpoint, "busy").inc()
        response = error_response(503, "busy", str(exc), {"Retry-After": "1"})
    except DiskFullError as exc:
        runtime.metrics.rejected.labels(endpoint, "disk_full").inc()
        response = error_response(503, "disk_full", str(exc), {"Retry-After": "60"})
    except StoreError as exc:
        response = error_response(503, "store_unavailable", str(exc), {"Retry-After": "5"})
    runtime.metrics.requests.labels(endpoint, str(response.status_code)).inc()
    return response


def otlp_route(signal: str) -> Callable[[Request], Awaitable[Response]]:
    async def handle_request(request: Request) -> Response:
        async def handle(runtime: ServerRuntime) -> Response:
            content_type = request.headers.get("content-type", "application/x-protobuf")
            body = await _body(request, runtime)
            runtime.check_disk()  # before the work of decoding
            decoded = await runtime.decoders.decode(signal, body, content_type, time.time_ns())
            for reason, count in decoded.reasons.items():
                runtime.metrics.rejected.labels(signal, reason).inc(count)
            await runtime.store(decoded.batch, scrubbed=True)
            as_json = otlp.is_json(content_type)
            return Response(
                otlp.encode_response(signal, decoded.outcome(), as_json),
                media_type="application/json" if as_json else "application/x-protobuf",
            )

        as_json = otlp.is_json(request.headers.get("content-type", ""))
        return await _guarded(request, f"otlp_{signal}", handle, otlp_error(as_json))

    return handle_request


# google.rpc.Code for the statuses the OTLP routes answer with.
_RPC_CODES = {400: 3, 401: 16, 403: 7, 404: 5, 413: 8, 415: 3, 429: 8, 503: 14}


def otlp_error(as_json: bool) -> ErrorBody:
    """OTLP/HTTP's error body: a google.rpc.Status, protobuf or JSON like the request."""

    def render(
        status: int, code: str, message: str, headers: dict[str, str] | None = None
    ) -> Response:
        from google.protobuf import json_format
        from google.rpc import status_pb2

        body = status_pb2.Status(code=_RPC_CODES.get(status, 2), message=f"{code}: {message}")
        if as_json:
            content = json_format.MessageToJson(body, indent=None)
            return Response(content, status, headers, media_type="application/json")
        return Response(
            body.SerializeToString(), status, headers, media_type="application/x-protobuf"
        )

    return render


def _authenticate(request: Request, runtime: ServerRuntime, project_id: int) -> None:
    project = runtime.project(project_id)
    if project is None:
        raise IngestError(
            f"Unknown Sentry project {project_id}.", status=404, reason="unknown_project"
        )
    key = sentry.sentry_key(request.headers, request.query_params)
    if key is None:
        raise IngestError(
            "Missing Sentry credentials: send X-Sentry-Auth with sentry_key, or ?sentry_key=.",
            status=401,
            reason="unauthenticated",
        )
    if key not in project.keys:
        raise IngestError(
            f"The DSN key is not one of project {project_id}'s keys.",
            status=403,
            reason="forbidden",
        )


async def sentry_envelope(request: Request) -> Response:
    return await _sentry(request, "envelope")


async def sentry_store(request: Request) -> Response:
    return await _sentry(request, "store")


async def _sentry(request: Request, kind: str) -> Response:
    async def handle(runtime: ServerRuntime) -> Response:
        project_id = int(request.path_params["project_id"])
        _authenticate(request, runtime, project_id)
        body = await _body(request, runtime)
        read = sentry.read_envelope if kind == "envelope" else sentry.read_store
        intake = read(body, project_id, max_event_bytes=runtime.limits.max_event_bytes)
        for reason, category, quantity in intake.discarded:
            runtime.metrics.client_discarded.labels(reason, category).inc(quantity)
        for item_type in intake.skipped:
            runtime.metrics.skipped_items.labels(item_type).inc()
        await runtime.store(intake.batch)
        return JSONResponse({"id": intake.event_id or None})

    return await _guarded(request, f"sentry_{kind}", handle)


async def shipped_lines(request: Request) -> Response:
    """`lookout run`'s batches of stdout and stderr lines."""

    async def handle(runtime: ServerRuntime) -> Response:
        body = await _body(request, runtime)
        document = load_json(body, "A lines batch")  # deep or broken JSON: a clear 400
        key, outcome, dropped = lines.read_batch(document, runtime.limits, time.time_ns())
        for reason, count in outcome.reasons.items():
            runtime.metrics.rejected.labels("logs", reason).inc(count)
        if dropped:
            runtime.metrics.shipper_dropped.inc(dropped)
        written = await runtime.store(Batch(logs=LogColumns.of(outcome.records), dedup_key=key))
        return JSONResponse({"accepted": written, "rejected": outcome.rejected})

    return await _guarded(request, "lines", handle)


async def loki_push(request: Request) -> Response:
    """Loki's push API: JSON or snappy protobuf; answers 204 like Loki."""

    async def handle(runtime: ServerRuntime) -> Response:
        body = await _body(request, runtime)
        outcome = loki.read_push(
            body,
            request.headers.get("content-type", "application/x-protobuf"),
            request.headers.get("x-scope-orgid"),
            runtime.limits,
            time.time_ns(),
        )
        for reason, count in outcome.reasons.items():
            runtime.metrics.rejected.labels("logs", reason).inc(count)
        await runtime.store(Batch(logs=LogColumns.of(outcome.records)))
        return Response(status_code=204)

    return await _guarded(request, "loki_push", handle)
