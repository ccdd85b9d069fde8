//! The fuzz corpora as regression tests, on the stable toolchain: every file
//! of `fuzz/seeds/<target>/` (captures and hand-made hostile cases),
//! `fuzz/corpus/<target>/` (what the fuzzer found, minimised) and
//! `fuzz/regressions/<target>/` (inputs that once failed) goes through
//! the same target body the fuzzer runs (`fuzz/targets.rs`), with its
//! invariants. A failure names the file and prints the input in hex.
//!
//! `cargo test --release -- fuzz_replay::` takes seconds; the fuzzing
//! itself is `cargo +nightly fuzz run <target>` (fuzz/README.md).

#[allow(dead_code)]
#[path = "../../fuzz/targets.rs"]
mod targets;

use std::path::{Path, PathBuf};

fn files(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut out: Vec<PathBuf> = entries
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file())
        .collect();
    out.sort();
    out
}

/// What some seeds must reach (a substring of the target's label), so that
/// a change that stops the seeds from getting where they were made to go
/// (a valid SCRAM exchange, a verified JWT, a finished login) is noticed.
const EXPECTED: &[(&str, &str, &str)] = &[
    ("startup", "seed-psql-prefer-0", "ssl_request"),
    ("startup", "seed-tokio-postgres-0", "startup_message"),
    ("startup", "hostile-cancel-long-key", "cancel_request"),
    ("startup", "hostile-gss", "gssenc_request"),
    ("startup", "hostile-len-0", "startup_length"),
    ("startup", "hostile-len-7", "startup_length"),
    ("startup", "hostile-len-10005", "startup_length"),
    ("startup", "hostile-len-2147483648", "startup_length"),
    ("startup", "hostile-len-4294967295", "startup_length"),
    ("startup", "hostile-no-nul", "startup_terminator"),
    ("startup", "hostile-duplicate-user", "startup_duplicate"),
    ("startup", "hostile-thousands-of-c", "startup_message"),
    ("startup", "hostile-options-c-eq", "startup_message"),
    ("password", "seed-psql-prefer", "credentials"),
    ("password", "hostile-513", "password_too_long"),
    ("password", "hostile-startup-again", "password_unexpected"),
    ("password", "hostile-inner-nul", "password_malformed"),
    ("scram_client", "seed-pg15-n", "final_accepted"),
    ("scram_client", "seed-pg15-y", "final_accepted"),
    ("scram_client", "seed-pg15-p", "final_accepted"),
    (
        "scram_client",
        "seed-pg15-bad-sig",
        "ServerSignatureMismatch",
    ),
    ("scram_client", "seed-pg15-e-invalid-proof", "ServerError"),
    ("scram_client", "hostile-i-0", "IterationCountTooLow"),
    ("scram_client", "hostile-i-huge", "IterationCountTooHigh"),
    ("scram_client", "hostile-nonce-64k", "MessageTooLong"),
    ("scram_client", "hostile-nonce-mismatch", "NonceMismatch"),
    ("scram_client", "hostile-final-e-long-ctrl", "ServerError"),
    ("upstream_login", "seed-pg15-trust", "ready:trust"),
    ("upstream_login", "seed-pg15-cleartext", "ready:password"),
    ("upstream_login", "seed-pg15-md5", "ready:md5"),
    ("upstream_login", "seed-pg15-badpw", "refused the login"),
    (
        "upstream_login",
        "hostile-cleartext-no-password",
        "refused the login",
    ),
    ("upstream_login", "hostile-i-huge", "SCRAM exchange failed"),
    ("upstream_login", "hostile-e-final", "SCRAM exchange failed"),
    ("upstream_login", "hostile-key-long-3.0", "protocol error"),
    ("token", "hostile-opaque", "granted/"),
    ("token", "hostile-hs256", "jwt_granted"),
    ("token", "hostile-rs256", "jwt_granted"),
    ("token", "hostile-es256", "jwt_granted"),
    ("token", "hostile-eddsa", "jwt_granted"),
    ("token", "hostile-json-valid", "jwt_granted"),
    ("token", "hostile-none", "jwt_alg_none"),
    ("token", "hostile-rs-as-hs", "jwt_key_unknown"),
    ("token", "hostile-expired", "jwt_expired"),
    ("token", "hostile-json-deep", "jwt_malformed"),
    ("framer", "hostile-backend-1", "messages:3"),
    ("framer", "hostile-len-3", "InvalidLength"),
    ("handshake", "seed-psql-prefer-02", "credentials"),
    ("handshake", "seed-tokio-postgres-0a", "credentials"),
    (
        "handshake",
        "hostile-ssl-then-plaintext",
        "plaintext_after_ssl_request",
    ),
    ("handshake", "hostile-direct-tls-off", "direct_tls_refused"),
    ("handshake", "hostile-tls-required-plain", "tls_required"),
    (
        "handshake",
        "hostile-startup-during-auth",
        "password_unexpected",
    ),
    (
        "handshake",
        "hostile-cancel-during-auth",
        "password_unexpected",
    ),
    ("handshake", "hostile-password-513", "password_too_long"),
    ("proxy_header", "seed-v1-tcp4", "v1_proxied4"),
    ("proxy_header", "seed-v1-tcp6", "v1_proxied6"),
    ("proxy_header", "seed-v1-unknown", "v1_local"),
    ("proxy_header", "seed-v1-unknown-107", "v1_local"),
    ("proxy_header", "seed-v2-tcp4", "v2_proxied4"),
    ("proxy_header", "seed-v2-tcp6", "v2_proxied6"),
    ("proxy_header", "seed-v2-tcp4-tlvs", "v2_proxied4+tlv"),
    ("proxy_header", "seed-v2-tcp6-tlvs", "v2_proxied6+tlv"),
    ("proxy_header", "seed-v2-local", "v2_local"),
    ("proxy_header", "hostile-v2-udp4", "proxy_unsupported"),
];

/// Runs every corpus and regression input of `name`; fails listing each
/// input that panicked, and each seed that did not reach what it should.
/// `FUZZ_REPLAY_SHOW=1` prints what every input reached.
fn replay(name: &str) {
    let (_, target) = targets::TARGETS
        .iter()
        .find(|(n, _)| *n == name)
        .unwrap_or_else(|| panic!("no target {name}"));
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
    let seeds = files(&root.join("seeds").join(name));
    let corpus = files(&root.join("corpus").join(name));
    let regressions = files(&root.join("regressions").join(name));
    assert!(
        seeds.len() >= 5,
        "fuzz/seeds/{name} has {} inputs: the seeds are missing",
        seeds.len()
    );
    let total = seeds.len() + corpus.len() + regressions.len();
    let mut failed = Vec::new();
    let mut reached = Vec::new();
    for path in seeds.iter().chain(&corpus).chain(&regressions) {
        let data = std::fs::read(path).unwrap();
        match std::panic::catch_unwind(|| target(&data)) {
            Ok(r) => reached.push((path.file_name().unwrap().to_string_lossy().into_owned(), r)),
            Err(_) => failed.push(format!("{}: {}", path.display(), hex(&data))),
        }
    }
    if std::env::var_os("FUZZ_REPLAY_SHOW").is_some() {
        for (file, r) in &reached {
            eprintln!("{name} {file} {r}");
        }
    }
    for (target, file, expected) in EXPECTED.iter().filter(|e| e.0 == name) {
        match reached.iter().find(|(f, _)| f == file) {
            None => failed.push(format!("{target}/{file}: missing")),
            Some((_, r)) if !r.contains(expected) => failed.push(format!(
                "{target}/{file}: reached {r:?}, expected {expected:?}"
            )),
            Some(_) => {}
        }
    }
    assert!(
        failed.is_empty(),
        "{name}: {} of {} inputs failed:\n{}",
        failed.len(),
        total,
        failed.join("\n")
    );
}

fn hex(data: &[u8]) -> String {
    let shown: String = data.iter().take(512).map(|b| format!("{b:02x}")).collect();
    if data.len() > 512 {
        format!("{shown}... ({} bytes)", data.len())
    } else {
        shown
    }
}

#[test]
fn startup_corpus() {
    replay("startup");
}

#[test]
fn password_corpus() {
    replay("password");
}

#[test]
fn scram_client_corpus() {
    replay("scram_client");
}

#[test]
fn upstream_login_corpus() {
    replay("upstream_login");
}

#[test]
fn token_corpus() {
    replay("token");
}

#[test]
fn framer_corpus() {
    replay("framer");
}

#[test]
fn handshake_corpus() {
    replay("handshake");
}

#[test]
fn proxy_header_corpus() {
    replay("proxy_header");
}
