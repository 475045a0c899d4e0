"""Bearer keys, tenants, and the endpoints every client probes."""

from __future__ import annotations

from pathlib import Path

import httpx
import openai
import pytest
from live_server import running
from pydantic import SecretStr
from relay_fixtures import checked_client, fake_routes, sdk_client

from relay.api.app import create_app
from relay.config import ApiKeyConfig, Settings
from relay.observe.metrics import Metrics


def test_missing_and_wrong_keys_are_401(keyed_url: str) -> None:
    with checked_client(keyed_url) as anonymous:
        missing = anonymous.post("/v1/responses", json={"model": "fake-text", "input": "x"})
    assert missing.status_code == 401
    assert missing.json()["error"]["code"] == "authentication_required"
    wrong = httpx.get(f"{keyed_url}/v1/models", headers={"authorization": "Bearer sk-mallory"})
    assert wrong.status_code == 401 and wrong.json()["error"]["code"] == "invalid_api_key"
    assert "sk-mallory" not in wrong.text
    with pytest.raises(openai.AuthenticationError), sdk_client(keyed_url, "sk-nope") as nope:
        nope.models.list()


def test_tenants_never_see_each_other(keyed_url: str) -> None:
    with sdk_client(keyed_url, "sk-alice") as alice, sdk_client(keyed_url, "sk-bob") as bob:
        check_isolation(alice, bob)


def check_isolation(alice: openai.OpenAI, bob: openai.OpenAI) -> None:
    mine = alice.responses.create(model="fake-text", input="alice's secret")
    assert alice.responses.retrieve(mine.id).id == mine.id
    with pytest.raises(openai.NotFoundError):
        bob.responses.retrieve(mine.id)
    with pytest.raises(openai.NotFoundError):
        bob.responses.delete(mine.id)
    with pytest.raises(openai.NotFoundError):
        bob.responses.input_items.list(mine.id)
    with pytest.raises(openai.BadRequestError) as refused:
        bob.responses.create(model="fake-text", input="x", previous_response_id=mine.id)
    assert refused.value.code == "previous_response_not_found"
    message_id = mine.output[0].id
    with pytest.raises(openai.BadRequestError):
        bob.responses.create(
            model="fake-text", input=[{"type": "item_reference", "id": message_id}]
        )  # type: ignore[list-item]
    assert alice.responses.retrieve(mine.id).status == "completed"  # bob deleted nothing


def test_models_health_and_api_prefix(keyed_url: str) -> None:
    headers = {"authorization": "Bearer sk-alice"}
    models = httpx.get(f"{keyed_url}/v1/models", headers=headers).json()
    assert models["object"] == "list"
    assert {"fake-text", "fake-tool_call"} <= {m["id"] for m in models["data"]}
    assert all(m["object"] == "model" for m in models["data"])
    assert httpx.get(f"{keyed_url}/healthz").json() == {"status": "ok"}
    prefixed = httpx.post(
        f"{keyed_url}/api/v1/responses",
        headers=headers,
        json={"model": "fake-text", "input": "via api"},
    )
    assert prefixed.status_code == 200
    assert (
        httpx.get(
            f"{keyed_url}/api/v1/responses/{prefixed.json()['id']}", headers=headers
        ).status_code
        == 200
    )
    info = httpx.get(f"{keyed_url}/v1/responses", headers=headers)
    assert info.status_code == 200 and "POST /responses" in info.json()["methods"]


def test_cli_refuses_open_public_bind(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from relay.cli import main

    monkeypatch.setenv("RELAY_CONFIG", "")  # main() sets it; restored after the test
    config = tmp_path / "relay.toml"
    config.write_text('host = "0.0.0.0"\n[[routes]]\nmodel = "m"\nprovider = "fake"\n')
    assert main(["serve", "--config", str(config)]) == 2
    assert "refusing to serve on 0.0.0.0 without API keys" in capsys.readouterr().err


def test_config_errors_name_the_field_not_the_secret(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from relay.cli import main

    monkeypatch.setenv("RELAY_CONFIG", "")
    config = tmp_path / "relay.toml"
    config.write_text('[[api_keys]]\nkey = "sk-inline-secret-123456"\ntennant = "acme"\n')
    assert main(["serve", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert "api_keys.0.tennant" in err and "sk-inline-secret-123456" not in err
    config.write_text('[[routes]]\nmodel = "m"\napi_key_evn = "X"\nbase_url = "http://x"\n')
    assert main(["serve", "--config", str(config)]) == 2
    assert "api_key_evn" in capsys.readouterr().err


async def test_without_keys_only_loopback_clients_are_served() -> None:
    from starlette.requests import Request

    from relay.access.gate import OPEN_TENANT, Access, Credentials
    from relay.errors import PermissionDenied
    from relay.storage.database import open_database

    db = await open_database("sqlite://")
    gate = Access(Settings(), Credentials({}, {}), db, Metrics())

    def request_from(host: str) -> Request:
        return Request({"type": "http", "headers": [], "client": (host, 5000)})

    try:
        assert (await gate.principal(request_from("127.0.0.1"))).project == OPEN_TENANT
        assert (await gate.principal(request_from("::1"))).project == OPEN_TENANT
        with pytest.raises(PermissionDenied):
            await gate.principal(request_from("192.0.2.10"))
    finally:
        await gate.aclose()
        await db.close()


def test_the_app_keeps_only_digests_of_the_keys(tmp_path: Path) -> None:
    key = "sk-plain-key-kept-nowhere-4Qx9"
    settings = Settings(
        database_url=f"sqlite:///{tmp_path}/relay.db",
        routes=fake_routes(),
        api_keys=[ApiKeyConfig(key=SecretStr(key), tenant="acme")],
    )
    app = create_app(settings)
    with running(app) as url:
        models = httpx.get(f"{url}/v1/models", headers={"authorization": f"Bearer {key}"})
        assert models.status_code == 200
        state = app.app.state  # type: ignore[attr-defined]
        assert state.settings.api_keys == []
        kept = repr(state.settings.model_dump()) + repr(state.access.keys.config_keys)
        assert key not in kept and "acme" in kept
