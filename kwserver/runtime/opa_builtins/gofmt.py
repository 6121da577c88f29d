"""Go's `fmt.Sprintf`, as OPA's `sprintf` builtin uses it.

OPA converts each argument before formatting: integral numbers become Go `int` (or `*big.Int`
past 64 bits), other numbers `float64`, strings `string`, and every other value (booleans, null,
arrays, objects) its Rego text (`["a", 1]`, `{"k": true}`), which `%v`/`%s` print as is. The
formatting below follows Go's verbs, flags, widths, precisions, argument indexes and its in-band
error notation (`%!d(string=x)`, `%!v(MISSING)`, `%!(EXTRA int=1)`, `%!(NOVERB)`).
"""

from __future__ import annotations

import decimal
import unicodedata
from dataclasses import dataclass
from typing import Any

_INT64_MIN, _INT64_MAX = -(1 << 63), (1 << 63) - 1


@dataclass(frozen=True)
class _RegoText:
    """A non-scalar value, already rendered as Rego text (Go sees it as a string)."""

    text: str


def go_quote(text: str, ascii_only: bool = False) -> str:
    """strconv.Quote (QuoteToASCII when `ascii_only`)."""
    out = ['"']
    for ch in text:
        code = ord(ch)
        if ch == '"':
            out.append('\\"')
        elif ch == "\\":
            out.append("\\\\")
        elif ch in _ESCAPES:
            out.append(_ESCAPES[ch])
        elif code < 0x20 or code == 0x7F:
            out.append(f"\\x{code:02x}")
        elif code < 0x80 or (not ascii_only and _printable(ch)):
            out.append(ch)
        elif code < 0x10000:
            out.append(f"\\u{code:04x}")
        else:
            out.append(f"\\U{code:08x}")
    out.append('"')
    return "".join(out)


_ESCAPES = {"\a": "\\a", "\b": "\\b", "\f": "\\f", "\n": "\\n", "\r": "\\r", "\t": "\\t", "\v": "\\v"}


def _printable(ch: str) -> bool:
    return unicodedata.category(ch)[0] not in ("C", "Z") or ch == " "


def rego_text(value: Any) -> str:
    """The Rego (ast.Term) text of a JSON value: what OPA's sprintf formats composite values as."""
    if value is None:
        return "null"
    if value is True:
        return "true"
    if value is False:
        return "false"
    if isinstance(value, str):
        return go_quote(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return _json_float(value)
    if isinstance(value, list):
        return "[" + ", ".join(rego_text(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{go_quote(k)}: {rego_text(v)}" for k, v in sorted(value.items())) + "}"
    return str(value)


def _json_float(value: float) -> str:
    if value.is_integer() and abs(value) < 1e21:
        return str(int(value))
    return repr(value)


def _convert(value: Any) -> Any:
    if isinstance(value, bool) or value is None or isinstance(value, (list, dict)):
        return _RegoText(rego_text(value))
    return value


def _type_name(value: Any) -> str:
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int):
        return "int" if _INT64_MIN <= value <= _INT64_MAX else "*big.Int"
    if isinstance(value, float):
        return "float64"
    return "string"


@dataclass
class _Spec:
    minus: bool = False
    plus: bool = False
    sharp: bool = False
    space: bool = False
    zero: bool = False
    width: int | None = None
    precision: int | None = None


def sprintf(fmt: str, values: list[Any]) -> str:
    args = [_convert(v) for v in values]
    out: list[str] = []
    arg_num = 0
    reordered = False
    i, end = 0, len(fmt)
    while i < end:
        if fmt[i] != "%":
            j = fmt.find("%", i)
            j = end if j < 0 else j
            out.append(fmt[i:j])
            i = j
            continue
        i += 1
        spec = _Spec()
        while i < end and fmt[i] in "+-# 0":
            flag = fmt[i]
            if flag == "+":
                spec.plus = True
            elif flag == "-":
                spec.minus = True
            elif flag == "#":
                spec.sharp = True
            elif flag == " ":
                spec.space = True
            else:
                spec.zero = True
            i += 1
        # argument index, width, precision (each may come from an argument)
        i, arg_num, bad_index, used_index = _arg_index(fmt, i, arg_num, len(args))
        reordered = reordered or used_index
        if i < end and fmt[i] == "*":
            i += 1
            if arg_num < len(args) and isinstance(args[arg_num], int) and not isinstance(args[arg_num], bool):
                spec.width = args[arg_num]
                if spec.width < 0:
                    spec.minus, spec.width = True, -spec.width
            else:
                out.append("%!(BADWIDTH)")
            arg_num += 1
            i, arg_num, bad, used = _arg_index(fmt, i, arg_num, len(args))
            bad_index, reordered = bad_index or bad, reordered or used
        else:
            start = i
            while i < end and fmt[i].isdigit():
                i += 1
            if i > start:
                spec.width = int(fmt[start:i])
        if i < end and fmt[i] == ".":
            i += 1
            i, arg_num, bad, used = _arg_index(fmt, i, arg_num, len(args))
            bad_index, reordered = bad_index or bad, reordered or used
            if i < end and fmt[i] == "*":
                i += 1
                if arg_num < len(args) and isinstance(args[arg_num], int) and args[arg_num] >= 0:
                    spec.precision = args[arg_num]
                else:
                    out.append("%!(BADPREC)")
                arg_num += 1
                i, arg_num, bad, used = _arg_index(fmt, i, arg_num, len(args))
                bad_index, reordered = bad_index or bad, reordered or used
            else:
                start = i
                while i < end and fmt[i].isdigit():
                    i += 1
                spec.precision = int(fmt[start:i]) if i > start else 0
        if i >= end:
            out.append("%!(NOVERB)")
            break
        verb = fmt[i]
        i += 1
        if verb == "%":
            out.append("%")
            continue
        if bad_index:
            out.append(f"%!{verb}(BADINDEX)")
            continue
        if arg_num >= len(args):
            out.append(f"%!{verb}(MISSING)")
            continue
        out.append(_format_one(args[arg_num], verb, spec))
        arg_num += 1
    if not reordered and arg_num < len(args):
        extra = ", ".join(f"{_type_name(a)}={_format_one(a, 'v', _Spec())}" for a in args[arg_num:])
        out.append(f"%!(EXTRA {extra})")
    return "".join(out)


def _arg_index(fmt: str, i: int, arg_num: int, count: int) -> tuple[int, int, bool, bool]:
    """Parse `[n]`; returns (position, argument number, bad index, index used)."""
    if i >= len(fmt) or fmt[i] != "[":
        return i, arg_num, False, False
    close = fmt.find("]", i)
    if close < 0:
        return i + 1, arg_num, True, True
    text = fmt[i + 1:close]
    if not text.isdigit() or not 1 <= int(text) <= count:
        return close + 1, arg_num, True, True
    return close + 1, int(text) - 1, False, True


def _bad_verb(value: Any, verb: str) -> str:
    return f"%!{verb}({_type_name(value)}={_format_one(value, 'v', _Spec())})"


def _format_one(value: Any, verb: str, spec: _Spec) -> str:
    if verb == "T":
        return _pad(_type_name(value), spec, allow_zero=False)
    if isinstance(value, _RegoText):
        value = value.text
    if isinstance(value, str):
        return _format_string(value, verb, spec)
    if isinstance(value, int):
        return _format_int(value, verb, spec)
    if isinstance(value, float):
        return _format_float(value, verb, spec)
    return _bad_verb(value, verb)


def _pad(text: str, spec: _Spec, *, allow_zero: bool = True) -> str:
    width = spec.width or 0
    length = len(text)
    if length >= width:
        return text
    fill = width - length
    if spec.minus:
        return text + " " * fill
    if spec.zero and allow_zero:
        return "0" * fill + text
    return " " * fill + text


def _format_string(value: str, verb: str, spec: _Spec) -> str:
    if verb in ("v", "s"):
        text = value if spec.precision is None else value[: spec.precision]
        return _pad(text, spec)
    if verb == "q":
        if spec.precision is not None:
            value = value[: spec.precision]
        if spec.sharp and "`" not in value and all(c == "\t" or (ord(c) >= 0x20 and c != "\x7f") for c in value):
            return _pad(f"`{value}`", spec)
        return _pad(go_quote(value, ascii_only=spec.plus), spec)
    if verb in ("x", "X"):
        data = value.encode()
        if spec.precision is not None:
            data = data[: spec.precision]
        digits = "0123456789abcdef" if verb == "x" else "0123456789ABCDEF"
        prefix = ("0x" if verb == "x" else "0X") if spec.sharp else ""
        parts = [prefix + digits[b >> 4] + digits[b & 15] for b in data]
        if spec.space:
            return _pad(" ".join(parts), spec)
        return _pad(prefix + "".join(p[len(prefix):] for p in parts), spec)
    return _bad_verb(value, verb)


def _sign(negative: bool, spec: _Spec) -> str:
    if negative:
        return "-"
    if spec.plus:
        return "+"
    return " " if spec.space else ""


def _format_int(value: int, verb: str, spec: _Spec) -> str:
    negative = value < 0
    magnitude = -value if negative else value
    prefix = ""
    if verb in ("v", "d"):
        digits = str(magnitude)
    elif verb == "b":
        digits, prefix = format(magnitude, "b"), "0b" if spec.sharp else ""
    elif verb == "o":
        digits, prefix = format(magnitude, "o"), "0" if spec.sharp else ""
    elif verb == "O":
        digits, prefix = format(magnitude, "o"), "0o"
    elif verb in ("x", "X"):
        digits = format(magnitude, verb)
        prefix = ("0x" if verb == "x" else "0X") if spec.sharp else ""
    elif verb == "c":
        return _pad(_rune(value), spec, allow_zero=False)
    elif verb == "q":
        return _pad(_quote_rune(value, spec.plus), spec, allow_zero=False)
    elif verb == "U":
        text = f"U+{magnitude:04X}"
        if spec.sharp and 0 <= value <= 0x10FFFF and _printable(chr(value)):
            text += f" '{chr(value)}'"
        return _pad(text, spec, allow_zero=False)
    elif verb in ("e", "E", "f", "F", "g", "G") and not (_INT64_MIN <= value <= _INT64_MAX):
        return _format_float(float(value), verb, spec)  # *big.Int formats as a float
    else:
        return _bad_verb(value, verb)
    if spec.precision is not None:
        if spec.precision == 0 and value == 0:
            digits = ""
        digits = digits.rjust(spec.precision, "0")
    elif spec.zero and not spec.minus and spec.width:
        sign_len = len(_sign(negative, spec)) + len(prefix)
        digits = digits.rjust(spec.width - sign_len, "0")
    if verb == "o" and spec.sharp and digits.startswith("0"):
        prefix = ""
    return _pad(_sign(negative, spec) + prefix + digits, spec, allow_zero=False)


def _rune(value: int) -> str:
    return chr(value) if 0 <= value <= 0x10FFFF and not 0xD800 <= value <= 0xDFFF else "\ufffd"


def _quote_rune(value: int, ascii_only: bool) -> str:
    ch = _rune(value)
    if ch == "'":
        return "'\\''"
    quoted = go_quote(ch, ascii_only)[1:-1]
    return "'" + quoted.replace('\\"', '"') + "'"


def _shortest_digits(value: float) -> tuple[str, int]:
    """Shortest round-trip decimal digits of `value` (>= 0) and the decimal point position."""
    if value == 0:
        return "0", 1
    _, digits, exponent = decimal.Decimal(repr(value)).normalize().as_tuple()
    text = "".join(map(str, digits))
    return text, len(text) + int(exponent)


def _format_float(value: float, verb: str, spec: _Spec) -> str:
    negative = value < 0 or (value == 0 and str(value).startswith("-"))
    magnitude = abs(value)
    if verb in ("v", "g", "G") and spec.precision is None:
        # Go's shortest representation; %e form when the exponent is < -4 or >= 6.
        digits, dp = _shortest_digits(magnitude)
        exp = dp - 1
        if digits != "0" and (exp < -4 or exp >= 6):
            mantissa = digits[0] + ("." + digits[1:] if len(digits) > 1 else "")
            body = f"{mantissa}{'E' if verb == 'G' else 'e'}{'-' if exp < 0 else '+'}{abs(exp):02d}"
        elif dp <= 0:
            body = "0." + "0" * (-dp) + digits
        elif dp >= len(digits):
            body = digits + "0" * (dp - len(digits))
        else:
            body = digits[:dp] + "." + digits[dp:]
    elif verb in ("v", "g", "G"):
        body = format(magnitude, f"{'#' if spec.sharp else ''}.{spec.precision or 1}{'G' if verb == 'G' else 'g'}")
    elif verb in ("e", "E", "f", "F"):
        body = format(magnitude, f".{6 if spec.precision is None else spec.precision}{verb}")
    else:
        return _bad_verb(value, verb)
    sign = _sign(negative, spec)
    if spec.zero and not spec.minus and spec.width:
        body = body.rjust(spec.width - len(sign), "0")
    return _pad(sign + body, spec, allow_zero=False)
