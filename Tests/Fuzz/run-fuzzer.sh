#!/usr/bin/env bash
# Builds a fuzzer (libFuzzer + AddressSanitizer, Swift preconditions kept) and runs it for a
# bounded time. See docs/fuzzing.md.
#
# Usage: bash Tests/Fuzz/run-fuzzer.sh [TARGET] [SECONDS] [--merge] [--no-build] [-- LIBFUZZER_FLAGS...]
#   TARGET    proxy-header (the PROXY protocol codec, the default), client-hello (the TLS
#             ClientHello peeker), rule-file (lexer, parser and compiler of rule files) or
#             log-format (log_format rendering and the audit line, with hostile values);
#             its harness, corpus and dictionary are named after it
#   SECONDS   how long to fuzz (default 60; passed as -max_total_time)
#   --merge   afterwards, merge inputs that add coverage into the committed corpus
#             (Tests/Fuzz/corpus/TARGET); otherwise they stay in .build-fuzz/TARGET/new-corpus
#             (.build-fuzz/new-corpus for proxy-header, as before)
#   --no-build  run the fuzzer built last time (so that a shared build lock is only held for
#             the build: `flock LOCK bash run-fuzzer.sh T -- -runs=0`, then `--no-build`)
# A crash leaves its input in .build-fuzz/artifacts/ (proxy-header) or
# .build-fuzz/TARGET/artifacts/ and makes the script exit non-zero.
set -euo pipefail
cd "$(dirname "$0")/../.."

TARGET=proxy-header
SECONDS_TO_RUN=60
MERGE=0
BUILD=1
EXTRA=()
USAGE="usage: $0 [proxy-header|client-hello|rule-file|log-format] [SECONDS] [--merge] [--no-build] [-- LIBFUZZER_FLAGS...]"
while [ $# -gt 0 ]; do
    case "$1" in
        proxy-header|client-hello|rule-file|log-format) TARGET=$1 ;;
        --merge) MERGE=1 ;;
        --no-build) BUILD=0 ;;
        --) shift; EXTRA=("$@"); break ;;
        ''|*[!0-9]*) echo "$USAGE" >&2; exit 2 ;;
        *) SECONDS_TO_RUN=$1 ;;
    esac
    shift
done

# A failed precondition must reach libFuzzer's crash handler (which saves the input) rather
# than Swift's interactive backtracer, which can hang under the sanitizer.
export SWIFT_BACKTRACE=${SWIFT_BACKTRACE:-enable=no}

OUT=.build-fuzz
CORPUS=Tests/Fuzz/corpus/$TARGET
DICT=Tests/Fuzz/$TARGET.dict
FUZZER=$OUT/$TARGET-fuzzer
# A target may add modules, a file of checks compiled in beside the harness (one shared with
# the test that replays its corpus), a timeout and flags for --merge.
CHECKS=()
MODULES=(PortcullisCore PortcullisWire)
TIMEOUT=()
MERGE_FLAGS=()
case "$TARGET" in
    proxy-header)
        HARNESS=Tests/Fuzz/ProxyHeaderFuzz.swift
        RUN=$OUT             # where new-corpus/, artifacts/ and last-run.log go
        MAX_LEN=4096 ;;      # nginx's PROXY header buffer
    client-hello)
        HARNESS=Tests/Fuzz/ClientHelloFuzz.swift
        RUN=$OUT/client-hello
        MAX_LEN=16384 ;;     # preread_buffer_size's default: the caller stops there
    rule-file)
        HARNESS=Tests/Fuzz/RuleFileFuzz.swift
        CHECKS=(Tests/PortcullisPolicyTests/FuzzChecks/RuleFileFuzzChecks.swift)
        MODULES=(PortcullisCore PortcullisRules PortcullisWire PortcullisPolicy)
        RUN=$OUT/rule-file
        TIMEOUT=(-timeout=30)  # a rule file that takes seconds to compile is a finding too
        # --merge keeps a small corpus: the fewest inputs that cover every edge, hit counts
        # aside (a plain merge of a 2-minute run added 376 files).
        MERGE_FLAGS=(-set_cover_merge=1 -use_counters=0)
        MAX_LEN=8192 ;;      # the largest example in rules/ is under 5 KB
    log-format)
        HARNESS=Tests/Fuzz/LogFormatFuzz.swift
        CHECKS=(Tests/PortcullisPolicyTests/FuzzChecks/LogFormatFuzzChecks.swift)
        MODULES=(PortcullisCore PortcullisRules PortcullisWire PortcullisPolicy)
        RUN=$OUT/log-format
        TIMEOUT=(-timeout=30)
        MERGE_FLAGS=(-set_cover_merge=1 -use_counters=0)
        MAX_LEN=4096 ;;      # a template and a dozen values
esac
mkdir -p "$OUT/modules" "$RUN/new-corpus" "$RUN/artifacts"

# -sanitize=fuzzer on the libraries adds libFuzzer's coverage instrumentation (it links
# nothing into a static library); on the harness it also links libFuzzer's main.
# -O keeps preconditions and overflow checks; -g gives symbolised stack traces.
FLAGS=(-swift-version 6 -parse-as-library -O -g -sanitize=fuzzer,address -use-ld=lld)
# One module at a time, in dependency order, as SwiftPM would: PortcullisCore, then
# PortcullisWire against it (then any other module the target lists), then the harness
# against them.
build_module() {  # build_module NAME SOURCES...
    local name=$1; shift
    swiftc "${FLAGS[@]}" -module-name "$name" -emit-module -emit-library -static \
        -I "$OUT/modules" -emit-module-path "$OUT/modules/$name.swiftmodule" \
        -o "$OUT/modules/lib$name.a" "$@"
}
if [ "$BUILD" -eq 1 ]; then
    echo "building $FUZZER" >&2
    LINK=()
    for module in "${MODULES[@]}"; do
        # Sorted, so that a build does not depend on the order find lists the files in.
        mapfile -t sources < <(find "Sources/$module" -name '*.swift' | LC_ALL=C sort)
        build_module "$module" "${sources[@]}"
        LINK=("-l$module" "${LINK[@]}")  # a library before the ones it needs
    done
    swiftc "${FLAGS[@]}" -I "$OUT/modules" -L "$OUT/modules" "${LINK[@]}" \
        "$HARNESS" "${CHECKS[@]}" -o "$FUZZER"
    # The static libraries' object files are written next to them; keep the tree tidy.
    rm -f "$OUT"/modules/*.o
fi

# New inputs go to the first directory (new-corpus); the committed corpus is only read.
echo "fuzzing for ${SECONDS_TO_RUN}s (corpus $CORPUS, new inputs in $RUN/new-corpus)" >&2
status=0
"$FUZZER" "$RUN/new-corpus" "$CORPUS" \
    -max_total_time="$SECONDS_TO_RUN" -max_len="$MAX_LEN" -dict="$DICT" \
    -artifact_prefix="$RUN/artifacts/" -print_final_stats=1 "${TIMEOUT[@]}" "${EXTRA[@]}" 2>&1 | tee "$RUN/last-run.log" || status=$?
if [ "$status" -ne 0 ]; then
    echo "fuzzer exited with $status; reproducers:" >&2
    ls -l "$RUN/artifacts" >&2
    exit "$status"
fi

if [ "$MERGE" -eq 1 ]; then
    echo "merging coverage-increasing inputs into $CORPUS" >&2
    "$FUZZER" -merge=1 "${MERGE_FLAGS[@]}" -max_len="$MAX_LEN" "${TIMEOUT[@]}" "$CORPUS" "$RUN/new-corpus" 2>&1 | tail -n 3
fi
