# Shared helpers for the benchmark scripts. Everything runs on loopback and stops by itself.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
WORK="$(mktemp -d /tmp/portcullis-bench.XXXXXX)"
PIDS=()
cleanup() {
    for pid in "${PIDS[@]:-}"; do [ -n "$pid" ] && kill "$pid" 2>/dev/null || true; done
    for file in "$WORK"/*.pid; do [ -f "$file" ] && kill "$(cat "$file" 2>/dev/null)" 2>/dev/null || true; done
    sleep 0.3
    rm -rf "$WORK"
}
trap cleanup EXIT

need() { bash "$ROOT/.ci/ensure-packages" "$@"; }

build_release() {
    (cd "$ROOT" && swift build -c release --product portcullis >/dev/null)
    PORTCULLIS="$ROOT/.build/release/portcullis"
}

wait_port() {  # wait_port PORT
    for _ in $(seq 1 100); do
        (exec 3<>/dev/tcp/127.0.0.1/"$1") 2>/dev/null && return 0
        sleep 0.1
    done
    echo "nothing listens on port $1" >&2
    return 1
}

fail() { echo "$(basename "$0"): $*" >&2; exit 1; }

wait_udp() {  # wait_udp PORT: until a UDP socket is bound to it
    local hex; hex=$(printf ':%04X ' "$1")
    for _ in $(seq 1 100); do
        grep -q "$hex" /proc/net/udp && return 0
        sleep 0.1
    done
    echo "nothing listens on UDP port $1" >&2
    return 1
}

# An nginx configuration: nginx_conf NAME WORKERS CONNECTIONS HTTP_BODY STREAM_BODY (the insides
# of the blocks; an empty body leaves its block out) writes $WORK/NAME.conf, whose pid file is
# $WORK/NAME.pid. NGINX_NOFILE, if set, becomes worker_rlimit_nofile.
nginx_conf() {
    local modules="" http="" stream="" nofile=""
    # (Built here: a "}" inside ${4:+…} in the here-document would end the expansion early.)
    [ -n "$4" ] && http="http {
$4
}"
    [ -n "$5" ] && stream="stream {
$5
}"
    [ -n "${NGINX_NOFILE:-}" ] && nofile="worker_rlimit_nofile $NGINX_NOFILE;"
    [ -f /usr/lib/nginx/modules/ngx_stream_module.so ] && modules="load_module /usr/lib/nginx/modules/ngx_stream_module.so;"
    cat > "$WORK/$1.conf" <<NGINX
$modules
worker_processes $2;
$nofile
pid $WORK/$1.pid;
error_log $WORK/$1-error.log;
events { worker_connections $3; }
$http
$stream
NGINX
}

# Starts one: start_nginx_as NAME WORKERS CONNECTIONS HTTP_BODY STREAM_BODY. LAUNCH, if set, is
# a command to start it under (taskset). Several can run at once; cleanup stops them all.
start_nginx_as() {
    nginx_conf "$@"
    rm -f "$WORK/$1.pid"
    ${LAUNCH:-} nginx -c "$WORK/$1.conf" -p "$WORK" || fail "nginx $1 did not start: $(cat "$WORK/$1-error.log")"
}

nginx_master() {  # nginx_master NAME: its pid, once the pid file is there
    for _ in $(seq 1 50); do
        [ -s "$WORK/$1.pid" ] && { cat "$WORK/$1.pid"; return; }
        sleep 0.1
    done
    fail "nginx $1 wrote no pid file"
}

# nginx with a stream block and, optionally, an http block, two workers:
# start_nginx STREAM_BODY [HTTP_BODY]. Its pid file is $WORK/nginx.pid.
start_nginx() { start_nginx_as nginx 2 16384 "${2:-}" "$1"; }

# The UDP load generator (bench/udp-load, one Swift file): compiled once, and again when its
# source changes; sets LOAD.
build_udp_load() {
    local dir="$ROOT/bench/udp-load"
    LOAD="$dir/.build/udp-load"
    if [ ! -x "$LOAD" ] || [ "$dir/udp-load.swift" -nt "$LOAD" ]; then
        mkdir -p "$dir/.build"
        swiftc -O -swift-version 5 "$dir/udp-load.swift" -o "$LOAD"
    fi
}

# GATE_CPU and GEN_CPU: command prefixes that pin a gateway to CPU 1 and a load generator to
# CPU 0 (with taskset and at least 2 cores; otherwise both are empty). PINNED says which.
pin_gateway_and_load() {
    GATE_CPU=(); GEN_CPU=(); PINNED="nothing pinned"
    if command -v taskset >/dev/null && [ "$(nproc)" -ge 2 ]; then
        GATE_CPU=(taskset -c 1); GEN_CPU=(taskset -c 0); PINNED="gateway pinned to CPU 1, load generator to CPU 0"
    fi
}

# CPU ticks (utime+stime, all threads) and PSS of processes, from /proc.
cpu_ticks() {  # cpu_ticks PID... -> utime+stime summed (all threads of each process)
    [ $# -gt 0 ] || { echo 0; return; }
    for p in "$@"; do echo "/proc/$p/stat"; done | xargs awk '{ sub(/.*\) /, ""); s += $12 + $13 } END { print s + 0 }'
}
pss_kib() {  # pss_kib PID...
    for p in "$@"; do echo "/proc/$p/smaps_rollup"; done | xargs awk '/^Pss:/ { s += $2 } END { print s + 0 }'
}
median() { sort -g | awk '{a[NR]=$1} END {print (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}'; }
minmax() { sort -g | awk 'NR==1{min=$1} {max=$1} END {printf "%s–%s", min, max}'; }
