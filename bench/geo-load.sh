#!/usr/bin/env bash
# Issue #4's load test: one `geo` block of 1,000,000 IPv4 CIDRs, loaded by Portcullis and by
# nginx in the same run. For each: the time to load the rule file (`portcullis check` /
# `nginx -t`, 3 runs, median and range), and the memory a running gateway holds with it
# (PSS of every process: Portcullis's one, nginx's master and two workers), with the same
# config without the geo block as the baseline.
#   bash bench/geo-load.sh [COUNT]      (default 1000000)
source "$(dirname "$0")/common.sh"
need nginx libnginx-mod-stream python3 time
build_release
COUNT="${1:-1000000}"

python3 - "$COUNT" "$WORK/geo.inc" <<'PY'
import random, sys
count, path = int(sys.argv[1]), sys.argv[2]
r = random.Random(20261127)
with open(path, "w") as f:
    for i in range(count):
        length = r.choice((16, 20, 24, 24, 24, 28, 32))
        a = r.getrandbits(32) & ((0xFFFFFFFF << (32 - length)) & 0xFFFFFFFF)
        f.write(f"{a >> 24}.{(a >> 16) & 255}.{(a >> 8) & 255}.{a & 255}/{length} c{r.randrange(250)};\n")
PY
echo "geo block: $COUNT CIDRs, $(du -h "$WORK/geo.inc" | cut -f1) of text"

stream_body() {  # stream_body PORT WITH_GEO(0|1)
    local geo=""
    # The geo block is inlined (not included) so both read the same single file.
    [ "$2" = 1 ] && geo="geo \$geo_test { default ZZ; $(cat "$WORK/geo.inc") }"
    printf '%s\nserver { listen 127.0.0.1:%s; proxy_pass 127.0.0.1:9; }\n' "$geo" "$1"
}

write_configs() {  # write_configs WITH_GEO
    { echo "stream {"; stream_body 18901 "$1"; echo "}"; } > "$WORK/portcullis-$1.conf"
    nginx_conf "nginx-$1" 2 1024 "" "$(stream_body 18902 "$1")"
}
write_configs 0
write_configs 1

timed() {  # timed COMMAND... → "seconds maxrss_kib"
    /usr/bin/time -f "%e %M" "$@" 2>&1 >/dev/null | tail -1
}

pss_kib() {  # pss_kib PID... → summed PSS in KiB
    local total=0
    for pid in "$@"; do
        total=$((total + $(awk '/^Pss:/ {print $2}' "/proc/$pid/smaps_rollup")))
    done
    echo "$total"
}

held_portcullis() {  # held_portcullis WITH_GEO → PSS KiB once listening
    "$PORTCULLIS" run -c "$WORK/portcullis-$1.conf" >/dev/null 2>&1 &
    local pid=$!
    wait_port 18901
    sleep 0.5
    pss_kib "$pid"
    kill "$pid"; wait "$pid" 2>/dev/null || true
}

held_nginx() {  # held_nginx WITH_GEO → PSS KiB of master + workers once listening
    nginx -c "$WORK/nginx-$1.conf" -p "$WORK" 2>/dev/null  # one warning per duplicate block
    wait_port 18902
    sleep 0.5
    local master; master=$(nginx_master "nginx-$1")
    pss_kib "$master" $(pgrep -P "$master")
    kill "$master"
    for _ in $(seq 1 50); do kill -0 "$master" 2>/dev/null || break; sleep 0.1; done
}

declare -A load rss
for round in 1 2 3; do
    # Rotate which runs first each round.
    for who in $( ((round % 2)) && echo "portcullis nginx" || echo "nginx portcullis"); do
        if [ "$who" = portcullis ]; then
            read -r s m < <(timed "$PORTCULLIS" check -c "$WORK/portcullis-1.conf")
        else
            read -r s m < <(timed nginx -t -q -c "$WORK/nginx-1.conf" -p "$WORK")
        fi
        load[$who]+="$s "
        rss[$who]+="$m "
    done
done

p_base=$(held_portcullis 0); p_geo=$(held_portcullis 1)
n_base=$(held_nginx 0); n_geo=$(held_nginx 1)

summary() { echo "$(echo "$1" | tr ' ' '\n' | grep . | median) ($(echo "$1" | tr ' ' '\n' | grep . | minmax))"; }
echo
printf '%-12s %-26s %-24s %-22s\n' "" "load time, s (med, range)" "peak RSS while loading" "held (PSS, geo − base)"
printf '%-12s %-26s %-24s %-22s\n' "Portcullis" "$(summary "${load[portcullis]}")" "$(echo "${rss[portcullis]}" | tr ' ' '\n' | grep . | median | awk '{printf "%.0f MiB", $1/1024}')" "$(( (p_geo - p_base) / 1024 )) MiB"
printf '%-12s %-26s %-24s %-22s\n' "nginx" "$(summary "${load[nginx]}")" "$(echo "${rss[nginx]}" | tr ' ' '\n' | grep . | median | awk '{printf "%.0f MiB", $1/1024}')" "$(( (n_geo - n_base) / 1024 )) MiB (master + 2 workers)"
pl=$(echo "${load[portcullis]}" | tr ' ' '\n' | grep . | median); nl=$(echo "${load[nginx]}" | tr ' ' '\n' | grep . | median)
echo
awk -v p="$pl" -v n="$nl" -v pm="$((p_geo - p_base))" -v nm="$((n_geo - n_base))" \
    'BEGIN { printf "Portcullis / nginx: load time %.2fx, memory held %.2fx\n", p / n, pm / nm }'
echo "Lookups per second on one core: bash bench/micro.sh (the geo section)."
