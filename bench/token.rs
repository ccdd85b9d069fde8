//! Token check: `TokenStore::check` against a store of 10 000 tokens, for
//! the outcomes a connection storm or an attacker produces.
//!
//! A check parses the token (length, prefix, id alphabet, CRC-32, hex),
//! looks the id up, and hashes the secret with SHA-256 whether or not the id
//! is known, so a valid token, an unknown id and a wrong secret should cost
//! the same; only a malformed token (rejected by shape or checksum) is
//! cheaper.
//!
//! Run: `cargo bench --bench token`

use std::hint::black_box;
use std::time::{Duration, SystemTime};

use criterion::{criterion_group, criterion_main, Criterion};
use tollgate::auth::token::{self, TOKEN_LEN};
use tollgate::auth::{Presenter, Rejection, TokenRecord, TokenStore};

const STORE_SIZE: usize = 10_000;

fn record(id: &str, secret_sha256: [u8; 32], now: SystemTime) -> TokenRecord {
    let mut r = TokenRecord::new(
        id.to_owned(),
        "app".to_owned(),
        vec!["appdb".to_owned()],
        secret_sha256,
        now,
    );
    r.expires_at = Some(now + Duration::from_secs(86_400));
    r.comment = Some("bench".to_owned());
    // A realistic rule set: a network and a session parameter.
    r.cidrs = vec!["127.0.0.0/8".parse().expect("cidr")];
    r.session = vec![("statement_timeout".to_owned(), "5s".to_owned())];
    r
}

fn bench_token(c: &mut Criterion) {
    let now = SystemTime::now();
    let mut store = TokenStore::default();
    let mut valid = None;
    for i in 0..STORE_SIZE {
        let t = token::generate();
        store.insert(record(&t.id, t.secret_sha256, now));
        if i == STORE_SIZE / 2 {
            valid = Some(t);
        }
    }
    assert_eq!(store.len(), STORE_SIZE, "generated ids collided");
    let valid = valid.expect("a token was kept");
    let valid_token = valid.token.expose().to_vec();
    // Well formed (checksum and all), but never inserted.
    let unknown = token::generate();
    let unknown_token = unknown.token.expose().to_vec();
    // A known id with another secret.
    let rotated = token::generate_with_id(&valid.id, &ring::rand::SystemRandom::new());
    let bad_secret_token = rotated.token.expose().to_vec();
    // Right length and shape, one character off: the CRC-32 catches it.
    let mut bad_checksum = valid_token.clone();
    bad_checksum[TOKEN_LEN - 20] ^= 0x01;
    // Somebody's old database password.
    let not_a_token = b"hunter2".to_vec();

    let cases: [(&str, &[u8], Result<(), Rejection>); 5] = [
        ("valid", &valid_token, Ok(())),
        ("unknown_id", &unknown_token, Err(Rejection::UnknownId)),
        ("bad_secret", &bad_secret_token, Err(Rejection::BadSecret)),
        (
            "malformed_checksum",
            &bad_checksum,
            Err(Rejection::Malformed),
        ),
        ("malformed_short", &not_a_token, Err(Rejection::Malformed)),
    ];

    let mut group = c.benchmark_group("token_check_10k");
    group.sample_size(30);
    group.warm_up_time(Duration::from_millis(500));
    group.measurement_time(Duration::from_secs(2));
    let who = Presenter {
        user: "app",
        database: "appdb",
        address: "127.0.0.1".parse().expect("address"),
    };
    for (name, presented, expected) in cases {
        assert_eq!(
            store.check(presented, &who, now).outcome.map(|_| ()),
            expected,
            "{name}"
        );
        group.bench_function(name, |b| {
            b.iter(|| store.check(black_box(presented), &who, now))
        });
    }
    group.finish();
}

criterion_group!(benches, bench_token);
criterion_main!(benches);
