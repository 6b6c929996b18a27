#!/usr/bin/env bash
# Builds the PROXY header fuzzer (libFuzzer + AddressSanitizer, Swift preconditions kept) and
# runs it for a bounded time. See docs/fuzzing.md.
#
# Usage: bash Tests/Fuzz/run-fuzzer.sh [SECONDS] [--merge] [-- LIBFUZZER_FLAGS...]
#   SECONDS   how long to fuzz (default 60; passed as -max_total_time)
#   --merge   afterwards, merge inputs that add coverage into the committed corpus
#             (Tests/Fuzz/corpus/proxy-header); otherwise they stay in .build-fuzz/new-corpus
# A crash leaves its input in .build-fuzz/artifacts/ and makes the script exit non-zero.
set -euo pipefail
cd "$(dirname "$0")/../.."

SECONDS_TO_RUN=60
MERGE=0
EXTRA=()
while [ $# -gt 0 ]; do
    case "$1" in
        --merge) MERGE=1 ;;
        --) shift; EXTRA=("$@"); break ;;
        ''|*[!0-9]*) echo "usage: $0 [SECONDS] [--merge] [-- LIBFUZZER_FLAGS...]" >&2; exit 2 ;;
        *) SECONDS_TO_RUN=$1 ;;
    esac
    shift
done

# A failed precondition must reach libFuzzer's crash handler (which saves the input) rather
# than Swift's interactive backtracer, which can hang under the sanitizer.
export SWIFT_BACKTRACE=${SWIFT_BACKTRACE:-enable=no}

OUT=.build-fuzz
CORPUS=Tests/Fuzz/corpus/proxy-header
FUZZER=$OUT/proxy-header-fuzzer
mkdir -p "$OUT/modules" "$OUT/new-corpus" "$OUT/artifacts"

# -sanitize=fuzzer on the libraries adds libFuzzer's coverage instrumentation (it links
# nothing into a static library); on the harness it also links libFuzzer's main.
# -O keeps preconditions and overflow checks; -g gives symbolised stack traces.
FLAGS=(-swift-version 6 -parse-as-library -O -g -sanitize=fuzzer,address -use-ld=lld)
# One module at a time, in dependency order, as SwiftPM would: PortcullisCore, then
# PortcullisWire against it, then the harness against both.
build_module() {  # build_module NAME SOURCES...
    local name=$1; shift
    swiftc "${FLAGS[@]}" -module-name "$name" -emit-module -emit-library -static \
        -I "$OUT/modules" -emit-module-path "$OUT/modules/$name.swiftmodule" \
        -o "$OUT/modules/lib$name.a" "$@"
}
echo "building $FUZZER" >&2
build_module PortcullisCore Sources/PortcullisCore/*.swift
build_module PortcullisWire Sources/PortcullisWire/*.swift
swiftc "${FLAGS[@]}" -I "$OUT/modules" -L "$OUT/modules" -lPortcullisWire -lPortcullisCore \
    Tests/Fuzz/ProxyHeaderFuzz.swift -o "$FUZZER"
# The static libraries' object files are written next to them; keep the tree tidy.
rm -f "$OUT"/modules/*.o

# New inputs go to the first directory (new-corpus); the committed corpus is only read.
echo "fuzzing for ${SECONDS_TO_RUN}s (corpus $CORPUS, new inputs in $OUT/new-corpus)" >&2
status=0
"$FUZZER" "$OUT/new-corpus" "$CORPUS" \
    -max_total_time="$SECONDS_TO_RUN" -max_len=4096 -dict=Tests/Fuzz/proxy-header.dict \
    -artifact_prefix="$OUT/artifacts/" -print_final_stats=1 "${EXTRA[@]}" 2>&1 | tee "$OUT/last-run.log" || status=$?
if [ "$status" -ne 0 ]; then
    echo "fuzzer exited with $status; reproducers:" >&2
    ls -l "$OUT/artifacts" >&2
    exit "$status"
fi

if [ "$MERGE" -eq 1 ]; then
    echo "merging coverage-increasing inputs into $CORPUS" >&2
    "$FUZZER" -merge=1 -max_len=4096 "$CORPUS" "$OUT/new-corpus" 2>&1 | tail -n 3
fi
