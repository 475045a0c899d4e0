"""Bar charts drawn by the server as SVG: usage over time from the usage report (GET
/admin/v1/usage), stacked by series. No script draws them, so the Content-Security-Policy
stays `script-src 'self'` with nothing to allow, and a chart is readable without scripts
or sight: each bar has a title, and each chart a table of its numbers (`Chart.rows`)."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from relay.access.usage import HOUR_S, hour_name

Bucket = Literal["day", "hour"]
# The windows a chart may show (the last hours up to now), and the bucket each is shown by
# unless another is asked for. By hour, at most a week: longer makes bars too thin to read.
WINDOWS: dict[str, int] = {"24h": 24, "48h": 48, "7d": 7 * 24, "14d": 14 * 24, "30d": 30 * 24}
MOST_HOURS = 7 * 24
WIDTH, HEIGHT = 720.0, 140.0
_GAP = 0.2  # of a bar's slot, left empty between bars


@dataclass(frozen=True, slots=True)
class Rect:
    x: float
    y: float
    width: float
    height: float
    series: str  # its series' name, a class the stylesheet colours
    title: str


@dataclass(frozen=True, slots=True)
class Chart:
    title: str
    series: tuple[str, ...]
    rects: tuple[Rect, ...]
    ticks: tuple[tuple[float, str], ...]  # (x, label) under some bars
    top: str  # the tallest bar's total, as the axis says it
    total: str
    rows: tuple[tuple[str, tuple[str, ...]], ...]  # each bucket with a value: its name, values
    width: float = WIDTH
    height: float = HEIGHT


def buckets(by: Bucket, hours: int, now: float) -> list[str]:
    """The days or hours of the last `hours` up to `now`, oldest first, named as the usage
    report names them."""
    if by == "day":
        days = max(1, hours // 24)
        return [time.strftime("%Y-%m-%d", time.gmtime(now - 86400 * ago)) for ago in range(days)][
            ::-1
        ]
    hour = int(now) - int(now) % HOUR_S
    return [hour_name(hour - HOUR_S * ago) for ago in range(hours)][::-1]


def stacked(
    title: str,
    names: list[str],
    series: dict[str, dict[str, float]],
    say: Callable[[float], str],
) -> Chart:
    """A bar per bucket of `names`, each the stack of `series` (series -> bucket -> value,
    a missing bucket 0); `say` writes a value as the chart shows it."""
    labels = tuple(series)
    totals = [sum(values.get(name, 0.0) for values in series.values()) for name in names]
    top = max(totals, default=0.0)
    slot = WIDTH / max(1, len(names))
    rects = []
    for index, name in enumerate(names):
        y = HEIGHT
        for label in labels:
            value = series[label].get(name, 0.0)
            if value <= 0 or top <= 0:
                continue
            height = HEIGHT * value / top
            y -= height
            title_text = f"{name}: {say(value)} {label}"
            rects.append(Rect(index * slot, y, slot * (1 - _GAP), height, label, title_text))
    step = max(1, len(names) // 6)
    ticks = tuple(
        (index * slot, _short(name)) for index, name in enumerate(names) if index % step == 0
    )
    rows = tuple(
        (name, tuple(say(series[label].get(name, 0.0)) for label in labels))
        for name, total in zip(names, totals, strict=True)
        if total > 0
    )
    return Chart(title, labels, tuple(rects), ticks, say(top), say(sum(totals)), rows)


def _short(name: str) -> str:
    """A bucket's name under its bar: 12-06 for a day, 12-06 09h for an hour."""
    return name[5:10] + (f" {name[11:13]}h" if "T" in name else "")


def by_bucket(
    report: list[dict[str, Any]], bucket: Bucket, split: str | None, field: str
) -> dict[str, dict[str, float]]:
    """`field` of a usage report grouped by `bucket` (and `split`, each value a series)."""
    series: dict[str, dict[str, float]] = {}
    for entry in report:
        name = str(entry[split]) if split is not None else field
        values = series.setdefault(name, {})
        values[entry[bucket]] = values.get(entry[bucket], 0.0) + float(entry[field])
    return series
