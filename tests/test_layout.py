"""Dependencies run one way: `lookout` never imports `busline`; busline uses only the SDK
and the launcher; the SDK depends on nothing else in lookout but errors."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.support import ROOT

SRC = ROOT / "src"


def imports_of(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # `from lookout import sdk` imports lookout.sdk: record what each name may be.
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def modules(package: str) -> list[Path]:
    return sorted((SRC / package).rglob("*.py"))


@pytest.mark.parametrize("path", modules("lookout"), ids=lambda p: str(p.relative_to(SRC)))
def test_lookout_never_imports_busline(path: Path) -> None:
    assert not any(name.split(".")[0] == "busline" for name in imports_of(path))


@pytest.mark.parametrize("path", modules("busline"), ids=lambda p: str(p.relative_to(SRC)))
def test_busline_imports_only_the_sdk_and_the_launcher(path: Path) -> None:
    lookout_imports = {n for n in imports_of(path) if n.split(".")[0] == "lookout"}
    allowed = ("lookout.sdk", "lookout.run")
    assert all(any(n == a or n.startswith(a + ".") for a in allowed) for n in lookout_imports)


@pytest.mark.parametrize("path", modules("lookout/sdk"), ids=lambda p: str(p.relative_to(SRC)))
def test_the_sdk_depends_on_nothing_else_in_lookout(path: Path) -> None:
    inside = {n for n in imports_of(path) if n.split(".")[0] == "lookout"}
    allowed = ("lookout.sdk", "lookout.errors", "lookout.__version__")
    assert all(n in ("lookout",) or n.startswith(allowed) for n in inside)


def test_packages_ship_py_typed() -> None:
    assert (SRC / "lookout" / "py.typed").exists()
    assert (SRC / "busline" / "py.typed").exists()


def test_the_providers_simulator_stands_outside_the_company() -> None:
    """The simulated M-Pesa, Airtel, card and SMS companies are not instrumented: importing
    them loads neither the SDK nor OpenTelemetry nor sentry-sdk."""
    import subprocess
    import sys

    probe = (
        "import sys, busline.providers\n"
        "bad = [m for m in sys.modules if m.split('.')[0] in ('lookout', 'opentelemetry', "
        "'sentry_sdk')]\n"
        "print(bad)\n"
        "sys.exit(1 if bad else 0)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, check=False,
        env={"PYTHONPATH": str(SRC)}, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
