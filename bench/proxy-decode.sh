#!/usr/bin/env bash
# PROXY v2 header decode rate (release build, one thread): a TCP4 header with AUTHORITY and
# UNIQUE_ID TLVs decoded 50 million times. Pins to one CPU when taskset is available
# (CPU=N picks which, default 0).
# Usage: bash bench/proxy-decode.sh [ITERATIONS]
set -euo pipefail
cd "$(dirname "$0")/proxy-decode"
mkdir -p .deps && ln -sfn ../../.. .deps/portcullis
swift build -c release >/dev/null
if command -v taskset >/dev/null; then
    exec taskset -c "${CPU:-0}" ./.build/release/proxy-decode "$@"
fi
exec ./.build/release/proxy-decode "$@"
