"""libpq 18 (through psycopg) against tollgate in front of PostgreSQL 18.

Run by tests/it/pg18.rs with the connection string as its one argument.
Checks what a libpq application can observe: protocol 3.2 negotiated end to
end, the client-side backend pid equal to pg_backend_pid(), its own
application_name, its own NOTIFY arriving with its own pid, both cancel APIs
(PQcancelCreate and the older PQcancel) with 3.2's long keys, and
pg_terminate_backend(<client-side pid>) ending the session with 57P01.
Prints "ok" and exits 0, or names the first failed check and exits 1.
"""

import sys
import threading
import time

import psycopg
from psycopg import errors


def check(cond, what):
    if not cond:
        sys.exit(f"FAILED: {what}")


conninfo = sys.argv[1]
check(psycopg.pq.version() >= 180000, f"libpq {psycopg.pq.version()} is not 18")
options = dict(max_protocol_version="3.2", autocommit=True)

with psycopg.connect(conninfo, application_name="libpq18 check", **options) as conn:
    info = conn.info
    check(info.server_version >= 180000, f"server {info.server_version}")
    check(info.full_protocol_version == 30002, f"protocol {info.full_protocol_version}")
    server_pid = conn.execute("select pg_backend_pid()").fetchone()[0]
    check(info.backend_pid == server_pid, f"client pid {info.backend_pid} != {server_pid}")
    shown = conn.execute("show application_name").fetchone()[0]
    check(shown == "libpq18 check", f"SHOW application_name: {shown!r}")
    reported = info.parameter_status("application_name")
    check(reported == "libpq18 check", f"ParameterStatus application_name: {reported!r}")

    conn.execute("listen tg_self")
    conn.execute("notify tg_self, 'hello'")
    got = list(conn.notifies(timeout=5, stop_after=1))
    check(len(got) == 1 and got[0].pid == server_pid, f"own NOTIFY: {got!r}")

    for how in ("cancel_safe", "cancel"):
        def later():
            time.sleep(0.3)
            getattr(conn, how)()

        t = threading.Thread(target=later)
        t.start()
        started = time.monotonic()
        try:
            conn.execute("select pg_sleep(30)")
            check(False, f"{how}: the query was not cancelled")
        except errors.QueryCanceled:
            pass
        t.join()
        check(time.monotonic() - started < 5, f"{how}: took {time.monotonic() - started:.1f}s")
        check(conn.execute("select 1").fetchone()[0] == 1, f"{how}: session unusable after")

    with psycopg.connect(conninfo, **options) as other:
        ended = other.execute("select pg_terminate_backend(%s)", [info.backend_pid]).fetchone()[0]
        check(ended, "pg_terminate_backend(client-side pid) found no backend")
    try:
        conn.execute("select 1")
        check(False, "the terminated session still answered")
    except psycopg.OperationalError as e:
        text = str(e)
        check(
            e.sqlstate == "57P01" or "administrator command" in text,
            f"after pg_terminate_backend: {e.sqlstate} {text}",
        )

print("ok")
