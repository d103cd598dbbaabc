"""Prometheus scraping, the pure parts: a documented subset of `scrape_configs`, relabeling,
targets, and exposition (text and OpenMetrics) into samples.

Supported per job: job_name, scrape_interval, scrape_timeout, metrics_path, scheme,
static_configs, file_sd_configs (JSON), honor_labels, and relabel_configs with the actions
replace, keep, drop and labelmap. The same block runs unchanged in a real Prometheus.
"""

from __future__ import annotations

import json
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lookout.errors import ConfigError
from lookout.model import Sample

# Prometheus's staleness marker: a NaN with this exact bit pattern.
STALE_NAN = struct.unpack("<d", struct.pack("<Q", 0x7FF0000000000002))[0]
_DURATION = re.compile(r"^(?:(\d+)d)?(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?(?:(\d+)ms)?$")
_ACTIONS = ("replace", "keep", "drop", "labelmap")
_GROUP_REF = re.compile(r"\$\{?(\d+)\}?")
_KNOWN = {"job_name", "scrape_interval", "scrape_timeout", "metrics_path", "scheme",
          "static_configs", "file_sd_configs", "honor_labels", "relabel_configs"}  # fmt: skip


def parse_duration(key: str, text: Any) -> float:
    """Prometheus durations: `15s`, `1m30s`, `500ms`, `1h`."""
    match = _DURATION.match(str(text))
    if not match or not any(match.groups()):
        raise ConfigError(key, text, "a duration such as '15s' or '1m'")
    days, hours, minutes, seconds, millis = (int(g) if g else 0 for g in match.groups())
    return days * 86400 + hours * 3600 + minutes * 60 + seconds + millis / 1000


@dataclass(frozen=True)
class Relabel:
    source_labels: tuple[str, ...] = ()
    separator: str = ";"
    regex: re.Pattern[str] = re.compile("(.*)")
    target_label: str = ""
    replacement: str = "$1"
    action: str = "replace"


@dataclass(frozen=True)
class ScrapeConfig:
    job_name: str
    scrape_interval: float = 15.0
    scrape_timeout: float = 10.0
    metrics_path: str = "/metrics"
    scheme: str = "http"
    static_targets: tuple[tuple[str, tuple[tuple[str, str], ...]], ...] = ()
    file_sd: tuple[str, ...] = ()
    honor_labels: bool = False
    relabel: tuple[Relabel, ...] = ()


def _relabel(where: str, raw: Any) -> Relabel:
    if not isinstance(raw, dict):
        raise ConfigError(where, raw, "a mapping")
    action = str(raw.get("action", "replace")).lower()
    if action not in _ACTIONS:
        raise ConfigError(f"{where}.action", action, "replace, keep, drop or labelmap")
    try:
        regex = re.compile(f"^(?:{raw.get('regex', '(.*)')})$")
    except re.error as exc:
        raise ConfigError(
            f"{where}.regex", raw.get("regex"), f"a regular expression ({exc})"
        ) from exc
    target = str(raw.get("target_label", ""))
    if action == "replace" and not target:
        raise ConfigError(f"{where}.target_label", target, "a label name for action replace")
    sources = raw.get("source_labels", [])
    if not isinstance(sources, list):
        raise ConfigError(f"{where}.source_labels", sources, "a list of label names")
    return Relabel(
        source_labels=tuple(map(str, sources)),
        separator=str(raw.get("separator", ";")),
        regex=regex,
        target_label=target,
        replacement=str(raw.get("replacement", "$1")),
        action=action,
    )


def _expand(match: re.Match[str], template: str) -> str:
    """Prometheus's expansion: `$1` or `${1}` is that group's text, empty for a group the
    regex does not have; everything else, backslashes too, is literal."""

    def group(ref: re.Match[str]) -> str:
        number = int(ref[1]) if len(ref[1]) <= 4 else -1
        return (match[number] or "") if 0 <= number <= match.re.groups else ""

    return _GROUP_REF.sub(group, template)


def _listed(where: str, job: dict[Any, Any]) -> list[Any]:
    """A job's key that takes a list (`where` ends with its name); absent or empty is []."""
    value = job.get(where.rsplit(".", 1)[1]) or []
    if not isinstance(value, list):
        raise ConfigError(where, value, "a list, as in prometheus.yml")
    return value


def parse_scrape_configs(raw: Any) -> tuple[ScrapeConfig, ...]:
    """Validate the `scrape_configs` block, naming the key and the fix on a problem."""
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise ConfigError("scrape_configs", raw, "a list of jobs, as in prometheus.yml")
    configs, names = [], set()
    for index, job in enumerate(raw):
        where = f"scrape_configs[{index}]"
        if not isinstance(job, dict) or not job.get("job_name"):
            raise ConfigError(f"{where}.job_name", job, "a job with a job_name")
        unknown = set(job) - _KNOWN
        if unknown:
            first = sorted(unknown, key=str)[0]  # YAML keys may be numbers or dates too
            supported = ", ".join(sorted(_KNOWN))
            raise ConfigError(f"{where}.{first}", first, f"one of the supported keys: {supported}")
        name = str(job["job_name"])
        if name in names:
            raise ConfigError(f"{where}.job_name", name, "a job name not used by another job")
        names.add(name)
        interval = parse_duration(f"{where}.scrape_interval", job.get("scrape_interval", "15s"))
        timeout = parse_duration(f"{where}.scrape_timeout", job.get("scrape_timeout", "10s"))
        timeout = min(timeout, interval)
        scheme = str(job.get("scheme", "http"))
        if scheme not in ("http", "https"):
            raise ConfigError(f"{where}.scheme", scheme, "http or https")
        static: list[tuple[str, tuple[tuple[str, str], ...]]] = []
        for s_index, group in enumerate(_listed(f"{where}.static_configs", job)):
            targets = group.get("targets") if isinstance(group, dict) else None
            if not isinstance(targets, list):
                raise ConfigError(
                    f"{where}.static_configs[{s_index}].targets", targets, "a list of host:port"
                )
            given = group.get("labels") or {}
            if not isinstance(given, dict):
                raise ConfigError(
                    f"{where}.static_configs[{s_index}].labels", given, "a mapping of labels"
                )
            labels = tuple(sorted((str(k), str(v)) for k, v in given.items()))
            static.extend((str(t), labels) for t in targets)
        files: list[str] = []
        for f_index, group in enumerate(_listed(f"{where}.file_sd_configs", job)):
            listed = group.get("files") if isinstance(group, dict) else None
            if not isinstance(listed, list):
                raise ConfigError(
                    f"{where}.file_sd_configs[{f_index}].files", listed, "a list of JSON files"
                )
            files.extend(map(str, listed))
        relabels = tuple(
            _relabel(f"{where}.relabel_configs[{r}]", item)
            for r, item in enumerate(_listed(f"{where}.relabel_configs", job))
        )
        configs.append(ScrapeConfig(
            job_name=name, scrape_interval=interval, scrape_timeout=timeout,
            metrics_path=str(job.get("metrics_path", "/metrics")), scheme=scheme,
            static_targets=tuple(static), file_sd=tuple(files),
            honor_labels=bool(job.get("honor_labels", False)), relabel=relabels,
        ))  # fmt: skip
    return tuple(configs)


def relabel(labels: dict[str, str], rules: tuple[Relabel, ...]) -> dict[str, str] | None:
    """Apply relabel rules as Prometheus does; None when the target is dropped."""
    current = dict(labels)
    for rule in rules:
        value = rule.separator.join(current.get(name, "") for name in rule.source_labels)
        if rule.action == "keep" and not rule.regex.match(value):
            return None
        if rule.action == "drop" and rule.regex.match(value):
            return None
        if rule.action == "replace":
            match = rule.regex.match(value)
            if match:
                target = _expand(match, rule.target_label)
                result = _expand(match, rule.replacement)
                if result:
                    current[target] = result
                else:
                    current.pop(target, None)
        if rule.action == "labelmap":
            for name, label_value in list(current.items()):
                match = rule.regex.match(name)
                if match:
                    current[_expand(match, rule.replacement)] = label_value
    return current


@dataclass
class Target:
    job: str
    url: str
    labels: dict[str, str]  # after relabeling, without `__` labels: what every series gets
    discovered: dict[str, str]
    config: ScrapeConfig = field(repr=False)

    @property
    def key(self) -> str:
        return f"{self.job}|{self.url}|{json.dumps(sorted(self.labels.items()))}"


def read_file_sd(path: str) -> list[tuple[str, tuple[tuple[str, str], ...]]]:
    """A file_sd JSON file: `[{"targets": [...], "labels": {...}}]`; missing means empty."""
    try:
        groups = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return []
    out: list[tuple[str, tuple[tuple[str, str], ...]]] = []
    for group in groups if isinstance(groups, list) else []:
        if isinstance(group, dict) and isinstance(group.get("targets"), list):
            labels = tuple(sorted((str(k), str(v)) for k, v in (group.get("labels") or {}).items()))
            out.extend((str(t), labels) for t in group["targets"])
    return out


def targets_of(config: ScrapeConfig) -> tuple[list[Target], list[dict[str, str]]]:
    """(active targets, dropped targets' discovered labels) of one job."""
    found = list(config.static_targets)
    for path in config.file_sd:
        found.extend(read_file_sd(path))
    active, dropped = [], []
    for address, extra in found:
        discovered = {
            "__address__": address, "__scheme__": config.scheme,
            "__metrics_path__": config.metrics_path, "job": config.job_name, **dict(extra),
        }  # fmt: skip
        labels = relabel(discovered, config.relabel)
        if labels is None or not labels.get("__address__"):  # no address: Prometheus drops it
            dropped.append(discovered)
            continue
        labels.setdefault("instance", labels["__address__"])
        scheme = labels.get("__scheme__") or config.scheme
        path = labels.get("__metrics_path__", config.metrics_path)
        url = f"{scheme}://{labels['__address__']}{path}"
        public = {k: v for k, v in labels.items() if not k.startswith("__")}
        active.append(Target(config.job_name, url, public, discovered, config))
    return active, dropped


_SAMPLE_LINE = re.compile(
    r"([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?[ \t]+([^ \t#]+)(?:[ \t]+[^ \t#]+)?"
    r"(?:[ \t]+#[ \t]+(\{[^}]*\})[ \t]+([^ \t]+)(?:[ \t]+[^ \t]+)?)?[ \t]*"
)
_LABEL_PAIR = re.compile(
    r'[ \t]*([a-zA-Z_][a-zA-Z0-9_]*)[ \t]*=[ \t]*"((?:[^"\\]|\\.)*)"[ \t]*(,|$)'
)
_ESCAPES = {"\\": "\\", '"': '"', "n": "\n"}


# (name, labels, value, exemplar) of each scraped sample.
ParsedSamples = list[tuple[str, dict[str, str], float, dict[str, Any] | None]]
# A series as the store knows it: the name and the label pairs.
SeriesKey = tuple[str, tuple[tuple[str, str], ...]]


class _NotSimpleError(ValueError):
    """A line the fast parser does not take; the library parser reads the whole text."""


def _labels_of(body: str | None) -> dict[str, str]:
    if not body:
        return {}
    inner, position, labels = body[1:-1], 0, {}
    while position < len(inner):
        match = _LABEL_PAIR.match(inner, position)
        if not match or match.end() == position:
            raise _NotSimpleError(body)
        value = match[2]
        if "\\" in value:
            value = re.sub(r"\\(.)", lambda m: _ESCAPES.get(m[1], "\\" + m[1]), value)
        labels[match[1]] = value
        position = match.end()
    return labels


# (name, label text or None, value, exemplar) of each line the fast parser read.
_Scanned = list[tuple[str, str | None, float, dict[str, Any] | None]]


def _scan_simple(text: str) -> _Scanned:
    """The common shape of both formats, a line at a time, several times faster than
    prometheus_client's parser; anything unusual raises _NotSimpleError. Label text is
    left unparsed so that a scrape can look each series up instead."""
    out = []
    for line in text.split("\n"):
        if not line or line[0] == "#":
            if line.startswith("# EOF"):
                break
            continue
        match = _SAMPLE_LINE.fullmatch(line)
        if match is None:
            raise _NotSimpleError(line)
        exemplar = None
        if match[4] is not None:
            exemplar = {**_labels_of(match[4]), "value": float(match[5])}
        out.append((match[1], match[2], float(match[3]), exemplar))
    return out


def _parse_simple(text: str) -> ParsedSamples:
    return [(name, _labels_of(body), value, ex) for name, body, value, ex in _scan_simple(text)]


def parse_exposition(text: str, content_type: str) -> ParsedSamples:
    """(name, labels, value, exemplar) of every sample, OpenMetrics or Prometheus text."""
    try:
        return _parse_simple(text)
    except ValueError:  # _NotSimpleError, or a number float() refuses
        # prometheus_client's parser reads what the fast path leaves, or says why not.
        return _parse_with_library(text, content_type)


def _parse_with_library(text: str, content_type: str) -> ParsedSamples:
    """prometheus_client's parser; what it raises on a broken body (some of it a bare
    KeyError or IndexError) becomes the ValueError the scraper reports as the target's error."""
    from prometheus_client.openmetrics.parser import text_string_to_metric_families as openmetrics
    from prometheus_client.parser import text_string_to_metric_families as prometheus_text

    parse: Any = openmetrics if "openmetrics" in content_type else prometheus_text
    out: ParsedSamples = []
    try:
        for family in parse(text):
            for sample in family.samples:
                exemplar = None
                if getattr(sample, "exemplar", None) is not None:
                    exemplar = {**sample.exemplar.labels, "value": sample.exemplar.value}
                out.append((sample.name, dict(sample.labels), float(sample.value), exemplar))
    except (KeyError, IndexError, TypeError, AttributeError) as exc:
        raise ValueError(f"The exposition does not parse: {type(exc).__name__} {exc}") from exc
    return out


def _series_of(
    name: str, labels: dict[str, str], target: Target
) -> tuple[dict[str, str], SeriesKey]:
    """Attach the target's labels; on a clash the target wins unless honor_labels, and the
    scraped value is kept as `exported_<name>` (Prometheus's rule)."""
    merged = dict(labels)
    for key, target_value in target.labels.items():
        if key in merged and merged[key] != target_value:
            if target.config.honor_labels:
                continue
            merged[f"exported_{key}"] = merged[key]
        merged[key] = target_value
    return merged, (name, tuple(sorted(merged.items())))


def to_samples(parsed: ParsedSamples, target: Target, ts_ms: int) -> list[Sample]:
    """The target's samples at `ts_ms`, its labels attached."""
    return [
        Sample(name, _series_of(name, labels, target)[0], ts_ms, value, exemplar)
        for name, labels, value, exemplar in parsed
    ]


class SeriesCache:
    """What each series text of one target (`name{labels}` as scraped) became: its
    labels with the target's attached and its key. A target repeats the same series on
    every scrape, so a scrape parses and merges only the series it has not seen before.
    Bounded: past `most` entries it starts again."""

    def __init__(self, most: int = 200_000) -> None:
        self.most = most
        self.entries: dict[tuple[str, str | None], tuple[dict[str, str], SeriesKey]] = {}

    def series(
        self, name: str, body: str | None, target: Target
    ) -> tuple[dict[str, str], SeriesKey]:
        found = self.entries.get((name, body))
        if found is None:
            if len(self.entries) >= self.most:
                self.entries.clear()
            found = self.entries[name, body] = _series_of(name, _labels_of(body), target)
        return found


def scrape_samples(
    text: str, content_type: str, target: Target, ts_ms: int, cache: SeriesCache
) -> tuple[list[Sample], set[SeriesKey]]:
    """One scrape's samples at `ts_ms` and the keys of the series it holds. The label
    dicts are shared with `cache`: nothing downstream may change them."""
    samples, keys = [], set()
    try:
        for name, body, value, exemplar in _scan_simple(text):
            labels, key = cache.series(name, body, target)
            samples.append(Sample(name, labels, ts_ms, value, exemplar))
            keys.add(key)
    except ValueError:  # _NotSimpleError, or a number float() refuses
        samples.clear()
        keys.clear()
        for name, raw, value, exemplar in _parse_with_library(text, content_type):
            labels, key = _series_of(name, raw, target)
            samples.append(Sample(name, labels, ts_ms, value, exemplar))
            keys.add(key)
    return samples, keys
