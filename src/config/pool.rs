//! `[pool]`: how logged-in server connections are kept and reused, at the
//! top of the config, with per-upstream overrides (`[upstream.pool]` or
//! `[[upstream]] pool = { ... }`). Every field of an override is optional
//! and falls back to the top-level value.

use std::time::Duration;

use serde::Deserialize;

pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(600);
pub const DEFAULT_MAX_LIFETIME: Duration = Duration::from_secs(3600);
pub const DEFAULT_CHECKOUT_TIMEOUT: Duration = Duration::from_secs(10);
/// PgBouncer's `server_check_delay`: a connection idle for less is trusted
/// without a round trip (a dead one is still caught by a look at its
/// socket, which costs no round trip).
pub const DEFAULT_CHECK_AFTER: Duration = Duration::from_secs(30);
pub const DEFAULT_RESET_QUERY: &str = "DISCARD ALL";
/// PgBouncer's default for the same setting.
pub const DEFAULT_MAX_PREPARED_STATEMENTS: usize = 200;
/// Longest reset query accepted; it is sent as one simple Query.
const MAX_RESET_QUERY: usize = 4096;

/// Whether server connections outlive their clients.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PoolMode {
    /// A client holds one server connection for its session; when it
    /// leaves, the connection is reset and kept for the next client.
    #[default]
    Session,
    /// A client holds a server connection for one transaction at a time:
    /// lent at the transaction's first message, taken back at the
    /// ReadyForQuery that ends it idle, with no reset in between. A
    /// client that makes session state (see README, "Transaction
    /// pooling") keeps its connection until it clears that state.
    Transaction,
    /// A fresh login per client, closed when the client leaves.
    Off,
}

impl PoolMode {
    /// Whether server connections outlive their clients.
    pub fn pooled(self) -> bool {
        self != PoolMode::Off
    }

    pub fn as_str(self) -> &'static str {
        match self {
            PoolMode::Session => "session",
            PoolMode::Transaction => "transaction",
            PoolMode::Off => "off",
        }
    }
}

/// `[pool]` and `[upstream.pool]` as written.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawPool {
    mode: Option<PoolMode>,
    max_server_connections: Option<usize>,
    min_idle: Option<usize>,
    idle_timeout: Option<String>,
    max_lifetime: Option<String>,
    reset_query: Option<String>,
    checkout_timeout: Option<String>,
    check_after: Option<String>,
    idle_transaction_timeout: Option<String>,
    max_prepared_statements: Option<usize>,
}

/// One upstream's pool settings, resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolConfig {
    pub mode: PoolMode,
    /// Server connections to this upstream over all shards (0: no limit
    /// but the server's own). Each shard gets a fixed share.
    pub max_server_connections: usize,
    /// Idle connections kept open per pool key (over all shards).
    pub min_idle: usize,
    /// An idle connection unused this long is closed (beyond `min_idle`).
    pub idle_timeout: Duration,
    /// A connection older than this (less up to a fifth, drawn per
    /// connection so that a pool opened at once does not close at once) is
    /// closed when it next comes back idle.
    pub max_lifetime: Duration,
    /// What makes a returned connection fresh again.
    pub reset_query: String,
    /// How long a client waits for a connection when the upstream's
    /// connections are all in use.
    pub checkout_timeout: Duration,
    /// A connection idle longer than this is checked with a round trip
    /// before a client gets it.
    pub check_after: Duration,
    /// Transaction pooling: a client that leaves its transaction open and
    /// idle this long is ended (25P03, as Postgres's own
    /// `idle_in_transaction_session_timeout`), so that it cannot hold a
    /// server connection for good. `None`: no limit.
    pub idle_transaction_timeout: Option<Duration>,
    /// Transaction pooling: prepared statements kept per server connection
    /// (the least recently used is closed beyond it).
    pub max_prepared_statements: usize,
}

impl Default for PoolConfig {
    fn default() -> Self {
        PoolConfig {
            mode: PoolMode::Session,
            max_server_connections: 0,
            min_idle: 0,
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
            max_lifetime: DEFAULT_MAX_LIFETIME,
            reset_query: DEFAULT_RESET_QUERY.to_owned(),
            checkout_timeout: DEFAULT_CHECKOUT_TIMEOUT,
            check_after: DEFAULT_CHECK_AFTER,
            idle_transaction_timeout: None,
            max_prepared_statements: DEFAULT_MAX_PREPARED_STATEMENTS,
        }
    }
}

impl PoolConfig {
    /// `raw` over `base`: the fields `raw` sets win. `at` names the section
    /// in errors.
    pub(super) fn resolve(
        base: &PoolConfig,
        raw: Option<RawPool>,
        at: &str,
    ) -> Result<PoolConfig, String> {
        let Some(raw) = raw else {
            return Ok(base.clone());
        };
        let duration = |field: &str, v: Option<String>, default: Duration| {
            super::positive_duration(&format!("{at} {field}"), v, default)
        };
        let pool = PoolConfig {
            mode: raw.mode.unwrap_or(base.mode),
            max_server_connections: raw
                .max_server_connections
                .unwrap_or(base.max_server_connections),
            min_idle: raw.min_idle.unwrap_or(base.min_idle),
            idle_timeout: duration("idle_timeout", raw.idle_timeout, base.idle_timeout)?,
            max_lifetime: duration("max_lifetime", raw.max_lifetime, base.max_lifetime)?,
            reset_query: raw.reset_query.unwrap_or_else(|| base.reset_query.clone()),
            checkout_timeout: duration(
                "checkout_timeout",
                raw.checkout_timeout,
                base.checkout_timeout,
            )?,
            // Zero is allowed: check every connection before use.
            check_after: match raw.check_after {
                None => base.check_after,
                Some(s) => {
                    super::parse_duration(&s).map_err(|e| format!("{at} check_after: {e}"))?
                }
            },
            // Zero turns it off, as in Postgres.
            idle_transaction_timeout: match raw.idle_transaction_timeout {
                None => base.idle_transaction_timeout,
                Some(s) => {
                    let d = super::parse_duration(&s)
                        .map_err(|e| format!("{at} idle_transaction_timeout: {e}"))?;
                    (!d.is_zero()).then_some(d)
                }
            },
            max_prepared_statements: raw
                .max_prepared_statements
                .unwrap_or(base.max_prepared_statements)
                .max(1),
        };
        let query = pool.reset_query.trim();
        if query.is_empty() || query.len() > MAX_RESET_QUERY || query.contains('\0') {
            return Err(format!(
                "{at} reset_query must be a statement of 1 to {MAX_RESET_QUERY} bytes without NUL"
            ));
        }
        if pool.max_server_connections != 0 && pool.min_idle > pool.max_server_connections {
            return Err(format!(
                "{at} min_idle = {} is more than max_server_connections = {}",
                pool.min_idle, pool.max_server_connections
            ));
        }
        Ok(pool)
    }

    /// This shard's share of a total over `shards` shards: an even split,
    /// the remainder to the first shards, at least one each (so a limit
    /// below the shard count is exceeded, up to one per shard). 0 stays 0
    /// (no limit).
    pub fn share(total: usize, shard: usize, shards: usize) -> usize {
        if total == 0 {
            return 0;
        }
        let shards = shards.max(1);
        let share = total / shards + usize::from(shard < total % shards);
        share.max(1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares_add_up_to_the_total_and_never_leave_a_shard_without_one() {
        for (total, shards) in [(5, 2), (100, 8), (7, 7), (1, 1)] {
            let sum: usize = (0..shards)
                .map(|s| PoolConfig::share(total, s, shards))
                .sum();
            assert_eq!(sum, total, "{total} over {shards}");
        }
        assert_eq!(PoolConfig::share(5, 0, 2), 3);
        assert_eq!(PoolConfig::share(5, 1, 2), 2);
        // Fewer than shards: one each.
        assert_eq!(PoolConfig::share(2, 3, 4), 1);
        assert_eq!(PoolConfig::share(0, 0, 4), 0);
    }

    #[test]
    fn an_override_changes_only_what_it_sets() {
        let base = PoolConfig::default();
        let raw = RawPool {
            max_server_connections: Some(5),
            check_after: Some("0s".into()),
            ..RawPool::default()
        };
        let p = PoolConfig::resolve(&base, Some(raw), "[upstream.pool]").unwrap();
        assert_eq!(p.max_server_connections, 5);
        assert_eq!(p.check_after, Duration::ZERO);
        assert_eq!(p.reset_query, "DISCARD ALL");
        assert_eq!(p.idle_timeout, DEFAULT_IDLE_TIMEOUT);
        let bad = RawPool {
            min_idle: Some(6),
            max_server_connections: Some(5),
            ..RawPool::default()
        };
        let e = PoolConfig::resolve(&base, Some(bad), "[pool]").unwrap_err();
        assert!(e.contains("min_idle"), "{e}");
        let empty = RawPool {
            reset_query: Some("  ".into()),
            ..RawPool::default()
        };
        assert!(PoolConfig::resolve(&base, Some(empty), "[pool]").is_err());
    }
}
