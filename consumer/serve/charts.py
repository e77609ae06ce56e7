"""The sends-per-minute chart, laid out here and drawn as inline SVG by the template (pure).

No JavaScript library and no network: the server computes each bar's geometry, the page
shows it at once, and it prints and scales like any SVG.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import date, datetime, timedelta

WIDTH, HEIGHT = 1200, 220
PAD_LEFT, PAD_RIGHT, PAD_BOTTOM, PAD_TOP = 40, 24, 24, 10


@dataclass(frozen=True)
class Bar:
    x: float
    y: float
    width: float
    height: float
    minute: datetime
    count: float  # messages, or money (spend_chart)


@dataclass(frozen=True)
class Tick:
    y: float
    label: str


@dataclass(frozen=True)
class TimeLabel:
    x: float
    label: str


@dataclass(frozen=True)
class BarChart:
    bars: list[Bar]
    ticks: list[Tick]
    time_labels: list[TimeLabel]
    total: float
    peak: float
    width: int = WIDTH
    height: int = HEIGHT
    baseline: float = HEIGHT - PAD_BOTTOM
    left: float = PAD_LEFT
    right: float = WIDTH - PAD_RIGHT


def per_minute(rows: list[tuple[datetime, int]], last_minute: datetime,
               minutes: int = 60) -> list[tuple[datetime, int]]:
    """One (minute, count) per minute ending at `last_minute`, zeros where nothing was sent."""
    counts = dict(rows)
    first = last_minute - timedelta(minutes=minutes - 1)
    return [(first + timedelta(minutes=i), counts.get(first + timedelta(minutes=i), 0))
            for i in range(minutes)]


def nice_ceiling(value: float) -> float:
    """The smallest of ... 0.1, 0.2, 0.5, 1, 2, 5, 10, 20 ... at least `value` (an axis's
    maximum; 1 for nothing at all)."""
    if value <= 0:
        return 1
    magnitude = 10 ** math.floor(math.log10(value))
    return next(step * magnitude for step in (1, 2, 5, 10) if step * magnitude >= value)


def bar_chart(series: list[tuple[datetime, int]]) -> BarChart:
    """Sends per minute."""
    return _chart(series, lambda top: _short(round(top)), "%H:%M", label_every=10)


def _chart(series: Sequence[tuple[datetime, float]], tick_label: Callable[[float], str],
           time_format: str, label_every: int) -> BarChart:
    peak = max((value for _, value in series), default=0)
    top = nice_ceiling(peak)
    plot_height = HEIGHT - PAD_BOTTOM - PAD_TOP
    slot = (WIDTH - PAD_LEFT - PAD_RIGHT) / max(len(series), 1)
    bars = []
    for i, (moment, value) in enumerate(series):
        height = plot_height * value / top
        bars.append(Bar(x=PAD_LEFT + i * slot + slot * 0.1, y=HEIGHT - PAD_BOTTOM - height,
                        width=slot * 0.8, height=height, minute=moment, count=value))
    ticks = [Tick(y=HEIGHT - PAD_BOTTOM - plot_height * part, label=tick_label(top * part))
             for part in (0, 0.5, 1)]
    time_labels = [TimeLabel(x=PAD_LEFT + i * slot + slot / 2, label=moment.strftime(time_format))
                   for i, (moment, _) in enumerate(series)
                   if i % label_every == 0 or i == len(series) - 1]
    return BarChart(bars=bars, ticks=ticks, time_labels=time_labels,
                    total=sum(value for _, value in series), peak=peak)


def _short(value: int) -> str:
    if value >= 10_000:
        return f"{value / 1000:.0f}k"
    return str(value)


# -- spend per day ---------------------------------------------------------------------------


def per_day(rows: list[tuple[date, float]], last_day: date,
            days: int = 30) -> list[tuple[date, float]]:
    """One (day, amount) per day ending at `last_day`, zeros where nothing was spent."""
    amounts = dict(rows)
    first = last_day - timedelta(days=days - 1)
    return [(first + timedelta(days=i), amounts.get(first + timedelta(days=i), 0.0))
            for i in range(days)]


def spend_chart(series: list[tuple[date, float]]) -> BarChart:
    """Bars of money per day; `count` holds the amount, `minute` the day (as a datetime)."""
    return _chart([(datetime(day.year, day.month, day.day), amount) for day, amount in series],
                  lambda top: f"{top:g}", "%d %b", label_every=5)
