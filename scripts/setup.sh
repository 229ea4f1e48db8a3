#!/usr/bin/env bash
# Prepare this machine for sandboxd: Docker Engine, busybox-static, a Python
# venv at .venv with the project installed, and the sandboxd/base image.
# Idempotent: when everything is already there it only checks and returns.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

log() { printf 'setup: %s\n' "$*"; }
die() { printf 'setup: error: %s\n' "$*" >&2; exit 1; }

# Root runs apt and dockerd directly; anyone else goes through sudo.
SUDO=()
if [ "$(id -u)" -ne 0 ]; then
    command -v sudo >/dev/null 2>&1 || die "not root and sudo is missing: run as root"
    SUDO=(sudo)
fi

pkg_installed() {
    [ "$(dpkg-query -W -f='${Status}' "$1" 2>/dev/null)" = "install ok installed" ]
}

# --- system packages -------------------------------------------------------
missing=()
if ! command -v docker >/dev/null 2>&1 || ! command -v dockerd >/dev/null 2>&1; then
    missing+=(docker.io)
fi
pkg_installed busybox-static || missing+=(busybox-static)
# gcc: the agent's sanitizer tests (the agent itself is built with the venv's zig).
command -v gcc >/dev/null 2>&1 || missing+=(gcc libc6-dev)
# runsc (gVisor), for sandbox.create {runtime: "runsc"} and tests/test_gvisor.py.
command -v runsc >/dev/null 2>&1 || missing+=(runsc)
# docker-registry: a real registry on 127.0.0.1 for the image pull tests.
command -v docker-registry >/dev/null 2>&1 || missing+=(docker-registry)
# systemd-analyze and systemd-socket-activate, for the unit and socket-activation tests.
if ! command -v systemd-analyze >/dev/null 2>&1 \
        || ! command -v systemd-socket-activate >/dev/null 2>&1; then
    missing+=(systemd)
fi
# Docker refuses to run containers when the kernel enforces AppArmor but the
# parser that loads its default profile is absent (docker.io only recommends it).
if [ "$(cat /sys/module/apparmor/parameters/enabled 2>/dev/null || true)" = Y ] \
        && ! command -v apparmor_parser >/dev/null 2>&1 \
        && ! [ -x /sbin/apparmor_parser ]; then
    missing+=(apparmor)
fi
# Prefer the distribution's Python (what python3-venv belongs to, and readable
# by every user, which the tests need: they run the venv's python as nobody).
python=/usr/bin/python3
if ! [ -x "$python" ] || ! "$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
        >/dev/null 2>&1; then
    python=$(command -v python3 || echo /usr/bin/python3)
fi
if ! [ -x "$python" ]; then
    missing+=(python3 python3-venv)
elif ! "$python" -c 'import ensurepip, venv' >/dev/null 2>&1; then
    missing+=(python3-venv)
fi

if [ "${#missing[@]}" -gt 0 ]; then
    command -v apt-get >/dev/null 2>&1 || die "missing ${missing[*]} and no apt-get to install them"
    log "installing ${missing[*]} (apt)"
    export DEBIAN_FRONTEND=noninteractive
    "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -qq
    "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
        --no-install-recommends -o Dpkg::Use-Pty=0 "${missing[@]}" </dev/null
fi

"$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
    || die "Python >= 3.11 is required, found $("$python" --version 2>&1) ($python)"

# --- Docker Engine ---------------------------------------------------------
docker_ok() { timeout 10 docker info >/dev/null 2>&1; }

if docker_ok; then
    log "docker: running"
else
    pidfile=/var/run/docker.pid
    if [ -f "$pidfile" ] && "${SUDO[@]}" kill -0 "$(cat "$pidfile")" 2>/dev/null; then
        log "docker: dockerd is starting, waiting for it"
    else
        log "docker: starting dockerd (log: /var/log/sandboxd-dockerd.log)"
        "${SUDO[@]}" sh -c 'nohup dockerd > /var/log/sandboxd-dockerd.log 2>&1 < /dev/null &'
    fi
    for _ in $(seq 60); do
        docker_ok && break
        sleep 1
    done
    if ! docker_ok; then
        printf 'setup: docker info still fails after 60 s; last lines of the dockerd log:\n' >&2
        "${SUDO[@]}" tail -n 30 /var/log/sandboxd-dockerd.log >&2 2>/dev/null || true
        timeout 10 docker info >&2 || true
        die "the Docker Engine is not reachable"
    fi
    log "docker: running"
fi

# --- Python venv -----------------------------------------------------------
stamp=.venv/.sandboxd-installed
if [ ! -x .venv/bin/python ] || [ ! -x .venv/bin/pip ]; then
    log "venv: creating .venv ($python)"
    rm -rf .venv
    "$python" -m venv .venv
fi
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] \
        || [ ! -x .venv/bin/sandboxd ] || [ ! -x .venv/bin/sandboxctl ]; then
    log "venv: pip install -e '.[test,dev]'"
    .venv/bin/pip install --quiet --disable-pip-version-check -e '.[test,dev]'
    touch "$stamp"
else
    log "venv: up to date"
fi

# --- the in-sandbox agent ---------------------------------------------------
# Built from source (static, musl, with the venv's zig); rebuilt only when sources change.
log "agent: python -m sandboxd.agent.build"
.venv/bin/python -m sandboxd.agent.build

# --- base image ------------------------------------------------------------
bash scripts/build-base-image.sh
