#!/usr/bin/env python3
"""Writes the PROXY header fuzzer's seed corpus: one file per specification vector.

The vectors are written by hand from HAProxy's doc/proxy-protocol.txt (revision 2026/04/27,
summarised in anchors.md §2), independently of ProxyHeaderEncoder; CRC32C values are computed
here with a bitwise CRC-32C. Tests/PortcullisWireTests/SpecVectors.swift holds the same
vectors and FuzzCorpusReplayTests checks that both agree byte for byte.

Names say what a file must do (FuzzCorpusReplayTests enforces it):
  v1-*, v2-*   a complete valid header, exactly the whole file
  bad-*        invalid: the decoder must throw
  partial-*    a valid prefix: the decoder must ask for more bytes
  encoder-*    arguments for the harness's encoder mode (first byte 0xEE); not PROXY headers
Files with other names (crash reproducers, `--merge`d inputs) only have to not crash.

Usage: python3 Tests/Fuzz/make-seed-corpus.py [OUTPUT_DIR]
(default: Tests/Fuzz/corpus/proxy-header next to this script). Stale seed files
(v1-/v2-/bad-/partial-/encoder-) are removed first; other files are kept.
"""
import os
import sys


def crc32c(data: bytes) -> int:
    crc = 0xFFFFFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
    return crc ^ 0xFFFFFFFF


assert crc32c(b"123456789") == 0xE3069283
assert crc32c(bytes(32)) == 0x8A9136AA


def h(text: str) -> bytes:
    return bytes.fromhex(text.replace(" ", "").replace("\n", ""))


def a(text: str) -> bytes:
    return text.encode("ascii")


def unix_path(path: str) -> bytes:
    return a(path).ljust(108, b"\0")


def with_crc(header: bytes) -> bytes:
    """Fills in the last 4 bytes (a zeroed CRC32C TLV value) of a v2 header."""
    assert header[-7:-4] == h("03 0004") and header[-4:] == bytes(4)
    return header[:-4] + crc32c(header).to_bytes(4, "big")


def v2(ver_cmd: int, fam: int, block: bytes) -> bytes:
    return SIG + bytes([ver_cmd, fam]) + len(block).to_bytes(2, "big") + block


def v1_filler(count: int, ending: bytes = b"") -> bytes:
    head = a("PROXY UNKNOWN ")
    return head + b"a" * (count - len(head) - len(ending)) + ending


SIG = h("0D0A0D0A 000D0A51 5549540A")
TCP4 = h("C0A80001 C0A8000B DC04 01BB")  # 192.168.0.1:56324 -> 192.168.0.11:443
TCP6 = h("20010DB8 00000000 00000000 00000001 20010DB8 00000000 00000000 00000002 C822 01BB")
FFFF8 = "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"
EXAMPLE = h("02 000B") + a("example.com")
UNIQUE16 = h("05 0010") + bytes(range(16))
SSL = (h("20 0033 07 00000000") + h("21 0007") + a("TLSv1.3") + h("22 0008") + a("client-1")
       + h("23 0016") + a("TLS_AES_128_GCM_SHA256"))
assert len(SSL) == 3 + 0x33

CRC_TCP4 = with_crc(v2(0x21, 0x11, TCP4 + h("03 0004 00000000")))
assert CRC_TCP4[-4:] == h("1C1AE9C6")
# CRC first, then AUTHORITY: the CRC covers the whole header whatever the TLV order.
crc6_zeroed = v2(0x21, 0x21, TCP6 + h("03 0004 00000000") + EXAMPLE)
CRC_TCP6 = crc6_zeroed[:-18] + crc32c(crc6_zeroed).to_bytes(4, "big") + crc6_zeroed[-14:]
assert CRC_TCP6[-18:-14] == h("A76572ED")

VALID = {
    "v1-tcp4": a("PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\n"),
    "v1-tcp4-longest": a("PROXY TCP4 255.255.255.255 255.255.255.255 65535 65535\r\n"),
    "v1-tcp4-port-zero": a("PROXY TCP4 0.0.0.0 10.0.0.1 0 0\r\n"),
    "v1-tcp6": a("PROXY TCP6 2001:db8::1 2001:db8::2 51234 443\r\n"),
    "v1-tcp6-longest": a(f"PROXY TCP6 {FFFF8} {FFFF8} 65535 65535\r\n"),
    "v1-tcp6-ipv4-mapped": a("PROXY TCP6 ::ffff:10.0.0.1 ::1 1 2\r\n"),
    "v1-unknown": a("PROXY UNKNOWN\r\n"),
    "v1-unknown-with-addresses": a("PROXY UNKNOWN 10.0.0.1 10.0.0.2 1234 80\r\n"),
    "v1-unknown-worst-case-107": a(f"PROXY UNKNOWN {FFFF8} {FFFF8} 65535 65535\r\n"),
    "v1-unknown-filler-107": v1_filler(107, b"\r\n"),
    "v2-local": v2(0x20, 0x00, b""),
    "v2-local-with-tcp4-block": v2(0x20, 0x11, TCP4),
    "v2-local-with-garbage-block": v2(0x20, 0x00, h("FFFFFFFFFF")),
    "v2-local-transport-3": v2(0x20, 0x03, b""),
    "v2-tcp4": v2(0x21, 0x11, TCP4),
    "v2-udp4": v2(0x21, 0x12, h("0A000001 0A000002 3039 0035")),
    "v2-tcp6": v2(0x21, 0x21, TCP6),
    "v2-udp6": v2(0x21, 0x22, bytes(15) + b"\1" + bytes(15) + b"\2" + h("04D2 14E9")),
    "v2-unix-stream": v2(0x21, 0x31, unix_path("/var/run/client.sock") + unix_path("/var/run/server.sock")),
    "v2-unix-dgram": v2(0x21, 0x32, unix_path("/dev/log") + unix_path("/run/syslog")),
    "v2-proxy-unspec": v2(0x21, 0x00, b""),
    "v2-proxy-unspec-authority": v2(0x21, 0x00, h("02 0004") + a("host")),
    "v2-tcp4-alpn-authority": v2(0x21, 0x11, TCP4 + h("01 0002") + a("h2") + EXAMPLE),
    "v2-tcp4-two-tlvs": v2(0x21, 0x11, TCP4 + EXAMPLE + UNIQUE16),
    "v2-tcp4-noop": v2(0x21, 0x11, TCP4 + h("04 0000 04 0003 000000")),
    "v2-tcp6-ssl": v2(0x21, 0x21, TCP6 + SSL),
    "v2-tcp4-netns": v2(0x21, 0x11, TCP4 + h("30 0004") + a("blue")),
    "v2-tcp4-custom-tlvs": v2(0x21, 0x11, TCP4 + h("E0 0002 ABCD EF 0000 E7 0001 FF")),
    "v2-tcp4-crc32c": CRC_TCP4,
    "v2-tcp6-crc32c-then-authority": CRC_TCP6,
    # Fuzzer seeds beyond the Swift golden vectors.
    "v2-tcp4-all-tlv-types": with_crc(v2(0x21, 0x11, TCP4 + h("01 0002") + a("h2") + EXAMPLE + h("04 0000")
                                          + UNIQUE16 + SSL + h("30 0004") + a("blue")
                                          + h("E0 0001 00 F0 0001 00 F8 0001 00") + h("03 0004 00000000"))),
    "v2-tcp6-unique-id-128": v2(0x21, 0x21, TCP6 + h("05 0080") + bytes(range(128))),
    "v2-local-with-crc32c-block": v2(0x20, 0x11, TCP4 + h("03 0004 DEADBEEF")),
}

BAD = {
    "bad-v2-signature": h("0D0A0D0A 000D0A51 5549540B") + h("21 11 000C") + TCP4,
    "bad-http-request": a("GET / HTTP/1.1\r\nHost: a\r\n\r\n"),
    "bad-v1-lowercase-proxy": a("proxy TCP4 192.168.0.1 192.168.0.11 56324 443\r\n"),
    "bad-v1-proxy-crlf": a("PROXY\r\n"),
    "bad-v2-version-0": v2(0x01, 0x11, TCP4),
    "bad-v2-version-1": v2(0x11, 0x11, TCP4),
    "bad-v2-version-3": v2(0x31, 0x11, TCP4),
    "bad-v2-version-f": v2(0xF1, 0x11, TCP4),
    **{f"bad-v2-command-{c:x}": v2(0x20 | c, 0x11, TCP4) for c in range(0x2, 0x10)},
    "bad-v2-family-4": v2(0x21, 0x41, TCP4),
    "bad-v2-family-f": v2(0x21, 0xF1, TCP4),
    "bad-v2-transport-3": v2(0x21, 0x13, TCP4),
    "bad-v2-transport-f": v2(0x21, 0x1F, TCP4),
    "bad-v2-two-crc32c": v2(0x21, 0x11, h("7f000001 7f000002 0001 0002 03 0004 00000000 03 0004 00000000")),
    "bad-v2-tcp4-block-11": v2(0x21, 0x11, TCP4[:11]),
    "bad-v2-tcp4-block-0": v2(0x21, 0x11, b""),
    "bad-v2-tcp6-with-tcp4-block": v2(0x21, 0x21, TCP4),
    "bad-v2-unix-with-tcp6-block": v2(0x21, 0x31, TCP6),
    "bad-v2-tlv-overrun": v2(0x21, 0x11, TCP4 + h("02 0005") + a("ab")),
    "bad-v2-tlv-header-cut": v2(0x21, 0x11, TCP4 + h("01 00")),
    "bad-v2-unspec-tlv-overrun": v2(0x21, 0x00, h("02 FFFF 61")),
    "bad-v2-crc32c-length-3": v2(0x21, 0x11, TCP4 + h("03 0003 1C1AE9")),
    "bad-v2-crc32c-length-5": v2(0x21, 0x11, TCP4 + h("03 0005 1C1AE9C6 00")),
    "bad-v2-crc32c-length-0": v2(0x21, 0x11, TCP4 + h("03 0000")),
    "bad-v2-crc32c-mismatch": CRC_TCP4[:-1] + b"\xC7",
    "bad-v2-crc32c-address-changed": CRC_TCP4[:19] + b"\x02" + CRC_TCP4[20:],
    "bad-v1-double-space-after-proxy": a("PROXY  TCP4 192.168.0.1 192.168.0.11 56324 443\r\n"),
    "bad-v1-double-space-after-tcp4": a("PROXY TCP4  192.168.0.1 192.168.0.11 56324 443\r\n"),
    "bad-v1-double-space-between-ports": a("PROXY TCP4 192.168.0.1 192.168.0.11 56324  443\r\n"),
    "bad-v1-trailing-space": a("PROXY TCP4 192.168.0.1 192.168.0.11 56324 443 \r\n"),
    "bad-v1-tab-separator": a("PROXY TCP4\t192.168.0.1 192.168.0.11 56324 443\r\n"),
    "bad-v1-missing-port": a("PROXY TCP4 192.168.0.1 192.168.0.11 56324\r\n"),
    "bad-v1-extra-field": a("PROXY TCP4 192.168.0.1 192.168.0.11 56324 443 1\r\n"),
    "bad-v1-empty-protocol": a("PROXY \r\n"),
    "bad-v1-udp4": a("PROXY UDP4 192.168.0.1 192.168.0.11 56324 443\r\n"),
    "bad-v1-lowercase-tcp4": a("PROXY tcp4 192.168.0.1 192.168.0.11 56324 443\r\n"),
    "bad-v1-unknownx": a("PROXY UNKNOWNX\r\n"),
    "bad-v1-leading-zero-octet": a("PROXY TCP4 192.168.0.01 192.168.0.11 56324 443\r\n"),
    "bad-v1-leading-zero-first-octet": a("PROXY TCP4 192.168.0.1 010.0.0.1 56324 443\r\n"),
    "bad-v1-leading-zero-port": a("PROXY TCP4 192.168.0.1 192.168.0.11 56324 0443\r\n"),
    "bad-v1-double-zero-port": a("PROXY TCP4 192.168.0.1 192.168.0.11 00 443\r\n"),
    "bad-v1-port-65536": a("PROXY TCP4 192.168.0.1 192.168.0.11 65536 443\r\n"),
    "bad-v1-port-99999": a("PROXY TCP4 192.168.0.1 192.168.0.11 56324 99999\r\n"),
    "bad-v1-port-six-digits": a("PROXY TCP4 192.168.0.1 192.168.0.11 100000 443\r\n"),
    "bad-v1-port-signed": a("PROXY TCP4 192.168.0.1 192.168.0.11 +1 443\r\n"),
    "bad-v1-octet-256": a("PROXY TCP4 192.168.0.256 192.168.0.11 56324 443\r\n"),
    "bad-v1-tcp4-with-ipv6": a("PROXY TCP4 2001:db8::1 2001:db8::2 51234 443\r\n"),
    "bad-v1-tcp4-with-ipv4-mapped": a("PROXY TCP4 ::ffff:10.0.0.1 ::ffff:10.0.0.2 1 2\r\n"),
    "bad-v1-tcp6-with-ipv4": a("PROXY TCP6 192.168.0.1 192.168.0.11 56324 443\r\n"),
    "bad-v1-tcp6-two-double-colons": a("PROXY TCP6 2001::db8::1 ::2 1 2\r\n"),
    "bad-v1-tcp6-brackets": a("PROXY TCP6 [::1] [::2] 1 2\r\n"),
    "bad-v1-tcp6-zone": a("PROXY TCP6 fe80::1%eth0 ::2 1 2\r\n"),
    "bad-v1-lone-cr": a("PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\rX"),
    "bad-v1-lone-lf": a("PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\n"),
    "bad-v1-cr-cr-lf": a("PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\r\n"),
    "bad-v1-lf-before-crlf": a("PROXY UNKNOWN\nX\r\n"),
    "bad-v1-no-crlf-in-107": v1_filler(107),
    "bad-v1-cr-at-byte-107": v1_filler(107, b"\r"),
    "bad-v1-crlf-ends-at-108": v1_filler(108, b"\r\n"),
}

# Inputs for the harness's encoder mode (first byte 0xEE; see ProxyHeaderFuzz.swift): flags,
# endpoints, then TLVs as type, length, value. The decoder only has to refuse them.
ENCODER = {
    "encoder-tcp4-authority": h("EE 05") + TCP4[:4] + TCP4[8:10] + TCP4[4:8] + TCP4[10:12] + EXAMPLE[:1] + b"\x0b" + a("example.com"),
    "encoder-tcp6-crc32c-v1": h("EE 62") + TCP6[:16] + TCP6[32:34] + TCP6[16:32] + TCP6[34:36] + h("05 04 01020304"),
    "encoder-mixed-datagram": h("EE 0B 0A000001 1234") + bytes(15) + b"\1" + h("0035 E0 02 ABCD"),
    "encoder-local": h("EE 11 0A000001 0001 0A000002 0002 02 01 61"),
    "encoder-oversized-tlv": h("EE A2") + bytes(36) + h("F5 FF 02 02 6869 03 04 00000000"),
}

PARTIAL = {
    "partial-v1-106-bytes": v1_filler(106),
    "partial-v1-cr-at-byte-106": v1_filler(106, b"\r"),
    "partial-v1-ends-with-cr": a("PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r"),
    "partial-v1-prefix": a("PROX"),
    "partial-v2-signature-only": SIG,
    "partial-v2-15-bytes": SIG + h("21 11 00"),
    "partial-v2-tcp4-missing-last-byte": v2(0x21, 0x11, TCP4)[:-1],
    "partial-v2-unix-half": VALID["v2-unix-stream"][:120],
    "partial-v2-len-ffff": SIG + h("21 11 FFFF") + TCP4,
}


def main() -> None:
    out = sys.argv[1] if len(sys.argv) > 1 else os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                             "corpus", "proxy-header")
    os.makedirs(out, exist_ok=True)
    for name in os.listdir(out):
        if name.startswith(("v1-", "v2-", "bad-", "partial-", "encoder-")):
            os.remove(os.path.join(out, name))
    count = 0
    for group in (VALID, BAD, PARTIAL, ENCODER):
        for name, data in group.items():
            with open(os.path.join(out, name + ".bin"), "wb") as f:
                f.write(data)
            count += 1
    print(f"wrote {count} seed files to {out}")


if __name__ == "__main__":
    main()
