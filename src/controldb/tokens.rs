//! Reading and writing tokens in the control database.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio_postgres::GenericClient;

use super::{describe, Error};
use crate::auth::{TokenRecord, TokenStore};

/// A timestamp column as RFC 3339 in UTC, to the second (as the file has it).
macro_rules! ts {
    ($column:literal) => {
        concat!(
            "to_char(timezone('UTC', ",
            $column,
            "), 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"')"
        )
    };
}

/// Each row in the token file's field names, so that one validation serves
/// both stores. Columns win over same-named keys in `rules`.
const LOAD_TOKENS: &str = concat!(
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
);

/// The whole store, and a description of each row left out as invalid.
pub async fn load(client: &impl GenericClient) -> Result<(TokenStore, Vec<String>), Error> {
    let err = |e: tokio_postgres::Error| format!("loading tokens: {}", describe(&e));
    let rows = client.query(LOAD_TOKENS, &[]).await.map_err(err)?;
    let tokens: Vec<String> = rows.iter().map(|r| r.get(0)).collect();
    let jwts = client
        .query(
            "SELECT jti, extract(epoch FROM revoked_at)::float8 FROM tollgate.revoked_jwts",
            &[],
        )
        .await
        .map_err(err)?;
    let jwts = jwts
        .iter()
        .map(|r| {
            let secs: f64 = r.get(1);
            let at = UNIX_EPOCH + Duration::from_secs_f64(secs.max(0.0));
            (r.get::<_, String>(0), at)
        })
        .collect();
    Ok(TokenStore::from_rows(&tokens, jwts))
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

pub async fn revoke_jwt(
    client: &impl GenericClient,
    jti: &str,
    at: SystemTime,
) -> Result<(), Error> {
    let secs = at
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs_f64();
    client
        .execute(
            "INSERT INTO tollgate.revoked_jwts (jti, revoked_at)
             VALUES ($1, to_timestamp($2)) ON CONFLICT (jti) DO NOTHING",
            &[&jti, &secs],
        )
        .await
        .map_err(|e| format!("revoking JWT: {}", describe(&e)))?;
    Ok(())
}
