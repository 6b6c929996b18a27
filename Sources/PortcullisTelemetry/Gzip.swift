import CZlib

/// One complete gzip member (header, deflate data, CRC-32 and length) of `bytes`, made by zlib.
/// A buffered `access_log … gzip` writes one member per buffer, as nginx does: a file of
/// members one after another is a valid gzip file, and `zcat` prints their text in order.
public enum Gzip {
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

extension Gzip {
    /// The text of a gzip file: every member, one after another (a buffered `access_log …
    /// gzip` or logrotate's `compress` writes such files); nil if the bytes are not gzip or are
    /// cut short.
    public static func decompress(_ bytes: [UInt8]) -> [UInt8]? {
        var stream = z_stream()
        guard portcullis_inflate_init_auto(&stream) == Z_OK else { return nil }
        defer { inflateEnd(&stream) }
        var output: [UInt8] = []
        var chunk = [UInt8](repeating: 0, count: 64 * 1024)
        let complete = bytes.withUnsafeBufferPointer { input -> Bool in
            stream.next_in = UnsafeMutablePointer(mutating: input.baseAddress)
            stream.avail_in = uInt(input.count)
            while true {
                let status = chunk.withUnsafeMutableBufferPointer { out -> Int32 in
                    stream.next_out = out.baseAddress
                    stream.avail_out = uInt(out.count)
                    return inflate(&stream, Z_NO_FLUSH)
                }
                output += chunk[0..<(chunk.count - Int(stream.avail_out))]
                switch status {
                case Z_STREAM_END:
                    // The next member, if any.
                    guard stream.avail_in > 0 else { return true }
                    guard inflateReset(&stream) == Z_OK else { return false }
                case Z_OK:
                    if stream.avail_in == 0 && stream.avail_out > 0 { return false }  // cut short
                default:
                    return false
                }
            }
        }
        return complete ? output : nil
    }
}
