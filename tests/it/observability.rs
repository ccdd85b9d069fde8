//! Observability, end to end: `/metrics` moves exactly with known traffic
//! and parses as Prometheus text, per-token series, `/sessions` and
//! `DELETE /sessions/{id}`, `/healthz`, and the query audit.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::time::{Duration, Instant, SystemTime};

use crate::harness::*;
use prometheus_parse::{LineInfo, Scrape, Value};
use tokio::task::JoinHandle;

const ADMIN_BEARER: &str = "admin-bearer-token-0123";

/// An env with the admin listener on a free loopback port; `admin` and
/// `more` are extra keys of `[admin]` and extra tables.
fn env_with_admin(admin: &str, more: &str) -> (Env, SocketAddr) {
    let port = free_port();
    let env = Env::build(EnvOptions {
        tables: format!("[admin]\nlisten = \"127.0.0.1:{port}\"\n{admin}\n{more}\n"),
        ..EnvOptions::default()
    });
    (env, SocketAddr::from(([127, 0, 0, 1], port)))
}

/// The id of a token: what the store, the logs and the labels call it.
fn token_id(token: &str) -> &str {
    &token[3..15]
}

/// A token that passes the checksum but was never issued with this secret.
fn with_checksum(body: String) -> String {
    let crc = crc32fast::hash(body.as_bytes());
    format!("{body}{crc:08x}")
}

/// Connects and drives the connection in a task whose result says how the
/// connection ended.
async fn open(
    conn: &str,
) -> (
    tokio_postgres::Client,
    JoinHandle<Result<(), tokio_postgres::Error>>,
) {
    let (client, connection) = tokio_postgres::connect(conn, tokio_postgres::NoTls)
        .await
        .expect("connect through tollgate");
    (client, tokio::spawn(connection))
}

/// Runs `select <n>` as a simple query and checks the answer.
async fn simple_select(client: &tokio_postgres::Client, n: usize) {
    let messages = client.simple_query(&format!("select {n}")).await.unwrap();
    let value = messages.iter().find_map(|m| match m {
        tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).map(str::to_owned),
        _ => None,
    });
    assert_eq!(value, Some(n.to_string()));
}

/// Drops the client (which sends Terminate) and waits for its connection
/// task to finish cleanly.
async fn close(
    client: tokio_postgres::Client,
    task: JoinHandle<Result<(), tokio_postgres::Error>>,
) {
    drop(client);
    tokio::time::timeout(Duration::from_secs(5), task)
        .await
        .expect("connection did not close")
        .unwrap()
        .expect("connection closed with an error");
}

// --- /metrics ---

/// A parsed scrape.
struct Metrics {
    text: String,
    scrape: Scrape,
}

/// A histogram series: (le, cumulative count) sorted by le, `_count`, `_sum`.
#[derive(Debug)]
struct Histogram {
    buckets: Vec<(f64, f64)>,
    count: f64,
    sum: f64,
}

fn labels_match(labels: &prometheus_parse::Labels, want: &[(&str, &str)]) -> bool {
    want.iter().all(|(k, v)| labels.get(k) == Some(*v))
}

impl Metrics {
    /// Sum of the samples of a counter or gauge whose labels include `want`.
    fn sum(&self, name: &str, want: &[(&str, &str)]) -> f64 {
        self.scrape
            .samples
            .iter()
            .filter(|s| s.metric == name && labels_match(&s.labels, want))
            .map(|s| match s.value {
                Value::Counter(v) | Value::Gauge(v) | Value::Untyped(v) => v,
                ref other => panic!("{name} is not a scalar: {other:?}"),
            })
            .sum()
    }

    /// Whether any sample of `name` has labels including `want`.
    fn has(&self, name: &str, want: &[(&str, &str)]) -> bool {
        self.scrape
            .samples
            .iter()
            .any(|s| s.metric == name && labels_match(&s.labels, want))
    }

    /// The values of label `label` over the samples of `name`.
    fn label_values(&self, name: &str, label: &str) -> HashSet<String> {
        self.scrape
            .samples
            .iter()
            .filter(|s| s.metric == name)
            .filter_map(|s| s.labels.get(label).map(str::to_owned))
            .collect()
    }

    /// The one histogram series of `name` with exactly the labels `want`,
    /// checked for the invariants every histogram must keep: cumulative
    /// buckets, a `+Inf` bucket equal to `_count`, a sum that is not
    /// negative (and positive when anything was recorded).
    fn histogram(&self, name: &str, want: &[(&str, &str)]) -> Histogram {
        let exact = |l: &prometheus_parse::Labels| l.len() == want.len() && labels_match(l, want);
        let series: Vec<_> = self
            .scrape
            .samples
            .iter()
            .filter(|s| s.metric == name && exact(&s.labels))
            .collect();
        assert_eq!(series.len(), 1, "{name}{want:?}: series {series:?}");
        let Value::Histogram(ref b) = series[0].value else {
            panic!("{name} is not a histogram: {:?}", series[0].value);
        };
        let buckets: Vec<(f64, f64)> = b.iter().map(|h| (h.less_than, h.count)).collect();
        let scalar = |suffix: &str| -> f64 {
            let n = format!("{name}{suffix}");
            let found: Vec<f64> = self
                .scrape
                .samples
                .iter()
                .filter(|s| s.metric == n && exact(&s.labels))
                .map(|s| match s.value {
                    Value::Untyped(v) | Value::Counter(v) | Value::Gauge(v) => v,
                    ref other => panic!("{n}: {other:?}"),
                })
                .collect();
            assert_eq!(found.len(), 1, "{n}{want:?}: {found:?}");
            found[0]
        };
        let h = Histogram {
            buckets,
            count: scalar("_count"),
            sum: scalar("_sum"),
        };
        assert!(h.buckets.len() > 1, "{name}: {h:?}");
        assert!(
            h.buckets.windows(2).all(|w| w[0].0 < w[1].0),
            "{name}: bucket bounds not increasing in exposition order: {h:?}"
        );
        assert!(
            h.buckets.windows(2).all(|w| w[0].1 <= w[1].1),
            "{name}: buckets are not cumulative: {h:?}"
        );
        let last = h.buckets.last().unwrap();
        assert_eq!(last.0, f64::INFINITY, "{name}: no +Inf bucket: {h:?}");
        assert_eq!(last.1, h.count, "{name}: +Inf bucket != _count: {h:?}");
        assert!(h.sum >= 0.0, "{name}: {h:?}");
        if h.count > 0.0 {
            assert!(h.sum > 0.0, "{name}: values recorded but sum is 0: {h:?}");
        }
        h
    }
}

/// Parses the labels of a sample line strictly (`name="value"` pairs,
/// values escaped as the format says), returning them.
fn parse_labels(s: &str) -> Result<Vec<(String, String)>, String> {
    let mut out = Vec::new();
    let mut chars = s.chars().peekable();
    loop {
        let mut name = String::new();
        while let Some(&c) = chars.peek() {
            if c.is_ascii_alphanumeric() || c == '_' {
                name.push(c);
                chars.next();
            } else {
                break;
            }
        }
        if name.is_empty() || name.starts_with(|c: char| c.is_ascii_digit()) {
            return Err(format!("bad label name in {s:?}"));
        }
        if chars.next() != Some('=') || chars.next() != Some('"') {
            return Err(format!("expected =\" after {name} in {s:?}"));
        }
        let mut value = String::new();
        loop {
            match chars.next() {
                None => return Err(format!("unterminated value in {s:?}")),
                Some('"') => break,
                Some('\\') => match chars.next() {
                    Some('\\') => value.push('\\'),
                    Some('"') => value.push('"'),
                    Some('n') => value.push('\n'),
                    other => return Err(format!("bad escape {other:?} in {s:?}")),
                },
                Some('\n') => return Err(format!("raw line feed in {s:?}")),
                Some(c) => value.push(c),
            }
        }
        if out.iter().any(|(n, _)| *n == name) {
            return Err(format!("label {name} twice in {s:?}"));
        }
        out.push((name, value));
        match chars.next() {
            None => return Ok(out),
            Some(',') => {}
            Some(c) => return Err(format!("unexpected {c:?} in {s:?}")),
        }
    }
}

/// Checks a whole exposition against the text format 0.0.4: every family
/// has one `# HELP` and one `# TYPE`, declared before its samples, which
/// come together; every sample line parses, belongs to the family being
/// written, has well-formed labels and a number; counters are finite and
/// not negative; histogram buckets carry `le`.
fn check_exposition(body: &str) {
    assert!(
        body.ends_with('\n'),
        "the exposition does not end with a line feed"
    );
    let mut types: HashMap<String, String> = HashMap::new();
    let mut helps: HashSet<String> = HashSet::new();
    let mut current: Option<String> = None;
    for (i, line) in body.lines().enumerate() {
        let at = format!("line {}: {line:?}", i + 1);
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let name = rest.split(' ').next().unwrap();
            assert!(
                helps.insert(name.to_owned()),
                "{at}: second HELP for {name}"
            );
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut parts = rest.split(' ');
            let (name, kind) = (parts.next().unwrap(), parts.next().unwrap_or(""));
            assert_eq!(parts.next(), None, "{at}");
            assert!(
                ["counter", "gauge", "histogram", "summary", "untyped"].contains(&kind),
                "{at}: unknown type"
            );
            assert!(
                types.insert(name.to_owned(), kind.to_owned()).is_none(),
                "{at}: second TYPE for {name}"
            );
            current = Some(name.to_owned());
            continue;
        }
        assert!(!line.starts_with('#'), "{at}: unexpected comment");
        assert!(!line.trim().is_empty(), "{at}: empty line");
        let LineInfo::Sample {
            metric_name,
            labels,
            value,
            timestamp,
        } = LineInfo::parse(line)
        else {
            panic!("{at}: not a sample line");
        };
        assert_eq!(timestamp, None, "{at}: unexpected timestamp");
        let family = current
            .as_deref()
            .unwrap_or_else(|| panic!("{at}: sample before any # TYPE"));
        let kind = &types[family];
        let allowed: Vec<String> = if kind == "histogram" {
            ["_bucket", "_sum", "_count"]
                .iter()
                .map(|s| format!("{family}{s}"))
                .collect()
        } else {
            vec![family.to_owned()]
        };
        assert!(
            allowed.iter().any(|a| a == metric_name),
            "{at}: sample outside its family {family} (or its # TYPE is missing)"
        );
        assert!(
            helps.contains(family),
            "{at}: family {family} has no # HELP"
        );
        let labels = match labels {
            Some(l) => {
                // LineInfo stops at the first '}': the labels must be all
                // that was inside the braces.
                let inner = &line[metric_name.len() + 1..line.rfind('}').unwrap()];
                assert_eq!(inner, l, "{at}: a label value holds a brace");
                parse_labels(l).unwrap_or_else(|e| panic!("{at}: {e}"))
            }
            None => Vec::new(),
        };
        let v: f64 = match value {
            "+Inf" => f64::INFINITY,
            "-Inf" => f64::NEG_INFINITY,
            "NaN" => f64::NAN,
            v => v.parse().unwrap_or_else(|e| panic!("{at}: value: {e}")),
        };
        if kind == "counter" || metric_name.ends_with("_bucket") || metric_name.ends_with("_count")
        {
            assert!(
                v.is_finite() && v >= 0.0,
                "{at}: a count must be finite and >= 0"
            );
        }
        if metric_name.ends_with("_bucket") && kind == "histogram" {
            let le = labels
                .iter()
                .find(|(n, _)| n == "le")
                .unwrap_or_else(|| panic!("{at}: bucket without le"));
            assert!(
                le.1 == "+Inf" || le.1.parse::<f64>().is_ok(),
                "{at}: le is not a number"
            );
        }
    }
    assert!(!types.is_empty(), "an empty exposition");
}

/// GET /metrics: status, content type, and a strict parse.
fn scrape(admin: SocketAddr) -> Metrics {
    let r = http(admin, "GET", "/metrics", None);
    assert_eq!(r.status, 200, "{}", r.body);
    let ct = r.header("content-type").unwrap_or_default();
    assert!(
        ct.starts_with("text/plain; version=0.0.4"),
        "content type {ct:?}"
    );
    check_exposition(&r.body);
    let scrape = Scrape::parse(r.body.lines().map(|l| Ok(l.to_owned()))).unwrap();
    Metrics {
        text: r.body,
        scrape,
    }
}

/// Scrapes until `done` holds (while letting the runtime's tasks run), or
/// fails after `within`.
async fn scrape_until(
    admin: SocketAddr,
    within: Duration,
    what: &str,
    done: impl Fn(&Metrics) -> bool,
) -> Metrics {
    let deadline = Instant::now() + within;
    loop {
        let m = scrape(admin);
        if done(&m) {
            return m;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: not seen within {within:?}; last scrape:\n{}",
            m.text
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Bytes a simple `select <n>` puts on the wire from the client: a Query
/// message.
fn query_message_len(sql: &str) -> usize {
    1 + 4 + sql.len() + 1
}

#[test]
fn metrics_parse_and_move_with_known_traffic() {
    let (mut env, admin) = env_with_admin("", "");
    let token = env.create_token(&["--user", "app", "--database", "appdb"]);
    env.start_proxy();

    // Before any traffic: the shards answer and nothing was counted.
    let m = scrape(admin);
    assert_eq!(m.sum("tollgate_shards", &[]), 2.0);
    assert_eq!(m.sum("tollgate_shards_responding", &[]), 2.0);
    assert_eq!(m.sum("tollgate_tokens_loaded", &[]), 1.0);
    assert_eq!(
        m.label_values("tollgate_connections_accepted_total", "shard")
            .len(),
        2
    );
    assert_eq!(m.sum("tollgate_connections_accepted_total", &[]), 0.0);
    assert_eq!(m.sum("tollgate_queries_total", &[]), 0.0);
    assert_eq!(
        m.histogram("tollgate_query_duration_seconds", &[]).count,
        0.0
    );

    const K: usize = 25;
    let per_session = [9, 8, 8];
    assert_eq!(per_session.iter().sum::<usize>(), K);
    let wrong_secret = with_checksum(format!("{}{}", &token[..16], "5".repeat(64)));
    let wrong_secret_2 = with_checksum(format!("{}{}", &token[..16], "6".repeat(64)));
    let unknown = with_checksum(format!("tg_zzzzzzzzzzzz_{}", &token[16..80]));
    let mut client_bytes_min = 0;

    runtime().block_on(async {
        let conn = env.conn_str("app", "appdb", &token);
        let mut sessions = Vec::new();
        for _ in 0..3 {
            sessions.push(open(&conn).await);
        }

        // Four refusals, each for a known reason.
        for (secret, db) in [
            (&wrong_secret, "appdb"),
            (&wrong_secret_2, "appdb"),
            (&unknown, "appdb"),
            (&token, "postgres"),
        ] {
            let (code, _) = connect_error(&env.conn_str("app", db, secret)).await;
            assert_eq!(code, "28P01");
        }

        let mut n = 0;
        for ((client, _), count) in sessions.iter().zip(per_session) {
            for _ in 0..count {
                n += 1;
                simple_select(client, n).await;
                client_bytes_min += query_message_len(&format!("select {n}"));
            }
        }
        assert_eq!(n, K);

        // While the sessions are open: they are active, and their numbers
        // already count.
        let open_now = scrape(admin);
        assert_eq!(open_now.sum("tollgate_connections_active", &[]), 3.0);
        assert_eq!(open_now.sum("tollgate_queries_total", &[]), K as f64);
        assert_eq!(open_now.sum("tollgate_transactions_total", &[]), K as f64);
        assert_eq!(
            open_now.sum("tollgate_sessions_ended_total", &[]),
            0.0,
            "{}",
            open_now.text
        );
        let open_client_bytes = open_now.sum("tollgate_client_bytes_total", &[]);
        let open_server_bytes = open_now.sum("tollgate_server_bytes_total", &[]);
        assert!(
            open_client_bytes >= client_bytes_min as f64,
            "{}",
            open_now.text
        );

        for (client, task) in sessions {
            close(client, task).await;
        }
        let m = scrape_until(admin, Duration::from_secs(5), "3 client_closed ends", |m| {
            m.sum(
                "tollgate_sessions_ended_total",
                &[("ended_by", "client_closed")],
            ) >= 3.0
                && m.sum("tollgate_connections_open", &[]) == 0.0
        })
        .await;

        // Logins and refusals, by reason, summed over the shards.
        assert_eq!(m.sum("tollgate_connections_accepted_total", &[]), 3.0);
        let rejected = |reason| m.sum("tollgate_connections_rejected_total", &[("reason", reason)]);
        assert_eq!(rejected("bad_secret"), 2.0, "{}", m.text);
        assert_eq!(rejected("unknown_token"), 1.0, "{}", m.text);
        assert_eq!(rejected("database_not_allowed"), 1.0, "{}", m.text);
        // The harness's readiness probe connects and leaves: client_left.
        let reasons = m.label_values("tollgate_connections_rejected_total", "reason");
        let expected: HashSet<String> = [
            "bad_secret",
            "unknown_token",
            "database_not_allowed",
            "client_left",
        ]
        .map(String::from)
        .into();
        assert!(
            reasons.is_subset(&expected),
            "unexpected reasons {reasons:?}"
        );
        // Every connection ended as a login or a refusal, nothing twice.
        assert_eq!(
            m.sum("tollgate_connections_total", &[]),
            m.sum("tollgate_connections_accepted_total", &[])
                + m.sum("tollgate_connections_rejected_total", &[]),
            "{}",
            m.text
        );

        // Sessions: all closed by their clients, none left.
        assert_eq!(
            m.sum(
                "tollgate_sessions_ended_total",
                &[("ended_by", "client_closed")]
            ),
            3.0
        );
        assert_eq!(
            m.sum("tollgate_sessions_ended_total", &[]),
            3.0,
            "{}",
            m.text
        );
        assert_eq!(m.sum("tollgate_connections_active", &[]), 0.0);

        // Queries: exactly one per simple query (the login runs none), and
        // unchanged when the sessions' numbers fold into the totals.
        assert_eq!(m.sum("tollgate_queries_total", &[]), K as f64, "{}", m.text);
        assert_eq!(m.sum("tollgate_transactions_total", &[]), K as f64);
        let q = m.histogram("tollgate_query_duration_seconds", &[]);
        assert_eq!(q.count, K as f64, "{q:?}");
        let t = m.histogram("tollgate_transaction_duration_seconds", &[]);
        assert_eq!(t.count, K as f64, "{t:?}");
        // A `select n` over loopback takes well under 10 s.
        assert!(q.sum < K as f64 * 10.0, "{q:?}");
        let upstream = m.histogram("tollgate_upstream_connect_duration_seconds", &[]);
        assert_eq!(
            upstream.count, 3.0,
            "only logins reach the server: {upstream:?}"
        );
        let checks = m.histogram("tollgate_token_check_duration_seconds", &[]);
        assert!(checks.count >= 3.0, "{checks:?}");
        assert_eq!(
            m.histogram("tollgate_tls_handshake_duration_seconds", &[])
                .count,
            0.0
        );

        // Bytes: at least the queries and their answers, and never less
        // than while the sessions were open.
        let client_bytes = m.sum("tollgate_client_bytes_total", &[]);
        let server_bytes = m.sum("tollgate_server_bytes_total", &[]);
        assert!(
            client_bytes >= open_client_bytes,
            "{client_bytes} < {open_client_bytes}"
        );
        assert!(
            server_bytes >= open_server_bytes,
            "{server_bytes} < {open_server_bytes}"
        );
        // Each answer has at least a ReadyForQuery (6 bytes) and a
        // CommandComplete ("SELECT 1", 14 bytes).
        assert!(server_bytes >= (K * 20) as f64, "{server_bytes}");
        // Beyond the queries, the client sent at most a Terminate each.
        assert!(
            client_bytes >= client_bytes_min as f64
                && client_bytes <= (client_bytes_min + 3 * 5) as f64,
            "client bytes {client_bytes}, queries alone {client_bytes_min}"
        );

        // Per-token series are off by default.
        assert!(
            !m.has("tollgate_token_query_duration_seconds", &[]),
            "{}",
            m.text
        );
    });

    // The query audit is off by default.
    let log = env.log();
    assert!(log.contains("session started"), "no audit events at all?");
    assert!(
        !log.contains("event=\"query\""),
        "query audit ran while off"
    );
    env.assert_log_clean();
}

#[test]
fn per_token_series_when_enabled() {
    let (mut env, admin) = env_with_admin("per_token_metrics = true\nmax_token_series = 2", "");
    let a = env.create_token(&["--user", "app"]);
    let b = env.create_token(&["--user", "app"]);
    let c = env.create_token(&["--user", "app"]);
    env.start_proxy();
    let plan = [(&a, 4usize), (&b, 7), (&c, 2)];
    runtime().block_on(async {
        // One after the other, so that a and b take the two series and c,
        // past the limit, is counted under `_other`.
        for (token, queries) in plan {
            let (client, task) = open(&env.conn_str("app", "appdb", token)).await;
            for n in 0..queries {
                simple_select(&client, n).await;
            }
            close(client, task).await;
        }
        let m = scrape_until(admin, Duration::from_secs(5), "3 session ends", |m| {
            m.sum("tollgate_sessions_ended_total", &[]) >= 3.0
        })
        .await;
        let name = "tollgate_token_query_duration_seconds";
        let labels = m.label_values(name, "token_id");
        let want: HashSet<String> = [token_id(&a), token_id(&b), "_other"]
            .map(String::from)
            .into();
        assert_eq!(labels, want, "{}", m.text);
        for (label, count) in [(token_id(&a), 4.0), (token_id(&b), 7.0), ("_other", 2.0)] {
            let h = m.histogram(name, &[("token_id", label)]);
            assert_eq!(h.count, count, "{label}: {h:?}");
            // Each simple select is its own transaction.
            let t = m.histogram(
                "tollgate_token_transaction_duration_seconds",
                &[("token_id", label)],
            );
            assert_eq!(t.count, count, "{label}: {t:?}");
        }
        // The process-wide series holds them all.
        assert_eq!(
            m.histogram("tollgate_query_duration_seconds", &[]).count,
            13.0
        );
        assert_eq!(m.sum("tollgate_queries_total", &[]), 13.0);
        // Only ids, never a secret, in the labels.
        for token in [&a, &b, &c] {
            assert!(
                !m.text.contains(&token[16..80]),
                "a token secret in /metrics"
            );
        }
    });
    env.assert_log_clean();
}

// --- /sessions, DELETE, /healthz ---

fn sessions(admin: SocketAddr) -> Vec<serde_json::Value> {
    let r = http(admin, "GET", "/sessions", Some(ADMIN_BEARER));
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.header("content-type"), Some("application/json"));
    match serde_json::from_str(&r.body).expect("/sessions is JSON") {
        serde_json::Value::Array(a) => a,
        other => panic!("/sessions is not an array: {other}"),
    }
}

#[test]
fn sessions_list_and_delete() {
    let (mut env, admin) = env_with_admin(&format!("token = \"{ADMIN_BEARER}\""), "");
    let t1 = env.create_token(&["--user", "app", "--database", "appdb"]);
    let t2 = env.create_token(&["--user", "app"]);
    env.start_proxy();

    // Health and metrics need no bearer.
    let h = http(admin, "GET", "/healthz", None);
    assert_eq!(h.status, 200, "{}", h.body);
    let health: serde_json::Value = serde_json::from_str(&h.body).unwrap();
    assert_eq!(health["status"], "ok", "{health}");
    assert_eq!(health["shards"], 2, "{health}");
    assert_eq!(health["shards_up"], 2, "{health}");
    assert_eq!(health["tokens_loaded"], 2, "{health}");
    scrape(admin);

    runtime().block_on(async {
        let (s1, s1_end) = open(&env.conn_str("app", "appdb", &t1)).await;
        let (s2, s2_end) = open(&env.conn_str("app", "appdb", &t2)).await;
        s1.simple_query("BEGIN").await.unwrap();
        simple_select(&s2, 2).await;

        // /sessions needs the bearer: none, or a wrong one, gets 401.
        for bearer in [None, Some("admin-bearer-token-0124"), Some("")] {
            let r = http(admin, "GET", "/sessions", bearer);
            assert_eq!(r.status, 401, "{bearer:?}: {}", r.body);
            assert_eq!(r.header("www-authenticate"), Some("Bearer"));
            assert!(
                !r.body.contains("app"),
                "{bearer:?} leaked sessions: {}",
                r.body
            );
        }

        let raw = http(admin, "GET", "/sessions", Some(ADMIN_BEARER)).body;
        for secret in [&t1, &t2] {
            assert!(
                !raw.contains(&secret[16..80]),
                "/sessions shows a token secret"
            );
        }
        assert!(
            !raw.contains(env.cluster.password()),
            "/sessions shows the upstream password"
        );
        let list = sessions(admin);
        assert_eq!(list.len(), 2, "{list:?}");
        let by_token = |t: &str| -> serde_json::Value {
            list.iter()
                .find(|s| s["token_id"] == token_id(t))
                .unwrap_or_else(|| panic!("no session of token {}: {list:?}", token_id(t)))
                .clone()
        };
        let (v1, v2) = (by_token(&t1), by_token(&t2));
        assert_ne!(v1["id"], v2["id"]);
        let now = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap()
            .as_secs_f64();
        for (v, state, queries, transactions) in
            [(&v1, "idle in transaction", 1, 0), (&v2, "idle", 1, 1)]
        {
            assert_eq!(v["user"], "app", "{v}");
            assert_eq!(v["database"], "appdb", "{v}");
            assert_eq!(v["state"], state, "{v}");
            assert_eq!(v["queries"], queries, "{v}");
            assert_eq!(v["transactions"], transactions, "{v}");
            assert_eq!(v["tls"], serde_json::Value::Null, "{v}");
            let id = v["id"].as_str().unwrap();
            let (shard, _) = id.split_once('-').unwrap_or_else(|| panic!("id {id}"));
            assert_eq!(
                v["shard"].as_u64().map(|s| s.to_string()).as_deref(),
                Some(shard),
                "{v}"
            );
            assert!(
                v["client_addr"].as_str().unwrap().starts_with("127.0.0.1:"),
                "{v}"
            );
            let started_at = v["started_at"].as_f64().unwrap();
            assert!(started_at <= now && started_at > now - 60.0, "{v}");
            let age = v["age_seconds"].as_f64().unwrap();
            assert!((0.0..60.0).contains(&age), "{v}");
            assert!(v["bytes_from_client"].as_u64().unwrap() > 0, "{v}");
            assert!(v["bytes_from_server"].as_u64().unwrap() > 0, "{v}");
        }
        // A DBA joins /sessions (and the audit log) with pg_stat_activity
        // by the backend's pid.
        let direct = pg_connect(&env.direct_conn_str()).await.unwrap();
        for (v, state) in [(&v1, "idle in transaction"), (&v2, "idle")] {
            let pid = v["backend_pid"]
                .as_i64()
                .unwrap_or_else(|| panic!("no backend_pid: {v}"));
            let row = direct
                .query_one(
                    "select state, usename::text from pg_stat_activity where pid = $1",
                    &[&(pid as i32)],
                )
                .await
                .unwrap();
            assert_eq!(row.get::<_, String>(0), state, "{v}");
            assert_eq!(row.get::<_, String>(1), "app", "{v}");
            let started = format!(
                "token_id=\"{}\" backend_pid={pid} ",
                v["token_id"].as_str().unwrap()
            );
            assert!(
                env.log().contains(&started),
                "no {started:?} in the audit log"
            );
        }
        drop(direct);
        let id1 = v1["id"].as_str().unwrap().to_owned();
        let id2 = v2["id"].as_str().unwrap().to_owned();

        // DELETE without the bearer is refused and ends nothing.
        let r = http(admin, "DELETE", &format!("/sessions/{id2}"), None);
        assert_eq!(r.status, 401, "{}", r.body);
        // Unknown and malformed ids: 404.
        for bad in ["0-999999", "nope", "9-1", ""] {
            let r = http(
                admin,
                "DELETE",
                &format!("/sessions/{bad}"),
                Some(ADMIN_BEARER),
            );
            assert_eq!(r.status, 404, "{bad:?}: {}", r.body);
        }

        // DELETE ends session 1, idle in a transaction, without waiting for
        // its client to send anything.
        let r = http(
            admin,
            "DELETE",
            &format!("/sessions/{id1}"),
            Some(ADMIN_BEARER),
        );
        assert_eq!(r.status, 200, "{}", r.body);
        let body: serde_json::Value = serde_json::from_str(&r.body).unwrap();
        assert_eq!(body, serde_json::json!({ "terminated": id1 }));
        let ended = tokio::time::timeout(Duration::from_secs(3), s1_end)
            .await
            .expect("the terminated session's client was not told")
            .unwrap();
        let e = ended.expect_err("the connection ended without an error");
        let db = e
            .as_db_error()
            .unwrap_or_else(|| panic!("not a server error: {e}"));
        assert_eq!(db.code().code(), "57P01", "{db:?}");
        assert_eq!(db.severity(), "FATAL");
        assert_eq!(
            db.message(),
            "terminating connection due to administrator command"
        );
        let e = s1.simple_query("select 1").await.unwrap_err();
        assert!(e.is_closed(), "{e}");

        // The other session runs on, untouched by the unauthorised DELETE.
        simple_select(&s2, 7).await;
        assert!(!s2_end.is_finished());
        let r = http(
            admin,
            "DELETE",
            &format!("/sessions/{id1}"),
            Some(ADMIN_BEARER),
        );
        assert_eq!(r.status, 404, "{}", r.body);

        let deadline = Instant::now() + Duration::from_secs(3);
        let list = loop {
            let list = sessions(admin);
            if list.len() == 1 || Instant::now() > deadline {
                break list;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        assert_eq!(list.len(), 1, "{list:?}");
        assert_eq!(list[0]["id"], id2.as_str());
        assert_eq!(list[0]["queries"], 2);

        let m = scrape(admin);
        assert_eq!(
            m.sum(
                "tollgate_sessions_ended_total",
                &[("ended_by", "admin_terminated")]
            ),
            1.0,
            "{}",
            m.text
        );
        assert_eq!(m.sum("tollgate_connections_active", &[]), 1.0);
        assert_eq!(m.sum("tollgate_queries_total", &[]), 3.0, "{}", m.text);
        let h = http(admin, "GET", "/healthz", None);
        assert_eq!(h.status, 200);
        s2.simple_query("select 1").await.unwrap();
        assert!(!s2_end.is_finished());
    });
    let log = env.log();
    assert!(
        log.lines().any(|l| l.contains("session ended")
            && l.contains("ended_by=\"admin_terminated\"")
            && l.contains(token_id(&t1))),
        "no audit event for the terminated session"
    );
    env.assert_log_clean();
}

// --- the query audit ---

#[test]
fn query_audit_logs_sql_never_bind_values() {
    let mut env = Env::build(EnvOptions {
        tables: "[audit]\nqueries = true\nmax_query_length = 40\n".into(),
        ..EnvOptions::default()
    });
    let token = env.create_token(&["--user", "app"]);
    env.start_proxy();
    let marker = "bind-value-marker-8f3a";
    let long = "select 'abcdefghijklmnopqrstuvwxyz0123456789' || 'tail-marker-71c2' as x";
    assert!(long.len() > 40 && long.is_char_boundary(40));
    runtime().block_on(async {
        let (client, task) = open(&env.conn_str("app", "appdb", &token)).await;
        client.simple_query(long).await.unwrap();
        let row = client
            .query_one("select $1::text", &[&marker])
            .await
            .unwrap();
        assert_eq!(row.get::<_, String>(0), marker);
        close(client, task).await;
    });
    let id = token_id(&token);
    let audit_lines = |log: &str| -> Vec<String> {
        log.lines()
            .filter(|l| l.contains("tollgate::audit") && l.contains("event=\"query\""))
            .map(str::to_owned)
            .collect()
    };
    let deadline = Instant::now() + Duration::from_secs(5);
    let (log, lines) = loop {
        let log = env.log();
        let lines = audit_lines(&log);
        if lines.len() >= 2 || Instant::now() > deadline {
            break (log, lines);
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let joined = lines.join("\n");
    // Which message the SQL came in is a field of its own (`name="Query"`),
    // so a pipeline can select on it.
    let query = lines
        .iter()
        .find(|l| l.contains("=\"Query\""))
        .unwrap_or_else(|| panic!("no audit event for the Query:\n{joined}"));
    assert!(
        query.contains(&format!("sql={} truncated=true", &long[..40])),
        "the Query's SQL is not cut to its first 40 bytes:\n{query}"
    );
    assert!(query.contains(&format!("token_id={id}")), "{query}");
    let parse = lines
        .iter()
        .find(|l| l.contains("=\"Parse\""))
        .unwrap_or_else(|| panic!("no audit event for the Parse:\n{joined}"));
    assert!(
        parse.contains("sql=select $1::text truncated=false"),
        "the Parse's SQL is not logged:\n{parse}"
    );
    assert!(parse.contains(&format!("token_id={id}")), "{parse}");
    // Both name the session: the one the accepted-session event named.
    let session_of = |l: &str| -> String {
        let at = l.find("session=").expect("no session field") + "session=".len();
        l[at..]
            .split(' ')
            .next()
            .unwrap()
            .trim_matches('"')
            .to_owned()
    };
    let session = session_of(query);
    assert_eq!(session_of(parse), session);
    assert!(
        log.lines()
            .any(|l| l.contains("session started") && session_of(l) == session),
        "no accepted-session event for session {session}"
    );
    // Never a bind value, nor the SQL past the limit, anywhere in the log.
    assert!(
        !log.contains(marker),
        "a bind parameter value reached the log"
    );
    assert!(
        !log.contains("tail-marker-71c2"),
        "SQL past max_query_length reached the log"
    );
    env.assert_log_clean();
}

/// The keys of a JSON object, in order, duplicates kept (a `Value` would
/// keep only the last of a duplicated key).
struct JsonKeys(Vec<String>);

impl<'de> serde::Deserialize<'de> for JsonKeys {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = JsonKeys;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut m: A,
            ) -> Result<JsonKeys, A::Error> {
                let mut keys = Vec::new();
                while let Some((k, _)) = m.next_entry::<String, serde::de::IgnoredAny>()? {
                    keys.push(k);
                }
                Ok(JsonKeys(keys))
            }
        }
        d.deserialize_map(V)
    }
}

/// With `[log] format = "json"`, every audit line is one JSON object with
/// unique keys (log pipelines keep only one of a duplicated key), and the
/// query events carry the SQL, the cut flag and which message it came in.
#[test]
fn query_audit_json_lines_have_unique_keys() {
    let mut env = Env::build(EnvOptions {
        tables: "[audit]\nqueries = true\n[log]\nformat = \"json\"\n".into(),
        ..EnvOptions::default()
    });
    let token = env.create_token(&["--user", "app"]);
    env.start_proxy();
    let marker = "bind-value-marker-5d19";
    runtime().block_on(async {
        let (client, task) = open(&env.conn_str("app", "appdb", &token)).await;
        simple_select(&client, 3).await;
        let row = client
            .query_one("select $1::text", &[&marker])
            .await
            .unwrap();
        assert_eq!(row.get::<_, String>(0), marker);
        close(client, task).await;
    });
    // Whole lines only: the log may be read while a line is being written.
    let whole_lines = |log: &str| -> Vec<String> {
        log.split_inclusive('\n')
            .filter(|l| l.ends_with('\n'))
            .map(|l| l.trim_end().to_owned())
            .collect()
    };
    let deadline = Instant::now() + Duration::from_secs(5);
    let (log, lines) = loop {
        let log = env.log();
        let lines = whole_lines(&log);
        if lines.iter().any(|l| l.contains("\"session_end\"")) || Instant::now() > deadline {
            break (log, lines);
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let audit: Vec<&str> = lines
        .iter()
        .map(String::as_str)
        .filter(|l| l.contains("\"target\":\"tollgate::audit\""))
        .collect();
    assert!(audit.len() >= 4, "too few audit lines:\n{log}");
    let mut queries = Vec::new();
    for line in &audit {
        let keys: JsonKeys = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("not a JSON object ({e}): {line}"));
        let mut seen = HashSet::new();
        for k in &keys.0 {
            assert!(seen.insert(k), "key {k:?} twice in: {line}");
        }
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        if v["event"] == "query" {
            assert_eq!(v["token_id"], token_id(&token), "{line}");
            assert_eq!(v["truncated"], false, "{line}");
            queries.push(v);
        }
    }
    let names_message =
        |v: &serde_json::Value, m: &str| v.as_object().unwrap().values().any(|x| x == m);
    let q = queries
        .iter()
        .find(|v| v["sql"] == "select 3")
        .unwrap_or_else(|| panic!("no query event for the Query: {queries:?}"));
    assert!(names_message(q, "Query"), "{q}");
    let p = queries
        .iter()
        .find(|v| v["sql"] == "select $1::text")
        .unwrap_or_else(|| panic!("no query event for the Parse: {queries:?}"));
    assert!(names_message(p, "Parse"), "{p}");
    assert!(
        !log.contains(marker),
        "a bind parameter value reached the log"
    );
    env.assert_log_clean();
}
