#!/usr/bin/perl
#
# build-country-db.pl - build data/country.mmdb for Portcullis.
#
# Reads the IPv4 and IPv6 country ranges that Debian's `tor-geoipdb` package
# ships (/usr/share/tor/geoip and /usr/share/tor/geoip6, derived from the
# IPFire Location database, CC BY-SA 4.0) and English country names from
# Debian's `iso-codes` package (/usr/share/iso-codes/json/iso_3166-1.json),
# and writes a MaxMind DB file in the GeoLite2-Country record layout with
# MaxMind's own writer (Debian `libmaxmind-db-writer-perl`):
#
#     { "country": { "iso_code": "FR", "names": { "en": "France" } } }
#
# The tree is an IPv6 tree (ip_version 6) with IPv4 stored under ::/96 and
# `alias_ipv6_to_ipv4 => 1`, exactly as MaxMind's own databases are built:
# ::ffff:0:0/96 (IPv4-mapped), 2001::/32 (Teredo) and 2002::/16 (6to4) point
# into the IPv4 subtree, so ::ffff:8.8.8.8 gives the same answer as 8.8.8.8.
#
# Normally run through build-country-db.sh, which installs the packages and
# passes their versions in. Usage:
#
#   perl build-country-db.pl --out FILE --tor-version V --iso-version V
#        [--geoip4 FILE] [--geoip6 FILE] [--iso3166 FILE]
#
# Reproducibility: the output depends only on the input files and the
# version strings, except for the metadata `build_epoch`, which is the
# current time, or SOURCE_DATE_EPOCH when that is set (so two builds with the
# same SOURCE_DATE_EPOCH are byte-identical).
#
# Mapping rules for the two-letter codes in the tor files (see data/README.md):
#   - a code listed in ISO 3166-1 (iso-codes)  -> a country record;
#   - "UK" (ISO "exceptionally reserved" for the United Kingdom) -> "GB";
#   - anything else ("??" = unknown, the registry region codes "EU" and "AP",
#     the withdrawn "CS" and "AN", and stray user-assigned codes such as
#     "ZZ") -> no record: such addresses are "not found", as they would be
#     for a network MaxMind cannot place in one country.

use strict;
use warnings;
use utf8;

use Getopt::Long qw(GetOptions);
use JSON::PP ();
use Socket qw(inet_pton inet_ntop AF_INET AF_INET6);
use MaxMind::DB::Writer::Tree ();

my %opt = (
    geoip4  => '/usr/share/tor/geoip',
    geoip6  => '/usr/share/tor/geoip6',
    iso3166 => '/usr/share/iso-codes/json/iso_3166-1.json',
);
GetOptions( \%opt, 'out=s', 'geoip4=s', 'geoip6=s', 'iso3166=s',
    'tor-version=s', 'iso-version=s' )
    or die "usage: $0 --out FILE --tor-version V --iso-version V\n";
for my $required (qw(out tor-version iso-version)) {
    die "$0: --$required is required\n" unless defined $opt{$required};
}

# Codes in the tor files that stand for an ISO 3166-1 country under another
# name. Everything else that is not in ISO 3166-1 is skipped (see above).
my %CODE_ALIAS = ( UK => 'GB' );

# ---------------------------------------------------------------------------
# Country names: ISO 3166-1 alpha-2 code -> English name. iso-codes gives the
# formal short name in `name` ("Korea, Republic of") and, for some countries,
# a `common_name` ("South Korea"); prefer the latter, as GeoLite2 does.
# ---------------------------------------------------------------------------
my %name_of;
{
    open my $fh, '<:raw', $opt{iso3166} or die "$opt{iso3166}: $!\n";
    local $/;
    my $json = JSON::PP->new->utf8->decode(<$fh>);
    for my $entry ( @{ $json->{'3166-1'} } ) {
        $name_of{ $entry->{alpha_2} } = $entry->{common_name} // $entry->{name};
    }
    die "$opt{iso3166}: no countries found\n" unless %name_of;
}

# ---------------------------------------------------------------------------
# Address helpers. Addresses are kept as packed big-endian byte strings (4
# bytes for IPv4, 16 for IPv6), so plain string comparison orders them.
# ---------------------------------------------------------------------------

# The address after $addr, or undef on overflow (255.255.255.255 + 1).
sub next_addr {
    my @b = unpack 'C*', shift;
    for ( my $i = $#b; $i >= 0; $i-- ) {
        if ( $b[$i] == 255 ) { $b[$i] = 0; next }
        $b[$i]++;
        return pack 'C*', @b;
    }
    return undef;
}

# The address before $addr, or undef on underflow (0.0.0.0 - 1).
sub prev_addr {
    my @b = unpack 'C*', shift;
    for ( my $i = $#b; $i >= 0; $i-- ) {
        if ( $b[$i] == 0 ) { $b[$i] = 255; next }
        $b[$i]--;
        return pack 'C*', @b;
    }
    return undef;
}

# First and last address of an IPv6 CIDR, packed.
sub cidr6_bounds {
    my ( $ip, $len ) = split m{/}, shift;
    my $bits  = unpack 'B128', inet_pton( AF_INET6, $ip );
    my $first = substr( $bits, 0, $len ) . ( '0' x ( 128 - $len ) );
    my $last  = substr( $bits, 0, $len ) . ( '1' x ( 128 - $len ) );
    return ( pack( 'B128', $first ), pack( 'B128', $last ) );
}

# IPv6 space that must not receive IPv6 data: ::/96 holds the IPv4 tree, and
# the writer's alias_ipv6_to_ipv4 turns the other three into links to it
# (inserting inside them throws). The tor geoip6 file has, for example,
# "2002::/16 -> JP" and "2001::/32 -> ??"; those lines are dropped or clipped.
my @IPV6_RESERVED_FOR_IPV4 = map { [ cidr6_bounds($_), $_ ] }
    ( '::/96', '::ffff:0:0/96', '2001::/32', '2002::/16' );

# ---------------------------------------------------------------------------
# Reading the tor files. Lines are "FIRST,LAST,CC" (IPv4 FIRST/LAST are
# 32-bit integers, IPv6 ones are addresses); "#" starts a comment. Returns
# the ranges in file order as [first, last, code] with packed addresses.
# ---------------------------------------------------------------------------
sub read_ranges {
    my ( $file, $family ) = @_;
    open my $fh, '<', $file or die "$file: $!\n";
    my @ranges;
    while ( my $line = <$fh> ) {
        next if $line =~ /^\s*(#|$)/;
        chomp $line;
        my ( $first, $last, $cc ) = split /,/, $line;
        die "$file:$.: cannot parse '$line'\n" unless defined $cc;
        my ( $f, $l );
        if ( $family == 4 ) {
            die "$file:$.: bad IPv4 range '$line'\n"
                unless $first =~ /^\d+$/ && $last =~ /^\d+$/;
            ( $f, $l ) = ( pack( 'N', $first ), pack( 'N', $last ) );
        }
        else {
            $f = inet_pton( AF_INET6, $first );
            $l = inet_pton( AF_INET6, $last );
            die "$file:$.: bad IPv6 range '$line'\n"
                unless defined $f && defined $l;
        }
        die "$file:$.: range ends before it starts\n" if $l lt $f;
        die "$file:$.: ranges out of order or overlapping\n"
            if @ranges && $f le $ranges[-1][1];
        push @ranges, [ $f, $l, $cc ];
    }
    return \@ranges;
}

my %stats;    # counters for the summary

# Map each range's code to an ISO 3166-1 code (or drop it), then join
# neighbouring ranges of the same country into one range (fewer inserts).
sub normalise {
    my ( $ranges, $family ) = @_;
    my @out;
    for my $r (@$ranges) {
        my $cc = $CODE_ALIAS{ $r->[2] } // $r->[2];
        if ( !exists $name_of{$cc} ) {
            $stats{"skipped_v${family}"}{ $r->[2] }++;
            next;
        }
        if (   @out
            && $out[-1][2] eq $cc
            && defined( my $n = next_addr( $out[-1][1] ) ) ) {
            if ( $n eq $r->[0] ) { $out[-1][1] = $r->[1]; next }
        }
        push @out, [ $r->[0], $r->[1], $cc ];
    }
    return \@out;
}

# Remove from IPv6 ranges the parts that fall inside @IPV6_RESERVED_FOR_IPV4.
# A range that lies wholly inside one is dropped; one that overlaps an edge
# is clipped. (A range that strictly contains one is left alone: the writer
# then stores nothing for the aliased part, as documented.)
sub clip_ipv6 {
    my ($ranges) = @_;
    my @out;
RANGE: for my $r (@$ranges) {
        my ( $f, $l, $cc ) = @$r;
        for my $res (@IPV6_RESERVED_FOR_IPV4) {
            my ( $rf, $rl, $name ) = @$res;
            next if $l lt $rf || $f gt $rl;    # no overlap
            if ( $f ge $rf && $l le $rl ) {    # wholly inside
                $stats{clipped_v6}{"$cc in $name"}++;
                next RANGE;
            }
            next if $f lt $rf && $l gt $rl;    # strictly contains
            $stats{clipped_v6}{"$cc at edge of $name"}++;
            if   ( $f ge $rf ) { $f = next_addr($rl) }
            else               { $l = prev_addr($rf) }
        }
        push @out, [ $f, $l, $cc ];
    }
    return \@out;
}

my $raw4 = read_ranges( $opt{geoip4}, 4 );
my $raw6 = read_ranges( $opt{geoip6}, 6 );
my $v4   = normalise( $raw4, 4 );
my $v6   = clip_ipv6( normalise( $raw6, 6 ) );

# ---------------------------------------------------------------------------
# The tree.
# ---------------------------------------------------------------------------
my $description
    = "Portcullis country database (GeoLite2-Country layout) built from "
    . "Debian tor-geoipdb $opt{'tor-version'} (IPFire Location data, "
    . "CC BY-SA 4.0) with country names from Debian iso-codes "
    . "$opt{'iso-version'}";

my %value_type = (
    country  => 'map',
    names    => 'map',
    iso_code => 'utf8_string',
    en       => 'utf8_string',
);

my $tree = MaxMind::DB::Writer::Tree->new(
    ip_version            => 6,
    record_size           => 24,    # enough for 16M nodes; we need ~1M
    database_type         => 'Portcullis-Country',
    languages             => ['en'],
    description           => { en => $description },
    alias_ipv6_to_ipv4    => 1,     # ::ffff:0:0/96 etc. -> IPv4 subtree
    remove_reserved_networks => 1,  # private/loopback/etc. never get data
    merge_strategy        => 'none',
    map_key_type_callback => sub {
        $value_type{ $_[0] } // die "no MMDB type for key '$_[0]'\n";
    },
);

if ( defined $ENV{SOURCE_DATE_EPOCH} && $ENV{SOURCE_DATE_EPOCH} =~ /^\d+$/ ) {
    # The writer has no public option for this; _set_build_epoch is the
    # writer MaxMind uses in its own tests to compare outputs byte for byte.
    $tree->_set_build_epoch( $ENV{SOURCE_DATE_EPOCH} );
}

# One shared Perl structure per country: the writer stores each distinct
# record once in the data section anyway, this just saves memory.
my %record_of;
sub record_for {
    my $cc = shift;
    return $record_of{$cc} //=
        { country => { iso_code => $cc, names => { en => $name_of{$cc} } } };
}

# IPv4 ranges are inserted in IPv4 notation: the writer puts them in ::/96.
for my $r (@$v4) {
    $tree->insert_range( inet_ntop( AF_INET, $r->[0] ),
        inet_ntop( AF_INET, $r->[1] ), record_for( $r->[2] ) );
}
for my $r (@$v6) {
    $tree->insert_range( inet_ntop( AF_INET6, $r->[0] ),
        inet_ntop( AF_INET6, $r->[1] ), record_for( $r->[2] ) );
}

# Count the networks (data records) in the finished tree: IPv4 ones are
# those inside ::/96. Aliases are node records, so nothing is counted twice.
{
    package NetworkCounter;
    sub new { bless { v4 => 0, v6 => 0 }, shift }
    sub process_data_record {
        my ( $self, undef, undef, undef, undef, $ip, $prefix ) = @_;
        # $ip is a Math::UInt128; IPv4 lives in ::/96 (prefix >= 96, ip < 2^32).
        if ( $prefix >= 96 && ( $ip >> 32 ) == 0 ) { $self->{v4}++ }
        else                                        { $self->{v6}++ }
    }
}
my $counter = NetworkCounter->new;
$tree->iterate($counter);

# Write to a temporary file and rename, so a failed build never leaves a
# truncated database behind.
my $tmp = "$opt{out}.tmp.$$";
open my $out, '>:raw', $tmp or die "$tmp: $!\n";
$tree->write_tree($out);
close $out or die "$tmp: $!\n";
rename $tmp, $opt{out} or die "rename $tmp -> $opt{out}: $!\n";

# ---------------------------------------------------------------------------
# Summary (read by build-country-db.sh; one "key: value" per line).
# ---------------------------------------------------------------------------
my %countries = map { $_->[2] => 1 } @$v4, @$v6;
my $fmt_skipped = sub {
    my $h = shift // {};
    return join( ', ', map {"$_ x$h->{$_}"} sort keys %$h ) || 'none';
};
printf "database_type: %s\n", 'Portcullis-Country';
printf "description: %s\n", $description;
printf "build_epoch: %d\n", $tree->_build_epoch;
printf "input_ranges: %d IPv4, %d IPv6\n", scalar @$raw4, scalar @$raw6;
printf "merged_ranges: %d IPv4, %d IPv6\n", scalar @$v4, scalar @$v6;
printf "networks: %d (%d IPv4, %d IPv6)\n",
    $counter->{v4} + $counter->{v6}, $counter->{v4}, $counter->{v6};
printf "nodes: %d\n", $tree->node_count;
printf "countries: %d\n", scalar keys %countries;
printf "skipped_ipv4_codes: %s\n", $fmt_skipped->( $stats{skipped_v4} );
printf "skipped_ipv6_codes: %s\n", $fmt_skipped->( $stats{skipped_v6} );
printf "ipv6_dropped_for_ipv4_aliases: %s\n",
    $fmt_skipped->( $stats{clipped_v6} );
