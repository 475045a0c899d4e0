#!/usr/bin/env bash
# Build Relay's image from the Dockerfile at the repository's root with podman, on a machine
# that may reach no container registry (only a Debian mirror and PyPI): the Dockerfile's base,
# debian:bookworm-slim, is made here with debootstrap when local storage does not hold it yet,
# then reused. With a registry at hand, `docker build -t relay .` builds the same image.
#
#   deploy/build-image.sh [TAG]          TAG defaults to relay:latest (`make image`)
#
# Environment: LLAMA_CMAKE_ARGS (llama.cpp's build flags, passed by the Makefile),
# DEBIAN_MIRROR, DEBIAN_SECURITY_MIRROR, and BUILD_CA_BUNDLE: behind a proxy that re-signs
# TLS, a CA bundle (PEM) for pip to trust in the build (the Dockerfile's secret pip-cert). Needs podman, and root with debootstrap to make the
# base (`apt-get install podman debootstrap`). `podman pull debian:bookworm-slim` beforehand
# uses Debian's own base instead. Storage and runtime are podman's (containers.conf,
# storage.conf, STORAGE_DRIVER=vfs where overlay mounts are not allowed).
set -euo pipefail

TAG=${1:-relay:latest}
BASE=docker.io/library/debian:bookworm-slim
SUITE=bookworm
DEBIAN_MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
DEBIAN_SECURITY_MIRROR=${DEBIAN_SECURITY_MIRROR:-http://deb.debian.org/debian-security}

cd "$(dirname "$0")/.."

say() { printf 'build-image: %s\n' "$*" >&2; }

command -v podman >/dev/null || { say "podman is not installed (apt-get install podman)"; exit 1; }

root=
remove_root() {
    [ -n "$root" ] || return 0
    umount "$root/proc" 2>/dev/null || true
    # --one-file-system: nothing still mounted inside is deleted through it.
    rm -rf --one-file-system "$root"
    root=
}

# A Debian bookworm root as Debian's slim image is made (debuerreotype's "slimify"): minbase,
# no documentation, manuals or translations (now or from later installs), no apt caches.
make_base() {
    [ "$(id -u)" = 0 ] || { say "making the base image needs root (debootstrap)"; exit 1; }
    command -v debootstrap >/dev/null || { say "debootstrap is not installed"; exit 1; }
    root=$(mktemp -d /var/tmp/relay-base.XXXXXX)
    trap remove_root EXIT
    say "making $BASE with debootstrap from $DEBIAN_MIRROR"
    debootstrap --variant=minbase "$SUITE" "$root" "$DEBIAN_MIRROR" >&2

    cat >"$root/etc/dpkg/dpkg.cfg.d/docker" <<'EOF'
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/groff/*
path-exclude /usr/share/info/*
path-exclude /usr/share/linda/*
path-exclude /usr/share/lintian/*
path-exclude /usr/share/locale/*
path-include /usr/share/locale/locale.alias
path-exclude /usr/share/man/*
EOF
    cat >"$root/etc/apt/apt.conf.d/docker-clean" <<'EOF'
DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
APT::Update::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
Dir::Cache::pkgcache "";
Dir::Cache::srcpkgcache "";
EOF
    echo 'Acquire::Languages "none";' >"$root/etc/apt/apt.conf.d/docker-no-languages"
    echo 'Acquire::GzipIndexes "true";' >"$root/etc/apt/apt.conf.d/docker-gzip-indexes"
    echo 'Apt::AutoRemove::SuggestsImportant "false";' \
        >"$root/etc/apt/apt.conf.d/docker-autoremove-suggests"
    rm -f "$root/etc/apt/sources.list"
    cat >"$root/etc/apt/sources.list.d/debian.sources" <<EOF
Types: deb
URIs: $DEBIAN_MIRROR
Suites: $SUITE $SUITE-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: $DEBIAN_SECURITY_MIRROR
Suites: $SUITE-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
    # Security updates since the point release debootstrap installed.
    mount -t proc proc "$root/proc"
    chroot "$root" sh -c 'apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get upgrade -qq -y' >&2
    umount "$root/proc"

    find "$root/usr/share/doc" -mindepth 1 ! -type d ! -name copyright -delete
    find "$root/usr/share/doc" -mindepth 1 -type d -empty -delete
    find "$root/usr/share/locale" -mindepth 1 -maxdepth 1 ! -name locale.alias -exec rm -rf {} +
    rm -rf "$root"/usr/share/{groff,info,linda,lintian,man}/* \
        "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/* "$root"/var/log/*.log \
        "$root"/var/cache/ldconfig/aux-cache "$root"/tmp/* "$root"/var/tmp/*
    # Not the host's: a container engine provides its own.
    rm -f "$root/etc/resolv.conf"
    : >"$root/etc/hostname"

    tar -C "$root" --numeric-owner -c . | podman import \
        --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        --change 'CMD ["bash"]' \
        --message "debootstrap --variant=minbase $SUITE, slimmed" - "$BASE" >/dev/null
    remove_root
}

if podman image exists "$BASE"; then
    say "using $BASE from local storage"
else
    make_base
fi

say "building $TAG (the first build compiles llama.cpp: several minutes)"
start=$(date +%s)
# chroot isolation and the host's network: RUN steps need no OCI runtime, cgroups or network
# set-up (which locked-down build machines often lack), and reach the Debian mirror and PyPI.
# The docker format keeps the HEALTHCHECK (OCI image configs have none).
build_args=()
if [ -n "${LLAMA_CMAKE_ARGS:-}" ]; then
    build_args+=(--build-arg "LLAMA_CMAKE_ARGS=$LLAMA_CMAKE_ARGS")
fi
if [ -n "${BUILD_CA_BUNDLE:-}" ]; then
    build_args+=(--secret "id=pip-cert,src=$(realpath "$BUILD_CA_BUNDLE")")
fi
podman build --pull=never --isolation chroot --network host --format docker \
    "${build_args[@]}" --tag "$TAG" --file Dockerfile .
say "built $TAG in $(($(date +%s) - start)) s: $(podman image inspect --format '{{.Size}}' "$TAG" \
    | awk '{printf "%.0f MB", $1 / 1e6}')"
