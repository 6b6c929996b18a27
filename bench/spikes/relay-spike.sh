#!/usr/bin/env bash
# Decision 0012's engine spike: new connections/s and CPU per connection for a bare C relay on
# epoll, on io_uring, and on epoll's logic with io_uring's poll as the readiness source
# (bench/spikes/relay.c: no policy, no logs), next to nginx's stream proxy
# and Portcullis, all without access logs, in the same run, order rotated.
#   bash bench/spikes/relay-spike.sh [SECONDS] [REPS] [CONNECTIONS]    (defaults 4 3 32)
# The load: wrk -t2 -cCONNECTIONS -H 'Connection: close' to a small nginx HTTP backend through
# each relay. CPU per connection: the relay process's utime+stime over the run ÷ requests.
source "$(dirname "$0")/../common.sh"
SECS=${1:-4}
REPS=${2:-3}
CONNS=${3:-32}
need nginx libnginx-mod-stream wrk liburing-dev gcc
build_release
gcc -O2 -Wall -o "$WORK/relay" "$ROOT/bench/spikes/relay.c" -luring -lpthread

HTTP=18180; EPOLL=18181; URING=18182; NGINX=18183; PORT_P=18184; POLL=18185
CLK_TCK=$(getconf CLK_TCK)
cpu_ticks() { for p in "$@"; do echo "/proc/$p/stat"; done | xargs awk '{ sub(/.*\) /, ""); s += $12 + $13 } END { print s + 0 }'; }

start_nginx_as backend 2 16384 "
    access_log off;
    server { listen 127.0.0.1:$HTTP backlog=4096; location / { return 200 \"ok\\n\"; } }" ""
start_nginx_as nginx 2 16384 "" "
    server { listen 127.0.0.1:$NGINX; proxy_pass 127.0.0.1:$HTTP; }"
cat > "$WORK/portcullis.conf" <<CONF
error_log $WORK/portcullis-error.log;
stream { server { listen 127.0.0.1:$PORT_P; proxy_pass 127.0.0.1:$HTTP; } }
CONF
"$PORTCULLIS" run -c "$WORK/portcullis.conf" 2> "$WORK/portcullis.err" & PIDS+=($!); P_PID=$!
"$WORK/relay" epoll $EPOLL $HTTP 2 & PIDS+=($!); E_PID=$!
"$WORK/relay" uring $URING $HTTP 2 & PIDS+=($!); U_PID=$!
"$WORK/relay" poll $POLL $HTTP 2 & PIDS+=($!); L_PID=$!
for p in $HTTP $EPOLL $URING $POLL $NGINX $PORT_P; do wait_port $p || fail "port $p"; done
B_PID=$(nginx_master backend); PIDS+=($B_PID)
N_PID=$(nginx_master nginx); PIDS+=($N_PID)
declare -A PORT=([c-epoll]=$EPOLL [c-uring]=$URING [c-poll]=$POLL [nginx]=$NGINX [portcullis]=$PORT_P)
pids() {
    case $1 in
        c-epoll) echo $E_PID ;; c-uring) echo $U_PID ;; c-poll) echo $L_PID ;; portcullis) echo $P_PID ;;
        nginx) echo $N_PID $(pgrep -P $N_PID) ;;
    esac
}
declare -A RATES CPUS
targets=(c-epoll c-uring c-poll nginx portcullis)
for rep in $(seq 1 "$REPS"); do
    for i in "${!targets[@]}"; do
        t=${targets[$(( (i + rep) % ${#targets[@]} ))]}
        t0=$(cpu_ticks $(pids $t))
        out=$(timeout $((SECS + 20)) wrk -t 2 -c "$CONNS" -d "${SECS}s" -H 'Connection: close' "http://127.0.0.1:${PORT[$t]}/" 2>&1 || true)
        t1=$(cpu_ticks $(pids $t))
        requests=$(awk '/ requests in / { print $1 }' <<< "$out")
        rate=$(awk '/^Requests\/sec:/ { print $2 }' <<< "$out")
        errors=$(awk '/Socket errors:|Non-2xx/ { print }' <<< "$out")
        [ -n "$errors" ] && echo "note: $t rep $rep: $errors" >&2
        RATES[$t]+="$rate "
        CPUS[$t]+="$(awk -v t=$((t1 - t0)) -v hz="$CLK_TCK" -v n="$requests" 'BEGIN { printf "%.1f", t / hz / n * 1e6 }') "
    done
done
n_rate=$(echo ${RATES[nginx]} | tr ' ' '\n' | median); n_cpu=$(echo ${CPUS[nginx]} | tr ' ' '\n' | median)
echo "wrk -t2 -c$CONNS Connection: close, ${SECS}s × $REPS, $(nproc) cores, $(date -u '+%Y-%m-%d %H:%M UTC'); no access logs anywhere"
printf "%-11s %-28s %-8s %-22s %s\n" relay "connections/s median (min–max)" "× nginx" "CPU µs/conn (min–max)" "× nginx"
for t in "${targets[@]}"; do
    r=$(echo ${RATES[$t]} | tr ' ' '\n' | median); c=$(echo ${CPUS[$t]} | tr ' ' '\n' | median)
    printf "%-11s %-28s %-8s %-22s %s\n" $t "$r ($(echo ${RATES[$t]} | tr ' ' '\n' | minmax))" \
        "$(awk -v a=$r -v b=$n_rate 'BEGIN{printf "%.2f", a/b}')" "$c ($(echo ${CPUS[$t]} | tr ' ' '\n' | minmax))" \
        "$(awk -v a=$c -v b=$n_cpu 'BEGIN{printf "%.2f", a/b}')"
done
