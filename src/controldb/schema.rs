//! The control schema and its migrations (`migrations/` at the top of the
//! repository). Each instance applies what is missing at connect, in one
//! transaction under an advisory lock, so a fleet starting at once migrates
//! exactly once.

use tokio_postgres::Client;
use tracing::{info, warn};

use super::{describe, Error};

/// Every migration, in order; the number is the schema version it makes.
pub const MIGRATIONS: &[(i32, &str)] = &[
    (1, include_str!("../../migrations/0001_control_plane.sql")),
    (
        2,
        include_str!("../../migrations/0002_notify_token_ids.sql"),
    ),
];

/// Serialises migrations across instances ("tollgate" in ASCII).
const MIGRATION_LOCK: i64 = 0x746f_6c6c_6761_7465;

/// The version this build knows.
pub fn current_version() -> i32 {
    MIGRATIONS.last().map_or(0, |m| m.0)
}

/// Creates the schema or brings it up to date.
pub async fn migrate(client: &mut Client) -> Result<i32, Error> {
    let err = |e: tokio_postgres::Error| format!("control schema migration: {}", describe(&e));
    // Up to date already: nothing to lock or create, so a role without
    // CREATE on the database (an operator's, for `token list`) gets by.
    // (Two statements: a query naming a missing table fails to plan.)
    let exists: bool = client
        .query_one(
            "SELECT to_regclass('tollgate.schema_migrations') IS NOT NULL",
            &[],
        )
        .await
        .map_err(err)?
        .get(0);
    let found: Option<i32> = if exists {
        client
            .query_one("SELECT max(version) FROM tollgate.schema_migrations", &[])
            .await
            .map_err(err)?
            .get(0)
    } else {
        None
    };
    if let Some(v) = found.filter(|v| *v >= current_version()) {
        if v > current_version() {
            // A newer tollgate migrated it during a rolling upgrade;
            // migrations only add, so this build keeps working with what
            // it knows.
            warn!(
                schema = v,
                known = current_version(),
                "the control schema is newer than this tollgate"
            );
        }
        return Ok(v);
    }
    let tx = client.transaction().await.map_err(err)?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
        .await
        .map_err(err)?;
    tx.batch_execute(
        "CREATE SCHEMA IF NOT EXISTS tollgate;
         CREATE TABLE IF NOT EXISTS tollgate.schema_migrations (
             version integer PRIMARY KEY,
             applied_at timestamptz NOT NULL DEFAULT now())",
    )
    .await
    .map_err(err)?;
    let row = tx
        .query_one(
            "SELECT coalesce(max(version), 0) FROM tollgate.schema_migrations",
            &[],
        )
        .await
        .map_err(err)?;
    let found: i32 = row.get(0);
    let mut version = found;
    for (v, sql) in MIGRATIONS.iter().filter(|(v, _)| *v > found) {
        tx.batch_execute(sql)
            .await
            .map_err(|e| format!("control schema migration to version {v}: {}", describe(&e)))?;
        tx.execute(
            "INSERT INTO tollgate.schema_migrations (version) VALUES ($1)",
            &[v],
        )
        .await
        .map_err(err)?;
        version = *v;
    }
    tx.commit().await.map_err(err)?;
    if version != found {
        info!(from = found, to = version, "control schema migrated");
    }
    Ok(version)
}
