"""The bootstrap behind the README's commands."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from types import ModuleType

import pytest

from tests.support import ROOT


def _dev() -> ModuleType:
    spec = importlib.util.spec_from_file_location("dev", ROOT / "dev.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(("pytest_code", "status"), [(0, 0), (1, 1), (2, 1), (5, 1)])
def test_only_a_passing_pytest_passes_and_no_tests_is_a_failure(
    pytest_code: int, status: int
) -> None:
    assert _dev().test_status(pytest_code) == status


def test_unknown_command_prints_usage_and_exits_2() -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "dev.py"), "bogus"],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "python3 dev.py test" in result.stderr


def test_ci_runs_the_readme_test_command_with_real_parts_required() -> None:
    ci = (ROOT / ".ci" / "run").read_text()
    readme_block = (ROOT / "README.md").read_text().split("```")[1]
    test_command = readme_block.splitlines()[2].split("#")[0].strip()
    assert "export LOOKOUT_REQUIRE_REAL=1" in ci
    assert test_command == "python3 dev.py test"
    assert test_command in ci
