//! Fixtures shared by the unit tests of the `jwt` files: a test key of each
//! kind, key files written to a temporary folder, a verifier configured with
//! all of them, and helpers that sign tokens with any algorithm.
//!
//! The key files are built from hand-written SubjectPublicKeyInfo headers
//! (and an RSA key made with openssl), not by the code under test.

use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use ring::hmac;
use ring::rand::SystemRandom;
use ring::signature::{self, EcdsaKeyPair, Ed25519KeyPair, KeyPair, RsaKeyPair};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::PrivatePkcs8KeyDer;
use serde::Deserialize;
use serde_json::{json, Value};

use super::{JwtAlg, JwtConfigError, JwtConfigRaw, JwtRejection, JwtVerifier, VerifiedJwt};

/// A throwaway 2048-bit key for these tests only, made with
/// `openssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:2048`
/// (ring cannot generate RSA keys).
pub(super) const RSA_TEST_KEY_PEM: &str = "-----BEGIN PRIVATE KEY-----
MIIEvQIBADANBgkqhkiG9w0BAQEFAASCBKcwggSjAgEAAoIBAQCpKAuMbOKwlSnt
Yy4BB3JyHDTrUt7EP3YIKEvOZqyPVJlY+cOhXXYKHBbspKSJLp3uHNneMQMVqNDC
x0vQUlXsMOH4O1jEC+5zTTH+SERNhGZHm4+ZvVmssq0B6SOv3baAdzad8+HeZEKm
cEpFs7e0YzxAaU3LCFkK5uAA4SX03lweiJvZH50eAsDSpgyhdfsmGanpz+FO61Pe
TZZwaiYC3wYMEqmarsLwagoKtzGWJGATP7bEp3WwjCrrhOlMPjTkL+j7dbrXClAy
eG93I8G4k03QCRDcD0pxGrqDZLn5CjwA5oLVVgsiktaXBwfxliMOU4kXJPewMpPk
kY4+s24pAgMBAAECggEACPTwCPClCjZDwOhHrHyb9eiCHCnIVjo0AkI7+AMIxRLK
MeNmapoby3Tpo9XN895DijL94vLTwnxXXXuXC0H+Kbem53F2WvR0x6cr7AEgmL2C
JZgvljOSrCnOg7ONal0CMl2IR1HSwRIBqMrOVqV+/IQP/IB27YwUxuvVqvDrr8JW
StkHa1Bsk+dqbfIoia6CeToRY9ovnCS1QV+SwPVfmtj330uPO8o77QRVUtfBrjZj
qRCR/ixy3zloZU57pvevYuFaVubCG1f7xDVuV1jXf0NTTOSP2lwoFjLWjTic4s9g
HpkCgzH0a74QHNfZ88walvqvvXjiql0IXnUMqLwReQKBgQDh1oJdlQoDnrcU8a2n
jvjw5oM59p/U6pjyjkPrYVMqW67UgxAB2g103x5xQSgcPxGAa57wePeEz2PPx9Eq
HmF2E6Uk8AasZdlla+OcTOW1cTQwhp+zfsX8zvvtqqG/PGt9ZfSecLEaJnm+yrp8
CpgnQxI4yVeoD8S2qjqa6GeJ3QKBgQC/v5KAGBp5/B4kWIkP8HB2eoQPPb2bUyV8
OJQnINWz5NGwJRRSTJCnTOurJLwbYSBI7ixx2JIlZ4yKmIEB2Qlv7FxleadeQW33
onrqP1C2HjhUlk3atU66ukk8wQUFkxqvp/sLRJrvzVpBnwfLSSpweFPjUbPfzq6C
BbKBQLnevQKBgHjxYMVvIHrJz7BGsUHvnj+coyAyhGwI6rnTGGqAp4IisWEbg0IK
nXQ+XNY4F5vw5pWIjQipL50PV5uZndlZhcYvRRyf8mL29FKNUcqNn+LoahOmtPXy
aWM3EdG4tIBugf4Y0MTdAutHOaHEfdQZ9FvqXmLM6MWXFDjitxnoZjJ9AoGAIXTg
r/8Ep6Io9DiKecB/Lv0Di9E/AxoH4VvR5d3hy8iyGaTuncmEN9zBBhSbyb8xref4
00hxf5tIt2oSoGrpLaE1IfOPE3AhKuMrxTGU+KHfPEsZfH7EJOqaGsKnCKj5MAsE
T5wB2LOg+vAvoPW8NPGZ2YEI/JUId+FcmxbbF5UCgYEAhnDEomdJg8ionkvbIwP4
8K55Uwv0gifTjmrwRAo/GRRTPK59+0oRFKNswGDcMeya30c4bPt3X+8+dLmso0EG
UGd3T8r66PsVazPeK1VeMh1tk3reHXAZF2kt1USwydH+mFxvXWScteftV9SoxJnR
YqTWLKOlN8sH32E2gkNl3es=
-----END PRIVATE KEY-----
";

/// `openssl pkey -in key.pem -pubout` of the key above.
pub(super) const RSA_TEST_PUB_PEM: &str = "-----BEGIN PUBLIC KEY-----
MIIBIjANBgkqhkiG9w0BAQEFAAOCAQ8AMIIBCgKCAQEAqSgLjGzisJUp7WMuAQdy
chw061LexD92CChLzmasj1SZWPnDoV12ChwW7KSkiS6d7hzZ3jEDFajQwsdL0FJV
7DDh+DtYxAvuc00x/khETYRmR5uPmb1ZrLKtAekjr922gHc2nfPh3mRCpnBKRbO3
tGM8QGlNywhZCubgAOEl9N5cHoib2R+dHgLA0qYMoXX7Jhmp6c/hTutT3k2WcGom
At8GDBKpmq7C8GoKCrcxliRgEz+2xKd1sIwq64TpTD405C/o+3W61wpQMnhvdyPB
uJNN0AkQ3A9KcRq6g2S5+Qo8AOaC1VYLIpLWlwcH8ZYjDlOJFyT3sDKT5JGOPrNu
KQIDAQAB
-----END PUBLIC KEY-----
";

/// `openssl rsa -pubin -modulus` of the key above: a second opinion on
/// what the DER reader must find.
pub(super) const RSA_TEST_MODULUS_HEX: &str = "A9280B8C6CE2B09529ED632E010772721C34EB52DEC43F7608284BCE66AC8F549958F9C3A15D760A1C16ECA4A4892E9DEE1CD9DE310315A8D0C2C74BD05255EC30E1F83B58C40BEE734D31FE48444D8466479B8F99BD59ACB2AD01E923AFDDB68077369DF3E1DE6442A6704A45B3B7B4633C40694DCB08590AE6E000E125F4DE5C1E889BD91F9D1E02C0D2A60CA175FB2619A9E9CFE14EEB53DE4D96706A2602DF060C12A99AAEC2F06A0A0AB731962460133FB6C4A775B08C2AEB84E94C3E34E42FE8FB75BAD70A5032786F7723C1B8934DD00910DC0F4A711ABA8364B9F90A3C00E682D5560B2292D6970707F196230E53891724F7B03293E4918E3EB36E29";

/// 40 bytes: enough for HS256, too short for HS384 (48) and HS512 (64).
pub(super) const HS256_SECRET: &str = "hs256-test-secret-0123456789abcdefghijkl";
pub(super) const HS512_SECRET: &str =
    "hs512-test-secret-0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJ";

// SubjectPublicKeyInfo headers, written out by hand from RFC 5480 and
// RFC 8410 so that the key files do not come from the code under test.
pub(super) const P256_SPKI_PREFIX: &str = "3059301306072a8648ce3d020106082a8648ce3d030107034200";
pub(super) const P384_SPKI_PREFIX: &str = "3076301006072a8648ce3d020106052b81040022036200";
pub(super) const ED25519_SPKI_PREFIX: &str = "302a300506032b6570032100";

pub(super) const ISSUER: &str = "https://auth.example.com";

pub(super) fn b64(bytes: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(bytes)
}

pub(super) fn spki_der(prefix_hex: &str, key: &[u8]) -> Vec<u8> {
    let mut der = hex::decode(prefix_hex).unwrap();
    der.extend_from_slice(key);
    der
}

pub(super) fn pem(der: &[u8]) -> String {
    let body = base64::engine::general_purpose::STANDARD.encode(der);
    let mut pem = String::from("-----BEGIN PUBLIC KEY-----\n");
    for line in body.as_bytes().chunks(64) {
        pem.push_str(std::str::from_utf8(line).unwrap());
        pem.push('\n');
    }
    pem.push_str("-----END PUBLIC KEY-----\n");
    pem
}

pub(super) fn secs(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).unwrap().as_secs()
}

/// A compact JWS over the JSON text of `header` and `claims`.
pub(super) fn jws_text(header: &str, claims: &str, sign: impl FnOnce(&[u8]) -> Vec<u8>) -> String {
    let input = format!("{}.{}", b64(header.as_bytes()), b64(claims.as_bytes()));
    let sig = sign(input.as_bytes());
    format!("{input}.{}", b64(&sig))
}

pub(super) fn hmac_sign(alg: hmac::Algorithm, secret: &[u8], msg: &[u8]) -> Vec<u8> {
    hmac::sign(&hmac::Key::new(alg, secret), msg)
        .as_ref()
        .to_vec()
}

pub(super) fn base_config(top: &str) -> String {
    format!(
        r#"
[jwt]
issuer = "{ISSUER}"
audience = "tollgate"
{top}

[[jwt.hmac]]
kid = "hs256"
secret = "{HS256_SECRET}"

[[jwt.hmac]]
kid = "hs512"
alg = "HS512"
secret_file = "hs512.key"

[[jwt.public_key]]
kid = "es256"
alg = "ES256"
file = "es256.pub.pem"

[[jwt.public_key]]
kid = "es384"
alg = "ES384"
file = "es384.pub.pem"

[[jwt.public_key]]
kid = "ed"
alg = "EdDSA"
file = "ed25519.pub.pem"

[[jwt.public_key]]
kid = "rs"
alg = "RS256"
file = "rsa.pub.pem"

[[jwt.public_key]]
kid = "ps"
alg = "PS256"
file = "rsa.pub.pem"
"#
    )
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct ConfigFile {
    pub(super) jwt: JwtConfigRaw,
}

pub(super) struct Fx {
    pub(super) dir: tempfile::TempDir,
    pub(super) rng: SystemRandom,
    pub(super) es256: EcdsaKeyPair,
    pub(super) es384: EcdsaKeyPair,
    pub(super) ed: Ed25519KeyPair,
    pub(super) rsa: RsaKeyPair,
    pub(super) v: JwtVerifier,
    pub(super) now: SystemTime,
}

/// Builds the verifier of a config file's text, with key files under `dir`.
fn load_in(dir: &Path, toml_text: &str) -> Result<JwtVerifier, JwtConfigError> {
    let file: ConfigFile = toml::from_str(toml_text).unwrap();
    JwtVerifier::from_raw(file.jwt, dir)
}

pub(super) fn ec_key(
    alg: &'static signature::EcdsaSigningAlgorithm,
    rng: &SystemRandom,
) -> EcdsaKeyPair {
    let pkcs8 = EcdsaKeyPair::generate_pkcs8(alg, rng).unwrap();
    EcdsaKeyPair::from_pkcs8(alg, pkcs8.as_ref(), rng).unwrap()
}

impl Fx {
    pub(super) fn new() -> Fx {
        Fx::with_top("")
    }

    /// The standard fixture, with `top` added to the `[jwt]` table.
    pub(super) fn with_top(top: &str) -> Fx {
        assert_eq!(HS512_SECRET.len(), 64);
        let rng = SystemRandom::new();
        let es256 = ec_key(&signature::ECDSA_P256_SHA256_FIXED_SIGNING, &rng);
        let es384 = ec_key(&signature::ECDSA_P384_SHA384_FIXED_SIGNING, &rng);
        let ed_pkcs8 = Ed25519KeyPair::generate_pkcs8(&rng).unwrap();
        let ed = Ed25519KeyPair::from_pkcs8(ed_pkcs8.as_ref()).unwrap();
        let rsa_der = PrivatePkcs8KeyDer::from_pem_slice(RSA_TEST_KEY_PEM.as_bytes()).unwrap();
        let rsa = RsaKeyPair::from_pkcs8(rsa_der.secret_pkcs8_der()).unwrap();

        let dir = tempfile::tempdir().unwrap();
        let write = |name: &str, text: &str| std::fs::write(dir.path().join(name), text).unwrap();
        // The trailing newline is not part of the secret.
        write("hs512.key", &format!("{HS512_SECRET}\n"));
        write(
            "es256.pub.pem",
            &pem(&spki_der(P256_SPKI_PREFIX, es256.public_key().as_ref())),
        );
        write(
            "es384.pub.pem",
            &pem(&spki_der(P384_SPKI_PREFIX, es384.public_key().as_ref())),
        );
        write(
            "ed25519.pub.pem",
            &pem(&spki_der(ED25519_SPKI_PREFIX, ed.public_key().as_ref())),
        );
        write("rsa.pub.pem", RSA_TEST_PUB_PEM);

        let v = load_in(dir.path(), &base_config(top)).unwrap();
        Fx {
            rng,
            es256,
            es384,
            ed,
            rsa,
            v,
            dir,
            now: UNIX_EPOCH + Duration::from_secs(1_700_000_000),
        }
    }

    pub(super) fn load(&self, toml_text: &str) -> Result<JwtVerifier, JwtConfigError> {
        load_in(self.dir.path(), toml_text)
    }

    pub(super) fn write(&self, name: &str, text: &str) {
        std::fs::write(self.dir.path().join(name), text).unwrap();
    }

    pub(super) fn sign(&self, alg: JwtAlg, msg: &[u8]) -> Vec<u8> {
        match alg {
            JwtAlg::Hs256 => hmac_sign(hmac::HMAC_SHA256, HS256_SECRET.as_bytes(), msg),
            JwtAlg::Hs384 => hmac_sign(hmac::HMAC_SHA384, HS256_SECRET.as_bytes(), msg),
            JwtAlg::Hs512 => hmac_sign(hmac::HMAC_SHA512, HS512_SECRET.as_bytes(), msg),
            JwtAlg::Es256 => self.es256.sign(&self.rng, msg).unwrap().as_ref().to_vec(),
            JwtAlg::Es384 => self.es384.sign(&self.rng, msg).unwrap().as_ref().to_vec(),
            JwtAlg::EdDsa => self.ed.sign(msg).as_ref().to_vec(),
            JwtAlg::Rs256 | JwtAlg::Ps256 => {
                let padding: &'static dyn signature::RsaEncoding = if alg == JwtAlg::Rs256 {
                    &signature::RSA_PKCS1_SHA256
                } else {
                    &signature::RSA_PSS_SHA256
                };
                let mut sig = vec![0; self.rsa.public().modulus_len()];
                self.rsa.sign(padding, &self.rng, msg, &mut sig).unwrap();
                sig
            }
        }
    }

    pub(super) fn claims(&self) -> Value {
        json!({
            "iss": ISSUER,
            "aud": "tollgate",
            "exp": secs(self.now) + 300,
            "iat": secs(self.now),
            "sub": "alice",
            "jti": "id-1",
            "role": "app",
        })
    }

    pub(super) fn header(alg: JwtAlg, kid: Option<&str>) -> Value {
        let mut h = json!({"alg": alg.name(), "typ": "JWT"});
        if let Some(kid) = kid {
            h["kid"] = json!(kid);
        }
        h
    }

    /// A token signed with `alg`'s fixture key, over `claims`.
    pub(super) fn token_for(&self, alg: JwtAlg, kid: Option<&str>, claims: &Value) -> String {
        jws_text(
            &Fx::header(alg, kid).to_string(),
            &claims.to_string(),
            |m| self.sign(alg, m),
        )
    }

    pub(super) fn token(&self, alg: JwtAlg, kid: Option<&str>) -> String {
        self.token_for(alg, kid, &self.claims())
    }

    /// The default token, with `edit` applied to its claims.
    pub(super) fn token_with(
        &self,
        edit: impl FnOnce(&mut serde_json::Map<String, Value>),
    ) -> String {
        let mut claims = self.claims();
        edit(claims.as_object_mut().unwrap());
        self.token_for(JwtAlg::Es256, Some("es256"), &claims)
    }

    pub(super) fn check(&self, token: &str) -> Result<VerifiedJwt, JwtRejection> {
        self.v.verify(token.as_bytes(), self.now)
    }
}

pub(super) const EVERY_ALG: [(JwtAlg, &str); 7] = [
    (JwtAlg::Hs256, "hs256"),
    (JwtAlg::Hs512, "hs512"),
    (JwtAlg::Es256, "es256"),
    (JwtAlg::Es384, "es384"),
    (JwtAlg::EdDsa, "ed"),
    (JwtAlg::Rs256, "rs"),
    (JwtAlg::Ps256, "ps"),
];
