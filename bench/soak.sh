#!/usr/bin/env bash
# The soak (issue #16 item 5): a release gateway in front of a checksumming upstream, 50 client
# connections in parallel that open, upload, download, close and reopen until TOTAL payload
# bytes (upload plus download) have been relayed, with the rule file rewritten and reloaded
# (`portcullis reload`) every RELOAD_EVERY seconds. Every connection's upload and download are
# hashed (SHA-256, in order) by the side that sends and the side that receives, and the digests
# compared. Fails (exit 1) on any lost, changed or reordered byte, any failed connection or
# reload, an access log that does not add up, or RSS that grows more than GROWTH_MIB (or 10 %)
# between the first 10 % of the bytes and the end, or after the clients closed.
# Usage: bash bench/soak.sh [TOTAL_GIB] [RELOAD_EVERY] [MAX_SECONDS]   (defaults 10, 3, 900)
# Environment: CONNECTIONS (50), GROWTH_MIB (16); PORTCULLIS=path soaks that binary instead of
# building a release one.
source "$(dirname "$0")/common.sh"
TOTAL_GIB=${1:-10}
RELOAD_EVERY=${2:-3}
MAX_SECONDS=${3:-900}
CONNECTIONS=${CONNECTIONS:-50}
GROWTH_MIB=${GROWTH_MIB:-16}
[ -n "${PORTCULLIS:-}" ] || build_release

GATE=15251; UP=15252
SOAK="$ROOT/bench/soak/soak.py"

python3 "$SOAK" upstream $UP 2>"$WORK/upstream.err" &
PIDS+=($!)

variant() {  # variant TAG ALLOW: one of the two rule files the soak alternates between
    cat <<CONF
pid $WORK/portcullis.pid;
error_log $WORK/error.log notice;
stream {
    # Only the log line's first field and the allow list change between the two variants.
    log_format soak '$1 \$status \$bytes_received \$bytes_sent';
    access_log $WORK/access.log soak;
    server {
        listen 127.0.0.1:$GATE;
        $2
        deny all;
        proxy_pass 127.0.0.1:$UP;
    }
}
CONF
}
variant a "allow 127.0.0.1;" > "$WORK/variant-a.conf"
variant b "allow 127.0.0.0/8; allow ::1; allow 10.0.0.0/8;" > "$WORK/variant-b.conf"
cp "$WORK/variant-a.conf" "$WORK/gateway.conf"
"$PORTCULLIS" check -c "$WORK/variant-b.conf" >/dev/null || fail "variant b does not compile"

"$PORTCULLIS" run -c "$WORK/gateway.conf" 2>"$WORK/portcullis.err" &
GATEWAY=$!
PIDS+=($GATEWAY)
# Wait for the pid file (written once every listener is bound) and for the upstream's answer
# to SOAKSTAT, not with a probe connection: it would be a session the counts do not expect.
for _ in $(seq 1 100); do [ -s "$WORK/portcullis.pid" ] && break; sleep 0.1; done
[ -s "$WORK/portcullis.pid" ] || fail "the gateway did not start: $(cat "$WORK/portcullis.err")"
python3 "$SOAK" wait-upstream $UP || fail "the upstream did not start: $(cat "$WORK/upstream.err")"

echo "Soak, $(nproc) cores, $(date -u '+%Y-%m-%d %H:%M UTC'), $(git -C "$ROOT" rev-parse --short HEAD)"
status=0
python3 "$SOAK" load --port $GATE --upstream-port $UP --pid $GATEWAY --portcullis "$PORTCULLIS" \
    --rules "$WORK/gateway.conf" --variant-a "$WORK/variant-a.conf" --variant-b "$WORK/variant-b.conf" \
    --access-log "$WORK/access.log" --total "$(awk -v g="$TOTAL_GIB" 'BEGIN { printf "%.0f", g * 1073741824 }')" \
    --connections "$CONNECTIONS" --reload-every "$RELOAD_EVERY" --max-seconds "$MAX_SECONDS" \
    --growth-mib "$GROWTH_MIB" || status=$?
if [ $status -ne 0 ]; then
    echo "--- gateway error log (last lines)"; tail -20 "$WORK/error.log" 2>/dev/null || true
    tail -5 "$WORK/portcullis.err" "$WORK/upstream.err" 2>/dev/null || true
fi
exit $status
