"""Shared pieces of the builtin implementations: the error type and operand checks."""

from __future__ import annotations

from typing import Any


class BuiltinError(Exception):
    """A builtin could not compute its result; the evaluation fails with this text."""


def type_name(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


def _fail(name: str, index: int, expected: str, value: Any) -> BuiltinError:
    return BuiltinError(f"{name}: operand {index} must be {expected} but got {type_name(value)}")


def string(name: str, index: int, value: Any) -> str:
    if not isinstance(value, str):
        raise _fail(name, index, "string", value)
    return value


def number(name: str, index: int, value: Any) -> int | float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _fail(name, index, "number", value)
    return value


def integer(name: str, index: int, value: Any) -> int:
    value = number(name, index, value)
    if isinstance(value, float):
        if not value.is_integer():
            raise BuiltinError(f"{name}: operand {index} must be integer number but got floating-point number")
        value = int(value)
    return value


def array(name: str, index: int, value: Any) -> list[Any]:
    if not isinstance(value, list):
        raise _fail(name, index, "array", value)
    return value


def obj(name: str, index: int, value: Any) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise _fail(name, index, "object", value)
    return value


def strings_of(name: str, index: int, value: Any) -> list[str]:
    """A string, or an array/set of strings (sets arrive as JSON arrays)."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return value
    raise _fail(name, index, "string, array or set of strings", value)
