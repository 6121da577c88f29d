"""`trace`, `semver.*` (python-semver), `units.*`, and small collection helpers."""

from __future__ import annotations

import logging
import re
from decimal import Decimal, InvalidOperation
from typing import Any

import semver as _semver

from kwserver.runtime.opa_builtins._common import BuiltinError, array, obj, string

log = logging.getLogger("kwserver.rego.trace")


def trace(note: Any) -> bool:
    log.debug("rego trace: %s", string("trace", 1, note))
    return True


def semver_is_valid(value: Any) -> bool:
    return isinstance(value, str) and _semver.Version.is_valid(value)


def _version(index: int, value: Any) -> Any:
    text = string("semver.compare", index, value)
    try:
        return _semver.Version.parse(text)
    except ValueError as exc:
        raise BuiltinError(f'semver.compare: operand {index}: string "{text}" is not a valid SemVer') from exc


def semver_compare(first: Any, second: Any) -> int:
    return _version(1, first).compare(_version(2, second))


_QUANTITY = re.compile(r"^([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)([a-zA-Z]*)$")
_BYTE_UNITS = {
    "": 1, "k": 10**3, "kb": 10**3, "ki": 2**10, "kib": 2**10, "m": 10**6, "mb": 10**6, "mi": 2**20,
    "mib": 2**20, "g": 10**9, "gb": 10**9, "gi": 2**30, "gib": 2**30, "t": 10**12, "tb": 10**12, "ti": 2**40,
    "tib": 2**40, "p": 10**15, "pb": 10**15, "pi": 2**50, "pib": 2**50, "e": 10**18, "eb": 10**18,
    "ei": 2**60, "eib": 2**60,
}
_SI_UNITS = {
    "": Decimal(1), "m": Decimal("0.001"), "k": Decimal(10**3), "K": Decimal(10**3), "M": Decimal(10**6),
    "G": Decimal(10**9), "T": Decimal(10**12), "P": Decimal(10**15), "E": Decimal(10**18),
    "Ki": Decimal(2**10), "Mi": Decimal(2**20), "Gi": Decimal(2**30), "Ti": Decimal(2**40),
    "Pi": Decimal(2**50), "Ei": Decimal(2**60),
}


def _quantity(name: str, value: Any) -> tuple[Decimal, str]:
    text = string(name, 1, value).replace('"', "").strip()
    found = _QUANTITY.match(text.replace(" ", ""))
    if not found:
        raise BuiltinError(f"{name}: could not parse {name.split('.')[1]} {text!r}")
    try:
        return Decimal(found.group(1)), found.group(2)
    except InvalidOperation as exc:
        raise BuiltinError(f"{name}: could not parse number {found.group(1)!r}") from exc


def units_parse_bytes(value: Any) -> int:
    number, unit = _quantity("units.parse_bytes", value)
    factor = _BYTE_UNITS.get(unit.lower())
    if factor is None:
        raise BuiltinError(f"units.parse_bytes: byte unit {unit} not recognized")
    return int(number * factor)


def units_parse(value: Any) -> int | float:
    number, unit = _quantity("units.parse", value)
    factor = _SI_UNITS.get(unit if unit in ("m", "M") else (unit[:1].upper() + unit[1:].lower()))
    if factor is None:
        raise BuiltinError(f"units.parse: unit {unit} not recognized")
    result = number * factor
    return int(result) if result == result.to_integral_value() else float(result)


def object_keys(value: Any) -> list[str]:
    return sorted(obj("object.keys", 1, value))


def array_reverse(value: Any) -> list[Any]:
    return list(reversed(array("array.reverse", 1, value)))
