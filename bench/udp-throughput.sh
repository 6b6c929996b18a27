#!/usr/bin/env bash
# UDP datagrams per second delivered, 64-byte datagrams: direct loopback, through Portcullis,
# through nginx's stream UDP proxy, all in the same run, order rotated, REPS repetitions.
# Prints the rate the receiving sink counted (median, min–max) and ratios.
#   bash bench/udp-throughput.sh [SECONDS_PER_RUN] [REPS]      (defaults 3 s, 3 repetitions)
#   PERF=1 bash bench/udp-throughput.sh   also profiles Portcullis in each mode (perf record)
#
# The load: bench/udp-load (one process, no dependencies): SOCKETS client sockets (default 4)
# send 64-byte datagrams with sendmmsg as fast as they can, round robin; a sink on 127.0.0.1
# counts what arrives with recvmmsg. After a 1 s warm-up the sink counts for SECONDS_PER_RUN.
# The sink is the proxies' upstream; "direct" sends to it straight.
#
# Both proxies get the same configuration and the same core: worker_processes 1, pinned to
# CPU 1, the load generator pinned to CPU 0 (with taskset and at least 2 cores; otherwise
# nothing is pinned). Both log every session to an access log; Portcullis also has its audit
# log on. nginx's UDP listens get rcvbuf=4m because Portcullis sets a 4 MiB SO_RCVBUF on every
# UDP listener. Two modes:
#   sessions of many datagrams   default proxy_responses (no limit): each client socket is one
#                                long session, one upstream socket each (both proxies), so this
#                                is the per-datagram relay cost;
#   one datagram per session     proxy_responses 0: a session ends as soon as its datagram is
#                                sent, so every datagram opens and closes an upstream socket and
#                                writes an access-log line (a DNS resolver that picks a fresh
#                                source port per query costs a gateway about this).
# An echo upstream with proxy_responses 1 is not used: the sender would have to pace itself on
# the answers, which measures round trips rather than what the gateway can move.
source "$(dirname "$0")/common.sh"
SECONDS_PER_RUN=${1:-3}
REPS=${2:-3}
SOCKETS=${SOCKETS:-4}
need nginx libnginx-mod-stream
build_release

build_udp_load

SINK=15501; P_LONG=15502; N_LONG=15503; P_ONE=15504; N_ONE=15505
pin_gateway_and_load

cat > "$WORK/gateway.conf" <<CONF
worker_processes 1;
error_log $WORK/portcullis-error.log;
stream {
    log_format main '\$protocol \$remote_addr:\$remote_port \$status \$bytes_sent \$bytes_received';
    access_log $WORK/portcullis-access.log main;
    audit_log $WORK/portcullis-audit.log;
    proxy_timeout 30s;
    server { listen 127.0.0.1:$P_LONG udp; proxy_pass 127.0.0.1:$SINK; }
    server { listen 127.0.0.1:$P_ONE udp; proxy_responses 0; proxy_pass 127.0.0.1:$SINK; }
}
CONF
"${GATE_CPU[@]}" "$PORTCULLIS" run -c "$WORK/gateway.conf" 2>"$WORK/portcullis.err" &
PIDS+=($!)

LAUNCH="${GATE_CPU[*]}" start_nginx_as nginx 1 16384 "" "
    log_format main '\$protocol \$remote_addr:\$remote_port \$status \$bytes_sent \$bytes_received';
    access_log $WORK/nginx-access.log main;
    proxy_timeout 30s;
    server { listen 127.0.0.1:$N_LONG udp rcvbuf=4m; proxy_pass 127.0.0.1:$SINK; }
    server { listen 127.0.0.1:$N_ONE udp rcvbuf=4m; proxy_responses 0; proxy_pass 127.0.0.1:$SINK; }"

for p in $P_LONG $P_ONE $N_LONG $N_ONE; do wait_udp $p; done

run_one() {  # run_one PORT -> "delivered/s sent/s upstream-source-ports"
    "${GEN_CPU[@]}" "$LOAD" "$1" "$SINK" "$SOCKETS" 64 1 "$SECONDS_PER_RUN"
    sleep 0.3  # let the proxies drain their queues before the next run
}

declare -A results offered sources
measure() {  # measure MODE TARGET:PORT...
    local mode=$1; shift
    local targets=("$@") n=$#
    for rep in $(seq 1 "$REPS"); do
        # Rotate the order each repetition so no target always runs first.
        for i in $(seq 0 $((n - 1))); do
            local t=${targets[$(( (i + rep) % n ))]}
            local name=${t%%:*} port=${t##*:}
            read -r delivered sent seen < <(run_one "$port")
            results[$mode/$name]+="$delivered "
            offered[$mode/$name]+="$sent "
            sources[$mode/$name]="$seen"
        done
    done
}
measure long direct:$SINK portcullis:$P_LONG nginx:$N_LONG
measure one portcullis:$P_ONE nginx:$N_ONE
results[one/direct]=${results[long/direct]}; offered[one/direct]=${offered[long/direct]}; sources[one/direct]=${sources[long/direct]}

echo "UDP relay, 64-byte datagrams from $SOCKETS client sockets, ${SECONDS_PER_RUN}s × $REPS, $(nproc) cores, $PINNED, $(date -u +%Y-%m-%d)"
printf "%-24s %-11s %-30s %-9s %-8s %-18s %s\n" mode target "delivered/s median (min–max)" "× direct" "× nginx" "offered/s median" "upstream ports"
for mode in long one; do
    label=$([ $mode = long ] && echo "sessions of many dgrams" || echo "one datagram per session")
    d=$(echo ${results[$mode/direct]} | tr ' ' '\n' | median)
    n=$(echo ${results[$mode/nginx]} | tr ' ' '\n' | median)
    for name in direct portcullis nginx; do
        values=$(echo ${results[$mode/$name]} | tr ' ' '\n')
        m=$(echo "$values" | median); r=$(echo "$values" | minmax)
        printf "%-24s %-11s %-30s %-9s %-8s %-18s %s\n" "$label" "$name" "$m ($r)" \
            "$(awk -v a="$m" -v b="$d" 'BEGIN{printf "%.2f", a/b}')" "$(awk -v a="$m" -v b="$n" 'BEGIN{printf "%.2f", a/b}')" \
            "$(echo ${offered[$mode/$name]} | tr ' ' '\n' | median)" "${sources[$mode/$name]}"
    done
done
echo "(direct is measured once and shown in both modes; \"upstream ports\" is how many source ports the sink saw in the last run: one per session)"

if [ "${PERF:-0}" = 1 ] && command -v perf >/dev/null; then
    gateway=${PIDS[-1]}
    for t in "sessions of many datagrams:$P_LONG" "one datagram per session:$P_ONE"; do
        "${GEN_CPU[@]}" "$LOAD" "${t##*:}" "$SINK" "$SOCKETS" 64 1 4 >/dev/null &
        load=$!
        sleep 1.5
        perf record -F 999 -g -p "$gateway" -o "$WORK/perf.data" -- sleep 2 >/dev/null 2>&1
        wait "$load"
        echo
        echo "Portcullis, ${t%%:*}: where the CPU goes (perf, self time by library, then top symbols)"
        # (|| true: head closing the pipe early is not a failure)
        perf report -i "$WORK/perf.data" --no-children --sort dso --stdio -g none 2>/dev/null | grep -E '^ +[0-9]' | head -6 || true
        perf report -i "$WORK/perf.data" --no-children --sort sym --stdio -g none 2>/dev/null | grep -E '^ +[0-9]' | head -15 | cut -c1-160 || true
    done
fi
