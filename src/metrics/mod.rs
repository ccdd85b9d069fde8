//! Metrics: each shard counts into its own cells and histograms, with no
//! atomics and nothing another thread writes; a scrape asks every shard
//! for a [`ShardSnapshot`] (by message, see `crate::admin`) and merges them
//! into the Prometheus text format.
//!
//! Per-message work is not counted here: the relay keeps a session's bytes,
//! queries and transactions in the session's own cells, which a snapshot
//! adds up across the shard's open sessions, and which are folded into the
//! shard's totals when the session ends. What the relay does record here is
//! one latency per query cycle and per transaction, when timing is on.

pub mod exposition;
pub mod latency;
mod pools;

use std::cell::{Cell, RefCell};
use std::collections::{HashMap, HashSet};
use std::rc::Rc;
use std::sync::{Arc, Mutex};
use std::time::Duration;

pub use exposition::{Exposition, CONTENT_TYPE};
pub use latency::Latency;
pub use pools::PoolView;

/// The token label used for tokens beyond the per-token series limit.
pub const OTHER_TOKENS: &str = "_other";

/// What a session moved, for totals.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Totals {
    pub bytes_from_client: u64,
    pub bytes_from_server: u64,
    /// Completed query cycles (ReadyForQuery messages).
    pub queries: u64,
    /// Query cycles that left the session idle: committed or rolled-back
    /// transactions, explicit or implicit.
    pub transactions: u64,
}

impl Totals {
    pub fn add(&mut self, o: &Totals) {
        self.bytes_from_client += o.bytes_from_client;
        self.bytes_from_server += o.bytes_from_server;
        self.queries += o.queries;
        self.transactions += o.transactions;
    }
}

/// Counts by a label from a small, fixed vocabulary (`&'static str`, so
/// a label can never carry client input).
#[derive(Debug, Clone, Default)]
pub struct Labeled(Vec<(&'static str, u64)>);

impl Labeled {
    pub fn add(&mut self, label: &'static str, n: u64) {
        match self.0.iter_mut().find(|(l, _)| *l == label) {
            Some((_, c)) => *c += n,
            None => self.0.push((label, n)),
        }
    }

    pub fn get(&self, label: &str) -> u64 {
        self.0
            .iter()
            .find(|(l, _)| *l == label)
            .map_or(0, |(_, c)| *c)
    }

    pub fn iter(&self) -> impl Iterator<Item = (&'static str, u64)> + '_ {
        self.0.iter().copied()
    }
}

/// Which tokens get their own latency series. Shared by all shards so that
/// the limit bounds the whole process, not each shard; consulted once per
/// session start, never per message.
pub struct TokenSeriesLimit {
    max: usize,
    admitted: Mutex<HashSet<String>>,
}

impl TokenSeriesLimit {
    pub fn new(max: usize) -> Self {
        TokenSeriesLimit {
            max,
            admitted: Mutex::default(),
        }
    }

    /// The label for `token_id`: itself while there is room, else
    /// [`OTHER_TOKENS`].
    fn label(&self, token_id: &str) -> Rc<str> {
        let mut admitted = self.admitted.lock().unwrap_or_else(|e| e.into_inner());
        if admitted.contains(token_id) {
            return Rc::from(token_id);
        }
        if admitted.len() < self.max {
            admitted.insert(token_id.to_owned());
            return Rc::from(token_id);
        }
        Rc::from(OTHER_TOKENS)
    }
}

/// The latencies of one token's sessions on one shard.
#[derive(Default)]
pub struct TokenLatency {
    pub query: RefCell<Latency>,
    pub transaction: RefCell<Latency>,
}

/// One shard's metrics. `!Send`: only the shard writes them.
pub struct ShardMetrics {
    shard: usize,
    /// Whether the relay times query cycles and transactions.
    timing: bool,
    per_token: Option<Arc<TokenSeriesLimit>>,
    connections: Cell<u64>,
    connections_closed: Cell<u64>,
    accepted: Cell<u64>,
    rejected: RefCell<Labeled>,
    ended: RefCell<Labeled>,
    cancels: RefCell<Labeled>,
    tls_handshakes: RefCell<Labeled>,
    /// What sessions that already ended moved.
    ended_totals: Cell<Totals>,
    pub query: RefCell<Latency>,
    pub transaction: RefCell<Latency>,
    upstream_connect: RefCell<Latency>,
    token_check: RefCell<Latency>,
    tls_handshake: RefCell<Latency>,
    tokens: RefCell<HashMap<Rc<str>, Rc<TokenLatency>>>,
}

impl ShardMetrics {
    pub fn new(shard: usize, timing: bool, per_token: Option<Arc<TokenSeriesLimit>>) -> Self {
        ShardMetrics {
            shard,
            timing,
            per_token: per_token.filter(|_| timing),
            connections: Cell::new(0),
            connections_closed: Cell::new(0),
            accepted: Cell::new(0),
            rejected: RefCell::default(),
            ended: RefCell::default(),
            cancels: RefCell::default(),
            tls_handshakes: RefCell::default(),
            ended_totals: Cell::new(Totals::default()),
            query: RefCell::default(),
            transaction: RefCell::default(),
            upstream_connect: RefCell::default(),
            token_check: RefCell::default(),
            tls_handshake: RefCell::default(),
            tokens: RefCell::default(),
        }
    }

    pub fn timing(&self) -> bool {
        self.timing
    }

    pub fn connection_opened(&self) {
        bump(&self.connections, 1);
    }

    pub fn connection_closed(&self) {
        bump(&self.connections_closed, 1);
    }

    pub fn accepted(&self) {
        bump(&self.accepted, 1);
    }

    pub fn rejected(&self, reason: &'static str) {
        self.rejected.borrow_mut().add(reason, 1);
    }

    pub fn cancel(&self, result: &'static str) {
        self.cancels.borrow_mut().add(result, 1);
    }

    pub fn tls_handshake(&self, ok: bool, took: Duration) {
        let result = if ok { "ok" } else { "failed" };
        self.tls_handshakes.borrow_mut().add(result, 1);
        self.tls_handshake.borrow_mut().record(took);
    }

    pub fn token_checked(&self, took: Duration) {
        self.token_check.borrow_mut().record(took);
    }

    pub fn upstream_connected(&self, took: Duration) {
        self.upstream_connect.borrow_mut().record(took);
    }

    pub fn session_ended(&self, ended_by: &'static str, totals: &Totals) {
        self.ended.borrow_mut().add(ended_by, 1);
        let mut t = self.ended_totals.get();
        t.add(totals);
        self.ended_totals.set(t);
    }

    /// The latency series for a session of `token_id`, when per-token
    /// series are on.
    pub fn token_series(&self, token_id: &str) -> Option<Rc<TokenLatency>> {
        let limit = self.per_token.as_ref()?;
        if let Some(t) = self.tokens.borrow().get(token_id) {
            return Some(t.clone());
        }
        let label = limit.label(token_id);
        let series = self.tokens.borrow_mut().entry(label).or_default().clone();
        Some(series)
    }

    /// Everything counted so far; `live` is what the shard's open sessions
    /// moved, `sessions_active` how many there are.
    pub fn snapshot(&self, live: Totals, sessions_active: u64) -> ShardSnapshot {
        let mut totals = self.ended_totals.get();
        totals.add(&live);
        let connections = self.connections.get();
        ShardSnapshot {
            shard: self.shard,
            connections,
            connections_open: connections.saturating_sub(self.connections_closed.get()),
            accepted: self.accepted.get(),
            sessions_active,
            rejected: self.rejected.borrow().clone(),
            ended: self.ended.borrow().clone(),
            cancels: self.cancels.borrow().clone(),
            tls_handshakes: self.tls_handshakes.borrow().clone(),
            totals,
            query: self.query.borrow().clone(),
            transaction: self.transaction.borrow().clone(),
            upstream_connect: self.upstream_connect.borrow().clone(),
            token_check: self.token_check.borrow().clone(),
            tls_handshake: self.tls_handshake.borrow().clone(),
            tokens: self
                .tokens
                .borrow()
                .iter()
                .map(|(id, t)| {
                    (
                        id.to_string(),
                        t.query.borrow().clone(),
                        t.transaction.borrow().clone(),
                    )
                })
                .collect(),
            pools: Vec::new(),
        }
    }
}

#[inline]
fn bump(c: &Cell<u64>, n: u64) {
    c.set(c.get() + n);
}

/// One shard's metrics at one moment, sent to the admin thread.
#[derive(Debug, Clone)]
pub struct ShardSnapshot {
    pub shard: usize,
    pub connections: u64,
    pub connections_open: u64,
    pub accepted: u64,
    pub sessions_active: u64,
    pub rejected: Labeled,
    pub ended: Labeled,
    pub cancels: Labeled,
    pub tls_handshakes: Labeled,
    pub totals: Totals,
    pub query: Latency,
    pub transaction: Latency,
    pub upstream_connect: Latency,
    pub token_check: Latency,
    pub tls_handshake: Latency,
    /// Token label, query latency, transaction latency.
    pub tokens: Vec<(String, Latency, Latency)>,
    /// The shard's server connection pools.
    pub pools: Vec<PoolView>,
}

/// Process-wide facts for the exposition.
#[derive(Debug, Clone)]
pub struct ProcessFacts {
    pub version: &'static str,
    pub shards: usize,
    pub tokens_loaded: u64,
    pub uptime: Duration,
    pub driver: crate::shard::driver::Driver,
    /// Config reloads since start: successful, failed.
    pub reloads: (u64, u64),
    pub draining: bool,
    /// For a control-database store: whether the snapshot is stale, and
    /// its age (time since last known current).
    pub token_store: Option<(bool, Duration)>,
}

/// Renders the merged exposition.
pub fn render(shards: &[ShardSnapshot], facts: &ProcessFacts) -> String {
    let mut e = Exposition::new();
    render_process(&mut e, facts, shards.len());
    render_shard_counters(&mut e, shards);
    render_latencies(&mut e, shards);
    render_token_latencies(&mut e, shards);
    pools::render(&mut e, shards);
    e.finish()
}

/// The process-wide gauges and counters; `responding`: shards that
/// answered this scrape.
fn render_process(e: &mut Exposition, facts: &ProcessFacts, responding: usize) {
    e.family(
        "tollgate_build_info",
        "gauge",
        "Always 1; labels say which build and I/O driver run, and the io_uring set-up flags.",
    );
    e.sample(
        "tollgate_build_info",
        &[
            ("version", facts.version),
            ("driver", facts.driver.name()),
            ("ring_flags", facts.driver.ring_flags()),
        ],
        1.0,
    );
    e.family(
        "tollgate_uptime_seconds",
        "gauge",
        "Seconds since the process started.",
    );
    e.sample("tollgate_uptime_seconds", &[], facts.uptime.as_secs_f64());
    e.family("tollgate_shards", "gauge", "Shards configured.");
    e.sample("tollgate_shards", &[], facts.shards as f64);
    e.family(
        "tollgate_shards_responding",
        "gauge",
        "Shards that answered this scrape.",
    );
    e.sample("tollgate_shards_responding", &[], responding as f64);
    e.family(
        "tollgate_tokens_loaded",
        "gauge",
        "Tokens in the current token store snapshot.",
    );
    e.sample("tollgate_tokens_loaded", &[], facts.tokens_loaded as f64);
    if let Some((stale, age)) = facts.token_store {
        e.family(
            "tollgate_token_store_stale",
            "gauge",
            "1 while the control database is out of reach and the last snapshot serves.",
        );
        e.sample(
            "tollgate_token_store_stale",
            &[],
            f64::from(u8::from(stale)),
        );
        e.family(
            "tollgate_token_store_age_seconds",
            "gauge",
            "Seconds since the token snapshot was last confirmed current (heartbeats confirm it every second).",
        );
        e.sample("tollgate_token_store_age_seconds", &[], age.as_secs_f64());
    }
    e.family(
        "tollgate_config_reloads_total",
        "counter",
        "Config reloads (SIGHUP or POST /reload) by result; a failed one changes nothing.",
    );
    e.sample(
        "tollgate_config_reloads_total",
        &[("result", "ok")],
        facts.reloads.0 as f64,
    );
    e.sample(
        "tollgate_config_reloads_total",
        &[("result", "error")],
        facts.reloads.1 as f64,
    );
    e.family(
        "tollgate_draining",
        "gauge",
        "1 once shutdown started: listeners closed, open sessions finishing.",
    );
    e.sample("tollgate_draining", &[], u8::from(facts.draining) as f64);
}

/// A per-shard series: its name, type and help, and how to read it.
type ShardSeries = (
    &'static str,
    &'static str,
    &'static str,
    fn(&ShardSnapshot) -> u64,
);
/// A per-shard counter with one more label: its name, help and label, and
/// how to read it.
type LabeledSeries = (
    &'static str,
    &'static str,
    &'static str,
    fn(&ShardSnapshot) -> &Labeled,
);

const CONNECTION_SERIES: [ShardSeries; 4] = [
    ("tollgate_connections_total", "counter",
     "Client connections accepted by the listener (logins, cancel requests, and attempts that failed).",
     |s| s.connections),
    ("tollgate_connections_open", "gauge",
     "Client connections open, logged in or not.",
     |s| s.connections_open),
    ("tollgate_connections_accepted_total", "counter",
     "Logins that passed the token check and the upstream login.",
     |s| s.accepted),
    ("tollgate_connections_active", "gauge",
     "Logged-in sessions being relayed.",
     |s| s.sessions_active),
];

const LABELED_SERIES: [LabeledSeries; 4] = [
    (
        "tollgate_connections_rejected_total",
        "Connection attempts refused, by the real reason (the client is told less).",
        "reason",
        |s| &s.rejected,
    ),
    (
        "tollgate_sessions_ended_total",
        "Logged-in sessions that ended, by how they ended.",
        "ended_by",
        |s| &s.ended,
    ),
    (
        "tollgate_cancel_requests_total",
        "CancelRequests received, by what became of them.",
        "result",
        |s| &s.cancels,
    ),
    (
        "tollgate_tls_handshakes_total",
        "TLS handshakes with clients, by result.",
        "result",
        |s| &s.tls_handshakes,
    ),
];

const TRAFFIC_SERIES: [ShardSeries; 4] = [
    ("tollgate_client_bytes_total", "counter",
     "Bytes relayed from clients to the server, open sessions included.",
     |s| s.totals.bytes_from_client),
    ("tollgate_server_bytes_total", "counter",
     "Bytes relayed from the server to clients, open sessions included.",
     |s| s.totals.bytes_from_server),
    ("tollgate_queries_total", "counter",
     "Query cycles completed (one per ReadyForQuery: a simple Query, an extended-protocol Sync, or a FunctionCall).",
     |s| s.totals.queries),
    ("tollgate_transactions_total", "counter",
     "Transactions completed (ReadyForQuery back to idle), implicit ones included.",
     |s| s.totals.transactions),
];

/// The counters and gauges each shard keeps, one series per shard.
fn render_shard_counters(e: &mut Exposition, shards: &[ShardSnapshot]) {
    let shard_labels: Vec<String> = shards.iter().map(|s| s.shard.to_string()).collect();
    let per_shard = |e: &mut Exposition, series: &[ShardSeries]| {
        for (name, kind, help, read) in series {
            e.family(name, kind, help);
            for (s, label) in shards.iter().zip(&shard_labels) {
                e.sample(name, &[("shard", label)], read(s) as f64);
            }
        }
    };
    per_shard(e, &CONNECTION_SERIES);
    for (name, help, label, read) in LABELED_SERIES {
        e.family(name, "counter", help);
        for (s, shard) in shards.iter().zip(&shard_labels) {
            for (l, c) in read(s).iter() {
                e.sample(name, &[("shard", shard), (label, l)], c as f64);
            }
        }
    }
    per_shard(e, &TRAFFIC_SERIES);
}

/// The latency histograms, merged over the shards.
fn render_latencies(e: &mut Exposition, shards: &[ShardSnapshot]) {
    let merged = |f: &dyn Fn(&ShardSnapshot) -> &Latency| {
        let mut l = Latency::new();
        for s in shards {
            l.merge(f(s));
        }
        l
    };
    type Pick = fn(&ShardSnapshot) -> &Latency;
    let histograms: [(&str, &str, Pick); 5] = [
        ("tollgate_query_duration_seconds",
         "From a Query or the first message of an extended-protocol cycle to its ReadyForQuery, as seen by tollgate.",
         |s| &s.query),
        ("tollgate_transaction_duration_seconds",
         "From the first message of a transaction to the ReadyForQuery that ends it, as seen by tollgate.",
         |s| &s.transaction),
        ("tollgate_upstream_connect_duration_seconds",
         "Connecting and logging in to the server (TCP, TLS, authentication) for a new session.",
         |s| &s.upstream_connect),
        ("tollgate_token_check_duration_seconds",
         "Checking a client's token (opaque or JWT) against the store.",
         |s| &s.token_check),
        ("tollgate_tls_handshake_duration_seconds",
         "TLS handshakes with clients, successful or not.",
         |s| &s.tls_handshake),
    ];
    for (name, help, pick) in histograms {
        e.family(name, "histogram", help);
        e.histogram(name, &[], &merged(&pick));
    }
}

/// The per-token latency histograms (per-token metrics on), merged over
/// the shards.
fn render_token_latencies(e: &mut Exposition, shards: &[ShardSnapshot]) {
    let mut tokens: Vec<(&str, Latency, Latency)> = Vec::new();
    for s in shards {
        for (id, q, t) in &s.tokens {
            match tokens.iter_mut().find(|(i, _, _)| i == id) {
                Some((_, mq, mt)) => {
                    mq.merge(q);
                    mt.merge(t);
                }
                None => tokens.push((id, q.clone(), t.clone())),
            }
        }
    }
    if !tokens.is_empty() {
        tokens.sort_by(|a, b| a.0.cmp(b.0));
        let name = "tollgate_token_query_duration_seconds";
        e.family(
            name,
            "histogram",
            "Query cycle latency per token (per-token metrics on).",
        );
        for (id, q, _) in &tokens {
            e.histogram(name, &[("token_id", id)], q);
        }
        let name = "tollgate_token_transaction_duration_seconds";
        e.family(
            name,
            "histogram",
            "Transaction latency per token (per-token metrics on).",
        );
        for (id, _, t) in &tokens {
            e.histogram(name, &[("token_id", id)], t);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn per_token_series_are_bounded_across_shards() {
        let limit = Arc::new(TokenSeriesLimit::new(2));
        let a = ShardMetrics::new(0, true, Some(limit.clone()));
        let b = ShardMetrics::new(1, true, Some(limit));
        assert!(a.token_series("t1").is_some());
        b.token_series("t2");
        b.token_series("t1");
        a.token_series("t3");
        b.token_series("t4");
        let mut labels: Vec<String> = [
            a.snapshot(Totals::default(), 0),
            b.snapshot(Totals::default(), 0),
        ]
        .iter()
        .flat_map(|s| s.tokens.iter().map(|t| t.0.clone()))
        .collect();
        labels.sort();
        labels.dedup();
        assert_eq!(labels, ["_other", "t1", "t2"]);
    }

    #[test]
    fn per_token_series_are_off_without_timing() {
        let limit = Arc::new(TokenSeriesLimit::new(2));
        assert!(ShardMetrics::new(0, false, Some(limit))
            .token_series("t")
            .is_none());
    }

    #[test]
    fn a_scrape_merges_shards() {
        let a = ShardMetrics::new(0, true, None);
        let b = ShardMetrics::new(1, true, None);
        a.rejected("bad_secret");
        a.rejected("bad_secret");
        b.rejected("expired");
        a.query.borrow_mut().record(Duration::from_micros(40));
        b.query.borrow_mut().record(Duration::from_micros(60));
        a.session_ended(
            "client_closed",
            &Totals {
                queries: 3,
                ..Totals::default()
            },
        );
        let live = Totals {
            queries: 2,
            ..Totals::default()
        };
        let snaps = [a.snapshot(live, 1), b.snapshot(Totals::default(), 0)];
        let facts = ProcessFacts {
            version: "x",
            shards: 2,
            tokens_loaded: 4,
            uptime: Duration::from_secs(1),
            driver: crate::shard::driver::Driver::IoUring(
                crate::shard::driver::RingSetup::SingleIssuerCoop,
            ),
            reloads: (2, 1),
            draining: false,
            token_store: Some((true, Duration::from_millis(2500))),
        };
        let text = render(&snaps, &facts);
        assert!(text.contains(
            "tollgate_connections_rejected_total{shard=\"0\",reason=\"bad_secret\"} 2\n"
        ));
        assert!(text
            .contains("tollgate_connections_rejected_total{shard=\"1\",reason=\"expired\"} 1\n"));
        assert!(text.contains("tollgate_queries_total{shard=\"0\"} 5\n"));
        assert!(text.contains("tollgate_query_duration_seconds_count 2\n"));
        assert!(text.contains("tollgate_query_duration_seconds_bucket{le=\"0.00005\"} 1\n"));
        assert!(text.contains("tollgate_connections_active{shard=\"0\"} 1\n"));
        assert!(text.contains("tollgate_token_store_stale 1\n"));
        assert!(text.contains("tollgate_token_store_age_seconds 2.5\n"));
    }
}
