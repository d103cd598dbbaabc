"""The negative control: the fuzz property goes red when a parser has a bug it should find.

A planted bug (tests/fuzz/targets.py) swaps the Sentry envelope parser for one that raises a
bare IndexError on an item with a negative `length`, or that "takes" two seconds (by the
target's own fake clock), or never returns, on an envelope with an empty line. The first is
`LOOKOUT_FUZZ_PLANTED_BUG=1`, which turns `pytest tests/fuzz -k sentry_envelope` red.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.fuzz import targets
from tests.support import ROOT


def test_the_property_finds_a_planted_uncaught_exception() -> None:
    with pytest.raises(targets.UncaughtError) as caught:
        targets.fuzz_property(targets.planted_uncaught(), targets.CI_EXAMPLES)()
    assert "raised IndexError: negative item length" in str(caught.value)


def test_the_property_finds_a_planted_slow_input() -> None:
    with pytest.raises(targets.TooSlowError) as caught:
        targets.fuzz_property(targets.planted_slow(), targets.CI_EXAMPLES, shrink=False)()
    assert "sentry_envelope took 2.00 s" in str(caught.value)


def test_the_property_interrupts_a_planted_hang() -> None:
    with pytest.raises(targets.TooSlowError) as caught:
        targets.fuzz_property(targets.planted_hang(), targets.CI_EXAMPLES, shrink=False)()
    assert "sentry_envelope was still running after 0.2 s" in str(caught.value)


def test_a_weakened_allowed_set_goes_red() -> None:
    """With IngestError no longer allowed, the first refused envelope fails the property."""
    import dataclasses

    strict = dataclasses.replace(targets.TARGETS["sentry_envelope"], allowed=())
    with pytest.raises(targets.UncaughtError, match="raised IngestError"):
        targets.fuzz_property(strict, targets.CI_EXAMPLES, shrink=False)()


def test_the_environment_switch_turns_the_ci_property_red() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-x",
         "tests/fuzz/test_parsers.py", "-k", "sentry_envelope"],
        cwd=ROOT, capture_output=True, text=True, timeout=300, check=False,
        env={**os.environ, "LOOKOUT_FUZZ_PLANTED_BUG": "1"},
    )  # fmt: skip
    assert result.returncode == 1, result.stdout[-2000:]
    assert "UncaughtError: sentry_envelope raised IndexError" in result.stdout
