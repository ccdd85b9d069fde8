//! The shard's open sessions, and its watcher: keeps the shard's token
//! snapshot current and ends the sessions whose token no longer allows
//! them (revoked, expired, rotated out, deleted), within one tick of the
//! change reaching the shard. The admin API reads and ends sessions here
//! too, by asking the shard (see `crate::shard::bus`).

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::rc::Rc;
use std::time::{Duration, Instant, SystemTime};

use serde::Serialize;
use tracing::info;

use super::kill::{KillReason, KillSwitch};
use super::relay::SessionStats;
use super::ShardContext;
use crate::audit::SessionId;
use crate::auth::{OnExpiry, Rejection, TokenStore};
use crate::metrics::Totals;

/// One open session as /sessions shows it. Never a secret: the token is
/// named by its id only.
#[derive(Debug, Clone, Serialize)]
pub struct SessionView {
    pub id: String,
    pub shard: usize,
    pub token_id: String,
    /// The server's process id for the session, to join with
    /// `pg_stat_activity.pid`.
    pub backend_pid: Option<u32>,
    pub user: String,
    pub database: String,
    pub client_addr: String,
    /// `TLSv1_3`, `TLSv1_2`, or none for plaintext.
    pub tls: Option<&'static str>,
    /// Seconds since the Unix epoch when the client connected.
    pub started_at: f64,
    pub age_seconds: f64,
    /// As pg_stat_activity names them: `active`, `idle`,
    /// `idle in transaction`, `idle in transaction (aborted)`.
    pub state: &'static str,
    pub bytes_from_client: u64,
    pub bytes_from_server: u64,
    pub queries: u64,
    pub transactions: u64,
}

/// How often each shard looks for a new token snapshot and due expiries.
pub const WATCH_INTERVAL: Duration = Duration::from_millis(100);

/// An open session: who it is (for `/sessions` and the audit log), its
/// live numbers, and what the watcher checks it against.
pub struct Watched {
    pub id: SessionId,
    pub user: String,
    pub database: String,
    pub client: crate::net::Peer,
    pub tls: Option<&'static str>,
    pub started_at: SystemTime,
    pub started: Instant,
    pub stats: Rc<SessionStats>,
    pub token_id: String,
    /// The server's process id for this session (`pg_stat_activity.pid`).
    pub backend_pid: Option<u32>,
    /// The hash of the secret the session logged in with.
    pub secret_sha256: [u8; 32],
    pub on_expiry: OnExpiry,
    /// For a JWT session: its `jti` (for the deny-list) and expiry; it has
    /// no record in the store.
    pub jwt: Option<(Option<String>, SystemTime)>,
    /// Shared with the session's relay, which waits on it.
    pub kill: Rc<KillSwitch>,
}

impl Watched {
    fn view(&self) -> SessionView {
        let stats = &self.stats;
        SessionView {
            id: self.id.to_string(),
            shard: self.id.shard,
            token_id: self.token_id.clone(),
            backend_pid: self.backend_pid,
            user: self.user.clone(),
            database: self.database.clone(),
            client_addr: self.client.to_string(),
            tls: self.tls,
            started_at: self
                .started_at
                .duration_since(SystemTime::UNIX_EPOCH)
                .map_or(0.0, |d| d.as_secs_f64()),
            age_seconds: self.started.elapsed().as_secs_f64(),
            state: stats.state(),
            bytes_from_client: stats.bytes_from_client.get(),
            bytes_from_server: stats.bytes_from_server.get(),
            queries: stats.queries.get(),
            transactions: stats.transactions.get(),
        }
    }
}

impl Watched {
    /// Whether the session may go on, and until when nothing can change
    /// that short of a store change.
    fn check(
        &self,
        store: &TokenStore,
        now: SystemTime,
    ) -> (Result<(), Rejection>, Option<SystemTime>) {
        let (verdict, deadline) = match &self.jwt {
            Some((jti, expires_at)) => {
                let verdict = if jti.as_deref().is_some_and(|j| store.is_jwt_revoked(j, now)) {
                    Err(Rejection::Revoked)
                } else if *expires_at <= now {
                    Err(Rejection::Expired)
                } else {
                    Ok(())
                };
                // A revocation stamped ahead of this clock (another
                // machine's) must still be acted on when it comes due.
                let revoked_at = jti.as_deref().and_then(|j| store.jwt_revoked_at(j));
                let deadline = revoked_at.map_or(*expires_at, |r| r.min(*expires_at));
                (verdict, Some(deadline))
            }
            None => (
                store.recheck(&self.token_id, &self.secret_sha256, now),
                store.deadline(&self.token_id, &self.secret_sha256),
            ),
        };
        let verdict = match verdict {
            Err(Rejection::Expired) if self.on_expiry == OnExpiry::Keep => Ok(()),
            other => other,
        };
        (verdict, deadline)
    }
}

/// The shard's open sessions, by session number.
#[derive(Default)]
pub struct Registry {
    sessions: RefCell<HashMap<u64, Rc<Watched>>>,
    /// The earliest time a session's token expires or its secret's grace
    /// ends; nothing needs checking before it unless the store changes.
    next_deadline: Cell<Option<SystemTime>>,
}

/// Removes its session from the registry when dropped.
pub struct Registration {
    registry: Rc<Registry>,
    key: u64,
    pub watched: Rc<Watched>,
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.registry.sessions.borrow_mut().remove(&self.key);
    }
}

impl Registry {
    /// Adds a session, checked at once against `store`: a change that
    /// reached the shard between the token check and now (the upstream
    /// login takes a while) must not let the session slip past the sweep.
    pub fn register(
        self: &Rc<Self>,
        watched: Watched,
        store: &TokenStore,
        now: SystemTime,
    ) -> Registration {
        let key = watched.id.number;
        let (verdict, deadline) = watched.check(store, now);
        if let Err(reason) = verdict {
            info!(token_id = %watched.token_id, reason = reason.as_str(), "ending session");
            watched.kill.fire(reason);
        }
        let watched = Rc::new(watched);
        self.sessions.borrow_mut().insert(key, watched.clone());
        if let Some(d) = deadline.filter(|d| *d > now) {
            if self.next_deadline.get().is_none_or(|n| d < n) {
                self.next_deadline.set(Some(d));
            }
        }
        Registration {
            registry: self.clone(),
            key,
            watched,
        }
    }

    pub fn len(&self) -> usize {
        self.sessions.borrow().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Every open session, as `/sessions` shows it.
    pub fn views(&self) -> Vec<SessionView> {
        self.sessions.borrow().values().map(|w| w.view()).collect()
    }

    /// What the open sessions moved so far.
    pub fn live_totals(&self) -> Totals {
        let mut t = Totals::default();
        for w in self.sessions.borrow().values() {
            t.add(&w.stats.totals());
        }
        t
    }

    /// Ends session `number` as an operator asked; false if it is not open.
    pub fn terminate(&self, number: u64) -> bool {
        match self.sessions.borrow().get(&number) {
            Some(w) => {
                w.kill.fire(KillReason::Admin);
                true
            }
            None => false,
        }
    }

    /// Ends every open session for `reason`; returns how many.
    pub fn end_all(&self, reason: KillReason) -> usize {
        let sessions = self.sessions.borrow();
        for w in sessions.values() {
            w.kill.fire(reason);
        }
        sessions.len()
    }

    /// Re-checks every session against `store` at `now`, fires the kill
    /// switch of those that must end, and recomputes the next deadline.
    pub fn sweep(&self, store: &TokenStore, now: SystemTime) {
        let mut next: Option<SystemTime> = None;
        for w in self.sessions.borrow().values() {
            if w.kill.fired().is_some() {
                continue;
            }
            let (verdict, deadline) = w.check(store, now);
            match verdict {
                Ok(()) => {
                    // A deadline that `keep` makes harmless only costs one
                    // extra sweep.
                    if let Some(d) = deadline.filter(|d| *d > now) {
                        next = Some(next.map_or(d, |n: SystemTime| n.min(d)));
                    }
                }
                Err(reason) => {
                    info!(token_id = %w.token_id, reason = reason.as_str(), "ending session");
                    w.kill.fire(reason);
                }
            }
        }
        self.next_deadline.set(next);
    }

    fn due(&self, now: SystemTime) -> bool {
        self.next_deadline.get().is_some_and(|d| d <= now)
    }
}

/// Runs for the life of the shard.
pub async fn run(ctx: Rc<ShardContext>) {
    loop {
        monoio::time::sleep(WATCH_INTERVAL).await;
        let changed = ctx.tokens.refresh(&ctx.store.published);
        let now = SystemTime::now();
        if (changed || ctx.registry.due(now)) && !ctx.registry.is_empty() {
            ctx.tokens
                .with(&ctx.store.published, |store| ctx.registry.sweep(store, now));
        }
    }
}
