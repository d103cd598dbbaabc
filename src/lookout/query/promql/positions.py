"""Where things sit in the query text, for annotations: Prometheus ends a warning with the
position of the expression it is about, as `(line:column)`. promql-parser keeps no
positions, so they are found again by scanning the text (outside string literals).

Also: which string literals spell invalid UTF-8 with `\\x` escapes. promql-parser decodes
each such escape to one character, so `"\\xff"` and `"ÿ"` look alike after parsing; the
raw text tells them apart, and Prometheus refuses invalid UTF-8 in a label name.
"""

from __future__ import annotations

import functools
import re

_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`', re.DOTALL)
_OPEN = "([{"
_CLOSE = ")]}"


def _blank_strings(query: str) -> str:
    """The query with every string literal's inside blanked, keeping offsets."""
    return _STRING.sub(
        lambda m: m.group(0)[0] + " " * (len(m.group(0)) - 2) + m.group(0)[-1], query
    )


def _line_col(query: str, offset: int) -> str:
    line = query.count("\n", 0, offset) + 1
    column = offset - (query.rfind("\n", 0, offset) + 1) + 1
    return f"({line}:{column})"


def _call(name: str) -> str:
    """A call of `name`, or an aggregation with its grouping before the parenthesis."""
    return rf"(?<![\w:]){re.escape(name)}\s*(?:(?:by|without)\s*\([^)]*\)\s*)?\("


@functools.lru_cache(maxsize=256)
def call_position(query: str, name: str, index: int = 0) -> str:
    """`(line:col)` of the index-th call of `name(`, or "" when not found."""
    text = _blank_strings(query)
    found = [m.start() for m in re.finditer(_call(name), text)]
    if index >= len(found):
        return ""
    return _line_col(query, found[index])


@functools.lru_cache(maxsize=256)
def argument_position(query: str, name: str, argument: int, index: int = 0) -> str:
    """`(line:col)` of the start of argument number `argument` (from 0) of the index-th call
    of `name(`, or "" when not found."""
    text = _blank_strings(query)
    calls = [m.end() for m in re.finditer(_call(name), text)]
    if index >= len(calls):
        return ""
    depth = 0
    current = 0
    start = calls[index]
    for i in range(calls[index], len(text)):
        ch = text[i]
        if ch in _OPEN:
            depth += 1
        elif ch in _CLOSE:
            if depth == 0:
                break
            depth -= 1
        elif ch == "," and depth == 0:
            current += 1
            start = i + 1
            continue
        if current == argument and not ch.isspace() and start is not None:
            return _line_col(query, i)
    return ""


_ESCAPE = re.compile(r"\\(x[0-9a-fA-F]{2}|[0-7]{3}|u[0-9a-fA-F]{4}|U[0-9a-fA-F]{8}|.)", re.DOTALL)
_SIMPLE = {"a": "\a", "b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t", "v": "\v"}


def invalid_utf8_literals(query: str) -> set[str]:
    """The values (as promql-parser decodes them) of string literals whose byte escapes do
    not form valid UTF-8."""
    found: set[str] = set()
    for match in _STRING.finditer(query):
        literal = match.group(0)
        if literal[0] == "`" or ("\\x" not in literal and not re.search(r"\\[0-7]{3}", literal)):
            continue
        raw = bytearray()
        chars: list[str] = []
        body = literal[1:-1]
        pos = 0
        for esc in _ESCAPE.finditer(body):
            plain = body[pos : esc.start()]
            raw += plain.encode()
            chars.append(plain)
            code = esc.group(1)
            if code[0] == "x" and len(code) == 3:
                raw.append(int(code[1:], 16))
                chars.append(chr(int(code[1:], 16)))
            elif len(code) == 3 and code.isdigit():
                raw.append(int(code, 8) & 0xFF)
                chars.append(chr(int(code, 8) & 0xFF))
            elif code[0] in "uU" and len(code) > 1:
                ch = chr(int(code[1:], 16))
                raw += ch.encode()
                chars.append(ch)
            else:
                ch = _SIMPLE.get(code, code)
                raw += ch.encode()
                chars.append(ch)
            pos = esc.end()
        raw += body[pos:].encode()
        chars.append(body[pos:])
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError:
            found.add("".join(chars))
    return found
