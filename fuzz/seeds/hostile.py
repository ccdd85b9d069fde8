#!/usr/bin/env python3
"""Writes the hand-made seeds of every fuzz target (the hostile cases of
issue #8 and valid inputs that reach deep) into OUT_DIR/<target>/hostile-*.

Usage: hostile.py OUT_DIR   (run from fuzz/, which has keys/; OUT_DIR is seeds/)
The layouts are those documented on each function of fuzz/targets.rs.
"""
import base64, hashlib, hmac, json, os, struct, sys, zlib

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, utils

OUT = sys.argv[1]
NONCE = base64.b64encode(bytes([0x2A] * 18)).decode()
V3 = 3 << 16


def w(target, name, data):
    d = os.path.join(OUT, target)
    os.makedirs(d, exist_ok=True)
    open(os.path.join(d, "hostile-" + name), "wb").write(data)


def i32(n):
    return struct.pack("!i", n)


def u32(n):
    return struct.pack("!I", n)


def raw(length, code, body=b""):
    return u32(length & 0xFFFFFFFF) + u32(code) + body


def sized(code, body):
    return raw(8 + len(body), code, body)


def params(*pairs):
    return b"".join(k + b"\0" + v + b"\0" for k, v in pairs) + b"\0"


def startup(*pairs, minor=0):
    return sized(V3 | minor, params(*pairs))


def msg(tag, body):
    return tag + i32(len(body) + 4) + body


SSL = raw(8, 80877103)
GSS = raw(8, 80877104)
CANCEL = raw(16, 80877102, u32(1234) + b"\x01\x02\x03\x04")
USER = (b"user", b"app")

# --- startup ---------------------------------------------------------------
for n in (0, 7, 10005, 2**31, 0xFFFFFFFF, 3, 8):
    w("startup", f"len-{n}", raw(n, V3, b"user\0app\0\0"))
w("startup", "no-nul", sized(V3, b"user\0app"))
w("startup", "name-no-value", sized(V3, b"user\0"))
w("startup", "no-terminator", sized(V3, b"user\0app\0"))
w("startup", "after-terminator", sized(V3, b"user\0app\0\0xx"))
w("startup", "empty", sized(V3, b"\0"))
w("startup", "no-user", startup((b"database", b"appdb")))
w("startup", "empty-user", startup((b"user", b"")))
w("startup", "duplicate-user", sized(V3, b"user\0a\0user\0b\0\0"))
w("startup", "not-utf8", sized(V3, b"user\0\xff\xfe\0\0"))
w("startup", "options-c-eq", startup(USER, (b"options", b"-c=")))
w("startup", "options-c-alone", startup(USER, (b"options", b"-c")))
w("startup", "options-escapes", startup(USER, (b"options", b"-c a=\\ \\\\ -c")))
w("startup", "options-role", startup(USER, (b"options", b"-c role=postgres -c session_authorization=postgres")))
w("startup", "search-path", startup(USER, (b"search_path", b"evil,public"), (b"role", b"postgres")))
w("startup", "replication", startup(USER, (b"replication", b"database")))
opts = b"-c a=1 " * 1400
w("startup", "thousands-of-c", startup(USER, (b"options", opts[:9900])))
many = [(b"p%d" % i, b"") for i in range(1500)]
w("startup", "many-params", startup(USER, *many))
w("startup", "at-limit", startup(USER, (b"x", b"y" * (10000 - 8 - 15))))
w("startup", "postgres-limit", startup(USER, (b"x", b"y" * (10004 - 8 - 15))))
w("startup", "over-limit", startup(USER, (b"x", b"y" * (10005 - 8 - 15))))
for major, minor in ((2, 0), (4, 0), (3, 0xFFFF), (3, 2), (1234, 5677)):
    w("startup", f"proto-{major}.{minor}", sized((major << 16) | minor, params(USER)))
w("startup", "pq-options", startup(USER, (b"_pq_.a", b"1"), (b"_pq_.b", b""), minor=2))
w("startup", "cancel", CANCEL)
w("startup", "cancel-long-key", raw(8 + 4 + 256, 80877102, u32(7) + b"\xaa" * 256))
w("startup", "cancel-too-long-key", raw(8 + 4 + 257, 80877102, u32(7) + b"\xaa" * 257))
w("startup", "cancel-short", raw(12, 80877102, u32(7)))
w("startup", "ssl", SSL)
w("startup", "ssl-long", raw(12, 80877103, b"\0\0\0\0"))
w("startup", "gss", GSS)
w("startup", "tls-client-hello", bytes.fromhex("160301002001000100"))

# --- password --------------------------------------------------------------
tok = "tg_fuzzfuzz0001_" + "11" * 32
tok = (tok + "%08x" % zlib.crc32(tok.encode())).encode()
w("password", "token", msg(b"p", tok + b"\0"))
w("password", "empty-body", b"p" + i32(4))
w("password", "empty-password", msg(b"p", b"\0"))
w("password", "no-nul", msg(b"p", b"secret"))
w("password", "inner-nul", msg(b"p", b"sec\0ret\0"))
w("password", "len-3", b"p" + i32(3) + b"abc")
w("password", "len-negative", b"p" + i32(-1))
w("password", "len-huge", b"p" + i32(0x7FFFFFFF) + b"x" * 16)
w("password", "query", msg(b"Q", b"select 1\0"))
w("password", "startup-again", startup(USER))
w("password", "cancel", CANCEL)
w("password", "513", msg(b"p", b"x" * 507 + b"\0"))
w("password", "512", msg(b"p", b"x" * 506 + b"\0"))
w("password", "sasl-initial", msg(b"p", b"SCRAM-SHA-256\0" + i32(32) + ("n,,n=,r=" + NONCE).encode()))
w("password", "sasl-response", msg(b"p", b"c=biws,r=" + NONCE.encode() + b"x,p=AAAA"))
w("password", "trailing", msg(b"p", tok + b"\0") + msg(b"Q", b"select 1\0"))

# --- scram_client ----------------------------------------------------------
SALT = "W22ZaJ0SNY7soEsUEjb6gQ=="
SN = NONCE + "%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0"


def sf(rest, sel=0, final=None):
    b = bytes([sel]) + rest.encode("latin-1")
    return b if final is None else b + b"\0" + final


for name, first in (
    ("i-0", f"r={SN},s={SALT},i=0"),
    ("i-1", f"r={SN},s={SALT},i=1"),
    ("i-neg", f"r={SN},s={SALT},i=-1"),
    ("i-plus", f"r={SN},s={SALT},i=+4096"),
    ("i-lead0", f"r={SN},s={SALT},i=04096"),
    ("i-huge", f"r={SN},s={SALT},i=99999999999"),
    ("i-2pow32", f"r={SN},s={SALT},i=4294967296"),
    ("i-cap", f"r={SN},s={SALT},i=10000000"),
    ("i-cap+1", f"r={SN},s={SALT},i=10000001"),
    ("i-500-digits", f"r={SN},s={SALT},i=" + "9" * 500),
    ("i-empty", f"r={SN},s={SALT},i="),
    ("nonce-mismatch", f"r=XX{SN[2:]},s={SALT},i=4096"),
    ("nonce-not-extended", f"r={NONCE},s={SALT},i=4096"),
    ("nonce-ctrl", f"r={NONCE}\x7fx,s={SALT},i=4096"),
    ("nonce-64k", f"r={NONCE}" + "a" * 65536 + f",s={SALT},i=4096"),
    ("no-salt", f"r={SN},i=4096"),
    ("empty-salt", f"r={SN},s=,i=4096"),
    ("bad-salt", f"r={SN},s=not*base64!,i=4096"),
    ("order", f"r={SN},i=4096,s={SALT}"),
    ("dup-r", f"r={SN},r={SN},s={SALT},i=4096"),
    ("m-ext", f"m=ext,r={SN},s={SALT},i=4096"),
    ("trailing", f"r={SN},s={SALT},i=4096,x=1"),
    ("trailing-comma", f"r={SN},s={SALT},i=4096,"),
    ("empty", ""),
    ("garbage", "garbage"),
):
    w("scram_client", name, sf(first))
ok_first = f"r={SN},s={SALT},i=16"
for name, final in (
    ("e", b"e=invalid-proof"),
    ("e-long-ctrl", b"e=" + b"x" * 900 + b"\x1b[31m"),
    ("e-utf8", "e=caf\u00e9 \u202e".encode()),
    ("v-short", b"v=AAAA"),
    ("v-empty", b"v="),
    ("v-bad", b"v=not base64"),
    ("v-trailing", b"v=" + base64.b64encode(b"\0" * 32) + b",x=1"),
    ("m", b"m=1"),
    ("x", b"x=1"),
    ("empty-final", b""),
):
    w("scram_client", "final-" + name, sf(ok_first, 0, final))


def scram_sig(password, salt, iters, first, gs2):
    salted = hashlib.pbkdf2_hmac("sha256", password, salt, iters)
    sk = hmac.new(salted, b"Server Key", "sha256").digest()
    r = dict(a.split("=", 1) for a in first.split(","))["r"]
    auth = f"n=,r={NONCE},{first},c={base64.b64encode(gs2).decode()},r={r}".encode()
    return b"v=" + base64.b64encode(hmac.new(sk, auth, "sha256").digest())


for sel, gs2 in ((0, b"n,,"), (1, b"y,,"), (2, b"p=tls-server-end-point,," + b"\xcb" * 32)):
    w("scram_client", f"valid-i16-{sel}",
      sf(ok_first, sel, scram_sig(b"pencil", base64.b64decode(SALT), 16, ok_first, gs2)))

# --- upstream_login --------------------------------------------------------
def auth(code, body=b""):
    return msg(b"R", i32(code) + body)


OK = auth(0)
POST = OK + msg(b"S", b"server_version\x0015.0\0") + msg(b"K", u32(42) + b"\x07" * 4) + msg(b"Z", b"I")
SASL = auth(10, b"SCRAM-SHA-256\0\0")
SASLP = auth(10, b"SCRAM-SHA-256-PLUS\0SCRAM-SHA-256\0\0")


def cont(first):
    return auth(11, first.encode("latin-1"))


PN = "@@%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0"
L = lambda name, sel, stream: w("upstream_login", name, bytes([sel]) + stream)
L("trust", 0, POST)
L("cleartext-no-password", 0x10, auth(3) + POST)
L("md5-no-password", 0x10, auth(5, b"salt") + POST)
L("sasl-no-password", 0x10, SASL)
L("plus-only", 0, auth(10, b"SCRAM-SHA-256-PLUS\0\0"))
L("plus-offered-tls", 2, SASLP + cont(f"r={PN},s={SALT},i=16"))
L("plus-not-offered-tls", 2, SASL + cont(f"r={PN},s={SALT},i=16"))
L("no-mechanisms", 0, auth(10, b"\0"))
L("nonce-not-ours", 0, SASL + cont(f"r=XXXX,s={SALT},i=16"))
L("nonce-60k", 0, SASL + cont(f"r=@@" + "a" * 60000 + f",s={SALT},i=16"))
L("i-0", 0, SASL + cont(f"r={PN},s={SALT},i=0"))
L("i-huge", 0, SASL + cont(f"r={PN},s={SALT},i=4294967295"))
L("e-final", 0, SASL + cont(f"r={PN},s={SALT},i=16") + auth(12, b"e=invalid-proof"))
L("bad-final", 0, SASL + cont(f"r={PN},s={SALT},i=16") + auth(12, b"v=AAAA") + POST)
L("continue-first", 0, cont(f"r={PN},s={SALT},i=16"))
L("final-first", 0, auth(12, b"v=AAAA"))
L("gss", 0, auth(7))
L("sspi", 0, auth(9))
L("kerberos", 0, auth(2))
L("error-no-sqlstate", 0, msg(b"E", b"SFATAL\0Mno code\0\0"))
L("error-huge", 0, msg(b"E", b"SFATAL\0C28P01\0M" + b"x" * 60000 + b"\0\0"))
L("error-unterminated", 0, msg(b"E", b"SFATAL"))
L("error-after-ok", 0, OK + msg(b"E", b"SFATAL\0C53300\0Mtoo many\0\0"))
L("error-28-after-ok", 0, OK + msg(b"E", b"SFATAL\0C28000\0Mrole\0\0"))
L("notice-before-auth", 0, msg(b"N", b"SNOTICE\0Mhello\0\0") + POST)
L("key-before-auth", 0, msg(b"K", u32(1) + b"\0\0\0\1") + POST)
L("key-twice", 0, OK + msg(b"K", u32(1) + b"\0\0\0\1") * 2 + msg(b"Z", b"I"))
L("key-long-3.0", 0, OK + msg(b"K", u32(1) + b"\x07" * 32) + msg(b"Z", b"I"))
L("key-long-3.2", 0x08, OK + msg(b"K", u32(1) + b"\x07" * 32) + msg(b"Z", b"I"))
L("key-257", 0x08, OK + msg(b"K", u32(1) + b"\x07" * 257) + msg(b"Z", b"I"))
L("key-empty", 0x08, OK + msg(b"K", u32(1)) + msg(b"Z", b"I"))
L("npv-twice", 0x08, msg(b"v", u32(V3) + i32(0)) * 2 + POST)
L("npv-higher", 0x08, msg(b"v", u32(V3 | 5) + i32(0)) + POST)
L("npv-same-no-reason", 0x08, msg(b"v", u32(V3 | 2) + i32(0)) + POST)
L("npv-after-ok", 0x08, OK + msg(b"v", u32(V3) + i32(0)) + msg(b"Z", b"I"))
L("npv-negative", 0x08, msg(b"v", u32(V3) + i32(-1)) + POST)
L("npv-major-4", 0x08, msg(b"v", u32(4 << 16) + i32(0)) + POST)
L("client-asks-3.3", 0x0C, POST)
L("data-row-before-auth", 0, msg(b"D", b"\0\0") + POST)
L("ok-twice", 0, OK + OK + msg(b"Z", b"I"))
L("rfq-bad-len", 0, OK + msg(b"Z", b"II"))
L("len-too-long", 0, b"R" + i32(65537) + b"\0" * 16)
L("len-3", 0, b"R" + i32(3) + b"\0" * 16)
L("md5-short-salt", 0, auth(5, b"sal") + POST)
L("cleartext-twice", 0, auth(3) + auth(3) + POST)

# --- token (mode 0: password; mode 1: header \0 claims, HS256-signed) ------
def b64u(b):
    return base64.urlsafe_b64encode(b).rstrip(b"=")


def jws(header, claims, signer):
    h = header if isinstance(header, bytes) else json.dumps(header).encode()
    c = claims if isinstance(claims, bytes) else json.dumps(claims).encode()
    si = b64u(h) + b"." + b64u(c)
    return si + b"." + b64u(signer(si))


HS = lambda si: hmac.new(b"fuzz-hmac-secret-of-at-least-32-bytes!!", si, "sha256").digest()
keys = {n: serialization.load_pem_private_key(open(f"keys/{n}.test-only.key.pem", "rb").read(), None)
        for n in ("rs256", "es256", "ed25519")}
RS = lambda si: keys["rs256"].sign(si, padding.PKCS1v15(), hashes.SHA256())


def ES(si):
    r, s = utils.decode_dss_signature(keys["es256"].sign(si, ec.ECDSA(hashes.SHA256())))
    return r.to_bytes(32, "big") + s.to_bytes(32, "big")


ED = lambda si: keys["ed25519"].sign(si)
CLAIMS = {"iss": "https://issuer.test", "aud": "tollgate", "exp": 4000000000, "role": "app",
          "databases": ["appdb"], "jti": "job-1", "sub": "ci",
          "pg_session": {"statement_timeout": "5s", "application_name": "x"},
          "max_connections": 3, "cidrs": ["127.0.0.0/8"]}
T = lambda name, data, mode=0: w("token", name, bytes([mode]) + data)
T("opaque", tok)
up = tok[:16] + tok[16:80].upper()
T("opaque-upper", up + ("%08x" % zlib.crc32(up)).encode())
T("opaque-bad-crc", tok[:-1] + b"0")
T("opaque-short", tok[:-1])
T("opaque-bad-id", b"tg_FUZZfuzz0001" + tok[15:])
T("opaque-unknown-id", b"tg_aaaaaaaaaaaa" + tok[15:80] + ("%08x" % zlib.crc32(b"tg_aaaaaaaaaaaa" + tok[15:80])).encode())
T("hs256", jws({"alg": "HS256", "typ": "JWT", "kid": "hs"}, CLAIMS, HS))
T("hs256-nokid", jws({"alg": "HS256"}, CLAIMS, HS))
T("rs256", jws({"alg": "RS256", "kid": "rs"}, CLAIMS, RS))
T("es256", jws({"alg": "ES256", "kid": "es"}, CLAIMS, ES))
T("eddsa", jws({"alg": "EdDSA"}, CLAIMS, ED))
T("eddsa-unknown-kid", jws({"alg": "EdDSA", "kid": "zz"}, CLAIMS, ED))
T("rs-as-hs", jws({"alg": "HS256", "kid": "rs"}, CLAIMS, lambda si: hmac.new(open("keys/rs256.pub.pem", "rb").read(), si, "sha256").digest()))
T("none", jws({"alg": "none"}, CLAIMS, lambda si: b"")[:-0 or None])
T("NONE", b64u(b'{"alg":"NONE"}') + b"." + b64u(json.dumps(CLAIMS).encode()) + b".")
T("crit", jws({"alg": "HS256", "crit": ["exp"]}, CLAIMS, HS))
T("typ-dpop", jws({"alg": "HS256", "typ": "dpop+jwt"}, CLAIMS, HS))
T("expired", jws({"alg": "HS256"}, dict(CLAIMS, exp=1700000000), HS))
T("nbf-future", jws({"alg": "HS256"}, dict(CLAIMS, nbf=1800000000), HS))
T("aud-array", jws({"alg": "HS256"}, dict(CLAIMS, aud=["x", "tollgate"]), HS))
T("padded", jws({"alg": "HS256"}, CLAIMS, HS) + b"=")
T("too-long", jws({"alg": "HS256"}, dict(CLAIMS, pad="x" * 4000), HS))
T("dup-member", jws(b'{"alg":"HS256","alg":"none"}', CLAIMS, HS))
T("three-dots", jws({"alg": "HS256"}, CLAIMS, HS) + b".x")
J = lambda name, header, claims: T(name, (header if isinstance(header, bytes) else json.dumps(header).encode())
                                   + b"\0" + (claims if isinstance(claims, bytes) else json.dumps(claims).encode()), 1)
HH = {"alg": "HS256", "kid": "hs"}
J("json-valid", HH, CLAIMS)
J("json-minimal", HH, {"aud": "tollgate", "exp": 4000000000, "role": "app", "iss": "https://issuer.test"})
J("json-exp-float", HH, dict(CLAIMS, exp=3999999999.5))
J("json-exp-huge", HH, dict(CLAIMS, exp=1e308))
J("json-exp-neg", HH, dict(CLAIMS, exp=-1))
J("json-exp-max", HH, dict(CLAIMS, exp=253402300799))
J("json-exp-max+1", HH, dict(CLAIMS, exp=253402300800))
J("json-exp-string", HH, dict(CLAIMS, exp="4000000000"))
J("json-session-reserved", HH, dict(CLAIMS, pg_session={"user": "postgres"}))
J("json-session-nul", HH, dict(CLAIMS, pg_session={"a": "b\u0000c"}))
J("json-role-nul", HH, dict(CLAIMS, role="app\u0000x"))
J("json-role-empty", HH, dict(CLAIMS, role=""))
J("json-databases-empty", HH, dict(CLAIMS, databases=[]))
J("json-cidrs-bad", HH, dict(CLAIMS, cidrs=["999.0.0.0/8"]))
J("json-maxconn-big", HH, dict(CLAIMS, max_connections=2**40))
J("json-aud-mixed", HH, dict(CLAIMS, aud=["tollgate", 1]))
J("json-deep", HH, b'{"aud":"tollgate","exp":4000000000,"role":"app","x":' + b"[" * 3000 + b"]" * 3000 + b"}")
J("json-dup", HH, b'{"role":"app","role":"postgres","aud":"tollgate","exp":4000000000}')
J("json-not-object", HH, b"[]")
J("json-header-array", b"[]", CLAIMS)
J("json-header-ws", b' {"alg":"HS256"}', CLAIMS)
J("json-jti-long", HH, dict(CLAIMS, jti="j" * 200))

# --- framer (limit byte, seed byte, stream) --------------------------------
be = (OK + msg(b"S", b"a\0b\0") + msg(b"K", u32(1) + b"\0\0\0\1") + msg(b"Z", b"I")
      + msg(b"T", b"\0\1a\0" + b"\0" * 18) + msg(b"D", b"\0\1\0\0\0\1x") + msg(b"C", b"SELECT 1\0")
      + msg(b"I", b"") + msg(b"Z", b"I"))
fe = msg(b"Q", b"select 1\0") + msg(b"P", b"\0select $1\0\0\0") + msg(b"B", b"\0\0" + b"\0" * 6) + msg(b"S", b"") + msg(b"X", b"")
F = lambda name, limit, seed, stream: w("framer", name, bytes([limit, seed]) + stream)
F("backend-1", 0, 1, be)
F("backend-7", 6, 2, be)
F("frontend-3", 2, 3, fe)
F("frontend-big", 255, 4, fe)
for n in (0, 3, -1, 2**31 - 1, 4):
    F(f"len-{n}", 3, 5, msg(b"Q", b"x") + b"Q" + i32(n) + b"rest")
F("empty-messages", 0, 6, msg(b"I", b"") * 20)
F("header-split", 1, 7, be[:3])
F("big-payload", 16, 8, b"D" + i32(100000) + b"x" * 300)

# --- handshake (policy, limit, seed, stream) -------------------------------
PW = msg(b"p", tok + b"\0")
S0 = startup(USER, (b"database", b"appdb"))
H = lambda name, policy, limit, stream: w("handshake", name, bytes([policy, limit, 9]) + stream)
H("plain", 0x02, 255, S0 + PW)
H("plain-bytewise", 0x02, 0, S0 + PW + msg(b"Q", b"select 1\0"))
H("ssl-refused", 0x02, 4, SSL + S0 + PW)
H("gss-ssl-refused", 0x02, 4, GSS + SSL + S0 + PW)
H("ssl-twice", 0x02, 4, SSL + SSL + S0 + PW)
H("gss-twice", 0x02, 4, GSS + GSS + S0 + PW)
H("ssl-then-plaintext", 0x03, 255, SSL + S0 + PW)
H("ssl-tls", 0x01, 7, SSL + S0 + PW)
H("ssl-in-tls", 0x01, 7, SSL + SSL)
H("direct-tls-on", 0x01, 3, bytes.fromhex("1603010200010001fc0303") + b"\0" * 40)
H("direct-tls-off", 0x02, 3, bytes.fromhex("1603010200010001fc0303"))
H("direct-tls-after-ssl", 0x01, 255, SSL + bytes.fromhex("160301"))
H("tls-required-plain", 0x01, 255, S0 + PW)
H("cancel", 0x02, 2, CANCEL)
H("cancel-during-auth", 0x02, 3, S0 + CANCEL)
H("startup-during-auth", 0x02, 3, S0 + S0)
H("password-first", 0x02, 3, PW + S0)
H("password-513", 0x02, 17, S0 + msg(b"p", b"x" * 507 + b"\0"))
H("password-jwt-cap", 0x0A, 17, S0 + msg(b"p", b"eyJ" + b"x" * 3000 + b"\0"))
H("password-65535", 0x0E, 255, S0 + b"p" + i32(65540))
H("no-user", 0x02, 5, startup((b"database", b"x")) + PW)
H("query-instead", 0x02, 5, S0 + msg(b"Q", b"select 1\0"))
H("len-7", 0x02, 1, raw(7, V3))
H("len-huge", 0x02, 1, raw(0x7FFFFFFF, V3))
H("options", 0x02, 9, startup(USER, (b"options", b"-c role=postgres -c=")) + PW)
print("hostile seeds written to", OUT)
