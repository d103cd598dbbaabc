"""The Prometheus HTTP API: every endpoint by GET and form POST in Prometheus's shapes, its
errors and limits (bad_data, execution, timeout, the query slots), RE2 label regexes, the
requests Grafana sends (grafana_golden.py), and the real promtool against a real server."""

from __future__ import annotations

import math
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from lookout.config import ServerConfig, load
from lookout.errors import ConfigError
from lookout.model import Batch, Sample
from lookout.query.promql.store import StoreStorage
from lookout.selfmetrics import ServerMetrics
from lookout.server.prom_api import (
    Params,
    PromAPI,
    format_time,
    format_value,
    parse_duration,
    parse_time,
)
from lookout.store import Database, Writer
from tests.conftest import require_binary
from tests.promql.grafana_golden import GOLDEN, Golden, check_shape
from tests.server.conftest import InProcess, RunningServer, config_for, in_process, start_server
from tests.support import wait_until

# The seeded series' newest sample: a whole minute, two minutes ago.
T = int(time.time()) // 60 * 60 - 120
T_MS = T * 1000
LONG = "a" * 40 + "b"  # a label value that makes backtracking regexes take forever
TRACE, SPAN = "ab" * 16, "cd" * 8
FORM = {"Content-Type": "application/x-www-form-urlencoded"}


def _requests() -> list[Sample]:
    """Two counters every 15 s over the last five minutes up to T: a rises 10 a scrape, b 20."""
    return [
        Sample("http_requests_total", {"job": "api", "instance": name}, T_MS - (20 - k) * 15_000,
               float(k * step))
        for k in range(21)
        for name, step in (("a", 10), ("b", 20))
    ]  # fmt: skip


def _up() -> list[Sample]:
    exemplar = {"trace_id": TRACE, "span_id": SPAN, "value": 1.0, "ts_ms": T_MS - 500}
    return [Sample("up", {"job": "api", "instance": "a"}, T_MS, 1.0, exemplar)]


EDGES = {  # value -> how Prometheus writes it
    "nan": (math.nan, "NaN"),
    "inf": (math.inf, "+Inf"),
    "neg_inf": (-math.inf, "-Inf"),
    "tiny": (1e-7, "1e-07"),
    "small": (1.5e-5, "0.000015"),
    "tenth": (0.1, "0.1"),
    "whole": (100.0, "100"),
    "big": (1e20, "100000000000000000000"),
    "huge": (1.5e21, "1.5e+21"),
    "negative": (-2.5, "-2.5"),
}


def _more() -> list[Sample]:
    """Everything else the endpoint tests look at."""
    at = T_MS
    samples = [Sample("edge", {"case": case}, at, value) for case, (value, _) in EDGES.items()]
    samples += [
        Sample("up", {"job": "db", "instance": "c"}, at, 0.0),
        Sample("old_metric", {"job": "api"}, at - 2 * 3_600_000, 1.0),
        Sample("files", {"path": LONG}, at, 1.0),
        Sample("latency_seconds_bucket", {"le": "0.1"}, at, 3.0),
        Sample("latency_seconds_bucket", {"le": "+Inf"}, at, 4.0),
        Sample("latency_seconds_sum", {}, at, 0.4),
        Sample("latency_seconds_count", {}, at, 4.0),
        Sample("rpc_seconds", {"quantile": "0.5"}, at, 0.2),
        Sample("rpc_seconds_sum", {}, at, 9.0),
        Sample("rpc_seconds_count", {}, at, 30.0),
    ]
    return samples


def _seed(server: InProcess, samples: list[Sample]) -> None:
    server.runtime.writer.submit(Batch(samples=samples)).result(10)


@pytest.fixture
def prom(tmp_path: Path) -> Iterator[InProcess]:
    with in_process(config_for(tmp_path / "data")) as server:
        _seed(server, _requests() + _up() + _more())
        yield server


def _ask(server: InProcess, method: str, path: str, params: dict[str, Any]) -> httpx.Response:
    if method == "GET":
        return server.client.get(path, params=params)
    return server.client.post(path, data=params, headers=FORM)


BOTH = pytest.mark.parametrize("method", ["GET", "POST"])


# -- queries ---------------------------------------------------------------------------------
@BOTH
def test_an_instant_query_answers_a_vector_in_prometheus_shape(
    prom: InProcess, method: str
) -> None:
    answer = _ask(prom, method, "/api/v1/query", {"query": "up", "time": str(T)})
    assert answer.status_code == 200
    assert answer.headers["content-type"] == "application/json"
    body = answer.json()
    body["data"]["result"].sort(key=lambda s: s["metric"]["job"])
    assert body == {"status": "success", "data": {"resultType": "vector", "result": [
        {"metric": {"__name__": "up", "instance": "a", "job": "api"}, "value": [T, "1"]},
        {"metric": {"__name__": "up", "instance": "c", "job": "db"}, "value": [T, "0"]},
    ]}}  # fmt: skip


@BOTH
@pytest.mark.parametrize("step", ["60", "60s", "1m", "60.0"])
def test_a_range_query_answers_a_matrix_for_numeric_and_duration_steps(
    prom: InProcess, method: str, step: str
) -> None:
    params = {"query": "sum by (job) (http_requests_total)", "start": str(T - 120),
              "end": str(T), "step": step}  # fmt: skip
    body = _ask(prom, method, "/api/v1/query_range", params).json()
    # At T-120, T-60 and T: scrapes 12, 16 and 20 of a (10 each) and b (20 each).
    assert body == {"status": "success", "data": {"resultType": "matrix", "result": [
        {"metric": {"job": "api"}, "values": [[T - 120, "360"], [T - 60, "480"], [T, "600"]]},
    ]}}  # fmt: skip


def test_timestamps_keep_their_milliseconds(prom: InProcess) -> None:
    body = prom.client.get("/api/v1/query", params={"query": "1", "time": f"{T}.250"}).json()
    assert body["data"] == {"resultType": "scalar", "result": [T + 0.25, "1"]}
    assert '"result":[' + f"{T}.250" in _ask(prom, "GET", "/api/v1/query",
                                             {"query": "1", "time": f"{T}.25"}).text  # fmt: skip


def test_scalar_and_string_results(prom: InProcess) -> None:
    scalar = prom.client.get("/api/v1/query", params={"query": "1+1", "time": str(T)}).json()
    assert scalar == {"status": "success", "data": {"resultType": "scalar", "result": [T, "2"]}}
    text = prom.client.get("/api/v1/query", params={"query": '"hello"', "time": str(T)}).json()
    assert text == {"status": "success", "data": {"resultType": "string",
                                                  "result": [T, "hello"]}}  # fmt: skip


def test_a_range_query_of_a_scalar_is_a_matrix_without_labels(prom: InProcess) -> None:
    params = {"query": "2", "start": str(T - 30), "end": str(T), "step": "15s"}
    body = prom.client.get("/api/v1/query_range", params=params).json()
    assert body["data"] == {"resultType": "matrix", "result": [
        {"metric": {}, "values": [[T - 30, "2"], [T - 15, "2"], [T, "2"]]}]}  # fmt: skip


def test_values_are_written_as_prometheus_writes_them(prom: InProcess) -> None:
    body = prom.client.get("/api/v1/query", params={"query": "edge", "time": str(T)}).json()
    written = {s["metric"]["case"]: s["value"][1] for s in body["data"]["result"]}
    assert written == {case: text for case, (_, text) in EDGES.items()}


@pytest.mark.parametrize(
    ("value", "text"),
    [(0.0, "0"), (-0.0, "-0"), (1.0, "1"), (1e15, "1000000000000000"), (1e16, "10000000000000000"),
     (123456.789, "123456.789"), (1e-6, "0.000001"), (9.99e-7, "9.99e-07"), (1e21, "1e+21"),
     (2.5e-300, "2.5e-300"), (1 / 3, "0.3333333333333333"), (math.nan, "NaN")],
)  # fmt: skip
def test_format_value_is_go_shortest_formatting(value: float, text: str) -> None:
    assert format_value(value) == text


@pytest.mark.parametrize(("ms", "text"), [(0, "0"), (1500, "1.500"), (1005, "1.005"),
                                          (-1500, "-1.500"), (T_MS, str(T))])  # fmt: skip
def test_format_time_is_prometheus_marshal_timestamp(ms: int, text: str) -> None:
    assert format_time(ms) == text


def test_an_instant_query_reports_warnings_and_infos(prom: InProcess) -> None:
    """`rate` of a series not named like a counter: Prometheus 3's info annotation."""
    body = prom.client.get("/api/v1/query", params={"query": "rate(up[5m])", "time": str(T)})
    answer = body.json()
    assert answer["status"] == "success"
    assert "infos" in answer or "warnings" in answer
    assert all(isinstance(x, str) for x in answer.get("infos", []) + answer.get("warnings", []))


# -- lookups ---------------------------------------------------------------------------------
@BOTH
def test_series_by_several_selectors_sorted_by_labels(prom: InProcess, method: str) -> None:
    params = {"match[]": ['up{job="api"}', "http_requests_total"], "start": str(T - 600),
              "end": str(T)}  # fmt: skip
    assert _ask(prom, method, "/api/v1/series", params).json() == {"status": "success", "data": [
        {"__name__": "http_requests_total", "instance": "a", "job": "api"},
        {"__name__": "http_requests_total", "instance": "b", "job": "api"},
        {"__name__": "up", "instance": "a", "job": "api"},
    ]}  # fmt: skip


def test_series_takes_parameters_from_the_query_string_and_the_form_together(
    prom: InProcess,
) -> None:
    answer = prom.client.post(
        "/api/v1/series", params={"match[]": "up"}, data={"match[]": "old_metric"}, headers=FORM
    ).json()
    assert [s["__name__"] for s in answer["data"]] == ["old_metric", "up", "up"]


@BOTH
def test_label_names_and_values_honour_match_and_the_window(prom: InProcess, method: str) -> None:
    recent = {"start": str(T - 600), "end": str(T)}
    names = _ask(prom, method, "/api/v1/label/__name__/values", recent).json()["data"]
    assert "old_metric" not in names
    assert "http_requests_total" in names
    everything = _ask(prom, method, "/api/v1/label/__name__/values", {}).json()["data"]
    assert "old_metric" in everything
    assert _ask(prom, method, "/api/v1/labels", {"match[]": "up", **recent}).json() == {
        "status": "success", "data": ["__name__", "instance", "job"]}  # fmt: skip
    jobs = _ask(prom, method, "/api/v1/label/job/values", {"match[]": "up", **recent}).json()
    assert jobs == {"status": "success", "data": ["api", "db"]}


def test_label_lookups_take_a_limit_and_say_they_truncated(prom: InProcess) -> None:
    answer = prom.client.get("/api/v1/label/__name__/values", params={"limit": "2"}).json()
    assert answer == {"status": "success", "data": ["edge", "files"],
                      "warnings": ["results truncated due to limit"]}  # fmt: skip


@BOTH
def test_metadata_derives_each_family_type_from_its_names(prom: InProcess, method: str) -> None:
    data = _ask(prom, method, "/api/v1/metadata", {}).json()["data"]
    kinds = {name: entries[0]["type"] for name, entries in data.items()}
    assert kinds == {"edge": "unknown", "files": "unknown", "http_requests_total": "counter",
                     "latency_seconds": "histogram", "old_metric": "unknown",
                     "rpc_seconds": "summary", "up": "unknown"}  # fmt: skip
    assert data["up"] == [{"type": "unknown", "help": "", "unit": ""}]
    one = _ask(prom, method, "/api/v1/metadata", {"metric": "latency_seconds"}).json()
    assert one == {"status": "success",
                   "data": {"latency_seconds": [{"type": "histogram", "help": "", "unit": ""}]}}  # fmt: skip


@BOTH
def test_tsdb_status_counts_series_and_labels(prom: InProcess, method: str) -> None:
    data = _ask(prom, method, "/api/v1/status/tsdb", {"limit": "3"}).json()["data"]
    assert set(data) == {"headStats", "seriesCountByMetricName", "labelValueCountByLabelName",
                         "memoryInBytesByLabelName", "seriesCountByLabelValuePair"}  # fmt: skip
    assert data["headStats"]["numSeries"] == 23
    assert data["headStats"]["maxTime"] == T_MS
    assert data["headStats"]["minTime"] == T_MS - 2 * 3_600_000
    assert data["seriesCountByMetricName"] == [
        {"name": "edge", "value": 10}, {"name": "http_requests_total", "value": 2},
        {"name": "latency_seconds_bucket", "value": 2}]  # fmt: skip
    assert data["labelValueCountByLabelName"][0] == {"name": "__name__", "value": 11}
    assert len(data["seriesCountByLabelValuePair"]) == 3


@BOTH
def test_buildinfo_rules_and_alerts(prom: InProcess, method: str) -> None:
    info = _ask(prom, method, "/api/v1/status/buildinfo", {}).json()
    assert info["status"] == "success"
    assert info["data"]["version"] == "3.0.0"
    assert info["data"]["revision"].startswith("lookout ")
    rules = _ask(prom, method, "/api/v1/rules", {}).json()
    assert rules == {"status": "success", "data": {"groups": []}}
    alerts = _ask(prom, method, "/api/v1/alerts", {}).json()
    assert alerts == {"status": "success", "data": {"alerts": []}}


@BOTH
def test_targets_with_a_state_filter(prom: InProcess, method: str) -> None:
    """The in-process server scrapes nothing: both lists empty, whatever `state` says."""
    for state in ({}, {"state": "active"}, {"state": "dropped"}, {"state": "any"}):
        answer = _ask(prom, method, "/api/v1/targets", state)
        assert answer.status_code == 200
        assert answer.json() == {
            "status": "success",
            "data": {"activeTargets": [], "droppedTargets": []},
        }


@BOTH
def test_exemplars_of_the_selectors_in_a_query(prom: InProcess, method: str) -> None:
    params = {"query": 'sum(rate(up{job="api"}[5m]))', "start": str(T - 60), "end": str(T)}
    assert _ask(prom, method, "/api/v1/query_exemplars", params).json() == {
        "status": "success",
        "data": [{"seriesLabels": {"__name__": "up", "instance": "a", "job": "api"},
                  "exemplars": [{"labels": {"span_id": SPAN, "trace_id": TRACE}, "value": "1",
                                 "timestamp": T - 0.5}]}],
    }  # fmt: skip


# -- errors and limits -----------------------------------------------------------------------
@pytest.mark.parametrize(
    ("path", "params", "message"),
    [
        ("/api/v1/query", {"query": "sum(rate(up[5m])"},
         'invalid parameter "query": parse error: unclosed left parenthesis'),
        ("/api/v1/query", {"query": ""}, 'invalid parameter "query": empty query'),
        ("/api/v1/query", {"query": "up", "time": "yesterday"},
         "invalid parameter \"time\": cannot parse 'yesterday' to a valid timestamp"),
        ("/api/v1/query", {"query": "up", "timeout": "soon"},
         "invalid parameter \"timeout\": cannot parse 'soon' to a valid duration"),
        ("/api/v1/query_range", {"query": "up", "start": "1", "end": "2", "step": "x"},
         "invalid parameter \"step\": cannot parse 'x' to a valid duration"),
        ("/api/v1/query_range", {"query": "up", "start": "1", "end": "2", "step": "0"},
         'invalid parameter "step": zero or negative query resolution step widths are not '
         "accepted. Try a positive integer"),
        ("/api/v1/query_range", {"query": "up", "start": "10", "end": "2", "step": "1"},
         'invalid parameter "end": end timestamp must not be before start time'),
        ("/api/v1/query_range", {"query": "up", "end": "2", "step": "1"},
         "invalid parameter \"start\": cannot parse '' to a valid timestamp"),
        ("/api/v1/query_range", {"query": "up", "start": "0", "end": "11001", "step": "1"},
         "exceeded maximum resolution of 11,000 points per timeseries. Try decreasing the "
         "query resolution (?step=XX)"),
        ("/api/v1/series", {}, "no match[] parameter provided"),
        ("/api/v1/series", {"match[]": "up{"},
         'invalid parameter "match[]": parse error: unexpected end of input inside braces'),
        ("/api/v1/series", {"match[]": "sum(up)"},
         "invalid parameter \"match[]\": 'sum(up)' is not a series selector such as "
         'up{job="api"}'),
        ("/api/v1/series", {"match[]": '{a=~"("}'},
         'invalid parameter "match[]": parse error: illegal regex for ('),
        ("/api/v1/labels", {"start": "1", "end": "0"},
         'invalid parameter "end": end timestamp must not be before start time'),
        ("/api/v1/labels", {"limit": "many"},
         "invalid parameter \"limit\": cannot parse 'many' to a valid limit"),
        ("/api/v1/rules", {"type": "both"}, "invalid parameter \"type\": not supported value 'both'"),
    ],
)  # fmt: skip
def test_bad_parameters_are_bad_data_400(
    prom: InProcess, path: str, params: dict[str, str], message: str
) -> None:
    answer = prom.client.get(path, params=params)
    assert (answer.status_code, answer.json()) == (
        400, {"status": "error", "errorType": "bad_data", "error": message})  # fmt: skip


def test_exactly_11000_points_is_allowed(prom: InProcess) -> None:
    params = {"query": "1", "start": "0", "end": "11000", "step": "1"}
    assert prom.client.get("/api/v1/query_range", params=params).status_code == 200


def test_a_query_over_the_sample_limit_is_execution_422(tmp_path: Path) -> None:
    with in_process(config_for(tmp_path / "data", query_max_samples=10)) as server:
        _seed(server, _requests())
        answer = server.client.get("/api/v1/query", params={
            "query": "http_requests_total[5m]", "time": str(T)})  # fmt: skip
        small = server.client.get("/api/v1/query", params={"query": "up", "time": str(T)})
    assert (answer.status_code, answer.json()) == (422, {
        "status": "error", "errorType": "execution",
        "error": "query processing would load too many samples into memory in query execution",
    })  # fmt: skip
    assert small.status_code == 200


class Gate:
    """Holds every select_flat() (what the engine calls) until released, counting those that
    entered."""

    def __init__(self) -> None:
        self.entered = 0
        self.release = threading.Event()
        self.lock = threading.Lock()
        self.original = StoreStorage.select_flat

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        gate = self

        def select(storage: StoreStorage, *args: Any) -> Any:
            with gate.lock:
                gate.entered += 1
            gate.release.wait(20)
            return gate.original(storage, *args)

        monkeypatch.setattr(StoreStorage, "select_flat", select)


def _in_thread(work: Any) -> tuple[threading.Thread, list[Any]]:
    out: list[Any] = []
    thread = threading.Thread(target=lambda: out.append(work()), daemon=True)
    thread.start()
    return thread, out


@pytest.fixture
def slots(monkeypatch: pytest.MonkeyPatch) -> list[PromAPI]:
    """The PromAPI of the next in-process server, to watch its queue."""
    made: list[PromAPI] = []
    original = PromAPI.__init__

    def remember(self: PromAPI, runtime: Any) -> None:
        original(self, runtime)
        made.append(self)

    monkeypatch.setattr(PromAPI, "__init__", remember)
    return made


def test_a_query_past_its_timeout_is_503(
    slots: list[PromAPI], prom: InProcess, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A storage that never returns: the answer comes at the timeout all the same, and the
    query's slot stays taken until its thread is done."""
    (api,) = slots
    gate = Gate()
    gate.install(monkeypatch)
    began = time.monotonic()
    answer = prom.client.get("/api/v1/query", params={"query": "up", "timeout": "200ms"})
    waited = time.monotonic() - began
    assert api.running == 1
    gate.release.set()
    wait_until(lambda: api.running == 0, 10, "the timed-out query's thread to finish")
    assert (answer.status_code, answer.json()) == (503, {
        "status": "error", "errorType": "timeout",
        "error": "query timed out in expression evaluation"})  # fmt: skip
    assert waited < 5


def test_queries_beyond_the_concurrency_limit_wait_for_a_slot(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, slots: list[PromAPI]
) -> None:
    """Default 4: four evaluate, the fifth queues until one finishes, then all answer."""
    with in_process(config_for(tmp_path / "data")) as server:
        _seed(server, _up())
        (api,) = slots
        assert api.concurrency == 4
        gate = Gate()
        gate.install(monkeypatch)
        params = {"query": "up", "time": str(T)}
        threads = [_in_thread(lambda: server.client.get("/api/v1/query", params=params))
                   for _ in range(5)]  # fmt: skip
        wait_until(lambda: gate.entered == 4 and api.queued == 1, 10, "4 running, 1 queued")
        assert (gate.entered, api.running, api.queued) == (4, 4, 1)
        gate.release.set()
        for thread, _ in threads:
            thread.join(20)
        assert [out[0].status_code for _, out in threads] == [200] * 5
        assert gate.entered == 5
        assert (api.running, api.queued) == (0, 0)


def test_a_query_that_waits_in_the_queue_past_its_timeout_is_503(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, slots: list[PromAPI]
) -> None:
    with in_process(config_for(tmp_path / "data", query_concurrency=1)) as server:
        (api,) = slots
        gate = Gate()
        gate.install(monkeypatch)
        first, out = _in_thread(lambda: server.client.get("/api/v1/query", params={"query": "up"}))
        wait_until(lambda: gate.entered == 1, 10, "the first query to hold the slot")
        second = server.client.get("/api/v1/query", params={"query": "up", "timeout": "0.2"})
        assert (second.status_code, second.json()) == (503, {
            "status": "error", "errorType": "timeout",
            "error": "query timed out in query queue"})  # fmt: skip
        assert api.queued == 0
        gate.release.set()
        first.join(20)
        assert out[0].status_code == 200


@pytest.mark.parametrize(("asked", "granted"), [("1h", 2.0), ("500ms", 0.5), ("", 2.0)])
def test_the_timeout_parameter_can_lower_query_timeout_only(asked: str, granted: float) -> None:
    api = PromAPI(_Runtime(ServerConfig(query_timeout=2.0)))
    assert api._timeout(Params([("timeout", asked)])) == granted


class _Runtime:
    def __init__(self, config: ServerConfig) -> None:
        self.config = config


@pytest.mark.parametrize("path", ["/api/v1/query", "/api/v1/series", "/api/v1/labels",
                                  "/api/v1/status/buildinfo", "/api/v1/label/job/values"])  # fmt: skip
def test_the_prometheus_api_asks_for_the_query_credential(tmp_path: Path, path: str) -> None:
    token = "q" * 20
    with in_process(config_for(tmp_path / "data", query_tokens=(token,))) as server:
        params = {"query": "1", "match[]": "up"}
        refused = server.client.get(path, params=params)
        wrong = server.client.get(
            path, params=params, headers={"Authorization": "Bearer " + "x" * 20}
        )
        allowed = server.client.get(
            path, params=params, headers={"Authorization": f"Bearer {token}"}
        )
    assert (refused.status_code, wrong.status_code, allowed.status_code) == (401, 403, 200)
    assert allowed.json()["status"] == "success"


# -- regexes are RE2: linear, whatever the pattern -------------------------------------------
@pytest.mark.parametrize("pattern", ["(a+)+c", "(a|a)*c", "(a|aa)+$c"])
def test_a_pathological_regex_answers_quickly(prom: InProcess, pattern: str) -> None:
    began = time.monotonic()
    series = prom.client.get("/api/v1/series", params={"match[]": f'{{path=~"{pattern}"}}'})
    query = prom.client.get("/api/v1/query",
                            params={"query": f'files{{path=~"{pattern}"}}', "time": str(T)})  # fmt: skip
    assert time.monotonic() - began < 5
    assert series.json() == {"status": "success", "data": []}
    assert query.json()["data"]["result"] == []
    matching = prom.client.get("/api/v1/series", params={"match[]": '{path=~"(a+)+b"}'}).json()
    assert matching["data"] == [{"__name__": "files", "path": LONG}]


def test_python_re_on_the_same_pattern_would_not_finish() -> None:
    """The negative control: backtracking `re` on the value above outlasts any timeout."""
    code = f"import re; re.fullmatch(r'(a+)+c', {LONG!r})"
    with pytest.raises(subprocess.TimeoutExpired):
        subprocess.run([sys.executable, "-c", code], timeout=1.0, check=False)


# -- Grafana ---------------------------------------------------------------------------------
@pytest.fixture
def grafana(tmp_path: Path) -> Iterator[InProcess]:
    with in_process(config_for(tmp_path / "data")) as server:
        _seed(server, _requests() + _up())
        yield server


def _filled(value: Any) -> Any:
    times = {"$NOW": str(T), "$START": str(T - 600), "$END": str(T)}
    if isinstance(value, list):
        return [times.get(v, v) for v in value]
    return times.get(value, value)


@pytest.mark.parametrize("golden", GOLDEN, ids=[g.name for g in GOLDEN])
def test_grafana_requests_get_the_answers_grafana_expects(
    grafana: InProcess, golden: Golden
) -> None:
    params = {key: _filled(value) for key, value in golden.params.items()}
    if golden.method == "GET":
        answer = grafana.client.get(golden.path, params=params, headers=golden.headers)
    else:
        answer = grafana.client.post(golden.path, data=params, headers=golden.headers)
    assert answer.status_code == golden.status, answer.text
    check_shape(answer.json(), golden.shape)


# -- parameters and config -------------------------------------------------------------------
@pytest.mark.parametrize(
    ("text", "ms"),
    [("15", 15_000), ("0.5", 500), ("1m30s", 90_000), ("2h", 7_200_000), ("1d", 86_400_000),
     ("1w", 604_800_000), ("1y", 31_536_000_000), ("250ms", 250), ("1h0m5s", 3_605_000)],
)  # fmt: skip
def test_durations_are_seconds_or_prometheus_durations(text: str, ms: int) -> None:
    assert parse_duration("step", text) == ms


@pytest.mark.parametrize(
    ("text", "ms"),
    [("1700000000", 1_700_000_000_000), ("1700000000.123", 1_700_000_000_123),
     ("2023-11-14T22:13:20Z", 1_700_000_000_000),
     ("2023-11-14T22:13:20.5+00:00", 1_700_000_000_500)],
)  # fmt: skip
def test_times_are_unix_seconds_or_rfc3339(text: str, ms: int) -> None:
    assert parse_time("time", text) == ms


def test_query_config_keys_are_validated(tmp_path: Path) -> None:
    config = load(None, environ={"LOOKOUT_QUERY_TIMEOUT": "2m", "LOOKOUT_QUERY_CONCURRENCY": "8",
                                 "LOOKOUT_QUERY_LOOKBACK": "90s",
                                 "LOOKOUT_QUERY_CACHE_SIZE": "64MiB",
                                 "LOOKOUT_QUERY_MAX_SAMPLES": "1000"})  # fmt: skip
    assert (config.query_timeout, config.query_concurrency, config.query_lookback,
            config.query_cache_size, config.query_max_samples) == (
        120.0, 8, 90.0, 64 * 1024 * 1024, 1000)  # fmt: skip
    with pytest.raises(ConfigError, match=re.escape("Config 'query_concurrency' has value '0'")):
        load(None, environ={"LOOKOUT_QUERY_CONCURRENCY": "0"})
    with pytest.raises(ConfigError, match="a duration such as 30s"):
        load(None, environ={"LOOKOUT_QUERY_TIMEOUT": "soon"})


# -- promtool, against a real server ---------------------------------------------------------
@pytest.fixture(scope="module")
def real_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    data = tmp_path_factory.mktemp("promtool") / "data"
    database = Database(data)
    writer = Writer(database, ServerMetrics())
    writer.start()
    try:
        writer.submit(Batch(samples=_requests() + _up())).result(10)
    finally:
        writer.stop()
        database.close()
    running = start_server(data)
    try:
        yield running
    finally:
        running.stop()


def _promtool(*args: str) -> subprocess.CompletedProcess[str]:
    promtool = require_binary("promtool", "prometheus")
    return subprocess.run([promtool, *args], capture_output=True, text=True, timeout=60,
                          check=False)  # fmt: skip


def test_promtool_instant_query(real_server: RunningServer) -> None:
    done = _promtool("query", "instant", "--time", str(T), real_server.url, "http_requests_total")
    assert done.returncode == 0, done.stderr
    assert sorted(done.stdout.splitlines()) == [
        f'http_requests_total{{instance="a", job="api"}} => 200 @[{T}]',
        f'http_requests_total{{instance="b", job="api"}} => 400 @[{T}]',
    ]


def test_promtool_range_query(real_server: RunningServer) -> None:
    done = _promtool("query", "range", "--start", str(T - 60), "--end", str(T), "--step", "30s",
                     real_server.url, "sum(http_requests_total)")  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        "{} =>", f"480 @[{T - 60}]", f"540 @[{T - 30}]", f"600 @[{T}]"]  # fmt: skip


def test_promtool_series_and_labels(real_server: RunningServer) -> None:
    series = _promtool("query", "series", "--match", "http_requests_total", real_server.url)
    assert series.returncode == 0, series.stderr
    assert series.stdout.splitlines() == [
        '{__name__="http_requests_total", instance="a", job="api"}',
        '{__name__="http_requests_total", instance="b", job="api"}',
    ]
    labels = _promtool("query", "labels", real_server.url, "job")
    assert labels.returncode == 0, labels.stderr
    assert "api" in labels.stdout.splitlines()


def test_promtool_reports_a_parse_error(real_server: RunningServer) -> None:
    done = _promtool("query", "instant", real_server.url, "sum(")
    assert done.returncode == 1
    assert done.stderr.strip() == (
        'query error: bad_data: invalid parameter "query": parse error: unclosed left parenthesis'
    )


def test_promtool_sends_basic_auth_from_the_url(tmp_path: Path) -> None:
    """What docs/promql.md tells promtool users: a `query_users` user in the URL."""
    require_binary("promtool", "prometheus")
    running = start_server(tmp_path / "data", env={"LOOKOUT_QUERY_USERS": "ops:a-long-password"},
                           probe="/healthz")  # fmt: skip
    try:
        refused = _promtool("query", "instant", running.url, "1+1")
        url = running.url.replace("http://", "http://ops:a-long-password@")
        done = _promtool("query", "instant", "--time", str(T), url, "1+1")
    finally:
        running.stop()
    assert refused.returncode == 1
    assert "401" in refused.stderr
    assert (done.returncode, done.stdout) == (0, f"scalar: 2 @[{T}]\n")
