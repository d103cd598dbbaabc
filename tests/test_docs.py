"""Docs are tested: everything a user can call, set or see is documented."""

from __future__ import annotations

import inspect
import re

import httpx
import pytest

import lookout.sdk
from lookout.cli import build_parser, main
from lookout.sdk import testing
from lookout.sdk._logs import _LEADING_KEYS
from lookout.sdk._propagation import PROPAGATION_HEADERS
from lookout.sdk._settings import VARIABLES
from tests.support import ROOT, free_port, uvicorn_app, wait_until

SDK_DOC = (ROOT / "docs" / "sdk.md").read_text()
CLI_DOC = (ROOT / "docs" / "cli.md").read_text()


def _documented(name: str, text: str = SDK_DOC) -> bool:
    return f"`{name}`" in text or f"`{name}(" in text


@pytest.mark.parametrize("name", list(inspect.signature(lookout.sdk.init).parameters))
def test_every_init_keyword_is_documented(name: str) -> None:
    assert re.search(rf"^\| `{name}` \|", SDK_DOC, re.MULTILINE), name


@pytest.mark.parametrize("name", [v.name for v in VARIABLES])
def test_every_environment_variable_is_documented(name: str) -> None:
    assert re.search(rf"^\| `{name}` \|", SDK_DOC, re.MULTILINE), name


def test_the_variable_table_in_docs_is_the_registry(capsys: pytest.CaptureFixture[str]) -> None:
    """docs/sdk.md holds `lookout sdk-env` output verbatim: defaults and meanings too."""
    assert main(["sdk-env", "--format", "markdown"]) == 0
    assert capsys.readouterr().out in SDK_DOC


@pytest.mark.parametrize("name", [n for n in lookout.sdk.__all__ if n != "init"])
def test_every_public_sdk_function_is_documented(name: str) -> None:
    assert _documented(name), name


@pytest.mark.parametrize("name", testing.__all__)
def test_every_testing_helper_is_documented(name: str) -> None:
    assert _documented(name), name


@pytest.mark.parametrize("field", _LEADING_KEYS)
def test_every_log_field_is_documented(field: str) -> None:
    assert re.search(rf"^\| `{field}` \|", SDK_DOC, re.MULTILINE), field


@pytest.mark.parametrize("header", PROPAGATION_HEADERS)
def test_every_propagation_header_is_documented(header: str) -> None:
    shown = "X-Trace-Id" if header == "x-trace-id" else header
    assert re.search(rf"^\| `{shown}` \|", SDK_DOC, re.MULTILINE), header


def test_every_cli_command_is_documented() -> None:
    parser = build_parser()
    commands = next(a for a in parser._actions if a.dest == "command")
    for name in commands.choices:  # type: ignore[union-attr]
        assert f"`lookout {name}" in CLI_DOC, name


def test_the_quickstart_in_docs_is_the_example_file() -> None:
    example = (ROOT / "docs" / "examples" / "quickstart.py").read_text()
    assert example in SDK_DOC
    code_lines = [line for line in example.splitlines() if line.strip()]
    assert len(code_lines) <= 30, "the example stays about 20 lines"


def test_readme_opens_with_exactly_two_commands() -> None:
    readme = (ROOT / "README.md").read_text()
    first_block = readme.split("```")[1]
    commands = [line for line in first_block.splitlines()[1:] if line.strip()]
    assert [c.split("#")[0].strip() for c in commands] == [
        "python3 dev.py demo",
        "python3 dev.py test",
    ]


def test_the_quickstart_example_runs_as_documented() -> None:
    """Two copies of the example, one calling the other: one trace, logs in both."""
    seats_port = free_port()
    env = {"OTEL_TRACES_EXPORTER": "none", "PYTHONPATH": str(ROOT / "docs" / "examples")}
    with uvicorn_app("quickstart", {**env, "OTEL_SERVICE_NAME": "seats"}, port=seats_port) as seats:
        booking_env = {
            **env,
            "OTEL_SERVICE_NAME": "booking",
            "SEATS_URL": seats.url,
            "LOOKOUT_PROPAGATE_TO": f"127.0.0.1:{seats_port}",
        }
        with uvicorn_app("quickstart", booking_env) as booking:
            response = httpx.post(f"{booking.url}/book/nairobi-mombasa", timeout=10)
            assert response.json() == {"route": "nairobi-mombasa", "status": "booked"}
            trace_id = response.headers["x-trace-id"]
            for service in (booking, seats):
                lines = wait_until(
                    lambda s=service: [
                        line
                        for line in s.json_lines()
                        if line.get("trace_id") == trace_id and line["event"] == "ticket_sold"
                    ],
                    5,
                    "ticket_sold with the trace id",
                )
                assert lines[0]["route"] == "nairobi-mombasa"
            started = next(
                line for line in booking.json_lines() if line["event"] == "lookout_sdk_started"
            )
            metrics = httpx.get(started["metrics_url"], timeout=5).text
            assert 'tickets_sold_total{route="nairobi-mombasa"} 1.0' in metrics


def test_docs_link_to_files_that_exist() -> None:
    for page in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", page.read_text()):
            assert (page.parent / target).exists(), f"{page.name} links to missing {target}"


def test_every_doc_page_is_reachable_from_the_readme() -> None:
    readme = (ROOT / "README.md").read_text()
    for page in sorted((ROOT / "docs").glob("*.md")):
        assert f"docs/{page.name}" in readme, page.name


SERVER_DOC = (ROOT / "docs" / "server.md").read_text()


def test_every_server_config_key_is_documented() -> None:
    from lookout.config import KEYS

    for key, (variable, _) in KEYS.items():
        assert re.search(rf"^\| `{key}` \| `{variable}` \|", SERVER_DOC, re.MULTILINE), key


def test_every_server_route_is_documented() -> None:
    from lookout.config import ServerConfig
    from lookout.server.app import main_app
    from lookout.server.runtime import ServerRuntime

    runtime = ServerRuntime.__new__(ServerRuntime)
    runtime.config = ServerConfig()
    for route in main_app(runtime).routes:
        path = re.sub(r"\{(\w+)(:\w+)?\}", r"<\1>", route.path)  # type: ignore[attr-defined]
        for method in sorted(route.methods - {"HEAD"}):  # type: ignore[attr-defined]
            assert f"`{method} {path}`" in SERVER_DOC, (method, path)
