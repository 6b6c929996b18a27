# Shared helpers for the benchmark scripts. Everything runs on loopback and stops by itself.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
WORK="$(mktemp -d /tmp/portcullis-bench.XXXXXX)"
PIDS=()
cleanup() {
    for pid in "${PIDS[@]:-}"; do [ -n "$pid" ] && kill "$pid" 2>/dev/null || true; done
    [ -f "$WORK/nginx.pid" ] && kill "$(cat "$WORK/nginx.pid")" 2>/dev/null || true
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

# nginx with a stream block and, optionally, an http block:
# start_nginx STREAM_BODY [HTTP_BODY] (the insides of the blocks).
start_nginx() {
    local modules="" http=""
    [ -f /usr/lib/nginx/modules/ngx_stream_module.so ] && modules="load_module /usr/lib/nginx/modules/ngx_stream_module.so;"
    # (Built here: a "}" inside ${2:+…} in the here-document would end the expansion early.)
    [ -n "${2:-}" ] && http="http {
$2
}"
    cat > "$WORK/nginx.conf" <<NGINX
$modules
worker_processes 2;
pid $WORK/nginx.pid;
error_log $WORK/nginx-error.log;
events { worker_connections 16384; }
$http
stream {
$1
}
NGINX
    nginx -c "$WORK/nginx.conf" -p "$WORK"
}

median() { sort -g | awk '{a[NR]=$1} END {print (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}'; }
minmax() { sort -g | awk 'NR==1{min=$1} {max=$1} END {printf "%s–%s", min, max}'; }
