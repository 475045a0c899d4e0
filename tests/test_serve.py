"""`relay` as a new user meets it: what `relay serve` prints at start-up, and the mistakes of a
first hour (a misconfigured route or database, a port in use, `relay admin` run from the wrong
folder), each refused in one line that says what to do, with no traceback."""

from __future__ import annotations

import re
import secrets
import socket
from pathlib import Path

import orjson
import pytest
from db_fixtures import PgServer
from live_server import free_port, refused_in_one_line, relay, relay_serve

from relay import __version__


def sqlite_env(tmp_path: Path) -> dict[str, str]:
    return {"RELAY_DATABASE_URL": f"sqlite:///{tmp_path}/relay.db"}


TIME = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} ")


def test_start_up_shows_relay_not_the_migration_tool(tmp_path: Path) -> None:
    routes = [
        {"model": "fake-text", "provider": "fake", "upstream_model": "text"},
        {
            "model": "proxied",
            "base_url": "http://proxy-user:pw-4Kq9xZ@127.0.0.1:9/v1",
            "upstream_model": "llama3",
            "fallbacks": ["fake-text"],
        },
    ]
    env = {
        "RELAY_DATABASE_URL": f"sqlite:///{tmp_path}/relay.db",
        "RELAY_ROUTES": orjson.dumps(routes).decode(),
    }
    with relay_serve(env) as relay:
        pass
    # Relay's own lines begin with their time; uvicorn's do not.
    lines = [TIME.sub("", line) for line in relay.output.splitlines()]
    assert f"INFO relay: relay {__version__} on {relay.url} (1 worker)" in lines
    assert f"INFO relay: storage: sqlite:///{tmp_path}/relay.db" in lines
    assert any(line.startswith("WARNING relay: auth: no API keys") for line in lines)
    assert "INFO relay: model fake-text -> the fake provider's script 'text'" in lines
    assert (
        "INFO relay: model proxied -> 'llama3' at http://proxy-user:***@127.0.0.1:9/v1 "
        "(falls back to fake-text)"
    ) in lines
    assert "alembic" not in relay.output
    assert "pw-4Kq9xZ" not in relay.output


def test_help_and_version_on_stdout() -> None:
    helped = relay("--help")
    assert helped.returncode == 0 and helped.stderr == ""
    for command in ("serve", "worker", "admin", "check"):
        assert command in helped.stdout
    version = relay("--version")
    assert (version.returncode, version.stdout) == (0, f"relay {__version__}\n")
    assert relay("serve", "--help").returncode == 0


def test_config_mistakes_are_named_where_they_were_written(tmp_path: Path) -> None:
    routes = [
        {"model": "typo", "provider": "opeanai_chat", "base_url": "http://127.0.0.1:9/v1"},
        {"model": "inline", "base_url": "http://127.0.0.1:9/v1", "api_key_evn": "KEY"},
        {"model": "listed", "deployments": [{"provider": "anthropic", "api_key_evn": "KEY"}]},
        {"model": "scheme", "base_url": "htp://127.0.0.1:9/v1"},
    ]
    done = relay(
        "serve", env={**sqlite_env(tmp_path), "RELAY_ROUTES": orjson.dumps(routes).decode()}
    )
    assert done.returncode == 2
    assert done.stderr.splitlines() == [
        "relay: invalid configuration: routes.0.provider: must be one of openai_chat, "
        "openai_responses, anthropic, llama_cpp, fake",
        "relay: invalid configuration: routes.1.api_key_evn: Extra inputs are not permitted",
        "relay: invalid configuration: routes.2.deployments.0.api_key_evn: "
        "Extra inputs are not permitted",
        "relay: invalid configuration: routes.3.base_url: must begin with http:// or https://",
    ]


def test_a_redis_url_of_another_scheme_is_a_configuration_error(tmp_path: Path) -> None:
    env = {**sqlite_env(tmp_path), "RELAY_REDIS_URL": "http://user:pw-7Zr@cache:6379/0"}
    for command in ("serve", "check"):
        done = relay(command, env=env)
        line = refused_in_one_line(done, "redis_url")
        assert "redis://" in line and "pw-7Zr" not in done.stderr


@pytest.mark.parametrize("workers", ["1", "2"])
def test_a_file_that_is_not_a_database_is_one_line(tmp_path: Path, workers: str) -> None:
    (tmp_path / "relay.db").write_bytes(b"not a database, " * 256)
    env = {**sqlite_env(tmp_path), "RELAY_ROUTES": '[{"model": "m", "provider": "fake"}]'}
    done = relay("serve", "--port", str(free_port()), "--workers", workers, env=env)
    refused_in_one_line(done, f"cannot open the SQLite database {tmp_path}/relay.db")
    checked = relay("check", env=env)
    assert checked.returncode == 1 and "Traceback" not in checked.stderr
    assert "file is not a database" in checked.stdout


def test_a_postgresql_url_without_asyncpg_is_a_configuration_error(tmp_path: Path) -> None:
    done = relay("serve", env={"RELAY_DATABASE_URL": "postgresql://relay@127.0.0.1/relay"})
    line = refused_in_one_line(done, "database_url")
    assert "postgresql+asyncpg://" in line


@pytest.mark.parametrize("workers", ["1", "2"])
def test_postgresql_not_answering_is_one_line(tmp_path: Path, workers: str) -> None:
    """With --workers 2 too: uvicorn's supervisor exits 0 when its workers fail to start."""
    port = free_port()  # nothing listens there
    env = {
        "RELAY_DATABASE_URL": f"postgresql+asyncpg://relay:pw-9Xq@127.0.0.1:{port}/relay",
        "RELAY_ROUTES": '[{"model": "m", "provider": "fake"}]',
    }
    done = relay("serve", "--port", str(free_port()), "--workers", workers, env=env)
    line = refused_in_one_line(done, f"PostgreSQL at 127.0.0.1:{port} is not answering")
    assert "Connection refused" in line and "database_url" in line
    assert "pw-9Xq" not in done.stderr


@pytest.mark.postgres
def test_a_missing_database_is_one_line(pg_server: PgServer) -> None:
    name = f"relay_missing_{secrets.token_hex(4)}"
    env = {
        "RELAY_DATABASE_URL": pg_server.url(name),
        "RELAY_ROUTES": '[{"model": "m", "provider": "fake"}]',
    }
    done = relay("serve", "--port", str(free_port()), env=env)
    line = refused_in_one_line(done, f'has no database "{name}"')
    assert f"createdb {name}" in line


def test_a_port_in_use_is_refused_before_the_model_loads(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = relay("serve", "--port", str(port), env=sqlite_env(tmp_path))  # the bundled model
    line = refused_in_one_line(done, f"cannot listen on 127.0.0.1:{port} (Address already in use)")
    assert "--port" in line
    assert done.returncode == 1
    assert "loaded" not in done.stderr


def test_admin_names_its_database_and_never_makes_the_default_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("RELAY_DATABASE_URL", raising=False)  # none in the environment either
    done = relay("admin", "project", "list", cwd=tmp_path)
    assert "relay admin: database sqlite:///./data/relay.db" in done.stderr.splitlines()
    line = refused_in_one_line(done, "no database at data/relay.db")
    assert "--config" in line
    assert not (tmp_path / "data").exists()
    # A configured database is the user's choice (a team set up before the first start).
    config = tmp_path / "relay.toml"
    config.write_text(f'database_url = "sqlite:///{tmp_path}/team.db"\n')
    listed = relay("admin", "--config", str(config), "project", "list")
    assert listed.returncode == 0
    assert listed.stderr == f"relay admin: database sqlite:///{tmp_path}/team.db\n"
    assert orjson.loads(listed.stdout)["object"] == "list"
