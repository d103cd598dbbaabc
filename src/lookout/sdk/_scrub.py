"""One scrubber for logs, span attributes and error events (and the server reuses it).

The rule set is Sentry Relay's `@common` (password-like keys, payment cards, IBANs, PEM
keys, credentials in URLs, user home paths, US SSNs, bearer tokens) plus email addresses
and Kenyan mobile numbers. docs/sdk.md lists exactly these rules.

- A key is split into tokens on `_`, `-`, `.`, spaces and camelCase; when a token (or a
  token pair such as `api key`) is sensitive, the whole value becomes `[Filtered]`.
- Whatever the key, sensitive parts of a string value are replaced where they stand.
- A mobile number becomes `msisdn:<first 12 hex of HMAC-SHA256(key, E.164)>…<last 3>`, so
  support can still find a customer's lines by number: the server hashes the searched
  number with the same key (`hash_msisdn`).
- `trace_id`, `span_id`, `event_id` and hex or UUID values of `*_id` keys are never touched.
"""

from __future__ import annotations

import hashlib
import hmac
import itertools
import re
from collections.abc import Iterable, Mapping
from typing import Any

FILTERED = "[Filtered]"

SENSITIVE_TOKENS = frozenset(
    {
        "password", "passwd", "pwd", "passcode", "passkey", "passphrase", "secret", "token",
        "auth", "authorization", "credential", "credentials", "apikey", "privatekey", "pin",
        "otp", "cvv", "cvc", "cookie", "session", "sessionid", "csrf", "csrftoken", "xsrf",
        "bearer", "jwt",
    }
)  # fmt: skip
SENSITIVE_PAIRS = frozenset(
    {("api", "key"), ("private", "key"), ("two", "factor"), ("set", "cookie")}
)
EXEMPT_KEYS = frozenset(
    {"trace_id", "span_id", "event_id", "parent_span_id", "traceid", "spanid", "eventid"}
)
# Keys whose values are code locations or log plumbing, never user data (as in Relay).
PASSTHROUGH_KEYS = frozenset(
    {"timestamp", "level", "logger", "service", "filename", "abs_path", "module", "function"}
)

_CAMEL = re.compile(r"(?<=[a-z0-9])(?=[A-Z])")
_KEY_SPLIT = re.compile(r"[_\-.\s/]+")
_ID_VALUE = re.compile(
    r"[0-9a-fA-F]+|[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}"
)
# A cheap test that a string may hold anything the value rules look for.
_MAYBE = re.compile(r"[0-9@]|-----BEGIN|://|(?i:bearer)|/home/|/Users/|\\Users\\")

_PEM = re.compile(r"(-----BEGIN ([A-Z0-9 ]*)PRIVATE KEY-----)[\s\S]*?(-----END \2PRIVATE KEY-----)")
_URL_AUTH = re.compile(r"\b([a-zA-Z][a-zA-Z0-9+.\-]*://[^:/@\s]+):([^@/\s]+)@")
# A token is at least 8 characters, so "Bearer token expired" stays readable.
_BEARER = re.compile(r"(?i)\b(bearer\s+)[A-Za-z0-9\-._~+/]{8,}=*")
_EMAIL = re.compile(
    r"(?<![\w.%+-])[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}"
)
_CARD = re.compile(r"(?<![\w.-])\d(?:[ -]?\d){12,18}(?![\w-])")
_IBAN = re.compile(r"(?<![\w])[A-Z]{2}\d{2}(?: ?[A-Z0-9]){11,30}(?![\w])")
_SSN = re.compile(r"(?<![\w-])\d{3}-\d{2}-\d{4}(?![\w-])")
_USERPATH = re.compile(r"(?<![\w.])(/home/|/Users/|[A-Za-z]:\\Users\\)([^/\\\s]+)")
_MSISDN = re.compile(
    r"(?<![\w+])(?:\+254|254|0)[\s-]?([17]\d{2})[\s-]?(\d{3})[\s-]?(\d{3})(?![\w])"
)
_CARD_LENGTHS = range(13, 20)
# Cards, IBANs, SSNs and phone numbers all hold at least nine digits close together.
_DIGIT_RUN = re.compile(r"\d(?:[ -]?\d){8}|\d{2}(?: ?[A-Z0-9]){11}")

# What a text needs for scrub_text() to change it, as one RE2 pattern: each substring
# scrub_text() tests before a rule, _DIGIT_RUN over ASCII digits, and any character beyond
# ASCII. RE2's \d is ASCII only and Python's is not; Unicode's digits (\p{Nd}) would be
# exact, but Arrow compiles the pattern at every call, and nine of them took 0.3 ms to
# compile, more than testing 500 values. A text beyond ASCII goes through the scrubber.
# The server runs the gate over whole columns in C++ (Arrow) and scrubs only the values it
# matches. It may match more than the rules change, never less: tests/server/
# test_scrub_gate.py holds it to that. Change it with the rules.
TEXT_GATE = (
    r"-----BEGIN|@|(?i:earer)|/home/|Users|[0-9](?:[ -]?[0-9]){8}|[0-9]{2}(?: ?[A-Z0-9]){11}"
    r"|[^\x00-\x7f]"
)


def _fewest(tokens: Iterable[str]) -> list[str]:
    """`tokens` less those holding another as a substring: whatever holds "apikey" holds
    "key". A shorter pattern compiles faster, and matches the same values."""
    every = set(tokens)
    return sorted(t for t in every if not any(o != t and o in t for o in every))


# What a JSON map needs for scrub_mapping() to change it: TEXT_GATE, or a sensitive key
# token anywhere (a key holds its tokens as substrings, in any case; a pair's first word
# is left out, since "api" is in every route, and its second word stands for it).
_KEY_TOKENS = _fewest(SENSITIVE_TOKENS | {second for _, second in SENSITIVE_PAIRS})
MAP_GATE = "|".join([TEXT_GATE, "(?i:" + "|".join(_KEY_TOKENS) + ")"])


def _card_prefix(digits: str) -> bool:
    """Whether `digits` starts with an issuer prefix of a major card network."""
    two, three, four = int(digits[:2]), int(digits[:3]), int(digits[:4])
    return (
        digits[0] == "4"
        or 51 <= two <= 55
        or 2221 <= four <= 2720
        or two in (34, 37, 36, 38, 39, 62, 65)
        or four == 6011
        or 644 <= three <= 649
        or 3528 <= four <= 3589
        or 300 <= three <= 305
    )


def luhn_ok(digits: str) -> bool:
    total = 0
    for index, char in enumerate(reversed(digits)):
        value = int(char)
        if index % 2 == 1:
            value = value * 2 - 9 if value > 4 else value * 2
        total += value
    return total % 10 == 0


def _iban_ok(text: str) -> bool:
    compact = text.replace(" ", "")
    if not 15 <= len(compact) <= 34:
        return False
    moved = compact[4:] + compact[:4]
    number = "".join(str(int(c, 36)) for c in moved)
    return int(number) % 97 == 1


def key_tokens(key: str) -> list[str]:
    return [t for t in _KEY_SPLIT.split(_CAMEL.sub(" ", key).lower()) if t]


def _sensitive_token(token: str) -> bool:
    """A listed token, or its plural (`tokens`, `secrets`, `cookies`)."""
    return token in SENSITIVE_TOKENS or (token.endswith("s") and token[:-1] in SENSITIVE_TOKENS)


def is_sensitive_key(key: str) -> bool:
    tokens = key_tokens(key)
    if any(_sensitive_token(t) for t in tokens):
        return True
    return any(pair in SENSITIVE_PAIRS for pair in itertools.pairwise(tokens))


def _names_an_id(tokens: list[str]) -> bool:
    """`auth_request_id` names an id (of an auth request); `session_id` is a credential."""
    return len(tokens) >= 2 and tokens[-1] == "id" and not _sensitive_token(tokens[-2])


def _is_id_key(key: str) -> bool:
    lowered = key.lower()
    return lowered == "id" or lowered.endswith(("_id", "-id", ".id")) or key.endswith("Id")


_PAIR_KEY = re.compile(r"(?:b'|b\")?([\w.\-:]{1,64})['\"]?")


def _pair_key(value: list[Any] | tuple[Any, ...]) -> str | None:
    """The name when `value` is a [name, value] pair, as ASGI headers and pair lists are
    (bytes names, or their repr as error events carry them, included)."""
    if len(value) != 2:
        return None
    name = value[0]
    if isinstance(name, bytes):
        name = name.decode("latin-1")
    if not isinstance(name, str):
        return None
    match = _PAIR_KEY.fullmatch(name)
    return match[1] if match else None


_PASS, _KEEP_ID, _FILTER, _VALUES = range(4)
_KEY_CLASS_CACHE_MAX = 4096


def classify_key(key: str) -> int:
    """What a key asks of its value: pass it, keep it if id-like, filter it, or scrub it."""
    if key in PASSTHROUGH_KEYS or key.lower() in EXEMPT_KEYS:
        return _PASS
    tokens = key_tokens(key)
    if is_sensitive_key(key) and not _names_an_id(tokens):
        return _FILTER
    if _is_id_key(key):
        return _KEEP_ID
    return _VALUES


class Scrubber:
    """Applies the rule set; `enabled=False` is the negative control that turns it off."""

    def __init__(self, hash_key: bytes, *, enabled: bool = True) -> None:
        self._key = hash_key
        self.enabled = enabled
        # Keys repeat (log fields, attribute names): classify each once.
        self._key_classes: dict[str, int] = {}

    def hash_msisdn(self, number: str) -> str:
        """The scrubbed form of a Kenyan mobile number written in any common form."""
        digits = re.sub(r"\D", "", number)
        national = digits[-9:]
        e164 = f"+254{national}"
        digest = hmac.new(self._key, e164.encode(), hashlib.sha256).hexdigest()[:12]
        return f"msisdn:{digest}…{national[-3:]}"

    def scrub_text(self, text: str) -> str:
        """Replace every sensitive part of a free-text value.

        Each rule runs only when the text has what it needs (an `@`, a run of digits ...),
        so the common short value costs one or two searches.
        """
        if not self.enabled or not _MAYBE.search(text):
            return text
        if "-----BEGIN" in text:
            text = _PEM.sub(rf"\1{FILTERED}\3", text)
        if "@" in text:
            text = _URL_AUTH.sub(rf"\1:{FILTERED}@", text)
            text = _EMAIL.sub(FILTERED, text)
        if "earer" in text or "EARER" in text:
            text = _BEARER.sub(rf"\1{FILTERED}", text)
        if "/home/" in text or "Users" in text:
            text = _USERPATH.sub(rf"\1{FILTERED}", text)
        if not _DIGIT_RUN.search(text):
            return text
        text = _CARD.sub(self._card, text)
        text = _IBAN.sub(lambda m: FILTERED if _iban_ok(m[0]) else m[0], text)
        text = _SSN.sub(FILTERED, text)
        return _MSISDN.sub(lambda m: self.hash_msisdn(m[0]), text)

    @staticmethod
    def _card(match: re.Match[str]) -> str:
        digits = re.sub(r"\D", "", match[0])
        if len(digits) in _CARD_LENGTHS and _card_prefix(digits) and luhn_ok(digits):
            return FILTERED
        return match[0]

    def scrub_field(self, key: str, value: Any) -> Any:
        """The value to store for `key`: filtered, partly replaced, or as it was."""
        if not self.enabled:
            return value
        kind = self._key_classes.get(key)
        if kind is None:
            kind = classify_key(key)
            if len(self._key_classes) < _KEY_CLASS_CACHE_MAX:
                self._key_classes[key] = kind
        if kind == _PASS:
            return value
        if kind == _FILTER:
            return FILTERED if value not in (None, "") else value
        if kind == _KEEP_ID and isinstance(value, str | int) and _ID_VALUE.fullmatch(str(value)):
            return value
        return self.scrub_value(value)

    def scrub_value(self, value: Any) -> Any:
        """Scrub a value of any JSON-like shape, recursing into mappings and sequences."""
        if isinstance(value, str):
            return self.scrub_text(value)
        if isinstance(value, bool) or value is None or isinstance(value, float):
            return value
        if isinstance(value, int):
            text = str(value)
            scrubbed = self.scrub_text(text) if len(text) >= 10 else text
            return value if scrubbed == text else scrubbed
        if isinstance(value, Mapping):
            return self.scrub_mapping(value)
        if isinstance(value, list | tuple):
            pair_key = _pair_key(value)
            if pair_key is not None:  # a [name, value] pair: headers, query pair lists
                items = [value[0], self.scrub_field(pair_key, value[1])]
            else:
                items = [self.scrub_value(v) for v in value]
            return type(value)(items) if isinstance(value, tuple) else items
        return value

    def scrub_mapping(self, mapping: Mapping[Any, Any]) -> dict[Any, Any]:
        return {k: self.scrub_field(str(k), v) for k, v in mapping.items()}
