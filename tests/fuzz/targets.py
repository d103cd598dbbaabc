"""The fuzz targets: each wire-format parser called as its caller calls it, the inputs its
mutator makes from the golden seeds, and the exceptions it may raise.

The allowed sets come from the callers. The ingest routes answer an `IngestError` with its
own 4xx and a reason; anything else that escapes a parser would be a 400 with a Python repr
at best, so the HTTP parsers may raise `IngestError` only. The scraper marks a target down on
a `ValueError` and nothing else, so that is the exposition parsers' set. The config loader
shows a `ConfigError` without a traceback, so that is the scrape config's set, and the
targets a valid config yields must then come out without any exception at all.

`LOOKOUT_FUZZ_PLANTED_BUG=1` swaps in a Sentry envelope parser with a planted bug (the
negative control): `pytest tests/fuzz -k sentry_envelope` must then fail.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gzip
import json
import os
import re
import signal
import threading
import time
import warnings
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import brotli
from google.protobuf import json_format
from hypothesis import HealthCheck, Phase, example, given, settings
from hypothesis import strategies as st

from lookout.errors import ConfigError, IngestError
from lookout.ingest import lines, loki, otlp, scrape, sentry
from lookout.ingest import metrics as otlp_metrics
from lookout.ingest.bodies import Inflater
from lookout.ingest.limits import Limits
from lookout.model import LogColumns, SpanColumns
from tests.fuzz import mutators, seeds
from tests.fuzz.regressions import REGRESSIONS

LIMITS = Limits()
NOW_NS = seeds.NOW_NS
SLOWEST_S = 1.0
HUNG_S = 10.0
CI_EXAMPLES = 2000
BODY_LIMIT = 256 * 1024  # small, so that a few mutations can cross it


class UncaughtError(AssertionError):
    """A parser raised an exception outside its allowed set."""


class TooSlowError(AssertionError):
    """A parser took longer than SLOWEST_S on one input."""


@dataclass(frozen=True)
class Target:
    """One parser under fuzzing."""

    name: str
    inputs: st.SearchStrategy[Any]
    parse: Callable[[Any], object]
    allowed: tuple[type[Exception], ...]
    regressions: tuple[Any, ...] = ()  # inputs that once broke it: always tried first
    clock: Callable[[], float] = time.perf_counter
    hung_s: float = HUNG_S  # interrupted after this long


@dataclass(frozen=True)
class Verdict:
    """How one input went: the time the parser took, and the allowed error it raised."""

    seconds: float
    error: str  # the exception's type name; "" when the input parsed


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 600 else f"{text[:600]}... ({len(text)} characters)"


class _HungError(BaseException):
    """Raised into a parser still running after HUNG_S (a BaseException: no parser's
    `except Exception` may swallow it)."""


def _interrupt(*_: object) -> None:
    raise _HungError


@contextlib.contextmanager
def _hang_guard(seconds: float) -> Iterator[None]:
    """Interrupt a parser after `seconds`, so that a hang fails the property (with its
    input) instead of stalling the run. Only the main thread can take the signal."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGALRM, _interrupt)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def check(target: Target, value: Any) -> Verdict:
    """Run the parser on one input; raise UncaughtError when it raises what it may not,
    TooSlowError when it is still running after the target's `hung_s`."""
    started = target.clock()
    try:
        with _hang_guard(target.hung_s):
            target.parse(value)
        error = ""
    except target.allowed as exc:
        error = type(exc).__name__
    except _HungError:
        raise TooSlowError(
            f"{target.name} was still running after {target.hung_s:g} s on input {_shown(value)}"
        ) from None
    except Exception as exc:
        raise UncaughtError(
            f"{target.name} raised {type(exc).__name__}: {str(exc)[:300]} on input {_shown(value)}"
        ) from exc
    return Verdict(target.clock() - started, error)


def best_of_three(target: Target, value: Any, first: Verdict) -> Verdict:
    """A slow input timed twice more, keeping the fastest: a pause of the machine's (a busy
    neighbour, a garbage collection of hypothesis's own objects) is not the parser's."""
    again = [check(target, value) for _ in range(2)]
    return min([first, *again], key=lambda verdict: verdict.seconds)


# Told of each input and its verdict; bench/fuzz.py counts and times them.
Observer = Callable[[Target, Any, Verdict], None]


def fuzz_property(
    target: Target,
    examples: int = CI_EXAMPLES,
    *,
    observe: Observer | None = None,
    derandomize: bool = True,
    shrink: bool = True,
    raise_slow: bool = True,
) -> Callable[[], None]:
    """The hypothesis property for `target`: every input parses or raises an allowed error,
    within SLOWEST_S (unless `raise_slow` is off: then only `observe` sees the time).
    Derandomized by default, so CI runs the same inputs every time."""
    phases = [Phase.explicit, Phase.generate, *([Phase.shrink] if shrink else [])]

    @settings(
        max_examples=examples,
        deadline=None,  # SLOWEST_S is enforced below, on the parser alone (best of three)
        derandomize=derandomize,
        database=None,
        phases=phases,
        suppress_health_check=list(HealthCheck),
        print_blob=False,
    )
    @given(value=target.inputs)
    def prop(value: Any) -> None:
        verdict = check(target, value)
        if verdict.seconds > SLOWEST_S:
            verdict = best_of_three(target, value, verdict)
        if observe is not None:
            observe(target, value, verdict)
        if raise_slow and verdict.seconds > SLOWEST_S:
            raise TooSlowError(
                f"{target.name} took {verdict.seconds:.2f} s on input {_shown(value)}"
            )

    for regression in target.regressions:
        prop = example(value=regression)(prop)
    return prop


# --- how each caller calls its parser --------------------------------------------------------


# As lookout.server.decoding.CONVERTERS (not imported: the parser tests need no server).
CONVERTERS = {"traces": otlp.spans, "logs": otlp.logs, "metrics": otlp_metrics.samples}


class UnstorableError(AssertionError):
    """A parser returned a record the store cannot write: an integer past int64, or a
    string that is not valid Unicode."""


_INT64 = range(-(2**63), 2**63)


def storable(records: Iterable[Any]) -> None:
    """Raise UnstorableError unless every record's own fields can be stored (attributes
    and payloads are stored as JSON, which takes any value)."""
    for record in records:
        for column in dataclasses.fields(record):
            _storable(f"{type(record).__name__}.{column.name}", getattr(record, column.name))


def storable_columns(records: LogColumns | SpanColumns) -> None:
    """storable() for records held as columns: every value of every column."""
    for column in dataclasses.fields(records):
        for value in getattr(records, column.name):
            _storable(f"{type(records).__name__}.{column.name}", value)


def _storable(name: str, value: Any) -> None:
    if isinstance(value, int) and not isinstance(value, bool) and value not in _INT64:
        raise UnstorableError(f"{name} is {value}")
    if isinstance(value, str) and not value.isascii():
        try:
            value.encode()
        except UnicodeEncodeError as exc:
            raise UnstorableError(f"{name}: {exc}") from exc


def _batch(batch: Any) -> Any:
    storable([*batch.samples, *batch.events, *batch.job_runs])
    storable_columns(batch.spans)
    storable_columns(batch.logs)
    return batch


def _otlp(signal: str, content_type: str) -> Callable[[bytes], object]:
    """decode, convert and answer, as the OTLP route does."""

    def parse(body: bytes) -> object:
        message = otlp.decode(signal, body, content_type)
        outcome = CONVERTERS[signal](message, LIMITS, NOW_NS)
        storable(outcome.records)
        storable_columns(outcome.spans)
        storable_columns(outcome.logs)
        return otlp.encode_response(signal, outcome, otlp.is_json(content_type))

    return parse


def _otlp_encoder(signal: str) -> Callable[[bytes], bytes | None]:
    def encode(body: bytes) -> bytes | None:
        try:
            return bytes(otlp.decode(signal, body, "application/json").SerializeToString())
        except Exception:  # not an OTLP/JSON document: the mutator uses a seed instead
            return None

    return encode


def _lines_body(body: bytes) -> object:
    """The lines route: JSON first (its failure is the route's 400), then the parser."""
    try:
        document = json.loads(body)
    except (ValueError, RecursionError) as exc:
        raise IngestError(f"A lines batch must be JSON: {exc}") from exc
    key, outcome, dropped = lines.read_batch(document, LIMITS, NOW_NS)
    storable(outcome.records)
    storable_columns(LogColumns.of(outcome.records))  # as the route hands them to the store
    if dropped not in _INT64:  # it goes to a Prometheus counter
        raise UnstorableError(f"dropped is {dropped}")
    return key, outcome, dropped


def _loki(content_type: str) -> Callable[[bytes], object]:
    def parse(body: bytes) -> object:
        outcome = loki.read_push(body, content_type, "tenant-a", LIMITS, NOW_NS)
        storable(outcome.records)
        storable_columns(LogColumns.of(outcome.records))  # as the route hands them to the store
        return outcome

    return parse


def _loki_encoder(body: bytes) -> bytes | None:
    try:
        request = json_format.Parse(body, loki.PushRequest())
    except Exception:  # not a PushRequest in JSON: the mutator uses a seed instead
        return None
    return seeds.loki_push_request(request.SerializeToString())


_TARGET = scrape.Target("fuzz", "http://127.0.0.1:1/metrics", {"job": "fuzz", "instance": "i"}, {},
                        scrape.ScrapeConfig("fuzz"))  # fmt: skip


def _exposition(content_type: str) -> Callable[[str], object]:
    """Both ways the scraper reads a body: the plain parse and the cached scrape."""

    def parse(text: str) -> object:
        scrape.parse_exposition(text, content_type)
        cache = scrape.SeriesCache()
        samples, keys = scrape.scrape_samples(text, content_type, _TARGET, NOW_NS // 10**6, cache)
        storable(samples)
        return samples, keys

    return parse


class TargetsRaisedError(RuntimeError):
    """targets_of raised a ConfigError, which only the config parser may raise."""


# Python's `re` backtracks (Prometheus uses RE2): a relabel regex of many unbounded repeats
# that fails to match takes exponential time, 5 s for 14 copies of `([^:]+):.*` on a
# 100-character address. A known limitation of the scraper (an admin's regex, not a
# client's input), so regexes past 8 repeats are parsed but not applied here.
_MOST_REPEATS = 8
_REPEAT = re.compile(r"(?<!\\)[*+]|\{\d*,\}")


def _backtracks(config: scrape.ScrapeConfig) -> bool:
    return any(len(_REPEAT.findall(r.regex.pattern)) > _MOST_REPEATS for r in config.relabel)


def _scrape_configs(raw: Any) -> object:
    """The config loader's parse, then the scraper's targets of each job (file_sd left out:
    the fuzzer must not read files the mutations name)."""
    with warnings.catch_warnings():  # re's FutureWarning on `[[`: not an error when serving
        warnings.simplefilter("ignore", FutureWarning)
        configs = scrape.parse_scrape_configs(raw)
    try:
        return [
            scrape.targets_of(dataclasses.replace(c, file_sd=()))
            for c in configs
            if not _backtracks(c)
        ]
    except ConfigError as exc:
        raise TargetsRaisedError(str(exc)) from exc


_ENCODINGS = ("gzip", "x-gzip", "deflate", "br", "identity", "", " GZIP ", "compress", "zstd")


def _compressed(encoding: str, body: bytes) -> bytes:
    if "gzip" in encoding:
        return gzip.compress(body)
    if encoding == "deflate":
        return zlib.compress(body)
    if encoding == "br":
        return bytes(brotli.compress(body))
    return body


def _decompress(value: tuple[str, bytes, int]) -> object:
    """The route's streaming inflater, fed the body in chunks of the drawn size."""
    encoding, body, chunk = value
    inflater = Inflater(encoding, BODY_LIMIT)
    for start in range(0, len(body), chunk):
        inflater.feed(body[start : start + chunk])
    out = inflater.finish()
    if len(out) > BODY_LIMIT:
        raise OverflowError(f"Inflater returned {len(out)} bytes over its {BODY_LIMIT} limit")
    return out


def _bodies_inputs() -> st.SearchStrategy[tuple[str, bytes, int]]:
    plain = (seeds.otlp_json("logs", NOW_NS)[0], b"\x00" * 300_000, b"")
    compressed = {
        encoding: mutators.Seeds(_compressed(encoding.strip().lower(), body) for body in plain)
        for encoding in _ENCODINGS
    }

    @st.composite
    def inputs(draw: st.DrawFn) -> tuple[str, bytes, int]:
        encoding = mutators.pick(draw, _ENCODINGS)
        body = mutators.pick(draw, compressed[encoding])
        if draw(st.integers(0, 4)) > 0:
            body = mutators.mutate_bytes(draw, body, compressed[encoding], mutators.VARINTS)
        chunk = mutators.pick(draw, (1, 7, 1024, 64 * 1024, 1 << 30))
        return encoding, body, max(chunk, len(body) // 1000)  # at most ~1,000 feeds

    return inputs()


# --- the planted bug (negative control) ---------------------------------------------------

_NEGATIVE_LENGTH = re.compile(rb'"length":\s*-\d')


def _envelope_with_planted_bug(body: bytes) -> object:
    """read_envelope as if its length check had regressed: an item with a negative `length`
    raises a bare IndexError, which no caller expects."""
    if _NEGATIVE_LENGTH.search(body):
        raise IndexError("negative item length")
    return sentry.read_envelope(body, 1, NOW_NS)


class FakeClock:
    """A clock the planted slow parser moves forward, so the control needs no sleep."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def planted_uncaught() -> Target:
    """The Sentry envelope target with a planted uncaught exception."""
    return dataclasses.replace(TARGETS["sentry_envelope"], parse=_envelope_with_planted_bug)


def planted_hang() -> Target:
    """The Sentry envelope target whose parser never returns on an envelope with an empty
    line (interrupted after 0.2 s instead of HUNG_S, to keep the control quick)."""

    def parse(body: bytes) -> object:
        while b"\n\n" in body:
            pass
        return sentry.read_envelope(body, 1, NOW_NS)

    return dataclasses.replace(TARGETS["sentry_envelope"], parse=parse, hung_s=0.2)


def planted_slow() -> Target:
    """The Sentry envelope target whose parser "takes" 2 s on an envelope with an empty
    line, by the target's own clock."""
    clock = FakeClock()

    def parse(body: bytes) -> object:
        if b"\n\n" in body:
            clock.now += 2 * SLOWEST_S
        return sentry.read_envelope(body, 1, NOW_NS)

    return dataclasses.replace(TARGETS["sentry_envelope"], parse=parse, clock=clock)


# --- the registry ---------------------------------------------------------------------------


def _loki_protobuf_inputs(now_ns: int) -> st.SearchStrategy[bytes]:
    compressed = mutators.Seeds(seeds.loki_protobuf(now_ns))
    raw = mutators.Seeds(seeds.loki_raw(body) for body in compressed)
    as_json = [json_format.MessageToJson(loki.PushRequest.FromString(r)).encode() for r in raw]
    return st.one_of(
        mutators.mutated_bytes(compressed, mutators.VARINTS),
        mutators.mutated_bytes(raw, mutators.VARINTS).map(seeds.loki_push_request),
        mutators.protobuf_inputs(compressed, as_json, _loki_encoder),
    )


def ingest_inputs(now_ns: int) -> dict[str, st.SearchStrategy[bytes]]:
    """The ingest bodies by target name, mutated from seeds dated `now_ns` (the HTTP
    properties use the real clock, so that what parses is also stored)."""
    out: dict[str, st.SearchStrategy[bytes]] = {}
    for kind in ("traces", "logs", "metrics"):
        json_seeds = seeds.otlp_json(kind, now_ns)
        pb_seeds = seeds.otlp_protobuf(kind, now_ns)
        out[f"otlp_protobuf_{kind}"] = mutators.protobuf_inputs(
            pb_seeds, json_seeds, _otlp_encoder(kind)
        )
        out[f"otlp_json_{kind}"] = mutators.json_inputs(json_seeds, mutators.otlp_extra)
    out["sentry_envelope"] = mutators.envelope_inputs(seeds.sentry_envelopes(now_ns))
    out["sentry_store"] = mutators.json_inputs(seeds.sentry_store_events(now_ns))
    out["lines"] = mutators.json_inputs(seeds.lines_batches(now_ns))
    out["loki_json"] = mutators.json_inputs(seeds.loki_json(now_ns))
    out["loki_protobuf"] = _loki_protobuf_inputs(now_ns)
    return out


def _all_targets() -> dict[str, Target]:
    inputs = ingest_inputs(NOW_NS)
    expositions = mutators.Seeds(
        (seeds.exposition("text.prom"), seeds.exposition("openmetrics.txt"))
    )
    exposition_inputs = mutators.mutated_exposition(expositions)
    found = [
        *(Target(f"otlp_{kind}_{signal}", inputs[f"otlp_{kind}_{signal}"],
                 _otlp(signal, content_type), (IngestError,))
          for signal in ("traces", "logs", "metrics")
          for kind, content_type in (("protobuf", "application/x-protobuf"),
                                     ("json", "application/json"))),
        Target("sentry_envelope", inputs["sentry_envelope"],
               lambda body: _batch(sentry.read_envelope(body, 1, NOW_NS).batch), (IngestError,)),
        Target("sentry_store", inputs["sentry_store"],
               lambda body: _batch(sentry.read_store(body, 1, NOW_NS).batch), (IngestError,)),
        Target("lines", inputs["lines"], _lines_body, (IngestError,)),
        Target("loki_json", inputs["loki_json"], _loki("application/json"), (IngestError,)),
        Target("loki_protobuf", inputs["loki_protobuf"], _loki("application/x-protobuf"),
               (IngestError,)),
        Target("exposition_text", exposition_inputs, _exposition("text/plain; version=0.0.4"),
               (ValueError,)),
        Target("openmetrics", exposition_inputs,
               _exposition("application/openmetrics-text; version=1.0.0"), (ValueError,)),
        Target("scrape_config", mutators.mutated_config(mutators.Seeds(seeds.SCRAPE_CONFIGS)),
               _scrape_configs, (ConfigError,)),
        Target("bodies", _bodies_inputs(), _decompress, (IngestError,)),
    ]  # fmt: skip
    return {
        target.name: dataclasses.replace(target, regressions=REGRESSIONS.get(target.name, ()))
        for target in found
    }


TARGETS = _all_targets()
if os.environ.get("LOOKOUT_FUZZ_PLANTED_BUG") == "1":
    TARGETS["sentry_envelope"] = planted_uncaught()


def names(selected: Sequence[str] = ()) -> list[str]:
    return [name for name in TARGETS if not selected or name in selected]
