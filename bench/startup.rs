//! Start-up parsing: the StartupMessage parser alone, and the whole
//! pre-authentication handshake (StartupMessage, then the PasswordMessage
//! carrying the token) up to the credentials the token check receives.
//!
//! Runs once per connection, so it matters for connection storms (a pool
//! reconnecting all at once), not for the relay.
//!
//! Run: `cargo bench --bench startup`

use std::hint::black_box;
use std::time::Duration;

use bytes::{BufMut, BytesMut};
use criterion::{criterion_group, criterion_main, Criterion};
use tollgate::handshake::{advance, AwaitStartup, Phase, Progress};
use tollgate::protocol::startup::{
    encode_startup_message, parse_startup, FeStartupPacket, ProtocolVersion,
};

/// What psql 15 sends.
const PSQL: &[(&str, &str)] = &[
    ("user", "app"),
    ("database", "appdb"),
    ("application_name", "psql"),
    ("client_encoding", "UTF8"),
];

/// What pgJDBC 42 sends (the most parameters of the common drivers).
const JDBC: &[(&str, &str)] = &[
    ("user", "app"),
    ("database", "appdb"),
    ("client_encoding", "UTF8"),
    ("DateStyle", "ISO"),
    ("TimeZone", "Europe/Berlin"),
    ("extra_float_digits", "2"),
    ("application_name", "PostgreSQL JDBC Driver"),
];

/// A well-formed token (the shape `tollgate token create` prints).
const TOKEN: &str =
    "tg_abcdefghijkl_0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef01234567";

fn startup_message(pairs: &[(&'static str, &'static str)]) -> Vec<u8> {
    let mut b = BytesMut::new();
    encode_startup_message(&mut b, ProtocolVersion::V3_0, pairs.iter().copied());
    b.to_vec()
}

/// PasswordMessage: 'p', Int32 length, the password, a NUL.
fn password_message(password: &str) -> Vec<u8> {
    let mut b = BytesMut::new();
    b.put_u8(b'p');
    b.put_i32((4 + password.len() + 1) as i32);
    b.put_slice(password.as_bytes());
    b.put_u8(0);
    b.to_vec()
}

fn bench_startup(c: &mut Criterion) {
    let mut group = c.benchmark_group("startup");
    group.sample_size(30);
    group.warm_up_time(Duration::from_millis(500));
    group.measurement_time(Duration::from_secs(2));

    for (client, pairs) in [("psql", PSQL), ("jdbc", JDBC)] {
        let packet = startup_message(pairs);
        match parse_startup(&packet) {
            Ok(Some((FeStartupPacket::StartupMessage { params, .. }, used))) => {
                assert_eq!(used, packet.len());
                assert_eq!(params.user(), Some("app"));
            }
            other => panic!("unexpected parse result: {other:?}"),
        }
        group.bench_function(format!("parse_startup/{client}"), |b| {
            b.iter(|| parse_startup(black_box(&packet)))
        });

        // StartupMessage and PasswordMessage in one read: the whole
        // pre-auth machine, including the AuthenticationCleartextPassword
        // it writes, up to the credentials.
        let mut wire = packet.clone();
        wire.extend_from_slice(&password_message(TOKEN));
        let mut input = BytesMut::with_capacity(wire.len());
        let mut output = BytesMut::with_capacity(64);
        group.bench_function(format!("handshake/{client}"), |b| {
            b.iter(|| {
                input.clear();
                input.extend_from_slice(black_box(&wire));
                output.clear();
                match advance(Phase::Startup(AwaitStartup::new()), &mut input, &mut output) {
                    Ok(Progress::Credentials { startup, token }) => {
                        black_box((startup, token));
                    }
                    other => panic!("unexpected handshake result: {other:?}"),
                }
            })
        });
    }
    group.finish();
}

criterion_group!(benches, bench_startup);
criterion_main!(benches);
