#!/usr/bin/env bash
# Build the MaxMind DB test fixtures in Tests/Fixtures/geoip/ (see README.md):
#   types.mmdb        every MMDB value type at 1.2.3.0/24 (country NL), build epoch 1700000000
#   types-v2.mmdb     the same with 1.2.3.0/24 -> BE, other description, build epoch 1700000100
#   truncated.mmdb    the first half of types.mmdb's bytes (opening it fails)
#   not-an-mmdb.mmdb  4 KiB of repeated text (opening it fails)
# Needs Debian packages libmaxmind-db-writer-perl (MaxMind::DB::Writer::Tree)
# and libnet-works-perl; installs whichever is missing (apt-get update first,
# as root or through sudo), then runs build-fixtures.pl.
#
# Usage: Tests/Fixtures/geoip/build-fixtures.sh [OUTPUT_DIR]   (default: this directory)
# The output is deterministic: the build epochs are fixed through
# SOURCE_DATE_EPOCH, so a rebuild is byte-identical.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
outdir="${1:-$here}"

packages=(libmaxmind-db-writer-perl libnet-works-perl)

bash "$here/../../../.ci/ensure-packages" "${packages[@]}"

mkdir -p "$outdir"

# types.mmdb and types-v2.mmdb, with fixed build epochs.
SOURCE_DATE_EPOCH=1700000000 perl "$here/build-fixtures.pl" \
    --out "$outdir/types.mmdb" --variant v1 >/dev/null
SOURCE_DATE_EPOCH=1700000100 perl "$here/build-fixtures.pl" \
    --out "$outdir/types-v2.mmdb" --variant v2 >/dev/null

# truncated.mmdb: the first half of types.mmdb (no metadata section, so
# libmaxminddb's MMDB_open fails).
size="$(stat -c %s "$outdir/types.mmdb")"
head -c "$((size / 2))" "$outdir/types.mmdb" >"$outdir/truncated.mmdb.tmp"
mv "$outdir/truncated.mmdb.tmp" "$outdir/truncated.mmdb"

# not-an-mmdb.mmdb: exactly 4096 bytes of a repeated line of text.
perl -e 'print substr( "Portcullis test fixture: this file is not a MaxMind DB.\n" x 100, 0, 4096 )' \
    >"$outdir/not-an-mmdb.mmdb.tmp"
mv "$outdir/not-an-mmdb.mmdb.tmp" "$outdir/not-an-mmdb.mmdb"

writer_version="$(dpkg-query -W -f='${Version}' libmaxmind-db-writer-perl 2>/dev/null || true)"
echo "wrote $outdir (libmaxmind-db-writer-perl $writer_version)"
for f in types.mmdb types-v2.mmdb truncated.mmdb not-an-mmdb.mmdb; do
    printf '  %-17s %6d bytes  sha256 %s\n' "$f" "$(stat -c %s "$outdir/$f")" \
        "$(sha256sum "$outdir/$f" | cut -d' ' -f1)"
done
