#!/usr/bin/env bash
# Does a long allow/deny list slow accepting? New connections per second (wrk, one request per
# connection) through Portcullis and through nginx's stream module to an nginx HTTP backend,
# with a 1-rule list and with a 100,000-rule list whose only match for the client is the last
# rule (a linear scan would walk every line). Same run, order rotated.
# Usage: bash bench/acl-scaling.sh [SECONDS_PER_RUN] [REPS] [RULES]
source "$(dirname "$0")/common.sh"
SECONDS_PER_RUN=${1:-8}
REPS=${2:-3}
RULES=${3:-100000}
need nginx libnginx-mod-stream wrk python3
build_release

HTTP=15301; P_SMALL=15302; P_BIG=15303; N_SMALL=15304; N_BIG=15305
python3 - "$WORK/rules.inc" "$RULES" <<'PY'
import random, sys
random.seed(7)
path, n = sys.argv[1], int(sys.argv[2])
with open(path, "w") as f:
    for i in range(n - 1):
        if i % 3 == 0:
            f.write("deny 10.%d.%d.0/24;\n" % (random.randrange(256), random.randrange(256)))
        elif i % 3 == 1:
            f.write("deny 172.%d.%d.%d;\n" % (random.randrange(16, 32), random.randrange(256), random.randrange(256)))
        else:
            f.write("deny 2001:db8:%x:%x::/64;\n" % (random.randrange(65536), random.randrange(65536)))
    f.write("allow all;\n")
PY

cat > "$WORK/gateway.conf" <<CONF
worker_processes 2;
stream {
    log_format main '\$remote_addr \$status \$bytes_sent \$bytes_received';
    access_log $WORK/portcullis-access.log main;
    audit_log $WORK/portcullis-audit.log;
    server { listen 127.0.0.1:$P_SMALL reuseport; allow all; proxy_pass 127.0.0.1:$HTTP; }
    server { listen 127.0.0.1:$P_BIG reuseport; include $WORK/rules.inc; proxy_pass 127.0.0.1:$HTTP; }
}
CONF
/usr/bin/time -f "%e s, %M KiB max RSS" -o "$WORK/load-time" "$PORTCULLIS" check -c "$WORK/gateway.conf" >/dev/null
"$PORTCULLIS" run -c "$WORK/gateway.conf" 2>"$WORK/portcullis.err" &
PIDS+=($!)

# The nginx process serves both the HTTP backend and its own stream proxies.
start_nginx "
    log_format main '\$remote_addr \$status \$bytes_sent \$bytes_received';
    access_log $WORK/nginx-access.log main;
    server { listen 127.0.0.1:$N_SMALL reuseport; allow all; proxy_pass 127.0.0.1:$HTTP; }
    server { listen 127.0.0.1:$N_BIG reuseport; include $WORK/rules.inc; proxy_pass 127.0.0.1:$HTTP; }" "
    access_log off;
    server { listen 127.0.0.1:$HTTP reuseport backlog=4096; location / { return 200 \"ok\\n\"; } }"
for p in $HTTP $P_SMALL $P_BIG $N_SMALL $N_BIG; do wait_port $p; done

rate() {  # rate PORT -> requests (= connections) per second
    wrk -t 2 -c 32 -d "${SECONDS_PER_RUN}s" -H 'Connection: close' "http://127.0.0.1:$1/" 2>/dev/null |
        awk '/Requests\/sec/ {print $2}'
}

declare -A results
targets=(portcullis-1:$P_SMALL portcullis-$RULES:$P_BIG nginx-1:$N_SMALL nginx-$RULES:$N_BIG)
for rep in $(seq 1 "$REPS"); do
    for i in 0 1 2 3; do
        t=${targets[$(( (i + rep) % 4 ))]}
        results[${t%%:*}]+="$(rate "${t##*:}") "
    done
done

echo "New connections/s through each proxy, wrk ${SECONDS_PER_RUN}s × $REPS, $(nproc) cores, $(date -u +%Y-%m-%d)"
echo "Portcullis compile of the $RULES-rule file (portcullis check): $(cat "$WORK/load-time")"
printf "%-20s %-26s %s\n" target "conn/s median (min–max)" "× same proxy with 1 rule"
for proxy in portcullis nginx; do
    base=$(echo ${results[$proxy-1]} | tr ' ' '\n' | median)
    for size in 1 "$RULES"; do
        values=$(echo ${results[$proxy-$size]} | tr ' ' '\n')
        m=$(echo "$values" | median)
        printf "%-20s %-26s %s\n" "$proxy, $size rules" "$m ($(echo "$values" | minmax))" \
            "$(awk -v a="$m" -v b="$base" 'BEGIN{printf "%.2f", a/b}')"
    done
done
