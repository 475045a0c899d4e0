"""A settled response's usage row as the ledger receives it, for the ledger's tests."""

from __future__ import annotations

import time

from relay.access.usage import UsageRow, periods


def usage_row(number: int, *, project_id: str, key_id: str | None, cost_nanos: int) -> UsageRow:
    """Response `resp_<number>`'s row, settled now: one token in, one out, `cost_nanos`."""
    now = time.time()
    return UsageRow(
        created_at=int(now),
        day=periods(now)[0].removeprefix("day:"),
        project_id=project_id,
        key_id=key_id,
        model="m",
        route="m",
        deployment="d",
        response_id=f"resp_{number}",
        status="completed",
        input_tokens=1,
        cached_tokens=0,
        output_tokens=1,
        cost_nanos=cost_nanos,
        latency_ms=1,
        estimated=False,
    )
