//! The server connection pools in the exposition: per upstream and shard,
//! connections idle and in use, clients waiting, checkouts, resets and
//! closes; the checkout wait merged over the shards.

use serde::Serialize;

use super::{Exposition, Labeled, Latency, ShardSnapshot};

/// One upstream's pool on one shard, as a snapshot carries it.
#[derive(Debug, Clone, Serialize)]
pub struct PoolView {
    pub upstream: String,
    pub shard: usize,
    pub mode: &'static str,
    /// This shard's share of `max_server_connections` (0: no limit).
    pub limit: usize,
    pub idle: usize,
    pub active: usize,
    pub waiting: usize,
    /// Waiters taken from the line to look for a connection that have
    /// not looked yet.
    pub waking: usize,
    pub checkouts_reused: u64,
    pub checkouts_login: u64,
    pub checkouts_waited: u64,
    pub checkout_timeouts: u64,
    pub resets: u64,
    pub reset_failures: u64,
    /// Connections closed, by reason.
    #[serde(serialize_with = "labeled")]
    pub closed: Labeled,
    /// Transaction pooling: connections taken back at a transaction's end.
    pub transaction_lends: u64,
    /// Transaction pooling: clients pinned to their connection, by reason.
    #[serde(serialize_with = "labeled")]
    pub pins: Labeled,
    /// Transaction pooling: pinned clients that cleared their session
    /// state and were unpinned.
    pub unpins: u64,
    /// Transaction pooling: prepared statements used where the lent
    /// connection held them, prepared because it did not, and evicted.
    pub statements: [u64; 3],
    #[serde(skip)]
    pub checkout_wait: Latency,
}

fn labeled<S: serde::Serializer>(l: &Labeled, s: S) -> Result<S::Ok, S::Error> {
    use serde::ser::SerializeMap;
    let mut map = s.serialize_map(None)?;
    for (k, v) in l.iter() {
        map.serialize_entry(k, &v)?;
    }
    map.end()
}

type Read = fn(&PoolView) -> u64;
/// A series split by one more label: its name, help, label and values.
type Split = (
    &'static str,
    &'static str,
    &'static str,
    fn(&PoolView) -> Labeled,
);

const GAUGES: [(&str, &str, Read); 2] = [
    (
        "tollgate_pool_clients_waiting",
        "Clients waiting for a server connection.",
        |v| v.waiting as u64,
    ),
    (
        "tollgate_pool_max_server_connections",
        "This shard's share of the upstream's max_server_connections (0: no limit).",
        |v| v.limit as u64,
    ),
];

const COUNTERS: [(&str, &str, Read); 6] = [
    (
        "tollgate_pool_transaction_lends_total",
        "Transaction pooling: server connections taken back at the end of a client's transaction.",
        |v| v.transaction_lends,
    ),
    (
        "tollgate_pool_unpins_total",
        "Transaction pooling: pinned clients unpinned after clearing their session state (DISCARD ALL, RESET ALL, ...).",
        |v| v.unpins,
    ),
    (
        "tollgate_pool_checkouts_waited_total",
        "Checkouts that waited in line for a server connection.",
        |v| v.checkouts_waited,
    ),
    (
        "tollgate_pool_checkout_timeouts_total",
        "Clients refused with 53300 after checkout_timeout.",
        |v| v.checkout_timeouts,
    ),
    (
        "tollgate_pool_resets_total",
        "Server connections reset after their client left.",
        |v| v.resets,
    ),
    (
        "tollgate_pool_reset_failures_total",
        "Server connections whose reset failed (closed instead of pooled).",
        |v| v.reset_failures,
    ),
];

const SPLIT: [Split; 5] = [
    ("tollgate_pool_server_connections", "gauge", "state", |v| {
        let mut l = Labeled::default();
        l.add("idle", v.idle as u64);
        l.add("active", v.active as u64);
        l
    }),
    ("tollgate_pool_checkouts_total", "counter", "result", |v| {
        let mut l = Labeled::default();
        l.add("reused", v.checkouts_reused);
        l.add("login", v.checkouts_login);
        l
    }),
    (
        "tollgate_pool_server_closes_total",
        "counter",
        "reason",
        |v| v.closed.clone(),
    ),
    ("tollgate_pool_pins_total", "counter", "reason", |v| {
        v.pins.clone()
    }),
    (
        "tollgate_pool_prepared_statements_total",
        "counter",
        "result",
        |v| {
            let mut l = Labeled::default();
            let [hit, prepared, evicted] = v.statements;
            if hit + prepared + evicted > 0 {
                l.add("hit", hit);
                l.add("prepared", prepared);
                l.add("evicted", evicted);
            }
            l
        },
    ),
];

const SPLIT_HELP: [&str; 5] = [
    "Server connections per upstream and shard, by state.",
    "Server connections handed to clients: reused from the pool, or a new login.",
    "Server connections closed, by reason.",
    "Transaction pooling: clients pinned to their server connection until they clear their session state, by reason.",
    "Transaction pooling: prepared statements a lent connection held (hit), prepared on it first (prepared), or closed to stay under max_prepared_statements (evicted).",
];

pub(super) fn render(e: &mut Exposition, shards: &[ShardSnapshot]) {
    let views: Vec<&PoolView> = shards.iter().flat_map(|s| &s.pools).collect();
    if views.is_empty() {
        return;
    }
    let labels = |v: &PoolView| (v.upstream.clone(), v.shard.to_string());
    for ((name, kind, label, read), help) in SPLIT.into_iter().zip(SPLIT_HELP) {
        e.family(name, kind, help);
        for v in &views {
            let (upstream, shard) = labels(v);
            for (value, n) in read(v).iter() {
                let l = [
                    ("upstream", upstream.as_str()),
                    ("shard", &shard),
                    (label, value),
                ];
                e.sample(name, &l, n as f64);
            }
        }
    }
    let plain = GAUGES.iter().map(|g| (g, "gauge"));
    for ((name, help, read), kind) in plain.chain(COUNTERS.iter().map(|c| (c, "counter"))) {
        e.family(name, kind, help);
        for v in &views {
            let (upstream, shard) = labels(v);
            e.sample(
                name,
                &[("upstream", &upstream), ("shard", &shard)],
                read(v) as f64,
            );
        }
    }
    let name = "tollgate_pool_checkout_wait_seconds";
    e.family(
        name,
        "histogram",
        "How long clients that found their upstream's connections in use waited for one.",
    );
    let mut upstreams: Vec<&str> = views.iter().map(|v| v.upstream.as_str()).collect();
    upstreams.sort_unstable();
    upstreams.dedup();
    for up in upstreams {
        let mut merged = Latency::new();
        for v in views.iter().filter(|v| v.upstream == up) {
            merged.merge(&v.checkout_wait);
        }
        e.histogram(name, &[("upstream", up)], &merged);
    }
}
