#!/usr/bin/env bash
# Installs what the console's check and browser test need: the console's npm packages
# (exact versions from console/package-lock.json, `npm ci`) and Debian's Chromium. Node.js
# (with npm) must be on PATH; nothing here is needed to build or run a deployment
# (`deploy/up`): the built console is checked in (console/dist) and embedded in the binary.
#
# Idempotent: skips `npm ci` when console/node_modules matches the lock file, and apt-get
# when Chromium is already there (CHROMIUM, default /usr/bin/chromium).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CHROMIUM="${CHROMIUM:-/usr/bin/chromium}"

if ! command -v node >/dev/null 2>&1 || ! command -v npm >/dev/null 2>&1; then
    echo "install-console-tools: Node.js and npm are needed (the console's build and browser test)" >&2
    exit 1
fi

# npm ci writes node_modules/.package-lock.json; newer than the lock file means current (a
# checkout that changes the lock file touches it).
MODULES="$ROOT/console/node_modules"
if [[ -f "$MODULES/.package-lock.json" && "$MODULES/.package-lock.json" -nt "$ROOT/console/package-lock.json" ]]; then
    echo "console/node_modules: current"
else
    (cd "$ROOT/console" && npm ci --no-audit --no-fund)
fi

if [[ ! -x "$CHROMIUM" ]]; then
    SUDO=""
    if [[ "$(id -u)" != 0 ]]; then
        SUDO="sudo"
    fi
    $SUDO apt-get update
    $SUDO apt-get install -y --no-install-recommends chromium
fi
echo "chromium: $CHROMIUM"
