#!/usr/bin/env bash
# The one-command comparison: Portcullis, nginx's stream module and HAProxy (TCP mode) with
# equivalent configurations, on loopback, in the same run. Prints one table (median over REPS
# repetitions, min–max, ratios) and writes it as Markdown to OUT.
#
#   bash bench/compare.sh
#   REPS=3 SECS=4 UDP_SECS=3 ONLY=tcp,conn,held,latency,udp,memory,rules OUT=/tmp/portcullis-compare.md \
#   IDLE=auto RULES=10000 GEO_ENTRIES=100000 bash bench/compare.sh
#
# Knobs (environment): REPS repetitions (default 3; fewer is for trying the script out), SECS
# seconds per iperf3/wrk run (default 4), UDP_SECS seconds the UDP sink counts after a 1 s
# warm-up (default 3), ONLY a comma-separated subset of the measurements below, OUT the
# Markdown file, IDLE the number of idle connections (default 10,000, or what the hard
# RLIMIT_NOFILE allows: a proxy holds two descriptors per relayed connection), RULES and
# GEO_ENTRIES the sizes of the rule lists, KEEP=1 keeps the work directory (configurations and
# logs). With the defaults the whole run takes about 6 minutes on a 2-core machine (build
# included when nothing needs recompiling); it prints the time it took.
#
# The three proxies:
#   Portcullis   one process, one event loop per core (the default), as bench/relay-throughput.sh
#   nginx        worker_processes 2 (the master and its workers are one "proxy" for CPU and memory)
#   HAProxy      nbthread 2, one process in the foreground (-db)
# All three log every session to an access log file with the same fields (client address,
# status, bytes each way, session time). HAProxy cannot write a log file itself: it logs with
# `log stdout format raw`, and its standard output is redirected to the file (one write(2) per
# line, as nginx's unbuffered access_log). Portcullis's audit log is on too. No listen line
# says reuseport (HAProxy 2.6 cannot shard a bind across threads); Portcullis opens one
# SO_REUSEPORT socket per event loop by itself (docs/decisions/0009). No process is pinned,
# except in the UDP row. The order of the paths is rotated every repetition.
#
# Measurements (ONLY= names):
#   tcp      iperf3 -P 1 and -P 8 for SECS through each proxy and direct: Gbit/s received, and
#            the proxy's CPU-seconds (utime+stime of all its processes, /proc/PID/stat, before
#            and after the run) per GB moved
#   conn     wrk -t2 -c32 and -c64 -H 'Connection: close' to a separate nginx HTTP backend
#            (one small response per connection), direct and through each proxy:
#            connections/s, and the proxy's CPU time per connection
#   held     the conn measurement (-c32) through each proxy while IDLE idle connections are
#            held open through the same proxy (bench/compare/idle.py), as a ratio to the same
#            proxy's conn row: what many live sessions cost every new one
#   latency  wrk -t1 -c1 --latency, keep-alive, direct and through each proxy: p50 and p99, and
#            what the hop adds over direct (per repetition, then median)
#   udp      bench/udp-load as bench/udp-throughput.sh runs it: 4 client sockets send 64-byte
#            datagrams flat out, each one long session; the sink's count per second. Here each
#            gateway runs worker_processes 1 pinned to CPU 1, the generator pinned to CPU 0 (as
#            in udp-throughput.sh). HAProxy 2.6 has no UDP proxy: n/a
#   memory   IDLE idle TCP connections through a freshly started proxy (one instance per
#            measurement, so memory a previous round left in the allocator does not hide the
#            cost) to an upstream that holds them (bench/compare/idle.py), counted at the
#            upstream end; the proxy's PSS (smaps_rollup, all its processes) with them minus
#            before them, per connection. User-space memory only (socket buffers are kernel
#            memory and not in PSS); nginx allocates its connection array at start, so that
#            part is in the baseline
#   rules    the conn measurement (in the same rotation) through each proxy with RULES allow/deny
#            rules whose only match for the client is the last (`allow all`), and with a
#            GEO_ENTRIES-entry geo table whose variable is written in the access log (HAProxy:
#            `src -f` ACL files, `src,map_ip()` into a variable in its log-format), as a ratio
#            to the same proxy without them
# Ports 16000–16999.
source "$(dirname "$0")/common.sh"
REPS=${REPS:-3}
SECS=${SECS:-4}
UDP_SECS=${UDP_SECS:-3}
ONLY=${ONLY:-tcp,conn,held,latency,udp,memory,rules}
OUT=${OUT:-/tmp/portcullis-compare.md}
RULES=${RULES:-10000}
GEO_ENTRIES=${GEO_ENTRIES:-100000}
want() { [[ ",$ONLY," == *",$1,"* ]]; }
if [ "${KEEP:-0}" = 1 ]; then   # KEEP=1: leave the work directory (configurations, logs) behind
    trap 'for pid in "${PIDS[@]:-}"; do kill "$pid" 2>/dev/null || true; done; echo "kept $WORK" >&2' EXIT
fi
note() { echo "note: $*" >&2; echo "note: $*" >> "$WORK/notes"; }
: > "$WORK/notes"
[ "$REPS" -ge 3 ] || note "REPS=$REPS: fewer than 3 repetitions, the ranges mean little"

need iperf3 nginx libnginx-mod-stream haproxy wrk python3
build_started=$SECONDS
build_release
build_seconds=$((SECONDS - build_started))

# File descriptors: the soft limit up to the hard one; 2 per relayed idle connection plus some.
ulimit -n "$(ulimit -Hn)"
HARD=$(ulimit -Hn)
[ "$HARD" = unlimited ] && HARD=1048576
export NGINX_NOFILE=$HARD   # every nginx this harness starts may hold as many descriptors as it can
if [ "${IDLE:-auto}" = auto ]; then
    IDLE=$(( (HARD - 400) / 2 < 10000 ? (HARD - 400) / 2 : 10000 ))
    [ "$IDLE" -lt 10000 ] && { want memory || want held; } && note "hard RLIMIT_NOFILE is $HARD (2 descriptors per relayed connection): $IDLE idle connections instead of 10,000"
fi
HA_MAXCONN=$((IDLE + 90))
CLK_TCK=$(getconf CLK_TCK)

# Ports: backends 160xx, Portcullis 161xx, nginx 162xx, HAProxy 163xx; the same last digits
# for the same job.
IPERF=16001; HTTP=16002; HOLD=16003; SINK=16004
P_TCP=16101; P_HTTP=16102; P_ACL=16103; P_GEO=16104; P_IDLE=16105; P_UDP=16106; P_HELD=16107
N_TCP=16201; N_HTTP=16202; N_ACL=16203; N_GEO=16204; N_IDLE=16205; N_UDP=16206; N_HELD=16207
H_TCP=16301; H_HTTP=16302; H_ACL=16303; H_GEO=16304; H_IDLE=16305; H_HELD=16307

FORMAT='$remote_addr $status $bytes_sent $bytes_received $session_time'
HA_FORMAT='%ci %ts %B %U %Tt'   # the same fields: HAProxy's %B is bytes to the client

sample() { echo "$1 $2 $3 $4" >> "$WORK/samples"; }   # sample ROW TARGET REP VALUE
: > "$WORK/samples"

# --- Processes -----------------------------------------------------------------------------

portcullis_conf() {  # portcullis_conf NAME BODY (the inside of stream)
    cat > "$WORK/$1.conf" <<CONF
error_log $WORK/$1-error.log;
stream {
    log_format main '$FORMAT';
    access_log $WORK/$1-access.log main;
    audit_log $WORK/$1-audit.log;
$2
}
CONF
}

haproxy_conf() {  # haproxy_conf NAME FRONTENDS_AND_BACKENDS
    cat > "$WORK/$1.cfg" <<CFG
global
    nbthread 2
    maxconn $HA_MAXCONN
    log stdout format raw local0
defaults
    mode tcp
    log global
    log-format "$HA_FORMAT"
    maxconn $HA_MAXCONN
    timeout connect 60s
    timeout client 10m
    timeout server 10m
$2
backend iperf
    server iperf 127.0.0.1:$IPERF
backend http
    server http 127.0.0.1:$HTTP
backend hold
    server hold 127.0.0.1:$HOLD
CFG
    haproxy -c -q -f "$WORK/$1.cfg" || fail "haproxy refuses $WORK/$1.cfg"
}

# Process ids, CPU ticks and PSS of a proxy (nginx: its master and workers).
proxy_pids() {  # proxy_pids TARGET
    case $1 in
        portcullis) echo "$P_PID" ;;
        nginx) echo "$N_PID" $(pgrep -P "$N_PID") ;;
        haproxy) echo "$H_PID" ;;
    esac
}

# --- Rule lists ----------------------------------------------------------------------------
mkdir -p "$WORK/rules"
if want rules; then
    python3 "$ROOT/bench/compare/make-rules.py" "$WORK/rules" "$RULES" "$GEO_ENTRIES"
    RULE_SERVERS_P="
    log_format zone '$FORMAT \$zone';
    geo \$zone { default other; include $WORK/rules/geo.inc; }
    server { listen 127.0.0.1:$P_ACL; include $WORK/rules/acl.inc; proxy_pass 127.0.0.1:$HTTP; }
    server { listen 127.0.0.1:$P_GEO; access_log $WORK/portcullis-access.log zone; proxy_pass 127.0.0.1:$HTTP; }"
    RULE_SERVERS_N="
    log_format zone '$FORMAT \$zone';
    geo \$zone { default other; include $WORK/rules/geo.inc; }
    server { listen 127.0.0.1:$N_ACL; include $WORK/rules/acl.inc; proxy_pass 127.0.0.1:$HTTP; }
    server { listen 127.0.0.1:$N_GEO; access_log $WORK/nginx-access.log zone; proxy_pass 127.0.0.1:$HTTP; }"
    RULE_FRONTENDS_H="
frontend acl
    bind 127.0.0.1:$H_ACL
    tcp-request connection accept if { src -f $WORK/rules/allow.acl }
    tcp-request connection reject if { src -f $WORK/rules/deny.acl }
    default_backend http
frontend geo
    bind 127.0.0.1:$H_GEO
    tcp-request connection set-var(sess.zone) src,map_ip($WORK/rules/geo.map,other)
    log-format \"$HA_FORMAT %[var(sess.zone)]\"
    default_backend http"
fi

# --- Backends ------------------------------------------------------------------------------
if want tcp; then
    iperf3 -s -p $IPERF > "$WORK/iperf.log" 2>&1 &
    PIDS+=($!)
fi
if want conn || want latency || want rules; then
    # The HTTP backend: its own nginx, so that its CPU is not counted as the nginx proxy's.
    start_nginx_as backend 2 16384 "
    access_log off;
    keepalive_requests 1000000;
    server { listen 127.0.0.1:$HTTP backlog=4096; location / { return 200 \"ok\\n\"; } }" ""
fi
if want memory || want held; then
    python3 "$ROOT/bench/compare/idle.py" hold $HOLD "$WORK/hold.count" &
    PIDS+=($!)
fi

# --- The proxies for tcp, conn, latency and rules --------------------------------------------
if want tcp || want conn || want held || want latency || want rules; then
    portcullis_conf portcullis "
    server { listen 127.0.0.1:$P_HELD; proxy_pass 127.0.0.1:$HOLD; }
    server { listen 127.0.0.1:$P_TCP; proxy_pass 127.0.0.1:$IPERF; }
    server { listen 127.0.0.1:$P_HTTP; proxy_pass 127.0.0.1:$HTTP; }${RULE_SERVERS_P:-}"
    "$PORTCULLIS" run -c "$WORK/portcullis.conf" 2> "$WORK/portcullis.err" &
    P_PID=$!; PIDS+=($P_PID)

    start_nginx_as nginx 2 $((2 * IDLE + 16384)) "" "
    log_format main '$FORMAT';
    access_log $WORK/nginx-access.log main;
    server { listen 127.0.0.1:$N_HELD; proxy_pass 127.0.0.1:$HOLD; }
    server { listen 127.0.0.1:$N_TCP; proxy_pass 127.0.0.1:$IPERF; }
    server { listen 127.0.0.1:$N_HTTP; proxy_pass 127.0.0.1:$HTTP; }${RULE_SERVERS_N:-}"

    haproxy_conf haproxy "
frontend held
    bind 127.0.0.1:$H_HELD
    default_backend hold
frontend tcp
    bind 127.0.0.1:$H_TCP
    default_backend iperf
frontend http
    bind 127.0.0.1:$H_HTTP
    default_backend http${RULE_FRONTENDS_H:-}"
    haproxy -db -f "$WORK/haproxy.cfg" > "$WORK/haproxy-access.log" 2> "$WORK/haproxy.err" &
    H_PID=$!; PIDS+=($H_PID)

    # (wait_port's probe goes through to the upstream: probe ports whose upstream is up.)
    if want tcp; then ports="$P_TCP $N_TCP $H_TCP"; else ports="$P_HTTP $N_HTTP $H_HTTP"; fi
    for p in $ports; do wait_port $p || fail "port $p: $(cat "$WORK"/*.err)"; done
    N_PID=$(nginx_master nginx); PIDS+=($N_PID)
fi
if want conn || want latency || want rules; then
    PIDS+=($(nginx_master backend))
    wait_port $HTTP
fi
sleep 0.5

# --- 1. TCP throughput -----------------------------------------------------------------------
tcp_run() {  # tcp_run TARGET PORT STREAMS REP
    local pids t0 t1 out
    pids=$(proxy_pids "$1"); t0=$(cpu_ticks $pids)
    out=$(timeout $((SECS + 20)) iperf3 -c 127.0.0.1 -p "$2" -P "$3" -t "$SECS" -J 2>/dev/null |
        python3 -c 'import json,sys
try:
    s = json.load(sys.stdin)["end"]["sum_received"]; print(s["bits_per_second"] / 1e9, s["bytes"])
except Exception: pass' || true)
    t1=$(cpu_ticks $pids)
    [ -n "$out" ] || { note "iperf3 through $1 (-P $3, repetition $4) failed"; return; }
    read -r gbits bytes <<< "$out"
    sample "tcp$3" "$1" "$4" "$gbits"
    [ "$1" = direct ] || sample "cpugb$3" "$1" "$4" "$(awk -v t=$((t1 - t0)) -v hz="$CLK_TCK" -v b="$bytes" 'BEGIN { print (t / hz) / (b / 1e9) }')"
}
if want tcp; then
    echo "tcp: iperf3 ${SECS}s, 1 and 8 streams, $REPS repetitions" >&2
    targets=(direct:$IPERF portcullis:$P_TCP nginx:$N_TCP haproxy:$H_TCP)
    for rep in $(seq 1 "$REPS"); do
        for streams in 1 8; do
            for i in "${!targets[@]}"; do
                t=${targets[$(( (i + rep) % ${#targets[@]} ))]}
                tcp_run "${t%%:*}" "${t##*:}" "$streams" "$rep"
            done
        done
    done
fi

# --- 2 and 6. New connections per second, without and with rules -----------------------------
conn_run() {  # conn_run ROW TARGET PORT REP (ROW conn64: 64 connections at a time, else 32)
    local pids t0 t1 out requests rate errors cpurow connections=32
    [ "$1" = conn64 ] && connections=64
    pids=$(proxy_pids "$2"); t0=$(cpu_ticks $pids)
    out=$(timeout $((SECS + 20)) wrk -t 2 -c $connections -d "${SECS}s" -H 'Connection: close' "http://127.0.0.1:$3/" 2>&1 || true)
    t1=$(cpu_ticks $pids)
    requests=$(awk '/ requests in / { print $1 }' <<< "$out")
    rate=$(awk '/^Requests\/sec:/ { print $2 }' <<< "$out")
    [ -n "$rate" ] && [ -n "$requests" ] || { note "wrk through $2 ($1, repetition $4) failed: $out"; return; }
    errors=$(awk '/Socket errors:|Non-2xx/ { print }' <<< "$out")
    [ -z "$errors" ] || note "wrk through $2 ($1, repetition $4): $(echo $errors)"
    sample "$1" "$2" "$4" "$rate"
    case $1 in conn) cpurow=cpuconn ;; conn64) cpurow=cpuconn64 ;; connheld) cpurow=cpuheld ;; *) cpurow= ;; esac
    [ -n "$cpurow" ] && [ "$2" != direct ] && [ "$requests" -gt 0 ] &&
        sample $cpurow "$2" "$4" "$(awk -v t=$((t1 - t0)) -v hz="$CLK_TCK" -v n="$requests" 'BEGIN { print t / hz / n * 1e6 }')"
    return 0
}
if want conn || want rules; then
    # One group of runs per path: direct, and each proxy without rules, with the rule list and
    # with the geo table, back to back, so that a rule list's ratio compares runs made close
    # together. The groups' order rotates every repetition, and so does the order inside each.
    groups=()
    want conn && groups+=("conn:direct:$HTTP conn64:direct:$HTTP")
    for t in portcullis:P nginx:N haproxy:H; do
        name=${t%%:*}; http=${t##*:}_HTTP; acl=${t##*:}_ACL; geo=${t##*:}_GEO
        group="conn:$name:${!http}"
        want conn && group+=" conn64:$name:${!http}"
        want rules && group+=" acl:$name:${!acl} geo:$name:${!geo}"
        groups+=("$group")
    done
    echo "$(want conn && echo "conn ")$(want rules && echo "rules "): wrk ${SECS}s, Connection: close, $(echo ${groups[*]} | wc -w) paths, $REPS repetitions" >&2
    for rep in $(seq 1 "$REPS"); do
        for g in "${!groups[@]}"; do
            read -r -a runs <<< "${groups[$(( (g + rep) % ${#groups[@]} ))]}"
            for i in "${!runs[@]}"; do
                IFS=: read -r row target port <<< "${runs[$(( (i + rep) % ${#runs[@]} ))]}"
                conn_run "$row" "$target" "$port" "$rep"
            done
        done
    done
fi

# --- 2b. New connections per second with IDLE idle connections held through the same proxy --
held() { cat "$WORK/hold.count" 2>/dev/null || echo 0; }
wait_held() {  # wait_held SECONDS CONDITION: until the upstream's count satisfies [ count CONDITION ]
    local deadline=$((SECONDS + $1))
    until [ "$(held)" $2 ]; do [ $SECONDS -ge $deadline ] && return 1; sleep 0.1; done
}
if want held; then
    echo "held: wrk ${SECS}s -c32 with $IDLE idle connections held through the same proxy, $REPS repetitions" >&2
    wait_port $HOLD
    targets=(portcullis:$P_HELD:$P_HTTP nginx:$N_HELD:$N_HTTP haproxy:$H_HELD:$H_HTTP)
    for rep in $(seq 1 "$REPS"); do
        for i in "${!targets[@]}"; do
            IFS=: read -r target hold http <<< "${targets[$(( (i + rep) % ${#targets[@]} ))]}"
            wait_held 30 "-eq 0" || true
            python3 "$ROOT/bench/compare/idle.py" open "$hold" "$IDLE" > "$WORK/held-client.out" &
            client=$!
            wait_held 60 "-ge $IDLE" || note "held, $target, repetition $rep: only $(held) of $IDLE idle connections reached the upstream"
            conn_run connheld "$target" "$http" "$rep"
            [ "$(held)" -ge "$IDLE" ] || note "held, $target, repetition $rep: $(held) of $IDLE idle connections still open after the run"
            kill "$client"; wait "$client" 2>/dev/null || true
        done
    done
fi

# --- 3. Keep-alive latency -------------------------------------------------------------------
latency_run() {  # latency_run TARGET PORT REP
    local out p50 p99
    out=$(timeout $((SECS + 20)) wrk -t 1 -c 1 -d "${SECS}s" --latency "http://127.0.0.1:$2/" 2>&1 || true)
    read -r p50 p99 < <(awk '
        function us(x) { if (x ~ /us$/) return x + 0; if (x ~ /ms$/) return x * 1000; if (x ~ /s$/) return x * 1e6; return x + 0 }
        /Latency Distribution/ { d = 1; next }
        d && $1 == "50%" { p50 = us($2) }
        d && $1 == "99%" { p99 = us($2) }
        END { print p50, p99 }' <<< "$out")
    [ -n "$p50" ] && [ -n "$p99" ] || { note "wrk -c1 through $1 (repetition $3) failed: $out"; return; }
    sample p50 "$1" "$3" "$p50"
    sample p99 "$1" "$3" "$p99"
}
if want latency; then
    echo "latency: wrk -t1 -c1 ${SECS}s, keep-alive, $REPS repetitions" >&2
    targets=(direct:$HTTP portcullis:$P_HTTP nginx:$N_HTTP haproxy:$H_HTTP)
    for rep in $(seq 1 "$REPS"); do
        for i in "${!targets[@]}"; do
            t=${targets[$(( (i + rep) % ${#targets[@]} ))]}
            latency_run "${t%%:*}" "${t##*:}" "$rep"
        done
    done
fi

# --- 4. UDP datagrams per second ---------------------------------------------------------------
if want udp; then
    echo "udp: 64-byte datagrams, 1 s + ${UDP_SECS}s, $REPS repetitions" >&2
    build_udp_load
    pin_gateway_and_load
    [ ${#GATE_CPU[@]} -gt 0 ] || note "UDP row: nothing pinned (no taskset or fewer than 2 cores)"
    cat > "$WORK/portcullis-udp.conf" <<CONF
worker_processes 1;
error_log $WORK/portcullis-udp-error.log;
stream {
    log_format main '\$protocol $FORMAT';
    access_log $WORK/portcullis-udp-access.log main;
    audit_log $WORK/portcullis-udp-audit.log;
    proxy_timeout 30s;
    server { listen 127.0.0.1:$P_UDP udp; proxy_pass 127.0.0.1:$SINK; }
}
CONF
    "${GATE_CPU[@]}" "$PORTCULLIS" run -c "$WORK/portcullis-udp.conf" 2> "$WORK/portcullis-udp.err" &
    UDP_P_PID=$!; PIDS+=($UDP_P_PID)
    LAUNCH="${GATE_CPU[*]}" start_nginx_as nginx-udp 1 16384 "" "
    log_format main '\$protocol $FORMAT';
    access_log $WORK/nginx-udp-access.log main;
    proxy_timeout 30s;
    server { listen 127.0.0.1:$N_UDP udp rcvbuf=4m; proxy_pass 127.0.0.1:$SINK; }"
    UDP_N_PID=$(nginx_master nginx-udp); PIDS+=($UDP_N_PID)
    wait_udp $P_UDP || fail "Portcullis: $(cat "$WORK/portcullis-udp.err")"
    wait_udp $N_UDP || fail "nginx: $(cat "$WORK/nginx-udp-error.log")"
    targets=(direct:$SINK portcullis:$P_UDP nginx:$N_UDP)
    for rep in $(seq 1 "$REPS"); do
        for i in "${!targets[@]}"; do
            t=${targets[$(( (i + rep) % ${#targets[@]} ))]}
            read -r delivered _ < <(timeout $((UDP_SECS + 20)) "${GEN_CPU[@]}" "$LOAD" "${t##*:}" "$SINK" 4 64 1 "$UDP_SECS" || true)
            if [ -n "${delivered:-}" ]; then sample udp "${t%%:*}" "$rep" "$delivered"; else note "udp-load through ${t%%:*} failed"; fi
            sleep 0.3   # let the proxy drain its queue before the next run
        done
    done
    kill "$UDP_P_PID" "$UDP_N_PID" 2>/dev/null || true
fi

# --- 5. Memory per idle connection (held() and wait_held() are above) -------------------------
memory_start() {  # memory_start TARGET: a fresh instance relaying its idle port to the holder
    case $1 in
        portcullis)
            portcullis_conf portcullis-idle "    server { listen 127.0.0.1:$P_IDLE; proxy_pass 127.0.0.1:$HOLD; }"
            "$PORTCULLIS" run -c "$WORK/portcullis-idle.conf" 2> "$WORK/portcullis-idle.err" &
            P_PID=$!; PIDS+=($P_PID); wait_port $P_IDLE; IDLE_PORT=$P_IDLE ;;
        nginx)
            start_nginx_as nginx-idle 2 $((2 * IDLE + 100)) "" "
    log_format main '$FORMAT';
    access_log $WORK/nginx-idle-access.log main;
    server { listen 127.0.0.1:$N_IDLE; proxy_pass 127.0.0.1:$HOLD; }"
            wait_port $N_IDLE; N_PID=$(nginx_master nginx-idle); PIDS+=($N_PID); IDLE_PORT=$N_IDLE ;;
        haproxy)
            haproxy_conf haproxy-idle "
frontend idle
    bind 127.0.0.1:$H_IDLE
    default_backend hold"
            haproxy -db -f "$WORK/haproxy-idle.cfg" > "$WORK/haproxy-idle-access.log" 2> "$WORK/haproxy-idle.err" &
            H_PID=$!; PIDS+=($H_PID); wait_port $H_IDLE; IDLE_PORT=$H_IDLE ;;
    esac
}
memory_stop() {  # memory_stop TARGET
    local pid
    case $1 in portcullis) pid=$P_PID ;; nginx) pid=$N_PID ;; haproxy) pid=$H_PID ;; esac
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.1; done
    kill -9 "$pid" 2>/dev/null || true
}
memory_run() {  # memory_run TARGET REP
    local before after client got reached
    memory_start "$1"
    wait_held 10 "-eq 0" || true   # wait_port's probe connection has gone
    sleep 0.5
    before=$(pss_kib $(proxy_pids "$1"))
    python3 "$ROOT/bench/compare/idle.py" open "$IDLE_PORT" "$IDLE" > "$WORK/idle-client.out" &
    client=$!
    wait_held 60 "-ge $IDLE" || true
    sleep 1
    reached=$(held)
    after=$(pss_kib $(proxy_pids "$1"))
    kill "$client"; wait "$client" 2>/dev/null || true
    got=$(cat "$WORK/idle-client.out")
    [ "$reached" -ge "$IDLE" ] || note "memory, $1, repetition $2: $reached of $IDLE connections reached the upstream (client: ${got:-still connecting} connected/failed)"
    [ "$reached" -gt 0 ] && sample mem "$1" "$2" "$(awk -v a="$after" -v b="$before" -v n="$reached" 'BEGIN { print (a - b) * 1024 / n }')"
    wait_held 30 "-eq 0" || note "memory, $1: $(held) upstream connections still open 30 s after the client left"
    memory_stop "$1"
}
if want memory; then
    echo "memory: $IDLE idle connections, a fresh instance each time, $REPS repetitions" >&2
    wait_port $HOLD
    targets=(portcullis nginx haproxy)
    for rep in $(seq 1 "$REPS"); do
        for i in "${!targets[@]}"; do
            memory_run "${targets[$(( (i + rep) % ${#targets[@]} ))]}" "$rep"
        done
    done
fi

# --- The table -------------------------------------------------------------------------------
{
    echo "Portcullis $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo '?'), nginx $(nginx -v 2>&1 | sed 's|.*/||') (stream), HAProxy $(haproxy -v | sed -n '1s/HAProxy version \([^ ]*\).*/\1/p') (TCP mode); loopback, $(nproc) cores, $(date -u '+%Y-%m-%d %H:%M UTC')"
    echo "$REPS repetitions, order rotated each time; iperf3/wrk ${SECS}s per run; UDP 1 s warm-up + ${UDP_SECS}s; $IDLE idle connections; $RULES rules, $GEO_ENTRIES geo entries"
    echo "Portcullis: one event loop per core; nginx: worker_processes 2; HAProxy: nbthread 2 (UDP row: one worker each, pinned as bench/udp-throughput.sh)"
    echo "Access log on in all three (HAProxy: log stdout format raw, redirected to a file); Portcullis audit log on"
    echo "Ratio columns divide this line's median by direct loopback's, nginx's and HAProxy's medians of the same measurement"
} > "$WORK/header"
python3 "$ROOT/bench/compare/report.py" "$WORK/samples" "$WORK/header" "$OUT" "$RULES" "$GEO_ENTRIES" "$IDLE"
if [ -s "$WORK/notes" ]; then
    echo; sort -u "$WORK/notes"
    { echo; echo "Notes:"; echo; sort -u "$WORK/notes" | sed 's/^note: /- /'; } >> "$OUT"
fi
echo
echo "Markdown: $OUT"
echo "Elapsed: $((SECONDS / 60)) min $((SECONDS % 60)) s (build ${build_seconds} s)"
printf '\nElapsed: %d min %d s, build %d s of it.\n' $((SECONDS / 60)) $((SECONDS % 60)) "$build_seconds" >> "$OUT"
