#!/usr/bin/perl
#
# build-fixtures.pl - build the small MaxMind DB test fixtures in
# Tests/Fixtures/geoip/ (types.mmdb and types-v2.mmdb) for Portcullis' tests.
#
# All data is made up here (documentation / test addresses, hand-written
# values); nothing comes from a third-party database. The writer is MaxMind's
# own (Debian `libmaxmind-db-writer-perl`, MaxMind::DB::Writer::Tree), used the
# same way as data/build-country-db.pl: an IPv6 tree (ip_version 6, 24-bit
# records) with IPv4 stored under ::/96 and `alias_ipv6_to_ipv4 => 1`, so
# ::ffff:1.2.3.4 gives the same answer as 1.2.3.4.
#
# Normally run through build-fixtures.sh, which installs the packages, sets
# the build epochs and also writes truncated.mmdb and not-an-mmdb.mmdb. Usage:
#
#   perl build-fixtures.pl --out FILE --variant v1|v2
#
#   v1 (types.mmdb):    1.2.3.0/24 is NL / Netherlands; description
#                       "Portcullis test fixture: every value type"
#   v2 (types-v2.mmdb): 1.2.3.0/24 is BE / Belgium; description
#                       "Portcullis test fixture: second version"
#
# Reproducibility: the output depends only on the variant, except for the
# metadata `build_epoch`, which is the current time, or SOURCE_DATE_EPOCH when
# that is set (build-fixtures.sh sets 1700000000 for v1, 1700000100 for v2),
# so two builds with the same SOURCE_DATE_EPOCH are byte-identical.

use strict;
use warnings;
use utf8;

use Getopt::Long qw(GetOptions);
use Math::Int128 qw(string_to_uint128 uint128_to_hex);
use MaxMind::DB::Writer::Tree ();

my %opt;
GetOptions( \%opt, 'out=s', 'variant=s' )
    or die "usage: $0 --out FILE --variant v1|v2\n";
for my $required (qw(out variant)) {
    die "$0: --$required is required\n" unless defined $opt{$required};
}

my %VARIANT = (
    v1 => {
        description => 'Portcullis test fixture: every value type',
        iso_code    => 'NL',
        name        => 'Netherlands',
    },
    v2 => {
        description => 'Portcullis test fixture: second version',
        iso_code    => 'BE',
        name        => 'Belgium',
    },
);
my $variant = $VARIANT{ $opt{variant} }
    // die "$0: --variant must be v1 or v2, not '$opt{variant}'\n";

my $database_type = 'Portcullis-Test-Types';

# MMDB type of the value stored under each map key (the writer asks through
# map_key_type_callback). An array type is [ 'array', element type ].
my %value_type = (
    country         => 'map',
    names           => 'map',
    iso_code        => 'utf8_string',
    en              => 'utf8_string',
    location        => 'map',
    latitude        => 'double',
    longitude       => 'double',
    accuracy_radius => 'uint16',
    asn             => 'uint32',
    delta           => 'int32',
    big             => 'uint64',
    huge            => 'uint128',
    flag_true       => 'boolean',
    flag_false      => 'boolean',
    ratio           => 'float',
    raw             => 'bytes',
    list            => [ 'array', 'utf8_string' ],
    unicode         => 'utf8_string',
);

my $tree = MaxMind::DB::Writer::Tree->new(
    ip_version            => 6,
    record_size           => 24,
    database_type         => $database_type,
    languages             => ['en'],
    description           => { en => $variant->{description} },
    alias_ipv6_to_ipv4    => 1,    # ::ffff:0:0/96 etc. -> IPv4 subtree
    # The writer's reserved-network list includes the IPv6 documentation
    # prefix 2001:db8::/32; with removal on, 2001:db8:1::/48 would be silently
    # dropped. Nothing reserved is inserted otherwise (10.0.0.0/8 is simply
    # never inserted, so private addresses are "not found").
    remove_reserved_networks => 0,
    merge_strategy        => 'none',
    map_key_type_callback => sub {
        $value_type{ $_[0] } // die "no MMDB type for key '$_[0]'\n";
    },
);

if ( defined $ENV{SOURCE_DATE_EPOCH} && $ENV{SOURCE_DATE_EPOCH} =~ /^\d+$/ ) {
    # As in data/build-country-db.pl: the writer has no public option for
    # this; _set_build_epoch is what MaxMind uses in its own tests.
    $tree->_set_build_epoch( $ENV{SOURCE_DATE_EPOCH} );
}

# The record with one value of every MMDB data type.
my %every_type = (
    country => {
        iso_code => $variant->{iso_code},
        names    => { en => $variant->{name} },
    },
    location => {
        latitude        => 52.37403,    # double
        longitude       => 4.88969,     # double
        accuracy_radius => 100,         # uint16
    },
    asn        => 64500,                       # uint32 (documentation ASN)
    delta      => -42,                         # int32
    # uint64 and uint128 values must be Math::UInt128 objects (the writer's
    # documented way); big is 2**64 - 1.
    big        => string_to_uint128('18446744073709551615'),          # uint64
    huge       => string_to_uint128('0x0102030405060708090a0b0c0d0e0f10'),
    flag_true  => 1,                           # boolean true
    flag_false => 0,                           # boolean false
    ratio      => 0.5,                         # float
    raw        => "\x00\x01\xfe\xff",          # bytes (no UTF-8 flag)
    list       => [ 'a', 'b' ],                # array of utf8_string
    unicode    => "Z\x{fc}rich \x{2713}",      # utf8_string "Zürich ✓"
);

# Math::Int128's uint128() does not parse a "0x" string (it gives 0), so make
# sure the big values came out right before writing them.
uint128_to_hex( $every_type{big} ) eq '0000000000000000FFFFFFFFFFFFFFFF'
    or die "uint64 value is wrong: $every_type{big}\n";
uint128_to_hex( $every_type{huge} ) eq '0102030405060708090A0B0C0D0E0F10'
    or die "uint128 value is wrong: $every_type{huge}\n";

$tree->insert_network( '1.2.3.0/24', \%every_type );
$tree->insert_network( '1.2.4.0/24',
    { country => { iso_code => 'DE', names => { en => 'Germany' } } } );
$tree->insert_network( '2001:db8:1::/48',
    { country => { iso_code => 'JP', names => { en => 'Japan' } } } );

# Write to a temporary file and rename, so a failed build never leaves a
# truncated database behind.
my $tmp = "$opt{out}.tmp.$$";
open my $out, '>:raw', $tmp or die "$tmp: $!\n";
$tree->write_tree($out);
close $out or die "$tmp: $!\n";
rename $tmp, $opt{out} or die "rename $tmp -> $opt{out}: $!\n";

# Summary (read by build-fixtures.sh; one "key: value" per line).
printf "database_type: %s\n", $database_type;
printf "description: %s\n", $variant->{description};
printf "build_epoch: %d\n", $tree->_build_epoch;
printf "nodes: %d\n", $tree->node_count;
