import CZlib

/// One complete gzip member (header, deflate data, CRC-32 and length) of `bytes`, made by zlib.
/// A buffered `access_log … gzip` writes one member per buffer, as nginx does: a file of
/// members one after another is a valid gzip file, and `zcat` prints their text in order.
enum Gzip {
    static func member(of bytes: [UInt8], level: Int) -> [UInt8]? {
        var stream = z_stream()
        guard portcullis_deflate_init_gzip(&stream, Int32(level)) == Z_OK else { return nil }
        defer { deflateEnd(&stream) }
        // deflateBound's worst case for these settings, gzip wrapper included: one call of
        // deflate(Z_FINISH) always has room to finish.
        let capacity = Int(deflateBound(&stream, uLong(bytes.count)))
        var output = [UInt8](repeating: 0, count: capacity)
        let written = bytes.withUnsafeBufferPointer { input -> Int? in
            output.withUnsafeMutableBufferPointer { out -> Int? in
                stream.next_in = UnsafeMutablePointer(mutating: input.baseAddress)
                stream.avail_in = uInt(input.count)
                stream.next_out = out.baseAddress
                stream.avail_out = uInt(out.count)
                guard deflate(&stream, Z_FINISH) == Z_STREAM_END else { return nil }
                return out.count - Int(stream.avail_out)
            }
        }
        guard let written else { return nil }
        output.removeSubrange(written...)
        return output
    }
}
