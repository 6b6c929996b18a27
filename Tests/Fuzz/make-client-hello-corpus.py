#!/usr/bin/env python3
"""Writes the ClientHello peeker's fuzz seed corpus (Tests/Fuzz/corpus/client-hello).

Two kinds of seeds:

* Handcrafted ClientHellos, built here byte by byte from RFC 8446 / RFC 5246 / RFC 6066 /
  RFC 7301 / RFC 8701 (GREASE) and from what nginx's ngx_stream_ssl_preread_module.c accepts,
  independently of the Swift peeker. Always rewritten; deterministic (the "random" fields are
  fixed bytes).
* Captured ClientHellos (`hello-capture-*`), the first bytes real clients (openssl s_client,
  curl, Python's ssl module, wget) send to a listener on 127.0.0.1. Only rewritten with
  --capture, since every capture has new random bytes and key shares. They hold no secrets:
  the connection is closed before the server says anything.

Names say what the peeker must answer (ClientHelloCorpusReplayTests enforces it):
  hello-*     a ClientHello (maybe followed by other bytes): .hello
  bad-*       never a ClientHello: .notTLS
  partial-*   a proper prefix of a ClientHello: .needMore
Files with other names (crash reproducers, `--merge`d inputs) only have to not crash.
ClientHelloTests also checks the values the captured files carry (SNI example.com, ALPN
h2,http/1.1 where asked, protocol), so keep the client options below in step with it.

Usage: python3 Tests/Fuzz/make-client-hello-corpus.py [--capture] [OUTPUT_DIR]
(default: Tests/Fuzz/corpus/client-hello next to this script). Stale handcrafted seeds
(hello-/bad-/partial- files that are not hello-capture-*) are removed first; other files are kept.
"""
import os
import shutil
import socket
import struct
import subprocess
import sys
import threading

# ---------------------------------------------------------------- building blocks


def u8(n):
    return struct.pack("!B", n)


def u16(n):
    return struct.pack("!H", n)


def u24(n):
    return struct.pack("!I", n)[1:]


def vec8(b):
    return u8(len(b)) + b


def vec16(b):
    return u16(len(b)) + b


def ext(kind, data):
    return u16(kind) + vec16(data)


def sni(*names, name_type=0):
    return ext(0, vec16(b"".join(u8(name_type) + vec16(n) for n in names)))


def alpn(*protocols):
    return ext(16, vec16(b"".join(vec8(p) for p in protocols)))


def supported_versions(*versions):
    return ext(43, vec8(b"".join(u16(v) for v in versions)))


RANDOM = bytes(range(32))
SESSION_ID = bytes(range(0xA0, 0xC0))
CIPHERS = u16(0x1301) + u16(0x1302) + u16(0xC02F) + u16(0x009C)


def hello_body(extensions=None, version=0x0303, session_id=SESSION_ID, ciphers=CIPHERS,
               compression=b"\x00", raw_extensions=None):
    """The ClientHello body; extensions=None leaves the extensions block out entirely."""
    body = u16(version) + RANDOM + vec8(session_id) + vec16(ciphers) + vec8(compression)
    if raw_extensions is not None:
        body += raw_extensions
    elif extensions is not None:
        body += vec16(b"".join(extensions))
    return body


def handshake(body, msg_type=1):
    return u8(msg_type) + u24(len(body)) + body


def records(hs, size=None, content_type=0x16, version=0x0301):
    """Wraps handshake bytes in TLS records of at most `size` bytes (one record if None)."""
    size = size or max(len(hs), 1)
    out = b""
    for i in range(0, len(hs), size):
        chunk = hs[i:i + size]
        out += u8(content_type) + u16(version) + vec16(chunk)
    return out


def record(payload, content_type=0x16, version=0x0301):
    return u8(content_type) + u16(version) + vec16(payload)


# A typical modern hello: SNI, ALPN, supported_versions (TLS 1.3 and 1.2).
TYPICAL_EXT = [sni(b"example.com"), alpn(b"h2", b"http/1.1"), supported_versions(0x0304, 0x0303)]
TYPICAL = handshake(hello_body(TYPICAL_EXT))
GREASE_EXT = [
    ext(0x0A0A, b""),
    sni(b"grease.example"),
    supported_versions(0x3A3A, 0x0304, 0x0303),
    alpn(b"h2"),
    ext(0xFAFA, b"\x00"),
]


def padded_to(total, extensions):
    """A hello of exactly `total` handshake bytes: the extensions, then a padding extension (21)."""
    bare = len(handshake(hello_body(extensions + [ext(21, b"")])))
    return handshake(hello_body(extensions + [ext(21, bytes(total - bare))]))


def sslv2_hello(version=0x0301, msg_type=1):
    """An SSLv2-compatible ClientHello (2-byte header with the top bit set), as old clients sent."""
    specs = b"\x00\x00\x2f" + b"\x00\x00\x35" + b"\x01\x00\x80"  # three 3-byte cipher specs
    challenge = bytes(range(16))
    body = u8(msg_type) + u16(version) + u16(len(specs)) + u16(0) + u16(len(challenge)) + specs + challenge
    return u16(0x8000 | len(body)) + body


HTTP_GET = b"GET / HTTP/1.1\r\nHost: example.com\r\n\r\n"

VALID = {
    "hello-typical": records(TYPICAL),
    "hello-typical-then-app-data": records(TYPICAL) + record(b"\x01" * 40, content_type=0x17),
    "hello-typical-then-garbage": records(TYPICAL) + b"\xff" * 16,
    "hello-no-extensions": records(handshake(hello_body(None))),
    "hello-empty-extensions-block": records(handshake(hello_body([]))),
    "hello-no-sni": records(handshake(hello_body([alpn(b"h2"), supported_versions(0x0304)]))),
    "hello-no-alpn": records(handshake(hello_body([sni(b"example.com")]))),
    "hello-tls12-no-supported-versions": records(handshake(hello_body([sni(b"example.com"), alpn(b"http/1.1")]))),
    "hello-tls10-legacy": records(handshake(hello_body([sni(b"old.example")], version=0x0301)), version=0x0300),
    "hello-ssl3-legacy": records(handshake(hello_body(None, version=0x0300)), version=0x0300),
    "hello-unknown-legacy-version": records(handshake(hello_body(None, version=0x0305))),
    "hello-supported-versions-tls12-only": records(handshake(hello_body([supported_versions(0x0303)]))),
    "hello-supported-versions-grease-only": records(handshake(hello_body([supported_versions(0x7A7A)]))),
    "hello-supported-versions-empty": records(handshake(hello_body([ext(43, b"\x00")]))),
    "hello-grease": records(handshake(hello_body(GREASE_EXT, ciphers=u16(0xDADA) + CIPHERS))),
    "hello-1-byte-records": records(TYPICAL, size=1),
    "hello-7-byte-records": records(TYPICAL, size=7),
    "hello-header-split-from-body": records(TYPICAL[:4]) + records(TYPICAL[4:]),
    "hello-zero-length-records": record(b"") + record(TYPICAL[:50]) + record(b"") + record(b"") + record(TYPICAL[50:]),
    "hello-record-versions-mixed": record(TYPICAL[:30], version=0x0300) + record(TYPICAL[30:], version=0x03FF),
    "hello-record-longer-than-hello": record(TYPICAL + bytes(100))[:5 + len(TYPICAL)],
    "hello-sni-empty-host": records(handshake(hello_body([sni(b""), alpn(b"h2")]))),
    "hello-sni-two-names": records(handshake(hello_body([sni(b"first.example", b"second.example")]))),
    "hello-sni-second-entry-other-type": records(handshake(hello_body(
        [ext(0, vec16(u8(0) + vec16(b"first.example") + u8(7) + vec16(b"x")))]))),
    "hello-duplicate-sni-first-wins": records(handshake(hello_body([sni(b"first.example"), sni(b"second.example")]))),
    "hello-duplicate-alpn-first-wins": records(handshake(hello_body([alpn(b"h2"), alpn(b"spdy/3")]))),
    "hello-duplicate-sni-second-malformed": records(handshake(hello_body([sni(b"first.example"), ext(0, b"\xff")]))),
    "hello-sni-latin1-and-control-bytes": records(handshake(hello_body([sni(b"caf\xc3\xa9\x00\x1b[31m.example\xff")]))),
    "hello-sni-uppercase-trailing-dot": records(handshake(hello_body([sni(b"WWW.Example.COM.")]))),
    "hello-sni-255-bytes": records(handshake(hello_body([sni(b"a" * 63 + b"." + b"b" * 63 + b"." + b"c" * 63 + b"." + b"d" * 63)]))),
    "hello-alpn-many": records(handshake(hello_body([alpn(*[b"proto-%d" % i for i in range(40)])]))),
    "hello-alpn-with-comma": records(handshake(hello_body([alpn(b"a,b", b"c")]))),
    "hello-alpn-binary": records(handshake(hello_body([alpn(b"\x0a\x0a", b"\x00\xff")]))),
    "hello-unknown-extensions": records(handshake(hello_body([ext(0xFF01, b"\x00"), ext(21, bytes(200)), sni(b"late.example")]))),
    "hello-max-record": records(padded_to(16384 + 2048, [sni(b"big.example")])),
    "hello-larger-than-a-record": records(handshake(hello_body([ext(21, bytes(20000)), sni(b"huge.example")])), size=16384),
    "hello-empty-session-id-no-compression": records(handshake(hello_body([sni(b"example.com")], session_id=b"", compression=b""))),
    "hello-sslv2-compatible-tls10": sslv2_hello(0x0301),
    "hello-sslv2-compatible-tls12": sslv2_hello(0x0303),
    "hello-sslv2-version-2": sslv2_hello(0x0002),
    "hello-sslv2-ssl3": sslv2_hello(0x0300),
    "hello-sslv2-just-5-bytes": sslv2_hello(0x0301)[:5],
}

# The first record's hello, cut short, for "a later record is bad".
HALF = TYPICAL[:60]

BAD = {
    "bad-http-get": HTTP_GET,
    "bad-http-get-first-byte": b"G",
    "bad-ssh-banner": b"SSH-2.0-OpenSSH_9.2p1 Debian-2\r\n",
    "bad-smtp-ehlo": b"EHLO client.example\r\n",
    "bad-proxy-v1-before-hello": b"PROXY TCP4 192.0.2.1 192.0.2.2 1234 443\r\n" + records(TYPICAL),
    "bad-nul": b"\x00" * 8,
    "bad-alert-record": record(b"\x02\x28", content_type=0x15),
    "bad-change-cipher-spec-first": record(b"\x01", content_type=0x14) + records(TYPICAL),
    "bad-application-data-first": record(b"hello", content_type=0x17),
    "bad-heartbeat-record": record(b"\x01\x00\x10" + bytes(16), content_type=0x18),
    "bad-record-version-2": b"\x16\x02\x00" + vec16(TYPICAL),
    "bad-record-version-4": b"\x16\x04\x01" + vec16(TYPICAL),
    "bad-record-too-long": b"\x16\x03\x01" + u16(16384 + 2048 + 1) + TYPICAL,
    "bad-record-length-ffff": b"\x16\x03\x01\xff\xff" + TYPICAL,
    "bad-server-hello": records(handshake(hello_body(None), msg_type=2)),
    "bad-hello-request": records(handshake(b"", msg_type=0)),
    "bad-hello-length-too-short": records(u8(1) + u24(10) + TYPICAL[4:14]),
    "bad-hello-length-zero": records(u8(1) + u24(0)),
    "bad-session-id-overrun": records(handshake(u16(0x0303) + RANDOM + u8(40) + SESSION_ID)),
    "bad-ciphers-overrun": records(handshake(u16(0x0303) + RANDOM + vec8(b"") + u16(200) + CIPHERS)),
    "bad-compression-overrun": records(handshake(u16(0x0303) + RANDOM + vec8(b"") + vec16(CIPHERS) + u8(9) + b"\x00")),
    "bad-extensions-length-short": records(handshake(hello_body(raw_extensions=u16(3) + sni(b"example.com")))),
    "bad-extensions-length-long": records(handshake(hello_body(raw_extensions=u16(100) + sni(b"example.com")))),
    "bad-extensions-length-one-byte": records(handshake(hello_body(raw_extensions=b"\x00"))),
    "bad-extension-header-cut": records(handshake(hello_body(raw_extensions=u16(3) + b"\x00\x00\x00"))),
    "bad-extension-data-overrun": records(handshake(hello_body(raw_extensions=u16(6) + u16(21) + u16(10) + b"\x00\x00"))),
    "bad-sni-name-type-1": records(handshake(hello_body([sni(b"example.com", name_type=1)]))),
    "bad-sni-empty-list": records(handshake(hello_body([ext(0, vec16(b""))]))),
    "bad-sni-empty-extension": records(handshake(hello_body([ext(0, b""), alpn(b"h2")]))),
    "bad-sni-list-shorter-than-extension": records(handshake(hello_body([ext(0, vec16(u8(0) + vec16(b"example.com")) + b"\x00")]))),
    "bad-sni-list-longer-than-extension": records(handshake(hello_body([ext(0, u16(20) + u8(0) + vec16(b"example.com"))]))),
    "bad-sni-host-overrun": records(handshake(hello_body([ext(0, vec16(u8(0) + u16(50) + b"example.com"))]))),
    "bad-alpn-empty-list": records(handshake(hello_body([ext(16, vec16(b""))]))),
    "bad-alpn-empty-name": records(handshake(hello_body([ext(16, vec16(b"\x02h2\x00"))]))),
    "bad-alpn-name-overrun": records(handshake(hello_body([ext(16, vec16(b"\x09h2"))]))),
    "bad-alpn-list-mismatch": records(handshake(hello_body([ext(16, u16(2) + b"\x02h2")]))),
    "bad-supported-versions-odd": records(handshake(hello_body([ext(43, b"\x03\x03\x04\x03")]))),
    "bad-supported-versions-mismatch": records(handshake(hello_body([ext(43, b"\x04\x03\x04")]))),
    "bad-second-record-application-data": records(HALF) + record(TYPICAL[60:], content_type=0x17),
    "bad-second-record-alert": records(HALF) + record(b"\x02\x28", content_type=0x15),
    "bad-second-record-sslv2-shaped": records(HALF) + b"\x80\x2e\x01\x03\x01" + bytes(8),
    "bad-second-record-version-2": records(HALF) + b"\x16\x02\x01" + vec16(TYPICAL[60:]),
    "bad-sslv2-not-client-hello": sslv2_hello(0x0301, msg_type=2),
    "bad-sslv2-version-1-1": sslv2_hello(0x0101),
    "bad-top-bit-garbage": b"\xff\xff\xff\xff\xff",
}

PARTIAL = {
    "partial-one-byte": b"\x16",
    "partial-two-bytes": b"\x16\x03",
    "partial-record-header": records(TYPICAL)[:5],
    "partial-handshake-header": records(TYPICAL)[:8],
    "partial-half-hello": records(TYPICAL)[:len(TYPICAL) // 2],
    "partial-missing-last-byte": records(TYPICAL)[:-1],
    "partial-1-byte-records-missing-last": records(TYPICAL, size=1)[:-1],
    "partial-1-byte-records-missing-last-header": records(TYPICAL, size=1)[:-6],
    "partial-huge-hello-length": records(u8(1) + u24(0xFFFFFF) + TYPICAL[4:44]),
    "partial-huge-hello-in-huge-record": b"\x16\x03\x01\x48\x00" + u8(1) + u24(0xFFFFFF) + TYPICAL[4:44],
    "partial-zero-length-records-only": record(b"") * 5,
    "partial-waiting-for-second-record": records(HALF),
    "partial-sslv2-4-bytes": sslv2_hello(0x0301)[:4],
    "partial-sslv2-2-bytes": sslv2_hello(0x0301)[:2],
    "partial-extension-data-cut": records(TYPICAL)[:-3],
}

# ---------------------------------------------------------------- capture


def read_hello(conn):
    """Reads from conn until a whole ClientHello has arrived (records parsed here, independently
    of the Swift peeker); returns the bytes read."""
    data = b""
    conn.settimeout(10)

    def need(n):
        nonlocal data
        while len(data) < n:
            chunk = conn.recv(65536)
            if not chunk:
                raise EOFError(f"closed after {len(data)} bytes")
            data += chunk

    pos, hs = 0, b""
    while True:
        need(pos + 5)
        if data[pos] != 0x16:
            raise ValueError(f"record type {data[pos]:#x}")
        length = struct.unpack("!H", data[pos + 3:pos + 5])[0]
        need(pos + 5 + length)
        hs += data[pos + 5:pos + 5 + length]
        pos += 5 + length
        if len(hs) >= 4 and len(hs) >= 4 + struct.unpack("!I", b"\x00" + hs[1:4])[0]:
            return data


def capture(command, env=None):
    """Runs command (with PORT substituted) against a listener that only reads the hello."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    port = listener.getsockname()[1]
    result = {}

    def serve():
        conn, _ = listener.accept()
        try:
            result["data"] = read_hello(conn)
        except Exception as error:  # reported below
            result["error"] = error
        finally:
            conn.close()

    thread = threading.Thread(target=serve)
    thread.start()
    args = [a.replace("PORT", str(port)) for a in command]
    subprocess.run(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                   timeout=20, env=env)
    thread.join(20)
    listener.close()
    if "data" not in result:
        raise RuntimeError(f"{' '.join(args)}: {result.get('error', 'no connection')}")
    return result["data"]


PYTHON_CLIENT = """
import socket, ssl, sys
ctx = ssl.create_default_context()
ctx.check_hostname = False
ctx.verify_mode = ssl.CERT_NONE
ctx.set_alpn_protocols(["h2", "http/1.1"])
s = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
try:
    ctx.wrap_socket(s, server_hostname="example.com")
except Exception:
    pass
"""

S_CLIENT = ["openssl", "s_client", "-connect", "127.0.0.1:PORT"]
CAPTURES = {
    # SNI example.com and ALPN h2,http/1.1 unless the name says otherwise.
    "hello-capture-openssl-tls13": S_CLIENT + ["-servername", "example.com", "-alpn", "h2,http/1.1"],
    "hello-capture-openssl-tls12": S_CLIENT + ["-servername", "example.com", "-alpn", "h2,http/1.1", "-tls1_2"],
    "hello-capture-openssl-tls1-no-alpn": S_CLIENT + ["-servername", "example.com", "-tls1", "-cipher", "DEFAULT@SECLEVEL=0"],
    "hello-capture-openssl-no-sni": S_CLIENT + ["-noservername", "-alpn", "h2,http/1.1"],
    # -max_send_frag 512 splits a hello larger than 512 bytes across records.
    "hello-capture-openssl-fragmented": S_CLIENT + ["-servername", "example.com", "-max_send_frag", "512", "-alpn",
                                                    "h2,http/1.1," + ",".join(f"x-protocol-{i:03}" for i in range(40))],
    "hello-capture-curl": ["curl", "-sk", "--max-time", "5", "--resolve", "example.com:PORT:127.0.0.1", "https://example.com:PORT/"],
    "hello-capture-curl-http1.1-tls12": ["curl", "-sk", "--max-time", "5", "--http1.1", "--tlsv1.2", "--tls-max", "1.2",
                                         "--resolve", "example.com:PORT:127.0.0.1", "https://example.com:PORT/"],
    "hello-capture-python-ssl": [sys.executable, "-c", PYTHON_CLIENT, "PORT"],
    "hello-capture-wget": ["wget", "-q", "-O", "/dev/null", "--timeout=5", "--tries=1", "--no-check-certificate",
                           "https://localhost:PORT/"],
}


def main() -> None:
    args = sys.argv[1:]
    do_capture = "--capture" in args
    args = [a for a in args if a != "--capture"]
    out = args[0] if args else os.path.join(os.path.dirname(os.path.abspath(__file__)), "corpus", "client-hello")
    os.makedirs(out, exist_ok=True)
    for name in os.listdir(out):
        if name.startswith(("hello-", "bad-", "partial-")) and (do_capture or not name.startswith("hello-capture-")):
            os.remove(os.path.join(out, name))
    count = 0
    for group in (VALID, BAD, PARTIAL):
        for name, data in group.items():
            with open(os.path.join(out, name + ".bin"), "wb") as f:
                f.write(data)
            count += 1
    if do_capture:
        for name, command in CAPTURES.items():
            if shutil.which(command[0]) is None:
                print(f"skipped {name}: no {command[0]}", file=sys.stderr)
                continue
            data = capture(command)
            with open(os.path.join(out, name + ".bin"), "wb") as f:
                f.write(data)
            print(f"captured {name}: {len(data)} bytes", file=sys.stderr)
            count += 1
    print(f"wrote {count} seed files to {out}")


if __name__ == "__main__":
    main()
