"""JSON logs on stdout: fields, trace ids in threads and tasks, stdlib routing, levels."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import threading
from typing import Any

import pytest

import lookout.sdk
from lookout.sdk import testing
from tests.sdk.conftest import Instrument

RFC3339_UTC = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z")
HEX32 = re.compile(r"[0-9a-f]{32}")
HEX16 = re.compile(r"[0-9a-f]{16}")


def _lines(capsys: pytest.CaptureFixture[str]) -> list[dict[str, Any]]:
    return [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.strip()]


def _init(**options: Any) -> None:
    options.setdefault("metrics_addr", "off")
    options.setdefault("traces_exporter", "none")
    options.setdefault("environ", {})
    lookout.sdk.init("ticketing", **options)


def test_a_line_is_one_json_object_with_the_standard_fields(
    capsys: pytest.CaptureFixture[str],
) -> None:
    _init()
    capsys.readouterr()
    lookout.sdk.get_logger("booking").info("seat_held", seat=12)
    (line,) = _lines(capsys)
    assert RFC3339_UTC.fullmatch(line.pop("timestamp"))
    assert line == {
        "level": "info",
        "event": "seat_held",
        "logger": "booking",
        "service": "ticketing",
        "seat": 12,
    }


def test_a_service_field_never_passes_the_line_off_as_another_service(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """`service` names the writer; a caller's own `service=` is kept as `peer_service`."""
    _init()
    capsys.readouterr()
    lookout.sdk.get_logger("calls").warning("upstream_slow", service="payments")
    lookout.sdk.get_logger("calls").info("self_check", service="ticketing")
    slow, same = _lines(capsys)
    assert (slow["service"], slow["peer_service"]) == ("ticketing", "payments")
    assert same["service"] == "ticketing"
    assert "peer_service" not in same


def test_trace_and_span_ids_are_lowercase_hex_while_a_span_is_current(
    capsys: pytest.CaptureFixture[str],
) -> None:
    _init()
    capsys.readouterr()
    with lookout.sdk.tracer().start_as_current_span("work") as span:
        lookout.sdk.get_logger().info("inside")
    lookout.sdk.get_logger().info("outside")
    inside, outside = _lines(capsys)
    assert inside["trace_id"] == format(span.get_span_context().trace_id, "032x")
    assert HEX32.fullmatch(inside["trace_id"])
    assert HEX16.fullmatch(inside["span_id"])
    assert "trace_id" not in outside


def test_threads_and_asyncio_tasks_carry_the_span_they_run_under() -> None:
    _init()
    log = lookout.sdk.get_logger()
    with testing.capture_logs() as logs:

        def in_thread() -> None:
            with lookout.sdk.tracer().start_as_current_span("thread-work"):
                log.info("from_thread")

        thread = threading.Thread(target=in_thread)
        thread.start()
        thread.join()

        async def main() -> str:
            with lookout.sdk.tracer().start_as_current_span("task-work") as span:
                await asyncio.create_task(_log_later(log))
                await asyncio.to_thread(log.info, "from_to_thread")
                return format(span.get_span_context().trace_id, "032x")

        task_trace = asyncio.run(main())
    by_event = {line["event"]: line for line in logs}
    assert HEX32.fullmatch(by_event["from_thread"]["trace_id"])
    assert by_event["from_task"]["trace_id"] == task_trace
    assert by_event["from_to_thread"]["trace_id"] == task_trace


async def _log_later(log: Any) -> None:
    await asyncio.sleep(0)
    log.info("from_task")


def test_unsampled_trace_still_stamps_its_id_on_logs(instrument: Instrument) -> None:
    """With sampling off no span is recorded, but logs and X-Trace-Id still carry an id."""

    async def app(scope: Any, receive: Any, send: Any) -> None:
        lookout.sdk.get_logger().info("handled")
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    target = instrument(app, sampler="always_off")

    async def call() -> str:
        async with target.client() as client:
            return (await client.get("/x")).headers["x-trace-id"]

    trace_id = asyncio.run(call())
    assert target.spans() == ()
    (handled,) = [line for line in target.logs if line["event"] == "handled"]
    assert handled["trace_id"] == trace_id


def test_stdlib_logging_goes_through_the_same_pipeline(
    capsys: pytest.CaptureFixture[str],
) -> None:
    _init()
    capsys.readouterr()
    with lookout.sdk.tracer().start_as_current_span("work"):
        logging.getLogger("sqlalchemy.engine").warning("slow query %s", "q1", extra={"ms": 812})
    (line,) = _lines(capsys)
    assert line["event"] == "slow query q1"
    assert line["logger"] == "sqlalchemy.engine"
    assert line["level"] == "warning"
    assert line["ms"] == 812
    assert HEX32.fullmatch(line["trace_id"])


def test_exceptions_are_logged_as_structured_data() -> None:
    _init()
    with testing.capture_logs() as logs:
        try:
            {}["missing"]
        except KeyError:
            lookout.sdk.get_logger().exception("lookup_failed")
            logging.getLogger("lib").exception("lib_failed")
    for line in logs:
        (frame_info,) = line["exception"]
        assert frame_info["exc_type"] == "KeyError"
        assert frame_info["frames"][-1]["name"] == "test_exceptions_are_logged_as_structured_data"
        assert line["level"] == "error"


@pytest.mark.parametrize(
    ("environment", "asked", "debug_emitted"),
    [
        ("production", "DEBUG", False),
        ("staging", None, False),
        ("local", None, True),
        ("dev", None, True),
        ("dev", "INFO", False),
    ],
)
def test_debug_is_emitted_only_in_debug_environments(
    environment: str, asked: str | None, debug_emitted: bool
) -> None:
    _init(environment=environment, log_level=asked)
    with testing.capture_logs() as logs:
        lookout.sdk.get_logger().debug("verbose")
        logging.getLogger("lib").debug("lib_verbose")
        lookout.sdk.get_logger().info("normal")
    events = [line["event"] for line in logs]
    expected = ["verbose", "lib_verbose", "normal"] if debug_emitted else ["normal"]
    assert events == expected


def test_debug_environments_are_configurable() -> None:
    _init(environment="qa", environ={"LOOKOUT_DEBUG_ENVIRONMENTS": "qa"})
    with testing.capture_logs() as logs:
        lookout.sdk.get_logger().debug("verbose")
    assert [line["event"] for line in logs] == ["verbose"]


def test_warning_and_error_levels() -> None:
    _init()
    with testing.capture_logs() as logs:
        log = lookout.sdk.get_logger()
        log.warning("retry_attempt", attempt=1)
        log.error("database_timeout")
    assert [(line["level"], line["event"]) for line in logs] == [
        ("warning", "retry_attempt"),
        ("error", "database_timeout"),
    ]


def test_bound_context_is_per_request(instrument: Instrument) -> None:
    """Fields bound in one request never appear on another's lines."""

    async def app(scope: Any, receive: Any, send: Any) -> None:
        user = scope["path"].strip("/")
        if user != "anonymous":
            lookout.sdk.bind(user_id=user)
        await asyncio.sleep(0)
        lookout.sdk.get_logger().info("handled")
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    target = instrument(app)

    async def calls() -> None:
        async with target.client() as client:
            await asyncio.gather(*(client.get(f"/{u}") for u in ("u1", "u2", "anonymous")))
            await client.get("/anonymous")

    asyncio.run(calls())
    handled = [line for line in target.logs if line["event"] == "handled"]
    assert sorted(line.get("user_id", "-") for line in handled) == ["-", "-", "u1", "u2"]


def test_access_log_is_one_line_per_request_with_route_and_status(
    instrument: Instrument,
) -> None:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 201, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    target = instrument(app)

    async def call() -> None:
        async with target.client() as client:
            await client.post("/things?secret=1")

    asyncio.run(call())
    (line,) = [line for line in target.logs if line["event"] == "http_request"]
    assert {k: line[k] for k in ("http_method", "http_route", "url_path", "status")} == {
        "http_method": "POST",
        "http_route": "unmatched",
        "url_path": "/things",
        "status": 201,
    }
    assert line["logger"] == "lookout.access"


def test_access_log_can_be_turned_off(instrument: Instrument) -> None:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    target = instrument(app, access_log=False)

    async def call() -> None:
        async with target.client() as client:
            await client.get("/")

    asyncio.run(call())
    assert [line for line in target.logs if line["event"] == "http_request"] == []


def test_uvicorn_loggers_are_routed_and_its_access_log_silenced(
    capsys: pytest.CaptureFixture[str],
) -> None:
    import uvicorn.config

    logging.config.dictConfig(uvicorn.config.LOGGING_CONFIG)  # what uvicorn does at start
    _init()
    capsys.readouterr()
    logging.getLogger("uvicorn.error").info("Started server process")
    logging.getLogger("uvicorn.access").info('127.0.0.1 - "GET / HTTP/1.1" 200')
    (line,) = _lines(capsys)
    assert line["logger"] == "uvicorn.error"
    assert line["event"] == "Started server process"


def test_a_closed_stdout_drops_and_counts_instead_of_raising(
    monkeypatch: pytest.MonkeyPatch, registry: Any
) -> None:
    class Closed:
        def write(self, _: object) -> None:
            raise BrokenPipeError(32, "Broken pipe")

        def flush(self) -> None:
            raise BrokenPipeError(32, "Broken pipe")

    _init()
    monkeypatch.setattr("sys.stdout", Closed())
    lookout.sdk.get_logger().info("lost")
    logging.getLogger("x").warning("lost too")
    monkeypatch.undo()
    assert (
        registry.get_sample_value(
            "lookout_sdk_dropped_total", {"signal": "logs", "reason": "stdout_unavailable"}
        )
        == 2.0
    )
