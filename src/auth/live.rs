//! The live token store: a control thread watches the store file and
//! publishes each valid new version; shards pick it up through
//! [`crate::snapshot::ShardCopy`].
//!
//! A version that fails to parse or validate is logged once and the last
//! good snapshot stays in force: never fail open, never drop everything.
//!
//! With the control database (`crate::controldb`) as the source, the same
//! snapshot is published by the control thread instead, and [`Freshness`]
//! tracks how current it is.
#![forbid(unsafe_code)]

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tracing::{error, info};

use super::jwt::JwtVerifier;
use super::store::{StoreError, TokenStore};
use crate::snapshot::{FileStamp, Published, Stamps};

/// How often the store file is checked. A change is live on every shard
/// within this plus the shards' own tick (see `shard::WATCH_INTERVAL`).
pub const STORE_POLL_INTERVAL: Duration = Duration::from_millis(200);

pub struct LiveStore {
    source: Source,
    pub published: Published<TokenStore>,
}

enum Source {
    File {
        path: PathBuf,
        stamps: Mutex<Stamps<Option<FileStamp>>>,
    },
    Postgres(Freshness),
}

/// Heartbeats confirm the snapshot every second; this long without one
/// makes it stale even if the connection has not failed yet.
pub const STALE_AFTER: Duration = Duration::from_secs(5);

/// How current a snapshot from the control database is.
pub struct Freshness {
    /// Whether the control thread holds a live, listening connection.
    connected: AtomicBool,
    /// When the snapshot was last known current (ms since the epoch): the
    /// last successful load or heartbeat.
    confirmed_ms: AtomicU64,
    /// Past this age while disconnected, logins are refused.
    max_staleness: Option<Duration>,
}

fn epoch_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl Freshness {
    /// The snapshot was just confirmed current over a live connection.
    pub fn confirmed(&self) {
        self.confirmed_ms
            .store(epoch_ms(SystemTime::now()), Ordering::Relaxed);
        self.connected.store(true, Ordering::Relaxed);
    }

    /// The connection is lost: changes may be happening unseen.
    pub fn lost(&self) {
        self.connected.store(false, Ordering::Relaxed);
    }

    /// Disconnected, or connected but not heard from for [`STALE_AFTER`]
    /// (a connection that hangs without failing).
    pub fn is_stale(&self) -> bool {
        !self.connected.load(Ordering::Relaxed) || self.age(SystemTime::now()) > STALE_AFTER
    }

    /// Time since the snapshot was last known current.
    pub fn age(&self, now: SystemTime) -> Duration {
        let confirmed = self.confirmed_ms.load(Ordering::Relaxed);
        Duration::from_millis(epoch_ms(now).saturating_sub(confirmed))
    }

    /// Whether the operator's `max_staleness` is exceeded.
    pub fn too_stale(&self, now: SystemTime) -> bool {
        self.is_stale() && self.max_staleness.is_some_and(|max| self.age(now) > max)
    }
}

impl LiveStore {
    /// Loads the store; an invalid store at start-up is an error (there is
    /// no last good version to fall back to).
    pub fn load(path: &Path) -> Result<Arc<LiveStore>, StoreError> {
        let stamp = FileStamp::of(path);
        let store = TokenStore::load(path)?;
        Ok(Arc::new(LiveStore {
            source: Source::File {
                path: path.to_owned(),
                stamps: Mutex::new(Stamps::new(stamp)),
            },
            published: Published::new(store),
        }))
    }

    /// An empty store the control thread fills (see
    /// `controldb::sync::start`); stale until its first load.
    pub fn for_postgres(max_staleness: Option<Duration>) -> Arc<LiveStore> {
        Arc::new(LiveStore {
            source: Source::Postgres(Freshness {
                connected: AtomicBool::new(false),
                confirmed_ms: AtomicU64::new(0),
                max_staleness,
            }),
            published: Published::new(TokenStore::default()),
        })
    }

    /// How current the snapshot is; `None` for a file, which is always the
    /// file's latest valid version.
    pub fn freshness(&self) -> Option<&Freshness> {
        match &self.source {
            Source::File { .. } => None,
            Source::Postgres(f) => Some(f),
        }
    }

    /// Whether new logins must be refused because the snapshot is older
    /// than `max_staleness` (checked once per login: two relaxed loads).
    pub fn logins_refused(&self) -> bool {
        self.freshness()
            .is_some_and(|f| f.too_stale(SystemTime::now()))
    }

    /// Reloads if the file changed since the last attempt (a control
    /// database pushes its changes instead).
    pub fn reload_if_changed(&self) {
        let Source::File { path, stamps } = &self.source else {
            return;
        };
        let now = FileStamp::of(path);
        let mut stamps = stamps.lock().unwrap_or_else(|e| e.into_inner());
        if !stamps.is_new(now) {
            return;
        }
        match TokenStore::load(path) {
            Ok(store) => {
                info!(tokens = store.len(), file = %path.display(), "token store reloaded");
                self.published.publish(store);
                stamps.loaded(now);
            }
            Err(e) => {
                error!(error = %e, "token store rejected; the previous version stays in force");
                stamps.failed(now);
            }
        }
    }

    /// Starts the control thread that polls the file.
    pub fn watch(self: &Arc<Self>) {
        if !matches!(self.source, Source::File { .. }) {
            return;
        }
        let me = Arc::downgrade(self);
        let _ = std::thread::Builder::new()
            .name("tg-store-watch".into())
            .spawn(move || loop {
                std::thread::sleep(STORE_POLL_INTERVAL);
                match me.upgrade() {
                    Some(store) => store.reload_if_changed(),
                    None => return,
                }
            });
    }
}

/// How often JWKS files are checked for changes.
pub const JWKS_POLL_INTERVAL: Duration = Duration::from_secs(1);

/// The JWT verifier, with its JWKS files re-read when they change.
pub struct LiveJwt {
    pub published: Published<JwtVerifier>,
    /// The control thread's working copy, reloaded in place.
    working: Mutex<JwtVerifier>,
}

impl LiveJwt {
    pub fn new(verifier: JwtVerifier) -> Arc<LiveJwt> {
        Arc::new(LiveJwt {
            published: Published::new(verifier.clone()),
            working: Mutex::new(verifier),
        })
    }

    /// Re-reads changed JWKS files and publishes the result. A broken file
    /// keeps its previous keys (the verifier reports it once); the others'
    /// changes are still published.
    pub fn reload_if_changed(&self) {
        let mut working = self.working.lock().unwrap_or_else(|e| e.into_inner());
        match working.reload_if_changed() {
            Ok(false) => {}
            Ok(true) => {
                info!("JWT keys reloaded");
                self.published.publish(working.clone());
            }
            Err(e) => {
                error!(error = %e, "JWKS file rejected; its previous keys stay in force");
                self.published.publish(working.clone());
            }
        }
    }

    /// Replaces the verifier (a config reload) and publishes it.
    pub fn replace(&self, verifier: JwtVerifier) {
        let mut working = self.working.lock().unwrap_or_else(|e| e.into_inner());
        *working = verifier;
        self.published.publish(working.clone());
    }

    /// Starts the control thread that re-reads JWKS files. It runs even
    /// with none to watch, as a reload may name some.
    pub fn watch(self: &Arc<Self>) {
        let me = Arc::downgrade(self);
        let _ = std::thread::Builder::new()
            .name("tg-jwks-watch".into())
            .spawn(move || loop {
                std::thread::sleep(JWKS_POLL_INTERVAL);
                match me.upgrade() {
                    Some(jwt) => jwt.reload_if_changed(),
                    None => return,
                }
            });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::{token, TokenRecord};
    use std::time::SystemTime;

    #[test]
    fn reloads_good_versions_and_keeps_the_last_good_one() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("tokens.toml");
        let live = LiveStore::load(&path).unwrap();
        assert!(live.published.get().is_empty());

        let t = token::generate();
        let mut store = TokenStore::default();
        store.insert(TokenRecord::new(
            t.id.clone(),
            "app".into(),
            vec!["*".into()],
            t.secret_sha256,
            SystemTime::now(),
        ));
        store.save(&path).unwrap();
        live.reload_if_changed();
        assert_eq!(live.published.get().len(), 1);
        let generation = live.published.generation();

        std::fs::write(&path, "this is [not toml").unwrap();
        live.reload_if_changed();
        assert_eq!(
            live.published.get().len(),
            1,
            "a bad file must not drop tokens"
        );
        assert_eq!(live.published.generation(), generation);

        store.save(&path).unwrap();
        live.reload_if_changed();
        assert!(live.published.generation() > generation);
    }
}
