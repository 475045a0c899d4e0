"""NUL characters on PostgreSQL, whose text cannot hold them: every way client or admin input
reaches SQL (path ids, query parameters, body fields stored in columns) answers a 400
`invalid_request_error` naming the field, with no traceback; text stored inside JSON (input,
metadata, item content) keeps them, escaped."""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import orjson
import pytest
from db_fixtures import PgServer
from live_server import ServeProcess, relay_serve

pytestmark = pytest.mark.postgres

ADMIN_KEY = f"adm-{secrets.token_hex(16)}"
CLIENT_KEY = f"sk-{secrets.token_hex(16)}"
NUL = "\x00"


@dataclass
class Served:
    relay: ServeProcess
    client: httpx.Client
    admin: httpx.Client
    project: str
    key: str
    response: str
    conversation: str
    item: str


@pytest.fixture(scope="module")
def served(pg_server: PgServer) -> Iterator[Served]:
    database = pg_server.create_database()
    env = {
        "RELAY_DATABASE_URL": pg_server.url(database),
        "RELAY_ROUTES": orjson.dumps(
            [{"model": "fake-text", "provider": "fake", "upstream_model": "text"}]
        ).decode(),
        "RELAY_ADMIN_KEYS": orjson.dumps([{"key": ADMIN_KEY, "name": "ops"}]).decode(),
        "RELAY_API_KEYS": orjson.dumps([{"key": CLIENT_KEY, "tenant": "tenant"}]).decode(),
    }
    try:
        with relay_serve(env) as relay:
            client = httpx.Client(
                base_url=relay.url, headers={"authorization": f"Bearer {CLIENT_KEY}"}, timeout=30
            )
            admin = httpx.Client(
                base_url=f"{relay.url}/admin/v1", headers={"x-admin-key": ADMIN_KEY}, timeout=30
            )
            with client, admin:
                project = admin.post("/projects", json={"name": "p"}).json()["id"]
                key = admin.post("/keys", json={"project_id": project}).json()["id"]
                response = client.post("/v1/responses", json={"model": "fake-text", "input": "x"})
                items = [{"role": "user", "content": "x"}]
                conversation = client.post("/v1/conversations", json={"items": items}).json()
                item = client.get(f"/v1/conversations/{conversation['id']}/items").json()
                yield Served(
                    relay,
                    client,
                    admin,
                    project,
                    key,
                    response.json()["id"],
                    conversation["id"],
                    item["data"][0]["id"],
                )
        assert "Traceback" not in relay.output, relay.output
        assert "Exception" not in relay.output, relay.output
    finally:
        pg_server.drop_database(database)


def refused(answer: httpx.Response, param: str) -> None:
    assert answer.status_code == 400, (answer.request.url, answer.text)
    error = answer.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param, error


def test_client_path_ids_and_queries(served: Served) -> None:
    http, conversation, item = served.client, served.conversation, served.item
    refused(http.get("/v1/conversations/conv_%00"), "conversation_id")
    refused(http.post("/v1/conversations/conv_%00", json={"metadata": {}}), "conversation_id")
    refused(http.delete("/v1/conversations/conv_%00"), "conversation_id")
    refused(http.get("/v1/conversations/conv_%00/items"), "conversation_id")
    refused(http.get(f"/v1/conversations/{conversation}/items/%00"), "item_id")
    refused(http.delete(f"/v1/conversations/{conversation}/items/{item}%00"), "item_id")
    refused(http.get(f"/v1/conversations/{conversation}/items?after=%00"), "after")
    refused(http.get("/v1/responses/resp_%00"), "response_id")
    refused(http.delete("/v1/responses/resp_%00"), "response_id")
    refused(http.post("/v1/responses/resp_%00/cancel"), "response_id")
    refused(http.get(f"/v1/responses/{served.response}/input_items?before=a%00"), "before")
    refused(http.get(f"/v1/responses/{served.response}?starting_after=%00"), "starting_after")


def test_client_bodies(served: Served) -> None:
    http = served.client

    def create(**body: Any) -> httpx.Response:
        return http.post("/v1/responses", json={"model": "fake-text", "input": "x", **body})

    refused(create(conversation=f"conv_{NUL}"), "conversation")
    refused(create(conversation={"id": f"conv_{NUL}"}), "conversation")
    refused(create(previous_response_id=f"resp_{NUL}"), "previous_response_id")
    refused(create(input=[{"role": "user", "content": "x", "id": f"msg_{NUL}"}]), "input[0].id")
    items = [{"role": "user", "content": "x", "id": f"msg_{NUL}"}]
    refused(http.post("/v1/conversations", json={"items": items}), "items[0].id")


def test_text_inside_json_is_kept(served: Served) -> None:
    http = served.client
    text = f"before{NUL}after"
    created = http.post(
        "/v1/responses",
        json={"model": "fake-text", "input": text, "metadata": {"note": text}},
    )
    assert created.status_code == 200, created.text
    response = created.json()
    assert response["metadata"] == {"note": text}
    items = http.get(f"/v1/responses/{response['id']}/input_items").json()["data"]
    assert items[0]["content"][0]["text"] == text
    conversation = http.post(
        "/v1/conversations",
        json={"items": [{"role": "user", "content": text}], "metadata": {"note": text}},
    )
    assert conversation.status_code == 200, conversation.text
    added = http.get(f"/v1/conversations/{conversation.json()['id']}/items").json()["data"]
    assert added[0]["content"][0]["text"] == text


def test_admin_paths_queries_and_bodies(served: Served) -> None:
    admin, project, key = served.admin, served.project, served.key
    refused(admin.get("/projects/proj_%00"), "project_id")
    refused(admin.post("/projects/proj_%00", json={"name": "x"}), "project_id")
    refused(admin.delete("/projects/proj_%00"), "project_id")
    refused(admin.get("/keys/key_%00"), "key_id")
    refused(admin.post("/keys/key_%00", json={"name": "x"}), "key_id")
    refused(admin.delete("/keys/key_%00"), "key_id")
    refused(admin.get("/projects?after=%00"), "after")
    refused(admin.get("/keys?project_id=%00"), "project_id")
    refused(admin.get("/keys?after=proj%00"), "after")
    refused(admin.get("/usage?project_id=%00"), "project_id")
    refused(admin.get("/usage?key_id=%00"), "key_id")
    refused(admin.get("/usage?start=2025-01-0%00"), "start")
    refused(admin.post("/projects", json={"name": f"a{NUL}"}), "name")
    refused(admin.post(f"/projects/{project}", json={"name": f"a{NUL}"}), "name")
    refused(admin.post("/keys", json={"project_id": f"{project}{NUL}"}), "project_id")
    refused(admin.post("/keys", json={"project_id": project, "name": NUL}), "name")
    refused(admin.post("/keys", json={"project_id": project, "models": ["a", NUL]}), "models[1]")
    refused(admin.post(f"/keys/{key}", json={"projects": [NUL]}), "projects[0]")
