#!/usr/bin/env python3
"""Writes the log-format fuzzer's seed corpus (Tests/Fuzz/corpus/log-format).

An input is a log_format template, then the session's client-chosen values, each after a
0xFF byte, in the order of LogFormatFuzzChecks.Slot:
  0 preread SNI (Latin-1 bytes)   1 preread ALPN names (0x00 between names)
  2 TLV authority   3 TLV unique_id   4 TLV 0xE0   5 SSL sub-TLV CN (all raw bytes)
  6 TLS SNI   7 TLS client subject DN   8 TLS ALPN (UTF-8 text, as OpenSSL gives it)
  9 the refusing variable's value   10 a limit key (raw bytes)
  11 a unix datagram client's socket path   12 an unresolved proxy_pass host   13 a rule's text
A value that is missing is not set. Seeds are named seed-WHAT.bin; LogFormatCorpusReplayTests
replays them (and crash-/merged files) through the harness's checks.

Usage: python3 Tests/Fuzz/make-log-format-corpus.py [OUTPUT_DIR]
Stale seed-* files are removed first; other files are kept.
"""
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
SEP = b"\xff"

PLAIN = b"$remote_addr [$time_local] $protocol $status $bytes_sent $bytes_received $session_time"
JSON = (b'{"time":"$time_iso8601","client":"$remote_addr","port":$remote_port,"status":$status,'
        b'"sni":"$ssl_preread_server_name","alpn":"$ssl_preread_alpn_protocols"}')
TLS = b'$remote_addr "$ssl_server_name" "$ssl_alpn_protocol" "$ssl_client_s_dn" $ssl_protocol $ssl_cipher'
PROXY = (b"$proxy_protocol_addr:$proxy_protocol_port $proxy_protocol_tlv_authority "
         b"${proxy_protocol_tlv_unique_id} $proxy_protocol_tlv_0xE0 $proxy_protocol_tlv_ssl_cn")

HOSTILE = {
    "newline": b"evil.example\nforged line 200 0 0",
    "crlf": b"a\r\nb\r\n",
    "quote": b'x" "forged',
    "backslash": b"a\\x41\\",
    "json-break": b'","status":200,"x":"',
    "controls": bytes(range(0x00, 0x20)) + b"\x7f",
    "high-latin1": bytes(range(0x80, 0xFF)),
    "invalid-utf8": b"\xc3\x28\xa0\xa1\xe2\x28\xa1\xf0\x90\x28\xbc\xed\xa0\x80",
    "utf8": "caf\u00e9 \u2603 \U0001F512 e\u0301".encode(),
    "line-separators": "a\u2028b\u2029c\u0085d".encode(),
    "nul": b"\x00\x00abc\x00",
    "empty": b"",
    "long": b"A" * 300,
    "escape-lookalike": b"\\x0A\\u000a\\n",
}


def record(**slots) -> bytes:
    order = ["sni", "alpn", "authority", "unique_id", "tlv_e0", "ssl_cn", "tls_sni", "tls_dn", "tls_alpn",
             "deciding", "limit_key", "unix_path", "host", "rule"]
    values = [slots.get(name) for name in order]
    while values and values[-1] is None:
        values.pop()
    out = b""
    for value in values:
        out += SEP + (value if value is not None else b"")
    return out


def everywhere(value: bytes) -> bytes:
    """The value in every slot (the unix path and host only stop the audit line differing)."""
    return record(sni=value, alpn=value + b"\x00h2", authority=value, unique_id=value, tlv_e0=value,
                  ssl_cn=value, tls_sni=value, tls_dn=value, tls_alpn=value, deciding=value,
                  limit_key=value, rule=value)


def main() -> None:
    out_dir = sys.argv[1] if len(sys.argv) > 1 else os.path.join(HERE, "corpus", "log-format")
    os.makedirs(out_dir, exist_ok=True)
    for name in os.listdir(out_dir):
        if name.startswith("seed-"):
            os.remove(os.path.join(out_dir, name))
    seeds = {
        "plain-no-values": PLAIN,
        "json-no-values": JSON,
        "tls-typical": TLS + record(tls_sni=b"example.com", tls_dn=b"CN=client,O=Example", tls_alpn=b"h2"),
        "preread-typical": JSON + record(sni=b"example.com", alpn=b"h2\x00http/1.1"),
        "proxy-typical": PROXY + record(authority=b"example.com", unique_id=b"\x01\x02\x03", tlv_e0=b"tenant-7",
                                        ssl_cn=b"client.example"),
        "unix-client": PLAIN + record(unix_path=b"/tmp/client\n.sock"),
        "abstract-unix-client": PLAIN + record(unix_path=b"\x00abstract"),
        "unresolved-host": PLAIN + record(host=b"bad\nhost\"", rule=b"proxy_pass $backend;"),
        "limit-key": PLAIN + record(limit_key=b"\x0a\x00\x00\x01", deciding=b"1"),
        # Template edge cases (parse errors are fine; they must not crash).
        "template-dollar-at-end": b"$remote_addr $",
        "template-unterminated-brace": b"${remote_addr",
        "template-empty-brace": b"${} x",
        "template-capture": b"$1 $1x $9",
        "template-unknown": b"$remote_adr $proxy_protocol_tlv_0x $proxy_protocol_tlv_0xZZ $proxy_protocol_tlv_0x1234",
        "template-adjacent": b"$remote_addr$remote_port${status}x$$",
        "template-non-ascii": "\u00e9$remote_addr\u2603${ssl_preread_server_name}\U0001F512".encode()
                              + record(sni=b"\xe9"),
        "template-controls": b"\t$status\x01$protocol\r" + record(sni=b"\n"),
        "template-every-variable": b" ".join(b"$" + name for name in [
            b"remote_addr", b"remote_port", b"binary_remote_addr", b"server_addr", b"server_port", b"protocol",
            b"connection", b"status", b"bytes_sent", b"bytes_received", b"session_time", b"msec",
            b"time_iso8601", b"time_local", b"hostname", b"pid", b"upstream_addr", b"upstream_connect_time",
            b"upstream_first_byte_time", b"upstream_bytes_sent", b"upstream_bytes_received",
            b"upstream_session_time", b"proxy_protocol_addr", b"proxy_protocol_port",
            b"proxy_protocol_server_addr", b"proxy_protocol_server_port", b"realip_remote_addr",
            b"realip_remote_port", b"limit_conn_status", b"ssl_protocol", b"ssl_cipher", b"ssl_server_name",
            b"ssl_alpn_protocol", b"ssl_session_reused", b"ssl_client_s_dn", b"ssl_client_verify",
            b"ssl_preread_server_name", b"ssl_preread_alpn_protocols", b"ssl_preread_protocol",
            b"nginx_version", b"portcullis_version", b"proxy_protocol_tlv_alpn", b"proxy_protocol_tlv_netns",
            b"proxy_protocol_tlv_ssl_version", b"proxy_protocol_tlv_ssl_cipher", b"proxy_protocol_tlv_0x05"])
            + everywhere(b'x"\n\\\x00\xe9'),
    }
    for what, value in HOSTILE.items():
        template = JSON if what.startswith(("json", "utf8", "line")) else TLS if what in ("quote", "crlf") else PROXY
        seeds[f"hostile-{what}"] = template + everywhere(value)
    assert all(SEP not in template for template in (PLAIN, JSON, TLS, PROXY))
    for name, data in sorted(seeds.items()):
        assert len(data) <= 4096, (name, len(data))
        with open(os.path.join(out_dir, f"seed-{name}.bin"), "wb") as f:
            f.write(data)
    print(f"{len(seeds)} seeds in {out_dir}")


if __name__ == "__main__":
    main()
