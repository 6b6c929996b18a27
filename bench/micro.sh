#!/usr/bin/env bash
# Micro-benchmarks of the pure layers (release build): access-list lookups and rule compiling.
set -euo pipefail
cd "$(dirname "$0")/micro"
mkdir -p .deps && ln -sfn ../../.. .deps/portcullis
swift build -c release >/dev/null
./.build/release/portcullis-micro
