"""OTLP metrics into Prometheus samples, by the OpenTelemetry compatibility rules:

- names: unsupported characters become `_`; the unit becomes a suffix (`s` -> `_seconds`,
  `By` -> `_bytes`, `1` on a gauge -> `_ratio`, `{...}` annotations dropped); monotonic sums
  get `_total`;
- labels: attribute keys with `.` and other characters become `_`; `job` comes from
  `service.namespace/service.name`, `instance` from `service.instance.id`; every other
  resource attribute goes to one `target_info` series per resource;
- gauges, cumulative sums and classic (explicit-bucket) histograms and summaries are stored;
- delta temporality is rejected per point (configure cumulative, see docs/server.md), and so
  are exponential histograms, since PromQL here leaves out native histograms.
"""

from __future__ import annotations

import math
import re
from typing import Any

from lookout.ingest.limits import Limits
from lookout.ingest.otlp import Outcome, attributes
from lookout.model import Sample

_CUMULATIVE = 2
_DELTA = 1
_NO_RECORDED_VALUE = 1
_INVALID = re.compile(r"[^a-zA-Z0-9_:]")
_LABEL_INVALID = re.compile(r"[^a-zA-Z0-9_]")
_UNITS = {
    "s": "seconds", "ms": "milliseconds", "us": "microseconds", "ns": "nanoseconds",
    "min": "minutes", "h": "hours", "d": "days", "By": "bytes", "KiBy": "kibibytes",
    "MiBy": "mebibytes", "GiBy": "gibibytes", "KBy": "kilobytes", "MBy": "megabytes",
    "GBy": "gigabytes", "bit": "bits", "m": "meters", "V": "volts", "A": "amperes",
    "J": "joules", "W": "watts", "g": "grams", "Cel": "celsius", "Hz": "hertz", "%": "percent",
}  # fmt: skip
_PER_UNITS = {
    "s": "second", "ms": "millisecond", "us": "microsecond", "ns": "nanosecond",
    "min": "minute", "h": "hour", "d": "day", "m": "meter",
}  # fmt: skip
DELTA_REASON = "delta temporality (send cumulative)"
EXPONENTIAL_REASON = "exponential histogram (native histograms are not supported)"


def metric_name(name: str, unit: str, *, counter: bool, gauge: bool) -> str:
    base = _INVALID.sub("_", name)
    if base and base[0].isdigit():
        base = "_" + base
    if counter and base.endswith("_total"):
        base = base[: -len("_total")]  # the unit goes before _total, which comes back below
    unit = re.sub(r"\{[^}]*\}", "", unit).strip()
    suffix = ""
    if unit == "1" and gauge:
        suffix = "ratio"
    elif unit and unit != "1":
        per = unit.split("/", 1)
        words = [_UNITS.get(per[0], _INVALID.sub("_", per[0]))]
        if len(per) == 2:
            denominator = _UNITS.get(per[1], _INVALID.sub("_", per[1]))
            words.append("per_" + _PER_UNITS.get(per[1], denominator))
        suffix = "_".join(w for w in words if w)
    if suffix and not base.endswith(suffix):
        base = f"{base}_{suffix}"
    if counter and not base.endswith("_total"):
        base += "_total"
    return base


def label_name(key: str) -> str:
    name = _LABEL_INVALID.sub("_", key)
    if name[:1].isdigit():
        return "key_" + name
    if name.startswith("__"):
        return "key" + name  # `__` names are reserved for Prometheus's own use
    return name


def _labels(values: dict[str, Any]) -> dict[str, str]:
    """Attributes as labels; keys that sanitize alike are joined with `;`, as the spec says."""
    out: dict[str, str] = {}
    for key in sorted(values):
        value = values[key]
        text = value if isinstance(value, str) else str(value)
        name = label_name(key)
        out[name] = f"{out[name]};{text}" if name in out else text
    return out


def _identity(resource: dict[str, Any]) -> dict[str, str]:
    name = str(resource.get("service.name") or "unknown_service")
    namespace = resource.get("service.namespace")
    job = f"{namespace}/{name}" if namespace else name
    instance = str(resource.get("service.instance.id") or "")
    return {"job": job, "instance": instance}


def _exemplars(exemplars: Any) -> list[dict[str, Any]]:
    """Exemplars that link to a trace."""
    out = []
    for exemplar in exemplars:
        if any(exemplar.trace_id):
            value = exemplar.as_double if exemplar.HasField("as_double") else exemplar.as_int
            out.append({
                "trace_id": exemplar.trace_id.hex(),
                "span_id": exemplar.span_id.hex(),
                "value": value,
                "ts_ms": exemplar.time_unix_nano // 1_000_000,
            })  # fmt: skip
    return out


def _exemplar(exemplars: Any) -> dict[str, Any] | None:
    found = _exemplars(exemplars)
    return found[-1] if found else None


def samples(request: Any, limits: Limits, now_ns: int) -> Outcome:
    outcome = Outcome()
    out = outcome.records
    for resource_metrics in request.resource_metrics:
        resource = attributes(resource_metrics.resource.attributes)
        identity = _identity(resource)
        info_labels = {
            **_labels({
                k: v for k, v in resource.items()
                if k not in ("service.name", "service.namespace", "service.instance.id")
            }),
            **identity,  # job and instance always join target_info to its series
        }  # fmt: skip
        info_written = False
        for scope_metrics in resource_metrics.scope_metrics:
            for metric in scope_metrics.metrics:
                kind = metric.WhichOneof("data")
                if kind is None:
                    outcome.reject("metric without data")
                    continue
                for sample in _points(
                    metric, kind=kind, identity=identity, limits=limits, now_ns=now_ns,
                    outcome=outcome,
                ):  # fmt: skip
                    out.append(sample)
                    if not info_written:
                        out.append(Sample("target_info", info_labels, sample.ts_ms, 1.0))
                        info_written = True
    return outcome


def _points(
    metric: Any,
    *,
    kind: str,
    identity: dict[str, str],
    limits: Limits,
    now_ns: int,
    outcome: Outcome,
) -> list[Sample]:
    data = getattr(metric, kind)
    result: list[Sample] = []
    if kind == "exponential_histogram":
        outcome.reject(EXPONENTIAL_REASON, len(data.data_points))
        return result
    temporality = getattr(data, "aggregation_temporality", _CUMULATIVE)
    if kind in ("sum", "histogram") and temporality == _DELTA:
        outcome.reject(DELTA_REASON, len(data.data_points))
        return result
    monotonic = kind == "sum" and data.is_monotonic
    gauge = kind == "gauge" or (kind == "sum" and not monotonic)
    name = metric_name(metric.name, metric.unit, counter=monotonic, gauge=gauge)
    for point in data.data_points:
        if point.flags & _NO_RECORDED_VALUE:
            continue
        problem = limits.time_problem(point.time_unix_nano, now_ns)
        if problem:
            outcome.reject(problem)
            continue
        labels = {**_labels(attributes(point.attributes)), **identity}
        ts_ms = point.time_unix_nano // 1_000_000
        if kind in ("gauge", "sum"):
            value = point.as_double if point.HasField("as_double") else float(point.as_int)
            result.append(Sample(name, labels, ts_ms, value, _exemplar(point.exemplars)))
        elif kind == "histogram":
            result.extend(_histogram(name, labels, ts_ms, point))
        elif kind == "summary":
            result.extend(
                Sample(name, {**labels, "quantile": _le(q.quantile)}, ts_ms, q.value)
                for q in point.quantile_values
            )
            result.append(Sample(f"{name}_sum", labels, ts_ms, point.sum))
            result.append(Sample(f"{name}_count", labels, ts_ms, float(point.count)))
    return result


def _le(bound: float) -> str:
    if math.isinf(bound):
        return "+Inf"
    return repr(float(bound))


def _histogram(name: str, labels: dict[str, str], ts_ms: int, point: Any) -> list[Sample]:
    """Classic buckets with cumulative `le` counts; each exemplar on the bucket it falls in."""
    exemplars = _exemplars(point.exemplars)

    def falls_in(low: float, high: float) -> dict[str, Any] | None:
        inside = [e for e in exemplars if low < e["value"] <= high]
        return inside[-1] if inside else None

    out = []
    cumulative = 0
    counts = list(point.bucket_counts)
    low = float("-inf")
    for index, bound in enumerate(point.explicit_bounds):
        cumulative += counts[index] if index < len(counts) else 0
        bucket = {**labels, "le": _le(bound)}
        out.append(Sample(f"{name}_bucket", bucket, ts_ms, float(cumulative), falls_in(low, bound)))
        low = bound
    infinite = {**labels, "le": "+Inf"}
    tail = falls_in(low, float("inf"))
    out.append(Sample(f"{name}_bucket", infinite, ts_ms, float(point.count), tail))
    if point.HasField("sum"):
        out.append(Sample(f"{name}_sum", labels, ts_ms, point.sum))
    out.append(Sample(f"{name}_count", labels, ts_ms, float(point.count)))
    return out
