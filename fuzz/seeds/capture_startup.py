#!/usr/bin/env python3
"""A listener that plays the first steps of a PostgreSQL server to record
what a real client sends before authentication: it answers SSLRequest and
GSSENCRequest with 'N', a StartupMessage with AuthenticationCleartextPassword,
records the PasswordMessage, then refuses the login and closes.

Usage: capture_startup.py PORT NAME OUT_DIR   (one connection, then exits)
Writes OUT_DIR/startup/seed-NAME-<i> (each untagged packet),
OUT_DIR/password/seed-NAME (the PasswordMessage) and
OUT_DIR/handshake/seed-NAME-<policy> (the whole stream, behind the
handshake target's policy/chunk/seed bytes).
"""
import os, socket, struct, sys

port, name, out = int(sys.argv[1]), sys.argv[2], sys.argv[3]
srv = socket.socket()
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("127.0.0.1", port))
srv.listen(1)
srv.settimeout(30)
c, _ = srv.accept()
c.settimeout(10)


def exact(n):
    b = b""
    while len(b) < n:
        chunk = c.recv(n - len(b))
        if not chunk:
            raise EOFError
        b += chunk
    return b


stream, packets, password = b"", [], None
try:
    while True:
        head = exact(4)
        n = struct.unpack("!i", head)[0]
        pkt = head + exact(n - 4)
        stream += pkt
        packets.append(pkt)
        code = struct.unpack("!I", pkt[4:8])[0]
        if code in (80877103, 80877104):  # SSLRequest, GSSENCRequest
            c.sendall(b"N")
            continue
        c.sendall(b"R\0\0\0\x08\0\0\0\x03")
        head = exact(5)
        password = head + exact(struct.unpack("!i", head[1:5])[0] - 4)
        stream += password
        break
except (EOFError, socket.timeout):
    pass
err = b"SFATAL\0VFATAL\0C28P01\0Mcapture only\0\0"
try:
    c.sendall(b"E" + struct.pack("!i", len(err) + 4) + err)
except OSError:
    pass
c.close()

for d in ("startup", "password", "handshake"):
    os.makedirs(os.path.join(out, d), exist_ok=True)
for i, p in enumerate(packets):
    open(os.path.join(out, "startup", f"seed-{name}-{i}"), "wb").write(p)
if password:
    open(os.path.join(out, "password", f"seed-{name}"), "wb").write(password)
# policy 0: no TLS, plaintext allowed, 512-byte cap; 2: plaintext, 4102 cap;
# chunk limit 0 (one byte at a time) and 7.
for policy, limit in ((0x02, 0), (0x0A, 7), (0x03, 3)):
    open(os.path.join(out, "handshake", f"seed-{name}-{policy:02x}"), "wb").write(
        bytes([policy, limit, 42]) + stream)
print(name, len(packets), "packets", "password" if password else "no password")
