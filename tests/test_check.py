"""`relay check`: the configuration, the database, Redis and every upstream's models endpoint,
tried as `relay serve` would need them, one row each; exit 1 when any failed. No credential
is ever printed."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from anthropic_upstream import ANTHROPIC_KEY, AnthropicUpstream
from chat_upstream import UPSTREAM_KEY, ChatUpstream
from db_fixtures import PgServer
from live_server import free_port, relay

from relay.storage.revision import head_revision

WRONG_KEY = "sk-wrong-4Tz8qLm2Xv"
ENV = {"CHAT_KEY": UPSTREAM_KEY, "CLAUDE_KEY": ANTHROPIC_KEY, "WRONG_KEY": WRONG_KEY}


def config_file(path: Path, routes: list[dict[str, Any]], **settings: str) -> Path:
    """relay.toml with `settings` and `routes` (JSON strings and lists are TOML values)."""
    lines = [f"{name} = {orjson.dumps(value).decode()}" for name, value in settings.items()]
    for route in routes:
        lines.append("[[routes]]")
        lines += [f"{name} = {orjson.dumps(value).decode()}" for name, value in route.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


def check(config: Path) -> tuple[int, list[list[str]], str]:
    """The exit status, the table's rows (component, target, status, detail), all output."""
    done = relay("check", "--config", str(config), "--timeout", "3", env=ENV)
    lines = done.stdout.splitlines()
    assert re.split(r"\s{2,}", lines[0]) == ["component", "target", "status", "detail"]
    rows = [re.split(r"\s{2,}", line, maxsplit=3) for line in lines[1:]]
    return done.returncode, rows, done.stdout + done.stderr


@pytest.fixture(scope="module")
def chat() -> Iterator[ChatUpstream]:
    with ChatUpstream(api_key=UPSTREAM_KEY) as upstream:
        yield upstream


def test_a_row_for_every_part_and_exit_1_when_one_fails(tmp_path: Path, chat: ChatUpstream) -> None:
    closed = free_port()
    routes = [
        {"model": "llama", "base_url": chat.base_url, "upstream_model": "echo",
         "api_key_env": "CHAT_KEY"},
        {"model": "wrong-key", "base_url": chat.base_url, "api_key_env": "WRONG_KEY"},
        {"model": "gone", "base_url": f"http://proxy:pw-7Hq2@127.0.0.1:{closed}/v1"},
        {"model": "typo", "base_url": chat.base_url.removesuffix("/v1"), "api_key_env": "CHAT_KEY"},
        {"model": "local", "provider": "fake"},
    ]  # fmt: skip
    config = config_file(
        tmp_path / "relay.toml",
        routes,
        database_url=f"sqlite:///{tmp_path}/relay.db",
        redis_url=f"redis://:pw-r3dX@127.0.0.1:{closed}/0",
    )
    status, rows, output = check(config)
    assert status == 1
    assert [row[:3] for row in rows] == [
        ["config", str(config), "ok"],
        ["database", f"sqlite:///{tmp_path}/relay.db", "ok"],
        ["redis", f"redis://:***@127.0.0.1:{closed}/0", "error"],
        ["upstream", f"llama/openai_chat {chat.base_url}", "ok"],
        ["upstream", f"wrong-key/openai_chat {chat.base_url}", "error"],
        ["upstream", f"gone/openai_chat http://proxy:***@127.0.0.1:{closed}/v1", "error"],
        ["upstream", f"typo/openai_chat {chat.base_url.removesuffix('/v1')}", "error"],
        ["upstream", "local/fake", "skipped"],
    ]
    details = [row[3] for row in rows]
    assert details[0] == "5 routes, 5 deployments, 0 API keys, 0 admin keys"
    assert details[1] == "not created yet: relay serve creates it"
    assert f"connecting to 127.0.0.1:{closed}" in details[2]
    assert re.fullmatch(r"'echo' is among the \d+ models it lists", details[3])
    assert details[4] == (
        "the upstream refused the credentials of deployment 'openai_chat' (HTTP 401); it sent "
        "its key, from the environment variable WRONG_KEY"
    )
    assert details[5].startswith(f"could not connect to the upstream: 127.0.0.1:{closed}")
    assert f"HTTP 404 from {chat.base_url.removesuffix('/v1')}/models" in details[6]
    assert details[7] == "in-process"
    for secret in (UPSTREAM_KEY, WRONG_KEY, "pw-7Hq2", "pw-r3dX"):
        assert secret not in output
    assert not (tmp_path / "relay.db").exists()  # looked at, not made


@pytest.mark.postgres
def test_exit_0_when_everything_answers(
    tmp_path: Path, chat: ChatUpstream, pg_server: PgServer, redis_url: str
) -> None:
    database = pg_server.create_database()
    try:
        with AnthropicUpstream(api_key=ANTHROPIC_KEY) as claude:
            routes = [
                {"model": "llama", "base_url": chat.base_url, "upstream_model": "echo",
                 "api_key_env": "CHAT_KEY"},
                {"model": "claude", "provider": "anthropic", "base_url": claude.base_url,
                 "upstream_model": "thinking", "api_key_env": "CLAUDE_KEY"},
                {"model": "unlisted", "base_url": chat.base_url, "api_key_env": "CHAT_KEY"},
            ]  # fmt: skip
            url = pg_server.url(database).replace("@", ":pw-pG5z@", 1)  # trust: not checked
            config = config_file(
                tmp_path / "relay.toml", routes, database_url=url, redis_url=redis_url
            )
            status, rows, output = check(config)
    finally:
        pg_server.drop_database(database)
    assert status == 0, output
    assert [row[2] for row in rows] == ["ok", "ok", "ok", "ok", "ok", "warn"]
    assert rows[1][1:] == [
        url.replace(":pw-pG5z@", ":***@"),
        "ok",
        f"no schema: relay serve migrates it to {head_revision()}",
    ]
    assert rows[2][1:] == [redis_url, "ok", "answered PING"]
    assert re.fullmatch(r"'thinking' is among the \d+ models it lists", rows[4][3])
    # Listed or not is for the user to judge: some upstreams leave aliases out of the list.
    assert re.fullmatch(r"'unlisted' is not among the \d+ models it lists", rows[5][3])
    assert "pw-pG5z" not in output and ANTHROPIC_KEY not in output
