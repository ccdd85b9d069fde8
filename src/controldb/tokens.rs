//! Reading and writing tokens in the control database.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio_postgres::GenericClient;

use super::{describe, Error};
use crate::auth::{TokenRecord, TokenStore};

/// A timestamp column as RFC 3339 in UTC, to the second (as the file has it).
/// `infinity` and `-infinity` come out as those words, which fail
/// validation, so such a row is refused rather than read as "no time"
/// (`to_char` gives NULL for them, which would fail open: a token revoked
/// at -infinity would read as never revoked).
macro_rules! ts {
    ($column:literal) => {
        concat!(
            "CASE WHEN isfinite(",
            $column,
            ") THEN to_char(timezone('UTC', ",
            $column,
            "), 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"') ELSE ",
            $column,
            "::text END"
        )
    };
}

/// Each row in the token file's field names, so that one validation serves
/// both stores. Columns win over same-named keys in `rules`. (A macro, so
/// that [`load_some`] can add its WHERE clause with `concat!`.)
macro_rules! select_tokens {
    () => {
        concat!(
            "SELECT ((rules - ARRAY['id', 'user', 'secret_sha256', 'previous_secret_sha256', ",
            "'previous_valid_until', 'created_at', 'not_before', 'expires_at', 'revoked_at']) ",
            "|| jsonb_build_object('id', id, 'user', role, 'secret_sha256', secret_sha256, ",
            "'created_at', ",
            ts!("created_at"),
            ") || jsonb_strip_nulls(jsonb_build_object('not_before', ",
            ts!("not_before"),
            ", 'expires_at', ",
            ts!("expires_at"),
            ", 'revoked_at', ",
            ts!("revoked_at"),
            ", 'previous_secret_sha256', previous_secret_sha256, 'previous_valid_until', ",
            ts!("previous_valid_until"),
            ")))::text FROM tollgate.tokens"
        )
    };
}

/// The whole store, and a description of each row left out as invalid.
pub async fn load(client: &impl GenericClient) -> Result<(TokenStore, Vec<String>), Error> {
    let rows = client
        .query(select_tokens!(), &[])
        .await
        .map_err(load_err)?;
    let tokens: Vec<String> = rows.iter().map(|r| r.get(0)).collect();
    let jwts = load_revoked_jwts(client).await?;
    Ok(TokenStore::from_rows(&tokens, jwts))
}

/// The rows of the tokens named, as they are now (a token deleted since
/// has none), in the form [`TokenStore::apply_rows`] takes.
pub async fn load_some(client: &impl GenericClient, ids: &[&str]) -> Result<Vec<String>, Error> {
    let query = concat!(select_tokens!(), " WHERE id = ANY($1)");
    let rows = client.query(query, &[&ids]).await.map_err(load_err)?;
    Ok(rows.iter().map(|r| r.get(0)).collect())
}

/// Every revoked JWT id and when it was revoked.
pub async fn load_revoked_jwts(
    client: &impl GenericClient,
) -> Result<Vec<(String, SystemTime)>, Error> {
    let rows = client
        .query(
            "SELECT jti, extract(epoch FROM revoked_at)::float8 FROM tollgate.revoked_jwts",
            &[],
        )
        .await
        .map_err(load_err)?;
    // -infinity is "always" (the epoch); +infinity is "never": left out.
    Ok(rows
        .iter()
        .filter_map(|r| {
            let secs: f64 = r.get(1);
            let since = Duration::try_from_secs_f64(secs.max(0.0)).ok()?;
            Some((r.get::<_, String>(0), UNIX_EPOCH + since))
        })
        .collect())
}

fn load_err(e: tokio_postgres::Error) -> Error {
    format!("loading tokens: {}", describe(&e))
}

/// Creates or replaces one token (through `tollgate.put_token`, as users'
/// own tools may).
pub async fn put(client: &impl GenericClient, record: &TokenRecord) -> Result<(), Error> {
    let doc = TokenStore::record_json(record);
    client
        .execute("SELECT tollgate.put_token($1::text::jsonb)", &[&doc])
        .await
        .map_err(|e| format!("writing token {}: {}", record.id, describe(&e)))?;
    Ok(())
}

/// Revokes one token as of the database's clock (`tollgate.revoke_token`).
pub async fn revoke(client: &impl GenericClient, id: &str) -> Result<(), Error> {
    client
        .execute("SELECT tollgate.revoke_token($1)", &[&id])
        .await
        .map_err(|e| format!("revoking token {id}: {}", describe(&e)))?;
    Ok(())
}

/// Revokes a JWT id as of the database's clock (`tollgate.revoke_jwt`).
pub async fn revoke_jwt(client: &impl GenericClient, jti: &str) -> Result<(), Error> {
    client
        .execute("SELECT tollgate.revoke_jwt($1)", &[&jti])
        .await
        .map_err(|e| format!("revoking JWT: {}", describe(&e)))?;
    Ok(())
}
