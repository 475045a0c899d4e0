"""Usage Relay counts itself: a count that fails falls back to the estimate, so the response
is still charged (and settles: billed, stored, logged)."""

from __future__ import annotations

from typing import Any

from relay.engine import counting
from relay.protocol import CreateResponse
from relay.providers.base import ProviderRequest, TokenCount


class BrokenCounts:
    """A provider whose tokenizer fails (the embedded model's can, loading or templating)."""

    async def count_tokens(self, request: ProviderRequest) -> TokenCount:
        raise RuntimeError("the chat template failed")

    async def count_text(self, text: str) -> TokenCount:
        raise RuntimeError("the tokenizer failed")


async def test_a_failing_count_falls_back_to_the_estimate() -> None:
    request = ProviderRequest(
        "m",
        CreateResponse(model="m", input="twelve bytes"),
        None,
        [{"type": "message", "role": "user", "content": "twelve bytes"}],
    )
    output = [{"type": "message", "content": [{"type": "output_text", "text": "eight by"}]}]
    response: dict[str, Any] = {
        "output": output,
        "usage": {"input_tokens": 0, "output_tokens": 0, "total_tokens": 0},
    }
    assert await counting.complete_usage(BrokenCounts(), request, response)  # type: ignore[arg-type]
    usage = response["usage"]
    assert usage["output_tokens"] == 2  # 8 bytes at 4 a token
    assert usage["input_tokens"] > 0
    assert usage["total_tokens"] == usage["input_tokens"] + usage["output_tokens"]
