#!/usr/bin/env bash
# Issue #5's memory-under-attack test. A gateway with a limit_conn zone and a limit_rate zone
# (10m each) keyed on $remote_addr, behind `listen … proxy_protocol` so one loopback client can
# speak for any number of addresses. A flood client sends KEYS connections, each with a PROXY v1
# header naming a different client address, as fast as it can within a window of concurrent
# connections; meanwhile an ordinary client (one fixed address) connects every 100 ms and must
# be served (it stays within its own 10r/s). Prints the gateway's memory (RSS, PSS, private
# heap) before, at the peak and after, the flood's rate, and the ordinary client's success rate.
# Results: docs/performance.md#limits.
#   bash bench/limits-flood.sh [KEYS] [WINDOW] [PROCESSES] [MAX_SECONDS]
#   (defaults 1000000 keys, 256 connections in flight, 2 flood processes, stop after 1200 s)
#   bash bench/limits-flood.sh 200000        # the quick run (under a minute once built)
source "$(dirname "$0")/common.sh"
KEYS=${1:-1000000}
WINDOW=${2:-256}
PROCS=${3:-2}
MAX_SECONDS=${4:-1200}
need python3
build_release

UP=15401; GW=15402
cat > "$WORK/gateway.conf" <<CONF
error_log $WORK/error.log;
stream {
    audit_log $WORK/audit.log;
    limit_conn_zone \$remote_addr zone=flood:10m;
    limit_rate_zone \$remote_addr zone=rate:10m rate=10r/s;
    server {
        listen 127.0.0.1:$GW proxy_protocol backlog=4096;
        set_real_ip_from 127.0.0.1;
        limit_conn flood 1;
        limit_rate rate;
        proxy_pass 127.0.0.1:$UP;
    }
}
CONF

cat > "$WORK/flood.py" <<'PY'
import asyncio, multiprocessing as mp, os, socket, sys, time

def rss(pid):
    """VmRSS, VmHWM (peak RSS), PSS and RssAnon (private heap), in KiB."""
    status = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            k, _, v = line.partition(":")
            status[k] = v.split()[0] if v.split() else "0"
    pss = 0
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    pss = int(line.split()[1])
    except OSError:
        pass
    return int(status.get("VmRSS", 0)), int(status.get("VmHWM", 0)), pss, int(status.get("RssAnon", 0))

def upstream(port):
    """Answers every connection with 'ok\\n' and closes it."""
    class Up(asyncio.Protocol):
        def connection_made(self, t):
            t.write(b"ok\n")
            t.close()
    async def main():
        server = await asyncio.get_running_loop().create_server(Up, "127.0.0.1", port, backlog=4096, reuse_address=True)
        await server.serve_forever()
    asyncio.run(main())

def address(n):
    """The n-th flood address (n from 0): 10.0.0.1, 10.0.0.2, … (16 M of them, then 11.x …)."""
    a = (10 << 24) + n + 1
    return f"{a >> 24}.{(a >> 16) & 255}.{(a >> 8) & 255}.{a & 255}"

class Probe(asyncio.Protocol):
    def __init__(self, header, done):
        self.header, self.done, self.got = header, done, b""
    def connection_made(self, t):
        t.write(self.header)
    def data_received(self, d):
        self.got += d
    def connection_lost(self, exc):
        if not self.done.done():
            self.done.set_result(self.got)

def flood_worker(index, procs, keys, window, port, counters, deadline):
    # counters[index*4 + 0..3]: sent, served, refused (closed without a byte), errors
    async def one(n, loop):
        done = loop.create_future()
        header = f"PROXY TCP4 {address(n)} 127.0.0.1 {1024 + n % 60000} {port}\r\n".encode()
        try:
            transport, _ = await loop.create_connection(lambda: Probe(header, done), "127.0.0.1", port)
            try:
                got = await asyncio.wait_for(done, 10)
            finally:
                transport.close()
            counters[index * 4 + (1 if got == b"ok\n" else 2)] += 1
        except Exception:
            counters[index * 4 + 3] += 1
        counters[index * 4] += 1

    async def main():
        loop = asyncio.get_running_loop()
        mine = iter(range(index, keys, procs))
        async def lane():
            for n in mine:
                if time.time() > deadline:
                    return
                await one(n, loop)
        await asyncio.gather(*(lane() for _ in range(max(1, window // procs))))
    asyncio.run(main())

def flood(port, keys, window, procs, max_seconds, gateway_pid):
    counters = mp.Array("q", procs * 4, lock=False)
    deadline = time.time() + max_seconds
    workers = [mp.Process(target=flood_worker, args=(i, procs, keys, window, port, counters, deadline))
               for i in range(procs)]
    start = time.time()
    for w in workers:
        w.start()
    peak = 0
    last = -10
    def total(k):
        return sum(counters[i * 4 + k] for i in range(procs))
    while any(w.is_alive() for w in workers):
        time.sleep(0.5)
        r = rss(gateway_pid)[0]
        peak = max(peak, r)
        now = time.time() - start
        if now - last >= 10:
            last = now
            sent = total(0)
            print(f"  {now:6.0f} s  {sent:>9,} keys sent  {sent / max(now, 1e-9):8,.0f} conn/s  gateway RSS {r / 1024:6.1f} MiB",
                  file=sys.stderr, flush=True)
    for w in workers:
        w.join()
    elapsed = time.time() - start
    print(f"{total(0)} {total(1)} {total(2)} {total(3)} {elapsed:.1f} {peak}")

def ordinary(port, stop_file, out_file):
    """One fixed client address, a connection every 100 ms; served = it read the upstream's 'ok'."""
    header = f"PROXY TCP4 198.51.100.1 127.0.0.1 40000 {port}\r\n".encode()
    ok = fail = 0
    reasons = {}
    worst = 0.0
    next_at = time.monotonic()
    while not os.path.exists(stop_file):
        began = time.monotonic()
        got = b""
        reason = None
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
                s.sendall(header)
                while True:
                    d = s.recv(100)
                    if not d:
                        break
                    got += d
        except socket.timeout:
            reason = "timeout"
        except OSError as e:
            reason = type(e).__name__
        took = time.monotonic() - began
        worst = max(worst, took)
        if got == b"ok\n" and reason is None:
            ok += 1
        else:
            fail += 1
            reason = reason or ("refused (closed, 503)" if not got else "wrong bytes")
            reasons[reason] = reasons.get(reason, 0) + 1
        # Every 100 ms, never sooner after the previous start (a slow one is not made up for),
        # so this client stays within rate=10r/s whatever the gateway's latency.
        next_at = max(next_at + 0.1, time.monotonic())
        time.sleep(max(0, next_at - time.monotonic()))
    with open(out_file, "w") as f:
        f.write(f"{ok} {fail} {worst:.3f} {reasons}\n")

if __name__ == "__main__":
    mode = sys.argv[1]
    if mode == "upstream":
        upstream(int(sys.argv[2]))
    elif mode == "ordinary":
        ordinary(int(sys.argv[2]), sys.argv[3], sys.argv[4])
    elif mode == "flood":
        flood(*map(int, sys.argv[2:8]))
    elif mode == "rss":
        print(*rss(int(sys.argv[2])))
PY

ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
python3 "$WORK/flood.py" upstream $UP &
PIDS+=($!)
"$PORTCULLIS" run -c "$WORK/gateway.conf" 2>"$WORK/portcullis.err" &
GATEWAY=$!
PIDS+=($GATEWAY)
wait_port $UP; wait_port $GW

mib() { awk -v k="$1" 'BEGIN{printf "%.1f", k/1024}'; }

# Warm up with the ordinary client alone, then take the "before" figures.
python3 "$WORK/flood.py" ordinary $GW "$WORK/stop-warmup" "$WORK/warmup.txt" &
WARM=$!
sleep 3; touch "$WORK/stop-warmup"; wait $WARM
read -r RSS_BEFORE _ PSS_BEFORE ANON_BEFORE < <(python3 "$WORK/flood.py" rss $GATEWAY)

echo "flood: $KEYS distinct client addresses, $WINDOW connections in flight, $PROCS processes (stops after ${MAX_SECONDS}s)" >&2
python3 "$WORK/flood.py" ordinary $GW "$WORK/stop" "$WORK/ordinary.txt" &
ORDINARY=$!
PIDS+=($ORDINARY)
read -r SENT SERVED REFUSED ERRORS ELAPSED PEAK_SAMPLED < <(
    python3 "$WORK/flood.py" flood $GW "$KEYS" "$WINDOW" "$PROCS" "$MAX_SECONDS" $GATEWAY)
touch "$WORK/stop"; wait $ORDINARY
read -r RSS_END _ PSS_END ANON_END < <(python3 "$WORK/flood.py" rss $GATEWAY)
sleep 5
read -r RSS_AFTER HWM PSS_AFTER ANON_AFTER < <(python3 "$WORK/flood.py" rss $GATEWAY)
read -r OK FAIL WORST REASONS < "$WORK/ordinary.txt"

echo
echo "Limits under a flood of distinct keys, $(nproc) cores, $(date -u +%Y-%m-%d)"
echo "zones: limit_conn_zone \$remote_addr zone=flood:10m (163,840 keys), limit_rate_zone \$remote_addr zone=rate:10m rate=10r/s (81,920 keys)"
printf "%-44s %s\n" "keys sent" "$SENT (served $SERVED, refused $REFUSED, errors $ERRORS)"
printf "%-44s %s s\n" "time" "$ELAPSED"
printf "%-44s %s\n" "conn/s" "$(awk -v n="$SENT" -v t="$ELAPSED" 'BEGIN{printf "%.0f", n/t}')"
printf "%-44s %s MiB (PSS %s MiB, anonymous %s MiB)\n" "gateway RSS before" "$(mib "$RSS_BEFORE")" "$(mib "$PSS_BEFORE")" "$(mib "$ANON_BEFORE")"
printf "%-44s %s MiB (sampled every 0.5 s: %s MiB)\n" "gateway RSS peak (VmHWM)" "$(mib "$HWM")" "$(mib "$PEAK_SAMPLED")"
printf "%-44s %s MiB (PSS %s MiB, anonymous %s MiB)\n" "gateway RSS at the end of the flood" "$(mib "$RSS_END")" "$(mib "$PSS_END")" "$(mib "$ANON_END")"
printf "%-44s %s MiB (PSS %s MiB, anonymous %s MiB)\n" "gateway RSS 5 s after" "$(mib "$RSS_AFTER")" "$(mib "$PSS_AFTER")" "$(mib "$ANON_AFTER")"
printf "%-44s RSS %s MiB, anonymous %s MiB = %s × the two zones' 20 MiB\n" "growth (after - before)" \
    "$(mib $((RSS_AFTER - RSS_BEFORE)))" "$(mib $((ANON_AFTER - ANON_BEFORE)))" \
    "$(awk -v a="$ANON_AFTER" -v b="$ANON_BEFORE" 'BEGIN{printf "%.2f", (a-b)/1024/20}')"
printf "%-44s %s of %s served (%s %%), slowest %s s, failures: %s\n" "ordinary client (every 100 ms)" "$OK" "$((OK + FAIL))" \
    "$(awk -v o="$OK" -v f="$FAIL" 'BEGIN{printf "%.2f", 100*o/(o+f)}')" "$WORST" "$REASONS"
printf "%-44s %s\n" "error-log lines: limiting connections / sessions / no memory" \
    "$(grep -c 'limiting connections' "$WORK/error.log" || true) / $(grep -c 'limiting sessions' "$WORK/error.log" || true) / $(grep -c 'no memory' "$WORK/error.log" || true)"
printf "%-44s %s\n" "audit lines by phase (summary lines)" \
    "$(grep -o '"phase":"[a-z_]*"' "$WORK/audit.log" | sort | uniq -c | tr -s ' \n' ' ')($(grep -c '"summary"' "$WORK/audit.log" || true)); the proxy_header_read line is wait_port's probe"
