//! Readying a connection for the client that takes it: the start-up
//! parameters it may set (application_name, TimeZone, ...) are applied
//! with `set_config`, only where they differ from what the server reports,
//! and a connection idle for long is checked with a round trip.

use bytes::BytesMut;
use monoio::time::timeout;

use super::reset::{ResetError, RESET_TIMEOUT};
use super::wire::{self, Reader, WireError};
use super::ServerConn;

/// Why a connection could not be readied.
#[derive(Debug)]
pub enum PrepareError {
    /// The connection is unusable; another one may be tried. The client
    /// has seen nothing yet.
    Broken(&'static str),
    /// The server refused a parameter, as it would at a direct start-up:
    /// the ErrorResponse to send the client, made FATAL. The connection
    /// itself is fine.
    Refused(BytesMut),
}

/// Sets what `wanted` asks for where the connection differs, and checks
/// the connection with an empty query when `check` is set and nothing
/// else needs a round trip. Returns the parameters the server reported as
/// changed, which the client is shown in place of the login's.
pub async fn prepare(
    conn: &mut ServerConn,
    wanted: &[(String, String)],
    check: bool,
) -> Result<Vec<(String, String)>, PrepareError> {
    match plan(conn, wanted, check) {
        None => Ok(Vec::new()),
        // Boxed: a round trip's future is large, and most checkouts
        // (every lend under transaction pooling) need none; a session's
        // future would carry its size for nothing.
        Some(sql) => Box::pin(apply(conn, sql)).await,
    }
}

/// The query that readies `conn`, if it needs one.
fn plan(conn: &ServerConn, wanted: &[(String, String)], check: bool) -> Option<String> {
    let calls: Vec<String> = wanted
        .iter()
        .filter(|(k, v)| conn.state.param(k) != Some(v.as_str()))
        .map(|(k, v)| {
            format!(
                "pg_catalog.set_config({}, {}, false)",
                literal(k),
                literal(v)
            )
        })
        .collect();
    if !calls.is_empty() {
        Some(format!("SELECT {}", calls.join(", ")))
    } else if check {
        Some(String::new())
    } else {
        None
    }
}

/// Runs `sql` on `conn` and reads its answer.
async fn apply(conn: &mut ServerConn, sql: String) -> Result<Vec<(String, String)>, PrepareError> {
    let mut out = BytesMut::with_capacity(sql.len() + 8);
    wire::query(&mut out, &sql);
    let exchange = async {
        wire::write(&mut conn.stream, out)
            .await
            .map_err(ResetError::Wire)?;
        let mut reader = Reader::default();
        answer(conn, &mut reader).await
    };
    match timeout(RESET_TIMEOUT, exchange).await {
        Ok(Ok((changed, None))) => {
            for (k, v) in &changed {
                conn.state.note_reported(k, v);
            }
            Ok(changed)
        }
        Ok(Ok((_, Some(fatal)))) => Err(PrepareError::Refused(fatal)),
        Ok(Err(e)) => Err(PrepareError::Broken(e.as_str())),
        Err(_) => Err(PrepareError::Broken(WireError::TimedOut.as_str())),
    }
}

/// What the server answered to the SET query.
type Answer = (Vec<(String, String)>, Option<BytesMut>);

/// Reads the answer to the SET query: the parameters reported changed, and
/// the error made FATAL, if any.
async fn answer(conn: &mut ServerConn, reader: &mut Reader) -> Result<Answer, ResetError> {
    let mut changed = Vec::new();
    let mut refused = None;
    loop {
        let m = reader
            .next(&mut conn.stream)
            .await
            .map_err(ResetError::Wire)?;
        match m.tag {
            b'S' => changed.extend(wire::parameter_status(&m.body)),
            b'E' => refused = Some(wire::as_fatal(&m.body)),
            b'Z' if m.body.first() == Some(&b'I') => return Ok((changed, refused)),
            b'Z' => return Err(ResetError::Refused),
            _ => {}
        }
    }
}

/// A string literal that reads the same whatever
/// `standard_conforming_strings` says: an escape string (E'...').
fn literal(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 4);
    out.push_str("E'");
    for c in s.chars() {
        match c {
            '\'' => out.push_str("''"),
            '\\' => out.push_str("\\\\"),
            c => out.push(c),
        }
    }
    out.push('\'');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn literals_escape_quotes_and_backslashes() {
        assert_eq!(literal("UTC"), "E'UTC'");
        assert_eq!(literal("it's"), "E'it''s'");
        assert_eq!(literal(r"a\b"), r"E'a\\b'");
        assert_eq!(literal(r#""$user", public"#), r#"E'"$user", public'"#);
    }
}
