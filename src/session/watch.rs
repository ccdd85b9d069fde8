//! The shard's watcher: keeps the shard's token snapshot current and ends
//! the sessions whose token no longer allows them (revoked, expired,
//! rotated out, deleted), within one tick of the change reaching the shard.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::rc::Rc;
use std::time::{Duration, SystemTime};

use tracing::info;

use super::kill::KillSwitch;
use super::ShardContext;
use crate::auth::{OnExpiry, Rejection, TokenStore};

/// How often each shard looks for a new token snapshot and due expiries.
pub const WATCH_INTERVAL: Duration = Duration::from_millis(100);

/// A session the watcher keeps an eye on.
pub struct Watched {
    pub token_id: String,
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
                (verdict, Some(*expires_at))
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

/// The shard's open sessions, by a shard-local number.
#[derive(Default)]
pub struct Registry {
    sessions: RefCell<HashMap<u64, Rc<Watched>>>,
    next: Cell<u64>,
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
        let key = self.next.get() + 1;
        self.next.set(key);
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
