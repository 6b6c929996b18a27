#!/usr/bin/env bash
# The map-regex engine's speed against Swift's Regex, release build (decision 0016):
# compiles the engine's sources with a small driver, outside the package.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
out="$(mktemp -d)"
trap 'rm -rf "$out"' EXIT
swiftc -O -module-name RegexBench -Xlinker -lm "$root"/Sources/PortcullisPolicy/Regex/*.swift "$root/bench/regex/main.swift" -o "$out/regex-bench"
"$out/regex-bench"
