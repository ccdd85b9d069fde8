//! The opaque API token format.
//!
//! `tg_<id>_<secret><checksum>`:
//! - `tg_` — a fixed prefix, so secret scanners can spot a leaked token;
//! - `<id>` — 12 characters of `[a-z0-9]`, public, what logs and the store name;
//! - `<secret>` — 32 random bytes (256 bits) as 64 lowercase hex digits;
//! - `<checksum>` — CRC-32 of everything before it, 8 hex digits, so a
//!   mistyped or truncated token is rejected before any lookup.
//!
//! The store keeps only SHA-256 of the secret bytes.
#![forbid(unsafe_code)]

use ring::rand::{SecureRandom, SystemRandom};

use crate::secret::Secret;

pub const PREFIX: &str = "tg_";
pub const ID_LEN: usize = 12;
pub const SECRET_BYTES: usize = 32;
const SECRET_HEX_LEN: usize = SECRET_BYTES * 2;
const CHECKSUM_HEX_LEN: usize = 8;
/// Total length of a token string.
pub const TOKEN_LEN: usize = PREFIX.len() + ID_LEN + 1 + SECRET_HEX_LEN + CHECKSUM_HEX_LEN;

const ID_ALPHABET: &[u8; 36] = b"abcdefghijklmnopqrstuvwxyz0123456789";

/// A token as presented by a client: a public id and the secret bytes.
#[derive(Debug)]
pub struct ParsedToken<'a> {
    pub id: &'a str,
    pub secret: Secret,
}

/// Why a string is not a well-formed token. Never shown to clients.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenFormatError {
    Length,
    Prefix,
    Id,
    Encoding,
    Checksum,
}

/// Parses a token string without looking anything up.
pub fn parse(token: &[u8]) -> Result<ParsedToken<'_>, TokenFormatError> {
    if token.len() != TOKEN_LEN {
        return Err(TokenFormatError::Length);
    }
    if !token.starts_with(PREFIX.as_bytes()) {
        return Err(TokenFormatError::Prefix);
    }
    let id_end = PREFIX.len() + ID_LEN;
    let id = &token[PREFIX.len()..id_end];
    if !is_valid_id(id) || token[id_end] != b'_' {
        return Err(TokenFormatError::Id);
    }
    let secret_end = id_end + 1 + SECRET_HEX_LEN;
    let mut checksum = [0u8; 4];
    hex::decode_to_slice(&token[secret_end..], &mut checksum)
        .map_err(|_| TokenFormatError::Encoding)?;
    if crc32fast::hash(&token[..secret_end]) != u32::from_be_bytes(checksum) {
        return Err(TokenFormatError::Checksum);
    }
    let mut secret = vec![0u8; SECRET_BYTES];
    hex::decode_to_slice(&token[id_end + 1..secret_end], &mut secret)
        .map_err(|_| TokenFormatError::Encoding)?;
    // is_valid_id checked the id is ASCII.
    let id = std::str::from_utf8(id).map_err(|_| TokenFormatError::Id)?;
    Ok(ParsedToken {
        id,
        secret: Secret::new(secret),
    })
}

/// Whether `id` has the shape of a token id.
pub fn is_valid_id(id: &[u8]) -> bool {
    id.len() == ID_LEN && id.iter().all(|b| ID_ALPHABET.contains(b))
}

/// A freshly generated token: the full string to hand out once, and the
/// parts the store keeps.
pub struct NewToken {
    pub id: String,
    pub token: Secret,
    pub secret_sha256: [u8; 32],
}

/// Generates a token with a new random id and secret.
pub fn generate() -> NewToken {
    let rng = SystemRandom::new();
    let mut id_bytes = [0u8; ID_LEN];
    rng.fill(&mut id_bytes).expect("system RNG failed");
    // 256 is a multiple of 4, not of 36: reject-sample to keep ids uniform.
    let id: String = id_bytes
        .iter()
        .map(|&b| {
            let mut b = b;
            while b >= 252 {
                let mut one = [0u8; 1];
                rng.fill(&mut one).expect("system RNG failed");
                b = one[0];
            }
            ID_ALPHABET[(b % 36) as usize] as char
        })
        .collect();
    generate_with_id(&id, &rng)
}

/// Generates a new secret for an existing id (rotation keeps the id).
pub fn generate_with_id(id: &str, rng: &SystemRandom) -> NewToken {
    assert!(is_valid_id(id.as_bytes()), "invalid token id");
    let mut secret = [0u8; SECRET_BYTES];
    rng.fill(&mut secret).expect("system RNG failed");
    let mut s = String::with_capacity(TOKEN_LEN);
    s.push_str(PREFIX);
    s.push_str(id);
    s.push('_');
    s.push_str(&hex::encode(secret));
    let crc = crc32fast::hash(s.as_bytes());
    s.push_str(&hex::encode(crc.to_be_bytes()));
    let secret_sha256 = sha256(&secret);
    zeroize::Zeroize::zeroize(&mut secret);
    NewToken {
        id: id.to_owned(),
        token: Secret::from(s),
        secret_sha256,
    }
}

pub fn sha256(bytes: &[u8]) -> [u8; 32] {
    let d = ring::digest::digest(&ring::digest::SHA256, bytes);
    d.as_ref().try_into().expect("SHA-256 is 32 bytes")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_tokens_parse_and_hash() {
        let t = generate();
        let s = t.token.expose();
        assert_eq!(s.len(), TOKEN_LEN);
        assert!(s.starts_with(b"tg_"));
        let p = parse(s).unwrap();
        assert_eq!(p.id, t.id);
        assert_eq!(sha256(p.secret.expose()), t.secret_sha256);
    }

    #[test]
    fn ids_and_secrets_differ() {
        let a = generate();
        let b = generate();
        assert_ne!(a.id, b.id);
        assert_ne!(a.secret_sha256, b.secret_sha256);
    }

    #[test]
    fn any_single_typo_is_caught_by_the_checksum_or_shape() {
        let t = generate();
        let s = t.token.expose().to_vec();
        for i in 0..s.len() {
            for replacement in [b'0', b'a', b'f', b'z', b'_'] {
                if s[i] == replacement {
                    continue;
                }
                let mut m = s.clone();
                m[i] = replacement;
                assert!(parse(&m).is_err(), "typo at {i} accepted");
            }
        }
    }

    #[test]
    fn rejects_wrong_shapes() {
        let t = generate();
        let s = t.token.expose();
        assert_eq!(parse(&s[1..]).unwrap_err(), TokenFormatError::Length);
        assert_eq!(parse(b"").unwrap_err(), TokenFormatError::Length);
        let mut m = s.to_vec();
        m[0] = b'x';
        assert_eq!(parse(&m).unwrap_err(), TokenFormatError::Prefix);
        let mut m = s.to_vec();
        m[5] = b'A';
        assert_eq!(parse(&m).unwrap_err(), TokenFormatError::Id);
        // Non-ASCII bytes of the right length.
        let m = vec![0xffu8; TOKEN_LEN];
        assert!(parse(&m).is_err());
    }
}
