"""The production topology: two `relay serve --workers 2` behind a round-robin nginx, on one
PostgreSQL and one Redis (`redis_url`: limits shared between the instances), keys made with
the admin API, routes with a price so that every response is billed against a budget."""

from __future__ import annotations

import secrets
from collections.abc import Mapping
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

from bench import peers
from bench.balancer import start_balancer
from bench.datastores import Datastores, start_datastores
from bench.keyed_relay import POLICY, admin_key_settings, provision

INSTANCES = 2
WORKERS = 2
# Limits high enough never to bind (every check is paid) and a budget that is never reached.
PRODUCTION_POLICY: Mapping[str, object] = {**POLICY, "daily_budget_usd": 1_000_000.0}
# USD per million tokens: the canned answer's 9 + 9 tokens cost a little on every response.
ROUTE_PRICE = ["price = { input = 0.15, output = 0.60 }"]


@dataclass
class Topology:
    relays: list[peers.ManagedProcess]
    balancer: peers.ManagedProcess
    stores: Datastores
    base: str  # the balancer's URL: where clients go
    admin_key: str

    def pids(self) -> list[int]:
        """Every Relay process (supervisors and workers of all instances)."""
        return [pid for relay in self.relays for pid in relay.pids()]

    def key(self, policy: Mapping[str, object] = PRODUCTION_POLICY) -> str:
        """A fresh project with `policy` and a database key of it."""
        return provision(self.base, self.admin_key, policy)

    def log_tail(self, lines: int = 15) -> str:
        return "\n".join(relay.log_tail(lines) for relay in self.relays)


def start_topology(stack: ExitStack, workdir: Path, upstream: str) -> Topology:
    """Start it all (stopped when `stack` closes); the instances start one after the other, so
    that the first creates the schema."""
    stores = start_datastores("relay", workdir)
    stack.callback(stores.stop)
    admin_key = "adm-" + secrets.token_urlsafe(16)
    settings = [f'redis_url = "{stores.redis.url}"', *admin_key_settings(admin_key)]
    relays, ports = [], []
    for number in range(1, INSTANCES + 1):
        port = peers.free_port()
        relay = peers.start_relay(
            workdir / f"relay-{number}", upstream, port, WORKERS,
            database=stores.postgres.url, settings=settings, route_settings=ROUTE_PRICE,
        )  # fmt: skip
        stack.callback(relay.stop)
        relays.append(relay)
        ports.append(port)
    port = peers.free_port()
    balancer = start_balancer(workdir, port, ports)
    stack.callback(balancer.stop)
    return Topology(relays, balancer, stores, f"http://127.0.0.1:{port}", admin_key)
