#!/usr/bin/env python3
"""Logs in to a real PostgreSQL with SCRAM-SHA-256 using the fuzz targets'
fixed client nonce and password, and writes what the server said as seeds:

  scram_client:   <selector><server-first>\0<server-final>
  upstream_login: <selector><the server's whole byte stream>, with the client
                  nonce replaced by the targets' "@@" placeholder

Usage: pg_scram_capture.py HOST PORT USER DATABASE PASSWORD OUT_DIR
(the role's password must be the targets' SCRAM_PASSWORD, "pencil").
Server signatures for the channel bindings a plain-TCP server cannot check
(y,, and p=tls-server-end-point) are computed here from the same exchange.
"""
import base64, hashlib, hmac, os, socket, struct, sys

NONCE = base64.b64encode(bytes([0x2A] * 18)).decode()
CBIND = bytes([0xCB] * 32)


def msg(tag, body):
    return tag + struct.pack("!i", len(body) + 4) + body


def read_msg(s, log):
    head = b""
    while len(head) < 5:
        head += s.recv(5 - len(head))
    n = struct.unpack("!i", head[1:5])[0] - 4
    body = b""
    while len(body) < n:
        body += s.recv(n - len(body))
    log.append(head + body)
    return head[:1], body


def placeholder(log):
    """The server's stream with the client nonce as "@@" (lengths fixed)."""
    out = b""
    for m in log:
        body = m[5:].replace(NONCE.encode(), b"@@")
        out += msg(m[:1], body)
    return out


def startup(user, db, minor=0, extra=()):
    body = struct.pack("!i", (3 << 16) | minor)
    for k, v in (("user", user), ("database", db)) + tuple(extra):
        body += k.encode() + b"\0" + v.encode() + b"\0"
    body += b"\0"
    return struct.pack("!i", len(body) + 4) + body


def keys(password, salt, i):
    salted = hashlib.pbkdf2_hmac("sha256", password, salt, i)
    ck = hmac.new(salted, b"Client Key", "sha256").digest()
    sk = hmac.new(salted, b"Server Key", "sha256").digest()
    return ck, sk


def exchange(host, port, user, db, password, gs2=b"n,,"):
    s = socket.create_connection((host, port))
    log = []
    s.sendall(startup(user, db))
    tag, body = read_msg(s, log)
    assert tag == b"R" and struct.unpack("!i", body[:4])[0] == 10, (tag, body)
    first_bare = f"n=,r={NONCE}".encode()
    cf = gs2 + first_bare
    s.sendall(msg(b"p", b"SCRAM-SHA-256\0" + struct.pack("!i", len(cf)) + cf))
    tag, body = read_msg(s, log)
    server_first = body[4:]
    attrs = dict(a.split("=", 1) for a in server_first.decode().split(","))
    salt, iters = base64.b64decode(attrs["s"]), int(attrs["i"])
    ck, sk = keys(password, salt, iters)
    without_proof = b"c=" + base64.b64encode(gs2) + b",r=" + attrs["r"].encode()
    auth = first_bare + b"," + server_first + b"," + without_proof
    sig = hmac.new(hashlib.sha256(ck).digest(), auth, "sha256").digest()
    proof = bytes(a ^ b for a, b in zip(ck, sig))
    s.sendall(msg(b"p", without_proof + b",p=" + base64.b64encode(proof)))
    while True:
        tag, body = read_msg(s, log)
        if tag in (b"Z", b"E"):
            break
    s.close()
    server_final = log[2][9:] if len(log) > 2 and log[2][:1] == b"R" else b""
    return server_first, server_final, log, (salt, iters, sk)


def signature(first_bare, server_first, gs2, sk):
    attrs = dict(a.split("=", 1) for a in server_first.decode().split(","))
    c = base64.b64encode(gs2)
    auth = first_bare + b"," + server_first + b",c=" + c + b",r=" + attrs["r"].encode()
    return b"v=" + base64.b64encode(hmac.new(sk, auth, "sha256").digest())


def main():
    host, port, user, db, password, out = sys.argv[1:7]
    port, password = int(port), password.encode()
    sdir = os.path.join(out, "scram_client")
    ldir = os.path.join(out, "upstream_login")
    os.makedirs(sdir, exist_ok=True)
    os.makedirs(ldir, exist_ok=True)
    first, final, log, (salt, iters, sk) = exchange(host, port, user, db, password)
    assert final.startswith(b"v="), log
    bare = f"n=,r={NONCE}".encode()
    assert signature(bare, first, b"n,,", sk) == final
    w = lambda d, n, b: open(os.path.join(d, n), "wb").write(b)
    w(sdir, "seed-pg15-n", b"\x00" + first + b"\0" + final)
    w(sdir, "seed-pg15-y", b"\x01" + first + b"\0" + signature(bare, first, b"y,,", sk))
    w(sdir, "seed-pg15-p", b"\x02" + first + b"\0"
      + signature(bare, first, b"p=tls-server-end-point,," + CBIND, sk))
    w(sdir, "seed-pg15-first-only", b"\x00" + first)
    w(sdir, "seed-pg15-e-invalid-proof", b"\x00" + first + b"\0e=invalid-proof")
    w(sdir, "seed-pg15-bad-sig", b"\x00" + first + b"\0v=" + base64.b64encode(b"\0" * 32))
    stream = placeholder(log)
    w(ldir, "seed-pg15-scram", b"\x00" + stream)
    # After authentication: AuthenticationOk .. ReadyForQuery, as a trust,
    # cleartext or md5 server would send it.
    ok_at = next(i for i, m in enumerate(log) if m == b"R\0\0\0\x08\0\0\0\0")
    post = b"".join(log[ok_at:])
    w(ldir, "seed-pg15-trust", b"\x00" + post)
    w(ldir, "seed-pg15-trust-3.2", b"\x08" + post)
    w(ldir, "seed-pg15-cleartext", b"\x00" + msg(b"R", struct.pack("!i", 3)) + post)
    w(ldir, "seed-pg15-md5", b"\x00" + msg(b"R", struct.pack("!i", 5) + b"salt") + post)
    # A wrong password and an unknown database, as the server refuses them.
    for name, u, d, pw in (("badpw", user, db, b"wrong"), ("nodb", user, "nodb", password)):
        try:
            _, _, log2, _ = exchange(host, port, u, d, pw)
        except AssertionError:
            continue
        w(ldir, f"seed-pg15-{name}", b"\x00" + placeholder(log2))
    # Protocol 3.2 with an option: PostgreSQL 15 answers NegotiateProtocolVersion.
    s = socket.create_connection((host, port))
    s.sendall(startup(user, db, 2, (("_pq_.fuzz", "1"),)))
    log3 = []
    read_msg(s, log3)
    read_msg(s, log3)
    s.close()
    w(ldir, "seed-pg15-negotiate", b"\x08" + placeholder(log3))
    print("wrote", sdir, ldir)


main()
