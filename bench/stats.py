"""Small statistics for benchmark figures: medians and spread, ratios to a baseline, linear fits.

Pure functions over numbers (no numpy: the harness must work without the optional `bench` extra).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Spread:
    """Median and range of repeated measurements of one figure."""

    median: float
    low: float
    high: float
    n: int

    @property
    def relative(self) -> float:
        """Half the range as a fraction of the median (0 for a single value)."""
        if self.n < 2 or not self.median:
            return 0.0
        return (self.high - self.low) / 2 / abs(self.median)

    def to_json(self) -> dict[str, float]:
        return {"median": self.median, "low": self.low, "high": self.high, "n": self.n}


def spread(values: Sequence[float]) -> Spread:
    values = [v for v in values if v is not None and not math.isnan(v)]
    if not values:
        return Spread(math.nan, math.nan, math.nan, 0)
    return Spread(statistics.median(values), min(values), max(values), len(values))


def ratio(value: float, baseline: float) -> float:
    """value / baseline; NaN when the baseline is zero or missing."""
    if baseline is None or value is None or not baseline or math.isnan(baseline) or math.isnan(value):
        return math.nan
    return value / baseline


def paired_ratios(values: Sequence[float], baselines: Sequence[float]) -> Spread:
    """Ratios of measurements to the baseline measured in the same repeat, as median and range.

    Repeats are interleaved (baseline, candidate, baseline, candidate, ...), so pairing them by repeat
    index cancels slow drifts of the machine (another build on the shared cores, thermal throttling).
    """
    pairs = [ratio(v, b) for v, b in zip(values, baselines, strict=False)]
    return spread(pairs)


@dataclass(frozen=True)
class LinearFit:
    slope: float
    intercept: float
    r2: float
    n: int

    def at(self, x: float) -> float:
        return self.intercept + self.slope * x

    def to_json(self) -> dict[str, float]:
        return {"slope": self.slope, "intercept": self.intercept, "r2": self.r2, "n": self.n}


def linear_fit(xs: Sequence[float], ys: Sequence[float]) -> LinearFit:
    """Ordinary least squares y = intercept + slope * x."""
    if len(xs) != len(ys):
        raise ValueError("xs and ys differ in length")
    n = len(xs)
    if n < 2:
        return LinearFit(math.nan, ys[0] if ys else math.nan, math.nan, n)
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    if sxx == 0:
        return LinearFit(math.nan, my, math.nan, n)
    sxy = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True))
    slope = sxy / sxx
    intercept = my - slope * mx
    ss_tot = sum((y - my) ** 2 for y in ys)
    ss_res = sum((y - (intercept + slope * x)) ** 2 for x, y in zip(xs, ys, strict=True))
    r2 = 1.0 - ss_res / ss_tot if ss_tot else 1.0
    return LinearFit(slope, intercept, r2, n)


def fmt(value: float | None, digits: int = 0, unit: str = "") -> str:
    """A number for a markdown table: thousands separators, `n/a` for missing values."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:,.{digits}f}{unit}"


def fmt_spread(s: Spread, digits: int = 0, unit: str = "") -> str:
    if s.n == 0:
        return "n/a"
    if s.n == 1:
        return fmt(s.median, digits, unit)
    return f"{fmt(s.median, digits, unit)} ({fmt(s.low, digits)}-{fmt(s.high, digits)})"


def fmt_ratio(s: Spread | float) -> str:
    if isinstance(s, Spread):
        if s.n == 0 or math.isnan(s.median):
            return "n/a"
        if s.n == 1:
            return f"{s.median:.2f}x"
        return f"{s.median:.2f}x ({s.low:.2f}-{s.high:.2f})"
    return "n/a" if s is None or math.isnan(s) else f"{s:.2f}x"
