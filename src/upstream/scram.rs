//! Sans-IO SCRAM-SHA-256 *client* used by tollgate to log in to the upstream
//! PostgreSQL server.
//!
//! Clients authenticate to tollgate with API tokens; tollgate then logs in to
//! the real database with its **own** configured password. This module
//! implements the client side of SCRAM-SHA-256 (RFC 5802 / RFC 7677) exactly
//! as PostgreSQL uses it, see
//! <https://www.postgresql.org/docs/current/sasl-authentication.html>:
//!
//! * the user name inside SCRAM is ignored by PostgreSQL, so the
//!   client-first-message is `<gs2-header>n=,r=<nonce>`;
//! * the gs2 header never carries an authzid (`n,,`, `y,,` or
//!   `p=tls-server-end-point,,`);
//! * `SCRAM-SHA-256-PLUS` uses the `tls-server-end-point` channel binding.
//!
//! The module never touches a socket: the caller moves bytes between the
//! states ([`ScramClient::start`] → [`AwaitServerFirst`] → [`AwaitServerFinal`])
//! and the wire. Each state consumes `self`, so a step cannot be repeated.
//!
//! # Why a key cache
//!
//! Deriving `SaltedPassword` with PBKDF2-HMAC-SHA256 costs about 1 ms of CPU
//! at PostgreSQL's default 4096 iterations — and tollgate logs in upstream
//! over and over (new pooled connections, reconnects) with the same password
//! against the same salt. [`KeyCache`] (one per shard/thread, no locks) keeps
//! the derived `ClientKey`/`ServerKey` keyed by (keyed hash of the password,
//! salt, iteration count), so PBKDF2 only runs once per distinct verifier.
//!
//! # Hostile servers
//!
//! The server's messages are parsed strictly and bounded in size, and the
//! iteration count is capped at [`MAX_ITERATIONS`] (an unbounded count lets a
//! malicious or spoofed server burn arbitrary CPU on the proxy). The server
//! signature is verified in constant time, so a fake server that does not
//! know the verifier cannot complete the exchange.

#![forbid(unsafe_code)]

use std::collections::HashMap;
use std::fmt;
use std::num::NonZeroU32;

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use ring::rand::SecureRandom as _;
use ring::{digest, hmac, pbkdf2, rand};
use zeroize::{Zeroize, ZeroizeOnDrop, Zeroizing};

/// SASL mechanism name without channel binding.
pub const MECHANISM: &str = "SCRAM-SHA-256";
/// SASL mechanism name with `tls-server-end-point` channel binding.
pub const MECHANISM_PLUS: &str = "SCRAM-SHA-256-PLUS";

/// Number of random bytes in the client nonce (same as libpq). The nonce is
/// sent base64-encoded (24 printable characters).
pub const NONCE_LEN: usize = 18;

/// Upper bound on the PBKDF2 iteration count accepted from the server.
///
/// PostgreSQL's default `scram_iterations` is 4096 (≈4 ms here); a
/// million, 250 times that, costs ≈0.9 s of the shard's thread (measured:
/// 0.92 s per million rounds on the 2-core test machine). The derivation
/// runs on the shard, and a hostile server (or a man in the middle on a
/// non-TLS upstream) can defeat the key cache by changing the salt, so the
/// cap bounds how long one login can stall the shard's other sessions.
/// Without a cap, `i=4294967295` would pin the shard for over an hour.
pub const MAX_ITERATIONS: u32 = 1_000_000;

/// Maximum accepted length of a server-first or server-final message.
/// Real PostgreSQL messages are well under 200 bytes.
pub const MAX_SERVER_MESSAGE_LEN: usize = 1024;

/// Default number of entries kept by [`KeyCache::new`].
pub const DEFAULT_KEY_CACHE_CAPACITY: usize = 256;

/// Maximum number of characters of a server `e=` error kept in
/// [`ScramError::ServerError`].
const MAX_SERVER_ERROR_CHARS: usize = 128;

/// Length of SHA-256 output and of every SCRAM-SHA-256 key.
const KEY_LEN: usize = 32;

const GS2_NO_CB: &str = "n,,";
const GS2_CB_NOT_USED: &str = "y,,";
const GS2_TLS_SERVER_END_POINT: &str = "p=tls-server-end-point,,";

/// Channel-binding choice for the exchange (RFC 5802 §6, RFC 5929 §4).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ChannelBinding {
    /// The client does not support channel binding (plain TCP): gs2 `n,,`.
    NotSupported,
    /// The client supports channel binding but believes the server does not
    /// (the server did not advertise `SCRAM-SHA-256-PLUS`): gs2 `y,,`. A
    /// server that does support it will then reject the login, which detects
    /// a mechanism-list downgrade.
    SupportedButNotUsed,
    /// `tls-server-end-point` binding: the payload is the hash of the
    /// server's TLS certificate (RFC 5929 §4.1, e.g. SHA-256 of the DER cert).
    /// gs2 `p=tls-server-end-point,,`; use with [`MECHANISM_PLUS`].
    TlsServerEndPoint(Vec<u8>),
}

impl ChannelBinding {
    /// SASL mechanism name to put in `SASLInitialResponse`:
    /// [`MECHANISM_PLUS`] for [`ChannelBinding::TlsServerEndPoint`],
    /// [`MECHANISM`] otherwise.
    pub fn mechanism(&self) -> &'static str {
        match self {
            ChannelBinding::TlsServerEndPoint(_) => MECHANISM_PLUS,
            ChannelBinding::NotSupported | ChannelBinding::SupportedButNotUsed => MECHANISM,
        }
    }

    fn gs2_header(&self) -> &'static str {
        match self {
            ChannelBinding::NotSupported => GS2_NO_CB,
            ChannelBinding::SupportedButNotUsed => GS2_CB_NOT_USED,
            ChannelBinding::TlsServerEndPoint(_) => GS2_TLS_SERVER_END_POINT,
        }
    }

    /// `c=` attribute value: base64(gs2-header || cbind-data).
    fn c_attribute(&self) -> String {
        let mut input = self.gs2_header().as_bytes().to_vec();
        if let ChannelBinding::TlsServerEndPoint(data) = self {
            input.extend_from_slice(data);
        }
        BASE64.encode(input)
    }
}

/// Errors of the SCRAM exchange.
///
/// The `Display` text never contains the password or any derived key; the
/// only server-controlled text is the (sanitised, truncated) `e=` value of
/// [`ScramError::ServerError`] and single ASCII attribute letters.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ScramError {
    /// The system random number generator failed.
    Rng,
    /// `ChannelBinding::TlsServerEndPoint` was given empty binding data.
    EmptyChannelBindingData,
    /// A server message exceeded [`MAX_SERVER_MESSAGE_LEN`].
    MessageTooLong { len: usize, max: usize },
    /// A server message is syntactically invalid.
    Malformed(&'static str),
    /// A mandatory attribute (`r`, `s`, `i` or `v`/`e`) is missing.
    MissingAttribute(char),
    /// The server sent an attribute that is not allowed at this position.
    UnexpectedAttribute(char),
    /// The server sent a mandatory extension (`m=`), which we do not support.
    UnsupportedExtension,
    /// The server nonce contains non-printable characters or a comma.
    InvalidNonce,
    /// The server nonce does not start with our client nonce.
    NonceMismatch,
    /// The server nonce equals the client nonce (no server part added).
    NonceNotExtended,
    /// The salt is empty or not valid base64.
    InvalidSalt,
    /// The iteration count is not a positive decimal integer.
    InvalidIterationCount,
    /// The iteration count is below 1.
    IterationCountTooLow,
    /// The iteration count exceeds [`MAX_ITERATIONS`].
    IterationCountTooHigh { max: u32 },
    /// The `v=` server signature is not valid base64 of the right length.
    InvalidServerSignature,
    /// The server signature does not match: the server does not know the
    /// password verifier (possible impostor).
    ServerSignatureMismatch,
    /// The server reported an `e=` error (sanitised and truncated).
    ServerError(String),
}

impl fmt::Display for ScramError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ScramError::Rng => f.write_str("SCRAM: system random number generator failed"),
            ScramError::EmptyChannelBindingData => {
                f.write_str("SCRAM: tls-server-end-point channel binding data is empty")
            }
            ScramError::MessageTooLong { len, max } => {
                write!(f, "SCRAM: server message too long ({len} > {max} bytes)")
            }
            ScramError::Malformed(what) => write!(f, "SCRAM: malformed server message: {what}"),
            ScramError::MissingAttribute(a) => {
                write!(f, "SCRAM: server message lacks the '{a}' attribute")
            }
            ScramError::UnexpectedAttribute(a) => {
                write!(f, "SCRAM: unexpected attribute '{a}' in server message")
            }
            ScramError::UnsupportedExtension => {
                f.write_str("SCRAM: server requires an unsupported mandatory extension (m=)")
            }
            ScramError::InvalidNonce => f.write_str("SCRAM: server nonce is not printable"),
            ScramError::NonceMismatch => {
                f.write_str("SCRAM: server nonce does not start with the client nonce")
            }
            ScramError::NonceNotExtended => {
                f.write_str("SCRAM: server nonce does not extend the client nonce")
            }
            ScramError::InvalidSalt => f.write_str("SCRAM: salt is empty or not valid base64"),
            ScramError::InvalidIterationCount => {
                f.write_str("SCRAM: iteration count is not a positive integer")
            }
            ScramError::IterationCountTooLow => f.write_str("SCRAM: iteration count must be >= 1"),
            ScramError::IterationCountTooHigh { max } => {
                write!(f, "SCRAM: iteration count exceeds the limit of {max}")
            }
            ScramError::InvalidServerSignature => {
                f.write_str("SCRAM: server signature is not valid base64 of 32 bytes")
            }
            ScramError::ServerSignatureMismatch => f.write_str(
                "SCRAM: server signature mismatch (server does not know the password verifier)",
            ),
            ScramError::ServerError(e) => write!(f, "SCRAM: server reported error: {e}"),
        }
    }
}

impl std::error::Error for ScramError {}

/// A 32-byte secret that is zeroized on drop and never printed.
#[derive(Clone, Zeroize, ZeroizeOnDrop)]
struct SecretKey([u8; KEY_LEN]);

impl SecretKey {
    fn from_tag(tag: &hmac::Tag) -> Self {
        let mut key = [0u8; KEY_LEN];
        // HMAC-SHA256 tags are always KEY_LEN bytes.
        key.copy_from_slice(tag.as_ref());
        SecretKey(key)
    }
}

impl fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

/// `ClientKey` and `ServerKey` derived from the salted password. Both fields
/// zeroize themselves on drop.
#[derive(Clone)]
struct DerivedKeys {
    client_key: SecretKey,
    server_key: SecretKey,
}

impl fmt::Debug for DerivedKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

/// PBKDF2 + the two HMACs of RFC 5802 §3. The intermediate `SaltedPassword`
/// is zeroized. (ring's internal HMAC state and `Tag` values are not
/// zeroized; that is a limitation of the library.)
fn derive_keys(password: &[u8], salt: &[u8], iterations: NonZeroU32) -> DerivedKeys {
    let mut salted = Zeroizing::new([0u8; KEY_LEN]);
    pbkdf2::derive(
        pbkdf2::PBKDF2_HMAC_SHA256,
        iterations,
        salt,
        password,
        &mut salted[..],
    );
    let key = hmac::Key::new(hmac::HMAC_SHA256, &salted[..]);
    DerivedKeys {
        client_key: SecretKey::from_tag(&hmac::sign(&key, b"Client Key")),
        server_key: SecretKey::from_tag(&hmac::sign(&key, b"Server Key")),
    }
}

#[derive(Clone, PartialEq, Eq, Hash)]
struct CacheKey {
    /// HMAC-SHA256 of the password under a per-cache random key.
    password_fingerprint: [u8; KEY_LEN],
    salt: Vec<u8>,
    iterations: u32,
}

struct CacheEntry {
    /// Boxed so that rehashing the map moves a pointer, not the key bytes
    /// (which would leave un-zeroized copies behind).
    keys: Box<DerivedKeys>,
    last_used: u64,
}

/// Cache of derived SCRAM keys, so repeated logins skip PBKDF2.
///
/// Not thread-safe by design (no locks): keep one per shard/thread and pass
/// it to [`AwaitServerFirst::handle_server_first`].
///
/// Keyed by (HMAC-SHA256 of the password under a random per-cache key, salt,
/// iterations) — the password itself is never stored, and the fingerprint is
/// not an unsalted hash that precomputed tables could reverse. Values are the
/// derived `ClientKey`/`ServerKey` (not the salted password), zeroized when
/// evicted or when the cache is dropped. Bounded: when full, the least
/// recently used entry is evicted.
pub struct KeyCache {
    /// `None` if the RNG failed at construction: the cache is then disabled
    /// (every lookup derives) rather than keyed predictably.
    fingerprint_key: Option<hmac::Key>,
    entries: HashMap<CacheKey, CacheEntry>,
    capacity: usize,
    tick: u64,
    derivations: u64,
}

impl KeyCache {
    /// A cache holding up to [`DEFAULT_KEY_CACHE_CAPACITY`] entries.
    pub fn new() -> Self {
        Self::with_capacity(DEFAULT_KEY_CACHE_CAPACITY)
    }

    /// A cache holding up to `capacity` entries (0 disables caching).
    pub fn with_capacity(capacity: usize) -> Self {
        let fingerprint_key =
            match hmac::Key::generate(hmac::HMAC_SHA256, &rand::SystemRandom::new()) {
                Ok(k) => Some(k),
                Err(_) => {
                    tracing::warn!("SCRAM key cache disabled: system RNG failed");
                    None
                }
            };
        KeyCache {
            fingerprint_key,
            entries: HashMap::new(),
            capacity,
            tick: 0,
            derivations: 0,
        }
    }

    /// Number of cached entries.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether the cache holds no entries.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Maximum number of entries.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Number of PBKDF2 derivations performed through this cache (misses).
    pub fn derivations(&self) -> u64 {
        self.derivations
    }

    /// Drops (and zeroizes) every entry.
    pub fn clear(&mut self) {
        self.entries.clear();
    }

    fn get_or_derive(
        &mut self,
        password: &[u8],
        salt: &[u8],
        iterations: NonZeroU32,
    ) -> DerivedKeys {
        let fingerprint_key = match (&self.fingerprint_key, self.capacity) {
            (Some(k), cap) if cap > 0 => k,
            _ => {
                self.derivations += 1;
                return derive_keys(password, salt, iterations);
            }
        };
        let mut fingerprint = [0u8; KEY_LEN];
        fingerprint.copy_from_slice(hmac::sign(fingerprint_key, password).as_ref());
        let key = CacheKey {
            password_fingerprint: fingerprint,
            salt: salt.to_vec(),
            iterations: iterations.get(),
        };
        self.tick += 1;
        if let Some(entry) = self.entries.get_mut(&key) {
            entry.last_used = self.tick;
            return (*entry.keys).clone();
        }

        self.derivations += 1;
        tracing::debug!(
            iterations = iterations.get(),
            "SCRAM key cache miss: deriving keys"
        );
        let keys = derive_keys(password, salt, iterations);
        while self.entries.len() >= self.capacity {
            // O(capacity), only on a miss, which just paid for PBKDF2 anyway.
            let oldest = self
                .entries
                .iter()
                .min_by_key(|(_, e)| e.last_used)
                .map(|(k, _)| k.clone());
            match oldest {
                // Removing drops the Box<DerivedKeys>, which zeroizes it.
                Some(k) => {
                    self.entries.remove(&k);
                }
                None => break,
            }
        }
        self.entries.insert(
            key,
            CacheEntry {
                keys: Box::new(keys.clone()),
                last_used: self.tick,
            },
        );
        keys
    }
}

impl Default for KeyCache {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Debug for KeyCache {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyCache")
            .field("len", &self.entries.len())
            .field("capacity", &self.capacity)
            .field("derivations", &self.derivations)
            .finish_non_exhaustive()
    }
}

/// SASLprep the password if it is valid UTF-8 and SASLprep accepts it;
/// otherwise use the raw bytes (libpq does the same, and so does the server
/// when it builds the verifier).
fn prepare_password(password: &[u8]) -> Zeroizing<Vec<u8>> {
    if let Ok(s) = std::str::from_utf8(password) {
        if let Ok(prepped) = stringprep::saslprep(s) {
            // Moving an owned String into `Zeroizing` avoids an extra copy.
            return Zeroizing::new(prepped.into_owned().into_bytes());
        }
    }
    Zeroizing::new(password.to_vec())
}

/// The client-first-message to send in `SASLInitialResponse`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClientFirst {
    /// SASL mechanism name (`SCRAM-SHA-256` or `SCRAM-SHA-256-PLUS`).
    pub mechanism: &'static str,
    /// The client-first-message bytes (gs2 header + `n=,r=<nonce>`).
    pub message: Vec<u8>,
}

/// Entry point of the SCRAM client state machine.
pub struct ScramClient;

impl ScramClient {
    /// Starts an exchange. Returns the client-first-message to send and the
    /// state that waits for the server-first-message.
    ///
    /// `nonce` is `None` in production (18 bytes from `SystemRandom`); tests
    /// may pass fixed bytes. The nonce is sent base64-encoded.
    pub fn start(
        password: &[u8],
        channel_binding: ChannelBinding,
        nonce: Option<[u8; NONCE_LEN]>,
    ) -> Result<(ClientFirst, AwaitServerFirst), ScramError> {
        let raw = match nonce {
            Some(n) => n,
            None => {
                let mut n = [0u8; NONCE_LEN];
                rand::SystemRandom::new()
                    .fill(&mut n)
                    .map_err(|_| ScramError::Rng)?;
                n
            }
        };
        Self::begin(password, channel_binding, "", BASE64.encode(raw))
    }

    /// Shared constructor; `username` is empty for PostgreSQL (it ignores
    /// it), non-empty only for the RFC test vector.
    fn begin(
        password: &[u8],
        channel_binding: ChannelBinding,
        username: &str,
        client_nonce: String,
    ) -> Result<(ClientFirst, AwaitServerFirst), ScramError> {
        if matches!(&channel_binding, ChannelBinding::TlsServerEndPoint(d) if d.is_empty()) {
            return Err(ScramError::EmptyChannelBindingData);
        }
        debug_assert!(is_printable_nonce(&client_nonce));
        // saslname escaping (RFC 5802 §5.1).
        let username = username.replace('=', "=3D").replace(',', "=2C");
        let client_first_bare = format!("n={username},r={client_nonce}");
        let mut message = channel_binding.gs2_header().as_bytes().to_vec();
        message.extend_from_slice(client_first_bare.as_bytes());
        let first = ClientFirst {
            mechanism: channel_binding.mechanism(),
            message,
        };
        let state = AwaitServerFirst {
            password: prepare_password(password),
            channel_binding,
            client_nonce,
            client_first_bare,
        };
        Ok((first, state))
    }
}

/// Waiting for the server-first-message (`AuthenticationSASLContinue`).
pub struct AwaitServerFirst {
    password: Zeroizing<Vec<u8>>,
    channel_binding: ChannelBinding,
    client_nonce: String,
    client_first_bare: String,
}

impl fmt::Debug for AwaitServerFirst {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AwaitServerFirst")
            .field("password", &"<redacted>")
            .field("channel_binding", &self.channel_binding)
            .field("client_nonce", &self.client_nonce)
            .finish()
    }
}

/// Parsed server-first-message.
#[derive(Debug, PartialEq, Eq)]
struct ServerFirst<'a> {
    nonce: &'a str,
    salt: Vec<u8>,
    iterations: NonZeroU32,
}

/// RFC 5802 `printable`: %x21-2B / %x2D-7E (no comma).
fn is_printable_nonce(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| (0x21..=0x7e).contains(&b) && b != b',')
}

/// Checks size and UTF-8, then splits into `(attribute letter, value)`.
fn split_attributes(msg: &[u8]) -> Result<Vec<(char, &str)>, ScramError> {
    if msg.len() > MAX_SERVER_MESSAGE_LEN {
        return Err(ScramError::MessageTooLong {
            len: msg.len(),
            max: MAX_SERVER_MESSAGE_LEN,
        });
    }
    let text = std::str::from_utf8(msg).map_err(|_| ScramError::Malformed("not valid UTF-8"))?;
    if text.is_empty() {
        return Err(ScramError::Malformed("empty message"));
    }
    text.split(',')
        .map(|part| {
            let b = part.as_bytes();
            if b.len() >= 2 && b[0].is_ascii_alphabetic() && b[1] == b'=' {
                Ok((char::from(b[0]), &part[2..]))
            } else {
                Err(ScramError::Malformed(
                    "attribute is not of the form x=value",
                ))
            }
        })
        .collect()
}

/// RFC 5802 `posit-number` (no sign, no leading zero), bounded.
fn parse_iterations(s: &str) -> Result<NonZeroU32, ScramError> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return Err(ScramError::InvalidIterationCount);
    }
    let digits = s.trim_start_matches('0');
    if digits.is_empty() {
        return Err(ScramError::IterationCountTooLow);
    }
    if digits.len() != s.len() {
        return Err(ScramError::InvalidIterationCount); // leading zero
    }
    // More than 10 digits cannot fit a u32 and is certainly above the cap.
    let value: u64 = if digits.len() > 10 {
        u64::MAX
    } else {
        digits
            .parse()
            .map_err(|_| ScramError::InvalidIterationCount)?
    };
    if value > u64::from(MAX_ITERATIONS) {
        return Err(ScramError::IterationCountTooHigh {
            max: MAX_ITERATIONS,
        });
    }
    u32::try_from(value)
        .ok()
        .and_then(NonZeroU32::new)
        .ok_or(ScramError::IterationCountTooLow)
}

/// Strictly parses `r=<nonce>,s=<salt>,i=<iterations>` and validates the
/// nonce against ours. Extensions (leading `m=` or trailing attributes) are
/// rejected; PostgreSQL never sends them.
fn parse_server_first<'a>(
    msg: &'a [u8],
    client_nonce: &str,
) -> Result<ServerFirst<'a>, ScramError> {
    let attrs = split_attributes(msg)?;
    if attrs.first().map(|(a, _)| *a) == Some('m') {
        return Err(ScramError::UnsupportedExtension);
    }
    const ORDER: [char; 3] = ['r', 's', 'i'];
    for (idx, expected) in ORDER.iter().enumerate() {
        match attrs.get(idx) {
            Some((a, _)) if a == expected => {}
            Some((a, _)) if attrs.iter().any(|(x, _)| x == expected) || !ORDER.contains(a) => {
                return Err(ScramError::UnexpectedAttribute(*a));
            }
            _ => return Err(ScramError::MissingAttribute(*expected)),
        }
    }
    if let Some((a, _)) = attrs.get(ORDER.len()) {
        return Err(ScramError::UnexpectedAttribute(*a));
    }
    let (nonce, salt_b64, iter_str) = (attrs[0].1, attrs[1].1, attrs[2].1);

    if !is_printable_nonce(nonce) {
        return Err(ScramError::InvalidNonce);
    }
    if !nonce.starts_with(client_nonce) {
        return Err(ScramError::NonceMismatch);
    }
    if nonce.len() == client_nonce.len() {
        return Err(ScramError::NonceNotExtended);
    }
    let salt = BASE64
        .decode(salt_b64)
        .map_err(|_| ScramError::InvalidSalt)?;
    if salt.is_empty() {
        return Err(ScramError::InvalidSalt);
    }
    let iterations = parse_iterations(iter_str)?;
    Ok(ServerFirst {
        nonce,
        salt,
        iterations,
    })
}

impl AwaitServerFirst {
    /// SASL mechanism name for this exchange.
    pub fn mechanism(&self) -> &'static str {
        self.channel_binding.mechanism()
    }

    /// Processes the server-first-message and returns the
    /// client-final-message (to send in `SASLResponse`) and the state that
    /// waits for the server-final-message.
    ///
    /// The message is fully validated before any key derivation; keys come
    /// from `cache` when possible.
    pub fn handle_server_first(
        self,
        server_first: &[u8],
        cache: &mut KeyCache,
    ) -> Result<(Vec<u8>, AwaitServerFinal), ScramError> {
        let parsed = parse_server_first(server_first, &self.client_nonce)?;
        let keys = cache.get_or_derive(&self.password, &parsed.salt, parsed.iterations);

        let without_proof = format!(
            "c={},r={}",
            self.channel_binding.c_attribute(),
            parsed.nonce
        );
        // AuthMessage = client-first-bare "," server-first "," client-final-without-proof
        let mut auth_message = Vec::with_capacity(
            self.client_first_bare.len() + server_first.len() + without_proof.len() + 2,
        );
        auth_message.extend_from_slice(self.client_first_bare.as_bytes());
        auth_message.push(b',');
        auth_message.extend_from_slice(server_first);
        auth_message.push(b',');
        auth_message.extend_from_slice(without_proof.as_bytes());

        // ClientProof = ClientKey XOR HMAC(H(ClientKey), AuthMessage)
        let stored_key = digest::digest(&digest::SHA256, &keys.client_key.0);
        let client_signature = hmac::sign(
            &hmac::Key::new(hmac::HMAC_SHA256, stored_key.as_ref()),
            &auth_message,
        );
        let mut proof = Zeroizing::new([0u8; KEY_LEN]);
        for ((p, k), s) in proof
            .iter_mut()
            .zip(keys.client_key.0.iter())
            .zip(client_signature.as_ref())
        {
            *p = k ^ s;
        }

        let mut client_final = without_proof.into_bytes();
        client_final.extend_from_slice(b",p=");
        client_final.extend_from_slice(BASE64.encode(&proof[..]).as_bytes());

        Ok((
            client_final,
            AwaitServerFinal {
                server_key: keys.server_key,
                auth_message,
            },
        ))
    }
}

/// Waiting for the server-final-message (`AuthenticationSASLFinal`).
pub struct AwaitServerFinal {
    server_key: SecretKey,
    auth_message: Vec<u8>,
}

impl fmt::Debug for AwaitServerFinal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AwaitServerFinal")
            .field("server_key", &self.server_key)
            .finish_non_exhaustive()
    }
}

/// Keeps printable ASCII, replaces anything else, truncates.
fn sanitize_server_error(e: &str) -> String {
    e.chars()
        .take(MAX_SERVER_ERROR_CHARS)
        .map(|c| {
            if c.is_ascii_graphic() || c == ' ' {
                c
            } else {
                '?'
            }
        })
        .collect()
}

impl AwaitServerFinal {
    /// Verifies the server-final-message: `v=<base64 ServerSignature>` must
    /// match (compared in constant time); `e=<error>` yields
    /// [`ScramError::ServerError`]. `Ok(())` means the server proved it
    /// knows the verifier; the caller then still expects
    /// `AuthenticationOk`.
    pub fn handle_server_final(self, server_final: &[u8]) -> Result<(), ScramError> {
        let attrs = split_attributes(server_final)?;
        let signature_b64 = match attrs.first() {
            Some(('e', err)) => return Err(ScramError::ServerError(sanitize_server_error(err))),
            Some(('v', sig)) => *sig,
            Some(('m', _)) => return Err(ScramError::UnsupportedExtension),
            Some((a, _)) => return Err(ScramError::UnexpectedAttribute(*a)),
            None => return Err(ScramError::MissingAttribute('v')),
        };
        if let Some((a, _)) = attrs.get(1) {
            return Err(ScramError::UnexpectedAttribute(*a));
        }
        let signature = BASE64
            .decode(signature_b64)
            .map_err(|_| ScramError::InvalidServerSignature)?;
        if signature.len() != KEY_LEN {
            return Err(ScramError::InvalidServerSignature);
        }
        // ServerSignature = HMAC(ServerKey, AuthMessage), checked in constant time.
        let key = hmac::Key::new(hmac::HMAC_SHA256, &self.server_key.0);
        hmac::verify(&key, &self.auth_message, &signature)
            .map_err(|_| ScramError::ServerSignatureMismatch)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const RFC_PASSWORD: &[u8] = b"pencil";
    const RFC_CLIENT_NONCE: &str = "rOprNGfwEbeRWgbNEkqO";
    const RFC_SERVER_FIRST: &str =
        "r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096";
    const RFC_CLIENT_FINAL: &str = "c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ=";
    const RFC_SERVER_FINAL: &str = "v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4=";

    fn rfc_client() -> (ClientFirst, AwaitServerFirst) {
        ScramClient::begin(
            RFC_PASSWORD,
            ChannelBinding::NotSupported,
            "user",
            RFC_CLIENT_NONCE.to_string(),
        )
        .unwrap()
    }

    /// Independent server-side computation (RFC 5802 §3) for round trips.
    fn server_signature(password: &[u8], salt: &[u8], iterations: u32, auth: &[u8]) -> String {
        let mut salted = [0u8; 32];
        pbkdf2::derive(
            pbkdf2::PBKDF2_HMAC_SHA256,
            NonZeroU32::new(iterations).unwrap(),
            salt,
            password,
            &mut salted,
        );
        let server_key = hmac::sign(&hmac::Key::new(hmac::HMAC_SHA256, &salted), b"Server Key");
        let sig = hmac::sign(
            &hmac::Key::new(hmac::HMAC_SHA256, server_key.as_ref()),
            auth,
        );
        format!("v={}", BASE64.encode(sig.as_ref()))
    }

    #[test]
    fn rfc7677_test_vector() {
        let (first, state) = rfc_client();
        assert_eq!(first.mechanism, MECHANISM);
        assert_eq!(first.message, b"n,,n=user,r=rOprNGfwEbeRWgbNEkqO");
        let mut cache = KeyCache::new();
        let (client_final, state) = state
            .handle_server_first(RFC_SERVER_FIRST.as_bytes(), &mut cache)
            .unwrap();
        assert_eq!(
            std::str::from_utf8(&client_final).unwrap(),
            RFC_CLIENT_FINAL
        );
        state
            .handle_server_final(RFC_SERVER_FINAL.as_bytes())
            .unwrap();
    }

    #[test]
    fn postgres_client_first_shape() {
        let (first, state) = ScramClient::start(b"pw", ChannelBinding::NotSupported, None).unwrap();
        let msg = std::str::from_utf8(&first.message).unwrap();
        let nonce = msg.strip_prefix("n,,n=,r=").expect("gs2 + empty username");
        assert_eq!(nonce.len(), 24); // base64 of 18 bytes
        assert!(is_printable_nonce(nonce));
        assert_eq!(BASE64.decode(nonce).unwrap().len(), NONCE_LEN);
        assert_eq!(state.mechanism(), MECHANISM);

        let (first, _) =
            ScramClient::start(b"pw", ChannelBinding::SupportedButNotUsed, Some([7; 18])).unwrap();
        assert_eq!(first.message, b"y,,n=,r=BwcHBwcHBwcHBwcHBwcHBwcH");
        // Two random nonces differ.
        let (a, _) = ScramClient::start(b"pw", ChannelBinding::NotSupported, None).unwrap();
        let (b, _) = ScramClient::start(b"pw", ChannelBinding::NotSupported, None).unwrap();
        assert_ne!(a.message, b.message);
    }

    #[test]
    fn cache_hit_avoids_rederivation() {
        let mut cache = KeyCache::new();
        assert!(cache.is_empty());
        for _ in 0..3 {
            let (_, state) = rfc_client();
            let (client_final, state) = state
                .handle_server_first(RFC_SERVER_FIRST.as_bytes(), &mut cache)
                .unwrap();
            assert_eq!(client_final, RFC_CLIENT_FINAL.as_bytes());
            state
                .handle_server_final(RFC_SERVER_FINAL.as_bytes())
                .unwrap();
        }
        assert_eq!(cache.derivations(), 1);
        assert_eq!(cache.len(), 1);

        // A different salt or iteration count or password is a different entry.
        let other_salt = RFC_SERVER_FIRST.replace("s=W22ZaJ0SNY7soEsUEjb6gQ==", "s=QUJDRA==");
        let (_, state) = rfc_client();
        state
            .handle_server_first(other_salt.as_bytes(), &mut cache)
            .unwrap();
        let other_iter = RFC_SERVER_FIRST.replace("i=4096", "i=4095");
        let (_, state) = rfc_client();
        state
            .handle_server_first(other_iter.as_bytes(), &mut cache)
            .unwrap();
        let (_, state) = ScramClient::begin(
            b"other",
            ChannelBinding::NotSupported,
            "user",
            RFC_CLIENT_NONCE.into(),
        )
        .unwrap();
        state
            .handle_server_first(RFC_SERVER_FIRST.as_bytes(), &mut cache)
            .unwrap();
        assert_eq!(cache.derivations(), 4);
        assert_eq!(cache.len(), 4);
    }

    #[test]
    fn cache_is_bounded_and_evicts_lru() {
        let mut cache = KeyCache::with_capacity(2);
        let it = NonZeroU32::new(1).unwrap();
        cache.get_or_derive(b"a", b"salt", it);
        cache.get_or_derive(b"b", b"salt", it);
        cache.get_or_derive(b"a", b"salt", it); // touch "a"
        cache.get_or_derive(b"c", b"salt", it); // evicts "b"
        assert_eq!(cache.len(), 2);
        assert_eq!(cache.derivations(), 3);
        cache.get_or_derive(b"a", b"salt", it);
        assert_eq!(cache.derivations(), 3);
        cache.get_or_derive(b"b", b"salt", it);
        assert_eq!(cache.derivations(), 4);
        assert_eq!(cache.len(), 2);

        let mut disabled = KeyCache::with_capacity(0);
        disabled.get_or_derive(b"a", b"salt", it);
        disabled.get_or_derive(b"a", b"salt", it);
        assert_eq!(disabled.derivations(), 2);
        assert!(disabled.is_empty());
    }

    #[test]
    fn cache_never_holds_the_password() {
        let mut cache = KeyCache::new();
        let password = b"correct horse battery staple";
        cache.get_or_derive(password, b"salt", NonZeroU32::new(1).unwrap());
        for key in cache.entries.keys() {
            assert_ne!(
                &key.password_fingerprint[..],
                digest::digest(&digest::SHA256, password).as_ref()
            );
            assert!(!key
                .password_fingerprint
                .windows(4)
                .any(|w| w == &password[..4]));
        }
        let dbg = format!("{cache:?}");
        assert!(!dbg.contains("horse"));
    }

    fn first_err(server_first: &[u8]) -> ScramError {
        let (_, state) = rfc_client();
        let mut cache = KeyCache::new();
        let err = state
            .handle_server_first(server_first, &mut cache)
            .unwrap_err();
        assert_eq!(cache.derivations(), 0, "must reject before deriving");
        err
    }

    #[test]
    fn hostile_server_first() {
        let nonce = "rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0";
        let salt = "W22ZaJ0SNY7soEsUEjb6gQ==";
        let cases: Vec<(String, ScramError)> = vec![
            (
                format!("r=XXprNGfwEbeRWgbNEkqO%hvYD,s={salt},i=4096"),
                ScramError::NonceMismatch,
            ),
            (
                format!("r=rOprNGfwEbeRWgbNEkq,s={salt},i=4096"),
                ScramError::NonceMismatch,
            ),
            (
                format!("r={RFC_CLIENT_NONCE},s={salt},i=4096"),
                ScramError::NonceNotExtended,
            ),
            (
                format!("r={RFC_CLIENT_NONCE}\u{7f}x,s={salt},i=4096"),
                ScramError::InvalidNonce,
            ),
            (
                format!("r={nonce},s={salt},i=0"),
                ScramError::IterationCountTooLow,
            ),
            (
                format!("r={nonce},s={salt},i=-1"),
                ScramError::InvalidIterationCount,
            ),
            (
                format!("r={nonce},s={salt},i=+4096"),
                ScramError::InvalidIterationCount,
            ),
            (
                format!("r={nonce},s={salt},i=04096"),
                ScramError::InvalidIterationCount,
            ),
            (
                format!("r={nonce},s={salt},i="),
                ScramError::InvalidIterationCount,
            ),
            (
                format!("r={nonce},s={salt},i=4096 "),
                ScramError::InvalidIterationCount,
            ),
            (
                format!("r={nonce},s={salt},i=99999999999"),
                ScramError::IterationCountTooHigh {
                    max: MAX_ITERATIONS,
                },
            ),
            (
                format!("r={nonce},s={salt},i=4294967296"),
                ScramError::IterationCountTooHigh {
                    max: MAX_ITERATIONS,
                },
            ),
            (
                format!("r={nonce},s={salt},i={}", u64::from(MAX_ITERATIONS) + 1),
                ScramError::IterationCountTooHigh {
                    max: MAX_ITERATIONS,
                },
            ),
            (
                format!("r={nonce},s={salt},i={}", "9".repeat(500)),
                ScramError::IterationCountTooHigh {
                    max: MAX_ITERATIONS,
                },
            ),
            (
                format!("r={nonce},i=4096"),
                ScramError::MissingAttribute('s'),
            ),
            (
                format!("r={nonce},s={salt}"),
                ScramError::MissingAttribute('i'),
            ),
            (
                format!("s={salt},i=4096"),
                ScramError::MissingAttribute('r'),
            ),
            (
                format!("r={nonce},i=4096,s={salt}"),
                ScramError::UnexpectedAttribute('i'),
            ),
            (
                format!("r={nonce},r={nonce},s={salt},i=4096"),
                ScramError::UnexpectedAttribute('r'),
            ),
            (
                format!("r={nonce},x=1,i=4096"),
                ScramError::UnexpectedAttribute('x'),
            ),
            (
                format!("r={nonce},s=not*base64!,i=4096"),
                ScramError::InvalidSalt,
            ),
            (format!("r={nonce},s=,i=4096"), ScramError::InvalidSalt),
            (
                format!("m=ext,r={nonce},s={salt},i=4096"),
                ScramError::UnsupportedExtension,
            ),
            (
                format!("r={nonce},s={salt},i=4096,x=ext"),
                ScramError::UnexpectedAttribute('x'),
            ),
            (
                format!("r={nonce},s={salt},i=4096,"),
                ScramError::Malformed("attribute is not of the form x=value"),
            ),
            (
                format!("r={nonce}{},s={salt},i=4096", "a".repeat(2000)),
                ScramError::MessageTooLong {
                    len: 2000 + RFC_SERVER_FIRST.len(),
                    max: MAX_SERVER_MESSAGE_LEN,
                },
            ),
            (String::new(), ScramError::Malformed("empty message")),
            (
                "garbage".into(),
                ScramError::Malformed("attribute is not of the form x=value"),
            ),
        ];
        for (input, expected) in cases {
            assert_eq!(first_err(input.as_bytes()), expected, "input: {input:?}");
        }
        // Not UTF-8.
        let mut bad = RFC_SERVER_FIRST.as_bytes().to_vec();
        bad[5] = 0xff;
        assert_eq!(first_err(&bad), ScramError::Malformed("not valid UTF-8"));
    }

    #[test]
    fn iteration_bounds_parse() {
        assert_eq!(parse_iterations("1").unwrap().get(), 1);
        assert_eq!(
            parse_iterations(&MAX_ITERATIONS.to_string()).unwrap().get(),
            MAX_ITERATIONS
        );
        assert_eq!(
            parse_iterations("000"),
            Err(ScramError::IterationCountTooLow)
        );
    }

    #[test]
    fn wrong_server_signature_rejected() {
        let (_, state) = rfc_client();
        let (_, state) = state
            .handle_server_first(RFC_SERVER_FIRST.as_bytes(), &mut KeyCache::new())
            .unwrap();
        // Flip one bit of the correct signature.
        let mut sig = BASE64.decode(&RFC_SERVER_FINAL[2..]).unwrap();
        sig[0] ^= 1;
        let forged = format!("v={}", BASE64.encode(&sig));
        assert_eq!(
            state.handle_server_final(forged.as_bytes()),
            Err(ScramError::ServerSignatureMismatch)
        );

        for (input, expected) in [
            ("v=AAAA", ScramError::InvalidServerSignature),
            ("v=not base64", ScramError::InvalidServerSignature),
            ("v=", ScramError::InvalidServerSignature),
            ("x=1", ScramError::UnexpectedAttribute('x')),
            ("m=1", ScramError::UnsupportedExtension),
            ("", ScramError::Malformed("empty message")),
        ] {
            let (_, state) = rfc_client();
            let (_, state) = state
                .handle_server_first(RFC_SERVER_FIRST.as_bytes(), &mut KeyCache::new())
                .unwrap();
            assert_eq!(state.handle_server_final(input.as_bytes()), Err(expected));
        }
        let (_, state) = rfc_client();
        let (_, state) = state
            .handle_server_first(RFC_SERVER_FIRST.as_bytes(), &mut KeyCache::new())
            .unwrap();
        let trailing = format!("{RFC_SERVER_FINAL},x=1");
        assert_eq!(
            state.handle_server_final(trailing.as_bytes()),
            Err(ScramError::UnexpectedAttribute('x'))
        );
    }

    #[test]
    fn server_error_attribute() {
        let (_, state) = rfc_client();
        let (_, state) = state
            .handle_server_first(RFC_SERVER_FIRST.as_bytes(), &mut KeyCache::new())
            .unwrap();
        assert_eq!(
            state.handle_server_final(b"e=invalid-proof"),
            Err(ScramError::ServerError("invalid-proof".into()))
        );

        let (_, state) = rfc_client();
        let (_, state) = state
            .handle_server_first(RFC_SERVER_FIRST.as_bytes(), &mut KeyCache::new())
            .unwrap();
        let long = format!("e={}\u{1b}[31m", "x".repeat(900));
        match state.handle_server_final(long.as_bytes()) {
            Err(ScramError::ServerError(e)) => {
                assert_eq!(e.chars().count(), MAX_SERVER_ERROR_CHARS);
                assert!(e.chars().all(|c| c.is_ascii_graphic() || c == ' '));
            }
            other => panic!("unexpected {other:?}"),
        }
        let short_ctrl = ScramError::ServerError(sanitize_server_error("bad\u{1b}[0m\nx"));
        assert_eq!(short_ctrl, ScramError::ServerError("bad?[0m?x".into()));
    }

    #[test]
    fn channel_binding_plus() {
        let cbind = vec![0xde, 0xad, 0xbe, 0xef, 0x00, 0x01];
        let cb = ChannelBinding::TlsServerEndPoint(cbind.clone());
        assert_eq!(cb.mechanism(), MECHANISM_PLUS);
        assert_eq!(ChannelBinding::NotSupported.mechanism(), MECHANISM);
        assert_eq!(ChannelBinding::SupportedButNotUsed.mechanism(), MECHANISM);

        let (first, state) = ScramClient::start(b"pencil", cb, Some([42; NONCE_LEN])).unwrap();
        assert_eq!(first.mechanism, MECHANISM_PLUS);
        let client_nonce = BASE64.encode([42u8; NONCE_LEN]);
        assert_eq!(
            first.message,
            format!("p=tls-server-end-point,,n=,r={client_nonce}").as_bytes()
        );

        let server_first = format!("r={client_nonce}SERVERPART,s=QUJDRA==,i=16");
        let (client_final, state) = state
            .handle_server_first(server_first.as_bytes(), &mut KeyCache::new())
            .unwrap();
        let client_final = String::from_utf8(client_final).unwrap();
        let mut expected_c = b"p=tls-server-end-point,,".to_vec();
        expected_c.extend_from_slice(&cbind);
        let prefix = format!(
            "c={},r={client_nonce}SERVERPART,p=",
            BASE64.encode(&expected_c)
        );
        assert!(client_final.starts_with(&prefix), "{client_final}");

        // Full round trip against an independent server computation.
        let without_proof = &client_final[..client_final.rfind(",p=").unwrap()];
        let auth = format!("n=,r={client_nonce},{server_first},{without_proof}");
        let v = server_signature(b"pencil", b"ABCD", 16, auth.as_bytes());
        state.handle_server_final(v.as_bytes()).unwrap();

        assert_eq!(
            ScramClient::start(b"x", ChannelBinding::TlsServerEndPoint(vec![]), None).unwrap_err(),
            ScramError::EmptyChannelBindingData
        );
        // "y,," binding encodes as c=eSws.
        let (_, state) =
            ScramClient::start(b"x", ChannelBinding::SupportedButNotUsed, Some([1; 18])).unwrap();
        let sf = format!("r={}Z,s=QUJDRA==,i=1", BASE64.encode([1u8; 18]));
        let (cf, _) = state
            .handle_server_first(sf.as_bytes(), &mut KeyCache::new())
            .unwrap();
        assert!(cf.starts_with(b"c=eSws,r="));
    }

    #[test]
    fn saslprep_and_raw_passwords() {
        // U+00A0 (no-break space) maps to a plain space under SASLprep.
        assert_eq!(&prepare_password("a\u{a0}b".as_bytes())[..], b"a b");
        // Soft hyphen is mapped to nothing.
        assert_eq!(&prepare_password("pen\u{ad}cil".as_bytes())[..], b"pencil");
        // Invalid UTF-8: raw bytes.
        assert_eq!(&prepare_password(b"\xffpw")[..], b"\xffpw");
        // Prohibited (control character): raw bytes.
        assert_eq!(&prepare_password(b"pw\x07")[..], b"pw\x07");

        // A password that SASLprep maps yields the same proof as its mapping.
        let (_, a) = ScramClient::begin(
            "pen\u{ad}cil".as_bytes(),
            ChannelBinding::NotSupported,
            "user",
            RFC_CLIENT_NONCE.into(),
        )
        .unwrap();
        let (cf, _) = a
            .handle_server_first(RFC_SERVER_FIRST.as_bytes(), &mut KeyCache::new())
            .unwrap();
        assert_eq!(cf, RFC_CLIENT_FINAL.as_bytes());
    }

    #[test]
    fn secrets_are_redacted() {
        let (_, state) = rfc_client();
        let dbg = format!("{state:?}");
        assert!(!dbg.contains("pencil"), "{dbg}");
        let keys = derive_keys(b"pencil", b"salt", NonZeroU32::new(1).unwrap());
        assert_eq!(format!("{keys:?}"), "<redacted>");
        assert_eq!(format!("{:?}", keys.client_key), "<redacted>");
        let (_, state) = state
            .handle_server_first(RFC_SERVER_FIRST.as_bytes(), &mut KeyCache::new())
            .unwrap();
        let dbg = format!("{state:?}");
        assert!(dbg.contains("<redacted>"), "{dbg}");

        let mut key = SecretKey([0xaa; KEY_LEN]);
        key.zeroize();
        assert_eq!(key.0, [0; KEY_LEN]);
    }

    /// Cheap deterministic PRNG (xorshift64*) for the fuzz-ish test.
    fn next(state: &mut u64) -> u64 {
        *state ^= *state >> 12;
        *state ^= *state << 25;
        *state ^= *state >> 27;
        state.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    #[test]
    fn truncations_and_mutations_never_panic() {
        // Low iteration count so that accidental successes stay cheap.
        let valid = format!("r={RFC_CLIENT_NONCE}abc,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=7");
        let bytes = valid.as_bytes();
        let mut cache = KeyCache::new();
        for len in 0..=bytes.len() {
            let (_, state) = rfc_client();
            let _ = state.handle_server_first(&bytes[..len], &mut cache);
        }
        let mut rng = 0x9e37_79b9_7f4a_7c15u64;
        for _ in 0..2000 {
            let mut input = bytes.to_vec();
            let len = (next(&mut rng) as usize) % (input.len() + 1);
            input.truncate(len);
            for _ in 0..(next(&mut rng) % 4) {
                if input.is_empty() {
                    break;
                }
                let pos = (next(&mut rng) as usize) % input.len();
                input[pos] = match next(&mut rng) % 4 {
                    0 => b',',
                    1 => b'=',
                    2 => b'0' + (next(&mut rng) % 10) as u8,
                    _ => next(&mut rng) as u8,
                };
            }
            let (_, state) = rfc_client();
            if let Ok((_, fin)) = state.handle_server_first(&input, &mut cache) {
                let cut = (next(&mut rng) as usize) % (RFC_SERVER_FINAL.len() + 1);
                let _ = fin.handle_server_final(&RFC_SERVER_FINAL.as_bytes()[..cut]);
            }
        }
        assert!(cache.len() <= cache.capacity());
    }
}
