"""A response's turn in a conversation: the conversation held while the response runs (a
second response on it meanwhile is a 409), its items as the context, and, when the response
ends completed or incomplete, its input and output items appended in one transaction.
A hold that lapsed (its process stalled past the run lease) and was taken by another response
is not this turn's any more: the response stays as it ended (stored, answered), its items are
not appended, and a warning says so.

The context comes from memory when this process saw the conversation at its current version
(a history per (conversation, version), extended by each turn it ran), else from storage in one
query: a turn costs its new items, not the whole conversation, in storage and in work.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass
from typing import Any

from relay.engine.history import HistoryCache
from relay.errors import InvalidRequest
from relay.ids import looks_like_conversation_id, new_id
from relay.protocol import CreateResponse
from relay.providers.base import History
from relay.storage.conversations import ConversationStore, HoldLost

log = logging.getLogger("relay.conversations")
_APPENDED = ("completed", "incomplete")


def conversation_id(request: CreateResponse) -> str | None:
    """The conversation a request continues, checked; None when it names none."""
    given = request.conversation
    if given is None:
        return None
    found = given if isinstance(given, str) else given.get("id")
    if not isinstance(found, str) or not looks_like_conversation_id(found):
        raise InvalidRequest(
            "Invalid 'conversation': expected a conversation id ('conv_...') or "
            '{"id": "conv_..."}.',
            param="conversation",
        )
    if request.previous_response_id is not None:
        raise InvalidRequest(
            "'conversation' and 'previous_response_id' cannot be used together: a "
            "conversation already holds its context.",
            param="conversation",
        )
    return found


def _key(conversation: str, version: int) -> str:
    return f"{conversation}@{version}"


async def context(store: ConversationStore, tenant: str, conversation: str) -> History:
    """The conversation as a history, without holding it (counting tokens, compacting,
    queueing a background response)."""
    await store.get(tenant, conversation)  # 404 for another tenant's
    return History(await store.items(conversation))


@dataclass(slots=True)
class Turn:
    store: ConversationStore
    cache: HistoryCache
    tenant: str
    conversation: str
    token: str
    version: int
    history: History

    async def end(
        self, response: dict[str, Any], inputs: list[dict[str, Any]], after: History | None
    ) -> None:
        """Release the conversation, appending the turn's items if the response completed
        (or ended incomplete); `after`: the history it then ends with."""
        added = [*inputs, *response["output"]] if response["status"] in _APPENDED else None
        try:
            version = await asyncio.shield(self.store.release(self.conversation, self.token, added))
        except HoldLost:
            log.warning(
                "response %s (%s) not added to conversation %s: its hold lapsed and "
                "another response took the conversation",
                response["id"],
                response["status"],
                self.conversation,
            )
            return
        # Kept when nobody else changed the conversation meanwhile (then it is current).
        if added is not None and after is not None and version == self.version + 1:
            self.cache.put(self.tenant, _key(self.conversation, version), after)

    async def abandon(self) -> None:
        with contextlib.suppress(HoldLost):  # nothing to add: another response holds it
            await asyncio.shield(self.store.release(self.conversation, self.token, None))


async def begin(
    store: ConversationStore, cache: HistoryCache, tenant: str, conversation: str
) -> Turn:
    token = new_id("hold")
    version = await store.hold(tenant, conversation, token)
    history = cache.get(tenant, _key(conversation, version))
    if history is None:
        try:
            history = History(await store.items(conversation))
        except BaseException:
            await store.release(conversation, token, None)
            raise
    return Turn(store, cache, tenant, conversation, token, version, history)
