"""A request's `prompt`: the project's template version it names, rendered with the
request's variables (relay.models.prompts) and joined to the request.

The template's instructions come first and the request's own `instructions` after them (a
blank line between): the template is the application's standing prompt, and a request adds
to it rather than replacing it, its more specific words last. The template's messages come
before the request's input, as input items of this response: the upstream reads them, and
they are stored with the response's input, so that a chain continued from it (by
previous_response_id or a conversation) keeps them, while instructions, as always, are not
inherited. The response echoes `prompt` with the version used, and the combined
instructions.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from typing import Any

from relay.engine.context import parse_items
from relay.errors import InvalidRequest
from relay.models.prompts import Template, render
from relay.protocol import CreateResponse
from relay.storage import prompts as stored
from relay.storage.database import Database

# Versions kept in memory, least recently used out first (a version holds at most
# relay.models.prompts.MAX_TEMPLATE_BYTES of JSON).
_VERSIONS_BYTES = 16 * 1024 * 1024
_HEADS = 10_000  # templates whose latest version and archival a process remembers


class PromptTemplates:
    """The templates requests name, read through two caches. A version never changes, so one
    read is kept for as long as there is room; which version is the latest, and whether the
    template is archived, is trusted for `latest_s` (`key_cache_s`, as keys and projects
    are), so a new version or an archival reaches every instance within that time (this
    process forgets at once when the change is made through its admin API)."""

    def __init__(self, db: Database, latest_s: float) -> None:
        self.db = db
        self.latest_s = latest_s
        self._heads: dict[tuple[str, str], tuple[float, int, bool]] = {}
        self._versions: OrderedDict[tuple[str, str, int], Template] = OrderedDict()
        self._bytes = 0

    async def find(self, tenant: str, prompt_id: str, version: str | None) -> Template:
        """The tenant's template version (the latest when `version` is None); a 404 for one
        the tenant does not have, whoever else does, and a 400 for an archived template."""
        latest, archived = await self._head(tenant, prompt_id)
        if archived:
            raise stored.archived(prompt_id, "prompt.id")
        number = latest if version is None else stored.version_number(version)
        if number is None:
            raise stored.no_version(prompt_id, version or "", "prompt.version")
        key = (tenant, prompt_id, number)
        template = self._versions.get(key)
        if template is not None:
            self._versions.move_to_end(key)
            return template
        text = await self.db.glance(lambda conn: stored.content(conn, prompt_id, number))
        if text is None:
            raise stored.no_version(prompt_id, version or "", "prompt.version")
        template = Template.from_json(prompt_id, number, text)
        self._keep(key, template)
        return template

    async def _head(self, tenant: str, prompt_id: str) -> tuple[int, bool]:
        now = time.monotonic()
        cached = self._heads.get((tenant, prompt_id))
        if cached is not None and now - cached[0] <= self.latest_s:
            return cached[1], cached[2]
        found = await self.db.glance(lambda conn: stored.head(conn, tenant, prompt_id))
        if found is None:  # not remembered: a guessed id must not push real ones out
            raise stored.not_found(prompt_id, "prompt.id")
        if len(self._heads) >= _HEADS:
            del self._heads[next(iter(self._heads))]
        self._heads[(tenant, prompt_id)] = (now, *found)
        return found

    def _keep(self, key: tuple[str, str, int], template: Template) -> None:
        self._versions[key] = template
        self._bytes += template.size
        while self._bytes > _VERSIONS_BYTES:
            _, evicted = self._versions.popitem(last=False)
            self._bytes -= evicted.size

    def forget(self) -> None:
        """Drop what this process trusted of latest versions and archivals (after a change
        made here); versions stay, since they never change."""
        self._heads.clear()


def _part(part: dict[str, Any]) -> dict[str, Any]:
    """A part a variable gives, as the message holds it: an image with OpenAI's default
    `detail` ("auto") where none was given, as the echo shows it (relay.engine.response)."""
    if part["type"] == "input_image":
        part.setdefault("detail", "auto")
    return part


async def apply_prompt(
    templates: PromptTemplates | None,
    request: CreateResponse,
    tenant: str,
    items: list[dict[str, Any]],
) -> tuple[CreateResponse, list[dict[str, Any]]]:
    """The request with its prompt template's instructions joined to its own, and its input
    `items` (normalised) after the template's messages. A request without `prompt` is
    returned as it is."""
    reference = request.prompt
    if reference is None:
        return request, items
    if templates is None:
        raise InvalidRequest("Prompt templates are not available here.", param="prompt")
    template = await templates.find(tenant, reference.id, reference.version)
    given = {
        name: value
        if isinstance(value, str)
        else _part(value.model_dump(mode="json", exclude_none=True))
        for name, value in (reference.variables or {}).items()
    }
    instructions, messages = render(template, given)
    if not messages and not items and request.previous_response_id is None:
        raise InvalidRequest(
            f"Missing required parameter: 'input' (prompt '{reference.id}' has no messages).",
            param="input",
            code="missing_required_parameter",
        )
    # Pinned in the caller's request itself, not only in the copy: a background response is
    # started again from that request once a runner takes it (here, or by a worker that reads
    # it back as stored after this), and must render the version its queued answer echoed
    # even if a newer one was made meanwhile.
    reference.version = str(template.version)
    joined = "\n\n".join(text for text in (instructions, request.instructions) if text)
    rendered = request.model_copy(update={"instructions": joined or None})
    return rendered, [*parse_items(messages, "prompt.messages"), *items]
