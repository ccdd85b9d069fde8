#!/usr/bin/env bash
# Installs asyncpg (PyPI) into target/asyncpg/ (nothing system-wide), for
# the transaction pooling driver test (tests/it/txpool_driver.rs). The
# version is pinned; re-running with it in place does nothing.
set -euo pipefail
cd "$(dirname "$0")/../.."

ASYNCPG="asyncpg==0.32.0"
dest="${CARGO_TARGET_DIR:-target}/asyncpg"

if [ ! -d "$dest/asyncpg" ]; then
    echo "== installing $ASYNCPG into $dest"
    python3 -m pip install --quiet --disable-pip-version-check --root-user-action=ignore --target "$dest" "$ASYNCPG"
fi
PYTHONPATH="$dest" python3 -c 'import asyncpg; print("asyncpg", asyncpg.__version__)'
