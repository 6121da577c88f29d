"""OPA builtins the host provides to Rego policies compiled to Wasm.

OPA compiles most builtins into the module; the others are listed by the module's `builtins()`
export and called through the `opa_builtin0..4` imports. This registry maps OPA's builtin names to
Python implementations taking and returning JSON values (sets arrive and leave as arrays).

It has every builtin the reference server implements, under OPA's names, plus the two keys the
reference registered under wrong names (`parse_rfc3339_ns`, `date`) so modules built against it
keep working, and the builtins Gatekeeper library and common Kubernetes policies import.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from kwserver.runtime.opa_builtins import misc, netcrypto, text, timefns
from kwserver.runtime.opa_builtins._common import BuiltinError

__all__ = ["BUILTINS", "REFERENCE_ALIASES", "BuiltinError", "implemented_names", "lookup", "missing"]

Builtin = Callable[..., Any]

BUILTINS: dict[str, Builtin] = {
    # the reference server's set, under OPA's names
    "trace": misc.trace,
    "base64url.encode_no_pad": text.base64url_encode_no_pad,
    "urlquery.encode": text.urlquery_encode,
    "urlquery.decode": text.urlquery_decode,
    "urlquery.encode_object": text.urlquery_encode_object,
    "urlquery.decode_object": text.urlquery_decode_object,
    "json.is_valid": text.json_is_valid,
    "json.patch": text.json_patch,
    "yaml.marshal": text.yaml_marshal,
    "yaml.unmarshal": text.yaml_unmarshal,
    "yaml.is_valid": text.yaml_is_valid,
    "hex.encode": text.hex_encode,
    "hex.decode": text.hex_decode,
    "glob.quote_meta": text.glob_quote_meta,
    "regex.split": text.regex_split,
    "regex.template_match": text.regex_template_match,
    "regex.find_n": text.regex_find_n,
    "semver.is_valid": misc.semver_is_valid,
    "semver.compare": misc.semver_compare,
    "sprintf": text.sprintf,
    "time.now_ns": timefns.now_ns,
    "time.parse_rfc3339_ns": timefns.parse_rfc3339_ns,
    "time.date": timefns.date,
    # more of OPA's non-native builtins
    "regex.replace": text.regex_replace,
    "strings.any_prefix_match": text.any_prefix_match,
    "strings.any_suffix_match": text.any_suffix_match,
    "strings.count": text.strings_count,
    "strings.reverse": text.strings_reverse,
    "time.parse_ns": timefns.parse_ns,
    "time.parse_duration_ns": timefns.parse_duration_ns,
    "time.clock": timefns.clock,
    "time.weekday": timefns.weekday,
    "time.add_date": timefns.add_date,
    "time.diff": timefns.diff,
    "time.format": timefns.format_time,
    "net.cidr_is_valid": netcrypto.cidr_is_valid,
    "net.cidr_contains": netcrypto.cidr_contains,
    "net.cidr_intersects": netcrypto.cidr_intersects,
    "net.cidr_expand": netcrypto.cidr_expand,
    "net.cidr_merge": netcrypto.cidr_merge,
    "net.cidr_contains_matches": netcrypto.cidr_contains_matches,
    **netcrypto.CRYPTO,
    "units.parse_bytes": misc.units_parse_bytes,
    "units.parse": misc.units_parse,
    "object.keys": misc.object_keys,
    "array.reverse": misc.array_reverse,
}

# Keys under which the reference server registered two time builtins (a quirk of its own).
REFERENCE_ALIASES: dict[str, str] = {"parse_rfc3339_ns": "time.parse_rfc3339_ns", "date": "time.date"}


def lookup(name: str) -> Builtin | None:
    return BUILTINS.get(name) or BUILTINS.get(REFERENCE_ALIASES.get(name, ""))


def missing(names: list[str]) -> list[str]:
    """The names a module needs that no implementation exists for."""
    return [name for name in names if lookup(name) is None]


def implemented_names() -> list[str]:
    return sorted([*BUILTINS, *REFERENCE_ALIASES])
