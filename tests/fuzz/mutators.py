"""Mutators: hypothesis strategies that take a valid payload and break it a little, so that
most inputs get past the first check of a parser and reach its deeper code.

- bytes: flip a bit, overwrite with an interesting byte, insert, delete, duplicate, repeat,
  splice with another seed, truncate, insert a protobuf varint;
- JSON (and YAML-shaped) trees: replace a node with a value of another type, a huge or
  non-finite number, odd unicode, deep nesting; add, drop and rename keys; repeat items;
- Sentry envelopes: wrong, huge, negative or non-integer `length` headers, missing or extra
  newlines, items dropped, repeated or retyped;
- exposition text: lines dropped, repeated, swapped, mixed in from the other format, and
  characters mutated inside a line.

Every choice is a hypothesis draw, so a failure shrinks to a small mutation of a seed. A
repeat adds at most GROWTH bytes, so inputs stay below a few hundred kB: the one-second limit
then catches work that grows faster than the input, not merely a big input.
"""

from __future__ import annotations

import datetime
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import yaml
from hypothesis import strategies as st

Draw = st.DrawFn
GROWTH = 64 * 1024


def pick(draw: Draw, choices: Sequence[Any]) -> Any:
    """One of `choices`. An index drawn with st.integers, which hypothesis caches, costs far
    less than a new st.sampled_from each time."""
    return choices[draw(st.integers(0, len(choices) - 1))]


def mix(*branches: tuple[int, st.SearchStrategy[Any]]) -> st.SearchStrategy[Any]:
    """One of the strategies, in proportion to its weight (st.one_of would weigh a repeated
    strategy once)."""
    total = sum(weight for weight, _ in branches)

    @st.composite
    def chosen(draw: Draw) -> Any:
        number = draw(st.integers(0, total - 1))
        for weight, strategy in branches:
            if number < weight:
                return draw(strategy)
            number -= weight
        raise AssertionError(number)

    return chosen()


def _times(draw: Draw, size: int, choices: Sequence[int]) -> int:
    """How many copies of something `size` bytes long a repeat makes, within GROWTH."""
    return max(1, min(pick(draw, choices), GROWTH // max(size, 1)))


INTERESTING_BYTES = (0x00, 0x01, 0x0A, 0x0D, 0x20, 0x22, 0x2C, 0x3A, 0x5B, 0x5C, 0x5D, 0x7B,
                     0x7D, 0x7F, 0x80, 0xC0, 0xED, 0xFE, 0xFF)  # fmt: skip
# Protobuf varints at their edges: one byte, the largest, the overlong and the unterminated.
VARINTS = (b"\x00", b"\x7f", b"\x80\x01", b"\xff\xff\xff\xff\x0f", b"\xff" * 9 + b"\x01",
           b"\x80" * 10 + b"\x00", b"\xff" * 11, b"\x80")  # fmt: skip
JSON_TOKENS = (b'"', b"{", b"}", b"[", b"]", b",", b":", b"\\", b"\\u", b"\\ud800", b"NaN",
               b"-Infinity", b"1e999", b"null", b"\n", b"\xc3", b"\xf0\x9f\x98")  # fmt: skip


class Seeds(tuple[Any, ...]):
    """Seed payloads with a short repr: hypothesis shows strategies' arguments in errors."""

    def __repr__(self) -> str:
        return f"<{len(self)} seeds>"


@dataclass(frozen=True)
class Raw:
    """A JSON token written as is: json.dumps cannot write these (1e999, deep nesting)."""

    text: str


def deep_array(depth: int) -> Raw:
    return Raw("[" * depth + "]" * depth)


def deep_object(depth: int) -> Raw:
    return Raw('{"a":' * depth + "1" + "}" * depth)


RAW_TOKENS = (
    Raw("NaN"), Raw("Infinity"), Raw("-Infinity"), Raw("1e999"), Raw("-1e999"), Raw("1E-999"),
    Raw("-0"), Raw("9" * 5000), Raw("123456789012345678901234567890"), Raw('"\\ud800"'),
    Raw('"\\udfff\\ud800x"'), Raw('{"a":1,"a":[2]}'),
)  # fmt: skip
DEPTHS = (50, 99, 100, 101, 200, 999, 1000, 5000, 100_000)

ODD_STRINGS = (
    "", " ", "\x00", "\ud800", "a\udfffb", "é", "\u202e", "\ufeff", "💥", "\n", "\r\n", "\\",
    '"', "{}", "[]", "null", "NaN", "-1", "1e999", "0x10", "  42  ", "ab" * 16, "AB" * 16,
    "zz" * 16, "ab" * 8, "0" * 32, "2026-11-27T16:00:00Z", "0001-01-01T00:00:00", "9999-12-31",
    "x" * 3000, "$1", "${1}", "$99", "\\1", "(", "[a-", "(?P<x>", ".*", "a{99999}", "__address__",
)  # fmt: skip
ODD_NUMBERS = (0, 1, -1, 2, 3, 255, 2**31, 2**32, 2**53 + 1, 2**63 - 1, 2**63, 2**64,
               -(2**63) - 1, 10**30, 10**400, -(10**400), 0.5, -0.0, 1e-300, 1e11, 1e18, 1e300, 1.7976931348623157e308,
               math.inf, -math.inf, math.nan)  # fmt: skip
ODD_KEYS = ("", "length", "type", "event_id", "values", "stream", "lines", "text", "ts_ns",
            "timestamp", "__proto__", "é", "\ud800", "a" * 300)  # fmt: skip


def _position(draw: Draw, data: bytes | bytearray) -> int:
    return draw(st.integers(0, len(data)))


def _span(draw: Draw, data: bytes | bytearray) -> tuple[int, int]:
    start = _position(draw, data)
    return start, draw(st.integers(start, min(len(data), start + 64)))


def mutate_bytes(
    draw: Draw, data: bytes, donors: Sequence[bytes], tokens: Sequence[bytes], most: int = 6
) -> bytes:
    """`data` after 1 to `most` byte-level mutations."""
    out = bytearray(data)
    for _ in range(draw(st.integers(1, most))):
        op = pick(draw, BYTE_OPS)
        out = op(draw, out, donors, tokens)
    return bytes(out)


_CHUNKS = st.binary(min_size=1, max_size=12)


def _flip(draw: Draw, out: bytearray, _: Sequence[bytes], __: Sequence[bytes]) -> bytearray:
    if out:
        out[draw(st.integers(0, len(out) - 1))] ^= 1 << draw(st.integers(0, 7))
    return out


def _overwrite(draw: Draw, out: bytearray, _: Sequence[bytes], __: Sequence[bytes]) -> bytearray:
    if out:
        value = pick(draw, INTERESTING_BYTES) if draw(st.booleans()) else draw(st.integers(0, 255))
        out[draw(st.integers(0, len(out) - 1))] = value
    return out


def _insert(draw: Draw, out: bytearray, _: Sequence[bytes], tokens: Sequence[bytes]) -> bytearray:
    chunk = pick(draw, tokens) if draw(st.booleans()) else draw(_CHUNKS)
    at = _position(draw, out)
    return out[:at] + chunk + out[at:]


def _delete(draw: Draw, out: bytearray, _: Sequence[bytes], __: Sequence[bytes]) -> bytearray:
    start, end = _span(draw, out)
    return out[:start] + out[end:]


def _duplicate(draw: Draw, out: bytearray, _: Sequence[bytes], __: Sequence[bytes]) -> bytearray:
    start, end = _span(draw, out)
    at = _position(draw, out)
    return out[:at] + out[start:end] + out[at:]


def _repeat(draw: Draw, out: bytearray, _: Sequence[bytes], __: Sequence[bytes]) -> bytearray:
    """A slice many times over: catches work that grows faster than the input."""
    start, end = _span(draw, out)
    times = _times(draw, end - start, (2, 10, 100, 1000, 5000))
    return out[:start] + out[start:end] * times + out[end:]


def _splice(draw: Draw, out: bytearray, donors: Sequence[bytes], _: Sequence[bytes]) -> bytearray:
    donor = pick(draw, donors) if donors else bytes(out)
    return out[: _position(draw, out)] + donor[_position(draw, donor) :]


def _truncate(draw: Draw, out: bytearray, _: Sequence[bytes], __: Sequence[bytes]) -> bytearray:
    return out[: _position(draw, out)]


def _varint(draw: Draw, out: bytearray, _: Sequence[bytes], __: Sequence[bytes]) -> bytearray:
    """A varint over the bytes at a position: a protobuf length or tag gone wrong."""
    at = _position(draw, out)
    replace = draw(st.integers(0, 2))
    return out[:at] + pick(draw, VARINTS) + out[at + replace :]


BYTE_OPS: tuple[Callable[[Draw, bytearray, Sequence[bytes], Sequence[bytes]], bytearray], ...] = (
    _flip, _overwrite, _insert, _delete, _duplicate, _repeat, _splice, _truncate, _varint,
)  # fmt: skip


@st.composite
def mutated_bytes(
    draw: Draw, seeds: Sequence[bytes], tokens: Sequence[bytes] = JSON_TOKENS
) -> bytes:
    """A seed after a few byte-level mutations."""
    return mutate_bytes(draw, pick(draw, seeds), seeds, tokens)


# --- trees (JSON documents, YAML configs) ------------------------------------------------


@dataclass(frozen=True)
class Pool:
    """What tree mutations put in: values of every type, and keys."""

    values: st.SearchStrategy[Any]
    keys: st.SearchStrategy[Any]


def _json_scalars() -> st.SearchStrategy[Any]:
    deep = st.sampled_from(DEPTHS).flatmap(
        lambda d: st.sampled_from((deep_array(d), deep_object(d)))
    )
    return st.one_of(
        st.none(), st.booleans(), st.sampled_from(ODD_NUMBERS), st.sampled_from(ODD_NUMBERS),
        st.sampled_from(ODD_STRINGS), st.sampled_from(ODD_STRINGS), st.integers(), st.floats(),
        st.text(max_size=20), st.sampled_from(RAW_TOKENS), deep,
    )  # fmt: skip


def _small_trees(scalars: st.SearchStrategy[Any], keys: st.SearchStrategy[Any]) -> Any:
    """Mostly a scalar, sometimes a small list or object of them (each costs many draws)."""
    trees = st.recursive(
        scalars,
        lambda inner: st.lists(inner, max_size=4) | st.dictionaries(keys, inner, max_size=4),
        max_leaves=6,
    )
    return mix((3, scalars), (1, trees))


JSON_KEYS = st.sampled_from(ODD_KEYS) | st.text(max_size=8)
JSON_POOL = Pool(_small_trees(_json_scalars(), JSON_KEYS), JSON_KEYS)
# YAML's safe loader also makes dates, bytes, sets and non-string keys.
YAML_KEYS = JSON_KEYS | st.sampled_from((1, 0, -1, 1.5, True, None, datetime.date(2026, 11, 27)))
YAML_POOL = Pool(
    _small_trees(
        st.one_of(
            st.none(),
            st.booleans(),
            st.sampled_from(ODD_NUMBERS),
            st.sampled_from(ODD_STRINGS),
            st.integers(),
            st.floats(),
            st.text(max_size=20),
            st.just(datetime.date(2026, 1, 1)),
            st.just(b"\x00bytes"),
            st.just(frozenset({"a", 1})),
            st.just({"a", "b"}),
        ),
        YAML_KEYS,
    ),
    YAML_KEYS,
)


Path = tuple[Any, ...]
MOST_PATHS = 400


def _paths(node: Any, path: Path = (), out: list[Path] | None = None) -> list[Path]:
    """Paths to the nodes of a tree, parents first (the first MOST_PATHS of a big one)."""
    out = [] if out is None else out
    out.append(path)
    if isinstance(node, dict | list) and len(path) < 40:
        for key in node if isinstance(node, dict) else range(len(node)):
            if len(out) >= MOST_PATHS:
                break
            _paths(node[key], (*path, key), out)
    return out


def _replaced(node: Any, path: Path, make: Callable[[Any], Any]) -> Any:
    """`node` with the node at `path` replaced by make(it), copied along the path only."""
    if not path:
        return make(node)
    copy = dict(node) if isinstance(node, dict) else list(node)
    copy[path[0]] = _replaced(node[path[0]], path[1:], make)
    return copy


def mutate_tree(draw: Draw, tree: Any, pool: Pool) -> Any:
    """`tree` with one node, any one alike, mutated (the tree itself is left unchanged)."""
    path = pick(draw, _paths(tree))
    op = pick(draw, NODE_OPS)
    return _replaced(tree, path, lambda node: op(draw, node, pool))


def _replace(draw: Draw, node: Any, pool: Pool) -> Any:
    return draw(pool.values)


def _wrap(draw: Draw, node: Any, pool: Pool) -> Any:
    return pick(draw, ([node], {"value": node}, [node, node]))


def _reshape_container(draw: Draw, node: Any, pool: Pool) -> Any:
    if isinstance(node, dict):
        copy = dict(node)
        action = pick(draw, ("drop", "add", "rename", "empty", "values"))
        if action == "drop" and copy:
            del copy[pick(draw, list(copy))]
        elif action == "add":
            copy[draw(pool.keys)] = draw(pool.values)
        elif action == "rename" and copy:
            old = pick(draw, list(copy))
            copy[draw(pool.keys)] = copy.pop(old)
        elif action == "empty":
            return {}
        elif action == "values":
            return list(copy.values())
        return copy
    if isinstance(node, list):
        copy = list(node)
        action = pick(draw, ("drop", "add", "repeat", "empty", "swap"))
        if action == "drop" and copy:
            del copy[draw(st.integers(0, len(copy) - 1))]
        elif action == "add":
            copy.insert(draw(st.integers(0, len(copy))), draw(pool.values))
        elif action == "repeat" and copy:
            item = copy[draw(st.integers(0, len(copy) - 1))]
            copy.extend([item] * _times(draw, len(dump_json(item)), (1, 10, 200, 2000)))
        elif action == "empty":
            return []
        elif action == "swap" and len(copy) > 1:
            copy.reverse()
        return copy
    return _retype(draw, node, pool)


def _retype(draw: Draw, node: Any, pool: Pool) -> Any:
    """The same value as another type: "42" for 42, 42 for "42", a list for a string."""
    if isinstance(node, bool):
        return pick(draw, (int(node), str(node).lower(), None))
    if isinstance(node, int | float):
        as_float = float(node) if abs(node) < 1e308 else math.inf
        return pick(draw, (str(node), -node, node * 2**40, as_float, [node]))
    if isinstance(node, str):
        # "²".isdigit() too, but int() refuses it, as it refuses more than 4,300 digits
        if node.isascii() and node.isdigit() and len(node) <= 4000:
            return pick(draw, (int(node), float(node), "-" + node, node + "0" * 30))
        return pick(draw, (node * 100, node[: len(node) // 2], node.upper(),
                                     node + "\ud800", node.encode("utf-8", "surrogatepass").hex(), [node]))  # fmt: skip
    return draw(pool.values)


NODE_OPS = (_replace, _replace, _wrap, _reshape_container, _reshape_container, _retype)


def _mutated_tree(draw: Draw, tree: Any, pool: Pool, most: int = 4) -> Any:
    for _ in range(draw(st.integers(1, most))):
        if draw(st.integers(0, 3)) == 0:
            tree = _field_everywhere(draw, tree, pool)
        else:
            tree = mutate_tree(draw, tree, pool)
    return tree


def _field_everywhere(draw: Draw, tree: Any, pool: Pool) -> Any:
    """One field set to an odd value wherever it appears: reaches a field (a duration, a
    timestamp) far more often than a node picked at random does."""
    keys = sorted({path[-1] for path in _paths(tree) if path and isinstance(path[-1], str)})
    if not keys:
        return mutate_tree(draw, tree, pool)
    return _set_everywhere(tree, pick(draw, keys), draw(pool.values))


def dump_json(tree: Any) -> bytes:
    """JSON text of a mutated tree, Raw tokens written as they are."""
    raws: list[str] = []

    def placeholder(value: Any) -> str:
        if isinstance(value, Raw):
            raws.append(value.text)
            return f"\x00raw{len(raws) - 1}\x00"
        return str(value)

    text = json.dumps(tree, default=placeholder)
    for index, raw in enumerate(raws):
        text = text.replace(json.dumps(f"\x00raw{index}\x00"), raw, 1)
    return text.encode("utf-8", "surrogatepass")


@st.composite
def mutated_json(
    draw: Draw, seeds: Sequence[bytes], extra: Callable[[Draw, Any], Any] | None = None
) -> bytes:
    """A JSON seed after tree mutations (some format-aware, from `extra`)."""
    tree = json.loads(pick(draw, seeds))
    if extra is not None and draw(st.booleans()):
        tree = extra(draw, tree)
    tree = _mutated_tree(draw, tree, JSON_POOL)
    return dump_json(tree)


def json_inputs(
    seeds: Sequence[bytes], extra: Callable[[Draw, Any], Any] | None = None
) -> st.SearchStrategy[bytes]:
    """What a JSON parser gets: mostly tree mutations, some byte mutations of the text."""
    seeds = Seeds(seeds)
    return mix((7, mutated_json(seeds, extra)), (1, mutated_bytes(seeds, JSON_TOKENS)))


# --- OTLP ---------------------------------------------------------------------------------


# AnyValue nesting around protobuf's limit of 100 nested messages (3 per kvlist level).
ANY_VALUE_DEPTHS = (1, 10, 32, 33, 34, 40, 60)


def nested_any_value(depth: int) -> dict[str, Any]:
    value: dict[str, Any] = {"stringValue": "leaf"}
    for level in range(depth):
        if level % 2:
            value = {"arrayValue": {"values": [value]}}
        else:
            value = {"kvlistValue": {"values": [{"key": "k", "value": value}]}}
    return value


def otlp_extra(draw: Draw, tree: Any) -> Any:
    """OTLP-aware: an attribute nested deep, or an id, time or count at its edges."""
    kind = pick(draw, ("nest", "edge"))
    if kind == "nest":
        depth = pick(draw, ANY_VALUE_DEPTHS)
        attribute = {"key": "deep", "value": nested_any_value(depth)}
        return _put_in_first(draw, tree, "attributes", attribute)
    field = pick(draw, ("startTimeUnixNano", "endTimeUnixNano", "timeUnixNano",
                                  "observedTimeUnixNano", "count", "asInt", "traceId", "spanId",
                                  "severityNumber", "kind", "aggregationTemporality", "flags"))  # fmt: skip
    value = pick(draw, ("0", "1", "-1", str(2**63 - 1), str(2**63), str(2**64 - 1),
                                  str(2**64), "1e30", "", "zz", "ab" * 8, "00" * 16, 2**70,
                                  -5, 99, 1.5, "NaN"))  # fmt: skip
    return _set_everywhere(tree, field, value)


def _put_in_first(draw: Draw, tree: Any, key: str, item: Any) -> Any:
    if isinstance(tree, dict):
        if isinstance(tree.get(key), list):
            return {**tree, key: [*tree[key], item]}
        return {k: _put_in_first(draw, v, key, item) for k, v in tree.items()}
    if isinstance(tree, list):
        return [_put_in_first(draw, v, key, item) for v in tree]
    return tree


def _set_everywhere(tree: Any, key: str, value: Any) -> Any:
    if isinstance(tree, dict):
        return {k: value if k == key else _set_everywhere(v, key, value) for k, v in tree.items()}
    if isinstance(tree, list):
        return [_set_everywhere(v, key, value) for v in tree]
    return tree


def protobuf_inputs(
    seeds: Sequence[bytes], json_seeds: Sequence[bytes], encode: Callable[[bytes], bytes | None]
) -> st.SearchStrategy[bytes]:
    """Byte mutations of encoded messages (varint-aware), and valid messages with odd
    values: a mutated JSON document that still parses, encoded by `encode` (None when it
    does not parse, and then a seed is used)."""
    seeds, json_seeds = Seeds(seeds), Seeds(json_seeds)

    @st.composite
    def from_json(draw: Draw) -> bytes:
        # Both drawn first: whether encode() succeeds must not change what is drawn.
        body, fallback = draw(mutated_json(json_seeds, otlp_extra)), pick(draw, seeds)
        encoded = None if _deep(body) else encode(body)
        return fallback if encoded is None else encoded

    return mix((2, mutated_bytes(seeds, VARINTS)), (1, from_json()))


# --- Sentry envelopes ----------------------------------------------------------------------

LENGTHS = (-1, 0, 1, 2**31, 2**63, 10**30, 1.5, "12", None, True, [], {})


def _split_envelope(body: bytes) -> tuple[bytes, list[tuple[dict[str, Any], bytes]]]:
    """A valid envelope's header line and items (for the mutator only)."""
    header, _, rest = body.partition(b"\n")
    items = []
    while rest.strip():
        line, _, rest = rest.partition(b"\n")
        item = json.loads(line)
        if "length" in item:
            payload, rest = rest[: item["length"]], rest[item["length"] + 1 :]
        else:
            payload, _, rest = rest.partition(b"\n")
        items.append((item, payload))
    return header, items


@st.composite
def mutated_envelope(draw: Draw, seeds: Sequence[bytes]) -> bytes:
    header_line, items = _split_envelope(pick(draw, seeds))
    header = json.loads(header_line)
    donors = [item for seed in seeds for item in _split_envelope(seed)[1]]
    for _ in range(draw(st.integers(1, 4))):
        action = pick(draw, ("length", "length", "payload", "header", "type", "drop",
                             "repeat", "add", "envelope_header"))  # fmt: skip
        index = draw(st.integers(0, len(items) - 1)) if items else 0
        if action == "add" or not items:
            items.insert(index, pick(draw, donors))
        elif action == "drop":
            del items[index]
        elif action == "repeat":
            times = _times(draw, len(items[index][1]) + 40, (1, 10, 500, 5000))
            items[index:index] = [items[index]] * times
        elif action == "envelope_header":
            header = _mutated_tree(draw, header, JSON_POOL, most=2)
        else:
            items[index] = _mutated_item(draw, action, *items[index], donors)
    return _write_envelope(draw, dump_json(header), items)


def _mutated_item(
    draw: Draw, action: str, item: Any, payload: bytes, donors: list[tuple[Any, bytes]]
) -> tuple[Any, bytes]:
    """One item with its `length`, payload, header or type changed."""
    item = item if isinstance(item, dict) else {}
    if action == "length":
        length = len(payload) + draw(st.integers(-3, 3))
        item = {**item, "length": pick(draw, (length, *LENGTHS))}
        if draw(st.booleans()):
            item.pop("length")
    elif action == "payload":
        try:
            tree = json.loads(payload) if not _deep(payload) else None
        except ValueError:
            tree = None
        if tree is None:
            payload = mutate_bytes(draw, payload, [p for _, p in donors], JSON_TOKENS, 3)
        else:
            payload = dump_json(_mutated_tree(draw, tree, JSON_POOL))
            if "length" in item and draw(st.booleans()):
                item = {**item, "length": len(payload)}  # a consistent length
    elif action == "header":
        item = _mutated_tree(draw, item, JSON_POOL, most=2)
    else:
        types = ("event", "transaction", "check_in", "client_report", "attachment", "", 5)
        item = {**item, "type": pick(draw, types)}
    return item, payload


def _deep(text: bytes) -> bool:
    """Whether JSON text may nest deep enough for json.loads to hit the recursion limit,
    which depends on how deep the stack already is: a mutator that branched on it would draw
    differently on a replay, and hypothesis would call the strategy flaky."""
    return text.count(b"[") + text.count(b"{") > 400


def _write_envelope(draw: Draw, header: bytes, items: list[tuple[Any, bytes]]) -> bytes:
    newline = pick(draw, (b"\n", b"\n", b"\n", b"", b"\r\n", b"\n\n"))
    parts = [header]
    for item, payload in items:
        parts += [dump_json(item), payload]
    body = newline.join(parts) + pick(draw, (b"", b"\n", b"\n\n"))
    if draw(st.integers(0, 3)) == 0:
        body = mutate_bytes(draw, body, [], JSON_TOKENS, most=3)
    return body


def envelope_inputs(seeds: Sequence[bytes]) -> st.SearchStrategy[bytes]:
    seeds = Seeds(seeds)
    return mix((3, mutated_envelope(seeds)), (1, mutated_bytes(seeds, JSON_TOKENS)))


# --- exposition text --------------------------------------------------------------------------

EXPOSITION_LINES = (
    "", "#", "# EOF", "# TYPE x histogram", "# TYPE x counter", "# TYPE x gaugehistogram",
    "# TYPE x info", "# TYPE x stateset", "# TYPE x unknown", "# UNIT x seconds",
    "# HELP x with \\\\ and \\n escapes", "# HELP x", "x 1", "x NaN", "x +Inf", "x -Inf",
    "x 1e999", "x 0x10", "x 1 1795800000000", "x 1 -1", "x 1 1.5e300", "x{} 1", "x{,} 1",
    'x{a="b",} 1', 'x{a="b",a="c"} 1', 'x{a="\\"} 1', 'x{a="\\q"} 1', 'x{a="é💥"} 1',
    'x{le="0.1"} 1', 'x_bucket{le="+Inf"} 1', 'x_bucket{le="bad"} 1', "x_count 1", "x_sum -1",
    'x_total{a="b"} 1 # {trace_id="ab"} 0.5', 'x_total 1 # {a="b"} 0.5 123',
    'x_total 1 # {a="' + "v" * 200 + '"} 0.5', "x_created 1.7957e+09", 'x{a="b"', "x{a=b} 1",
    '{a="b"} 1', '{"x", a="b"} 1', "1x 1", "x  1", "x\t1", "x 1 2 3", "x 1\r", "\x00 1",
    'x{a="' + "v" * 5000 + '"} 1', "x" * 5000 + " 1",
)  # fmt: skip


@st.composite
def mutated_exposition(draw: Draw, seeds: Sequence[str]) -> str:
    lines = pick(draw, seeds).split("\n")
    donors = [line for seed in seeds for line in seed.split("\n")]
    for _ in range(draw(st.integers(1, 6))):
        action = pick(draw, ("drop", "repeat", "swap", "insert", "insert", "donor",
                                       "chars", "chars"))  # fmt: skip
        index = draw(st.integers(0, max(0, len(lines) - 1)))
        if not lines:
            lines = [""]
        if action == "drop":
            del lines[index]
        elif action == "repeat":
            lines[index:index] = [lines[index]] * _times(draw, len(lines[index]), (1, 10, 1000))
        elif action == "swap":
            other = draw(st.integers(0, len(lines) - 1))
            lines[index], lines[other] = lines[other], lines[index]
        elif action == "insert":
            lines.insert(index, pick(draw, EXPOSITION_LINES))
        elif action == "donor":
            lines.insert(index, pick(draw, donors))
        else:
            raw = mutate_bytes(draw, lines[index].encode(), [], (b'"', b"{", b"}", b"#", b" ",
                                                                 b"\\", b",", b"=", b"\t"), 3)  # fmt: skip
            lines[index] = raw.decode("utf-8", "replace")
    newline = pick(draw, ("\n", "\n", "\r\n"))
    return newline.join(lines) + pick(draw, ("", "\n", "\n# EOF\n"))


# --- scrape configs ----------------------------------------------------------------------------


_RELABEL_RULES = st.fixed_dictionaries({}, optional={
    "source_labels": st.sampled_from((["__address__"], ["tier", "job"], "tier", [1], [])),
    "regex": st.sampled_from(ODD_STRINGS),
    "target_label": st.sampled_from(("__address__", "__scheme__", "__metrics_path__", "$1",
                                     "${1}_x", "$x", "\\", "a\\b", "", "instance")),
    "replacement": st.sampled_from(("$1", "$2", "${1}", "$0", "$99", "\\", "\\1", "\\g<1>",
                                    "", "$" + "9" * 5000, "a$1b", "$01")),
    "separator": st.sampled_from((";", "", 5)),
    "action": st.sampled_from(("replace", "keep", "drop", "labelmap", "Keep", 5)),
})  # fmt: skip


def _relabel_extra(draw: Draw, tree: Any) -> Any:
    """A relabel rule with odd fields added to the first job."""
    rule = draw(_RELABEL_RULES)
    if isinstance(tree, list) and tree and isinstance(tree[0], dict):
        rules = tree[0].get("relabel_configs")
        rules = [*rules, rule] if isinstance(rules, list) else [rule]
        return [{**tree[0], "relabel_configs": rules}, *tree[1:]]
    return tree


# libyaml's safe loader and dumper when built (what generation costs, not what is tested).
_YAML_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
_YAML_DUMPER = getattr(yaml, "CSafeDumper", yaml.SafeDumper)


@st.composite
def mutated_config(draw: Draw, seeds: Sequence[Any]) -> Any:
    """A scrape_configs block: as Python (from YAML), from mutated YAML text, or from mutated
    JSON text (the LOOKOUT_SCRAPE_CONFIGS variable)."""
    tree = pick(draw, seeds)
    if draw(st.booleans()):
        tree = _relabel_extra(draw, tree)
    route = pick(draw, ("tree", "tree", "yaml", "json"))
    if route == "tree":
        return _mutated_tree(draw, tree, YAML_POOL)
    if route == "json":
        text = mutate_bytes(draw, json.dumps(tree).encode(), [], JSON_TOKENS, 3)
        try:
            return tree if _deep(text) else json.loads(text)
        except ValueError:
            return tree
    try:
        text = yaml.dump({"scrape_configs": tree}, Dumper=_YAML_DUMPER).encode()
    except (yaml.YAMLError, ValueError):  # UnicodeEncodeError: a lone surrogate
        return tree
    tokens = (b":", b"- ", b"\n", b"  ", b"&a ", b"*a", b"!!set ", b"!!binary ", b"{", b"'")
    text = mutate_bytes(draw, text, [], tokens, 3)
    try:
        loaded = None if _deep(text) else yaml.load(text, Loader=_YAML_LOADER)  # a safe loader
    except (yaml.YAMLError, ValueError):
        return tree
    return loaded.get("scrape_configs") if isinstance(loaded, dict) else loaded
