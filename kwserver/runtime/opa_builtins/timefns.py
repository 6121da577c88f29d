"""The `time.*` builtins, on nanosecond integers as OPA has them.

Times are nanoseconds since the Unix epoch (int64). Builtins that take a time also accept
`[ns, "Zone/Name"]` (`""` or `"UTC"`: UTC, `"Local"`: the server's zone). Layouts are Go reference
layouts (`2006-01-02T15:04:05Z07:00`) or the names of Go's layout constants (`RFC3339`, `ANSIC`...).
Calendar arithmetic is done on proleptic Gregorian day numbers, not `datetime`, so the whole int64
range works and results match Go's normalisation (e.g. `time.add_date` from January 31st).
"""

from __future__ import annotations

import re
import time as _time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from kwserver.runtime.opa_builtins._common import BuiltinError, integer, string

NS = 1_000_000_000
DAY_NS = 86_400 * NS
_INT64_MIN, _INT64_MAX = -(1 << 63), (1 << 63) - 1

_MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September",
           "October", "November", "December"]
_DAYS = ["Sunday", "Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday"]

LAYOUTS = {
    "ANSIC": "Mon Jan _2 15:04:05 2006",
    "UnixDate": "Mon Jan _2 15:04:05 MST 2006",
    "RubyDate": "Mon Jan 02 15:04:05 -0700 2006",
    "RFC822": "02 Jan 06 15:04 MST",
    "RFC822Z": "02 Jan 06 15:04 -0700",
    "RFC850": "Monday, 02-Jan-06 15:04:05 MST",
    "RFC1123": "Mon, 02 Jan 2006 15:04:05 MST",
    "RFC1123Z": "Mon, 02 Jan 2006 15:04:05 -0700",
    "RFC3339": "2006-01-02T15:04:05Z07:00",
    "RFC3339Nano": "2006-01-02T15:04:05.999999999Z07:00",
    "Kitchen": "3:04PM",
    "Stamp": "Jan _2 15:04:05",
    "StampMilli": "Jan _2 15:04:05.000",
    "StampMicro": "Jan _2 15:04:05.000000",
    "StampNano": "Jan _2 15:04:05.000000000",
    "DateTime": "2006-01-02 15:04:05",
    "DateOnly": "2006-01-02",
    "TimeOnly": "15:04:05",
}


# --- calendar arithmetic ----------------------------------------------------------------------------

def days_from_civil(year: int, month: int, day: int) -> int:
    """Days since 1970-01-01 of a proleptic Gregorian date (month 1-12; day may overflow)."""
    year -= month <= 2
    era = year // 400
    yoe = year - era * 400
    doy = (153 * (month + (-3 if month > 2 else 9)) + 2) // 5 + day - 1
    doe = yoe * 365 + yoe // 4 - yoe // 100 + doy
    return era * 146097 + doe - 719468


def civil_from_days(days: int) -> tuple[int, int, int]:
    days += 719468
    era = days // 146097
    doe = days - era * 146097
    yoe = (doe - doe // 1460 + doe // 36524 - doe // 146096) // 365
    doy = doe - (365 * yoe + yoe // 4 - yoe // 100)
    mp = (5 * doy + 2) // 153
    day = doy - (153 * mp + 2) // 5 + 1
    month = mp + (3 if mp < 10 else -9)
    return yoe + era * 400 + (month <= 2), month, day


def _days_in_month(year: int, month: int) -> int:
    return days_from_civil(year + (month == 12), month % 12 + 1, 1) - days_from_civil(year, month, 1)


@dataclass(frozen=True)
class Civil:
    """A time broken down in some zone."""

    year: int
    month: int
    day: int
    hour: int
    minute: int
    second: int
    nanos: int
    weekday: int  # 0 = Sunday
    yday: int
    offset: int  # seconds east of UTC
    zone: str


def _check_range(ns: int, name: str) -> int:
    if not _INT64_MIN <= ns <= _INT64_MAX:
        raise BuiltinError(f"{name}: time outside of valid range")
    return ns


def _zone(name: str) -> Any:
    if name in ("", "UTC"):
        return UTC
    if name == "Local":
        return None
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError) as exc:
        raise BuiltinError(f"unknown time zone {name}") from exc


def _offset(ns: int, zone: Any) -> tuple[int, str]:
    if zone is UTC:
        return 0, "UTC"
    seconds = ns // NS
    if zone is None:
        local = _time.localtime(max(min(seconds, 253402300799), -62135596800))
        return local.tm_gmtoff, local.tm_zone
    clamped = max(min(seconds, 253402300799 - 86400), -62135596800 + 86400)
    moment = datetime.fromtimestamp(clamped, UTC).astimezone(zone)
    return int(moment.utcoffset().total_seconds()), moment.tzname() or ""


def breakdown(ns: int, zone: Any = UTC) -> Civil:
    offset, zone_name = _offset(ns, zone)
    local = ns + offset * NS
    days, rem = divmod(local, DAY_NS)
    year, month, day = civil_from_days(days)
    seconds, nanos = divmod(rem, NS)
    return Civil(year, month, day, seconds // 3600, seconds // 60 % 60, seconds % 60, nanos,
                 (days + 4) % 7, days - days_from_civil(year, 1, 1) + 1, offset, zone_name)


def _time_operand(name: str, value: Any) -> tuple[int, Any, str | None]:
    """`ns`, `[ns, tz]` or `[ns, tz, layout]` → (ns, zone, layout)."""
    if isinstance(value, list):
        if not 1 <= len(value) <= 3:
            raise BuiltinError(f"{name}: array argument must have 2 or 3 elements")
        ns = integer(name, 1, value[0])
        zone = _zone(string(name, 1, value[1])) if len(value) > 1 else UTC
        layout = string(name, 1, value[2]) if len(value) > 2 else None
        return ns, zone, layout
    return integer(name, 1, value), UTC, None


# --- builtins ------------------------------------------------------------------------------------------

def now_ns() -> int:
    return _time.time_ns()


_RFC3339 = re.compile(
    r"(\d{4})-(\d{2})-(\d{2})[Tt](\d{2}):(\d{2}):(\d{2})(?:[.,](\d{1,9}))?(?:([Zz])|([+-])(\d{2}):(\d{2}))"
)


def parse_rfc3339_ns(value: Any) -> int:
    text = string("time.parse_rfc3339_ns", 1, value)
    found = _RFC3339.fullmatch(text)
    if not found:
        raise BuiltinError(f'time.parse_rfc3339_ns: parsing time "{text}" as RFC3339: cannot parse')
    year, month, day, hour, minute, second = (int(found.group(i)) for i in range(1, 7))
    nanos = int((found.group(7) or "").ljust(9, "0"))
    offset = 0
    if found.group(9):
        offset = (int(found.group(10)) * 60 + int(found.group(11))) * 60 * (1 if found.group(9) == "+" else -1)
    return _to_ns("time.parse_rfc3339_ns", year, month, day, hour, minute, second, nanos, offset)


def _to_ns(name: str, year: int, month: int, day: int, hour: int, minute: int, second: int, nanos: int,
           offset: int) -> int:
    if not 1 <= month <= 12:
        raise BuiltinError(f"{name}: month out of range")
    if not 1 <= day <= _days_in_month(year, month):
        raise BuiltinError(f"{name}: day out of range")
    if hour > 23 or minute > 59 or second > 59:
        raise BuiltinError(f"{name}: time out of range")
    seconds = days_from_civil(year, month, day) * 86400 + hour * 3600 + minute * 60 + second - offset
    return _check_range(seconds * NS + nanos, name)


def date(value: Any) -> list[int]:
    ns, zone, _ = _time_operand("time.date", value)
    civil = breakdown(ns, zone)
    return [civil.year, civil.month, civil.day]


def clock(value: Any) -> list[int]:
    ns, zone, _ = _time_operand("time.clock", value)
    civil = breakdown(ns, zone)
    return [civil.hour, civil.minute, civil.second]


def weekday(value: Any) -> str:
    ns, zone, _ = _time_operand("time.weekday", value)
    return _DAYS[breakdown(ns, zone).weekday]


def add_date(value: Any, years: Any, months: Any, days: Any) -> int:
    ns = integer("time.add_date", 1, value)
    civil = breakdown(ns)
    month0 = civil.month - 1 + integer("time.add_date", 3, months)
    year = civil.year + integer("time.add_date", 2, years) + month0 // 12
    day_number = days_from_civil(year, month0 % 12 + 1, 1) + civil.day - 1 + integer("time.add_date", 4, days)
    seconds = day_number * 86400 + civil.hour * 3600 + civil.minute * 60 + civil.second
    return _check_range(seconds * NS + civil.nanos, "time.add_date")


def diff(first: Any, second: Any) -> list[int]:
    ns1, zone1, _ = _time_operand("time.diff", first)
    ns2, _, _ = _time_operand("time.diff", second)
    if ns1 > ns2:
        ns1, ns2 = ns2, ns1
    a, b = breakdown(ns1, zone1), breakdown(ns2, zone1)
    year, month, day = b.year - a.year, b.month - a.month, b.day - a.day
    hour, minute, sec = b.hour - a.hour, b.minute - a.minute, b.second - a.second
    if sec < 0:
        sec, minute = sec + 60, minute - 1
    if minute < 0:
        minute, hour = minute + 60, hour - 1
    if hour < 0:
        hour, day = hour + 24, day - 1
    if day < 0:
        day += _days_in_month(a.year, a.month)
        month -= 1
    if month < 0:
        month, year = month + 12, year - 1
    return [year, month, day, hour, minute, sec]


_DURATION_UNITS = {"ns": 1, "us": 1_000, "µs": 1_000, "μs": 1_000, "ms": 1_000_000, "s": NS, "m": 60 * NS,
                   "h": 3600 * NS}
_DURATION_PART = re.compile(r"(\d*)(?:\.(\d*))?([^\d.]+)")


def parse_duration_ns(value: Any) -> int:
    text = string("time.parse_duration_ns", 1, value)
    body, sign = text, 1
    if body[:1] in ("+", "-"):
        sign, body = (-1 if body[0] == "-" else 1), body[1:]
    if body == "0":
        return 0
    if not body:
        raise BuiltinError(f'time.parse_duration_ns: time: invalid duration "{text}"')
    total, pos = 0, 0
    while pos < len(body):
        part = _DURATION_PART.match(body, pos)
        if not part or (not part.group(1) and not part.group(2)):
            raise BuiltinError(f'time.parse_duration_ns: time: invalid duration "{text}"')
        unit = _DURATION_UNITS.get(part.group(3))
        if unit is None:
            raise BuiltinError(f'time.parse_duration_ns: time: unknown unit "{part.group(3)}" in duration "{text}"')
        whole = int(part.group(1) or "0")
        frac = part.group(2) or ""
        total += whole * unit + (int(frac) * unit // 10 ** len(frac) if frac else 0)
        pos = part.end()
    if total > _INT64_MAX + (sign < 0):
        raise BuiltinError(f'time.parse_duration_ns: time: invalid duration "{text}"')
    return sign * total


# --- Go layouts ------------------------------------------------------------------------------------------

_TOKENS = [
    "January", "Jan", "Monday", "Mon", "MST",
    "Z07:00:00", "Z070000", "Z07:00", "Z0700", "Z07",
    "-07:00:00", "-070000", "-07:00", "-0700", "-07",
    "2006", "002", "__2", "_2", "01", "02", "03", "04", "05", "06", "15", "1", "2", "3", "4", "5", "PM", "pm",
]
_FRACTION = re.compile(r"[.,](0+|9+)(?!\d)")


def layout_tokens(layout: str) -> list[tuple[str, str]]:
    """Split a Go layout into ("std", token) and ("lit", text) parts, as Go's nextStdChunk does."""
    parts: list[tuple[str, str]] = []
    literal: list[str] = []
    i = 0
    while i < len(layout):
        fraction = _FRACTION.match(layout, i)
        token = fraction.group(0) if fraction else next((t for t in _TOKENS if layout.startswith(t, i)), None)
        if token is None:
            literal.append(layout[i])
            i += 1
            continue
        if literal:
            parts.append(("lit", "".join(literal)))
            literal = []
        parts.append(("std", token))
        i += len(token)
    if literal:
        parts.append(("lit", "".join(literal)))
    return parts


def _frac_digits(nanos: int, token: str) -> str:
    digits = f"{nanos:09d}"[: len(token) - 1]
    if token[1] == "9":
        digits = digits.rstrip("0")
        return (token[0] + digits) if digits else ""
    return token[0] + digits


def _tz_text(offset: int, token: str) -> str:
    if token.startswith("Z") and offset == 0:
        return "Z"
    sign = "-" if offset < 0 else "+"
    offset = abs(offset)
    hh, mm, ss = offset // 3600, offset // 60 % 60, offset % 60
    body = token[1:]
    if body == "07":
        return f"{sign}{hh:02d}"
    if body == "0700":
        return f"{sign}{hh:02d}{mm:02d}"
    if body == "07:00":
        return f"{sign}{hh:02d}:{mm:02d}"
    if body == "070000":
        return f"{sign}{hh:02d}{mm:02d}{ss:02d}"
    return f"{sign}{hh:02d}:{mm:02d}:{ss:02d}"


def format_civil(civil: Civil, layout: str) -> str:
    out = []
    for kind, token in layout_tokens(layout):
        if kind == "lit":
            out.append(token)
            continue
        hour12 = civil.hour % 12 or 12
        simple = {
            "January": _MONTHS[civil.month - 1], "Jan": _MONTHS[civil.month - 1][:3],
            "Monday": _DAYS[civil.weekday], "Mon": _DAYS[civil.weekday][:3],
            "2006": f"{civil.year:04d}", "06": f"{civil.year % 100:02d}",
            "01": f"{civil.month:02d}", "1": str(civil.month),
            "02": f"{civil.day:02d}", "2": str(civil.day), "_2": f"{civil.day:>2d}",
            "002": f"{civil.yday:03d}", "__2": f"{civil.yday:>3d}",
            "15": f"{civil.hour:02d}", "03": f"{hour12:02d}", "3": str(hour12),
            "04": f"{civil.minute:02d}", "4": str(civil.minute),
            "05": f"{civil.second:02d}", "5": str(civil.second),
            "PM": "PM" if civil.hour >= 12 else "AM", "pm": "pm" if civil.hour >= 12 else "am",
            "MST": civil.zone or _tz_text(civil.offset, "-0700"),
        }
        if token in simple:
            out.append(simple[token])
        elif token[0] in ".,":
            out.append(_frac_digits(civil.nanos, token))
        else:
            out.append(_tz_text(civil.offset, token))
    return "".join(out)


def format_time(value: Any) -> str:
    ns, zone, layout = _time_operand("time.format", value)
    layout = LAYOUTS.get(layout, layout) if layout else LAYOUTS["RFC3339Nano"]
    return format_civil(breakdown(ns, zone), layout)


def parse_ns(layout: Any, value: Any) -> int:
    name = "time.parse_ns"
    layout_text = string(name, 1, layout)
    layout_text = LAYOUTS.get(layout_text, layout_text)
    text = string(name, 2, value)
    fields = {"year": 1, "month": 1, "day": 1, "hour": 0, "minute": 0, "second": 0, "nanos": 0, "offset": 0}
    pm: bool | None = None
    yday = None
    pos = 0

    def fail(detail: str = "cannot parse") -> BuiltinError:
        return BuiltinError(f'{name}: parsing time "{text}" as "{layout_text}": {detail}')

    def number(min_len: int, max_len: int) -> int:
        nonlocal pos
        found = re.compile(rf"\d{{{min_len},{max_len}}}").match(text, pos)
        if not found:
            raise fail()
        pos = found.end()
        return int(found.group(0))

    tokens = layout_tokens(layout_text)
    for index, (kind, token) in enumerate(tokens):
        if kind == "lit":
            if not text.startswith(token, pos):
                raise fail()
            pos += len(token)
            continue
        if token in ("January", "Jan", "Monday", "Mon"):
            names = _MONTHS if token.startswith("J") else _DAYS
            width = None if token in ("January", "Monday") else 3
            for i, full in enumerate(names):
                candidate = full if width is None else full[:3]
                if text[pos:pos + len(candidate)].lower() == candidate.lower():
                    pos += len(candidate)
                    if names is _MONTHS:
                        fields["month"] = i + 1
                    break
            else:
                raise fail()
        elif token == "2006":
            fields["year"] = number(4, 4)
        elif token == "06":
            year = number(2, 2)
            fields["year"] = year + (1900 if year >= 69 else 2000)
        elif token in ("01", "1"):
            fields["month"] = number(2 if token == "01" else 1, 2)
        elif token in ("02", "2", "_2"):
            if token == "_2" and text[pos:pos + 1] == " ":
                pos += 1
            fields["day"] = number(2 if token == "02" else 1, 2)
        elif token in ("002", "__2"):
            while token == "__2" and text[pos:pos + 1] == " ":
                pos += 1
            yday = number(3 if token == "002" else 1, 3)
        elif token in ("15", "03", "3"):
            fields["hour"] = number(2 if token != "3" else 1, 2)
        elif token in ("04", "4"):
            fields["minute"] = number(2 if token == "04" else 1, 2)
        elif token in ("05", "5"):
            fields["second"] = number(2 if token == "05" else 1, 2)
            following = tokens[index + 1] if index + 1 < len(tokens) else None
            extra = re.compile(r"[.,](\d+)").match(text, pos)
            if extra and not (following and following[0] == "std" and following[1][0] in ".,"):
                fields["nanos"] = int(extra.group(1)[:9].ljust(9, "0"))
                pos = extra.end()
        elif token in ("PM", "pm"):
            marker = text[pos:pos + 2].upper()
            if marker not in ("AM", "PM"):
                raise fail()
            pm = marker == "PM"
            pos += 2
        elif token[0] in ".,":
            found = re.compile(r"[.,](\d+)" if token[1] == "9" else rf"[.,](\d{{{len(token) - 1}}})").match(
                text, pos)
            if found:
                fields["nanos"] = int(found.group(1)[:9].ljust(9, "0"))
                pos = found.end()
            elif token[1] == "0":
                raise fail()
        elif token == "MST":
            found = re.compile(r"[A-Z]{3,5}|[+-]\d+").match(text, pos)
            if not found:
                raise fail()
            pos = found.end()
        else:  # numeric zone offsets
            if token.startswith("Z") and text[pos:pos + 1] == "Z":
                pos += 1
                continue
            found = re.compile(r"([+-])(\d{2}):?(\d{2})?:?(\d{2})?").match(text, pos)
            if not found:
                raise fail()
            pos = found.end()
            hh, mm, ss = (int(found.group(i) or 0) for i in (2, 3, 4))
            fields["offset"] = (hh * 3600 + mm * 60 + ss) * (-1 if found.group(1) == "-" else 1)
    if pos != len(text):
        raise fail(f'extra text: "{text[pos:]}"')
    if pm is not None:
        if fields["hour"] > 12:
            raise fail("hour out of range")
        fields["hour"] = fields["hour"] % 12 + (12 if pm else 0)
    if yday is not None:
        month_day = civil_from_days(days_from_civil(fields["year"], 1, 1) + yday - 1)
        fields["month"], fields["day"] = month_day[1], month_day[2]
    return _to_ns(name, fields["year"], fields["month"], fields["day"], fields["hour"], fields["minute"],
                  fields["second"], fields["nanos"], fields["offset"])
