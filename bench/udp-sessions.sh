#!/usr/bin/env bash
# Issue #6's session test: many concurrent UDP sessions through one `listen … udp`, and the
# 65,536-session bound of its table.
#   bash bench/udp-sessions.sh [SESSIONS] [FLOOD] [TIMEOUT_S]     (defaults 50000 70000 30)
#   WIDEN_PORTS=1 bash bench/udp-sessions.sh    widens net.ipv4.ip_local_port_range for the run
#
# 1. Sessions: a client sends one datagram from each of SESSIONS sockets, every one bound to its
#    own loopback address and port (127.0.1.x:10000–29999), to a Portcullis UDP listener whose
#    upstream reads and never answers, so each session stays open for proxy_timeout
#    (TIMEOUT_S). Each socket is closed once it has sent: a session is keyed by the client's
#    address and port, and with no answer coming nothing needs to be received. Measured: the
#    gateway's RSS and PSS before and with the sessions open (memory per session), its open file
#    descriptors (one upstream socket per live session), and the distinct source ports the
#    upstream saw.
# 2. The table bound: FLOOD datagrams from FLOOD distinct address:port pairs to a second UDP
#    listener whose rules refuse them (`allow 127.0.0.1; deny all;`). A refused session has no
#    upstream socket but keeps its place in the table until its client is quiet for
#    proxy_timeout, so this fills the table: 65,536 sessions, the rest dropped and reported in
#    the error log at most once a second. Then an allowed client (127.0.0.1) tries the same
#    listener while the table is full.
# 3. After proxy_timeout: descriptors and sessions are gone, memory after, log line counts, and
#    the allowed client tries again.
# 4. nginx's stream module with the same client and an upstream that never answers, for its
#    memory per session (its worker's RSS and PSS).
#
# Each session costs the gateway a file descriptor and a local port: SESSIONS needs
# `worker_rlimit_nofile` above it (a hard RLIMIT_NOFILE that high, which needs root with
# CAP_SYS_RESOURCE when it is above the inherited one) and an ephemeral port range at least that
# wide (the kernel gives every connected UDP socket its own local port: 28,232 in Linux's
# default 32768–60999). When either is short the run is scaled down to what fits and says so.
source "$(dirname "$0")/common.sh"
SESSIONS=${1:-50000}
FLOOD=${2:-70000}
TIMEOUT=${3:-30}
need python3 nginx libnginx-mod-stream
build_release

UP=15701; GW=15702; GW_DENY=15703
note() { echo "note: $*"; }

# File descriptors: SESSIONS upstream sockets plus the listeners, logs and event loops.
want=$((SESSIONS + 512))
hard=$(ulimit -Hn)
if [ "$hard" != unlimited ] && [ "$hard" -lt "$want" ]; then
    if (ulimit -Hn "$want") 2>/dev/null; then
        ulimit -Hn "$want"; hard=$want
    else
        SESSIONS=$((hard - 512))
        note "the hard RLIMIT_NOFILE is $hard and cannot be raised here (no CAP_SYS_RESOURCE): running $SESSIONS sessions"
    fi
fi
[ "$hard" = unlimited ] && hard=$want
NOFILE=$(( hard < 200000 ? hard : 200000 ))

# Ephemeral ports: one per upstream socket.
read -r low high < /proc/sys/net/ipv4/ip_local_port_range
ports=$((high - low + 1))
if [ "$ports" -lt $((SESSIONS + 100)) ]; then
    if [ "${WIDEN_PORTS:-0}" = 1 ] && echo "1024 65535" > /proc/sys/net/ipv4/ip_local_port_range 2>/dev/null; then
        trap 'echo "$low $high" > /proc/sys/net/ipv4/ip_local_port_range; cleanup' EXIT
        note "ip_local_port_range widened to 1024–65535 for this run (restored at exit)"
    else
        SESSIONS=$((ports - 100))
        note "ip_local_port_range is $low–$high ($ports ports), one per upstream socket: running $SESSIONS sessions (WIDEN_PORTS=1 widens it for the run)"
    fi
fi

cat > "$WORK/gateway.conf" <<CONF
worker_rlimit_nofile $NOFILE;
error_log $WORK/error.log;
stream {
    log_format s '\$protocol \$status \$remote_addr:\$remote_port \$bytes_received';
    access_log $WORK/access.log s;
    audit_log $WORK/audit.log;
    proxy_timeout ${TIMEOUT}s;
    server {
        listen 127.0.0.1:$GW udp;
        proxy_pass 127.0.0.1:$UP;
    }
    server {
        listen 127.0.0.1:$GW_DENY udp;
        allow 127.0.0.1;
        deny all;
        proxy_pass 127.0.0.1:$UP;
    }
}
CONF

cat > "$WORK/udp.py" <<'PY'
import os, socket, sys, time

def sink(port, stats):
    """Reads forever, never answers; writes 'datagrams distinct-sources probes' every 0.2 s."""
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
    s.bind(("127.0.0.1", port))
    s.settimeout(0.2)
    count, sources, probes, last = 0, set(), 0, 0.0
    while True:
        try:
            data, peer = s.recvfrom(2048)
            count += 1
            sources.add(peer)
            if data.startswith(b"probe"):
                probes += 1
        except socket.timeout:
            pass
        if time.monotonic() - last > 0.2:
            last = time.monotonic()
            with open(stats + ".tmp", "w") as f:
                f.write(f"{count} {len(sources)} {probes}\n")
            os.replace(stats + ".tmp", stats)

def clients(port, n, second_octet, rate):
    """n datagrams, each from its own socket bound to its own address:port, paced at rate/s.
    Ports 10000-29999 lie below Linux's default ephemeral range, where the gateway's upstream
    sockets take theirs; a port that is taken anyway is skipped."""
    start, sent, i = time.monotonic(), 0, 0
    target = ("127.0.0.1", port)
    while sent < n:
        k = i // 20000
        address = f"127.{second_octet}.{k // 250}.{k % 250 + 1}"
        i += 1
        c = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            c.bind((address, 10000 + (i - 1) % 20000))
        except OSError:
            c.close()
            continue
        c.sendto(b"session %d" % sent, target)
        c.close()
        sent += 1
        if sent % 1000 == 0:
            ahead = sent / rate - (time.monotonic() - start)
            if ahead > 0:
                time.sleep(ahead)
    print(f"{time.monotonic() - start:.2f}")

def probe(port):
    c = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    c.bind(("127.0.0.1", 0))
    c.sendto(b"probe", ("127.0.0.1", port))
    c.close()

mode = sys.argv[1]
if mode == "sink":
    sink(int(sys.argv[2]), sys.argv[3])
elif mode == "clients":
    clients(int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5]))
elif mode == "probe":
    probe(int(sys.argv[2]))
PY

python3 "$WORK/udp.py" sink $UP "$WORK/sink.stats" &
PIDS+=($!)
"$PORTCULLIS" run -c "$WORK/gateway.conf" 2>"$WORK/portcullis.err" &
GATEWAY=$!
PIDS+=($GATEWAY)

wait_udp $GW && wait_udp $GW_DENY && wait_udp $UP || fail "$(cat "$WORK/portcullis.err")"
sleep 1

mem() {  # mem -> "RSS_KiB PSS_KiB RssAnon_KiB"
    echo "$(awk '/^VmRSS:/ {print $2}' /proc/$GATEWAY/status) $(awk '/^Pss:/ {print $2}' /proc/$GATEWAY/smaps_rollup) $(awk '/^RssAnon:/ {print $2}' /proc/$GATEWAY/status)"
}
fds() { ls /proc/$GATEWAY/fd | wc -l; }
drops() {  # drops PORT -> datagrams the kernel dropped at that UDP socket (its queue was full)
    awk -v p="$(printf '%04X' "$1")" 'NR > 1 { split($2, a, ":"); if (a[2] == p) s += $NF } END { print s + 0 }' /proc/net/udp
}
sink() { cat "$WORK/sink.stats" 2>/dev/null || echo "0 0 0"; }
wait_for() {  # wait_for SECONDS CONDITION-COMMAND...
    local deadline=$((SECONDS + $1)); shift
    until "$@"; do [ $SECONDS -ge $deadline ] && return 1; sleep 0.2; done
}
kib() { awk -v k="$1" 'BEGIN { printf "%.1f MiB", k / 1024 }'; }
per() { awk -v a="$1" -v b="$2" 'BEGIN { if (b > 0) printf "%.0f", a * 1024 / b; else print "-" }'; }

read -r rss0 pss0 anon0 < <(mem); fd0=$(fds)

# 1. SESSIONS sessions that stay open.
d0=$(drops $GW)
secs=$(python3 "$WORK/udp.py" clients $GW "$SESSIONS" 1 10000)
seen() { read -r _ distinct _ < <(sink); [ "$distinct" -ge "$SESSIONS" ]; }
wait_for 20 seen || true
sleep 1
read -r rss1 pss1 anon1 < <(mem); fd1=$(fds)
read -r got1 distinct1 _ < <(sink)
drops1=$(( $(drops $GW) - d0 ))
live1=$((fd1 - fd0))

# 2. The table bound: FLOOD refused sessions on the second listener, then an allowed probe.
d0=$(drops $GW_DENY)
secs2=$(python3 "$WORK/udp.py" clients $GW_DENY "$FLOOD" 2 20000)
sleep 2.5  # the drop report comes at most once a second
read -r rss2 pss2 anon2 < <(mem); fd2=$(fds)
drops2=$(( $(drops $GW_DENY) - d0 ))
full_lines=$(grep -c "UDP sessions" "$WORK/error.log" || true)
full_dropped=$({ grep "UDP sessions" "$WORK/error.log" || true; } | sed -E 's/.*dropped ([0-9]+) datagrams.*/\1/' | awk '{s += $1} END {print s + 0}')
refused=$((FLOOD - drops2 - full_dropped))
read -r _ _ probes0 < <(sink)
python3 "$WORK/udp.py" probe $GW_DENY
sleep 1
read -r _ _ probes1 < <(sink)
audit_lines=$(grep -vc '"summary"' "$WORK/audit.log" || true)
audit_suppressed=$(grep '"summary"' "$WORK/audit.log" | sed -E 's/.*"suppressed":([0-9]+).*/\1/' | awk '{s += $1} END {print s + 0}')

# 3. After proxy_timeout.
ended() { [ "$(fds)" -le $((fd0 + 2)) ] && [ "$(wc -l < "$WORK/access.log")" -ge $((distinct1 + refused)) ]; }
wait_for $((TIMEOUT + 20)) ended || true
sleep 1
read -r rss3 pss3 anon3 < <(mem); fd3=$(fds)
access_200=$(grep -c '^UDP 200 ' "$WORK/access.log" || true)
access_403=$(grep -c '^UDP 403 ' "$WORK/access.log" || true)
python3 "$WORK/udp.py" probe $GW_DENY
sleep 1
read -r _ _ probes2 < <(sink)
forbidden=$(grep -c "access forbidden by rule" "$WORK/error.log" || true)
other_errors=$(grep -v "UDP sessions" "$WORK/error.log" | grep -vc "access forbidden by rule" || true)
kill "$GATEWAY"; wait "$GATEWAY" 2>/dev/null || true

# 4. nginx, the same client against the same kind of listener (its worker's memory).
NGINX_NOFILE=$NOFILE start_nginx_as nginx 1 $((2 * SESSIONS + 1024)) "" "
    log_format s '\$protocol \$status \$remote_addr:\$remote_port \$bytes_received';
    access_log $WORK/nginx-access.log s;
    proxy_timeout ${TIMEOUT}s;
    server { listen 127.0.0.1:$GW udp rcvbuf=4m; proxy_pass 127.0.0.1:$UP; }"
wait_udp $GW
sleep 1
GATEWAY=$(pgrep -P "$(cat "$WORK/nginx.pid")" | head -1)   # the worker
read -r nrss0 npss0 nanon0 < <(mem); nfd0=$(fds)
read -r sunk0 distinct0 _ < <(sink)
python3 "$WORK/udp.py" clients $GW "$SESSIONS" 3 10000 >/dev/null
nseen() { read -r sunk _ _ < <(sink); [ $((sunk - sunk0)) -ge "$SESSIONS" ]; }
wait_for 20 nseen || true
sleep 1
read -r nrss1 npss1 nanon1 < <(mem); nfd1=$(fds)
nlive=$((nfd1 - nfd0))
kill "$(cat "$WORK/nginx.pid")"

echo
echo "UDP sessions, $(nproc) cores, $(date -u +%Y-%m-%d); proxy_timeout ${TIMEOUT}s, worker_rlimit_nofile $NOFILE"
echo
echo "1. $SESSIONS client sockets, one datagram each, sent in ${secs}s to a listener whose upstream never answers:"
echo "   upstream received $got1 datagrams from $distinct1 distinct gateway sockets; kernel drops at the listener: $drops1"
echo "   gateway file descriptors: $fd0 → $fd1 ($live1 upstream sockets = live sessions)"
echo "   RSS $(kib "$rss0") → $(kib "$rss1"), PSS $(kib "$pss0") → $(kib "$pss1"), anonymous $(kib "$anon0") → $(kib "$anon1")"
echo "   per live session: RSS $(per $((rss1 - rss0)) "$live1") bytes, PSS $(per $((pss1 - pss0)) "$live1") bytes, anonymous $(per $((anon1 - anon0)) "$live1") bytes"
echo "   at that rate, 50,000 sessions: $(awk -v d=$((pss1 - pss0)) -v n="$live1" 'BEGIN { if (n > 0) printf "%.0f MiB", d / n * 50000 / 1024 }') of PSS"
echo
echo "2. $FLOOD datagrams from $FLOOD distinct address:port pairs, sent in ${secs2}s to a listener that refuses them:"
echo "   kernel drops at the listener: $drops2; error log: $full_lines \"… already has 65536 UDP sessions\" lines counting $full_dropped dropped datagrams"
echo "   refused sessions in the table: $refused (sent − kernel drops − table-full drops)"
echo "   audit log: $audit_lines lines, $audit_suppressed more counted in summary lines (flood cap)"
echo "   RSS $(kib "$rss1") → $(kib "$rss2"), PSS $(kib "$pss1") → $(kib "$pss2"): $(per $((pss2 - pss1)) "$refused") bytes of PSS per refused session; fds $fd1 → $fd2"
echo "   an allowed client (127.0.0.1) while the table is full: $([ "$probes1" -gt "$probes0" ] && echo "relayed" || echo "dropped, not relayed")"
echo
echo "3. After proxy_timeout (${TIMEOUT}s) the sessions ended: fds $fd3, RSS $(kib "$rss3"), PSS $(kib "$pss3"), anonymous $(kib "$anon3")"
echo "   (glibc keeps the freed heap: RSS stays near its peak, and the next sessions reuse it)"
echo "   access log: $access_200 lines UDP 200, $access_403 lines UDP 403; error log: $forbidden \"access forbidden by rule\" lines, $other_errors others"
echo "   the allowed client again: $([ "$probes2" -gt "$probes1" ] && echo "relayed" || echo "dropped")"
echo
echo "4. nginx $(nginx -v 2>&1 | sed 's|.*/||'), worker_processes 1, the same $SESSIONS sockets (listen … udp rcvbuf=4m, as Portcullis's 4 MiB):"
echo "   worker fds $nfd0 → $nfd1 ($nlive live sessions); RSS $(kib "$nrss0") → $(kib "$nrss1"), PSS $(kib "$npss0") → $(kib "$npss1")"
echo "   per live session: RSS $(per $((nrss1 - nrss0)) "$nlive") bytes, PSS $(per $((npss1 - npss0)) "$nlive") bytes, anonymous $(per $((nanon1 - nanon0)) "$nlive") bytes"
echo "   Portcullis / nginx, PSS per session: $(awk -v p=$((pss1 - pss0)) -v pn="$live1" -v n=$((npss1 - npss0)) -v nn="$nlive" 'BEGIN { if (pn > 0 && nn > 0 && n > 0) printf "%.2f", (p / pn) / (n / nn) }')"
