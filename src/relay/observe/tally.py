"""Counts added up in plain Python where requests are served, handed to prometheus_client
now and then.

Each prometheus_client update takes a lock and, with several workers, writes to a
memory-mapped file: the dozen series a response updates cost about 25 us of CPU a request
(45 us in multiprocess mode), half the budget the gateway benchmark allows all of
observability. A tally adds in place, on the event loop's thread only (no lock), and `flush`
hands what it added up to its series: every second (the metrics' sampling task), before this
process's registry is exposed, and at shutdown. What a process killed outright had not
flushed (a second's worth at most) is lost; a scrape may see other workers' counts up to a
second late.

A histogram's tally goes into its series' bucket and sum values directly: prometheus_client
has no public way to add many observations at once. Those values (`_buckets`, `_sum`) have
been its histograms' since its first releases; tests/test_metrics.py reads the exposition
after real traffic, so a change there fails loudly.
"""

from __future__ import annotations

from bisect import bisect_left
from typing import Any, TypeVar


class CounterTally:
    __slots__ = ("_series", "pending")

    def __init__(self, series: Any) -> None:
        self._series = series
        self.pending = 0.0

    def inc(self, amount: float = 1.0) -> None:
        self.pending += amount

    def flush(self) -> None:
        if self.pending:
            self._series.inc(self.pending)
            self.pending = 0.0


class HistogramTally:
    __slots__ = ("_bounds", "_counts", "_observed", "_series", "_sum")

    def __init__(self, series: Any) -> None:
        self._series = series
        self._bounds: list[float] = list(series._upper_bounds)  # +Inf last
        self._counts = [0] * len(self._bounds)
        self._sum = 0.0
        self._observed = False

    def observe(self, value: float) -> None:
        # The first bucket whose bound is at least the value, as prometheus_client counts.
        self._counts[bisect_left(self._bounds, value)] += 1
        self._sum += value
        self._observed = True

    def flush(self) -> None:
        if not self._observed:
            return
        buckets = self._series._buckets
        for index, count in enumerate(self._counts):
            if count:
                buckets[index].inc(count)
                self._counts[index] = 0
        self._series._sum.inc(self._sum)
        self._sum = 0.0
        self._observed = False


T = TypeVar("T", CounterTally, HistogramTally)


class Tallies:
    """The tallies of one application's series, one per series, flushed together."""

    def __init__(self) -> None:
        self._by_series: dict[int, CounterTally | HistogramTally] = {}

    def counter(self, series: Any) -> CounterTally:
        """The tally of a counter's series (`Counter.labels(...)`)."""
        return self._of(series, CounterTally)

    def histogram(self, series: Any) -> HistogramTally:
        """The tally of a histogram's series (`Histogram.labels(...)`)."""
        return self._of(series, HistogramTally)

    def _of(self, series: Any, kind: type[T]) -> T:
        tally = self._by_series.get(id(series))
        if tally is None:
            tally = self._by_series[id(series)] = kind(series)
        assert isinstance(tally, kind)
        return tally

    def flush(self) -> None:
        for tally in self._by_series.values():
            tally.flush()
