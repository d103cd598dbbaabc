"""The `lookout` command: entry points, exit codes, no traceback for a user's mistake."""

from __future__ import annotations

import subprocess
import sys

import pytest

from lookout import __version__
from lookout.cli import main
from lookout.sdk._settings import VARIABLES


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "lookout", *args],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_python_dash_m_and_version() -> None:
    result = run("--version")
    assert (result.returncode, result.stdout.strip()) == (0, f"lookout {__version__}")
    assert run("version").stdout.strip() == f"lookout {__version__}"


@pytest.mark.parametrize(
    "args", [["--no-such-flag"], ["no-such-command"], [], ["sdk-env", "--format", "xml"]]
)
def test_usage_errors_exit_2_without_traceback(args: list[str]) -> None:
    result = run(*args)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "error:" in result.stderr


def test_sdk_env_lists_the_registry(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["sdk-env", "--format", "names"]) == 0
    assert capsys.readouterr().out.split() == [v.name for v in VARIABLES]
