"""`relay serve` as a new user meets it: what it prints at start-up."""

from __future__ import annotations

from pathlib import Path

import orjson
from live_server import relay_serve

from relay import __version__


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
    lines = relay.output.splitlines()
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
