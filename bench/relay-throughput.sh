#!/usr/bin/env bash
# Relay throughput with iperf3: direct loopback, through Portcullis, through nginx's stream
# module, all in the same run, order rotated, REPS repetitions. Prints Gbit/s (median, min–max)
# and ratios. Usage: bash bench/relay-throughput.sh [SECONDS_PER_RUN] [REPS]
source "$(dirname "$0")/common.sh"
SECONDS_PER_RUN=${1:-5}
REPS=${2:-3}
need iperf3 nginx libnginx-mod-stream
build_release

IPERF=15201; GATE=15202; NGX=15203
iperf3 -s -p $IPERF -D --logfile "$WORK/iperf.log"; sleep 0.3
PIDS+=("$(pgrep -f "iperf3 -s -p $IPERF" | head -1)")

cat > "$WORK/gateway.conf" <<CONF
stream {
    log_format main '\$remote_addr \$status \$bytes_sent \$bytes_received';
    access_log $WORK/portcullis-access.log main;
    audit_log $WORK/portcullis-audit.log;
    server { listen 127.0.0.1:$GATE; proxy_pass 127.0.0.1:$IPERF; }
}
CONF
"$PORTCULLIS" run -c "$WORK/gateway.conf" 2>"$WORK/portcullis.err" &
PIDS+=($!)
start_nginx "
    log_format main '\$remote_addr \$status \$bytes_sent \$bytes_received';
    access_log $WORK/nginx-access.log main;
    server { listen 127.0.0.1:$NGX; proxy_pass 127.0.0.1:$IPERF; }"
wait_port $GATE; wait_port $NGX

run_one() {  # run_one PORT STREAMS -> Gbit/s (receiver side)
    iperf3 -c 127.0.0.1 -p "$1" -P "$2" -t "$SECONDS_PER_RUN" -J 2>/dev/null |
        python3 -c 'import json,sys; print("%.2f" % (json.load(sys.stdin)["end"]["sum_received"]["bits_per_second"]/1e9))'
}

declare -A results
targets=(direct:$IPERF portcullis:$GATE nginx:$NGX)
for streams in 1 8; do
    for rep in $(seq 1 "$REPS"); do
        # Rotate the order each repetition so no target always runs first.
        for i in 0 1 2; do
            t=${targets[$(( (i + rep) % 3 ))]}
            name=${t%%:*}; port=${t##*:}
            results[$name/$streams]+="$(run_one "$port" "$streams") "
        done
    done
done

echo "Relay throughput, iperf3 ${SECONDS_PER_RUN}s × $REPS, $(nproc) cores, $(date -u +%Y-%m-%d)"
printf "%-8s %-12s %-22s %-14s %s\n" streams target "Gbit/s median (min–max)" "× direct" "× nginx"
for streams in 1 8; do
    d=$(echo ${results[direct/$streams]} | tr ' ' '\n' | median)
    n=$(echo ${results[nginx/$streams]} | tr ' ' '\n' | median)
    for name in direct portcullis nginx; do
        values=$(echo ${results[$name/$streams]} | tr ' ' '\n')
        m=$(echo "$values" | median); r=$(echo "$values" | minmax)
        printf "%-8s %-12s %-22s %-14s %s\n" "$streams" "$name" "$m ($r)" \
            "$(awk -v a="$m" -v b="$d" 'BEGIN{printf "%.2f", a/b}')" "$(awk -v a="$m" -v b="$n" 'BEGIN{printf "%.2f", a/b}')"
    done
done
