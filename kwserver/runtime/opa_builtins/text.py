"""String, regex, glob, encoding and serialisation builtins.

Regular expressions use RE2 (google-re2), the engine behind Go's `regexp` that OPA uses, so
patterns mean the same thing here as in `opa eval`.
"""

from __future__ import annotations

import base64
import binascii
import functools
import re
import urllib.parse
from typing import Any

import jsonpatch
import orjson
import yaml

from kwserver.runtime.opa_builtins._common import (
    BuiltinError,
    array,
    integer,
    obj,
    string,
    strings_of,
)
from kwserver.runtime.opa_builtins.gofmt import sprintf as go_sprintf

# --- strings --------------------------------------------------------------------------------------


def _re2() -> Any:
    """RE2, imported when a Rego policy is loaded (`preload`): only those need it, and it maps ~3 MiB (with
    libstdc++) into every process."""
    import re2

    return re2


def preload() -> None:
    """Import what Rego builtins need in the master, before the fork, so that workers share it."""
    _re2()


def sprintf(fmt: Any, values: Any) -> str:
    return go_sprintf(string("sprintf", 1, fmt), array("sprintf", 2, values))


def any_prefix_match(search: Any, base: Any) -> bool:
    searches = strings_of("strings.any_prefix_match", 1, search)
    bases = strings_of("strings.any_prefix_match", 2, base)
    return any(s.startswith(b) for s in searches for b in bases)


def any_suffix_match(search: Any, base: Any) -> bool:
    searches = strings_of("strings.any_suffix_match", 1, search)
    bases = strings_of("strings.any_suffix_match", 2, base)
    return any(s.endswith(b) for s in searches for b in bases)


def strings_count(search: Any, substring: Any) -> int:
    text = string("strings.count", 1, search)
    sub = string("strings.count", 2, substring)
    return len(text) + 1 if sub == "" else text.count(sub)  # Go's strings.Count


def strings_reverse(value: Any) -> str:
    return string("strings.reverse", 1, value)[::-1]


# --- regex (RE2) ------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=256)
def _compile(pattern: str) -> Any:
    try:
        return _re2().compile(pattern)
    except _re2().error as exc:
        raise BuiltinError(f"error parsing regexp: {exc}: `{pattern}`") from exc


def regex_split(pattern: Any, value: Any) -> list[str]:
    regex = _compile(string("regex.split", 1, pattern))
    text = string("regex.split", 2, value)
    return _go_split(regex, text)


def _go_matches(regex: Any, text: str) -> list[tuple[int, int]]:
    """Go's FindAllStringIndex: an empty match right after the previous match does not count."""
    spans, previous_end = [], -1
    for match in regex.finditer(text):
        start, end = match.span()
        if start == end and start == previous_end:
            continue
        spans.append((start, end))
        previous_end = end
    return spans


def _go_split(regex: Any, text: str) -> list[str]:
    """Go's Regexp.Split(s, -1)."""
    if text == "":
        return [""]
    pieces, begin, end = [], 0, 0
    for start, stop in _go_matches(regex, text):
        end = start
        if stop != 0:
            pieces.append(text[begin:end])
        begin = stop
    if end != len(text):
        pieces.append(text[begin:])
    return pieces


def regex_find_n(pattern: Any, value: Any, number: Any) -> list[str]:
    regex = _compile(string("regex.find_n", 1, pattern))
    text = string("regex.find_n", 2, value)
    count = integer("regex.find_n", 3, number)
    matches = [text[start:end] for start, end in _go_matches(regex, text)]
    return matches if count < 0 else matches[:count]


def regex_replace(value: Any, pattern: Any, replacement: Any) -> str:
    text = string("regex.replace", 1, value)
    regex = _compile(string("regex.replace", 2, pattern))
    template = string("regex.replace", 3, replacement)
    return regex.sub(lambda m: _go_expand(template, m), text)


_NAME = re.compile(r"[A-Za-z0-9_]+")


def _go_expand(template: str, match: Any) -> str:
    """Go's Regexp.Expand: `$1`, `$name`, `${name}`, `$$`; unknown groups expand to ""."""
    out, i = [], 0
    while i < len(template):
        ch = template[i]
        if ch != "$" or i + 1 >= len(template):
            out.append(ch)
            i += 1
            continue
        nxt = template[i + 1]
        if nxt == "$":
            out.append("$")
            i += 2
            continue
        if nxt == "{":
            close = template.find("}", i + 2)
            name = template[i + 2:close] if close > 0 else ""
            if close < 0 or not _NAME.fullmatch(name):
                out.append("$")
                i += 1
                continue
            i = close + 1
        else:
            found = _NAME.match(template, i + 1)
            if not found:
                out.append("$")
                i += 1
                continue
            name = found.group(0)
            i = found.end()
        out.append(_group(match, name))
    return "".join(out)


def _group(match: Any, name: str) -> str:
    try:
        value = match.group(int(name)) if name.isdigit() else match.group(name)
    except (IndexError, KeyError, _re2().error):
        return ""
    return value or ""


def regex_template_match(template: Any, value: Any, start: Any, end: Any) -> bool:
    tpl = string("regex.template_match", 1, template)
    text = string("regex.template_match", 2, value)
    open_ch = string("regex.template_match", 3, start)[:1]
    close_ch = string("regex.template_match", 4, end)[:1]
    pattern, level, idx, pos = ["^"], 0, 0, 0
    for i, ch in enumerate(tpl):
        if ch == open_ch:
            level += 1
            if level == 1:
                idx = i
        elif ch == close_ch:
            level -= 1
            if level == 0:
                pattern.append(_re2().escape(tpl[pos:idx]) + "(" + tpl[idx + 1:i] + ")")
                pos = i + 1
            elif level < 0:
                raise BuiltinError(f"regex.template_match: unbalanced braces in {tpl!r}")
    if level != 0:
        raise BuiltinError(f"regex.template_match: unbalanced braces in {tpl!r}")
    pattern.append(_re2().escape(tpl[pos:]) + "$")
    return _compile("".join(pattern)).search(text) is not None


# --- glob -------------------------------------------------------------------------------------------

_GLOB_SPECIAL = set("*?\\[]{}")


def glob_quote_meta(pattern: Any) -> str:
    text = string("glob.quote_meta", 1, pattern)
    return "".join("\\" + c if c in _GLOB_SPECIAL else c for c in text)


# --- encodings ----------------------------------------------------------------------------------------


def base64url_encode_no_pad(value: Any) -> str:
    data = string("base64url.encode_no_pad", 1, value).encode()
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def hex_encode(value: Any) -> str:
    return string("hex.encode", 1, value).encode().hex()


def hex_decode(value: Any) -> str:
    text = string("hex.decode", 1, value)
    try:
        return binascii.unhexlify(text).decode("utf-8")
    except (binascii.Error, ValueError) as exc:
        raise BuiltinError(f"hex.decode: {exc}") from exc


def urlquery_encode(value: Any) -> str:
    return urllib.parse.quote_plus(string("urlquery.encode", 1, value), safe="")


_PERCENT = re.compile(r"%(?![0-9A-Fa-f]{2})")


def urlquery_decode(value: Any) -> str:
    text = string("urlquery.decode", 1, value)
    bad = _PERCENT.search(text)
    if bad:
        raise BuiltinError(f"urlquery.decode: invalid URL escape {text[bad.start():bad.start() + 3]!r}")
    return urllib.parse.unquote_plus(text)


def urlquery_encode_object(value: Any) -> str:
    pairs = []
    for key, item in sorted(obj("urlquery.encode_object", 1, value).items()):
        items = item if isinstance(item, list) else [item]
        for v in items:
            if not isinstance(v, str):
                raise BuiltinError("urlquery.encode_object: values must be strings, arrays or sets of strings")
            pairs.append(f"{urllib.parse.quote_plus(key, safe='')}={urllib.parse.quote_plus(v, safe='')}")
    return "&".join(pairs)


def urlquery_decode_object(value: Any) -> dict[str, list[str]]:
    text = string("urlquery.decode_object", 1, value)
    result: dict[str, list[str]] = {}
    for key, item in urllib.parse.parse_qsl(text, keep_blank_values=True):
        result.setdefault(key, []).append(item)
    return result


def json_is_valid(value: Any) -> bool:
    if not isinstance(value, str):
        return False
    try:
        orjson.loads(value)
    except orjson.JSONDecodeError:
        return False
    return True


def json_patch(value: Any, patches: Any) -> Any:
    operations = array("json.patch", 2, patches)
    try:
        return jsonpatch.JsonPatch(operations).apply(value)
    except (jsonpatch.JsonPatchException, jsonpatch.JsonPointerException, TypeError, KeyError) as exc:
        raise BuiltinError(f"json.patch: {exc}") from exc


class _YamlLoader(yaml.SafeLoader):
    """YAML 1.1 like go-yaml, but timestamps stay strings (JSON has no dates)."""


_YamlLoader.yaml_implicit_resolvers = {
    key: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:timestamp"]
    for key, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}


def _key(key: Any) -> str:
    return key if isinstance(key, str) else orjson.dumps(key).decode().strip('"')


def _json_compatible(value: Any) -> Any:
    if isinstance(value, dict):
        return {_key(k): _json_compatible(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_compatible(v) for v in value]
    if isinstance(value, (bytes, bytearray)):
        return base64.b64encode(value).decode()
    return value


def yaml_unmarshal(value: Any) -> Any:
    text = string("yaml.unmarshal", 1, value)
    try:
        return _json_compatible(yaml.load(text, Loader=_YamlLoader))
    except yaml.YAMLError as exc:
        raise BuiltinError(f"yaml.unmarshal: {exc}") from exc


def yaml_marshal(value: Any) -> str:
    return yaml.safe_dump(value, default_flow_style=False, sort_keys=True, allow_unicode=True)


def yaml_is_valid(value: Any) -> bool:
    if not isinstance(value, str):
        return False
    try:
        yaml.load(value, Loader=_YamlLoader)
    except yaml.YAMLError:
        return False
    return True
