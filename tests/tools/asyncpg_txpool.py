"""asyncpg through tollgate's transaction pooling, compared with a direct
connection: a pool of clients, each running its own deterministic mix of
calls (parameters of many types, custom enum and composite types, which
asyncpg introspects, prepared statements, cursors, executemany,
transactions, errors), first directly, then through tollgate. Prints
"ok" when every answer matches, else the differences.

usage: asyncpg_txpool.py THROUGH DIRECT CLIENTS ROUNDS
(THROUGH and DIRECT as libpq keyword strings: host=... port=... ...)"""
import asyncio
import datetime
import decimal
import json
import random
import sys
import uuid

import asyncpg


def params(conninfo):
    kw = dict(part.split("=", 1) for part in conninfo.split())
    return dict(host=kw["host"], port=int(kw["port"]), user=kw["user"],
                password=kw["password"], database=kw["dbname"], ssl=False)


async def setup(direct):
    c = await asyncpg.connect(**direct)
    await c.execute("""
        drop table if exists apg_items;
        drop type if exists apg_mood cascade;
        drop type if exists apg_pair cascade;
        create type apg_mood as enum ('sad', 'ok', 'happy');
        create type apg_pair as (a int, b text);
        create table apg_items (id serial primary key, owner int, name text,
            mood apg_mood, pair apg_pair, price numeric, at timestamptz,
            tags text[], doc jsonb, u uuid);
    """)
    await c.close()


async def call(c, op, wid, r, rnd):
    if op == 0:
        return ("double", await c.fetchval("select $1::int * 2", r))
    if op == 1:
        rows = await c.fetch("select g, g::text || $2 from generate_series(1, $1::int) g",
                             rnd.randrange(1, 50), "x")
        return ("series", [tuple(x) for x in rows])
    if op == 2:
        async with c.transaction():
            await c.execute(
                "insert into apg_items(owner, name, mood, pair, price, at, tags, doc, u)"
                " values ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
                wid, f"n{r}", rnd.choice(["sad", "ok", "happy"]), (r, f"b{r}"),
                decimal.Decimal("1.25") * r,
                datetime.datetime(2026, 1, 1, tzinfo=datetime.timezone.utc),
                ["a", str(r)], json.dumps({"r": r}), uuid.UUID(int=r))
            n = await c.fetchval("select count(*) from apg_items where owner = $1", wid)
        return ("insert", n)
    if op == 3:
        st = await c.prepare("select name, mood, pair, price, tags, doc, u"
                             " from apg_items where owner = $1 order by id")
        rows = await st.fetch(wid)
        return ("prepared", [tuple(x) for x in rows], [a.name for a in st.get_attributes()])
    if op == 4:
        async with c.transaction():
            total = 0
            async for rec in c.cursor("select g from generate_series(1, 300) g", prefetch=50):
                total += rec[0]
        return ("cursor", total)
    if op == 5:
        await c.executemany("select $1::int, $2::text", [(i, str(i)) for i in range(20)])
        return ("executemany",)
    if op == 6:
        try:
            await c.fetchval("select 1 / $1::int", 0)
        except asyncpg.PostgresError as e:
            return ("error", e.sqlstate)
    if op == 7:
        try:
            async with c.transaction():
                await c.execute("insert into apg_items(owner, name) values ($1, 'doomed')", wid)
                await c.fetchval("select nosuchcol from apg_items")
        except asyncpg.PostgresError as e:
            n = await c.fetchval(
                "select count(*) from apg_items where owner = $1 and name = 'doomed'", wid)
            return ("rolled back", e.sqlstate, n)
    rec = await c.fetchrow("select $1::apg_mood as m, $2::apg_pair as p, $3::numeric[] as a",
                           "happy", (1, "x"), [decimal.Decimal("1.5")])
    return ("types", tuple(rec))


async def worker(pool, wid, rounds, log):
    rnd = random.Random(wid)
    for r in range(rounds):
        op = rnd.randrange(9)
        try:
            # Acquired per call: asyncpg's pool resets the connection on
            # release (its reset query), as applications use it.
            async with pool.acquire() as c:
                log.append(await call(c, op, wid, r, rnd))
        except Exception as e:  # compared: a failure never matches
            log.append(("exception", type(e).__name__, str(e)))


async def run(conninfo, direct, clients, rounds):
    await setup(direct)
    pool = await asyncpg.create_pool(**conninfo, min_size=clients, max_size=clients)
    logs = [[] for _ in range(clients)]
    await asyncio.gather(*(worker(pool, w, rounds, logs[w]) for w in range(clients)))
    await pool.close()
    return logs


async def main():
    through, direct = params(sys.argv[1]), params(sys.argv[2])
    clients, rounds = int(sys.argv[3]), int(sys.argv[4])
    want = await run(direct, direct, clients, rounds)
    got = await run(through, direct, clients, rounds)
    diffs = [(w, i, g, x) for w in range(clients)
             for i, (g, x) in enumerate(zip(got[w], want[w])) if g != x]
    diffs += [(w, "count", len(got[w]), len(want[w])) for w in range(clients)
              if len(got[w]) != len(want[w])]
    if not diffs:
        print("ok")
        return
    for d in diffs[:10]:
        print("client %s call %s:\n  through %r\n  direct  %r" % d)
    print(len(diffs), "differ of", sum(map(len, want)))


asyncio.run(main())
