"""nginx as a round-robin load balancer in front of Relay instances (bench/nginx/balancer.conf.in),
as a team runs two or more `relay serve` behind one address."""

from __future__ import annotations

from pathlib import Path
from string import Template

from bench.peers import ManagedProcess
from bench.upstream_nginx import NGINX_DIR, run_nginx


def start_balancer(workdir: Path, port: int, backends: list[int]) -> ManagedProcess:
    """nginx on `port`, spreading requests over the loopback `backends` ports in turn."""
    prefix = workdir / "balancer"
    prefix.mkdir(parents=True, exist_ok=True)
    servers = "\n".join(f"        server 127.0.0.1:{backend};" for backend in backends)
    template = Template((NGINX_DIR / "balancer.conf.in").read_text())
    config = prefix / "nginx.conf"
    config.write_text(template.substitute(prefix=str(prefix), port=port, servers=servers))
    proc = run_nginx(prefix, config, f"http://127.0.0.1:{port}/healthz")
    proc.name = "balancer"
    return proc
