//! Which clients a pooled connection may serve. A connection is logged in
//! with the start-up parameters that shape a session for good (`database`,
//! `options`, the token's own `session` values, anything tollgate does not
//! know to be harmless), and those make its key. The parameters a client
//! may change with a plain `SET` at any time (application_name, TimeZone,
//! ...) are left out of the login and set on checkout instead, so they do
//! not split the pool.

/// Start-up parameters applied with `set_config` on checkout rather than at
/// login. All are `PGC_USERSET`: a `SET` of them is what the client itself
/// could do at any time, so a session that got them this way cannot tell.
const SETTABLE: [&str; 12] = [
    "application_name",
    "client_encoding",
    "datestyle",
    "intervalstyle",
    "timezone",
    "search_path",
    "extra_float_digits",
    "bytea_output",
    "statement_timeout",
    "lock_timeout",
    "idle_in_transaction_session_timeout",
    "default_transaction_isolation",
];

/// The settable parameters the server reports with ParameterStatus
/// whenever they change (`GUC_REPORT`). Under transaction pooling only
/// these are set on a lent connection: their value on the connection is
/// always known from what the server reported, so a client's values are
/// applied only where they differ, and a client's own `SET` of one is
/// followed rather than pinned. Any other start-up parameter stays in
/// the key (a `SET` per transaction would cost a round trip each).
pub const REPORTED: [&str; 5] = [
    "application_name",
    "client_encoding",
    "datestyle",
    "intervalstyle",
    "timezone",
];

/// Whether the server reports `name` when it changes (see [`REPORTED`]).
pub fn is_reported(name: &str) -> bool {
    REPORTED.iter().any(|s| s.eq_ignore_ascii_case(name))
}

/// What a pooled connection was logged in with, beyond the upstream
/// itself: two clients with equal keys get interchangeable sessions.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PoolKey {
    /// The upstream role (the client's, which tollgate logs in as).
    pub user: String,
    /// The protocol minor version the client asked for: it decides the
    /// cancel key's length and what the server negotiates.
    pub minor: u16,
    /// The start-up parameters of the login, sorted by name.
    pub params: Vec<(String, String)>,
    /// Transaction pooling: its connections go from client to client with
    /// no reset between (what they carry is kept from sharing them with
    /// session-pooled clients, whose connections come reset).
    pub transaction: bool,
}

/// Splits the parameters tollgate would send upstream into the pool key's
/// (sent at login) and those set on checkout. `fixed` names parameters
/// that must stay in the key whatever their name (the token's `session`
/// values: a client may not be able to override them, and a `SET` would
/// let `RESET` undo them).
///
/// `reported_only` (transaction pooling) sets only the [`REPORTED`] ones
/// on checkout and keeps the rest in the key.
pub fn split_params(
    user: &str,
    minor: u16,
    params: Vec<(String, String)>,
    fixed: &[(String, String)],
    reported_only: bool,
) -> (PoolKey, Vec<(String, String)>) {
    let mut key = Vec::new();
    let mut settable = Vec::new();
    for (k, v) in params {
        let is_fixed = fixed.iter().any(|(f, _)| f.eq_ignore_ascii_case(&k));
        let set_later = if reported_only {
            is_reported(&k)
        } else {
            SETTABLE.iter().any(|s| s.eq_ignore_ascii_case(&k))
        };
        if !is_fixed && set_later {
            settable.push((k, v));
        } else if k != "user" {
            key.push((k, v));
        }
    }
    key.sort();
    let key = PoolKey {
        user: user.to_owned(),
        minor,
        params: key,
        transaction: reported_only,
    };
    (key, settable)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pairs(p: &[(&str, &str)]) -> Vec<(String, String)> {
        p.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn settable_parameters_do_not_split_the_pool() {
        let a = pairs(&[
            ("database", "app"),
            ("application_name", "psql"),
            ("TimeZone", "UTC"),
        ]);
        let b = pairs(&[("DateStyle", "ISO"), ("database", "app")]);
        let (ka, sa) = split_params("app", 0, a, &[], false);
        let (kb, sb) = split_params("app", 0, b, &[], false);
        assert_eq!(ka, kb);
        assert_eq!(sa.len(), 2);
        assert_eq!(sb, pairs(&[("DateStyle", "ISO")]));
    }

    #[test]
    fn options_the_token_and_the_version_do() {
        let base = pairs(&[("database", "app")]);
        let (k0, _) = split_params("app", 0, base.clone(), &[], false);
        let with_options = pairs(&[("database", "app"), ("options", "-c work_mem=64MB")]);
        assert_ne!(k0, split_params("app", 0, with_options, &[], false).0);
        assert_ne!(k0, split_params("app", 2, base.clone(), &[], false).0);
        assert_ne!(k0, split_params("other", 0, base, &[], false).0);
        // A token's value stays a login parameter even when it is settable.
        let token = pairs(&[("search_path", "locked")]);
        let p = pairs(&[("database", "app"), ("search_path", "locked")]);
        let (k, s) = split_params("app", 0, p, &token, false);
        assert!(s.is_empty());
        assert!(k.params.contains(&("search_path".into(), "locked".into())));
    }

    #[test]
    fn transaction_pooling_sets_only_what_the_server_reports() {
        let p = pairs(&[
            ("database", "app"),
            ("TimeZone", "UTC"),
            ("statement_timeout", "5s"),
        ]);
        let (k, s) = split_params("app", 0, p, &[], true);
        assert_eq!(s, pairs(&[("TimeZone", "UTC")]));
        assert!(k
            .params
            .contains(&("statement_timeout".into(), "5s".into())));
    }
}
