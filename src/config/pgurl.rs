//! `postgres://user:password@host:port/database` URLs, as quickstart's and
//! the load harness's `--upstream` take them.
#![forbid(unsafe_code)]

use std::fmt;

/// A parsed connection URL. `Debug` hides the password.
#[derive(Clone, PartialEq, Eq)]
pub struct PgUrl {
    pub host: String,
    pub port: u16,
    pub user: String,
    pub password: String,
    /// Defaults to the user name, as in libpq.
    pub database: String,
}

impl fmt::Debug for PgUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PgUrl")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("user", &self.user)
            .field("password", &"<redacted>")
            .field("database", &self.database)
            .finish()
    }
}

impl PgUrl {
    /// Parses `s`; errors name the URL's role (e.g. `--upstream`), never
    /// its password.
    pub fn parse(s: &str, what: &str) -> Result<PgUrl, String> {
        let url = url::Url::parse(s).map_err(|e| format!("{what}: {e}"))?;
        if url.scheme() != "postgres" && url.scheme() != "postgresql" {
            return Err(format!("{what} must be a postgres:// URL"));
        }
        let decode = |v: &str| {
            url::form_urlencoded::parse(format!("x={v}").as_bytes())
                .next()
                .map(|(_, v)| v.into_owned())
                .unwrap_or_default()
        };
        let user = decode(url.username());
        if user.is_empty() {
            return Err(format!(
                "{what} needs a user: postgres://user:password@host:port/database"
            ));
        }
        let database = decode(url.path().trim_start_matches('/'));
        Ok(PgUrl {
            host: url
                .host_str()
                .unwrap_or("127.0.0.1")
                .trim_matches(['[', ']'])
                .to_owned(),
            port: url.port().unwrap_or(5432),
            password: url.password().map(decode).unwrap_or_default(),
            database: if database.is_empty() {
                user.clone()
            } else {
                database
            },
            user,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_decodes() {
        let t = PgUrl::parse("postgres://app:p%40ss@db.internal:6543/appdb", "x").unwrap();
        assert_eq!(
            (
                t.user.as_str(),
                t.password.as_str(),
                t.host.as_str(),
                t.port,
                t.database.as_str()
            ),
            ("app", "p@ss", "db.internal", 6543, "appdb")
        );
        assert!(!format!("{t:?}").contains("p@ss"));
        let t = PgUrl::parse("postgresql://app@localhost", "x").unwrap();
        assert_eq!(
            (t.port, t.database.as_str(), t.password.as_str()),
            (5432, "app", "")
        );
        let t = PgUrl::parse("postgres://app@[::1]:5433/d", "x").unwrap();
        assert_eq!(t.host, "::1");
        assert!(PgUrl::parse("mysql://a@b/c", "x").is_err());
        assert!(PgUrl::parse("postgres://localhost/db", "x").is_err());
    }
}
