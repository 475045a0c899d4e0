"""Usage the upstream did not report, counted by Relay.

Every settled response is charged for what it cost, however it ended: a stream cut by a
disconnect or a cancel ends before the upstream's usage arrives, and some servers never
report usage at all (llama-cpp-python's). Then the input is counted as the deployment counts
it (`count_tokens`: the embedded model's tokenizer, the upstream's own count, or an estimate)
and the output generated so far by the model's tokenizer where Relay holds one, else
estimated; the ledger row says it was counted.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import orjson

from relay.providers.base import Provider, ProviderRequest, estimated_tokens

log = logging.getLogger("relay.engine")
# An upstream count (Anthropic's count_tokens, ...) that takes longer is estimated instead:
# the response's end waits for it.
COUNT_TIMEOUT_S = 2.0


def needed(response: dict[str, Any]) -> bool:
    """Whether the upstream left some of the response's usage at 0."""
    usage = response["usage"]
    return not usage["input_tokens"] or not usage["output_tokens"]


async def complete_usage(
    provider: Provider, request: ProviderRequest, response: dict[str, Any]
) -> bool:
    """Fill in the response's usage where the upstream left it at 0 (input; output, when
    there is some); whether anything was counted."""
    usage = response["usage"]
    counted = False
    if not usage["output_tokens"]:
        text = generated_text(response["output"])
        if text:
            usage["output_tokens"] = await _output_tokens(provider, text)
            counted = True
    if not usage["input_tokens"]:
        usage["input_tokens"] = await _input_tokens(provider, request)
        counted = True
    if counted:
        usage["total_tokens"] = usage["input_tokens"] + usage["output_tokens"]
    return counted


async def _input_tokens(provider: Provider, request: ProviderRequest) -> int:
    try:
        return (await asyncio.wait_for(provider.count_tokens(request), COUNT_TIMEOUT_S)).tokens
    except Exception as error:  # a count that fails must not cost the response its charge
        log.info("input tokens estimated: the count failed (%r)", error)
        context = orjson.dumps([request.instructions, request.context(), request.tools])
        return estimated_tokens(context).tokens


async def _output_tokens(provider: Provider, text: str) -> int:
    try:
        return (await provider.count_text(text)).tokens
    except Exception as error:  # as above
        log.info("output tokens estimated: the count failed (%r)", error)
        return estimated_tokens(text).tokens


def generated_text(output: list[dict[str, Any]]) -> str:
    """What the model wrote in `output`: text, refusals, reasoning, tool-call arguments."""
    pieces: list[str] = []
    for item in output:
        for part in (*(item.get("content") or ()), *(item.get("summary") or ())):
            text = part.get("text", part.get("refusal"))
            if isinstance(text, str):
                pieces.append(text)
        for key in ("arguments", "input"):
            value = item.get(key)
            if isinstance(value, str):
                pieces.append(value)
    return "\n".join(pieces)
