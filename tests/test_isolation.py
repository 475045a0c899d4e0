"""The isolation matrix: every endpoint that takes an id, called by every kind of caller.
Only the project that owns a row ever sees it (any of its keys); every other caller gets the
404 an unknown id gets, and a caller whose key is not good gets 401 before anything is read.

Responses (GET, DELETE, input_items, cancel, previous_response_id), conversations (GET,
update, items, an item, the `conversation` parameter, DELETE) and prompt templates (the
`prompt` parameter; on the admin API, a template asked for under another project); the
web console's pages of a project, signed in with each kind of key.
"""

from __future__ import annotations

import json
import logging
import re
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from console_client import ConsoleClient, signed_in
from team import ADMIN_KEY, CONFIG_KEY, AdminClient, client, team_relay

from relay.log_lines import JsonFormatter


@dataclass
class World:
    url: str
    response_id: str  # created by `owner` in project `home` (a background response)
    conversation_id: str  # likewise, with one item
    item_id: str
    prompt_id: str  # a prompt template of `home`
    home: str
    elsewhere: str  # another project the owner's key may pick
    callers: dict[str, dict[str, str]]  # name -> headers


@pytest.fixture(scope="module")
def world(database_url: str) -> Iterator[World]:
    with team_relay(database_url) as url, AdminClient(url) as admin:
        home, elsewhere, other = admin.project("home"), admin.project("away"), admin.project()
        _, owner = admin.key(home, projects=[elsewhere])
        _, same_project = admin.key(home)
        _, other_key = admin.key(other)
        revoked_id, revoked = admin.key(home)
        _, expired = admin.key(home, expires_at=int(time.time()) - 1)
        with client(url, owner) as http:
            body = {"model": "fake-text", "input": "mine", "background": True}
            created = http.post("/v1/responses", json=body)
            assert created.status_code == 200, created.text
            items = [{"type": "message", "role": "user", "content": "mine"}]
            conversation = http.post("/v1/conversations", json={"items": items}).json()
            item_id = http.get(f"/v1/conversations/{conversation['id']}/items").json()["data"][0][
                "id"
            ]
        admin.revoke(revoked_id)
        template = {"name": "mine", "instructions": "Be {{mood}}."}
        prompt_id = admin.call("POST", f"/projects/{home}/prompts", template)["id"]
        bearer = "authorization"
        callers = {
            "owner": {bearer: f"Bearer {owner}"},
            "same project, another key": {bearer: f"Bearer {same_project}"},
            "same key, another project": {bearer: f"Bearer {owner}", "x-project-id": elsewhere},
            "another key's project": {bearer: f"Bearer {other_key}"},
            "a config file key": {bearer: f"Bearer {CONFIG_KEY}"},
            "revoked key": {bearer: f"Bearer {revoked}"},
            "expired key": {bearer: f"Bearer {expired}"},
            "admin key as X-Admin-Key": {"x-admin-key": ADMIN_KEY},
            "admin key as bearer": {bearer: f"Bearer {ADMIN_KEY}"},
            "no key": {},
        }
        yield World(
            url,
            created.json()["id"],
            conversation["id"],
            item_id,
            prompt_id,
            home,
            elsewhere,
            callers,
        )


UNKNOWN_PROMPT = "pmpt_" + "0" * 48
SEES = {"owner", "same project, another key"}
NOT_FOUND = {"same key, another project", "another key's project", "a config file key"}
UNAUTHENTICATED = {
    "revoked key": "api_key_revoked",
    "expired key": "api_key_expired",
    "admin key as X-Admin-Key": "authentication_required",
    "admin key as bearer": "invalid_api_key",
    "no key": "authentication_required",
}
ENDPOINTS = [
    "GET",
    "input_items",
    "previous_response_id",
    "cancel",
    "conversation GET",
    "conversation update",
    "conversation items",
    "conversation item",
    "conversation add items",
    "conversation parameter",
    "conversation item DELETE",
    "conversation DELETE",
    "prompt parameter",
    "DELETE",
]


def _call(http: httpx.Client, endpoint: str, world: World, unknown: bool = False) -> httpx.Response:
    response_id = "resp_" + "0" * 48 if unknown else world.response_id
    conversation = "conv_" + "0" * 48 if unknown else world.conversation_id
    prompt = {"id": UNKNOWN_PROMPT if unknown else world.prompt_id, "variables": {"mood": "kind"}}
    at = f"/v1/conversations/{conversation}"
    say = {"type": "message", "role": "user", "content": "hi"}
    calls = {
        "cancel": lambda: http.post(f"/v1/responses/{response_id}/cancel"),
        "conversation GET": lambda: http.get(at),
        "conversation update": lambda: http.post(at, json={"metadata": {"a": "b"}}),
        "conversation items": lambda: http.get(f"{at}/items"),
        "conversation item": lambda: http.get(f"{at}/items/{world.item_id}"),
        "conversation add items": lambda: http.post(f"{at}/items", json={"items": [say]}),
        "conversation parameter": lambda: http.post(
            "/v1/responses", json={"model": "fake-text", "input": "x", "conversation": conversation}
        ),
        "conversation item DELETE": lambda: http.delete(f"{at}/items/{world.item_id}"),
        "conversation DELETE": lambda: http.delete(at),
        "prompt parameter": lambda: http.post(
            "/v1/responses", json={"model": "fake-text", "input": "x", "prompt": prompt}
        ),
    }
    if endpoint in calls:
        return calls[endpoint]()
    if endpoint == "GET":
        return http.get(f"/v1/responses/{response_id}")
    if endpoint == "input_items":
        return http.get(f"/v1/responses/{response_id}/input_items")
    if endpoint == "previous_response_id":
        body = {"model": "fake-text", "input": "and?", "previous_response_id": response_id}
        return http.post("/v1/responses", json=body, headers={"content-type": "application/json"})
    # DELETE last: the owner's delete ends the row's life.
    return http.delete(f"/v1/responses/{response_id}")


@pytest.mark.parametrize("endpoint", ENDPOINTS)
@pytest.mark.parametrize("caller", [*SEES, *NOT_FOUND, *UNAUTHENTICATED])
def test_only_the_owning_project_sees_a_response(
    world: World, caller: str, endpoint: str, caplog: pytest.LogCaptureFixture
) -> None:
    if endpoint.endswith("DELETE") and caller in SEES:
        pytest.skip("the owner's deletes are tested last, below")
    from relay_fixtures import checked_client

    request_id = f"iso-{uuid.uuid4().hex}"
    with caplog.at_level(logging.INFO, logger="relay.access"), checked_client(world.url) as http:
        http.headers.update({**world.callers[caller], "x-request-id": request_id})
        answer = _call(http, endpoint, world)
        error = answer.json().get("error") if answer.status_code >= 400 else None
        # Exactly one access line for the request, refused or not, naming it; in JSON too.
        line = _access_line(caplog, request_id)
    assert (line["status"], line["error_code"]) == (
        answer.status_code,
        error["code"] if error is not None else None,
    )
    if caller in SEES:
        assert line["project"] == world.home
    if caller in SEES:
        assert answer.status_code == 200, answer.text
    elif caller in NOT_FOUND:
        # What an id that never existed gets: 404, or for previous_response_id OpenAI's 400.
        with checked_client(world.url) as http:
            http.headers.update(world.callers["owner"])
            unknown = _call(http, endpoint, world, unknown=True)
        expected = unknown.json()["error"]
        expected["message"] = (
            expected["message"]
            .replace("resp_" + "0" * 48, world.response_id)
            .replace("conv_" + "0" * 48, world.conversation_id)
            .replace(UNKNOWN_PROMPT, world.prompt_id)
        )
        assert (answer.status_code, error) == (unknown.status_code, expected)
        assert answer.status_code in (400, 404)
    else:
        assert answer.status_code == 401, answer.text
        assert error is not None and error["code"] == UNAUTHENTICATED[caller]


def _access_line(caplog: pytest.LogCaptureFixture, request_id: str) -> dict[str, Any]:
    """The request's access line, as JSON; written once its answer's last byte is sent, so
    it may come just after the client read the answer."""
    deadline = time.monotonic() + 5
    while True:
        lines = [
            record
            for record in caplog.records
            if getattr(record, "fields", {}).get("request_id") == request_id
        ]
        if lines or time.monotonic() > deadline:
            break
        time.sleep(0.01)
    [record] = lines
    line: dict[str, Any] = json.loads(JsonFormatter().format(record))
    assert line["request_id"] == request_id and line["logger"] == "relay.access"
    return line


CONSOLE_SEES = {"owner", "same project, another key", "admin"}
CONSOLE_NOT_FOUND = {"another key's project", "a config file key"}
CONSOLE_PAGES = [
    "project",
    "overview",
    "responses",
    "response",
    "response events",
    "conversations",
    "conversation",
    "project's policy (POST)",
    "response cancel (POST)",
    "conversation metadata (POST)",
    "conversation delete (POST)",
]


@pytest.fixture(scope="module")
def consoles(world: World) -> Iterator[dict[str, ConsoleClient]]:
    """A console session for each kind of caller that can sign in, and a browser without one."""
    keys = {
        name: world.callers[name]["authorization"].removeprefix("Bearer ")
        for name in (*CONSOLE_SEES - {"admin"}, *CONSOLE_NOT_FOUND)
    }
    sessions = {
        name: signed_in(world.url, key) for name, key in {**keys, "admin": ADMIN_KEY}.items()
    }
    sessions["no session"] = ConsoleClient(world.url)
    yield sessions
    for session in sessions.values():
        session.close()


@pytest.mark.parametrize("page", CONSOLE_PAGES)
@pytest.mark.parametrize("caller", [*CONSOLE_SEES, *CONSOLE_NOT_FOUND, "no session"])
def test_console_pages_show_only_the_owning_project(
    world: World, consoles: dict[str, ConsoleClient], caller: str, page: str
) -> None:
    console = consoles[caller]
    at = f"/console/projects/{world.home}"
    if page.endswith("(POST)"):
        console.get("/console")  # its CSRF token is right
        if page.startswith("response cancel"):
            # Any of the project's keys may cancel its responses (this one has ended).
            answer = console.post(f"{at}/responses/{world.response_id}/cancel")
            allowed = CONSOLE_SEES
        elif page.startswith("conversation"):
            # Any of the project's keys may edit and delete its conversations: those who may
            # edit the world's one (its metadata as it is: none) and delete one of their own;
            # the others try the world's, which stays.
            allowed = CONSOLE_SEES
            target = world.conversation_id
            if page.startswith("conversation delete") and caller in allowed:
                with client(world.url, world.callers["owner"]["authorization"][7:]) as http:
                    target = http.post("/v1/conversations", json={}).json()["id"]
            form = {"metadata": ""} if "metadata" in page else {}
            verb = "" if "metadata" in page else "/delete"
            answer = console.post(f"{at}/conversations/{target}{verb}", form)
            with client(world.url, world.callers["owner"]["authorization"][7:]) as http:
                kept = http.get(f"/v1/conversations/{world.conversation_id}")
            assert kept.status_code == 200 and kept.json()["metadata"] == {}
        else:
            # A form the owner's key may not send either (an admin's).
            answer = console.post(at + "/policy", {"rpm": "100000"})  # a limit nobody reaches
            allowed = {"admin"}
        expected = 303 if caller in allowed else 404 if caller in CONSOLE_NOT_FOUND else 403
        assert answer.status_code == expected, answer.text
        return
    path = {
        "project": at,
        "overview": at + "/overview",
        "responses": at + "/responses",
        "response": f"{at}/responses/{world.response_id}",
        "response events": f"{at}/responses/{world.response_id}/events",
        "conversations": at + "/conversations",
        "conversation": f"{at}/conversations/{world.conversation_id}",
    }[page]
    answer = console.get(path)
    if caller in CONSOLE_SEES:
        assert answer.status_code == 200, answer.text
        if page.startswith("response"):
            assert world.response_id in answer.text
        if page.startswith("conversation"):
            assert world.conversation_id in answer.text
    elif caller in CONSOLE_NOT_FOUND:
        # What a project that does not exist gets.
        unknown = console.get(path.replace(world.home, "proj_unknown"))
        assert (answer.status_code, unknown.status_code) == (404, 404)
        assert answer.text.replace(world.home, "proj_unknown") == unknown.text
        assert world.response_id not in answer.text
        assert world.conversation_id not in answer.text
    else:
        assert (answer.status_code, answer.headers["location"]) == (303, "/console/sign-in")


def _listed(page: httpx.Response) -> list[str]:
    """The responses a console's list of responses shows."""
    return re.findall(r'class="rid" href="[^"]+/(resp_\w+)"', page.text)


def test_a_search_finds_only_its_own_projects_responses(
    world: World, consoles: dict[str, ConsoleClient]
) -> None:
    """Every filter of a project's responses (text, metadata, session, the responses that
    continue one) reads that project only: a session sees another project's matches nowhere,
    and another project's list answers 404 as an unknown one does."""
    marker = uuid.uuid4().hex
    with httpx.Client(base_url=world.url, headers=world.callers["owner"]) as http:
        body = {"model": "fake-text", "input": f"secret {marker}", "metadata": {"tag": marker}}
        made = http.post("/v1/responses", json={**body, "session_id": marker}).json()
        body = {"model": "fake-text", "input": "more", "previous_response_id": made["id"]}
        follow = http.post("/v1/responses", json=body).json()
    searches = [
        {"text": marker},
        {"metadata": f"tag={marker}"},
        {"session_id": marker},
        {"previous_response_id": made["id"]},
    ]
    home = f"/console/projects/{world.home}/responses"
    for caller in [*CONSOLE_SEES, *CONSOLE_NOT_FOUND]:
        console = consoles[caller]
        own = console.get("/console").headers["location"].removesuffix("/overview")
        for search in searches:
            found = console.get(home, **search)
            if caller in CONSOLE_SEES:
                assert found.status_code == 200, (caller, search)
                expected = follow if "previous_response_id" in search else made
                assert _listed(found) == [expected["id"]]
                continue
            assert found.status_code == 404, (caller, search)
            assert made["id"] not in found.text
            mine = console.get(f"{own}/responses", **search)
            assert (mine.status_code, _listed(mine)) == (200, []), (caller, search)
    with AdminClient(world.url) as admin:
        for search in searches:
            elsewhere = admin.call("GET", f"/projects/{world.elsewhere}/responses", **search)
            assert elsewhere["data"] == [], search


def test_a_key_of_two_projects_sees_neither_ones_rows_under_the_other(world: World) -> None:
    """The owner's key may also act for `elsewhere`: its console session opens that project's
    pages, where the home project's response and conversation are the 404 an unknown one
    gets, as the API answers the same key with X-Project-ID (`same key, another project`)."""
    with signed_in(world.url, world.callers["owner"]["authorization"][7:]) as console:
        away = f"/console/projects/{world.elsewhere}"
        for path in ("/overview", "/responses", "/conversations"):
            page = console.get(away + path)
            assert page.status_code == 200, path
            assert world.response_id not in page.text
            assert world.conversation_id not in page.text
        for path in (
            f"/responses/{world.response_id}",
            f"/responses/{world.response_id}/events",
            f"/conversations/{world.conversation_id}",
        ):
            assert console.get(away + path).status_code == 404, path
        console.get(away + "/conversations")
        answer = console.post(f"{away}/conversations/{world.conversation_id}/delete")
        assert answer.status_code == 404


def test_keys_that_are_not_good_never_sign_in_to_the_console(world: World) -> None:
    with ConsoleClient(world.url) as console:
        for caller, says in (
            ("revoked key", "This API key has been revoked."),
            ("expired key", "This API key has expired."),
        ):
            refused = console.sign_in(world.callers[caller]["authorization"][7:])
            assert refused.status_code == 401 and says in refused.text, caller
        assert "relay_console" not in console.http.cookies


def test_the_owner_deletes_and_then_nobody_sees_it(world: World) -> None:
    with client(world.url, world.callers["owner"]["authorization"][7:]) as http:
        assert http.delete(f"/v1/responses/{world.response_id}").status_code == 200
        assert http.get(f"/v1/responses/{world.response_id}").status_code == 404
        at = f"/v1/conversations/{world.conversation_id}"
        assert http.delete(f"{at}/items/{world.item_id}").status_code == 200
        assert http.delete(at).status_code == 200
        assert http.get(at).status_code == 404


@pytest.mark.parametrize(
    ("headers", "code"),
    [
        ({}, "authentication_required"),
        ({"authorization": f"Bearer {CONFIG_KEY}"}, "authentication_required"),
        ({"x-admin-key": CONFIG_KEY}, "invalid_admin_key"),
        ({"x-admin-key": ADMIN_KEY + "x"}, "invalid_admin_key"),
    ],
)
@pytest.mark.parametrize(
    "path",
    [
        "/projects",
        "/keys",
        "/usage",
        "/audit_log",
        "/projects/x",
        "/keys/key_x",
        "/projects/x/prompts",
        "/projects/x/prompts/pmpt_x",
        "/projects/x/responses",
        "/projects/x/responses/resp_x",
        "/projects/x/responses/resp_x/input_items",
        "/projects/x/conversations",
        "/projects/x/conversations/conv_x",
        "/projects/x/conversations/conv_x/items",
        "/projects/x/spend",
        "/keys/key_x/spend",
        "/deployments",
    ],
)
def test_client_keys_never_open_the_admin_plane(
    world: World, headers: dict[str, str], code: str, path: str
) -> None:
    answer = httpx.get(f"{world.url}/admin/v1{path}", headers=headers)
    assert answer.status_code == 401
    assert answer.json()["error"]["code"] == code


@pytest.mark.parametrize("under", ["elsewhere", "proj_unknown"])
def test_the_admin_api_finds_a_template_only_under_its_project(world: World, under: str) -> None:
    """A template asked for under another project, or one that does not exist, is the 404
    an unknown id gets there, whatever is asked; and nothing changes."""
    project = world.elsewhere if under == "elsewhere" else under
    with AdminClient(world.url) as admin:
        for method, more, body in (
            ("GET", "", None),
            ("GET", "?version=1", None),
            ("POST", "/versions", {"instructions": "Taken over."}),
            ("DELETE", "", None),
        ):
            answers = [
                admin.http.request(
                    method, f"/admin/v1/projects/{project}/prompts/{prompt_id}{more}", json=body
                )
                for prompt_id in (world.prompt_id, UNKNOWN_PROMPT)
            ]
            errors = [answer.json()["error"] for answer in answers]
            errors[1]["message"] = errors[1]["message"].replace(UNKNOWN_PROMPT, world.prompt_id)
            assert [answer.status_code for answer in answers] == [404, 404]
            assert errors[0] == errors[1] and errors[0]["code"] == "prompt_not_found"
        if under == "elsewhere":
            listed = admin.call("GET", f"/projects/{project}/prompts")["data"]
            assert world.prompt_id not in [entry["id"] for entry in listed]
        mine = admin.call("GET", f"/projects/{world.home}/prompts/{world.prompt_id}")
    assert (mine["latest_version"], mine["status"]) == ("1", "active")


def test_a_database_key_never_opens_the_admin_plane(world: World) -> None:
    owner = world.callers["owner"]["authorization"][7:]
    for headers in ({"x-admin-key": owner}, {"authorization": f"Bearer {owner}"}):
        answer = httpx.post(f"{world.url}/admin/v1/projects", json={"name": "x"}, headers=headers)
        assert answer.status_code == 401


def test_a_project_the_key_may_not_pick_is_403(world: World) -> None:
    owner = world.callers["owner"]["authorization"][7:]
    for project in ("legacy", "proj_unknown", world.home + "x"):
        with client(world.url, owner, project=project) as http:
            answer = http.get("/v1/models")
        assert answer.status_code == 403
        assert answer.json()["error"]["code"] == "project_not_allowed"
