//! The start-up parameters tollgate sends upstream for a client: the
//! client's own, the token's `session` values (which win), and, when asked
//! for, an `application_name` that names the token and the real client;
//! and the `lock_session` rule that refuses clients trying to set what the
//! token sets.
//!
//! <https://www.postgresql.org/docs/current/protocol-message-formats.html#PROTOCOL-MESSAGE-FORMATS-STARTUPMESSAGE>

use crate::auth::Grant;
use crate::handshake::ClientStartup;

/// The size of the StartupMessage tollgate sends upstream for `params`
/// (as `upstream::login` encodes it: `user` first, no other `user`).
pub(super) fn upstream_startup_len(user: &str, params: &[(String, String)]) -> usize {
    let pair = |k: &str, v: &str| k.len() + 1 + v.len() + 1;
    let rest: usize = params
        .iter()
        .filter(|(k, _)| k != "user")
        .map(|(k, v)| pair(k, v))
        .sum();
    // Length and version words, the pairs, the final terminator.
    8 + pair("user", user) + rest + 1
}

/// Longest application_name Postgres keeps (NAMEDATALEN - 1).
const MAX_APPLICATION_NAME: usize = 63;

/// With `lock_session`, the first start-up parameter the client may not
/// send: one the token sets, or `options` (whose `-c name=value` switches
/// could set anything, and which Postgres reads before the key/value
/// parameters, so they could not win anyway; the rule makes the attempt an
/// error rather than silently ignored).
pub(super) fn locked_parameter<'a>(startup: &ClientStartup, grant: &'a Grant) -> Option<&'a str> {
    if !grant.lock_session {
        return None;
    }
    if startup
        .params
        .get("options")
        .is_some_and(|o| !o.trim().is_empty())
    {
        return Some("options");
    }
    // GUC names are case-insensitive: `SEARCH_PATH` sets search_path.
    grant
        .session
        .iter()
        .map(|(name, _)| name.as_str())
        .find(|name| {
            startup
                .params
                .iter()
                .any(|(k, _)| k.eq_ignore_ascii_case(name))
        })
}

/// The start-up parameters sent upstream: the client's, then the token's
/// `session` parameters (which win: a read-only token stays read-only
/// whatever the client asks at start-up). The client's `application_name`
/// goes through unchanged, so the client sees what it set, as on a direct
/// connection; with `tag` (`[audit] tag_application_name`) it is suffixed
/// with the token id and the client's address instead, so that
/// pg_stat_activity shows which token and which client each backend
/// belongs to.
pub(super) fn upstream_params(
    startup: &ClientStartup,
    grant: &Grant,
    token_id: &str,
    client: std::net::IpAddr,
    tag: bool,
) -> Vec<(String, String)> {
    // Case-insensitive, as GUC names are; the token's value would win
    // anyway (it comes last), but the server need not see the client's.
    let overridden = |k: &str| {
        (tag && k.eq_ignore_ascii_case("application_name"))
            || grant.session.iter().any(|(g, _)| g.eq_ignore_ascii_case(k))
    };
    let mut params: Vec<(String, String)> = startup
        .params
        .iter()
        .filter(|(k, _)| !overridden(k))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
    params.extend(grant.session.iter().cloned());
    if tag {
        let name = tagged_application_name(startup, token_id, client);
        params.push(("application_name".to_owned(), name));
    }
    params
}

/// The client's application_name, cut to leave room, then
/// `[tg:<token id>@<client address>]`. The server's own client_addr is
/// tollgate's; this is the real one (from a PROXY header when a load
/// balancer sent one).
fn tagged_application_name(
    startup: &ClientStartup,
    token_id: &str,
    client: std::net::IpAddr,
) -> String {
    let suffix = format!("[tg:{token_id}@{client}]");
    let app = startup.params.get("application_name").unwrap_or("");
    let room = MAX_APPLICATION_NAME.saturating_sub(suffix.len() + 1);
    let mut cut = app.len().min(room);
    while !app.is_char_boundary(cut) {
        cut -= 1;
    }
    let app = app[..cut].trim_end();
    if app.is_empty() {
        suffix
    } else {
        format!("{app} {suffix}")
    }
}

#[cfg(test)]
mod tests {
    use bytes::BytesMut;

    use super::*;

    #[test]
    fn upstream_startup_len_matches_the_encoding() {
        let params: Vec<(String, String)> = [
            ("database", "appdb"),
            ("user", "ignored"),
            ("application_name", "psql [tg:abc]"),
            ("options", "-c x.y=é"),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        let mut out = BytesMut::new();
        let sent = std::iter::once(("user", "app")).chain(
            params
                .iter()
                .filter(|(k, _)| k != "user")
                .map(|(k, v)| (k.as_str(), v.as_str())),
        );
        crate::protocol::startup::encode_startup_message(
            &mut out,
            crate::protocol::startup::ProtocolVersion::V3_0,
            sent,
        );
        assert_eq!(upstream_startup_len("app", &params), out.len());
    }
}
