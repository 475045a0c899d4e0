"""Prompt templates: made and versioned through the admin API and `relay admin`, named by
`prompt` on POST /v1/responses (the official client's `prompt={"id", "version",
"variables"}`), rendered into what the upstream reads and what is stored."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import openai
import orjson
import pytest
from chat_upstream import UPSTREAM_KEY, ChatUpstream
from relay_fixtures import sdk_client, sse_events
from team import ADMIN_KEY, AdminClient, client, team_relay, team_routes
from test_websocket import completed, socket_url, turn
from websockets.sync.client import connect

from relay.access.admin import Admin
from relay.config import RouteConfig
from relay.engine.context import parse_input
from relay.engine.prompts import PromptTemplates, apply_prompt
from relay.errors import InvalidRequest, NotFound
from relay.models.prompts import MAX_TEMPLATE_BYTES
from relay.protocol import create_request
from relay.storage.sql import open_store

KEY_ENV = "RELAY_TEST_PROMPTS_UPSTREAM_KEY"
UNKNOWN = "pmpt_" + "0" * 48
PHOTO = {"type": "input_image", "image_url": "data:image/png;base64,iVBORw0KGgo=", "detail": "low"}


@dataclass
class Team:
    url: str
    admin: AdminClient
    project: str
    key: str

    def prompt(self, name: str = "template", **content: Any) -> dict[str, Any]:
        created: dict[str, Any] = self.admin.call(
            "POST", f"/projects/{self.project}/prompts", {"name": name, **content}
        )
        return created

    def version(self, prompt_id: str, **content: Any) -> dict[str, Any]:
        added: dict[str, Any] = self.admin.call(
            "POST", f"/projects/{self.project}/prompts/{prompt_id}/versions", content
        )
        return added


@pytest.fixture(scope="module")
def team(
    chat_upstream: ChatUpstream, database_url: str, monkeypatch_module: pytest.MonkeyPatch
) -> Iterator[Team]:
    monkeypatch_module.setenv(KEY_ENV, UPSTREAM_KEY)
    echo = RouteConfig(
        model="up-echo",
        base_url=chat_upstream.base_url,
        api_key_env=KEY_ENV,
        upstream_model="echo",
    )
    with team_relay(database_url, routes=[*team_routes(), echo]) as url, AdminClient(url) as admin:
        project = admin.project("prompts")
        yield Team(url, admin, project, admin.key(project)[1])


@pytest.fixture
def sdk(team: Team) -> Iterator[openai.OpenAI]:
    with sdk_client(team.url, team.key) as session:
        yield session


def sent(upstream: ChatUpstream) -> list[dict[str, Any]]:
    messages: list[dict[str, Any]] = upstream.last["messages"]
    return messages


def texts(items: list[Any]) -> list[tuple[str, str]]:
    """(role, text) of each message item, its parts' texts joined."""
    return [
        (item.role, "".join(getattr(part, "text", "") for part in item.content)) for item in items
    ]


def test_the_rendered_template_is_what_the_upstream_reads_and_what_is_stored(
    team: Team, sdk: openai.OpenAI, chat_upstream: ChatUpstream
) -> None:
    made = team.prompt(
        instructions="You help {{ user }} with {{topic}}. Write \\{{topic}} as it is.",
        messages=[
            {"role": "developer", "content": "Answer in {{lang}}."},
            {"role": "user", "content": [{"type": "input_text", "text": "It is about {{topic}}."}]},
            {"role": "assistant", "content": "Ask away, {{user}}."},
        ],
    )
    assert (made["version"], made["latest_version"], made["status"]) == ("1", "1", "active")
    assert made["variables"] == ["user", "topic", "lang"]
    variables: dict[str, Any] = {
        "user": "Ann",
        "topic": "billing {{user}}",  # values are never read for placeholders
        "lang": {"type": "input_text", "text": "French"},
    }
    response = sdk.responses.create(
        model="up-echo",
        prompt={"id": made["id"], "variables": variables},
        instructions="Be brief.",
        input="Why {{user}}?",  # nor is the request's own input
    )
    instructions = "You help Ann with billing {{user}}. Write {{topic}} as it is.\n\nBe brief."
    assert sent(chat_upstream) == [
        {"role": "system", "content": instructions},
        {"role": "system", "content": "Answer in French."},
        {"role": "user", "content": "It is about billing {{user}}."},
        {"role": "assistant", "content": "Ask away, Ann."},
        {"role": "user", "content": "Why {{user}}?"},
    ]
    assert response.instructions == instructions
    assert response.prompt is not None
    assert response.prompt.model_dump(exclude_none=True) == {
        "id": made["id"],
        "version": "1",
        "variables": variables,
    }
    stored = sdk.responses.retrieve(response.id)
    assert stored.prompt == response.prompt and stored.instructions == instructions
    items = sdk.responses.input_items.list(response.id, order="asc").data
    assert texts(items) == [
        ("developer", "Answer in French."),
        ("user", "It is about billing {{user}}."),
        ("assistant", "Ask away, Ann."),
        ("user", "Why {{user}}?"),
    ]
    # A chain goes on from what was stored: the messages, not the instructions.
    sdk.responses.create(model="up-echo", previous_response_id=response.id, input="More.")
    assert sent(chat_upstream) == [
        {"role": "system", "content": "Answer in French."},
        {"role": "user", "content": "It is about billing {{user}}."},
        {"role": "assistant", "content": "Ask away, Ann."},
        {"role": "user", "content": "Why {{user}}?"},
        {"role": "assistant", "content": "Why {{user}}?"},
        {"role": "user", "content": "More."},
    ]


def test_versions_never_change_and_none_named_is_the_latest(
    team: Team, sdk: openai.OpenAI, chat_upstream: ChatUpstream
) -> None:
    made = team.prompt(instructions="One, for {{who}}.")
    prompt_id = made["id"]
    second = team.version(prompt_id, instructions="Two, for {{who}}, {{how}}.")
    assert (second["version"], second["latest_version"]) == ("2", "2")
    assert second["variables"] == ["who", "how"]
    latest = sdk.responses.create(
        model="up-echo",
        input="hi",
        prompt={"id": prompt_id, "variables": {"who": "Bo", "how": "kindly"}},
    )
    assert latest.prompt is not None and latest.prompt.version == "2"
    assert sent(chat_upstream)[0] == {"role": "system", "content": "Two, for Bo, kindly."}
    first = sdk.responses.create(
        model="up-echo",
        input="hi",
        prompt={"id": prompt_id, "version": "1", "variables": {"who": "Bo"}},
    )
    assert first.prompt is not None and first.prompt.version == "1"
    assert sent(chat_upstream)[0] == {"role": "system", "content": "One, for Bo."}
    path = f"/projects/{team.project}/prompts/{prompt_id}"
    assert team.admin.call("GET", path, version="1")["instructions"] == "One, for {{who}}."
    shown = team.admin.call("GET", path)
    assert (shown["version"], shown["instructions"]) == ("2", "Two, for {{who}}, {{how}}.")
    # Each version's own variables: `how` is unknown to version 1.
    with pytest.raises(openai.BadRequestError) as raised:
        sdk.responses.create(
            model="up-echo",
            input="hi",
            prompt={"id": prompt_id, "version": "1", "variables": {"who": "Bo", "how": "x"}},
        )
    assert (raised.value.param, raised.value.code) == ("prompt.variables.how", "unknown_parameter")


def test_an_archived_template_is_refused_and_keeps_its_versions(
    team: Team, sdk: openai.OpenAI
) -> None:
    made = team.prompt(instructions="Hi {{x}}.")
    path = f"/projects/{team.project}/prompts/{made['id']}"
    archived = team.admin.call("DELETE", path)
    assert archived["status"] == "archived" and archived["archived_at"] is not None
    for version in ({}, {"version": "1"}):
        with pytest.raises(openai.BadRequestError) as raised:
            sdk.responses.create(
                model="fake-text",
                input="x",
                prompt={"id": made["id"], "variables": {"x": "y"}, **version},
            )
        assert (raised.value.param, raised.value.code) == ("prompt.id", "prompt_archived")
    answer = team.admin.http.post(f"/admin/v1{path}/versions", json={"instructions": "Again."})
    assert answer.status_code == 400 and answer.json()["error"]["code"] == "prompt_archived"
    assert team.admin.call("GET", path)["instructions"] == "Hi {{x}}."
    team.admin.call("DELETE", path)  # again: nothing changes
    log = team.admin.call("GET", "/audit_log", limit=100)["data"]
    mine = [entry for entry in log if entry["target"] == made["id"]]
    assert [(entry["action"], entry["actor"]) for entry in mine] == [
        ("prompt.archived", "ops"),
        ("prompt.created", "ops"),
    ]
    assert mine[0]["detail"] == {"project_id": team.project}
    assert mine[1]["detail"] == {"project_id": team.project, "name": "template", "version": "1"}


@pytest.fixture(scope="module")
def refusing(team: Team) -> dict[str, str]:
    """Templates for the error cases: one whose instructions use `x`, and one of another
    project."""
    other = team.admin.project("someone-else")
    theirs = team.admin.call(
        "POST", f"/projects/{other}/prompts", {"name": "theirs", "instructions": "{{x}}"}
    )
    return {
        "mine": team.prompt(instructions="Say {{x}}.")["id"],
        "theirs": theirs["id"],
    }


IMAGE_X = {"x": PHOTO}
ERRORS: list[tuple[str, dict[str, Any], int, str, str]] = [
    ("an unknown template", {"id": UNKNOWN}, 404, "prompt.id", "prompt_not_found"),
    ("a missing variable", {"id": "mine"}, 400, "prompt.variables.x", "missing_required_parameter"),
    (
        "an unknown variable",
        {"id": "mine", "variables": {"x": "1", "y": "2"}},
        400,
        "prompt.variables.y",
        "unknown_parameter",
    ),
    (
        "an unknown version",
        {"id": "mine", "version": "9", "variables": {"x": "1"}},
        404,
        "prompt.version",
        "prompt_version_not_found",
    ),
    (
        "a version that names none",
        {"id": "mine", "version": "01", "variables": {"x": "1"}},
        404,
        "prompt.version",
        "prompt_version_not_found",
    ),
    (
        "an image where text goes",
        {"id": "mine", "variables": IMAGE_X},
        400,
        "prompt.variables.x",
        "invalid_value",
    ),
    # (A missing nested field is named by its parent, as everywhere.)
    ("no id", {"version": "1"}, 400, "prompt", "missing_required_parameter"),
    (
        "a variable that is neither text nor a part",
        {"id": "mine", "variables": {"x": 1}},
        400,
        "prompt.variables.x",
        "invalid_value",
    ),
    (
        "an unknown field",
        {"id": "mine", "prompt_id": "x"},
        400,
        "prompt.prompt_id",
        "invalid_value",
    ),
]


@pytest.mark.parametrize(
    ("case", "prompt", "status", "param", "code"), ERRORS, ids=[case[0] for case in ERRORS]
)
@pytest.mark.parametrize("stream", [False, True])
def test_a_bad_prompt_is_refused_before_any_stream(
    team: Team,
    sdk: openai.OpenAI,
    refusing: dict[str, str],
    case: str,
    prompt: dict[str, Any],
    status: int,
    param: str,
    code: str,
    stream: bool,
) -> None:
    if prompt.get("id") in refusing:
        prompt = {**prompt, "id": refusing[prompt["id"]]}
    with pytest.raises(openai.APIStatusError) as raised:
        sdk.responses.create(model="fake-text", input="x", prompt=prompt, stream=stream)
    error = raised.value
    assert (error.status_code, error.param, error.code) == (status, param, code), error.message


def test_another_projects_template_is_an_unknown_one(
    team: Team, sdk: openai.OpenAI, refusing: dict[str, str]
) -> None:
    errors = []
    for prompt_id in (refusing["theirs"], UNKNOWN):
        with pytest.raises(openai.NotFoundError) as raised:
            sdk.responses.create(
                model="fake-text", input="x", prompt={"id": prompt_id, "variables": {"x": "1"}}
            )
        body = raised.value.body
        assert isinstance(body, dict)
        errors.append(json.dumps(body).replace(prompt_id, "<id>"))
    assert errors[0] == errors[1]
    # ... and so it is on the admin API under another project.
    for prompt_id in (refusing["theirs"], UNKNOWN):
        path = f"/admin/v1/projects/{team.project}/prompts/{prompt_id}"
        for method, more in (("GET", ""), ("DELETE", ""), ("POST", "/versions")):
            body = {"instructions": "mine now"} if more else None
            answer = team.admin.http.request(method, path + more, json=body)
            assert answer.status_code == 404, answer.text
            assert answer.json()["error"]["code"] == "prompt_not_found"
    theirs = team.admin.call("GET", "/audit_log", limit=100)["data"]
    assert [entry["action"] for entry in theirs if entry["target"] == refusing["theirs"]] == [
        "prompt.created"
    ]


def test_a_template_without_messages_needs_input(team: Team, sdk: openai.OpenAI) -> None:
    made = team.prompt(instructions="Only instructions.")
    with pytest.raises(openai.BadRequestError) as raised:
        sdk.responses.create(model="fake-text", prompt={"id": made["id"]})
    assert (raised.value.param, raised.value.code) == ("input", "missing_required_parameter")
    answered = sdk.responses.create(model="fake-text", prompt={"id": made["id"]}, input="x")
    assert answered.status == "completed"


def test_image_variables_become_parts_of_their_messages(
    team: Team, sdk: openai.OpenAI, chat_upstream: ChatUpstream
) -> None:
    made = team.prompt(
        messages=[
            {
                "role": "user",
                "content": [
                    {"type": "input_text", "text": "What is in {{place}}?"},
                    {"type": "input_text", "text": " {{ photo }} "},
                ],
            },
            {"role": "user", "content": "Compare it with {{other}} please."},
        ]
    )
    other = {"type": "input_image", "image_url": "https://example.com/b.png"}
    variables = {"place": "the picture", "photo": PHOTO, "other": other}
    # No input: the template's messages are the input.
    response = sdk.responses.create(
        model="up-echo", prompt={"id": made["id"], "variables": variables}
    )
    assert sent(chat_upstream) == [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "What is in the picture?"},
                {"type": "image_url", "image_url": {"url": PHOTO["image_url"], "detail": "low"}},
            ],
        },
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "Compare it with "},
                {"type": "image_url", "image_url": {"url": other["image_url"], "detail": "auto"}},
                {"type": "text", "text": " please."},
            ],
        },
    ]
    assert response.prompt is not None and response.prompt.variables is not None
    # Echoed as given; an image without a detail shows OpenAI's default.
    assert response.prompt.model_dump(exclude_none=True)["variables"] == {
        **variables,
        "other": {**other, "detail": "auto"},
    }
    items = sdk.responses.input_items.list(response.id, order="asc").data
    assert [[part.type for part in item.content] for item in items] == [
        ["input_text", "input_image"],
        ["input_text", "input_image", "input_text"],
    ]
    # An image cannot stand in an assistant message.
    answering = team.prompt(messages=[{"role": "assistant", "content": "Here: {{photo}}"}])
    with pytest.raises(openai.BadRequestError) as raised:
        sdk.responses.create(
            model="up-echo",
            input="x",
            prompt={"id": answering["id"], "variables": {"photo": PHOTO}},
        )
    assert raised.value.param == "prompt.variables.photo"
    assert "assistant message" in raised.value.message


def test_streams_background_runs_and_websocket_turns_render_it_too(
    team: Team, sdk: openai.OpenAI
) -> None:
    made = team.prompt(instructions="Count {{n}}.", messages=[{"role": "user", "content": "{{n}}"}])
    prompt = {"id": made["id"], "variables": {"n": "three"}}
    with client(team.url, team.key) as http:
        events = sse_events(http, {"model": "fake-text", "prompt": prompt, "input": "go"})
    for event in (events[0], events[-1]):
        assert event["response"]["prompt"] == {**prompt, "version": "1"}
        assert event["response"]["instructions"] == "Count three."
    queued = sdk.responses.create(model="fake-text", input="go", prompt=prompt, background=True)
    assert queued.status == "queued" and queued.prompt is not None
    assert queued.prompt.version == "1"
    # A version made while it waits: the run renders the one its answer named.
    team.version(made["id"], instructions="Newer {{n}}.")
    deadline = time.monotonic() + 30
    done = sdk.responses.retrieve(queued.id)
    while done.status in ("queued", "in_progress") and time.monotonic() < deadline:
        time.sleep(0.05)
        done = sdk.responses.retrieve(queued.id)
    assert done.status == "completed" and done.prompt is not None
    assert (done.prompt.version, done.instructions) == ("1", "Count three.")
    items = sdk.responses.input_items.list(done.id, order="asc").data
    assert texts(items) == [("user", "three"), ("user", "go")]
    headers = {"authorization": f"Bearer {team.key}"}
    with connect(socket_url(team.url), additional_headers=headers) as socket:
        answer = completed(turn(socket, model="fake-text", input="go", prompt=prompt))
        assert answer["prompt"] == {**prompt, "version": "2"}
        assert answer["instructions"] == "Newer three."
        [error] = turn(socket, model="fake-text", input="go", prompt={"id": UNKNOWN})
        assert error["status"] == 404 and error["error"]["param"] == "prompt.id"
        completed(turn(socket, model="fake-text", input="go", prompt=prompt))  # still open


def test_input_tokens_count_the_template(team: Team) -> None:
    made = team.prompt(
        instructions="five words of instructions here",
        messages=[{"role": "user", "content": "and {{more}}"}],
    )
    body = {
        "model": "fake-text",
        "input": "one two",
        "prompt": {"id": made["id"], "variables": {"more": "three words here"}},
    }
    with client(team.url, team.key) as http:
        counted = http.post("/v1/responses/input_tokens", json=body).json()
    assert counted["input_tokens"] == 5 + 4 + 2


def test_a_conversation_keeps_the_rendered_messages(team: Team, sdk: openai.OpenAI) -> None:
    made = team.prompt(messages=[{"role": "developer", "content": "Be {{mood}}."}])
    conversation = sdk.conversations.create()
    sdk.responses.create(
        model="fake-text",
        input="hi",
        conversation=conversation.id,
        prompt={"id": made["id"], "variables": {"mood": "calm"}},
    )
    items = sdk.conversations.items.list(conversation.id, order="asc").data
    assert [getattr(item, "role", None) for item in items] == ["developer", "user", "assistant"]
    assert texts(items[:1]) == [("developer", "Be calm.")]


def test_the_admin_api_checks_templates_and_pages_them(team: Team) -> None:
    project = team.admin.project("listing")
    base = f"/projects/{project}/prompts"
    made = [
        team.admin.call("POST", base, {"name": f"p{index}", "instructions": f"I am {index}."})
        for index in range(3)
    ]
    seen: list[str] = []
    after = None
    while True:
        params = {"limit": 2, **({"after": after} if after else {})}
        page = team.admin.call("GET", base, **params)
        assert all("instructions" not in entry for entry in page["data"])  # summaries
        seen += [entry["id"] for entry in page["data"]]
        if not page["has_more"]:
            break
        after = page["last_id"]
    assert seen == sorted(entry["id"] for entry in made)
    user = {"role": "user", "content": "x"}
    cases: list[tuple[str, str, Any, int, str | None]] = [
        ("POST", base, {"name": "nothing"}, 400, None),
        ("POST", base, {"instructions": "x"}, 400, "name"),
        ("POST", base, {"name": "x", "instructions": "x", "colour": "red"}, 400, "colour"),
        ("POST", base, {"name": "x", "messages": [{**user, "role": "tool"}]}, 400, None),
        ("POST", base, {"name": "x", "messages": [{**user, "id": "msg_1"}]}, 400, None),
        (
            "POST",
            base,
            {"name": "x", "messages": [{"role": "assistant", "content": [PHOTO]}]},
            400,
            None,
        ),
        ("POST", base, {"name": "x", "instructions": "x" * MAX_TEMPLATE_BYTES}, 400, None),
        ("POST", "/projects/proj_missing/prompts", {"name": "x", "instructions": "x"}, 404, None),
        ("GET", "/projects/proj_missing/prompts", None, 404, None),
        ("GET", f"{base}/{UNKNOWN}", None, 404, None),
        ("GET", f"{base}/{made[0]['id']}?version=2", None, 404, "version"),
        ("GET", f"{base}/{made[0]['id']}?version=latest", None, 404, "version"),
        ("POST", f"{base}/{UNKNOWN}/versions", {"instructions": "x"}, 404, None),
        ("POST", f"{base}/{made[0]['id']}/versions", {}, 400, None),
        ("DELETE", f"{base}/{UNKNOWN}", None, 404, None),
        ("GET", f"{base}?limit=0", None, 400, "limit"),
    ]
    for method, path, body, status, param in cases:
        answer = team.admin.http.request(method, f"/admin/v1{path}", json=body)
        assert answer.status_code == status, (path, body, answer.text)
        if param is not None:
            assert answer.json()["error"]["param"] == param
    team.admin.call("DELETE", f"/projects/{project}")
    answer = team.admin.http.post(f"/admin/v1{base}", json={"name": "x", "instructions": "x"})
    assert answer.json()["error"]["code"] == "project_archived"


async def test_the_latest_is_trusted_briefly_and_a_version_for_good(tmp_path: Path) -> None:
    store = await open_store(f"sqlite:///{tmp_path}/relay.db")
    try:
        admin = Admin(store.db)
        project = (await admin.create_project("test", {"name": "p"}))["id"]
        made = await admin.create_prompt("test", project, {"name": "n", "instructions": "1 {{x}}"})
        templates = PromptTemplates(store.db, latest_s=60)
        assert (await templates.find(project, made["id"], None)).version == 1
        await admin.add_prompt_version("test", project, made["id"], {"instructions": "2 {{x}}"})
        assert (await templates.find(project, made["id"], None)).version == 1  # trusted still
        assert (await templates.find(project, made["id"], "2")).version == 2  # named: read
        with pytest.raises(NotFound):
            await templates.find("another-project", made["id"], "2")
        templates.forget()  # as the admin API does after a change
        request = create_request(
            {"model": "m", "input": "x", "prompt": {"id": made["id"], "variables": {"x": "y"}}}
        )
        rendered, items = await apply_prompt(templates, request, project, parse_input(request))
        assert rendered.instructions == "2 y" and [item["role"] for item in items] == ["user"]
        # Pinned in the request itself: a background run started from it later (or read back
        # by a worker) renders version 2 whatever is the latest then.
        assert request.prompt is not None and request.prompt.version == "2"
        dumped = request.model_dump(mode="json", exclude_unset=True, by_alias=True)
        assert dumped["prompt"]["version"] == "2"
        await admin.archive_prompt("test", project, made["id"])
        templates.forget()
        with pytest.raises(InvalidRequest) as raised:
            await templates.find(project, made["id"], "2")  # kept, but archived
        assert raised.value.code == "prompt_archived"
    finally:
        await store.close()


def test_the_cli_manages_templates_that_a_running_server_serves(tmp_path: Path) -> None:
    config = tmp_path / "relay.toml"
    config.write_text(
        f'database_url = "sqlite:///{tmp_path}/relay.db"\n'
        f'[[admin_keys]]\nkey = "{ADMIN_KEY}"\n'  # keys on: requests are the key's project's
        '[[routes]]\nmodel = "fake-text"\nprovider = "fake"\nupstream_model = "text"\n'
    )
    relay = [str(Path(sys.executable).with_name("relay")), "admin", "--config", str(config)]

    def run(*args: str) -> Any:
        done = subprocess.run([*relay, *args], capture_output=True, text=True, check=True)
        return json.loads(done.stdout)

    project = run("project", "create", "cli-prompts")["id"]
    key = run("key", "create", "--project", project)["value"]
    messages = tmp_path / "messages.json"
    messages.write_bytes(orjson.dumps([{"role": "user", "content": "Tell {{name}} hello."}]))
    made = run(
        *("prompt", "create", "greeting", "--project", project),
        *("--instructions", "Greet {{name}}.", "--messages-file", str(messages)),
    )
    assert (made["version"], made["variables"]) == ("1", ["name"])
    prompt_id = made["id"]
    assert [entry["id"] for entry in run("prompt", "list", "--project", project)["data"]] == [
        prompt_id
    ]
    instructions = tmp_path / "instructions.txt"
    instructions.write_text("Welcome {{name}} warmly.")
    second = run(
        *("prompt", "version", prompt_id, "--project", project),
        *("--instructions-file", str(instructions)),
    )
    assert (second["version"], second["messages"]) == ("2", [])
    first = run("prompt", "show", prompt_id, "--project", project, "--version", "1")
    assert first["instructions"] == "Greet {{name}}." and first["latest_version"] == "2"
    bad = subprocess.run(
        [*relay, "prompt", "create", "x", "--project", project, "--messages-file", "/nonexistent"],
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 2 and "cannot read /nonexistent" in bad.stderr
    empty = subprocess.run(
        [*relay, "prompt", "create", "x", "--project", project], capture_output=True, text=True
    )
    assert empty.returncode == 1 and "instructions or messages" in empty.stderr
    from live_server import relay_serve

    variables = {"name": "Cy"}
    serving = relay_serve({"RELAY_KEY_CACHE_S": "0.5"}, "--config", str(config))
    with serving as served, sdk_client(served.url, key) as sdk:
        asked = {
            "model": "fake-text",
            "input": "hi",
            "prompt": {"id": prompt_id, "variables": variables},
        }
        assert sdk.responses.create(**asked).instructions == "Welcome Cy warmly."
        run(
            *("prompt", "version", prompt_id, "--project", project),
            "--instructions",
            "Hi {{name}}.",
        )
        time.sleep(0.7)  # key_cache_s: the server learns of the new latest within it
        answer = sdk.responses.create(**asked)
        assert answer.prompt is not None and answer.prompt.version == "3"
        run("prompt", "archive", prompt_id, "--project", project)
        time.sleep(0.7)
        with pytest.raises(openai.BadRequestError) as raised:
            sdk.responses.create(**asked)
        assert raised.value.code == "prompt_archived"
    actions = [entry["action"] for entry in run("audit")["data"]]
    assert actions == [
        "prompt.archived",
        "prompt.version_created",
        "prompt.version_created",
        "prompt.created",
        "key.created",
        "project.created",
    ]
