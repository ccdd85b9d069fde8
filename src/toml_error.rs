//! Errors in the TOML files a person writes (the config, the token file),
//! told so that they can be fixed and nothing secret is repeated: the line
//! and column, and serde's message with any quoted value hidden.
//!
//! Its own module because both `config` and `auth` (the token file) read
//! TOML, and `config` builds on `auth`.

/// A TOML error as "line L, column C: what is wrong". Never the toml
/// crate's own rendering: it quotes the offending line, which may hold a
/// password or a token.
pub fn describe(e: &toml::de::Error, text: &str) -> String {
    match e.span() {
        Some(span) => {
            let before = &text[..span.start.min(text.len())];
            let line = before.matches('\n').count() + 1;
            let column = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
            format!("line {line}, column {column}: {}", hide_values(e.message()))
        }
        None => hide_values(e.message()),
    }
}

/// serde names a mistyped value in backticks ("invalid type: integer
/// `12345`, expected a string"), and that value may be a password. Keys
/// ("unknown field `pasword`") are kept: they are what the reader must fix.
pub fn hide_values(message: &str) -> String {
    if !message.starts_with("invalid") {
        return message.to_owned();
    }
    let mut out = String::with_capacity(message.len());
    for (i, part) in message.split('`').enumerate() {
        if i > 0 {
            out.push('`');
        }
        // Odd parts are the quoted ones.
        out.push_str(if i % 2 == 1 { "…" } else { part });
    }
    out
}
