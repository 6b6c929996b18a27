#!/usr/bin/env bash
# TLS termination, Portcullis against nginx's stream ssl module, same run, same certificates,
# same protocols and ciphers, same client (bench/tls/tls-load.c, built here with the system
# OpenSSL both servers use):
#   - handshakes per second, full and resumed (TLS 1.3 tickets), with an ECDSA P-256 and an
#     RSA 2048 certificate, and the server's CPU per handshake (utime+stime from /proc);
#   - bulk TLS throughput, 1 and 4 streams, client → server (decrypt) → plain sink, and the
#     server's CPU-seconds per GB;
#   - memory per idle TLS connection (IDLE, default 2000, held open through to the sink).
# Each server runs one worker (worker_processes 1) pinned to CPU 1, the client to CPU 0, so the
# server's CPU is what limits it (on fewer than 2 cores nothing is pinned, and the figures say
# less). Usage: bash bench/tls.sh [SECONDS per run, default 5] [REPS, default 3]
source "$(dirname "$0")/common.sh"
SECONDS_PER_RUN=${1:-5}
REPS=${2:-3}
THREADS=${THREADS:-16}
need nginx libnginx-mod-stream openssl gcc libssl-dev
build_release
gcc -O2 -o "$WORK/tls-load" "$ROOT/bench/tls/tls-load.c" -lssl -lcrypto -lpthread
pin_gateway_and_load

openssl req -x509 -nodes -days 2 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -subj /CN=bench.test \
    -keyout "$WORK/ec.key" -out "$WORK/ec.crt" 2>/dev/null
openssl req -x509 -nodes -days 2 -newkey rsa:2048 -subj /CN=bench.test \
    -keyout "$WORK/rsa.key" -out "$WORK/rsa.crt" 2>/dev/null

SINK=19480
"$WORK/tls-load" sink $SINK & PIDS+=($!)
wait_port $SINK

HZ=$(getconf CLK_TCK)

# The servers' rule text, identical for both: $1 = key kind, $2 = handshake port, $3 = bulk port.
servers() {
    cat <<RULES
    server {
        listen 127.0.0.1:$2 ssl;
        ssl_certificate $WORK/$1.crt;
        ssl_certificate_key $WORK/$1.key;
        ssl_protocols TLSv1.2 TLSv1.3;
        ssl_session_cache shared:SSL:10m;
        return "ok\n";
    }
    server {
        listen 127.0.0.1:$3 ssl;
        ssl_certificate $WORK/$1.crt;
        ssl_certificate_key $WORK/$1.key;
        ssl_protocols TLSv1.2 TLSv1.3;
        proxy_pass 127.0.0.1:$SINK;
    }
RULES
}

# One server pair per key kind: nginx on 1947x, Portcullis on 1948x.
declare -A NGINX_PID PORTCULLIS_PID
port_of() {  # port_of SERVER KIND ROLE
    local port=19400
    [ "$1" = portcullis ] && port=$((port + 100))
    [ "$2" = rsa ] && port=$((port + 10))
    [ "$3" = bulk ] && port=$((port + 1))
    echo $port
}
for kind in ec rsa; do
    LAUNCH="${GATE_CPU[*]}" start_nginx_as "nginx-$kind" 1 16384 "" "$(servers $kind $(port_of nginx $kind hs) $(port_of nginx $kind bulk))"
    NGINX_PID[$kind]=$(nginx_master "nginx-$kind"); PIDS+=(${NGINX_PID[$kind]})
    cat > "$WORK/portcullis-$kind.conf" <<RULES
worker_processes 1;
error_log $WORK/portcullis-$kind-error.log;
stream {
$(servers $kind $(port_of portcullis $kind hs) $(port_of portcullis $kind bulk))
}
RULES
    "${GATE_CPU[@]}" "$PORTCULLIS" run -c "$WORK/portcullis-$kind.conf" >"$WORK/portcullis-$kind.out" 2>&1 &
    PORTCULLIS_PID[$kind]=$!; PIDS+=($!)
    for server in nginx portcullis; do wait_port $(port_of $server $kind hs); done
done
pids_of() {  # pids_of SERVER KIND
    if [ "$1" = nginx ]; then echo "${NGINX_PID[$2]}" $(pgrep -P "${NGINX_PID[$2]}"); else echo "${PORTCULLIS_PID[$2]}"; fi
}

declare -A RATE CPU
handshakes() {  # handshakes SERVER KIND MODE -> appends "rate cpu_us" to RESULTS file
    local pids t0 t1 out
    pids=$(pids_of "$1" "$2"); t0=$(cpu_ticks $pids)
    out=$("${GEN_CPU[@]}" "$WORK/tls-load" handshakes $(port_of "$1" "$2" hs) "$THREADS" "$SECONDS_PER_RUN" "$3")
    t1=$(cpu_ticks $pids)
    local n rate reused failures
    n=$(sed -E 's/.*handshakes=([0-9]+).*/\1/' <<<"$out"); rate=$(sed -E 's/.*per_second=([0-9]+).*/\1/' <<<"$out")
    reused=$(sed -E 's/.*reused=([0-9]+).*/\1/' <<<"$out"); failures=$(sed -E 's/.*failures=([0-9]+).*/\1/' <<<"$out")
    [ "$failures" -gt $((n / 100)) ] && fail "$1 $2 $3: $out"
    if [ "$3" = resumed ] && [ "$reused" -lt $((n * 9 / 10)) ]; then fail "$1 $2 resumed: only $reused of $n resumed"; fi
    echo "$rate $(awk -v t=$((t1 - t0)) -v hz=$HZ -v n=$n 'BEGIN { printf "%.1f", t / hz * 1e6 / n }')"
}

printf "TLS handshakes: %s threads, %s s per run, median of %s runs; %s\n" "$THREADS" "$SECONDS_PER_RUN" "$REPS" "$PINNED"
printf "%-22s %14s %14s %8s %16s %16s %8s\n" case "nginx hs/s" "Portcullis" "ratio" "nginx µs CPU/hs" "Portcullis µs" "ratio"
for kind in ${KINDS-ec rsa}; do
    for mode in ${MODES-full resumed}; do
        : > "$WORK/nginx.r"; : > "$WORK/portcullis.r"
        for _ in $(seq 1 "$REPS"); do
            for server in nginx portcullis; do handshakes $server $kind $mode >> "$WORK/$server.r"; done
        done
        nr=$(cut -d' ' -f1 "$WORK/nginx.r" | median); pr=$(cut -d' ' -f1 "$WORK/portcullis.r" | median)
        nc=$(cut -d' ' -f2 "$WORK/nginx.r" | median); pc=$(cut -d' ' -f2 "$WORK/portcullis.r" | median)
        printf "%-22s %14.0f %14.0f %8.2f %16.1f %16.1f %8.2f\n" "$([ $kind = ec ] && echo ECDSA-P256 || echo RSA-2048) $mode" \
            "$nr" "$pr" "$(awk -v a=$pr -v b=$nr 'BEGIN{print a/b}')" "$nc" "$pc" "$(awk -v a=$pc -v b=$nc 'BEGIN{print a/b}')"
    done
done

bulk() {  # bulk SERVER STREAMS MB_PER_STREAM -> "gbit cpu_s_per_gb"
    local pids t0 t1 out
    pids=$(pids_of "$1" ec); t0=$(cpu_ticks $pids)
    out=$("${GEN_CPU[@]}" "$WORK/tls-load" bulk $(port_of "$1" ec bulk) "$3" "$2")
    t1=$(cpu_ticks $pids)
    grep -q 'failures=0' <<<"$out" || fail "bulk $1: $out"
    echo "$(sed -E 's/.*gbit=([0-9.]+).*/\1/' <<<"$out") $(awk -v t=$((t1 - t0)) -v hz=$HZ -v mb=$(($2 * $3)) 'BEGIN { printf "%.3f", t / hz / (mb / 1024) }')"
}
echo
printf "TLS bulk (TLS 1.3, AES-256-GCM, client → server → plain sink), median of %s runs\n" "$REPS"
printf "%-22s %14s %14s %8s %16s %16s %8s\n" case "nginx Gbit/s" "Portcullis" "ratio" "nginx CPU-s/GB" "Portcullis" "ratio"
for streams in ${STREAMS-1 4}; do
    mb=$((2048 / streams))
    : > "$WORK/nginx.b"; : > "$WORK/portcullis.b"
    for _ in $(seq 1 "$REPS"); do
        for server in nginx portcullis; do bulk $server $streams $mb >> "$WORK/$server.b"; done
    done
    ng=$(cut -d' ' -f1 "$WORK/nginx.b" | median); pg=$(cut -d' ' -f1 "$WORK/portcullis.b" | median)
    nc=$(cut -d' ' -f2 "$WORK/nginx.b" | median); pc=$(cut -d' ' -f2 "$WORK/portcullis.b" | median)
    printf "%-22s %14.2f %14.2f %8.2f %16.3f %16.3f %8.2f\n" "$streams stream(s), 2 GiB" "$ng" "$pg" \
        "$(awk -v a=$pg -v b=$ng 'BEGIN{print a/b}')" "$nc" "$pc" "$(awk -v a=$pc -v b=$nc 'BEGIN{print a/b}')"
done
# Memory per idle TLS connection: IDLE connections handshaken through to the sink (which
# holds them), PSS of the server before and after, per connection.
IDLE=${IDLE:-2000}
idle_bytes() {  # idle_bytes SERVER -> bytes of PSS per idle TLS connection
    local pids before after
    pids=$(pids_of "$1" ec); before=$(pss_kib $pids)
    coproc HOLD { python3 "$ROOT/bench/tls/idle-tls.py" $(port_of "$1" ec bulk) "$IDLE"; }
    local line; read -r line <&"${HOLD[0]}"
    sleep 1
    after=$(pss_kib $pids)
    exec {HOLD[1]}>&-
    wait "$HOLD_PID" 2>/dev/null || true
    [ "$line" = "ready $IDLE" ] || fail "idle $1: $line"
    echo $(( (after - before) * 1024 / IDLE ))
}
echo
nb=$(idle_bytes nginx); pb=$(idle_bytes portcullis)
printf "memory per idle TLS connection (%s held, PSS): nginx %s B, Portcullis %s B, ratio %s\n" "$IDLE" "$nb" "$pb" \
    "$(awk -v a=$pb -v b=$nb 'BEGIN{printf "%.2f", a/b}')"
echo "nginx $(nginx -v 2>&1 | sed 's/.*\///'), $(openssl version | cut -d' ' -f1-2) for both"
