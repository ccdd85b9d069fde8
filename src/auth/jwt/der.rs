//! Just enough DER (X.690 §10) to take a SubjectPublicKeyInfo (RFC 5280
//! §4.1.2.7) apart into what ring verifies with: RSA modulus and exponent
//! (RFC 8017 A.1.1), an EC point (RFC 5480), an Ed25519 key (RFC 8410).
//! Definite lengths in minimal form only, single-byte tags, no trailing bytes.
//!
//! It exists so that PEM public keys need no ASN.1 dependency: ring takes
//! the raw key parts, and this reader is the only code that looks inside a
//! key file's DER. Everything it returns borrows from the input.

use std::fmt;

const INTEGER: u8 = 0x02;
const BIT_STRING: u8 = 0x03;
const NULL: u8 = 0x05;
const OID: u8 = 0x06;
const SEQUENCE: u8 = 0x30;

/// 1.2.840.113549.1.1.1
const OID_RSA_ENCRYPTION: &[u8] = &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x01];
/// 1.2.840.10045.2.1
const OID_EC_PUBLIC_KEY: &[u8] = &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01];
/// 1.2.840.10045.3.1.7 (prime256v1)
const OID_P256: &[u8] = &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07];
/// 1.3.132.0.34 (secp384r1)
const OID_P384: &[u8] = &[0x2b, 0x81, 0x04, 0x00, 0x22];
/// 1.3.101.112
const OID_ED25519: &[u8] = &[0x2b, 0x65, 0x70];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum DerError {
    Truncated,
    UnexpectedTag,
    BadLength,
    TrailingData,
    BadValue,
    UnsupportedKey,
}

impl fmt::Display for DerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DerError::Truncated => "truncated",
            DerError::UnexpectedTag => "unexpected element",
            DerError::BadLength => "bad length encoding",
            DerError::TrailingData => "trailing data",
            DerError::BadValue => "bad value",
            DerError::UnsupportedKey => "unsupported key type (use RSA, EC P-256/P-384 or Ed25519)",
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Curve {
    P256,
    P384,
}

impl Curve {
    pub(super) fn name(self) -> &'static str {
        match self {
            Curve::P256 => "P-256",
            Curve::P384 => "P-384",
        }
    }
}

#[derive(Debug, PartialEq, Eq)]
pub(super) enum SpkiKey<'a> {
    /// Positive integers, without the sign byte.
    Rsa {
        n: &'a [u8],
        e: &'a [u8],
    },
    Ec {
        curve: Curve,
        point: &'a [u8],
    },
    Ed25519(&'a [u8]),
}

pub(super) struct Reader<'a> {
    rest: &'a [u8],
}

impl<'a> Reader<'a> {
    pub(super) fn new(input: &'a [u8]) -> Self {
        Reader { rest: input }
    }

    /// The contents of the next element, which must have tag `tag`.
    pub(super) fn read(&mut self, tag: u8) -> Result<&'a [u8], DerError> {
        let [t, first, rest @ ..] = self.rest else {
            return Err(DerError::Truncated);
        };
        if *t != tag {
            return Err(DerError::UnexpectedTag);
        }
        let (len, rest) = match *first {
            n @ 0..=0x7f => (usize::from(n), rest),
            // Long form, minimal: one byte for 128..=255, two for
            // 256..=65535. Nothing in a public key is bigger; 0x80 (the
            // indefinite form) is BER, not DER.
            0x81 => match rest {
                [n, rest @ ..] if *n >= 0x80 => (usize::from(*n), rest),
                [_, ..] => return Err(DerError::BadLength),
                [] => return Err(DerError::Truncated),
            },
            0x82 => match rest {
                [hi, lo, rest @ ..] if *hi != 0 => {
                    ((usize::from(*hi) << 8) | usize::from(*lo), rest)
                }
                [_, _, ..] => return Err(DerError::BadLength),
                _ => return Err(DerError::Truncated),
            },
            _ => return Err(DerError::BadLength),
        };
        if rest.len() < len {
            return Err(DerError::Truncated);
        }
        let (value, rest) = rest.split_at(len);
        self.rest = rest;
        Ok(value)
    }

    pub(super) fn peek_tag(&self) -> Option<u8> {
        self.rest.first().copied()
    }

    pub(super) fn finish(self) -> Result<(), DerError> {
        if self.rest.is_empty() {
            Ok(())
        } else {
            Err(DerError::TrailingData)
        }
    }
}

/// The contents of a BIT STRING that holds whole bytes.
fn bit_string_bytes(value: &[u8]) -> Result<&[u8], DerError> {
    match value {
        [0, bytes @ ..] => Ok(bytes),
        _ => Err(DerError::BadValue),
    }
}

/// A positive INTEGER in minimal two's complement, without its sign byte.
pub(super) fn positive_integer(value: &[u8]) -> Result<&[u8], DerError> {
    match value {
        [] => Err(DerError::BadValue),
        [b, ..] if b & 0x80 != 0 => Err(DerError::BadValue),
        [0] => Err(DerError::BadValue),
        [0, next, ..] if next & 0x80 == 0 => Err(DerError::BadValue),
        [0, rest @ ..] => Ok(rest),
        _ => Ok(value),
    }
}

pub(super) fn parse_spki(input: &[u8]) -> Result<SpkiKey<'_>, DerError> {
    let mut outer = Reader::new(input);
    let spki = outer.read(SEQUENCE)?;
    outer.finish()?;
    let mut spki = Reader::new(spki);
    let algorithm = spki.read(SEQUENCE)?;
    let public_key = bit_string_bytes(spki.read(BIT_STRING)?)?;
    spki.finish()?;

    let mut algorithm = Reader::new(algorithm);
    let oid = algorithm.read(OID)?;
    match oid {
        OID_RSA_ENCRYPTION => {
            // RFC 3279 §2.3.1 says NULL parameters; some encoders omit them.
            if algorithm.peek_tag().is_some() && !algorithm.read(NULL)?.is_empty() {
                return Err(DerError::BadValue);
            }
            algorithm.finish()?;
            let mut outer = Reader::new(public_key);
            let mut rsa = Reader::new(outer.read(SEQUENCE)?);
            outer.finish()?;
            let n = positive_integer(rsa.read(INTEGER)?)?;
            let e = positive_integer(rsa.read(INTEGER)?)?;
            rsa.finish()?;
            Ok(SpkiKey::Rsa { n, e })
        }
        OID_EC_PUBLIC_KEY => {
            let curve = match algorithm.read(OID)? {
                OID_P256 => Curve::P256,
                OID_P384 => Curve::P384,
                _ => return Err(DerError::UnsupportedKey),
            };
            algorithm.finish()?;
            Ok(SpkiKey::Ec {
                curve,
                point: public_key,
            })
        }
        OID_ED25519 => {
            // RFC 8410 §3: the parameters MUST be absent.
            algorithm.finish()?;
            Ok(SpkiKey::Ed25519(public_key))
        }
        _ => Err(DerError::UnsupportedKey),
    }
}

#[cfg(test)]
mod tests {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::SubjectPublicKeyInfoDer;

    use crate::auth::jwt::der;
    use crate::auth::jwt::test_support::*;

    #[test]
    fn der_reader_accepts_only_minimal_definite_lengths() {
        use der::{DerError, Reader};
        let read = |bytes: &[u8]| Reader::new(bytes).read(0x04).map(<[u8]>::len);
        assert_eq!(read(&[0x04, 0x02, 1, 2]), Ok(2));
        let mut long = vec![0x04, 0x81, 0x80];
        long.extend([0; 0x80]);
        assert_eq!(read(&long), Ok(0x80));
        let mut longer = vec![0x04, 0x82, 0x01, 0x00];
        longer.extend([0; 0x100]);
        assert_eq!(read(&longer), Ok(0x100));
        assert_eq!(read(&[0x04, 0x81, 0x10]), Err(DerError::BadLength));
        assert_eq!(read(&[0x04, 0x82, 0x00, 0x90]), Err(DerError::BadLength));
        assert_eq!(read(&[0x04, 0x80, 0x00, 0x00]), Err(DerError::BadLength));
        assert_eq!(read(&[0x04, 0x83, 0, 0, 1, 0]), Err(DerError::BadLength));
        assert_eq!(read(&[0x04, 0x03, 1, 2]), Err(DerError::Truncated));
        assert_eq!(read(&[0x04, 0x81]), Err(DerError::Truncated));
        assert_eq!(read(&[0x04]), Err(DerError::Truncated));
        assert_eq!(read(&[0x05, 0x00]), Err(DerError::UnexpectedTag));
        let mut r = Reader::new(&[0x04, 0x00, 0x05]);
        assert_eq!(r.read(0x04), Ok(&[][..]));
        assert_eq!(r.finish(), Err(DerError::TrailingData));

        assert_eq!(der::positive_integer(&[0x01, 0x00]), Ok(&[0x01, 0x00][..]));
        assert_eq!(der::positive_integer(&[0x00, 0x80]), Ok(&[0x80][..]));
        assert_eq!(
            der::positive_integer(&[0x00, 0x7f]),
            Err(DerError::BadValue)
        );
        assert_eq!(der::positive_integer(&[0x80]), Err(DerError::BadValue));
        assert_eq!(der::positive_integer(&[0x00]), Err(DerError::BadValue));
        assert_eq!(der::positive_integer(&[]), Err(DerError::BadValue));
    }

    #[test]
    fn spki_parsing_agrees_with_openssl_and_survives_truncation() {
        let rsa = SubjectPublicKeyInfoDer::from_pem_slice(RSA_TEST_PUB_PEM.as_bytes()).unwrap();
        let der::SpkiKey::Rsa { n, e } = der::parse_spki(rsa.as_ref()).unwrap() else {
            panic!("not RSA");
        };
        assert_eq!(hex::encode_upper(n), RSA_TEST_MODULUS_HEX);
        assert_eq!(e, [0x01, 0x00, 0x01]);

        let point = [4u8; 65];
        let p256 = spki_der(P256_SPKI_PREFIX, &point);
        assert_eq!(
            der::parse_spki(&p256),
            Ok(der::SpkiKey::Ec {
                curve: der::Curve::P256,
                point: &point[..]
            })
        );
        let p384 = spki_der(P384_SPKI_PREFIX, &[4u8; 97]);
        assert!(matches!(
            der::parse_spki(&p384),
            Ok(der::SpkiKey::Ec {
                curve: der::Curve::P384,
                ..
            })
        ));
        let ed = spki_der(ED25519_SPKI_PREFIX, &[7u8; 32]);
        assert_eq!(
            der::parse_spki(&ed),
            Ok(der::SpkiKey::Ed25519(&[7u8; 32][..]))
        );

        for input in [rsa.as_ref(), &p256, &p384, &ed] {
            for end in 0..input.len() {
                assert!(der::parse_spki(&input[..end]).is_err(), "prefix {end}");
            }
            let mut extra = input.to_vec();
            extra.push(0);
            assert_eq!(der::parse_spki(&extra), Err(der::DerError::TrailingData));
        }
        // P-521 (1.3.132.0.35) is not ours to verify.
        let mut p521 = spki_der(P384_SPKI_PREFIX, &[4u8; 97]);
        p521[19] = 0x23;
        assert_eq!(der::parse_spki(&p521), Err(der::DerError::UnsupportedKey));
    }
}
