//! `[upstream] require_auth`: which authentication requests tollgate
//! answers when it logs in upstream, named as libpq's `require_auth`
//! (without its `!` negation). Parsed here, with the config; enforced by
//! the login state machine (`crate::upstream::login`).
//!
//! <https://www.postgresql.org/docs/current/libpq-connect.html#LIBPQ-CONNECT-REQUIRE-AUTH>

/// The authentication methods tollgate will answer, as libpq's
/// `require_auth`: a server that asks for another is refused before any
/// password (or hash of one) is sent, and one that skips authentication is
/// refused unless `none` is allowed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AuthMethods {
    pub password: bool,
    pub md5: bool,
    pub scram: bool,
    pub none: bool,
}

impl AuthMethods {
    pub const ANY: AuthMethods = AuthMethods {
        password: true,
        md5: true,
        scram: true,
        none: true,
    };

    /// Parses a comma-separated list of `password`, `md5`,
    /// `scram-sha-256` and `none`.
    pub fn parse(list: &str) -> Result<AuthMethods, String> {
        let mut m = AuthMethods {
            password: false,
            md5: false,
            scram: false,
            none: false,
        };
        for name in list.split(',').map(str::trim) {
            match name {
                "password" => m.password = true,
                "md5" => m.md5 = true,
                "scram-sha-256" => m.scram = true,
                "none" => m.none = true,
                other => {
                    return Err(format!(
                        "\"{}\" is not one of password, md5, scram-sha-256, none",
                        other.escape_default()
                    ))
                }
            }
        }
        Ok(m)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn require_auth_lists_parse() {
        let only = |password, md5, scram, none| AuthMethods {
            password,
            md5,
            scram,
            none,
        };
        for (list, want) in [
            ("scram-sha-256", only(false, false, true, false)),
            ("password", only(true, false, false, false)),
            ("md5,password", only(true, true, false, false)),
            ("none", only(false, false, false, true)),
            (" scram-sha-256 ,\tnone ", only(false, false, true, true)),
            (
                "scram-sha-256,scram-sha-256",
                only(false, false, true, false),
            ),
            ("password,md5,scram-sha-256,none", AuthMethods::ANY),
        ] {
            assert_eq!(AuthMethods::parse(list), Ok(want), "{list:?}");
        }
    }

    #[test]
    fn require_auth_lists_with_unknown_names_are_errors() {
        for (list, named) in [
            ("scram", "\"scram\""),
            // Names are matched exactly, as libpq does.
            ("SCRAM-SHA-256", "\"SCRAM-SHA-256\""),
            ("gss", "\"gss\""),
            // libpq's negation is not supported: refused, not ignored.
            ("!password", "\"!password\""),
            ("", "\"\""),
            ("md5,", "\"\""),
            ("md5,,none", "\"\""),
            ("scram-sha-256 md5", "\"scram-sha-256 md5\""),
            ("pass\nword", "\"pass\\nword\""),
        ] {
            let e = AuthMethods::parse(list).expect_err(list);
            assert!(e.starts_with(named), "{list:?}: {e}");
            assert!(
                e.ends_with("is not one of password, md5, scram-sha-256, none"),
                "{list:?}: {e}"
            );
            assert!(!e.contains('\n'), "{list:?}: {e:?}");
        }
    }
}
