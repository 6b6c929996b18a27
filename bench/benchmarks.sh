#!/usr/bin/env bash
# Micro-benchmarks with ordo-one/benchmark (release build), per operation: wall clock,
# throughput and malloc count of an access-list lookup (100,000 rules), a geo lookup
# (1,000,000 CIDRs), limit_conn and limit_rate checks, a PROXY v2 header decode, and one TCP
# connection relayed through the gateway running in process. See bench/Benchmarks/.
# The first build takes several minutes (the benchmark package, SwiftNIO and the gateway's
# sources are compiled in bench/Benchmarks/.build); it needs no network. A run takes about
# half a minute after that.
# Usage: bash bench/benchmarks.sh [options of `swift package benchmark`, e.g. --filter geo,
#        --target RelayBenchmarks, --format markdown]
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
bash "$ROOT/.ci/ensure-packages" pkg-config libmaxminddb-dev  # the gateway's GeoIP target links it
cd "$ROOT/bench/Benchmarks"
# The package reads the repository's Sources/ through this link (see its Package.swift).
mkdir -p .deps && ln -sfn ../../.. .deps/portcullis
# The plugin builds what it runs (a separate `swift build -c release` first would only make
# it build again with its own settings).
echo "building and running the benchmarks (the first build takes several minutes)..." >&2
# --disable-sandbox: the relay benchmark listens and connects on loopback (only macOS
# sandboxes plugins, but the flag costs nothing elsewhere). The plugin's own build lines
# ([12/34] Compiling ...) are left out; everything else, the result tables included, is shown.
# Its "running with the Swift runtime interposer" warning and "skipping LD_PRELOAD" note are
# expected: that trait is off (see bench/Benchmarks/Package.swift), which only matters for
# ARC (retain/release) metrics, and these benchmarks take none.
swift package --disable-sandbox benchmark "$@" --no-progress 2>&1 | grep --line-buffered -vE '^\[[0-9]+/[0-9]+\] '
