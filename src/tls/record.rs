//! The TLS record layer once the handshake is done: records opened and
//! sealed in place, in the caller's buffers.
//!
//! rustls runs the handshake ([`super::handshake`]) and, through its
//! `KernelConnection`, keeps the key schedule for TLS 1.3 key updates and
//! takes session tickets; this module does the rest, which is what rustls
//! leaves to kTLS: framing, encrypting and decrypting records
//! (RFC 8446 §5 for TLS 1.3; RFC 5246 §6.2 with RFC 5288's AES-GCM and
//! RFC 7905's ChaCha20-Poly1305 for TLS 1.2, the only TLS 1.2 suites
//! rustls offers), alerts, and the two post-handshake messages a
//! PostgreSQL connection can meet (KeyUpdate, NewSessionTicket).
//!
//! Why not rustls's own connections: in rustls 0.23 every received record
//! is copied into a `Vec` of its own and every sent record is built in
//! one (with the buffered API and with the unbuffered one alike), and the
//! buffered connection keeps a 4 KiB receive buffer for the session's
//! life. Here a record is decrypted where it was received and encrypted
//! where it is sent from, the caller decides which buffers those are (the
//! shard's, lent only while bytes flow), and nothing is allocated per
//! record.
//!
//! Sans-IO: bytes in, bytes out; sockets are [`super::stream`]'s.

#![forbid(unsafe_code)]

use std::fmt;
use std::io;

use ring::aead::{self, Aad, LessSafeKey, Nonce, UnboundKey, NONCE_LEN};
use rustls::client::ClientConnectionData;
use rustls::kernel::KernelConnection;
use rustls::server::ServerConnectionData;
use rustls::{ConnectionTrafficSecrets, ExtractedSecrets, ProtocolVersion, SupportedCipherSuite};

/// A record header: content type, legacy version, length.
pub const HEADER_LEN: usize = 5;
/// The most plaintext one record carries (RFC 8446 §5.1, RFC 5246 §6.2.1).
pub const MAX_PLAINTEXT: usize = 1 << 14;
/// The longest TLS 1.3 record body (RFC 8446 §5.2).
const TLS13_MAX_CIPHERTEXT: usize = MAX_PLAINTEXT + 256;
/// The longest TLS 1.2 record body (RFC 5246 §6.2.3).
const TLS12_MAX_CIPHERTEXT: usize = MAX_PLAINTEXT + 2048;
/// The most bytes one record can take in a buffer, whatever the version.
pub const MAX_RECORD: usize = HEADER_LEN + TLS12_MAX_CIPHERTEXT;

const TAG_LEN: usize = 16;
/// TLS 1.2 AES-GCM sends 8 bytes of each record's nonce (RFC 5288 §3).
const EXPLICIT_NONCE_LEN: usize = 8;
/// The legacy record version every record carries after the handshake.
const RECORD_VERSION: [u8; 2] = [3, 3];

const CONTENT_CHANGE_CIPHER_SPEC: u8 = 20;
const CONTENT_ALERT: u8 = 21;
const CONTENT_HANDSHAKE: u8 = 22;
const CONTENT_APPLICATION_DATA: u8 = 23;

const HANDSHAKE_NEW_SESSION_TICKET: u8 = 4;
const HANDSHAKE_KEY_UPDATE: u8 = 24;

const ALERT_WARNING: u8 = 1;
const ALERT_FATAL: u8 = 2;
const ALERT_CLOSE_NOTIFY: u8 = 0;
const ALERT_UNEXPECTED_MESSAGE: u8 = 10;
const ALERT_BAD_RECORD_MAC: u8 = 20;
const ALERT_RECORD_OVERFLOW: u8 = 22;
const ALERT_DECODE_ERROR: u8 = 50;
const ALERT_INTERNAL_ERROR: u8 = 80;
const ALERT_USER_CANCELED: u8 = 90;

/// Why a record could not be taken or made. Each ends the connection.
#[derive(Debug)]
pub enum RecordError {
    /// A record failed authentication: altered, replayed or reordered.
    BadRecordMac,
    /// A record longer than its version allows.
    Overflow,
    /// A record or message that has no place after the handshake.
    Unexpected(&'static str),
    /// A malformed alert or handshake message.
    Decode(&'static str),
    /// The peer ended the connection with this alert.
    PeerAlert(u8),
    /// rustls refused a key update or a session ticket.
    Rustls(rustls::Error),
    /// The sending key has sealed as many records as its cipher allows,
    /// and TLS 1.2 cannot change it.
    KeyExhausted,
    /// The negotiated cipher is not one this layer implements.
    Unsupported,
}

impl fmt::Display for RecordError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RecordError::BadRecordMac => f.write_str("TLS record failed authentication"),
            RecordError::Overflow => f.write_str("TLS record too long"),
            RecordError::Unexpected(what) => write!(f, "unexpected TLS message: {what}"),
            RecordError::Decode(what) => write!(f, "malformed TLS message: {what}"),
            RecordError::PeerAlert(d) => write!(
                f,
                "peer sent TLS alert {:?} ({d})",
                rustls::AlertDescription::from(*d)
            ),
            RecordError::Rustls(e) => write!(f, "TLS: {e}"),
            RecordError::KeyExhausted => f.write_str("TLS key used up (TLS 1.2 cannot renew it)"),
            RecordError::Unsupported => f.write_str("negotiated TLS cipher not supported"),
        }
    }
}

impl std::error::Error for RecordError {}

impl RecordError {
    /// The fatal alert that tells the peer why (RFC 8446 §6.2), when one
    /// is due: none after the peer's own alert, or when the key ran out.
    pub fn alert(&self) -> Option<u8> {
        match self {
            RecordError::BadRecordMac => Some(ALERT_BAD_RECORD_MAC),
            RecordError::Overflow => Some(ALERT_RECORD_OVERFLOW),
            RecordError::Unexpected(_) => Some(ALERT_UNEXPECTED_MESSAGE),
            RecordError::Decode(_) => Some(ALERT_DECODE_ERROR),
            RecordError::Rustls(_) | RecordError::Unsupported => Some(ALERT_INTERNAL_ERROR),
            RecordError::PeerAlert(_) | RecordError::KeyExhausted => None,
        }
    }
}

impl From<RecordError> for io::Error {
    fn from(e: RecordError) -> io::Error {
        io::Error::new(io::ErrorKind::InvalidData, e)
    }
}

impl From<rustls::Error> for RecordError {
    fn from(e: rustls::Error) -> Self {
        RecordError::Rustls(e)
    }
}

/// rustls's side of the connection after the handshake: the key schedule,
/// and (as a client) the session store.
pub enum Kernel {
    Server(KernelConnection<ServerConnectionData>),
    Client(KernelConnection<ClientConnectionData>),
}

impl Kernel {
    fn update_tx(&mut self) -> Result<(u64, ConnectionTrafficSecrets), rustls::Error> {
        match self {
            Kernel::Server(k) => k.update_tx_secret(),
            Kernel::Client(k) => k.update_tx_secret(),
        }
    }

    fn update_rx(&mut self) -> Result<(u64, ConnectionTrafficSecrets), rustls::Error> {
        match self {
            Kernel::Server(k) => k.update_rx_secret(),
            Kernel::Client(k) => k.update_rx_secret(),
        }
    }

    fn suite(&self) -> SupportedCipherSuite {
        match self {
            Kernel::Server(k) => k.negotiated_cipher_suite(),
            Kernel::Client(k) => k.negotiated_cipher_suite(),
        }
    }

    fn version(&self) -> ProtocolVersion {
        match self {
            Kernel::Server(k) => k.protocol_version(),
            Kernel::Client(k) => k.protocol_version(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Version {
    Tls12,
    Tls13,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Cipher {
    AesGcm,
    ChaCha20Poly1305,
}

/// One direction's key, IV and sequence number.
struct Keys {
    key: LessSafeKey,
    iv: [u8; NONCE_LEN],
    seq: u64,
}

impl Keys {
    fn new((seq, secrets): (u64, ConnectionTrafficSecrets)) -> Result<(Keys, Cipher), RecordError> {
        let (alg, cipher, key, iv) = match secrets {
            ConnectionTrafficSecrets::Aes128Gcm { key, iv } => {
                (&aead::AES_128_GCM, Cipher::AesGcm, key, iv)
            }
            ConnectionTrafficSecrets::Aes256Gcm { key, iv } => {
                (&aead::AES_256_GCM, Cipher::AesGcm, key, iv)
            }
            ConnectionTrafficSecrets::Chacha20Poly1305 { key, iv } => {
                (&aead::CHACHA20_POLY1305, Cipher::ChaCha20Poly1305, key, iv)
            }
            _ => return Err(RecordError::Unsupported),
        };
        let key = UnboundKey::new(alg, key.as_ref()).map_err(|_| RecordError::Unsupported)?;
        let iv: [u8; NONCE_LEN] = iv
            .as_ref()
            .try_into()
            .map_err(|_| RecordError::Unsupported)?;
        Ok((
            Keys {
                key: LessSafeKey::new(key),
                iv,
                seq,
            },
            cipher,
        ))
    }

    /// The per-record nonce: the IV XOR the sequence number (RFC 8446
    /// §5.3; RFC 7905 §2; for AES-GCM in TLS 1.2 the same construction
    /// makes the explicit part, as rustls does).
    fn nonce(&self) -> [u8; NONCE_LEN] {
        let mut nonce = self.iv;
        for (n, s) in nonce[NONCE_LEN - 8..]
            .iter_mut()
            .zip(self.seq.to_be_bytes())
        {
            *n ^= s;
        }
        nonce
    }

    /// Moves to the next record; a sequence number never wraps.
    fn advance(&mut self) -> Result<(), RecordError> {
        self.seq = self.seq.checked_add(1).ok_or(RecordError::KeyExhausted)?;
        Ok(())
    }
}

/// TLS 1.2's additional data: sequence number, type, version, length.
fn tls12_aad(seq: u64, typ: u8, len: usize) -> Aad<[u8; 13]> {
    let mut aad = [0; 13];
    aad[..8].copy_from_slice(&seq.to_be_bytes());
    aad[8] = typ;
    aad[9..11].copy_from_slice(&RECORD_VERSION);
    aad[11..].copy_from_slice(&(len as u16).to_be_bytes());
    Aad::from(aad)
}

/// What [`RecordLayer::open`] made of a buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Opened {
    /// Application data, now at the start of the buffer.
    pub plaintext: usize,
    /// Bytes of whole records taken; the rest is the start of a record.
    pub consumed: usize,
}

/// A connection's record protection, both ways (see the module doc).
pub struct RecordLayer {
    version: Version,
    cipher: Cipher,
    tx: Keys,
    rx: Keys,
    kernel: Kernel,
    /// Records the sending key may seal before it must change
    /// (the cipher's confidentiality limit, with a margin).
    tx_limit: u64,
    /// A KeyUpdate goes out before the next record: the peer asked for
    /// one, or the sending key is near its limit.
    update_tx: bool,
    /// The peer sent close_notify: nothing it sends later counts.
    peer_closed: bool,
    /// The start of a post-handshake message split across records.
    hs_partial: Vec<u8>,
}

impl RecordLayer {
    pub fn new(secrets: ExtractedSecrets, kernel: Kernel) -> Result<RecordLayer, RecordError> {
        let version = match kernel.version() {
            ProtocolVersion::TLSv1_3 => Version::Tls13,
            ProtocolVersion::TLSv1_2 => Version::Tls12,
            _ => return Err(RecordError::Unsupported),
        };
        let (tx, cipher) = Keys::new(secrets.tx)?;
        let (rx, _) = Keys::new(secrets.rx)?;
        let limit = match kernel.suite() {
            SupportedCipherSuite::Tls13(s) => s.common.confidentiality_limit,
            SupportedCipherSuite::Tls12(s) => s.common.confidentiality_limit,
        };
        Ok(RecordLayer {
            version,
            cipher,
            tx,
            rx,
            kernel,
            // A margin below the cipher's limit, so that the renewal (or,
            // in TLS 1.2, the end) comes before it.
            tx_limit: limit.saturating_sub(limit / 1024),
            update_tx: false,
            peer_closed: false,
            hs_partial: Vec::new(),
        })
    }

    /// The peer closed its side with close_notify.
    /// A TLS 1.2 session whose sending key has less than an eighth of its
    /// records left: it cannot renew the key and ends at the limit, so a
    /// connection that outlives its clients should be retired first.
    pub fn key_wearing_out(&self) -> bool {
        self.version != Version::Tls13 && self.tx.seq >= self.tx_limit - self.tx_limit / 8
    }

    pub fn peer_closed(&self) -> bool {
        self.peer_closed
    }

    fn max_body(&self) -> usize {
        match self.version {
            Version::Tls13 => TLS13_MAX_CIPHERTEXT,
            Version::Tls12 => TLS12_MAX_CIPHERTEXT,
        }
    }

    /// Bytes a record adds to its plaintext, header included.
    pub fn overhead(&self) -> usize {
        HEADER_LEN
            + TAG_LEN
            + match (self.version, self.cipher) {
                // The inner content type.
                (Version::Tls13, _) => 1,
                (Version::Tls12, Cipher::AesGcm) => EXPLICIT_NONCE_LEN,
                (Version::Tls12, Cipher::ChaCha20Poly1305) => 0,
            }
    }

    /// How long the record starting `buf` is, header included, once its
    /// header is there; an error when it is longer than allowed.
    pub fn record_len(&self, buf: &[u8]) -> Result<Option<usize>, RecordError> {
        let Some(header) = buf.get(..HEADER_LEN) else {
            return Ok(None);
        };
        let len = u16::from_be_bytes([header[3], header[4]]) as usize;
        if len > self.max_body() {
            return Err(RecordError::Overflow);
        }
        Ok(Some(HEADER_LEN + len))
    }

    /// Opens every whole record in `buf`, in place: their application
    /// data ends up, in order, at the start of `buf`. Alerts and
    /// post-handshake messages are acted on. Stops after close_notify.
    pub fn open(&mut self, buf: &mut [u8]) -> Result<Opened, RecordError> {
        let mut read = 0;
        let mut out = 0;
        while !self.peer_closed {
            let Some(len) = self.record_len(&buf[read..])? else {
                break;
            };
            if buf.len() - read < len {
                break;
            }
            let header: [u8; HEADER_LEN] =
                buf[read..read + HEADER_LEN].try_into().expect("five bytes");
            let body = read + HEADER_LEN..read + len;
            read += len;
            if header[1..3] != RECORD_VERSION {
                return Err(RecordError::Decode("record version"));
            }
            let (typ, plain) = self.decrypt(header, &mut buf[body.clone()])?;
            let plain = body.start + plain.start..body.start + plain.end;
            if typ != CONTENT_HANDSHAKE && !self.hs_partial.is_empty() {
                // A split message's records come in a row (RFC 8446 §5.1).
                return Err(RecordError::Unexpected(
                    "record inside a split handshake message",
                ));
            }
            match typ {
                CONTENT_APPLICATION_DATA => {
                    buf.copy_within(plain.clone(), out);
                    out += plain.len();
                }
                CONTENT_ALERT => self.alert(&buf[plain])?,
                CONTENT_HANDSHAKE => self.handshake(&buf[plain])?,
                _ => return Err(RecordError::Unexpected("record type")),
            }
        }
        Ok(Opened {
            plaintext: out,
            consumed: read,
        })
    }

    /// Decrypts one record body in place; returns its (inner) content type
    /// and where in `body` its plaintext is.
    fn decrypt(
        &mut self,
        header: [u8; HEADER_LEN],
        body: &mut [u8],
    ) -> Result<(u8, std::ops::Range<usize>), RecordError> {
        let nonce = self.rx.nonce();
        let (typ, range) = match self.version {
            Version::Tls13 => {
                // Every protected record is outwardly application data;
                // a ChangeCipherSpec is allowed only during the handshake.
                if header[0] != CONTENT_APPLICATION_DATA {
                    return Err(RecordError::Unexpected(
                        if header[0] == CONTENT_CHANGE_CIPHER_SPEC {
                            "change_cipher_spec after the handshake"
                        } else {
                            "unprotected record after the handshake"
                        },
                    ));
                }
                let plain = self
                    .rx
                    .key
                    .open_in_place(Nonce::assume_unique_for_key(nonce), Aad::from(header), body)
                    .map_err(|_| RecordError::BadRecordMac)?;
                // TLSInnerPlaintext: content, type, zero padding (§5.2),
                // at most 2^14 + 1 bytes in all (§5.4).
                if plain.len() > MAX_PLAINTEXT + 1 {
                    return Err(RecordError::Overflow);
                }
                let end = plain
                    .iter()
                    .rposition(|&b| b != 0)
                    .ok_or(RecordError::Unexpected("record without a content type"))?;
                (plain[end], 0..end)
            }
            Version::Tls12 => {
                let typ = header[0];
                let (explicit, nonce) = match self.cipher {
                    Cipher::AesGcm => {
                        let Some(explicit) = body.get(..EXPLICIT_NONCE_LEN) else {
                            return Err(RecordError::BadRecordMac);
                        };
                        let mut n = self.rx.iv;
                        n[4..].copy_from_slice(explicit);
                        (EXPLICIT_NONCE_LEN, n)
                    }
                    Cipher::ChaCha20Poly1305 => (0, nonce),
                };
                let Some(len) = body.len().checked_sub(explicit + TAG_LEN) else {
                    return Err(RecordError::BadRecordMac);
                };
                let aad = tls12_aad(self.rx.seq, typ, len);
                let plain = self
                    .rx
                    .key
                    .open_within(Nonce::assume_unique_for_key(nonce), aad, body, explicit..)
                    .map_err(|_| RecordError::BadRecordMac)?;
                if plain.len() > MAX_PLAINTEXT {
                    return Err(RecordError::Overflow);
                }
                (typ, 0..plain.len())
            }
        };
        self.rx.advance()?;
        Ok((typ, range))
    }

    fn alert(&mut self, alert: &[u8]) -> Result<(), RecordError> {
        let &[level, description] = alert else {
            return Err(RecordError::Decode("alert length"));
        };
        match description {
            ALERT_CLOSE_NOTIFY => {
                self.peer_closed = true;
                Ok(())
            }
            // Informational; TLS 1.3 keeps user_canceled alone as such.
            ALERT_USER_CANCELED => Ok(()),
            _ if level == ALERT_WARNING && self.version == Version::Tls12 => Ok(()),
            d => Err(RecordError::PeerAlert(d)),
        }
    }

    /// Post-handshake messages: a TLS 1.3 KeyUpdate, and (to a client) a
    /// NewSessionTicket. Anything else (renegotiation, post-handshake
    /// authentication, which tollgate never asks for) ends the
    /// connection. A message split across records is joined (rare: a
    /// peer with a small maximum fragment size), in a buffer that exists
    /// only until it is whole.
    fn handshake(&mut self, data: &[u8]) -> Result<(), RecordError> {
        if data.is_empty() {
            return Err(RecordError::Decode("empty handshake record"));
        }
        if self.hs_partial.is_empty() {
            let rest = self.handshake_messages(data)?;
            if !rest.is_empty() {
                self.hs_partial = rest.to_vec();
            }
            return Ok(());
        }
        let mut joined = std::mem::take(&mut self.hs_partial);
        if joined.len() + data.len() > MAX_HANDSHAKE_MESSAGE {
            return Err(RecordError::Decode("post-handshake message too long"));
        }
        joined.extend_from_slice(data);
        let rest = self.handshake_messages(&joined)?.len();
        if rest > 0 {
            joined.drain(..joined.len() - rest);
            self.hs_partial = joined;
        }
        Ok(())
    }

    /// Acts on the whole messages in `messages`; returns the start of an
    /// unfinished one.
    fn handshake_messages<'m>(&mut self, mut messages: &'m [u8]) -> Result<&'m [u8], RecordError> {
        while let [typ, a, b, c, rest @ ..] = messages {
            let len = u32::from_be_bytes([0, *a, *b, *c]) as usize;
            let Some(body) = rest.get(..len) else {
                if len + 4 > MAX_HANDSHAKE_MESSAGE {
                    return Err(RecordError::Decode("post-handshake message too long"));
                }
                break;
            };
            let after = &rest[len..];
            match (self.version, *typ, &self.kernel) {
                (Version::Tls13, HANDSHAKE_KEY_UPDATE, _) => {
                    let requested = match body {
                        [0] => false,
                        [1] => true,
                        _ => return Err(RecordError::Decode("key_update")),
                    };
                    // The next record is under the new key, so nothing
                    // may follow in this one (RFC 8446 §5.1).
                    if !after.is_empty() {
                        return Err(RecordError::Unexpected("data after key_update"));
                    }
                    self.rx = Keys::new(self.kernel.update_rx()?)?.0;
                    self.update_tx |= requested;
                }
                (Version::Tls13, HANDSHAKE_NEW_SESSION_TICKET, Kernel::Client(_)) => {
                    if let Kernel::Client(k) = &mut self.kernel {
                        k.handle_new_session_ticket(body)?;
                    }
                }
                _ => return Err(RecordError::Unexpected("handshake message after handshake")),
            }
            messages = after;
        }
        Ok(messages)
    }

    /// Seals as much of `plaintext` as fits in `out` into records (each
    /// at most [`MAX_PLAINTEXT`]), after a KeyUpdate if one is due.
    /// Returns the plaintext bytes taken and the bytes written; `out`
    /// should have room for at least one record of some plaintext
    /// ([`RecordLayer::overhead`] plus a little).
    pub fn seal(
        &mut self,
        plaintext: &[u8],
        out: &mut [u8],
    ) -> Result<(usize, usize), RecordError> {
        let overhead = self.overhead();
        let mut taken = 0;
        let mut written = 0;
        loop {
            if self.update_tx || self.tx.seq >= self.tx_limit {
                if out.len() - written < KEY_UPDATE_RECORD + overhead {
                    break;
                }
                written += self.seal_key_update(&mut out[written..])?;
            }
            let left = plaintext.len() - taken;
            let room = (out.len() - written).saturating_sub(overhead);
            let n = left.min(MAX_PLAINTEXT).min(room);
            // Nothing to seal, or no room for a record: never an empty one.
            if n == 0 {
                break;
            }
            written += self.seal_record(
                CONTENT_APPLICATION_DATA,
                &plaintext[taken..taken + n],
                &mut out[written..],
            )?;
            taken += n;
            if taken == plaintext.len() {
                break;
            }
        }
        Ok((taken, written))
    }

    /// A close_notify alert, sealed into `out`; returns its length.
    pub fn seal_close_notify(&mut self, out: &mut [u8]) -> Result<usize, RecordError> {
        self.seal_record(CONTENT_ALERT, &[ALERT_WARNING, ALERT_CLOSE_NOTIFY], out)
    }

    /// A fatal alert with this description, sealed into `out`.
    pub fn seal_fatal_alert(
        &mut self,
        description: u8,
        out: &mut [u8],
    ) -> Result<usize, RecordError> {
        self.seal_record(CONTENT_ALERT, &[ALERT_FATAL, description], out)
    }

    /// A KeyUpdate that asks nothing of the peer, under the old key; the
    /// key changes after it (RFC 8446 §4.6.3).
    fn seal_key_update(&mut self, out: &mut [u8]) -> Result<usize, RecordError> {
        if self.version != Version::Tls13 {
            return Err(RecordError::KeyExhausted);
        }
        let n = self.seal_record(CONTENT_HANDSHAKE, &[HANDSHAKE_KEY_UPDATE, 0, 0, 1, 0], out)?;
        self.tx = Keys::new(self.kernel.update_tx()?)?.0;
        self.update_tx = false;
        Ok(n)
    }

    fn seal_record(
        &mut self,
        typ: u8,
        payload: &[u8],
        out: &mut [u8],
    ) -> Result<usize, RecordError> {
        let len = payload.len() + self.overhead();
        let out = &mut out[..len];
        let nonce = self.tx.nonce();
        let (start, body_len) = match self.version {
            Version::Tls13 => (HEADER_LEN, len - HEADER_LEN),
            Version::Tls12 => (
                HEADER_LEN
                    + match self.cipher {
                        Cipher::AesGcm => EXPLICIT_NONCE_LEN,
                        Cipher::ChaCha20Poly1305 => 0,
                    },
                len - HEADER_LEN,
            ),
        };
        let outer = match self.version {
            Version::Tls13 => CONTENT_APPLICATION_DATA,
            Version::Tls12 => typ,
        };
        let header = [
            outer,
            RECORD_VERSION[0],
            RECORD_VERSION[1],
            (body_len >> 8) as u8,
            body_len as u8,
        ];
        out[..HEADER_LEN].copy_from_slice(&header);
        out[start..start + payload.len()].copy_from_slice(payload);
        let mut sealed = payload.len();
        let tag = match self.version {
            Version::Tls13 => {
                out[start + sealed] = typ;
                sealed += 1;
                self.tx.key.seal_in_place_separate_tag(
                    Nonce::assume_unique_for_key(nonce),
                    Aad::from(header),
                    &mut out[start..start + sealed],
                )
            }
            Version::Tls12 => {
                if self.cipher == Cipher::AesGcm {
                    out[HEADER_LEN..start].copy_from_slice(&nonce[4..]);
                }
                self.tx.key.seal_in_place_separate_tag(
                    Nonce::assume_unique_for_key(nonce),
                    tls12_aad(self.tx.seq, typ, payload.len()),
                    &mut out[start..start + sealed],
                )
            }
        }
        .map_err(|_| RecordError::KeyExhausted)?;
        out[start + sealed..].copy_from_slice(tag.as_ref());
        self.tx.advance()?;
        Ok(len)
    }
}

/// The longest post-handshake message taken, header included (rustls's
/// own bound on handshake messages).
const MAX_HANDSHAKE_MESSAGE: usize = 0xffff;

/// A KeyUpdate's payload: type, 3-byte length, one byte.
const KEY_UPDATE_RECORD: usize = 5;

#[cfg(test)]
mod tests;
