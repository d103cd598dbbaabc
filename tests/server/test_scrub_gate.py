"""The scrub gates: the server scrubs only the span and log values a gate matches, so a gate
must match every value the rules would change (lookout.sdk._scrub, TEXT_GATE and MAP_GATE)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lookout.ingest.scrub import _matching, _matching_each
from lookout.model import json_text
from lookout.sdk._scrub import (
    MAP_GATE,
    SENSITIVE_PAIRS,
    SENSITIVE_TOKENS,
    TEXT_GATE,
    Scrubber,
    _fewest,
)

CORPUS = json.loads(
    (Path(__file__).resolve().parents[1] / "fixtures" / "scrub" / "corpus.json").read_text()
)
SCRUBBER = Scrubber(b"gate-test")
ARABIC_INDIC_DIGITS = [chr(0x660 + n) for n in range(10)]  # decimal digits of another script
FULLWIDTH_DIGITS = [chr(0xFF10 + n) for n in range(10)]
ARABIC_SSN = "".join(ARABIC_INDIC_DIGITS[int(c)] if c.isdigit() else c for c in "012-34-5678")


_TEXT_FOR_SPLIT = st.sampled_from(["", "plain", "mail a@b.co", "ssn 123-45-6789", "caf\u00e9"])


def _iban(bban: str, country: str = "GB") -> str:
    """A valid IBAN for `bban` (the mod-97 check digits worked out)."""
    number = int("".join(str(int(c, 36)) for c in bban + country + "00"))
    return f"{country}{98 - number % 97:02d}{bban}"


# One text per part of TEXT_GATE that needs it: with that part gone, the gate misses it.
RULE_EXAMPLES = {
    "-----BEGIN": "key -----BEGIN EC PRIVATE KEY-----\nMHcCAQEE\n-----END EC PRIVATE KEY-----",
    "@": "mailed wanjiku.otieno@example.co.ke and https://deploy:hunter2@git.example/x",
    "(?i:earer)": "retry with Bearer abcdefghijkl.mnop",
    "/home/": "open /home/wanjiku/.netrc failed",
    "Users": r"open C:\Users\wanjiku\pay.ini failed",
    r"[0-9](?:[ -]?[0-9]){8}": "ssn 123-45-6789, phone 0712-345-678",
    r"[0-9]{2}(?: ?[A-Z0-9]){11}": "pay to " + _iban("AB1CD2EF3GH4IJ5K"),
    r"[^\x00-\x7f]": f"ref 1, ssn {ARABIC_SSN}",  # other digits: Python's \d has them
}


def _alternatives(pattern: str) -> list[str]:
    """The top-level alternatives of TEXT_GATE (it has no `|` inside a group)."""
    return pattern.split("|")


def _misses(pattern: str, values: list[str], changes: Callable[[str], bool]) -> list[str]:
    """The values the scrubber changes that `pattern` lets through unscrubbed."""
    matched = set(_matching(values, pattern))
    return [v for i, v in enumerate(values) if i not in matched and changes(v)]


def _text_changes(text: str) -> bool:
    return SCRUBBER.scrub_text(text) != text


def _map_changes(text: str) -> bool:
    value = json.loads(text)
    return SCRUBBER.scrub_mapping(value) != value


def _corpus_texts() -> list[str]:
    cases = CORPUS["positives"] + CORPUS["negatives"]
    values = [str(c["value"]) for c in cases]
    return values + [f"{a} | {b}" for a, b in zip(values, reversed(values), strict=True)]


def _corpus_maps() -> list[str]:
    cases = CORPUS["positives"] + CORPUS["negatives"]
    maps = [{c["key"]: c["value"]} for c in cases]
    maps += [{"request": {"headers": [[c["key"], c["value"]]]}} for c in cases]  # pair lists
    maps += [{"ctx": [c["value"]], "n": 1} for c in cases]
    return [json_text(m) for m in maps]


def test_the_text_gate_matches_every_text_the_rules_change() -> None:
    texts = _corpus_texts() + list(RULE_EXAMPLES.values())
    assert sum(map(_text_changes, texts)) >= 60  # not vacuous: the rules change many
    assert _misses(TEXT_GATE, texts, _text_changes) == []


def test_the_map_gate_matches_every_map_the_rules_change() -> None:
    maps = _corpus_maps() + [json_text({"note": text}) for text in RULE_EXAMPLES.values()]
    assert sum(map(_map_changes, maps)) >= 100
    assert _misses(MAP_GATE, maps, _map_changes) == []


@pytest.mark.parametrize("part", list(RULE_EXAMPLES))
def test_negative_control_a_gate_without_any_one_part_misses_a_secret(part: str) -> None:
    """Each part is needed: the checks above go red when it is left out."""
    assert part in _alternatives(TEXT_GATE)
    weakened = "|".join(p for p in _alternatives(TEXT_GATE) if p != part)
    texts = list(RULE_EXAMPLES.values())
    assert _misses(weakened, texts, _text_changes)
    assert _misses(TEXT_GATE, texts, _text_changes) == []


def test_negative_control_a_map_gate_without_key_tokens_misses_a_password() -> None:
    maps = [json_text({"password": "hunter2"}), json_text({"headers": [["X-Api-Key", "k"]]})]
    assert len(_misses(TEXT_GATE, maps, _map_changes)) == 2
    assert _misses(MAP_GATE, maps, _map_changes) == []


def test_negative_control_ascii_digits_alone_miss_other_scripts() -> None:
    """RE2's [0-9] is ASCII; Python's \\d (which the rules use) is any decimal digit, so a
    text beyond ASCII must pass the gate, whatever else it holds."""
    ascii_only = "|".join(p for p in _alternatives(TEXT_GATE) if p != r"[^\x00-\x7f]")
    texts = [f"ref 1, ssn {ARABIC_SSN}", f"card {''.join(FULLWIDTH_DIGITS[:9])}4111111"]
    assert _misses(ascii_only, texts, _text_changes) != []
    assert _misses(TEXT_GATE, texts, _text_changes) == []


def test_the_fewest_key_tokens_match_what_every_token_matches() -> None:
    """MAP_GATE leaves out a token that holds another ("apikey" holds "key")."""
    every = sorted(SENSITIVE_TOKENS | {second for _, second in SENSITIVE_PAIRS})
    kept = _fewest(every)
    assert len(kept) < len(every)
    assert all(any(token in other for token in kept) for other in every)
    assert _fewest([*kept, "x" + kept[0]]) == kept
    assert _fewest(["key", "pin"]) == ["key", "pin"]


@settings(max_examples=100, deadline=None)
@given(st.lists(st.lists(_TEXT_FOR_SPLIT, max_size=6), min_size=1, max_size=5))
def test_one_call_over_many_columns_finds_what_a_call_per_column_finds(
    columns: list[list[str]],
) -> None:
    assert _matching_each(columns, TEXT_GATE) == [_matching(c, TEXT_GATE) for c in columns]


# Generated texts: secrets and near misses cut and joined with noise, other scripts' digits,
# separators and case changes.
_FRAGMENTS = [str(c["value"]) for c in CORPUS["positives"] + CORPUS["negatives"]]
_NOISE = st.text(
    alphabet=st.sampled_from(
        [*"0123456789 -./:@\\_\tABCXYZabcxyz\n", *ARABIC_INDIC_DIGITS, *FULLWIDTH_DIGITS]
    ),
    max_size=30,
)
_PIECE = st.one_of(
    _NOISE,
    st.sampled_from(_FRAGMENTS),
    st.sampled_from(_FRAGMENTS).map(str.upper),
    st.tuples(st.sampled_from(_FRAGMENTS), st.integers(0, 40), st.integers(0, 40)).map(
        lambda t: t[0][t[1] : t[1] + 5 + t[2]]
    ),
)
_TEXT = st.lists(_PIECE, min_size=1, max_size=5).map("".join)
_KEYS = st.one_of(
    st.sampled_from([str(c["key"]) for c in CORPUS["positives"] + CORPUS["negatives"]]),
    st.sampled_from(["apiKey", "X-API-KEY", "twoFactorCode", "Set-Cookie", "privateKey"]),
    st.text(alphabet=st.sampled_from(list("abcKEYTOKENpinsecret_-. ")), max_size=14),
)
_VALUE: Any = st.recursive(
    st.one_of(_TEXT, st.integers(-(2**63), 2**63 - 1), st.floats(allow_nan=False), st.none()),
    lambda inner: st.one_of(
        st.lists(inner, max_size=3),
        st.dictionaries(_KEYS, inner, max_size=3),
        st.tuples(_KEYS, inner).map(list),  # a [name, value] pair
    ),
    max_leaves=6,
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(_TEXT, min_size=1, max_size=20))
def test_generated_texts_the_rules_change_all_pass_the_gate(texts: list[str]) -> None:
    assert _misses(TEXT_GATE, texts, _text_changes) == []


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.dictionaries(_KEYS, _VALUE, max_size=4), min_size=1, max_size=10))
def test_generated_maps_the_rules_change_all_pass_the_gate(maps: list[dict[str, Any]]) -> None:
    assert _misses(MAP_GATE, [json_text(m) for m in maps], _map_changes) == []


def _value_changes(text: str) -> bool:
    value = json.loads(text)
    return SCRUBBER.scrub_value(value) != value


_EVENT = st.fixed_dictionaries(
    {
        "name": _TEXT,
        "time_ns": st.integers(0, 2**63 - 1),
        "attributes": st.dictionaries(_KEYS, _VALUE, max_size=3),
    }
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.lists(_EVENT, max_size=3), min_size=1, max_size=10))
def test_generated_span_events_the_rules_change_all_pass_the_gate(
    events: list[list[dict[str, Any]]],
) -> None:
    """A span's events and links are stored as JSON lists of maps: the map gate covers them."""
    assert _misses(MAP_GATE, [json_text(e) for e in events], _value_changes) == []
