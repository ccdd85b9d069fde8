//! The instance registry (`tollgate.instances`): each instance's id, which
//! its cancel keys carry, and the address its peers forward cancels to.
//!
//! An instance claims an id at connect (the one configured, or the lowest
//! one no live instance holds) and renews it with every heartbeat. An id
//! whose `seen_at` is older than [`LEASE`] is free to claim again.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

use tokio_postgres::Client;
use tracing::warn;

use super::{describe, Error};

/// How long an id stays held without a heartbeat.
pub const LEASE: Duration = Duration::from_secs(30);

/// Which id to claim.
#[derive(Debug, Clone, Copy)]
pub enum Wanted {
    /// The configured id: taken whoever holds it (with a warning).
    Fixed(u8),
    /// The id this process had before a reconnect: kept if no other live
    /// instance took it meanwhile, else a free one.
    Previous(u8),
    /// The lowest free id.
    Any,
}

/// Claims an id per `wanted` and records `address` for it.
pub async fn claim(client: &mut Client, wanted: Wanted, address: &str) -> Result<u8, Error> {
    let err = |e: tokio_postgres::Error| format!("instance registry: {}", describe(&e));
    let lease = LEASE.as_secs_f64();
    let tx = client.transaction().await.map_err(err)?;
    // One claimer at a time, so two instances cannot pick the same free id;
    // heartbeats (row updates) are not blocked for long.
    tx.batch_execute("LOCK TABLE tollgate.instances IN SHARE ROW EXCLUSIVE MODE")
        .await
        .map_err(err)?;
    let holder = |id: i32| {
        let tx = &tx;
        async move {
            tx.query_opt(
                "SELECT address FROM tollgate.instances
                  WHERE id = $1 AND seen_at > now() - make_interval(secs => $2)",
                &[&id, &lease],
            )
            .await
            .map(|row| row.map(|r| r.get::<_, String>(0)))
        }
    };
    let keep = match wanted {
        Wanted::Fixed(id) => {
            if let Some(other) = holder(i32::from(id)).await.map_err(err)? {
                if other != address {
                    warn!(
                        instance_id = id,
                        other = %other,
                        "another live instance holds this configured instance id; cancels for either may go astray"
                    );
                }
            }
            Some(i32::from(id))
        }
        Wanted::Previous(id) => match holder(i32::from(id)).await.map_err(err)? {
            Some(other) if other != address => None,
            _ => Some(i32::from(id)),
        },
        Wanted::Any => None,
    };
    let id: i32 = match keep {
        Some(id) => id,
        None => {
            let row = tx
                .query_opt(
                    "SELECT g FROM generate_series(1, 255) g
                      WHERE NOT EXISTS (SELECT 1 FROM tollgate.instances i
                                         WHERE i.id = g
                                           AND i.seen_at > now() - make_interval(secs => $1))
                      ORDER BY g LIMIT 1",
                    &[&lease],
                )
                .await
                .map_err(err)?;
            match row {
                Some(r) => r.get(0),
                None => return Err("instance registry: all 255 instance ids are in use".into()),
            }
        }
    };
    tx.execute(
        "INSERT INTO tollgate.instances (id, address) VALUES ($1, $2)
         ON CONFLICT (id) DO UPDATE
            SET address = EXCLUDED.address, started_at = now(), seen_at = now()",
        &[&id, &address],
    )
    .await
    .map_err(err)?;
    tx.commit().await.map_err(err)?;
    u8::try_from(id).map_err(|_| format!("instance registry gave id {id}"))
}

/// Renews the lease; false when the row is gone or another instance took
/// the id over (after this one's lease ran out), in which case the caller
/// claims again.
pub async fn heartbeat(client: &Client, id: u8, address: &str) -> Result<bool, Error> {
    let n = client
        .execute(
            "UPDATE tollgate.instances SET seen_at = now() WHERE id = $1 AND address = $2",
            &[&i32::from(id), &address],
        )
        .await
        .map_err(|e| format!("instance heartbeat: {}", describe(&e)))?;
    Ok(n > 0)
}

/// Every other registered instance, live or not (one that lost the control
/// database still serves, and still owns its sessions), with its address
/// resolved here, on the control thread: a shard forwarding a cancel must
/// not wait on DNS. An address that does not resolve is left out.
pub async fn peers(client: &Client, own: u8) -> Result<HashMap<u8, SocketAddr>, Error> {
    let rows = client
        .query(
            "SELECT id, address FROM tollgate.instances WHERE id <> $1",
            &[&i32::from(own)],
        )
        .await
        .map_err(|e| format!("instance registry: {}", describe(&e)))?;
    let mut peers = HashMap::with_capacity(rows.len());
    for r in &rows {
        let (id, address): (i32, String) = (r.get(0), r.get(1));
        let Ok(id) = u8::try_from(id) else { continue };
        match tokio::net::lookup_host(address.as_str())
            .await
            .map(|mut a| a.next())
        {
            Ok(Some(addr)) => {
                peers.insert(id, addr);
            }
            _ => warn!(instance_id = id, address = %address, "a peer's address does not resolve"),
        }
    }
    Ok(peers)
}
