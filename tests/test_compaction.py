"""POST /v1/responses/compact and the compaction items it returns: sealed, given back as input,
expanded for the upstream; refused when altered or not this server's and this tenant's."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from conformance import validator
from cryptography.fernet import Fernet
from websockets.sync.client import connect

from relay.errors import InvalidRequest
from relay.sealing import KEY_FILE, Sealer, load_keys

CONVERSATION = [
    {"role": "user", "content": "The project is called Heron."},
    {"role": "assistant", "content": "Noted: Heron."},
    {"role": "user", "content": "It ships on Friday."},
]


def compact(http: httpx.Client, **body: Any) -> dict[str, Any]:
    answer = http.post("/v1/responses/compact", json=body)
    assert answer.status_code == 200, answer.text
    result: dict[str, Any] = answer.json()
    errors = list(validator("CompactResource").iter_errors(result))
    assert not errors, errors
    return result


def test_compact_keeps_user_messages_and_seals_a_summary(http: httpx.Client) -> None:
    result = compact(http, model="fake-text", input=CONVERSATION)
    assert result["object"] == "response.compaction"
    *kept, item = result["output"]
    assert [m["content"][0]["text"] for m in kept] == [
        "The project is called Heron.",
        "It ships on Friday.",
    ]
    assert item["type"] == "compaction" and item["id"].startswith("cmp_")
    # The fake model's summary echoes the request for one ("You said: Summarise ..."): the
    # sealed content does not show it.
    assert "Summarise" not in item["encrypted_content"]
    assert result["usage"]["output_tokens"] > 0


def test_compact_needs_a_model(http: httpx.Client) -> None:
    answer = http.post("/v1/responses/compact", json={"input": "x"})
    assert answer.status_code == 400
    assert answer.json()["error"]["code"] == "missing_required_parameter"


def test_compact_continues_a_stored_chain(http: httpx.Client) -> None:
    first = http.post("/v1/responses", json={"model": "fake-text", "input": "alpha"}).json()
    result = compact(http, model="fake-text", input="beta", previous_response_id=first["id"])
    texts = [m["content"][0]["text"] for m in result["output"][:-1]]
    assert texts == ["alpha", "beta"]


def tampered(item: dict[str, Any]) -> dict[str, Any]:
    token = item["encrypted_content"]
    return {
        **item,
        "encrypted_content": token[:20] + ("A" if token[20] != "A" else "B") + token[21:],
    }


@pytest.mark.parametrize(
    "bad",
    [
        tampered,
        lambda item: {**item, "encrypted_content": "opaque-from-another-provider"},
        lambda item: {
            **item,
            "encrypted_content": Fernet(Fernet.generate_key()).encrypt(b"{}").decode(),
        },
    ],
)
def test_an_altered_or_foreign_compaction_item_is_a_400(http: httpx.Client, bad: Any) -> None:
    item = compact(http, model="fake-text", input=CONVERSATION)["output"][-1]
    answer = http.post(
        "/v1/responses",
        json={"model": "fake-text", "input": [bad(item), {"role": "user", "content": "hi"}]},
    )
    assert answer.status_code == 400
    error = answer.json()["error"]
    assert error["code"] == "invalid_encrypted_content"
    assert error["param"] == "input[0].encrypted_content"


def test_a_compaction_item_is_its_tenants_only(keyed_url: str) -> None:
    with (
        httpx.Client(base_url=keyed_url, headers={"authorization": "Bearer sk-alice"}) as alice,
        httpx.Client(base_url=keyed_url, headers={"authorization": "Bearer sk-bob"}) as bob,
    ):
        item = compact(alice, model="fake-text", input=CONVERSATION)["output"][-1]
        body = {"model": "fake-text", "input": [item]}
        assert alice.post("/v1/responses", json=body).status_code == 200
        refused = bob.post("/v1/responses", json=body)
        assert refused.status_code == 400
        assert refused.json()["error"]["code"] == "invalid_encrypted_content"


def test_a_compacted_window_starts_a_new_chain_on_a_websocket(relay_url: str) -> None:
    # The official suite's websocket-compact-new-chain, as a test of ours.
    with httpx.Client(base_url=relay_url) as http:
        result = compact(http, model="fake-text", input=CONVERSATION)
    with connect(relay_url.replace("http://", "ws://") + "/v1/responses") as socket:
        body = {
            "type": "response.create",
            "model": "fake-text",
            "input": [*result["output"], {"role": "user", "content": "next"}],
            "tools": [],
            "store": False,
        }
        socket.send(orjson.dumps(body).decode())
        while (event := orjson.loads(socket.recv(timeout=10)))["type"] not in (
            "response.completed",
            "response.failed",
            "error",
        ):
            pass
    assert event["type"] == "response.completed", event


def test_keys_rotate_and_are_generated_once(tmp_path: Path) -> None:
    generated = load_keys([], tmp_path)
    assert load_keys([], tmp_path) == generated  # read back, not made again
    assert (tmp_path / KEY_FILE).stat().st_mode & 0o777 == 0o600
    old = Sealer(generated)
    token = old.seal("acme", "compaction", {"summary": "s"})
    new_key = Fernet.generate_key()
    rotated = Sealer([new_key, *generated])  # the new key seals; the old one still opens
    assert rotated.unseal("acme", "compaction", token, "p") == {"summary": "s"}
    with pytest.raises(InvalidRequest):
        old.unseal("acme", "compaction", rotated.seal("acme", "compaction", {}), "p")  # new seals
    with pytest.raises(InvalidRequest):
        Sealer([new_key]).unseal("acme", "compaction", token, "p")  # the old key retired
    with pytest.raises(InvalidRequest):
        old.unseal("acme", "reasoning", token, "p")  # sealed for another purpose


def test_a_bad_sealing_key_is_a_clear_configuration_error(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from relay.cli import main

    monkeypatch.setenv("RELAY_SEALING_KEYS", '["not-a-fernet-key-0123"]')
    assert main(["serve"]) == 2
    err = capsys.readouterr().err
    assert "sealing_keys" in err and "not-a-fernet-key-0123" not in err


def test_workers_starting_together_agree_on_the_generated_key(tmp_path: Path) -> None:
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(8) as pool:
        keys = list(pool.map(lambda _: load_keys([], tmp_path), range(32)))
    assert all(key == keys[0] for key in keys)
    assert sorted(p.name for p in tmp_path.iterdir()) == [KEY_FILE]  # no drafts left
