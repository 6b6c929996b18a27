#!/usr/bin/env bash
# Build data/country.mmdb (GeoLite2-Country layout) from Debian packages:
#   tor-geoipdb               IPv4/IPv6 country ranges (IPFire Location data, CC BY-SA 4.0)
#   iso-codes                 English country names (ISO 3166-1)
#   libmaxmind-db-writer-perl MaxMind's own MaxMind DB writer (MaxMind::DB::Writer::Tree)
#   libnet-works-perl         used by the writer
# Installs whatever of these is missing (as root, with apt-get), runs
# build-country-db.pl and prints a summary. See data/README.md.
#
# Usage: data/build-country-db.sh [OUTPUT]      (default: data/country.mmdb)
# Set SOURCE_DATE_EPOCH to fix the metadata build_epoch (then two builds from
# the same package versions are byte-identical); otherwise it is the current time.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
out="${1:-$here/country.mmdb}"

packages=(tor-geoipdb iso-codes libmaxmind-db-writer-perl libnet-works-perl)

installed_version() {
    { dpkg-query -W -f='${db:Status-Abbrev} ${Version}' "$1" 2>/dev/null || true; } |
        awk '$1 == "ii" { print $2 }'
}

bash "$here/../.ci/ensure-packages" "${packages[@]}"

tor_version="$(installed_version tor-geoipdb)"
iso_version="$(installed_version iso-codes)"
writer_version="$(installed_version libmaxmind-db-writer-perl)"

mkdir -p "$(dirname "$out")"
summary="$(perl "$here/build-country-db.pl" \
    --out "$out" \
    --geoip4 /usr/share/tor/geoip \
    --geoip6 /usr/share/tor/geoip6 \
    --iso3166 /usr/share/iso-codes/json/iso_3166-1.json \
    --tor-version "$tor_version" \
    --iso-version "$iso_version")"

epoch="$(sed -n 's/^build_epoch: //p' <<<"$summary")"
size="$(stat -c %s "$out")"
echo "wrote $out"
echo "  packages:    tor-geoipdb $tor_version, iso-codes $iso_version, libmaxmind-db-writer-perl $writer_version"
echo "  networks:    $(sed -n 's/^networks: //p' <<<"$summary")"
echo "  countries:   $(sed -n 's/^countries: //p' <<<"$summary")"
echo "  nodes:       $(sed -n 's/^nodes: //p' <<<"$summary") (24-bit records, IPv6 tree, ::ffff:0:0/96 aliased to IPv4)"
echo "  build epoch: $epoch ($(date -u -d "@$epoch" '+%Y-%m-%d %H:%M:%S UTC'))"
echo "  size:        $size bytes ($(awk -v s="$size" 'BEGIN { printf "%.1f MiB", s / 1048576 }'))"
echo "  sha256:      $(sha256sum "$out" | cut -d' ' -f1)"
echo "  skipped (not ISO 3166-1): IPv4 $(sed -n 's/^skipped_ipv4_codes: //p' <<<"$summary");" \
    "IPv6 $(sed -n 's/^skipped_ipv6_codes: //p' <<<"$summary")"
echo "  dropped (IPv6 space aliased to IPv4): $(sed -n 's/^ipv6_dropped_for_ipv4_aliases: //p' <<<"$summary")"
