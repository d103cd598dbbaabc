"""Scenarios: faults composed on a timeline. `python -m busline scenario run FILE --seed N`
starts each fault at its offset through the fault API (`busline.faults`), so that every
record in the ground truth carries the scenario's id and seed; `--dry-run` prints the
schedule instead. The seed draws every choice a file leaves open (a target out of a list,
an intensity or a duration out of a range, an offset's jitter), so the same file and seed
always give the same schedule.

A scenario file (YAML or JSON):

    name: payday-evening
    description: M-Pesa goes down while traffic surges.
    faults:
      - at: 0s
        kind: traffic-surge
        target: gateway
        intensity: 2
        for: 5m
      - at: 1m
        jitter: 30s          # start up to 30 s later
        kind: provider-down
        target: [mpesa, airtel]   # one of them
        for: [2m, 4m]             # a duration in this range
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import random
import signal
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import yaml

from busline import fault_api, faults, kit

BUNDLED = Path(__file__).parent / "scenarios"


class ScenarioError(Exception):
    """A scenario file is unreadable or wrong; the message names where."""


@dataclass(frozen=True)
class Step:
    at_s: float
    kind: str
    target: str
    intensity: float | None
    for_s: float


@dataclass(frozen=True)
class Scenario:
    name: str
    description: str
    steps: tuple[Step, ...]

    @property
    def length_s(self) -> float:
        return max((s.at_s + s.for_s for s in self.steps), default=0.0)


def resolve(name: str) -> Path:
    """A scenario file: a path, or the name of a bundled one (`busline/scenarios/`)."""
    path = Path(name)
    if path.exists():
        return path
    bundled = BUNDLED / f"{name}.yaml"
    if bundled.exists():
        return bundled
    known = ", ".join(sorted(p.stem for p in BUNDLED.glob("*.yaml")))
    raise ScenarioError(f"{name}: no such file, nor a bundled scenario ({known})")


def load(path: Path, seed: int) -> Scenario:
    """The scenario in `path` with every open choice drawn from `seed`."""
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise ScenarioError(f"{path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise ScenarioError(f"{path}: not UTF-8 text") from None
    except yaml.YAMLError as exc:
        raise ScenarioError(f"{path}: not YAML or JSON: {exc}") from None
    return build(data, seed, str(path))


def build(data: Any, seed: int, where: str = "scenario") -> Scenario:
    if not isinstance(data, dict):
        raise ScenarioError(f"{where}: must be a mapping with `name` and `faults`")
    unknown = set(data) - {"name", "description", "faults"}
    if unknown:
        raise ScenarioError(f"{where}: unknown key(s) {', '.join(sorted(map(str, unknown)))}")
    name = data.get("name")
    if not isinstance(name, str) or not name.strip() or len(name) > 80:
        raise ScenarioError(f"{where}: `name` must be a short string")
    entries = data.get("faults")
    if not isinstance(entries, list) or not entries:
        raise ScenarioError(f"{where}: `faults` must be a non-empty list")
    rng = random.Random(f"{name}/{seed}")  # noqa: S311 - a reproducible draw, not secrets
    steps = [_step(entry, rng, f"{where}: faults[{i}]") for i, entry in enumerate(entries)]
    steps.sort(key=lambda s: (s.at_s, s.kind, s.target))
    _no_overlaps(steps, where)
    return Scenario(name.strip(), str(data.get("description") or ""), tuple(steps))


def _no_overlaps(steps: list[Step], where: str) -> None:
    """One kind runs once per target at a time (the fault API answers 409 otherwise):
    refuse a schedule where two would, before anything starts."""
    last_end: dict[tuple[str, str], float] = {}
    for step in steps:
        key = (step.kind, step.target)
        if key in last_end and step.at_s < last_end[key]:
            raise ScenarioError(
                f"{where}: {step.kind} on {step.target} at +{step.at_s:g}s overlaps the one "
                f"before it (until +{last_end[key]:g}s)"
            )
        last_end[key] = step.at_s + step.for_s


def _seconds(value: Any, where: str, *, zero: bool = False) -> float:
    if zero and value in (0, "0", "0s"):
        return 0.0
    try:
        return faults.parse_duration(value)
    except (TypeError, ValueError) as exc:
        raise ScenarioError(f"{where}: {exc}") from None


def _step(entry: Any, rng: random.Random, where: str) -> Step:
    if not isinstance(entry, dict):
        raise ScenarioError(f"{where}: must be a mapping")
    unknown = set(entry) - {"at", "jitter", "kind", "target", "intensity", "for"}
    if unknown:
        raise ScenarioError(f"{where}: unknown key(s) {', '.join(sorted(map(str, unknown)))}")
    at = _seconds(entry.get("at", 0), f"{where}.at", zero=True)
    if "jitter" in entry:
        at += round(rng.uniform(0, _seconds(entry["jitter"], f"{where}.jitter")), 3)
    kind = entry.get("kind")
    target = entry.get("target")
    if isinstance(target, list):
        if not target or not all(isinstance(t, str) for t in target):
            raise ScenarioError(f"{where}.target: a name or a non-empty list of names")
        target = rng.choice(target)
    intensity = _intensity(entry.get("intensity"), rng, f"{where}.intensity")
    length = entry.get("for", faults.DEFAULT_DURATION_S)
    if isinstance(length, list):
        if len(length) != 2:
            raise ScenarioError(f"{where}.for: a duration or a range [shortest, longest]")
        low, high = (_seconds(v, f"{where}.for") for v in length)
        for_s = round(rng.uniform(low, high), 3)
    else:
        for_s = _seconds(length, f"{where}.for")
    if not isinstance(kind, str) or not isinstance(target, str):
        raise ScenarioError(f"{where}: `kind` and `target` are required")
    try:
        faults.validate(kind, target, None if intensity is None else float(intensity), for_s)
    except kit.Invalid as exc:
        raise ScenarioError(f"{where}.{exc.field}: {exc.message}") from None
    return Step(at, kind, target, None if intensity is None else float(intensity), for_s)


def _intensity(value: Any, rng: random.Random, where: str) -> float | None:
    """A number, or one drawn from a range `[low, high]`."""
    if value is None:
        return None
    try:
        if isinstance(value, list) and len(value) == 2 and all(_number(v) for v in value):
            return round(rng.uniform(float(value[0]), float(value[1])), 3)
        if _number(value):
            return float(value)
    except OverflowError:
        raise ScenarioError(f"{where}: out of range") from None
    raise ScenarioError(f"{where}: a number or a range [low, high]")


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def schedule_lines(scenario: Scenario, seed: int) -> list[str]:
    """The schedule as text: a header, then one line per fault in start order."""
    lines = [f"scenario {scenario.name} seed {seed}: {len(scenario.steps)} faults, "
             f"{scenario.length_s:.0f} s"]  # fmt: skip
    for step in scenario.steps:
        scale = "" if step.intensity is None else f" intensity {step.intensity:g}"
        lines.append(
            f"  at +{step.at_s:8.1f}s  {step.kind:20} {step.target:22} for {step.for_s:.0f}s"
            + scale
        )
    return lines


def run(scenario: Scenario, seed: int, client: fault_api.Client) -> int:
    """Start each fault on time; wait until the last has ended. Ctrl-C stops the faults
    this run started and exits 130."""
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    scenario_id = f"{scenario.name}-{seed}-{stamp}"[-120:]  # the API's limit
    started: list[str] = []
    interrupted = False
    failed: BaseException | None = None

    def on_signal(_signum: int, _frame: Any) -> None:
        nonlocal interrupted
        interrupted = True

    previous = signal.signal(signal.SIGTERM, on_signal)
    t0 = time.monotonic()
    print(f"scenario {scenario_id}: {len(scenario.steps)} faults", file=sys.stderr)
    try:
        for step in scenario.steps:
            while not interrupted and time.monotonic() - t0 < step.at_s:
                time.sleep(max(0.0, min(0.2, step.at_s - (time.monotonic() - t0))))
            if interrupted:
                break
            fault = client.start(
                kind=step.kind,
                target=step.target,
                intensity=step.intensity,
                seed=seed,
                scenario_id=scenario_id,
                **{"for": step.for_s},
            )
            started.append(str(fault["id"]))
            print(json.dumps({"event": "fault_started", **fault}), flush=True)
        while not interrupted and time.monotonic() - t0 < scenario.length_s:
            left = scenario.length_s - (time.monotonic() - t0)
            print(f"\rscenario {scenario.name}: {left:6.0f} s left", end="", file=sys.stderr)
            time.sleep(min(1.0, max(0.05, left)))
        print(file=sys.stderr)
    except KeyboardInterrupt:
        interrupted = True
    except (SystemExit, Exception) as exc:  # noqa: BLE001 - whatever it was, clean up first
        failed = exc
    finally:
        signal.signal(signal.SIGTERM, previous)
    if interrupted or failed is not None:
        _stop_started(client, started, scenario_id)
        if failed is not None:
            print(f"\nscenario {scenario_id}: stopped: {failed}", file=sys.stderr)
            return 1
        print(f"scenario {scenario_id}: stopped", file=sys.stderr)
        return 130
    # Listing ends what is due, so the ground truth holds every end when this returns.
    deadline = time.monotonic() + 10
    while {f["id"] for f in client.list()["active"]} & set(started):
        if time.monotonic() > deadline:
            break
        time.sleep(0.2)
    print(f"scenario {scenario_id}: done", file=sys.stderr)
    return 0


def _stop_started(client: fault_api.Client, started: list[str], scenario_id: str) -> None:
    """What a run started ends with it, rather than running on for its duration."""
    try:
        active = {f["id"] for f in client.list()["active"]}
        for fault_id in started:
            if fault_id in active:
                client.stop(fault_id)
    except SystemExit as exc:
        print(f"scenario {scenario_id}: could not stop its faults: {exc}", file=sys.stderr)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m busline scenario",
        description="Run faults on a timeline against the running platform (docs/busline.md).",
    )
    parser.add_argument("--state", type=Path, help="state directory (default: $BUSLINE_STATE)")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.required = True
    go = commands.add_parser("run", help="run a scenario (or print its schedule)")
    go.add_argument("file", help="a scenario file, or a bundled scenario's name")
    go.add_argument("--seed", type=int, required=True)
    go.add_argument("--dry-run", action="store_true", help="print the schedule, start nothing")
    go.add_argument("--json", action="store_true", help="the schedule as JSON (with --dry-run)")
    go.add_argument("--url", help="the fault API (default: from $BUSLINE_STATE/run)")
    commands.add_parser("list", help="the bundled scenarios")
    args = parser.parse_args(argv)
    if args.state is not None:
        os.environ["BUSLINE_STATE"] = str(args.state)
    if args.command == "list":
        for path in sorted(BUNDLED.glob("*.yaml")):
            data = yaml.safe_load(path.read_text())
            print(f"{path.stem:24} {data.get('description', '')}")
        return 0
    try:
        scenario = load(resolve(args.file), args.seed)
    except ScenarioError as exc:
        print(f"busline scenario: {exc}", file=sys.stderr)
        return 2
    if args.dry_run:
        if args.json:
            body = {
                "name": scenario.name,
                "seed": args.seed,
                "steps": [asdict(s) for s in scenario.steps],
            }
            print(json.dumps(body, indent=1))
        else:
            print("\n".join(schedule_lines(scenario, args.seed)))
        return 0
    with contextlib.closing(fault_api.Client(args.url)) as client:
        return run(scenario, args.seed, client)
