"""Every wire-format parser, fed 2,000 mutations of its golden inputs (and every input that
once broke it), raises only the errors its caller turns into a clear answer, and takes less
than a second on each input. The targets and their allowed errors: tests/fuzz/targets.py."""

from __future__ import annotations

import pytest

from tests.fuzz import targets

# A failing example of 200 kB is still worth showing (shortened in the assertion message).
pytestmark = pytest.mark.filterwarnings(
    "ignore:Generating overly large repr:hypothesis.errors.HypothesisWarning"
)


@pytest.mark.parametrize("name", targets.names())
def test_parser_raises_only_its_clear_errors_and_is_never_slow(name: str) -> None:
    """2,000 derandomized examples: the same inputs on every run."""
    targets.fuzz_property(targets.TARGETS[name], targets.CI_EXAMPLES)()


def test_every_parser_named_by_the_requirement_has_a_target() -> None:
    """OTLP protobuf and JSON, envelopes, lines, Loki JSON and protobuf, text exposition and
    OpenMetrics, the scrape config, and request bodies."""
    expected = {
        *(f"otlp_{kind}_{signal}" for kind in ("protobuf", "json")
          for signal in ("traces", "logs", "metrics")),
        "sentry_envelope", "sentry_store", "lines", "loki_json", "loki_protobuf",
        "exposition_text", "openmetrics", "scrape_config", "bodies",
    }  # fmt: skip
    assert expected == set(targets.TARGETS)
