"""Embedded model: tokens per second streamed through Relay over HTTP vs llama.cpp called
directly in-process, same prompt, same settings, same number of tokens.

Both sides generate exactly TOKENS tokens (temperature 0 on a prompt the model does not end
early; checked, not assumed) and are timed from the request to the last token. The ratio is
Relay's rate over the direct rate; the target is at least 0.9.
"""

from __future__ import annotations

import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import orjson
from llama_cpp import Llama
from llama_cpp.llama_chat_format import Jinja2ChatFormatter

from relay.providers.llama_local import BUNDLED_MODEL_NAME, bundled_model_path

PROMPT = "Write a very long story about a lighthouse keeper and the sea."
TOKENS = 256
TARGET = 0.9


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def direct_rate(llama: Llama, rounds: int) -> list[float]:
    """Tokens per second of llama.cpp itself, streaming, with Relay's prompt formatting."""
    template = llama.metadata["tokenizer.chat_template"]
    formatter = Jinja2ChatFormatter(
        template,
        eos_token=llama.detokenize([llama.token_eos()], special=True).decode(),
        bos_token=llama.detokenize([llama.token_bos()], special=True).decode(),
    )
    formatted = formatter(messages=[{"role": "user", "content": PROMPT}])
    rates = []
    for _ in range(rounds):
        started = time.perf_counter()
        prompt = llama.tokenize(
            formatted.prompt.encode(), add_bos=not formatted.added_special, special=True
        )
        pieces = 0
        for chunk in llama.create_completion(
            prompt,
            max_tokens=TOKENS,
            temperature=0.0,
            top_p=1.0,
            top_k=0,
            min_p=0.0,
            stream=True,
            stop=formatted.stop,
        ):
            if chunk["choices"][0]["text"]:  # type: ignore[index]
                pieces += 1
            finish = chunk["choices"][0]["finish_reason"]  # type: ignore[index]
        elapsed = time.perf_counter() - started
        assert finish == "length", f"direct generation ended early ({finish}); change PROMPT"
        rates.append(TOKENS / elapsed)
    return rates


def relay_rate(base_url: str, rounds: int) -> list[float]:
    rates = []
    body = {
        "model": BUNDLED_MODEL_NAME,
        "input": PROMPT,
        "temperature": 0,
        "max_output_tokens": TOKENS,
        "stream": True,
    }
    with httpx.Client(base_url=base_url, timeout=300) as client:
        for _ in range(rounds):
            started = time.perf_counter()
            final = None
            with client.stream("POST", "/v1/responses", json=body) as answer:
                for line in answer.iter_lines():
                    if line.startswith("data: {") and '"response.incomplete"' in line:
                        final = orjson.loads(line[6:])["response"]
            elapsed = time.perf_counter() - started
            assert final is not None, "Relay's stream did not end in response.incomplete"
            assert final["usage"]["output_tokens"] == TOKENS, final["usage"]
            rates.append(TOKENS / elapsed)
    return rates


def start_relay(port: int, workdir: Path, **settings: str) -> subprocess.Popen[bytes]:
    """`relay serve` on `port` with SQLite in `workdir`, one process, and RELAY_* `settings`;
    returned once it answers /healthz."""
    env = {
        **os.environ,
        "RELAY_DATABASE_URL": f"sqlite:///{workdir}/relay.db",
        "RELAY_LOG_LEVEL": "warning",
        **settings,
    }
    process = subprocess.Popen(
        [sys.executable, "-m", "relay.cli", "serve", "--port", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                return process
        except httpx.TransportError:
            time.sleep(0.1)
    process.kill()
    raise RuntimeError(
        "Relay did not start: " + (process.stderr.read() if process.stderr else b"").decode()
    )


def main(quick: bool = False) -> None:
    rounds = 2 if quick else 5
    llama = Llama(str(bundled_model_path()), n_ctx=4096, verbose=False)
    direct_rate(llama, 1)  # warm-up: page the weights in
    with tempfile.TemporaryDirectory() as workdir:
        port = free_port()
        relay = start_relay(port, Path(workdir))
        try:
            base_url = f"http://127.0.0.1:{port}"
            relay_rate(base_url, 1)  # warm-up
            # Interleaved, so that both sides see the same machine conditions.
            direct: list[float] = []
            through: list[float] = []
            for _ in range(rounds):
                direct += direct_rate(llama, 1)
                through += relay_rate(base_url, 1)
        finally:
            relay.terminate()
            relay.wait(10)
    ratio = statistics.median(through) / statistics.median(direct)
    print(f"\nEmbedded model: {TOKENS}-token streamed generation, {rounds} interleaved rounds")
    print(f"{'path':<34}{'median tok/s':>14}{'min':>9}{'max':>9}")
    for name, rates in (
        ("llama-cpp-python, in-process", direct),
        ("Relay /v1/responses over HTTP", through),
    ):
        print(f"{name:<34}{statistics.median(rates):>14.1f}{min(rates):>9.1f}{max(rates):>9.1f}")
    verdict = "PASS" if ratio >= TARGET else "FAIL"
    print(f"ratio Relay/direct: {ratio:.3f} (target >= {TARGET}: {verdict})")
