#ifndef PORTCULLIS_CZLIB_SHIM_H
#define PORTCULLIS_CZLIB_SHIM_H

#include <zlib.h>

/* deflateInit2 is a macro, which Swift cannot call: this is the same call as a function.
   windowBits 15 + 16 asks zlib for a gzip wrapper (header and CRC trailer) instead of zlib's. */
static inline int portcullis_deflate_init_gzip(z_stream *stream, int level) {
    return deflateInit2(stream, level, Z_DEFLATED, 15 + 16, 8, Z_DEFAULT_STRATEGY);
}

/* inflateInit2 with windowBits 15 + 32: zlib or gzip, told apart by the header. */
static inline int portcullis_inflate_init_auto(z_stream *stream) {
    return inflateInit2(stream, 15 + 32);
}

#endif
