"""Where in policies.yml a settings error points.

A policy validates its settings from the JSON kwserver hands it, one line with no spaces, so a parser
error from the guest says "at line 1 column 31": a place in a payload the user never wrote. serde_json
(the parser of Rust policies) counts columns in bytes consumed, so the column names the last byte it
read; the innermost value or object key covering that byte is the setting the error is about, and its
path is a key the user can find in policies.yml.
"""

from __future__ import annotations

import re

import orjson

_POSITION = re.compile(r"at line (\d+) column (\d+)")
_PLAIN_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]*$")


def settings_path(settings_json: bytes, error: str) -> str | None:
    """`settings.<path>` of the setting a parser error in `error` points at, or None when it names no place."""
    positions = _POSITION.findall(error)
    if not positions:
        return None
    line, column = (int(n) for n in positions[-1])
    if line != 1 or not 0 < column <= len(settings_json):
        return None
    try:
        path = path_at(settings_json, column - 1)
    except (ValueError, IndexError, orjson.JSONDecodeError):
        return None
    return "settings" + "".join(_step(part) for part in path)


def _step(part: str | int) -> str:
    if isinstance(part, int):
        return f"[{part}]"
    return f".{part}" if _PLAIN_KEY.match(part) else f"[{orjson.dumps(part).decode()}]"


def path_at(document: bytes, index: int) -> list[str | int]:
    """The path of the innermost value or object key of the compact JSON `document` covering byte `index`."""
    covering: list[list[str | int]] = []

    def string_end(pos: int) -> int:
        pos += 1
        while document[pos] != 0x22:  # '"'
            pos += 2 if document[pos] == 0x5C else 1  # a backslash escapes the next byte
        return pos + 1

    def value(pos: int, path: list[str | int]) -> int:
        start, first = pos, document[pos]
        if first in b"{[":
            closing = b"}" if first == ord("{") else b"]"
            pos += 1
            item = 0
            while document[pos:pos + 1] != closing:
                if first == ord("{"):
                    key_end = string_end(pos)
                    key = orjson.loads(document[pos:key_end])
                    if pos <= index < key_end:
                        covering.append([*path, key])
                    pos = value(key_end + 1, [*path, key])  # past the ':'
                else:
                    pos = value(pos, [*path, item])
                    item += 1
                if document[pos:pos + 1] == b",":
                    pos += 1
            end = pos + 1
        elif first == 0x22:
            end = string_end(pos)
        else:
            end = pos
            while end < len(document) and document[end] not in b",]}":
                end += 1
        if start <= index < end:
            covering.append(path)
        return end

    value(0, [])
    return max(covering, key=len, default=[])
