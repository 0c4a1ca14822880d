#!/usr/bin/env bash
# Idempotent set-up for a fresh machine: system packages (Redis 7, HAProxy 2.6,
# Chromium from Debian), then .venv with the project and its dev extra. Every make
# target runs this first, so nothing depends on a step done by hand.
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
command -v redis-server >/dev/null 2>&1 || need_apt+=(redis-server)
command -v haproxy >/dev/null 2>&1 || need_apt+=(haproxy)
# The player shell's browser tests drive Debian's Chromium (never a downloaded one).
[ -x /usr/bin/chromium ] || need_apt+=(chromium)
if [ ${#need_apt[@]} -gt 0 ]; then
    if [ "$(id -u)" -ne 0 ]; then
        echo "bootstrap: need ${need_apt[*]} and am not root; install them with apt-get" >&2
        exit 1
    fi
    echo "bootstrap: apt-get install ${need_apt[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi
# Debian's package starts a system redis on :6379; oddsgate never uses it
# (it runs its own on a unix socket), so it is left alone.

# promtool, from Debian's prometheus package (19 MB, ~10 s), lets the tests run
# `promtool check rules` and `promtool test rules` on deploy/prometheus/alerts.yml.
# Best effort: without it the tests check the rules by parsing them. Only the
# binary is wanted, so no recommends (node exporters), and the Prometheus server
# the package enables on a systemd host is stopped and disabled again.
if ! command -v promtool >/dev/null 2>&1 && [ "$(id -u)" -eq 0 ]; then
    echo "bootstrap: apt-get install prometheus (for promtool)"
    export DEBIAN_FRONTEND=noninteractive
    if apt-get install -y -qq --no-install-recommends prometheus >/dev/null \
            || { apt-get update -qq && apt-get install -y -qq --no-install-recommends \
                 prometheus >/dev/null; }; then
        if [ -d /run/systemd/system ]; then
            systemctl disable --now prometheus.service >/dev/null 2>&1 || true
        fi
    else
        echo "bootstrap: no promtool; the tests check the alert rules by parsing them" >&2
    fi
fi

PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null 2>&1 || PY=python3
stamp=.venv/.installed
if [ ! -x .venv/bin/python ]; then
    echo "bootstrap: creating .venv with $PY"
    "$PY" -m venv .venv
fi
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
    echo "bootstrap: installing oddsgate[dev] into .venv"
    .venv/bin/python -m pip install -q --upgrade pip
    .venv/bin/python -m pip install -q -e '.[dev]'
    touch "$stamp"
fi
