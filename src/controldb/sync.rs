//! The control thread: keeps the token snapshot in step with the control
//! database, and this instance's entry in the registry alive.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use tokio_postgres::Client;
use tracing::{error, info, warn};

use super::{connect, describe, instances, schema, tokens, Error, Link};
use crate::auth::live::LiveStore;
use crate::config::ControlDb;
use crate::session::cancel::Fleet;

/// The channels tollgate LISTENs on (the migration's triggers NOTIFY them).
pub const TOKENS_CHANNEL: &str = "tollgate_tokens";
pub const INSTANCES_CHANNEL: &str = "tollgate_instances";

/// How long connecting may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// A heartbeat both proves the connection alive (a dead peer behind a
/// silent network would otherwise go unnoticed until TCP gives up) and
/// renews the instance's registry lease.
const HEARTBEAT: Duration = Duration::from_secs(1);
const HEARTBEAT_TIMEOUT: Duration = Duration::from_secs(3);
/// Reconnect backoff.
const FIRST_RETRY: Duration = Duration::from_millis(200);
const MAX_RETRY: Duration = Duration::from_secs(5);
/// Notifications arriving this close together are applied with one load.
const COALESCE: Duration = Duration::from_millis(10);
/// A load that takes longer (a lock queued behind an ALTER TABLE, a
/// black-holed network mid-query) ends the connection, so the snapshot is
/// reported stale and the next connection starts over.
const LOAD_TIMEOUT: Duration = Duration::from_secs(10);
/// A full reload now and then, though nothing was notified: the safety net
/// for a LISTEN that cannot work (through a transaction-mode pooler, which
/// delivers no notifications and gives no error).
const RESYNC: Duration = Duration::from_secs(60);

struct Plane {
    db: ControlDb,
    store: Arc<LiveStore>,
    fleet: Option<Arc<Fleet>>,
    /// The configured instance id, if any.
    configured_id: Option<u8>,
    /// The id held, once claimed.
    held_id: Option<u8>,
    /// Invalid rows already reported, so each is logged once.
    reported: BTreeSet<String>,
}

/// Starts the control thread and waits for its first full load (and, in a
/// fleet, the instance id), so that the shards start with the real token
/// list. An unreachable control database at start is an error.
pub fn start(
    db: ControlDb,
    store: Arc<LiveStore>,
    fleet: Option<(Arc<Fleet>, Option<u8>)>,
) -> Result<(), Error> {
    let (first_tx, first_rx) = std::sync::mpsc::sync_channel(1);
    let (fleet, wanted_id) = match fleet {
        Some((f, id)) => (Some(f), id),
        None => (None, None),
    };
    let plane = Plane {
        db,
        store,
        fleet,
        configured_id: wanted_id,
        held_id: None,
        reported: BTreeSet::new(),
    };
    std::thread::Builder::new()
        .name("tg-control-db".into())
        .spawn(move || {
            let rt = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    let _ = first_tx.send(Err(format!("control thread runtime: {e}")));
                    return;
                }
            };
            // However the thread ends (a panic included), the snapshot stops
            // being current: say so, so max_staleness and /healthz act.
            struct Lost(Arc<LiveStore>);
            impl Drop for Lost {
                fn drop(&mut self) {
                    if let Some(f) = self.0.freshness() {
                        f.lost();
                    }
                }
            }
            let _lost = Lost(plane.store.clone());
            rt.block_on(run(plane, first_tx));
        })
        .map_err(|e| format!("control thread: {e}"))?;
    first_rx
        .recv_timeout(CONNECT_TIMEOUT * 3)
        .map_err(|_| "the control database did not answer in time".to_owned())?
}

async fn run(mut plane: Plane, first: std::sync::mpsc::SyncSender<Result<(), Error>>) {
    let mut first = Some(first);
    let mut retry = FIRST_RETRY;
    let mut attempts = 0u32;
    loop {
        let e = session(&mut plane, &mut first, &mut retry, &mut attempts).await;
        if let Some(f) = plane.store.freshness() {
            f.lost();
        }
        if let Some(first) = first.take() {
            let _ = first.send(Err(e));
            return;
        }
        attempts += 1;
        let age = plane
            .store
            .freshness()
            .map_or(0.0, |f| f.age(std::time::SystemTime::now()).as_secs_f64());
        // Every failure at first, then one in ten: an outage of hours must
        // not flood the log.
        if attempts <= 3 || attempts.is_multiple_of(10) {
            warn!(
                error = %e,
                retry_in_ms = retry.as_millis() as u64,
                snapshot_age_s = age,
                "control database unreachable; serving the last token snapshot"
            );
        }
        tokio::time::sleep(retry).await;
        retry = (retry * 2).min(MAX_RETRY);
    }
}

/// One connection's life: connect, migrate, listen, load everything, then
/// apply notifications and send heartbeats until something fails.
async fn session(
    plane: &mut Plane,
    first: &mut Option<std::sync::mpsc::SyncSender<Result<(), Error>>>,
    retry: &mut Duration,
    attempts: &mut u32,
) -> Error {
    let mut link = match connect(&plane.db, CONNECT_TIMEOUT).await {
        Ok(l) => l,
        Err(e) => return e,
    };
    if let Err(e) = prepare(plane, &mut link).await {
        return e;
    }
    if let Some(first) = first.take() {
        let _ = first.send(Ok(()));
    } else {
        info!(
            at = %plane.db.describe(),
            after_attempts = *attempts,
            "control database reachable again; token snapshot reloaded in full"
        );
    }
    *retry = FIRST_RETRY;
    *attempts = 0;
    let mut heartbeat = tokio::time::interval(HEARTBEAT);
    heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut resync = tokio::time::interval_at(tokio::time::Instant::now() + RESYNC, RESYNC);
    loop {
        tokio::select! {
            n = link.notifications.recv() => {
                let Some(n) = n else {
                    return "the control database connection ended".into();
                };
                let mut pending = Pending::default();
                pending.note(n.channel(), n.payload());
                tokio::time::sleep(COALESCE).await;
                while let Ok(n) = link.notifications.try_recv() {
                    pending.note(n.channel(), n.payload());
                }
                if pending.everything {
                    if let Err(e) = bounded(reload(plane, &link.client)).await {
                        return e;
                    }
                } else if !pending.ids.is_empty() || pending.jwts {
                    if let Err(e) = bounded(patch(plane, &link.client, &pending)).await {
                        return e;
                    }
                }
                if pending.peers {
                    if let Err(e) = bounded(refresh_peers(plane, &link.client)).await {
                        return e;
                    }
                }
            }
            _ = resync.tick() => {
                if let Err(e) = bounded(reload(plane, &link.client)).await {
                    return e;
                }
                if let Err(e) = bounded(refresh_peers(plane, &link.client)).await {
                    return e;
                }
            }
            _ = heartbeat.tick() => {
                match tokio::time::timeout(HEARTBEAT_TIMEOUT, beat(plane, &mut link.client)).await {
                    Ok(Ok(())) => {
                        if let Some(f) = plane.store.freshness() {
                            f.confirmed();
                        }
                    }
                    Ok(Err(e)) => return e,
                    Err(_) => return "the control database did not answer a heartbeat in time".into(),
                }
            }
            _ = &mut link.closed => {
                return "the control database closed the connection".into();
            }
        }
    }
}

/// What one batch of notifications asks to reload.
#[derive(Default, Debug, PartialEq, Eq)]
struct Pending {
    /// The whole token store (a large or unknown change).
    everything: bool,
    /// These tokens only (schema version 2 names them).
    ids: BTreeSet<String>,
    /// The revoked JWT ids.
    jwts: bool,
    /// The registry of instances.
    peers: bool,
}

/// Past this many tokens named in one batch, one full load is cheaper
/// than the lookups.
const MAX_PATCH: usize = 5_000;

impl Pending {
    /// Payloads (see migrations/0002): `tokens:<id>,<id>,...` names the
    /// tokens changed, `revoked_jwts` the JWT list; anything else on the
    /// tokens channel (`tokens`, a schema version 1 trigger's table name,
    /// someone's hand-made NOTIFY) means everything.
    fn note(&mut self, channel: &str, payload: &str) {
        match channel {
            TOKENS_CHANNEL => match payload.strip_prefix("tokens:") {
                _ if self.everything => {}
                Some(ids) => {
                    for id in ids.split(',') {
                        if !crate::auth::token::is_valid_id(id.as_bytes()) {
                            self.everything = true;
                        } else if self.ids.len() < MAX_PATCH {
                            self.ids.insert(id.to_owned());
                        } else if !self.ids.contains(id) {
                            self.everything = true;
                        }
                    }
                }
                None if payload == "revoked_jwts" => self.jwts = true,
                None => self.everything = true,
            },
            INSTANCES_CHANNEL => self.peers = true,
            _ => {}
        }
    }
}

async fn bounded<T>(work: impl std::future::Future<Output = Result<T, Error>>) -> Result<T, Error> {
    tokio::time::timeout(LOAD_TIMEOUT, work)
        .await
        .map_err(|_| format!("the control database did not answer within {LOAD_TIMEOUT:?}"))?
}

/// Migrates, listens, claims the instance id, and loads everything. LISTEN
/// comes before the load, so no change committed in between is missed.
async fn prepare(plane: &mut Plane, link: &mut Link) -> Result<(), Error> {
    bounded(prepare_now(plane, link)).await
}

async fn prepare_now(plane: &mut Plane, link: &mut Link) -> Result<(), Error> {
    schema::migrate(&mut link.client).await?;
    link.client
        .batch_execute(&format!(
            "LISTEN {TOKENS_CHANNEL}; LISTEN {INSTANCES_CHANNEL}"
        ))
        .await
        .map_err(|e| format!("LISTEN: {}", describe(&e)))?;
    if let Some(fleet) = plane.fleet.clone() {
        claim(plane, &fleet, &mut link.client).await?;
        refresh_peers(plane, &link.client).await?;
    }
    reload(plane, &link.client).await
}

async fn reload(plane: &mut Plane, client: &Client) -> Result<(), Error> {
    let (snapshot, problems) = tokens::load(client).await?;
    for p in &problems {
        if !plane.reported.contains(p) {
            report(p);
        }
    }
    plane.reported = problems.into_iter().collect();
    info!(
        tokens = snapshot.len(),
        "token store loaded from the control database"
    );
    publish(plane, snapshot);
    Ok(())
}

/// Reads back only what the notifications named and publishes the current
/// snapshot with those changes: a revocation costs a lookup by key, not a
/// load of the whole table.
async fn patch(plane: &mut Plane, client: &Client, pending: &Pending) -> Result<(), Error> {
    let ids: Vec<&str> = pending.ids.iter().map(String::as_str).collect();
    let rows = if ids.is_empty() {
        Vec::new()
    } else {
        tokens::load_some(client, &ids).await?
    };
    let revoked_jwts = if pending.jwts {
        Some(tokens::load_revoked_jwts(client).await?)
    } else {
        None
    };
    let mut snapshot = (*plane.store.published.get()).clone();
    let problems = snapshot.apply_rows(&ids, &rows);
    if let Some(r) = revoked_jwts {
        snapshot.set_revoked_jwts(r);
    }
    // A row fixed since it was reported may go wrong again, and then it is
    // reported again.
    plane.reported.retain(|p| {
        let about = |id: &&str| {
            p.strip_prefix("token ")
                .and_then(|r| r.strip_prefix(*id))
                .is_some_and(|r| r.starts_with(':'))
        };
        !ids.iter().any(about)
    });
    for p in problems {
        report(&p);
        plane.reported.insert(p);
    }
    info!(
        changed = ids.len(),
        revoked_jwts = pending.jwts,
        tokens = snapshot.len(),
        "token store updated from the control database"
    );
    publish(plane, snapshot);
    Ok(())
}

fn report(problem: &str) {
    error!(problem = %problem, "token row left out: that token is refused until the row is fixed");
}

/// Hands the shards a new snapshot, which is as fresh as the database.
fn publish(plane: &Plane, snapshot: crate::auth::TokenStore) {
    plane.store.published.publish(snapshot);
    if let Some(f) = plane.store.freshness() {
        f.confirmed();
    }
}

async fn refresh_peers(plane: &Plane, client: &Client) -> Result<(), Error> {
    if let Some(fleet) = &plane.fleet {
        let peers = instances::peers(client, fleet.instance_id()).await?;
        fleet.set_peers(peers);
    }
    Ok(())
}

/// Claims the configured id, else the one held before, else a free one.
async fn claim(plane: &mut Plane, fleet: &Fleet, client: &mut Client) -> Result<(), Error> {
    let wanted = match (plane.configured_id, plane.held_id) {
        (Some(id), _) => instances::Wanted::Fixed(id),
        (None, Some(id)) => instances::Wanted::Previous(id),
        (None, None) => instances::Wanted::Any,
    };
    let id = instances::claim(client, wanted, &fleet.advertise).await?;
    if plane.held_id.is_some_and(|held| held != id) {
        warn!(
            was = plane.held_id,
            now = id,
            "instance id changed (another instance took it while this one was cut off); \
             cancels for sessions opened before may not reach them"
        );
    }
    if plane.held_id != Some(id) {
        info!(instance_id = id, advertise = %fleet.advertise, "fleet instance id claimed");
    }
    plane.held_id = Some(id);
    fleet.set_instance_id(id);
    Ok(())
}

async fn beat(plane: &mut Plane, client: &mut Client) -> Result<(), Error> {
    match (plane.fleet.clone(), plane.held_id) {
        (Some(fleet), Some(id)) => {
            if !instances::heartbeat(client, id, &fleet.advertise).await? {
                // The row is gone, or another instance took the id over.
                claim(plane, &fleet, client).await?;
            }
            Ok(())
        }
        _ => client
            .simple_query("")
            .await
            .map(|_| ())
            .map_err(|e| format!("heartbeat: {}", describe(&e))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn batch(notes: &[(&str, &str)]) -> Pending {
        let mut p = Pending::default();
        for (channel, payload) in notes {
            p.note(channel, payload);
        }
        p
    }

    #[test]
    fn named_tokens_are_patched_and_anything_else_loads_everything() {
        let p = batch(&[
            (TOKENS_CHANNEL, "tokens:aaaaaaaaaaaa,bbbbbbbbbbbb"),
            (TOKENS_CHANNEL, "tokens:bbbbbbbbbbbb"),
            (TOKENS_CHANNEL, "revoked_jwts"),
            (INSTANCES_CHANNEL, ""),
        ]);
        assert!(!p.everything);
        assert_eq!(
            p.ids.iter().map(String::as_str).collect::<Vec<_>>(),
            ["aaaaaaaaaaaa", "bbbbbbbbbbbb"]
        );
        assert!(p.jwts && p.peers);
        // Schema version 2's bulk marker, version 1's table name, a
        // hand-made NOTIFY, an id that is not one: all load everything.
        for payload in [
            "tokens",
            "",
            "hello",
            "tokens:",
            "tokens:AAAAAAAAAAAA",
            "tokens:a,b",
        ] {
            assert!(
                batch(&[(TOKENS_CHANNEL, payload)]).everything,
                "{payload:?}"
            );
        }
        assert!(!batch(&[(INSTANCES_CHANNEL, "tokens")]).everything);
        // Too many names in one batch: one full load instead.
        let many: Vec<String> = (0..MAX_PATCH + 1).map(|i| format!("{i:012}")).collect();
        let mut p = Pending::default();
        for chunk in many.chunks(500) {
            p.note(TOKENS_CHANNEL, &format!("tokens:{}", chunk.join(",")));
        }
        assert!(p.everything);
    }
}
