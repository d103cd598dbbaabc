"""JSON request bodies whose every string can be stored.

JSON allows a lone surrogate (`"\\ud800"`), and Python's json module lets one through, raw
or escaped; UTF-8 cannot carry it, so protobuf, hashing and the store would fail on it deep
inside. Ingest replaces each with U+FFFD at parse time, as a lenient reader should.
"""

from __future__ import annotations

import json
import re
from typing import Any

from lookout.errors import IngestError

# A surrogate escape, a surrogate encoded raw, or a body in UTF-16 or UTF-32 (a NUL in its
# first four bytes), which this check cannot read: only then are the strings walked.
_MAYBE_SURROGATE = re.compile(rb"\\u[dD][89a-fA-F]|\xed[\xa0-\xbf]")
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")
_SURROGATE = re.compile("[\ud800-\udfff]")


def load_json(body: bytes, what: str) -> Any:
    """`body` parsed as JSON, else an IngestError naming `what`; lone surrogates become
    U+FFFD."""
    try:
        document = json.loads(body)
        if _MAYBE_SURROGATE.search(body) or 0 in body[:4]:
            document = without_lone_surrogates(document)
    except ValueError as exc:
        raise IngestError(f"{what} is not valid JSON: {exc}") from exc
    except RecursionError as exc:
        raise IngestError(f"{what} is nested too deeply to parse.") from exc
    return document


def loads_text(text: str) -> Any:
    """json.loads of a str whose own characters are valid (see `valid_text`); lone
    surrogates its escapes make become U+FFFD. Raises ValueError or RecursionError."""
    document = json.loads(text)
    return without_lone_surrogates(document) if _SURROGATE_ESCAPE.search(text) else document


def without_lone_surrogates(node: Any) -> Any:
    """A parsed JSON value with the lone surrogates in its strings and keys made U+FFFD."""
    if isinstance(node, str):
        return valid_text(node)
    if isinstance(node, list):
        return [without_lone_surrogates(item) for item in node]
    if isinstance(node, dict):
        return {valid_text(key): without_lone_surrogates(value) for key, value in node.items()}
    return node


def valid_text(text: str) -> str:
    """`text` with each lone surrogate replaced by U+FFFD (cheap when there is none)."""
    if text.isascii():
        return text
    try:
        text.encode()
    except UnicodeEncodeError:
        return _SURROGATE.sub("\ufffd", text)
    return text
