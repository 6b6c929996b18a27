#ifndef PORTCULLIS_CMAXMINDDB_SHIM_H
#define PORTCULLIS_CMAXMINDDB_SHIM_H

#include <maxminddb.h>
#include <stdint.h>

/* Swift cannot read an unsigned __int128 union member: hand it over as two halves. */
static inline void portcullis_mmdb_uint128(const MMDB_entry_data_s *data, uint64_t *high, uint64_t *low) {
#if MMDB_UINT128_IS_BYTE_ARRAY
    uint64_t h = 0, l = 0;
    for (int i = 0; i < 8; i++) { h = (h << 8) | data->uint128[i]; }
    for (int i = 8; i < 16; i++) { l = (l << 8) | data->uint128[i]; }
    *high = h;
    *low = l;
#else
    *high = (uint64_t)(data->uint128 >> 64);
    *low = (uint64_t)data->uint128;
#endif
}

#endif
