#!/usr/bin/env python3
"""Writes the rule-file fuzzer's seed corpus (Tests/Fuzz/corpus/rule-file).

Seeds, each at most MAX_LEN bytes (run-fuzzer.sh's -max_len for this target):
  seed-rules-NAME.conf    every rules/*.conf, with `include` directives replaced by the files
                          they name (the harness skips inputs containing "include", so that
                          it never reads the file system) and comments that say "include" cut
  seed-test-FILE-N.conf   rule texts from the Swift tests: string literals that hold a
                          `stream {` block and no interpolation, with Swift's escapes decoded
                          (the first PER_TEST_FILE of each file)
  seed-syntax-WHAT.conf   handwritten edge cases of the lexer and parser
RuleFileCorpusReplayTests replays them all (and files merged in by the fuzzer) through the
harness's checks, and checks that the seed-rules- files still compile.

Usage: python3 Tests/Fuzz/make-rule-file-corpus.py [OUTPUT_DIR]
Stale seed-* files are removed first; other files (crash-*, merged inputs) are kept.
"""
import glob
import os
import re
import sys

MAX_LEN = 8192
# At most this many texts from one test file (CompilerDiagnosticsTests alone has 44), the
# first ones: the fuzzer finds the rest of a file's variations from them.
PER_TEST_FILE = 6
HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.normpath(os.path.join(HERE, "..", ".."))

SYNTAX = {
    "empty": "",
    "only-comment": "# nothing but a comment\n",
    "crlf": "stream {\r\n    server {\r\n        listen 8080;\r\n        proxy_pass 127.0.0.1:9000;\r\n    }\r\n}\r\n",
    "tabs": "stream {\n\tserver {\n\t\tlisten\t8080;\n\t\tdeny\tall;\n\t\tproxy_pass\t127.0.0.1:9000;\n\t}\n}\n",
    "unterminated-double-quote": "stream {\n    log_format main \"$remote_addr;\n}\n",
    "unterminated-single-quote": "stream {\n    log_format main '$remote_addr;\n}\n",
    "quote-then-word": "stream {\n    log_format main \"$status\"x;\n}\n",
    "escapes": "stream {\n    log_format e escape=json '\\'q\\' \\\"d\\\" \\\\ \\t \\r \\n \\x';\n"
               "    server { listen 8080; access_log /tmp/a e; proxy_pass 127.0.0.1:9000; }\n}\n",
    "dollar-brace": "stream {\n    map ${remote_addr} $m { default ${remote_port}x; }\n"
                    "    server { listen 8080; proxy_pass 127.0.0.1:$m; }\n}\n",
    "brace-in-word": "stream {\n    server { listen 8080; return a}b; }\n}\n",
    "extra-close": "stream {\n    server { listen 8080; proxy_pass 127.0.0.1:9000; }\n}\n}\n",
    "unclosed": "stream {\n    server {\n        listen 8080;\n",
    "missing-semicolon": "stream {\n    server {\n        listen 8080\n    }\n}\n",
    "semicolon-only": ";;;\n",
    "block-without-name": "{ }\n",
    "non-ascii": "stream {\n    # caf\u00e9 \u2603 \U0001F512\n    map $ssl_preread_server_name $t {\n"
                 "        \u00fcber.example 127.0.0.1:9001;\n        \"\u65e5\u672c.example\" 127.0.0.1:9002;\n"
                 "        default 127.0.0.1:9000;\n    }\n"
                 "    server { listen 8443; ssl_preread on; proxy_pass $t; }\n}\n",
    "invalid-utf8": b"stream {\n    server { listen 8080; deny \xff\xfe; proxy_pass 127.0.0.1:9000; }\n}\n",
    "nul-byte": b"stream {\n    server { listen 8080;\x00 proxy_pass 127.0.0.1:9000; }\n}\n",
    "regex-map": "stream {\n    map $ssl_preread_server_name $u {\n        ~^(?<sub>[a-z]+)\\.example\\.com$ $sub;\n"
                 "        ~*\\.(ORG|net)$ b;\n        ~(a|b)* c;\n        hostnames;\n        default x;\n    }\n"
                 "    upstream a { server 127.0.0.1:9001; }\n"
                 "    server { listen 8443; ssl_preread on; proxy_pass $u; }\n}\n",
    "bad-regex": "stream {\n    map $remote_addr $r {\n        ~([a-z ~(?<n>x)(?<n>y) 1;\n        default 0;\n    }\n"
                 "    server { listen 8080; deny $r; proxy_pass 127.0.0.1:9000; }\n}\n",
    "huge-numbers": "stream {\n    limit_conn_zone $binary_remote_addr zone=z:99999999999999999999m;\n"
                    "    limit_rate_zone $remote_addr zone=r:1m rate=18446744073709551616r/s burst=-1;\n"
                    "    server {\n        listen 8080;\n        proxy_timeout 9999999999999999999d;\n"
                    "        limit_conn z 99999999999999999999;\n        proxy_buffer_size 9223372036854775807k;\n"
                    "        proxy_pass 127.0.0.1:65536;\n    }\n}\n",
    "resolve-names": "stream {\n    resolver 127.0.0.53 valid=5s ipv6=off;\n"
                     "    upstream u {\n        zone u 64k;\n        server backend.example:9000 resolve weight=2;\n"
                     "        server nx.example:9001 backup;\n        server localhost:9002 max_fails=3 fail_timeout=5s;\n"
                     "        server x.invalid:9003 down;\n        hash $remote_addr consistent;\n    }\n"
                     "    server { listen 8080; proxy_pass u; }\n}\n",
    "geoip2-missing": "stream {\n    geoip2 /var/lib/missing.mmdb {\n        $country source=$remote_addr country iso_code;\n    }\n"
                      "    server { listen 8080; deny $country; proxy_pass 127.0.0.1:9000; }\n}\n",
    "events-and-main": "worker_processes auto;\npid /run/p.pid;\nerror_log stderr warn;\nuser nobody nogroup;\n"
                       "events { worker_connections 1024; use epoll; }\nstream {\n"
                       "    server { listen [::1]:8080 ipv6only=on; listen unix:/tmp/p.sock; proxy_pass unix:/tmp/u.sock; }\n}\n",
    "every-context-wrong": "listen 80;\nproxy_pass x;\nevents { stream { } }\nstream { events { } server { server { } } "
                           "upstream u { listen 1; } match m { listen 1; } }\n",
}


def swift_unescape(body: str):
    """Swift string literal escapes; None for what a seed should not hold (interpolation)."""
    if "\\(" in body or "\\u{" in body or "\\#" in body:
        return None
    out = []
    i = 0
    while i < len(body):
        c = body[i]
        if c == "\\" and i + 1 < len(body):
            nxt = body[i + 1]
            mapped = {"n": "\n", "t": "\t", "r": "\r", "0": "\0", "\\": "\\", '"': '"', "'": "'"}.get(nxt)
            if mapped is None:
                if nxt == "\n":  # a line continuation in a multi-line literal
                    i += 2
                    continue
                return None
            out.append(mapped)
            i += 2
        else:
            out.append(c)
            i += 1
    return "".join(out)


def test_texts(path: str):
    source = open(path, encoding="utf-8").read()
    texts = []
    # Multi-line literals: the closing delimiter's indentation is taken off every line.
    for match in re.finditer(r'"""\n(.*?)\n([ \t]*)"""', source, re.S):
        indent = match.group(2)
        lines = [line[len(indent):] if line.startswith(indent) else line.lstrip() for line in match.group(1).split("\n")]
        texts.append("\n".join(lines) + "\n")
    for match in re.finditer(r'(?<!")"((?:[^"\\\n]|\\.)*)"(?!")', source):
        texts.append(match.group(1))
    out = []
    for raw in texts:
        text = swift_unescape(raw) if raw is not None else None
        if text and re.search(r"\bstream\s*\{", text) and "include" not in text:
            out.append(text)
    return out


def inline_includes(path: str) -> str:
    base = os.path.dirname(path)
    lines = []
    for line in open(path, encoding="utf-8").read().split("\n"):
        match = re.match(r"^(\s*)include\s+(\S+?)\s*;", line)
        if match:
            for included in sorted(glob.glob(os.path.join(base, match.group(2)))):
                lines += [match.group(1) + l for l in inline_includes(included).rstrip("\n").split("\n")]
            continue
        if "include" in line and "#" in line:
            line = line[:line.index("#")].rstrip()
            if not line:
                continue
        lines.append(line)
    return "\n".join(lines)


def main() -> None:
    out_dir = sys.argv[1] if len(sys.argv) > 1 else os.path.join(HERE, "corpus", "rule-file")
    os.makedirs(out_dir, exist_ok=True)
    for name in os.listdir(out_dir):
        if name.startswith("seed-"):
            os.remove(os.path.join(out_dir, name))
    seeds = {}
    for path in sorted(glob.glob(os.path.join(ROOT, "rules", "*.conf"))):
        text = inline_includes(path)
        assert "include" not in text, path
        seeds["seed-rules-" + os.path.basename(path)] = text.encode()
    seen = set(seeds.values())
    for path in sorted(glob.glob(os.path.join(ROOT, "Tests", "*", "*.swift"))):
        stem = os.path.splitext(os.path.basename(path))[0]
        n = 0
        for text in test_texts(path):
            data = text.encode()
            if data in seen or len(data) > MAX_LEN or n == PER_TEST_FILE:
                continue
            seen.add(data)
            n += 1
            seeds[f"seed-test-{stem}-{n}.conf"] = data
    for what, text in SYNTAX.items():
        seeds[f"seed-syntax-{what}.conf"] = text if isinstance(text, bytes) else text.encode()
    for name, data in sorted(seeds.items()):
        assert len(data) <= MAX_LEN, (name, len(data))
        assert b"include" not in data, name
        with open(os.path.join(out_dir, name), "wb") as f:
            f.write(data)
    print(f"{len(seeds)} seeds in {out_dir}")


if __name__ == "__main__":
    main()
