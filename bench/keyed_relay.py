"""Relays that authenticate and limit, for the gateway benchmark: a database key in a project
with every limit on (requests, tokens and concurrency per minute, high enough never to bind),
limits counted in-process, and the same with limits shared through Redis when one answers on
127.0.0.1:6379. Their overhead beside the keyless Relay's is the price of keys and limits."""

from __future__ import annotations

import secrets
import socket
from collections.abc import Mapping
from contextlib import ExitStack
from pathlib import Path

import httpx

from bench import peers
from bench.loadgen import PROMPT, Target

REDIS = ("127.0.0.1", 6379)
# High enough never to bind during the benchmark, so every request pays for every check.
POLICY = {"rpm": 100_000_000, "tpm": 1_000_000_000_000, "max_concurrent": 100_000}


def redis_answers() -> bool:
    try:
        with socket.create_connection(REDIS, timeout=1) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(16).startswith(b"+PONG")
    except OSError:
        return False


def admin_key_settings(admin_key: str) -> list[str]:
    """The lines of Relay's TOML file that accept `admin_key` on the admin API."""
    return ["", "[[admin_keys]]", f'key = "{admin_key}"']


def provision(base: str, admin_key: str, policy: Mapping[str, object] = POLICY) -> str:
    """A project with `policy` and a key of it (through the admin API); the key."""
    headers = {"x-admin-key": admin_key}
    with httpx.Client(base_url=base, headers=headers, trust_env=False) as admin:
        body = {"name": "bench", "policy": dict(policy)}
        project = admin.post("/admin/v1/projects", json=body)
        project.raise_for_status()
        key = admin.post("/admin/v1/keys", json={"project_id": project.json()["id"]})
        key.raise_for_status()
        value: str = key.json()["value"]
        return value


def start_keyed_relays(
    stack: ExitStack, workdir: Path, upstream: str, workers: int
) -> list[tuple[Target, peers.ManagedProcess]]:
    admin_key = "adm-" + secrets.token_urlsafe(16)
    variants: list[tuple[str, list[str]]] = [("relay keyed store=false", [])]
    if redis_answers():
        # Database 15: the benchmark's own counters, apart from anything else on this Redis.
        variants.append(
            ("relay keyed+redis store=false", ['redis_url = "redis://127.0.0.1:6379/15"'])
        )
    else:
        print("relay keyed+redis: skipped, no Redis answers on 127.0.0.1:6379", flush=True)
    found = []
    for name, extra in variants:
        port = peers.free_port()
        settings = [*extra, *admin_key_settings(admin_key)]
        slug = name.split()[1].replace("+", "-")
        relay = peers.start_relay(
            workdir / f"relay-{slug}", upstream, port, workers, settings=settings
        )
        stack.callback(relay.stop)
        base = f"http://127.0.0.1:{port}"
        headers = {"Authorization": f"Bearer {provision(base, admin_key)}"}
        body = {"model": "bench-json", "input": PROMPT, "store": False}
        stream_body = {"model": "bench-sse", "input": PROMPT, "store": False, "stream": True}
        url = f"{base}/v1/responses"
        found.append((Target(name, url, body, url, stream_body, headers), relay))
    return found
