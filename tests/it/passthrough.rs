//! Every client feature works through tollgate exactly as on a direct
//! connection: each test does the same thing through tollgate and straight
//! to Postgres and compares what came back, byte for byte where it can.
//! The bulk tests also check that tollgate's memory stays flat (it relays
//! through fixed buffers and never holds a whole message).

use std::future::Future;
use std::io::Read;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::{BufMut, Bytes, BytesMut};
use futures_util::{SinkExt, StreamExt};
use ring::digest;
use tokio_postgres::types::{FromSql, Type};
use tokio_postgres::{AsyncMessage, Client, SimpleQueryMessage};

use crate::harness::*;

/// tollgate's peak resident memory must stay below this, whatever the
/// size of what it relays.
const RSS_LIMIT_KIB: u64 = 64 * 1024;

/// An Env with a started proxy and a token for `app` on `appdb`.
struct Setup {
    env: Env,
    token: String,
    /// Connection strings: through tollgate, and straight to Postgres.
    via: String,
    direct: String,
}

fn setup() -> Setup {
    let mut env = Env::new();
    let token = env.create_token(&["--user", "app", "--database", "appdb"]);
    env.start_proxy();
    let via = env.conn_str("app", "appdb", &token);
    let direct = env.direct_conn_str();
    Setup {
        env,
        token,
        via,
        direct,
    }
}

/// Awaits `f`, failing the test instead of hanging when it takes too long.
async fn within<F: Future>(what: &str, secs: u64, f: F) -> F::Output {
    tokio::time::timeout(Duration::from_secs(secs), f)
        .await
        .unwrap_or_else(|_| panic!("{what}: nothing within {secs} s"))
}

fn hex(d: digest::Digest) -> String {
    hex::encode(d.as_ref())
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

/// Reports tollgate's memory and asserts the peak stays under the limit.
fn assert_rss_flat(env: &Env, what: &str, baseline: (u64, u64)) {
    let (rss, hwm) = rss_kib(env.pid());
    eprintln!(
        "[{what}] tollgate memory: VmRSS before {:.1} MiB, after {:.1} MiB, VmHWM (peak) {:.1} MiB",
        mib(baseline.0),
        mib(rss),
        mib(hwm)
    );
    assert!(
        hwm < RSS_LIMIT_KIB,
        "{what}: tollgate's peak RSS reached {:.1} MiB (limit {} MiB)",
        mib(hwm),
        RSS_LIMIT_KIB / 1024
    );
}

/// Any column's value as the bytes the server sent (binary format), so
/// two connections' results can be compared exactly, whatever the type.
#[derive(Debug, PartialEq, Eq)]
struct RawVal(Option<Vec<u8>>);

impl<'a> FromSql<'a> for RawVal {
    fn from_sql(_: &Type, raw: &'a [u8]) -> Result<Self, Box<dyn std::error::Error + Sync + Send>> {
        Ok(RawVal(Some(raw.to_vec())))
    }
    fn from_sql_null(_: &Type) -> Result<Self, Box<dyn std::error::Error + Sync + Send>> {
        Ok(RawVal(None))
    }
    fn accepts(_: &Type) -> bool {
        true
    }
}

fn raw_row(row: &tokio_postgres::Row) -> Vec<RawVal> {
    (0..row.len()).map(|i| row.get::<_, RawVal>(i)).collect()
}

// ---------------------------------------------------------------------------
// 1. COPY FROM STDIN / COPY TO STDOUT, ~200 MB, text and binary.

#[derive(Clone, Copy, Debug, PartialEq)]
enum CopyFormat {
    Text,
    Binary,
}

const COPY_ROWS: u64 = 210_000;
const BINARY_SIGNATURE: &[u8] = b"PGCOPY\n\xff\r\n\0";

/// Generates a COPY FROM stream chunk by chunk (never the whole thing in
/// memory): `id` and a pseudo-random payload of 500..1500 bytes per row
/// (printable text for the text format, any byte for binary). Keeps the
/// SHA-256 of every byte handed out, and an order-independent sum of
/// per-row digests that the server can compute from the loaded table.
struct CopySource {
    format: CopyFormat,
    rng: u64,
    next_id: u64,
    started: bool,
    finished: bool,
    bytes: u64,
    stream: digest::Context,
    row_sum: u128,
}

impl CopySource {
    fn new(format: CopyFormat) -> Self {
        CopySource {
            format,
            rng: 0x9e37_79b9_7f4a_7c15,
            next_id: 1,
            started: false,
            finished: false,
            bytes: 0,
            stream: digest::Context::new(&digest::SHA256),
            row_sum: 0,
        }
    }

    fn next_u64(&mut self) -> u64 {
        // xorshift64*
        self.rng ^= self.rng >> 12;
        self.rng ^= self.rng << 25;
        self.rng ^= self.rng >> 27;
        self.rng.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn payload(&mut self, out: &mut Vec<u8>) {
        out.clear();
        let len = 500 + (self.next_u64() % 1000) as usize;
        while out.len() < len {
            for b in self.next_u64().to_le_bytes() {
                out.push(match self.format {
                    CopyFormat::Binary => b,
                    // Printable ASCII without the backslash: no COPY escapes.
                    CopyFormat::Text => match 0x20 + b % 95 {
                        b'\\' => b'/',
                        c => c,
                    },
                });
            }
        }
        out.truncate(len);
    }

    /// The next chunk of about 256 KiB, or None after the end.
    fn next_chunk(&mut self) -> Option<Bytes> {
        if self.finished {
            return None;
        }
        let mut chunk = BytesMut::with_capacity(260 * 1024);
        if !self.started {
            self.started = true;
            if self.format == CopyFormat::Binary {
                chunk.put_slice(BINARY_SIGNATURE);
                chunk.put_i32(0); // flags
                chunk.put_i32(0); // header extension length
            }
        }
        let mut payload = Vec::with_capacity(1600);
        while chunk.len() < 256 * 1024 && self.next_id <= COPY_ROWS {
            let id = self.next_id;
            self.next_id += 1;
            self.payload(&mut payload);
            match self.format {
                CopyFormat::Text => {
                    chunk.put_slice(id.to_string().as_bytes());
                    chunk.put_u8(b'\t');
                    chunk.put_slice(&payload);
                    chunk.put_u8(b'\n');
                }
                CopyFormat::Binary => {
                    chunk.put_i16(2);
                    chunk.put_i32(8);
                    chunk.put_i64(id as i64);
                    chunk.put_i32(payload.len() as i32);
                    chunk.put_slice(&payload);
                }
            }
            // The row digest the server computes in `server_checksum`.
            let mut row = digest::Context::new(&digest::SHA256);
            row.update(format!("{id}:").as_bytes());
            row.update(&payload);
            let d = row.finish();
            let mut top = [0u8; 8];
            top[1..].copy_from_slice(&d.as_ref()[..7]);
            self.row_sum += u64::from_be_bytes(top) as u128;
        }
        if self.next_id > COPY_ROWS {
            if self.format == CopyFormat::Binary {
                chunk.put_i16(-1); // trailer
            }
            self.finished = true;
        }
        self.bytes += chunk.len() as u64;
        self.stream.update(&chunk);
        Some(chunk.freeze())
    }
}

/// (rows, sum of the first 56 bits of sha256("<id>:" || payload)) as the
/// server computes it from the table: what `CopySource::row_sum` predicts.
async fn server_checksum(client: &Client, table: &str, format: CopyFormat) -> (i64, String) {
    let payload = match format {
        CopyFormat::Text => "convert_to(payload, 'UTF8')",
        CopyFormat::Binary => "payload",
    };
    let row = client
        .query_one(
            &format!(
                "select count(*), coalesce(sum(('x' || encode(substr(\
                 sha256(convert_to(id::text || ':', 'UTF8') || {payload}), 1, 7), 'hex'))\
                 ::bit(56)::bigint), 0)::text from {table}"
            ),
            &[],
        )
        .await
        .unwrap();
    (row.get(0), row.get(1))
}

/// Streams a whole COPY FROM into `table`; returns (rows the server says it
/// loaded, bytes sent, sha256 of the bytes, predicted row checksum).
async fn copy_in(client: &Client, table: &str, format: CopyFormat) -> (u64, u64, String, String) {
    let options = match format {
        CopyFormat::Text => "",
        CopyFormat::Binary => " (format binary)",
    };
    let sink = client
        .copy_in::<_, Bytes>(&format!("copy {table} (id, payload) from stdin{options}"))
        .await
        .unwrap();
    let mut sink = std::pin::pin!(sink);
    let mut source = CopySource::new(format);
    while let Some(chunk) = source.next_chunk() {
        sink.send(chunk).await.unwrap();
    }
    let loaded = sink.as_mut().finish().await.unwrap();
    (
        loaded,
        source.bytes,
        hex(source.stream.finish()),
        source.row_sum.to_string(),
    )
}

/// Streams a whole COPY TO; returns (bytes, sha256).
async fn copy_out(client: &Client, table: &str, format: CopyFormat) -> (u64, String) {
    let options = match format {
        CopyFormat::Text => "",
        CopyFormat::Binary => " (format binary)",
    };
    let stream = client
        .copy_out(&format!(
            "copy (select id, payload from {table} order by id) to stdout{options}"
        ))
        .await
        .unwrap();
    let mut stream = std::pin::pin!(stream);
    let mut hash = digest::Context::new(&digest::SHA256);
    let mut bytes = 0u64;
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.unwrap();
        bytes += chunk.len() as u64;
        hash.update(&chunk);
    }
    (bytes, hex(hash.finish()))
}

fn copy_round_trip(format: CopyFormat) {
    let s = setup();
    let what = format!("COPY {format:?}");
    let baseline = rss_kib(s.env.pid());
    runtime().block_on(async {
        let via = pg_connect(&s.via).await.unwrap();
        let direct = pg_connect(&s.direct).await.unwrap();
        let payload_type = match format {
            CopyFormat::Text => "text",
            CopyFormat::Binary => "bytea",
        };
        direct
            .batch_execute(&format!(
                "create unlogged table t_via (id int8, payload {payload_type});
                 create unlogged table t_direct (id int8, payload {payload_type});"
            ))
            .await
            .unwrap();
        for c in [&via, &direct] {
            // COPY TO sorts by id (a heap need not keep load order): in memory.
            c.batch_execute("set work_mem = '1GB'").await.unwrap();
        }

        // COPY FROM STDIN, through tollgate and directly.
        let started = Instant::now();
        let (loaded, sent_bytes, sent_sha, sent_rows_sum) =
            within("copy in via", 120, copy_in(&via, "t_via", format)).await;
        let in_via = started.elapsed();
        let started = Instant::now();
        let (loaded_d, sent_bytes_d, sent_sha_d, sent_rows_sum_d) =
            within("copy in direct", 120, copy_in(&direct, "t_direct", format)).await;
        let in_direct = started.elapsed();
        assert_eq!(
            (sent_bytes, &sent_sha, &sent_rows_sum),
            (sent_bytes_d, &sent_sha_d, &sent_rows_sum_d),
            "the generator is deterministic"
        );
        assert!(sent_bytes > 200_000_000, "only {sent_bytes} bytes");
        assert_eq!(loaded, COPY_ROWS, "{what}: rows loaded through tollgate");
        assert_eq!(loaded_d, COPY_ROWS, "{what}: rows loaded directly");
        // The server's own checksum of what it stored equals what was sent.
        let expected = (COPY_ROWS as i64, sent_rows_sum.clone());
        assert_eq!(
            server_checksum(&direct, "t_via", format).await,
            expected,
            "{what}: the table loaded through tollgate differs from what was sent"
        );
        assert_eq!(
            server_checksum(&direct, "t_direct", format).await,
            expected,
            "{what}: the table loaded directly differs from what was sent"
        );

        // COPY TO STDOUT of the same table, through tollgate and directly:
        // the same bytes as each other, and as the COPY FROM stream.
        let started = Instant::now();
        let out_via = within("copy out via", 120, copy_out(&via, "t_via", format)).await;
        let out_via_t = started.elapsed();
        let started = Instant::now();
        let out_direct = within("copy out direct", 120, copy_out(&direct, "t_via", format)).await;
        let out_direct_t = started.elapsed();
        assert_eq!(
            out_via, out_direct,
            "{what}: COPY TO STDOUT through tollgate differs from direct"
        );
        assert_eq!(
            out_via,
            (sent_bytes, sent_sha.clone()),
            "{what}: COPY TO STDOUT differs from what COPY FROM sent"
        );
        eprintln!(
            "[{what}] {sent_bytes} bytes, {COPY_ROWS} rows: copy in via {in_via:.2?} / direct \
             {in_direct:.2?}; copy out via {out_via_t:.2?} / direct {out_direct_t:.2?}; sha256 {sent_sha}"
        );
    });
    assert_rss_flat(&s.env, &what, baseline);
}

/// COPY FROM STDIN and COPY TO STDOUT of ~200 MB in text format: the server
/// stores exactly what was sent, and COPY TO returns the same bytes through
/// tollgate as directly; tollgate's memory stays flat.
#[test]
fn copy_text_200mb_matches_direct_with_flat_memory() {
    copy_round_trip(CopyFormat::Text);
}

/// The same in binary COPY format (payloads are arbitrary bytes, so they
/// contain every possible fake message header).
#[test]
fn copy_binary_200mb_matches_direct_with_flat_memory() {
    copy_round_trip(CopyFormat::Binary);
}

// ---------------------------------------------------------------------------
// 2. One 256 MB bytea value.

/// One 1 MiB + 1 byte chunk (32768 md5 hex digests and a '!'), repeated 256
/// times: 268,435,712 bytes whose period is not a multiple of any buffer size.
const BIG_CHUNK_SQL: &str =
    "select string_agg(md5(g::text), '' order by g) || '!' from generate_series(1, 32768) g";
const BIG_VALUE_SQL: &str =
    "with c as (select string_agg(md5(g::text), '' order by g) || '!' as s \
     from generate_series(1, 32768) g) select convert_to(repeat(s, 256), 'UTF8') from c";

/// A single 256 MB bytea value generated by the server arrives through
/// tollgate with the same length and SHA-256 as directly (and as computed
/// from its known content); tollgate's memory stays flat.
#[test]
fn bytea_256mb_value_matches_direct_with_flat_memory() {
    let s = setup();
    let baseline = rss_kib(s.env.pid());
    runtime().block_on(async {
        let via = pg_connect(&s.via).await.unwrap();
        let direct = pg_connect(&s.direct).await.unwrap();

        // What the value must be, from its 1 MiB building block.
        let chunk: String = direct.query_one(BIG_CHUNK_SQL, &[]).await.unwrap().get(0);
        assert_eq!(chunk.len(), 1_048_577);
        let mut expected = digest::Context::new(&digest::SHA256);
        for _ in 0..256 {
            expected.update(chunk.as_bytes());
        }
        let expected = (chunk.len() * 256, hex(expected.finish()));

        let fetch = |client: Client| async move {
            let started = Instant::now();
            let row = client.query_one(BIG_VALUE_SQL, &[]).await.unwrap();
            let value: &[u8] = row.get(0);
            let got = (value.len(), hex(digest::digest(&digest::SHA256, value)));
            (got, started.elapsed())
        };
        let (got_via, t_via) = within("256 MB via", 120, fetch(via)).await;
        let (got_direct, t_direct) = within("256 MB direct", 120, fetch(direct)).await;
        eprintln!(
            "[bytea 256 MB] {} bytes via tollgate in {t_via:.2?}, direct in {t_direct:.2?}; sha256 {}",
            got_via.0, got_via.1
        );
        assert_eq!(got_via, got_direct, "the value through tollgate differs");
        assert_eq!(got_via, expected, "the value is not what the server built");
    });
    assert_rss_flat(&s.env, "bytea 256 MB", baseline);
}

// ---------------------------------------------------------------------------
// 3. A million rows.

/// 1,000,000 rows stream through tollgate (extended protocol, binary
/// results, consumed as a stream; and simple protocol, text): same count,
/// same checksum of every value's bytes, as directly.
#[test]
fn million_row_result_streams_like_direct() {
    let s = setup();
    let baseline = rss_kib(s.env.pid());
    const SQL: &str = "select g, md5(g::text), g::float8 / 7, (g % 3 = 0) \
                       from generate_series(1::int8, 1000000) g";
    runtime().block_on(async {
        let via = pg_connect(&s.via).await.unwrap();
        let direct = pg_connect(&s.direct).await.unwrap();

        async fn extended(client: &Client) -> ((u64, i64, String), Duration) {
            let started = Instant::now();
            let rows = client
                .query_raw(SQL, std::iter::empty::<i32>())
                .await
                .unwrap();
            let mut rows = std::pin::pin!(rows);
            let (mut n, mut sum) = (0u64, 0i64);
            let mut hash = digest::Context::new(&digest::SHA256);
            while let Some(row) = rows.next().await {
                let row = row.unwrap();
                n += 1;
                sum += row.get::<_, i64>(0);
                for v in raw_row(&row) {
                    let v = v.0.expect("no NULLs here");
                    hash.update(&(v.len() as u32).to_be_bytes());
                    hash.update(&v);
                }
            }
            ((n, sum, hex(hash.finish())), started.elapsed())
        }
        async fn simple(client: &Client) -> ((u64, i64, String, Option<u64>), Duration) {
            let started = Instant::now();
            let stream = client.simple_query_raw(SQL).await.unwrap();
            let mut stream = std::pin::pin!(stream);
            let (mut n, mut sum) = (0u64, 0i64);
            let mut hash = digest::Context::new(&digest::SHA256);
            let mut completed = None;
            while let Some(m) = stream.next().await {
                match m.unwrap() {
                    SimpleQueryMessage::Row(r) => {
                        n += 1;
                        sum += r.get(0).unwrap().parse::<i64>().unwrap();
                        for i in 0..r.len() {
                            let v = r.get(i).unwrap();
                            hash.update(&(v.len() as u32).to_be_bytes());
                            hash.update(v.as_bytes());
                        }
                    }
                    SimpleQueryMessage::CommandComplete(c) => completed = Some(c),
                    _ => {}
                }
            }
            ((n, sum, hex(hash.finish()), completed), started.elapsed())
        }

        let (e_via, t1) = within("1M rows via", 120, extended(&via)).await;
        let (e_direct, t2) = within("1M rows direct", 120, extended(&direct)).await;
        assert_eq!(e_via.0, 1_000_000);
        assert_eq!(e_via.1, 500_000_500_000);
        assert_eq!(e_via, e_direct, "extended protocol: results differ");

        let (s_via, t3) = within("1M rows simple via", 120, simple(&via)).await;
        let (s_direct, t4) = within("1M rows simple direct", 120, simple(&direct)).await;
        assert_eq!((s_via.0, s_via.1), (1_000_000, 500_000_500_000));
        assert_eq!(s_via.3, Some(1_000_000), "CommandComplete row count");
        assert_eq!(s_via, s_direct, "simple protocol: results differ");
        eprintln!(
            "[1M rows] extended via {t1:.2?} / direct {t2:.2?}; simple via {t3:.2?} / direct {t4:.2?}"
        );
    });
    assert_rss_flat(&s.env, "1M rows", baseline);
}

// ---------------------------------------------------------------------------
// 4. Pipeline mode.

/// pgbench with `\startpipeline` / `\endpipeline` scripts (extended and
/// prepared protocol) runs through tollgate with every transaction done and
/// no errors, and leaves the same rows as the same run done directly.
#[test]
fn pgbench_pipeline_mode_matches_direct() {
    let s = setup();
    let (clients, per_client) = (2u64, 300u64);
    let cluster_port = s.env.cluster.port().to_string();
    let proxy_port = s.env.addr().port().to_string();
    runtime().block_on(async {
        let direct = pg_connect(&s.direct).await.unwrap();
        direct
            .batch_execute(
                "create table pipe_log (target text, mode text, client int, seq int, n int8, \
                 twice int8)",
            )
            .await
            .unwrap();

        let upstream_password = s.env.cluster.password().to_owned();
        for mode in ["extended", "prepared"] {
            for (target, port, password) in [
                ("via", &proxy_port, &s.token),
                ("direct", &cluster_port, &upstream_password),
            ] {
                // Four statements per pipeline; the second and fourth use the
                // result of nothing but their own parameters, so a reordered
                // or lost message shows in the rows.
                let script = format!(
                    "\\set n random(1, 1000000)\n\
                     \\startpipeline\n\
                     insert into pipe_log values ('{target}', '{mode}', :client_id, 1, :n, :n * 2);\n\
                     select count(*) from pipe_log where client = :client_id;\n\
                     insert into pipe_log values ('{target}', '{mode}', :client_id, 2, :n, :n * 2);\n\
                     select :n::int8 + 1;\n\
                     \\endpipeline\n"
                );
                let file = s.env.dir.path().join(format!("pipeline-{target}-{mode}.sql"));
                std::fs::write(&file, script).unwrap();
                let started = Instant::now();
                let out = pg_tool("pgbench")
                    .args(["-h", "127.0.0.1", "-p", port, "-U", "app", "-n", "-M", mode])
                    .args(["-c", &clients.to_string(), "-j", "2"])
                    .args(["-t", &per_client.to_string(), "-f"])
                    .arg(&file)
                    .arg("appdb")
                    .env("PGPASSWORD", password)
                    .env("PGSSLMODE", "disable")
                    .output()
                    .unwrap();
                let PgbenchSummary {
                    processed,
                    failed,
                    output: all,
                } = pgbench_summary(&out)
                    .unwrap_or_else(|all| panic!("pgbench {target} {mode} failed:\n{all}"));
                eprintln!(
                    "[pgbench pipeline {mode} {target}] {processed} transactions in {:.2?}",
                    started.elapsed()
                );
                assert_eq!(processed, clients * per_client, "{target} {mode}:\n{all}");
                assert_eq!(failed, 0, "{target} {mode}:\n{all}");
                assert!(!all.contains("error"), "{target} {mode}:\n{all}");
            }
            // Each client inserted two consistent rows per transaction, in
            // both targets alike.
            async fn summary(direct: &Client, target: &str, mode: &str) -> Vec<(i32, i32, i64, i64)> {
                    let rows = direct
                        .query(
                            "select client, seq, count(*), count(*) filter (where twice = n * 2) \
                             from pipe_log where target = $1 and mode = $2 \
                             group by client, seq order by client, seq",
                            &[&target, &mode],
                        )
                        .await
                        .unwrap();
                    rows.iter()
                        .map(|r| {
                            (
                                r.get::<_, i32>(0),
                                r.get::<_, i32>(1),
                                r.get::<_, i64>(2),
                                r.get::<_, i64>(3),
                            )
                        })
                        .collect()
            }
            let via_rows = summary(&direct, "via", mode).await;
            let mut expected = Vec::new();
            for client in 0..clients as i32 {
                for seq in 1..=2 {
                    expected.push((client, seq, per_client as i64, per_client as i64));
                }
            }
            assert_eq!(via_rows, expected, "{mode}: rows written through tollgate");
            assert_eq!(via_rows, summary(&direct, "direct", mode).await, "{mode}: via != direct");
        }
    });
    s.env.assert_log_clean();
}

/// Many queries in flight at once on one tokio-postgres connection (it
/// pipelines them: all are sent before the first answer is read), one of
/// them failing: every future gets its own answer, as directly.
#[test]
fn tokio_postgres_pipelined_queries_match_direct() {
    let s = setup();
    runtime().block_on(async {
        let via = pg_connect(&s.via).await.unwrap();
        let direct = pg_connect(&s.direct).await.unwrap();

        type Answer = Result<Vec<Vec<RawVal>>, Option<String>>;
        async fn pipelined(client: &Client) -> (Vec<Answer>, Vec<Vec<RawVal>>) {
            let stmt = client
                .prepare("select $1::int4 * 10, repeat(chr(65 + $1::int4 % 26), $1::int4 * 37)")
                .await
                .unwrap();
            let queries = (0..64i32).map(|i| {
                let stmt = &stmt;
                async move {
                    let r = if i == 31 {
                        client.query("select 1 / (0 * $1::int4)", &[&i]).await
                    } else if i % 2 == 0 {
                        client.query(stmt, &[&i]).await
                    } else {
                        client
                            .query(
                                "select $1::int8, md5($1::int8::text), now() = now()",
                                &[&(i as i64)],
                            )
                            .await
                    };
                    r.map(|rows| rows.iter().map(raw_row).collect())
                        .map_err(|e| e.as_db_error().map(|d| d.code().code().to_owned()))
                }
            });
            let answers = futures_util::future::join_all(queries).await;
            // And a fixed set joined with try_join!, statements prepared in flight.
            let (a, b, c) = tokio::try_join!(
                client.query_one("select 'a'::text, 1::int2", &[]),
                client.prepare("select $1::bytea"),
                client.execute("select generate_series(1, 100)", &[]),
            )
            .unwrap();
            assert_eq!(c, 100);
            let b = client
                .query_one(&b, &[&vec![0u8, 1, 2, 255]])
                .await
                .unwrap();
            (answers, vec![raw_row(&a), raw_row(&b)])
        }

        let (answers_via, joined_via) = within("pipelined via", 60, pipelined(&via)).await;
        let (answers_direct, joined_direct) =
            within("pipelined direct", 60, pipelined(&direct)).await;
        assert_eq!(answers_via.len(), 64);
        assert_eq!(answers_via[31], Err(Some("22012".to_owned())));
        assert!(
            answers_via
                .iter()
                .enumerate()
                .all(|(i, a)| (i == 31) != a.is_ok()),
            "only the failing query may fail: {:?}",
            answers_via.iter().map(Result::is_ok).collect::<Vec<_>>()
        );
        // Each answer went to its own query.
        let answer_10 = &answers_via[10].as_ref().unwrap()[0];
        assert_eq!(answer_10[0], RawVal(Some(100i32.to_be_bytes().to_vec())));
        assert_eq!(answer_10[1], RawVal(Some(b"K".repeat(370))));
        assert_eq!(answers_via, answers_direct, "pipelined answers differ");
        assert_eq!(joined_via, joined_direct, "try_join! answers differ");
        // The connection is still in step afterwards.
        let r = via.query_one("select 42::int4", &[]).await.unwrap();
        assert_eq!(r.get::<_, i32>(0), 42);
    });
}

// ---------------------------------------------------------------------------
// 5. Asynchronous messages: NotificationResponse, NoticeResponse,
//    ParameterStatus.

/// A client whose connection is driven by hand, so its asynchronous
/// messages can be seen, with the latest reported runtime parameters.
struct Observed {
    client: Client,
    messages: tokio::sync::mpsc::UnboundedReceiver<AsyncMessage>,
    params: Params,
}

/// The latest value of each watched runtime parameter.
type Params = Arc<Mutex<Vec<(String, Option<String>)>>>;

const WATCHED_PARAMS: [&str; 2] = ["application_name", "TimeZone"];

async fn connect_observed(conn: &str) -> Observed {
    let (client, mut connection) = tokio_postgres::connect(conn, tokio_postgres::NoTls)
        .await
        .unwrap();
    let (tx, messages) = tokio::sync::mpsc::unbounded_channel();
    let params = Arc::new(Mutex::new(Vec::new()));
    let seen = params.clone();
    tokio::spawn(async move {
        let mut stream = futures_util::stream::poll_fn(move |cx| {
            let r = connection.poll_message(cx);
            // ParameterStatus is absorbed by the connection; read it back
            // after every poll.
            *seen.lock().unwrap() = WATCHED_PARAMS
                .iter()
                .map(|p| (p.to_string(), connection.parameter(p).map(str::to_owned)))
                .collect();
            r
        });
        while let Some(Ok(m)) = stream.next().await {
            if tx.send(m).is_err() {
                break;
            }
        }
    });
    Observed {
        client,
        messages,
        params,
    }
}

impl Observed {
    async fn next(&mut self, what: &str) -> AsyncMessage {
        within(what, 10, self.messages.recv())
            .await
            .unwrap_or_else(|| panic!("{what}: connection closed"))
    }

    async fn next_notification(&mut self, what: &str) -> (i32, String, String) {
        match self.next(what).await {
            AsyncMessage::Notification(n) => {
                (n.process_id(), n.channel().into(), n.payload().into())
            }
            other => panic!("{what}: expected a notification, got {other:?}"),
        }
    }

    async fn next_notice(&mut self, what: &str) -> Vec<Option<String>> {
        match self.next(what).await {
            AsyncMessage::Notice(n) => vec![
                Some(n.severity().to_owned()),
                Some(n.code().code().to_owned()),
                Some(n.message().to_owned()),
                n.detail().map(str::to_owned),
                n.hint().map(str::to_owned),
            ],
            other => panic!("{what}: expected a notice, got {other:?}"),
        }
    }

    fn param(&self, name: &str) -> Option<String> {
        self.params
            .lock()
            .unwrap()
            .iter()
            .find(|(n, _)| n == name)
            .and_then(|(_, v)| v.clone())
    }

    async fn backend_pid(&self) -> i32 {
        self.client
            .query_one("select pg_backend_pid()", &[])
            .await
            .unwrap()
            .get(0)
    }
}

/// An idle LISTENer connected through tollgate receives notifications sent
/// by other sessions (direct and through tollgate) and by itself, channel
/// and payload intact; so does a direct listener.
#[test]
fn listen_notify_reaches_an_idle_listener() {
    let s = setup();
    runtime().block_on(async {
        let mut l_via = connect_observed(&s.via).await;
        let mut l_direct = connect_observed(&s.direct).await;
        let sender_direct = pg_connect(&s.direct).await.unwrap();
        let sender_via = pg_connect(&s.via).await.unwrap();
        let pid_via = l_via.backend_pid().await;
        let pid_direct = l_direct.backend_pid().await;
        let pid_sender_via: i32 = sender_via
            .query_one("select pg_backend_pid()", &[])
            .await
            .unwrap()
            .get(0);
        for l in [&l_via, &l_direct] {
            l.client.batch_execute("listen tg_chan").await.unwrap();
        }

        // Idle listeners: nothing sent on their connections since LISTEN.
        tokio::time::sleep(Duration::from_millis(500)).await;
        let big: String = "ünïcode-".repeat(500); // 5000 bytes, max is 7999
        for (n, payload) in ["hello", big.as_str()].into_iter().enumerate() {
            sender_direct
                .execute("select pg_notify('tg_chan', $1)", &[&payload])
                .await
                .unwrap();
            let what = format!("notification {n}");
            let got_via = l_via.next_notification(&format!("{what} via")).await;
            let got_direct = l_direct.next_notification(&format!("{what} direct")).await;
            assert_eq!(
                (got_via.1.as_str(), got_via.2.as_str()),
                ("tg_chan", payload),
                "{what} through tollgate"
            );
            assert_eq!((&got_via.1, &got_via.2), (&got_direct.1, &got_direct.2));
            // The sender's backend, identical for both listeners.
            assert_eq!(got_via.0, got_direct.0);
            assert_ne!(got_via.0, pid_via);
        }

        // A NOTIFY sent through tollgate reaches both listeners too.
        tokio::time::sleep(Duration::from_millis(300)).await;
        sender_via
            .batch_execute("notify tg_chan, 'from tollgate'")
            .await
            .unwrap();
        for l in [&mut l_via, &mut l_direct] {
            assert_eq!(
                l.next_notification("notify sent through tollgate").await,
                (pid_sender_via, "tg_chan".into(), "from tollgate".into())
            );
        }

        // A listener notifying: itself and the other listener get it.
        for (from, pid) in [("via", pid_via), ("direct", pid_direct)] {
            let sender = if from == "via" { &l_via } else { &l_direct };
            sender
                .client
                .batch_execute(&format!("notify tg_chan, 'from the {from} listener'"))
                .await
                .unwrap();
            let expected = (pid, "tg_chan".into(), format!("from the {from} listener"));
            for l in [&mut l_via, &mut l_direct] {
                assert_eq!(l.next_notification(&expected.2).await, expected);
            }
        }
        assert!(
            l_via.messages.try_recv().is_err(),
            "an extra message arrived"
        );
    });
}

/// NoticeResponse arrives through tollgate as on a direct connection, and
/// ParameterStatus changes (SET application_name, SET TimeZone) are seen.
#[test]
fn notices_and_parameter_status_match_direct() {
    let s = setup();
    runtime().block_on(async {
        let mut via = connect_observed(&s.via).await;
        let mut direct = connect_observed(&s.direct).await;

        let notices = [
            "do $$ begin raise notice 'hello'; end $$",
            "do $$ begin raise warning 'careful: %', 42 using detail = 'some detail', \
             hint = 'a hint', errcode = '01000'; end $$",
            // A notice from the server itself, not from PL/pgSQL.
            "drop table if exists no_such_table",
        ];
        let mut seen = Vec::new();
        for sql in notices {
            via.client.batch_execute(sql).await.unwrap();
            direct.client.batch_execute(sql).await.unwrap();
            let a = via.next_notice(sql).await;
            let b = direct.next_notice(sql).await;
            assert_eq!(a, b, "{sql}");
            seen.push(a);
        }
        assert_eq!(
            seen[0],
            vec![
                Some("NOTICE".into()),
                Some("00000".into()),
                Some("hello".into()),
                None,
                None
            ]
        );
        assert_eq!(
            seen[1],
            vec![
                Some("WARNING".into()),
                Some("01000".into()),
                Some("careful: 42".into()),
                Some("some detail".into()),
                Some("a hint".into())
            ]
        );
        assert_eq!(seen[2][1].as_deref(), Some("00000"));
        assert!(via.messages.try_recv().is_err(), "an extra message arrived");

        // ParameterStatus: the session starts with the client's own
        // application_name, as on a direct connection; a SET is reported
        // as is.
        assert_eq!(
            via.param("application_name"),
            direct.param("application_name")
        );
        for o in [&via, &direct] {
            o.client
                .batch_execute("set application_name = 'x'; set timezone = 'Asia/Tokyo'")
                .await
                .unwrap();
        }
        for name in WATCHED_PARAMS {
            assert_eq!(via.param(name), direct.param(name), "{name}");
        }
        assert_eq!(via.param("application_name").as_deref(), Some("x"));
        assert_eq!(via.param("TimeZone").as_deref(), Some("Asia/Tokyo"));
    });

    // The same at the byte level: the messages answering a SET are
    // identical through tollgate and directly.
    let query = |sql: &str| {
        let mut b = BytesMut::new();
        postgres_protocol::message::frontend::query(sql, &mut b).unwrap();
        b.to_vec()
    };
    let answers: Vec<Vec<(u8, Vec<u8>)>> = [
        raw_login(s.env.addr(), "app", &s.token, "raw"),
        raw_login(direct_addr(&s.env), "app", s.env.cluster.password(), "raw"),
    ]
    .into_iter()
    .map(|mut raw| {
        raw.raw
            .send(&query("set application_name = 'x'; select 1 as one"));
        read_until_ready(&mut raw.raw)
    })
    .collect();
    assert_eq!(answers[0], answers[1], "raw answers differ");
    assert!(
        answers[0].contains(&(b'S', b"application_name\0x\0".to_vec())),
        "{:?}",
        answers[0]
    );
}

// ---------------------------------------------------------------------------
// 6. Extended protocol.

/// Binary-format results of many types, parameters sent in binary, a named
/// prepared statement reused 1,000 times, portals fetched 10 rows at a
/// time (two interleaved), and statement descriptions: all as directly.
#[test]
fn extended_protocol_matches_direct() {
    let s = setup();
    runtime().block_on(async {
        let mut via = pg_connect(&s.via).await.unwrap();
        let mut direct = pg_connect(&s.direct).await.unwrap();
        for c in [&via, &direct] {
            c.batch_execute("set timezone = 'UTC'; set extra_float_digits = 3")
                .await
                .unwrap();
        }

        // Binary results of many types, binary parameters.
        let all_bytes: Vec<u8> = (0..=255u8).cycle().take(70_000).collect();
        let typed = "select $1::int8, $2::float8, $3::bytea, \
             '2024-02-29 12:34:56.789+05:30'::timestamptz, \
             '12345678901234567890.000123'::numeric, '-0.5'::numeric::text, \
             $4::text, 'NaN'::float8, '{1,NULL,3}'::int4[], \
             'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11'::uuid, \
             '{\"k\": [1, 2.5, null]}'::jsonb, '1 year 2 days 3 ms'::interval, \
             null::int4, true, '127.0.0.1/32'::inet, 'x'::\"char\"";
        let params: [&(dyn tokio_postgres::types::ToSql + Sync); 4] =
            [&i64::MIN, &-1.5e300f64, &all_bytes, &"ünïcode ✓"];
        let a = via.query_one(typed, &params).await.unwrap();
        let b = direct.query_one(typed, &params).await.unwrap();
        assert_eq!(raw_row(&a), raw_row(&b), "binary results differ");
        assert_eq!(a.get::<_, i64>(0), i64::MIN);
        assert_eq!(a.get::<_, f64>(1), -1.5e300);
        assert_eq!(a.get::<_, Vec<u8>>(2), all_bytes);
        let ts: std::time::SystemTime = a.get(3);
        assert_eq!(
            ts.duration_since(std::time::UNIX_EPOCH).unwrap(),
            Duration::from_millis(1_709_190_296_789)
        );
        assert_eq!(a.get::<_, String>(5), "-0.5");
        assert_eq!(a.get::<_, String>(6), "ünïcode ✓");
        assert!(a.get::<_, f64>(7).is_nan());
        assert_eq!(
            a.get::<_, Vec<Option<i32>>>(8),
            vec![Some(1), None, Some(3)]
        );
        assert_eq!(a.get::<_, Option<i32>>(12), None);
        assert!(a.get::<_, bool>(13));
        // Numeric in its binary form: weight, sign and base-10000 digits.
        assert_eq!(
            a.get::<_, RawVal>(4),
            RawVal(Some(vec![
                0, 7, 0, 4, 0, 0, 0, 6, 4, 210, 22, 46, 35, 52, 13, 128, 30, 210, 0, 1, 8, 252
            ]))
        );

        // A named prepared statement, reused 1000 times.
        let reuse = |client: Client| async move {
            let stmt = client
                .prepare("select $1::int4 * 3, md5($1::text), $1::int4 % 7 = 0")
                .await
                .unwrap();
            let started = Instant::now();
            let mut out = Vec::with_capacity(1000);
            for i in 0..1000i32 {
                let r = client.query_one(&stmt, &[&i]).await.unwrap();
                assert_eq!(r.get::<_, i32>(0), i * 3);
                out.push(raw_row(&r));
            }
            (out, started.elapsed(), client)
        };
        let (r_via, t_via, via_back) = within("reuse via", 60, reuse(via)).await;
        let (r_direct, t_direct, direct_back) = within("reuse direct", 60, reuse(direct)).await;
        via = via_back;
        direct = direct_back;
        assert_eq!(r_via, r_direct, "prepared statement results differ");
        eprintln!("[extended] 1000 executions: via {t_via:.2?}, direct {t_direct:.2?}");

        // Portals with a row limit: 95 rows in 10-row batches, and two
        // portals fetched alternately in one transaction.
        async fn portals(client: &mut Client) -> (Vec<usize>, Vec<Vec<RawVal>>, Vec<Vec<RawVal>>) {
            let tx = client.transaction().await.unwrap();
            let stmt = tx
                .prepare("select g, md5(g::text) from generate_series(1, $1::int4) g")
                .await
                .unwrap();
            let p1 = tx.bind(&stmt, &[&95i32]).await.unwrap();
            let p2 = tx.bind(&stmt, &[&33i32]).await.unwrap();
            let (mut sizes, mut rows1, mut rows2) = (Vec::new(), Vec::new(), Vec::new());
            let (mut done1, mut done2) = (false, false);
            while !(done1 && done2) {
                if !done1 {
                    let batch = tx.query_portal(&p1, 10).await.unwrap();
                    sizes.push(batch.len());
                    done1 = batch.is_empty();
                    rows1.extend(batch.iter().map(raw_row));
                }
                if !done2 {
                    let batch = tx.query_portal(&p2, 7).await.unwrap();
                    done2 = batch.is_empty();
                    rows2.extend(batch.iter().map(raw_row));
                }
            }
            tx.commit().await.unwrap();
            (sizes, rows1, rows2)
        }
        let p_via = within("portals via", 60, portals(&mut via)).await;
        let p_direct = within("portals direct", 60, portals(&mut direct)).await;
        assert_eq!(p_via.0, [10, 10, 10, 10, 10, 10, 10, 10, 10, 5, 0]);
        assert_eq!((p_via.1.len(), p_via.2.len()), (95, 33));
        assert_eq!(p_via.1[94][0], RawVal(Some(95i32.to_be_bytes().to_vec())));
        assert_eq!(p_via, p_direct, "portal results differ");

        // Describe: parameter and column types as the server reports them.
        direct
            .batch_execute("create table described (id int8 primary key, label varchar(20))")
            .await
            .unwrap();
        let describe = |client: Client| async move {
            let mut out = Vec::new();
            for sql in [
                "select $1::int8 + 1 as a, $2::text as b, $3::bytea as c, \
                 $4::timestamptz as d, $5::numeric(10, 2) as e, $6::int4[] as f",
                "select $1 = 'x' as unknown_param, id, label from described where id = $2",
                "insert into described values ($1, $2)",
            ] {
                let st = client.prepare(sql).await.unwrap();
                out.push((
                    st.params().to_vec(),
                    st.columns()
                        .iter()
                        .map(|c| {
                            (
                                c.name().to_owned(),
                                c.type_().clone(),
                                c.table_oid(),
                                c.column_id(),
                                c.type_modifier(),
                            )
                        })
                        .collect::<Vec<_>>(),
                ));
            }
            let st = client
                .prepare_typed("select $1 as p", &[Type::INT2])
                .await
                .unwrap();
            out.push((st.params().to_vec(), Vec::new()));
            out
        };
        let d_via = within("describe via", 30, describe(via)).await;
        let d_direct = within("describe direct", 30, describe(direct)).await;
        assert_eq!(d_via, d_direct, "descriptions differ");
        assert_eq!(
            d_via[0].0,
            [
                Type::INT8,
                Type::TEXT,
                Type::BYTEA,
                Type::TIMESTAMPTZ,
                Type::NUMERIC,
                Type::INT4_ARRAY
            ]
        );
        assert_eq!(d_via[1].0, [Type::TEXT, Type::INT8]);
        assert_eq!(d_via[1].1[2].0, "label");
        assert_eq!(d_via[1].1[2].3, Some(2));
        assert_eq!(d_via[3].0, [Type::INT2]);
    });
}

// ---------------------------------------------------------------------------
// 7. Backpressure to a slow reader.

/// A raw protocol connection after login.
struct RawSession {
    raw: Raw,
}

/// Where Postgres itself listens.
fn direct_addr(env: &Env) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], env.cluster.port()))
}

/// Logs in with a raw client (cleartext, md5 or SCRAM-SHA-256 as asked)
/// and reads up to the first ReadyForQuery.
fn raw_login(addr: SocketAddr, user: &str, password: &str, app: &str) -> RawSession {
    use postgres_protocol::authentication::sasl;
    use postgres_protocol::message::frontend;
    let mut raw = Raw::connect(addr);
    raw.send(&startup_message(&[
        ("user", user),
        ("database", "appdb"),
        ("application_name", app),
    ]));
    let mut scram = None;
    loop {
        let (tag, body) = raw.read_message();
        let mut out = BytesMut::new();
        match tag {
            b'R' => {
                let code = i32::from_be_bytes(body[..4].try_into().unwrap());
                match code {
                    0 => {}
                    3 => frontend::password_message(password.as_bytes(), &mut out).unwrap(),
                    5 => {
                        let salt = body[4..8].try_into().unwrap();
                        let hash = postgres_protocol::authentication::md5_hash(
                            user.as_bytes(),
                            password.as_bytes(),
                            salt,
                        );
                        frontend::password_message(hash.as_bytes(), &mut out).unwrap();
                    }
                    10 => {
                        let s = sasl::ScramSha256::new(
                            password.as_bytes(),
                            sasl::ChannelBinding::unsupported(),
                        );
                        frontend::sasl_initial_response(sasl::SCRAM_SHA_256, s.message(), &mut out)
                            .unwrap();
                        scram = Some(s);
                    }
                    11 => {
                        let s = scram.as_mut().unwrap();
                        s.update(&body[4..]).unwrap();
                        frontend::sasl_response(s.message(), &mut out).unwrap();
                    }
                    12 => scram.take().unwrap().finish(&body[4..]).unwrap(),
                    other => panic!("unexpected authentication request {other}"),
                }
            }
            b'E' => panic!("login failed: {:?}", error_fields(&body)),
            b'Z' => return RawSession { raw },
            _ => {} // ParameterStatus, BackendKeyData
        }
        if !out.is_empty() {
            raw.send(&out);
        }
    }
}

/// Reads backend messages up to and including ReadyForQuery.
fn read_until_ready(raw: &mut Raw) -> Vec<(u8, Vec<u8>)> {
    let mut out = Vec::new();
    loop {
        let m = raw.read_message();
        let done = m.0 == b'Z';
        out.push(m);
        if done {
            return out;
        }
    }
}

const SLOW_SQL: &str = "SELECT repeat('x', 1000) FROM generate_series(1, 500000)";

/// Sends the ~500 MB query, then reads 8 KiB every 50 ms until `stop`,
/// then closes. Returns the first 256 KiB it read.
fn slow_reader(mut session: RawSession, stop: Arc<AtomicBool>, read: Arc<AtomicU64>) -> Vec<u8> {
    let mut q = BytesMut::new();
    postgres_protocol::message::frontend::query(SLOW_SQL, &mut q).unwrap();
    session.raw.send(&q);
    let mut prefix = Vec::new();
    let mut buf = [0u8; 8192];
    while !stop.load(Ordering::Relaxed) {
        let n = session.raw.0.read(&mut buf).unwrap();
        assert!(n > 0, "the connection closed early");
        if prefix.len() < 256 * 1024 {
            prefix.extend_from_slice(&buf[..n]);
        }
        read.fetch_add(n as u64, Ordering::Relaxed);
        std::thread::sleep(Duration::from_millis(50));
    }
    prefix
}

/// A client reading ~500 MB of results slowly through tollgate: tollgate's
/// memory stays flat and the server backend waits on ClientWrite (the
/// backpressure reaches Postgres rather than tollgate buffering), just as
/// with the same slow client connected directly; closing the client ends
/// the server's query.
#[test]
fn slow_reader_backpressure_reaches_the_server() {
    let s = setup();
    let baseline = rss_kib(s.env.pid());
    let stops: Vec<Arc<AtomicBool>> = (0..2).map(|_| Arc::new(AtomicBool::new(false))).collect();
    let counts: Vec<Arc<AtomicU64>> = (0..2).map(|_| Arc::new(AtomicU64::new(0))).collect();
    let sessions = [
        raw_login(s.env.addr(), "app", &s.token, "slow-via"),
        raw_login(
            direct_addr(&s.env),
            "app",
            s.env.cluster.password(),
            "slow-direct",
        ),
    ];
    let readers: Vec<_> = sessions
        .into_iter()
        .zip(stops.iter().cloned().zip(counts.iter().cloned()))
        .map(|(session, (stop, read))| std::thread::spawn(move || slow_reader(session, stop, read)))
        .collect();

    runtime().block_on(async {
        let observer = pg_connect(&s.direct).await.unwrap();
        let wait_events = || async {
            let rows = observer
                .query(
                    "select application_name, coalesce(wait_event, ''), state from pg_stat_activity \
                     where application_name like 'slow-%' and query = $1 order by 1",
                    &[&SLOW_SQL],
                )
                .await
                .unwrap();
            rows.iter()
                .map(|r| (r.get::<_, String>(0), r.get::<_, String>(1), r.get::<_, String>(2)))
                .collect::<Vec<_>>()
        };
        let started = Instant::now();
        let mut client_write = [0u32, 0u32]; // samples in ClientWrite: via, direct
        let mut samples = 0u32;
        let mut max_rss = 0u64;
        while started.elapsed() < Duration::from_secs(4) {
            tokio::time::sleep(Duration::from_millis(100)).await;
            max_rss = max_rss.max(rss_kib(s.env.pid()).0);
            let events = wait_events().await;
            samples += 1;
            for (app, event, state) in events {
                assert_eq!(state, "active", "{app}");
                let i = if app.starts_with("slow-via") { 0 } else { 1 };
                if event == "ClientWrite" {
                    client_write[i] += 1;
                }
            }
        }
        let read: Vec<u64> = counts.iter().map(|c| c.load(Ordering::Relaxed)).collect();
        eprintln!(
            "[slow reader] {samples} samples over {:.2?}: backend in ClientWrite via {} / direct {}; \
             client read via {} / direct {} bytes; tollgate max VmRSS {:.1} MiB",
            started.elapsed(),
            client_write[0],
            client_write[1],
            read[0],
            read[1],
            mib(max_rss)
        );
        assert!(
            max_rss < RSS_LIMIT_KIB,
            "tollgate's RSS reached {:.1} MiB while a client read slowly",
            mib(max_rss)
        );
        assert!(
            client_write[1] > samples / 2,
            "the direct backend was not held up by the slow client (control)"
        );
        assert!(
            client_write[0] > samples / 2,
            "through tollgate the backend was in ClientWrite in only {} of {samples} samples: \
             the backpressure does not reach the server",
            client_write[0]
        );
        assert!(read[0] < 10_000_000, "the slow client read {} bytes", read[0]);

        // Close both clients: the server's queries end.
        for stop in &stops {
            stop.store(true, Ordering::Relaxed);
        }
        let prefixes: Vec<Vec<u8>> = readers.into_iter().map(|r| r.join().unwrap()).collect();
        let common = prefixes[0].len().min(prefixes[1].len());
        assert!(common > 64 * 1024, "read only {common} bytes");
        assert_eq!(
            prefixes[0][..common],
            prefixes[1][..common],
            "the first bytes through tollgate differ from direct"
        );
        assert_eq!(prefixes[0][0], b'T', "RowDescription first");
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let left = wait_events().await;
            if left.is_empty() {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "backends still running 10 s after their clients closed: {left:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    assert_rss_flat(&s.env, "slow reader", baseline);
}
