"""A deployment's health as this process has seen it: a circuit breaker (cooldown after
repeated failures, then one request let through as a probe) and what its answers measured
(time to the first byte, output tokens a second), which `provider.sort` "latency" and
"throughput" rank by.

Hand-written rather than a circuit-breaker library's: the router never wants a call refused
(a cooling deployment is still tried last, when nothing healthy is left), it wants to know
the state to order by, and the same record carries the measurements; a breaker library would
be a second bookkeeping of the same failures (docs/design.md).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

# How much one new measurement moves the running average.
SMOOTHING = 0.2


@dataclass(slots=True)
class Health:
    cooldown_failures: int = 3
    cooldown_s: float = 30.0
    failures: int = 0  # in a row
    cooling_until: float = 0.0
    probing: bool = False  # a probe is in flight: others keep away until it settles
    latency_s: float | None = None  # time to the first byte, smoothed
    tokens_per_s: float | None = None  # output tokens a second after the first byte, smoothed

    def usable(self, now: float | None = None) -> bool:
        """Not cooling down, or cooled down with no probe in flight."""
        if self.cooling_until == 0.0:
            return True
        now = time.monotonic() if now is None else now
        return now >= self.cooling_until and not self.probing

    def cooling(self, now: float | None = None) -> bool:
        return not self.usable(now)

    def attempt(self) -> None:
        """A request goes to this deployment: past a cooldown, it is the probe."""
        if self.cooling_until and time.monotonic() >= self.cooling_until:
            self.probing = True

    def succeeded(self, latency_s: float) -> None:
        self.failures = 0
        self.cooling_until = 0.0
        self.probing = False
        self.latency_s = _smoothed(self.latency_s, latency_s)

    def failed(self) -> None:
        self.failures += 1
        if self.probing or self.failures >= self.cooldown_failures:
            self.cooling_until = time.monotonic() + self.cooldown_s
        self.probing = False

    def measured_throughput(self, output_tokens: int, seconds: float) -> None:
        if output_tokens > 0 and seconds > 0:
            self.tokens_per_s = _smoothed(self.tokens_per_s, output_tokens / seconds)


def _smoothed(average: float | None, value: float) -> float:
    return value if average is None else average + SMOOTHING * (value - average)
