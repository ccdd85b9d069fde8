//! The record layer against rustls itself as the peer, in memory: every
//! version and cipher tollgate can negotiate, records split anywhere, key
//! updates both ways, session tickets, close_notify, and tampering.

use std::io::{Read, Write};
use std::sync::Arc;

use rustls::client::UnbufferedClientConnection;
use rustls::crypto::ring::cipher_suite as suites;
use rustls::server::UnbufferedServerConnection;
use rustls::{ClientConfig, ClientConnection, RootCertStore, ServerConfig, ServerConnection};
use rustls::{SupportedCipherSuite, SupportedProtocolVersion};

use super::*;
use crate::tls::handshake::{Handshake, Side, Want};

const SUITES: [SupportedCipherSuite; 6] = [
    suites::TLS13_AES_128_GCM_SHA256,
    suites::TLS13_AES_256_GCM_SHA384,
    suites::TLS13_CHACHA20_POLY1305_SHA256,
    suites::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
    suites::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384,
    suites::TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256,
];

struct Certs {
    chain: Vec<rustls_pki_types::CertificateDer<'static>>,
    key: rustls_pki_types::PrivateKeyDer<'static>,
}

fn certs() -> Certs {
    // rcgen's default key is ECDSA P-256: the ECDSA TLS 1.2 suites.
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
    Certs {
        chain: vec![cert.cert.der().clone()],
        key: rustls_pki_types::PrivateKeyDer::Pkcs8(cert.signing_key.serialize_der().into()),
    }
}

fn provider(suite: SupportedCipherSuite) -> Arc<rustls::crypto::CryptoProvider> {
    let mut p = rustls::crypto::ring::default_provider();
    p.cipher_suites = vec![suite];
    Arc::new(p)
}

fn version(suite: SupportedCipherSuite) -> &'static SupportedProtocolVersion {
    match suite {
        SupportedCipherSuite::Tls13(_) => &rustls::version::TLS13,
        SupportedCipherSuite::Tls12(_) => &rustls::version::TLS12,
    }
}

fn server_config(suite: SupportedCipherSuite, certs: &Certs, extract: bool) -> Arc<ServerConfig> {
    let mut c = ServerConfig::builder_with_provider(provider(suite))
        .with_protocol_versions(&[version(suite)])
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(certs.chain.clone(), certs.key.clone_key())
        .unwrap();
    c.enable_secret_extraction = extract;
    Arc::new(c)
}

fn client_config(suite: SupportedCipherSuite, certs: &Certs, extract: bool) -> Arc<ClientConfig> {
    let mut roots = RootCertStore::empty();
    roots.add(certs.chain[0].clone()).unwrap();
    let mut c = ClientConfig::builder_with_provider(provider(suite))
        .with_protocol_versions(&[version(suite)])
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    c.enable_secret_extraction = extract;
    Arc::new(c)
}

/// Moves everything `conn` wants to send.
fn drain(
    conn: &mut impl std::ops::DerefMut<Target = rustls::ConnectionCommon<impl Sized>>,
) -> Vec<u8> {
    let mut out = Vec::new();
    while conn.wants_write() {
        conn.write_tls(&mut out).unwrap();
    }
    out
}

/// Feeds `bytes` to a buffered rustls peer and reads all its plaintext.
fn give(
    conn: &mut impl std::ops::DerefMut<Target = rustls::ConnectionCommon<impl Sized>>,
    mut bytes: &[u8],
) -> Vec<u8> {
    let mut plain = Vec::new();
    while !bytes.is_empty() {
        conn.read_tls(&mut bytes).unwrap();
        conn.process_new_packets().unwrap();
        let mut buf = [0; 4096];
        loop {
            match conn.reader().read(&mut buf) {
                Ok(0) => break,
                Ok(n) => plain.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) => panic!("{e}"),
            }
        }
    }
    plain
}

/// Runs a handshake between our driver (`ours`) and a buffered rustls
/// peer; `early` is written by the peer as soon as it may, so that it
/// travels with the peer's last handshake flight.
fn handshake<C: Side, D>(
    ours: C,
    peer: &mut impl std::ops::DerefMut<Target = rustls::ConnectionCommon<D>>,
    early: &[u8],
) -> (RecordLayer, Vec<u8>) {
    let mut hs = Handshake::new(ours, Vec::new());
    let mut early = Some(early);
    for _ in 0..20 {
        if !peer.is_handshaking() {
            if let Some(e) = early.take() {
                peer.writer().write_all(e).unwrap();
            }
        }
        let from_peer = drain(peer);
        hs.incoming.extend_from_slice(&from_peer);
        loop {
            match hs.advance().unwrap() {
                Want::Send => {
                    let out = std::mem::take(&mut hs.outgoing);
                    give(peer, &out);
                    hs.sent();
                }
                Want::Receive => break,
                Want::Done => {
                    if let Some(e) = early.take() {
                        peer.writer().write_all(e).unwrap();
                        let more = drain(peer);
                        hs.incoming.extend_from_slice(&more);
                    }
                    assert!(!peer.is_handshaking());
                    return hs.finish().unwrap();
                }
            }
        }
    }
    panic!("handshake did not finish");
}

/// Our server record layer and a rustls client, after a handshake.
fn server_pair(
    suite: SupportedCipherSuite,
    early: &[u8],
) -> (RecordLayer, ClientConnection, Vec<u8>) {
    let certs = certs();
    let ours = UnbufferedServerConnection::new(server_config(suite, &certs, true)).unwrap();
    let mut client = ClientConnection::new(
        client_config(suite, &certs, false),
        "localhost".try_into().unwrap(),
    )
    .unwrap();
    let (layer, leftover) = handshake(ours, &mut client, early);
    (layer, client, leftover)
}

/// Opens `bytes` as a stream delivered in chunks of `chunk`, as a socket
/// would: the partial record carried over to the next chunk.
fn open_stream(layer: &mut RecordLayer, bytes: &[u8], chunk: usize) -> Vec<u8> {
    let mut plain = Vec::new();
    let mut buf: Vec<u8> = Vec::new();
    for piece in bytes.chunks(chunk.max(1)) {
        buf.extend_from_slice(piece);
        let opened = layer.open(&mut buf).unwrap();
        plain.extend_from_slice(&buf[..opened.plaintext]);
        buf.drain(..opened.consumed);
    }
    assert!(buf.is_empty(), "a record was left unfinished");
    plain
}

/// Seals `plain` through an output buffer of `room` bytes at a time.
fn seal_all(layer: &mut RecordLayer, mut plain: &[u8], room: usize) -> Vec<u8> {
    let mut out = vec![0; room];
    let mut wire = Vec::new();
    loop {
        let (taken, written) = layer.seal(plain, &mut out).unwrap();
        wire.extend_from_slice(&out[..written]);
        plain = &plain[taken..];
        if plain.is_empty() {
            return wire;
        }
        assert!(taken > 0 || written > 0, "no progress");
    }
}

/// What a rustls peer sends for `data`, written a piece at a time (its
/// writer buffers only so much).
fn send(
    conn: &mut impl std::ops::DerefMut<Target = rustls::ConnectionCommon<impl Sized>>,
    data: &[u8],
) -> Vec<u8> {
    let mut wire = Vec::new();
    for piece in data.chunks(16 * 1024) {
        conn.writer().write_all(piece).unwrap();
        wire.extend_from_slice(&drain(conn));
    }
    wire
}

fn pattern(n: usize) -> Vec<u8> {
    (0..n).map(|i| (i * 7 + i / 251) as u8).collect()
}

#[test]
fn every_suite_carries_data_both_ways_in_any_split() {
    for suite in SUITES {
        let (mut ours, mut client, leftover) = server_pair(suite, b"");
        assert!(leftover.is_empty());
        // Small and large, records split at every kind of place.
        for (len, chunk) in [(5, 1), (100, 7), (70_000, 1000), (40_000, 16_500)] {
            let sent = pattern(len);
            let wire = send(&mut client, &sent);
            assert_eq!(
                open_stream(&mut ours, &wire, chunk),
                sent,
                "{suite:?} {len}"
            );
            let back = pattern(len + 3);
            for room in [64, 1500, 40_000] {
                let wire = seal_all(&mut ours, &back, room);
                assert_eq!(give(&mut client, &wire), back, "{suite:?} room {room}");
            }
        }
    }
}

#[test]
fn data_sent_with_the_clients_finished_is_left_for_the_record_layer() {
    for suite in [SUITES[0], SUITES[3]] {
        let (mut ours, _client, leftover) = server_pair(suite, b"SELECT 1");
        assert!(!leftover.is_empty(), "{suite:?}");
        assert_eq!(open_stream(&mut ours, &leftover, 3), b"SELECT 1");
    }
}

#[test]
fn key_updates_work_both_ways() {
    for suite in [SUITES[0], SUITES[2]] {
        let (mut ours, mut client, _) = server_pair(suite, b"");
        // The client renews its key and asks us to renew ours.
        client.refresh_traffic_keys().unwrap();
        client.writer().write_all(b"after update").unwrap();
        let wire = drain(&mut client);
        assert_eq!(open_stream(&mut ours, &wire, 11), b"after update");
        // Our next records come after our own KeyUpdate; rustls checks it.
        let wire = seal_all(&mut ours, b"answer", 4096);
        assert_eq!(give(&mut client, &wire), b"answer");
        // And twice more, to see the new keys chain.
        for _ in 0..2 {
            client.refresh_traffic_keys().unwrap();
            client.writer().write_all(b"x").unwrap();
            let wire = drain(&mut client);
            assert_eq!(open_stream(&mut ours, &wire, 100), b"x");
            let wire = seal_all(&mut ours, b"y", 4096);
            assert_eq!(give(&mut client, &wire), b"y");
        }
    }
}

#[test]
fn our_key_is_renewed_at_its_limit() {
    let (mut ours, mut client, _) = server_pair(SUITES[0], b"");
    ours.tx_limit = ours.tx.seq + 3;
    let wire = seal_all(&mut ours, &pattern(100_000), 20_000);
    assert_eq!(give(&mut client, &wire), pattern(100_000));
    assert!(!ours.key_wearing_out(), "TLS 1.3 renews its key");
    // A TLS 1.2 key cannot be renewed: the connection ends instead, and
    // says so ahead, so a pool can retire it first.
    let (mut ours, _client, _) = server_pair(SUITES[3], b"");
    ours.tx_limit = 1000;
    ours.tx.seq = 870;
    assert!(!ours.key_wearing_out());
    ours.tx.seq = 880;
    assert!(ours.key_wearing_out());
    ours.tx_limit = ours.tx.seq;
    let mut out = vec![0; 4096];
    assert!(matches!(
        ours.seal(b"x", &mut out),
        Err(RecordError::KeyExhausted)
    ));
}

#[test]
fn a_changed_byte_fails_the_record() {
    for suite in SUITES {
        let (mut ours, mut client, _) = server_pair(suite, b"");
        client.writer().write_all(b"SELECT 1").unwrap();
        let mut wire = drain(&mut client);
        let last = wire.len() - 1;
        wire[last] ^= 1;
        assert!(
            matches!(ours.open(&mut wire), Err(RecordError::BadRecordMac)),
            "{suite:?}"
        );
    }
}

#[test]
fn a_replayed_record_fails() {
    let (mut ours, mut client, _) = server_pair(SUITES[0], b"");
    client.writer().write_all(b"SELECT 1").unwrap();
    let wire = drain(&mut client);
    assert_eq!(open_stream(&mut ours, &wire, 100), b"SELECT 1");
    let mut again = wire.clone();
    assert!(matches!(
        ours.open(&mut again),
        Err(RecordError::BadRecordMac)
    ));
}

#[test]
fn close_notify_ends_the_stream_both_ways() {
    for suite in [SUITES[0], SUITES[4]] {
        let (mut ours, mut client, _) = server_pair(suite, b"");
        client.writer().write_all(b"bye").unwrap();
        client.send_close_notify();
        let mut wire = drain(&mut client);
        // Anything after close_notify is not read.
        wire.extend_from_slice(&[23, 3, 3, 0, 1, 0]);
        let opened = ours.open(&mut wire).unwrap();
        assert_eq!(&wire[..opened.plaintext], b"bye");
        assert!(ours.peer_closed());
        let mut out = vec![0; 64];
        let n = ours.seal_close_notify(&mut out).unwrap();
        let mut bytes = &out[..n];
        client.read_tls(&mut bytes).unwrap();
        let state = client.process_new_packets().unwrap();
        assert!(state.peer_has_closed(), "{suite:?}");
    }
}

#[test]
fn oversized_and_unexpected_records_are_refused() {
    let (mut ours, _, _) = server_pair(SUITES[0], b"");
    let mut long = vec![23, 3, 3, 0x43, 0x00];
    assert!(matches!(ours.open(&mut long), Err(RecordError::Overflow)));
    let (mut ours, _, _) = server_pair(SUITES[0], b"");
    let mut ccs = vec![20, 3, 3, 0, 1, 1];
    assert!(matches!(
        ours.open(&mut ccs),
        Err(RecordError::Unexpected(_))
    ));
    let (mut ours, _, _) = server_pair(SUITES[0], b"");
    let mut old = vec![23, 3, 1, 0, 20];
    old.extend_from_slice(&[0; 20]);
    assert!(matches!(ours.open(&mut old), Err(RecordError::Decode(_))));
}

#[test]
fn as_a_client_session_tickets_and_key_updates_are_taken() {
    for suite in [SUITES[0], SUITES[3], SUITES[5]] {
        let certs = certs();
        let ours = UnbufferedClientConnection::new(
            client_config(suite, &certs, true),
            "localhost".try_into().unwrap(),
        )
        .unwrap();
        let mut server = ServerConnection::new(server_config(suite, &certs, false)).unwrap();
        let (mut ours, leftover) = handshake(ours, &mut server, b"");
        // TLS 1.3 tickets come after the handshake, as records for us.
        let mut wire = leftover;
        // (They may have come with the end of the handshake.)
        wire.extend_from_slice(&drain(&mut server));
        if matches!(suite, SupportedCipherSuite::Tls13(_)) {
            assert!(
                !wire.is_empty(),
                "rustls sends TLS 1.3 tickets after the handshake"
            );
        }

        server.writer().write_all(b"hello client").unwrap();
        wire.extend_from_slice(&drain(&mut server));
        assert_eq!(
            open_stream(&mut ours, &wire, 50),
            b"hello client",
            "{suite:?}"
        );
        let sealed = seal_all(&mut ours, b"hello server", 4096);
        assert_eq!(give(&mut server, &sealed), b"hello server");
        if matches!(suite, SupportedCipherSuite::Tls13(_)) {
            server.refresh_traffic_keys().unwrap();
            server.writer().write_all(b"renewed").unwrap();
            let wire = drain(&mut server);
            assert_eq!(open_stream(&mut ours, &wire, 9), b"renewed");
            let sealed = seal_all(&mut ours, b"ok", 4096);
            assert_eq!(give(&mut server, &sealed), b"ok");
        }
    }
}

#[test]
fn a_failed_handshake_says_why_with_an_alert() {
    let certs = certs();
    let conn = UnbufferedServerConnection::new(server_config(SUITES[0], &certs, true)).unwrap();
    let mut hs = Handshake::new(conn, vec![0x16, 3, 1, 0, 4, 1, 0, 0, 0]);
    let failed = hs.advance().unwrap_err();
    assert!(!failed.alert.is_empty());
    // A record longer than any handshake sends is refused at its header.
    let conn = UnbufferedServerConnection::new(server_config(SUITES[0], &certs, true)).unwrap();
    let mut hs = Handshake::new(conn, vec![0x16, 3, 1, 0xff, 0xff]);
    assert!(hs.advance().is_err());
    // A partial record waits.
    let conn = UnbufferedServerConnection::new(server_config(SUITES[0], &certs, true)).unwrap();
    let mut hs = Handshake::new(conn, vec![0x16, 3, 1, 0x40, 0x00]);
    assert_eq!(hs.advance().unwrap(), Want::Receive);
}

/// Handshake messages split across many small records (a peer with a
/// small maximum fragment size) are joined by rustls across the records
/// the driver shows it one at a time, on both sides.
#[test]
fn a_handshake_in_small_fragments_completes() {
    for suite in [SUITES[0], SUITES[3]] {
        let certs = certs();
        // Our server, a client sending 64-byte records.
        let ours = UnbufferedServerConnection::new(server_config(suite, &certs, true)).unwrap();
        let mut config = (*client_config(suite, &certs, false)).clone();
        config.max_fragment_size = Some(64);
        let mut client =
            ClientConnection::new(Arc::new(config), "localhost".try_into().unwrap()).unwrap();
        let (mut ours, leftover) = handshake(ours, &mut client, b"");
        let mut wire = leftover;
        wire.extend_from_slice(&send(&mut client, b"after small records"));
        assert_eq!(open_stream(&mut ours, &wire, 13), b"after small records");
        // Our client, a server sending 64-byte records.
        let ours = UnbufferedClientConnection::new(
            client_config(suite, &certs, true),
            "localhost".try_into().unwrap(),
        )
        .unwrap();
        let mut config = (*server_config(suite, &certs, false)).clone();
        config.max_fragment_size = Some(64);
        let mut server = ServerConnection::new(Arc::new(config)).unwrap();
        let (mut ours, leftover) = handshake(ours, &mut server, b"");
        let mut wire = leftover;
        wire.extend_from_slice(&drain(&mut server));
        wire.extend_from_slice(&send(&mut server, b"hello"));
        assert_eq!(open_stream(&mut ours, &wire, 7), b"hello", "{suite:?}");
    }
}
