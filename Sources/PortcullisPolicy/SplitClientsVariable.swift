/// `split_clients STRING $var { PERCENT VALUE; … * VALUE; }`: the variable is the value of
/// the bucket that MurmurHash2 of the rendered string falls in, as nginx's
/// ngx_stream_split_clients_module (so the same client lands in the same bucket as in nginx).
public struct SplitClientsVariable: Sendable {
    public var source: LogTemplate
    /// In order: the bucket's upper bound on the 32-bit hash (0 for `*`, which takes the
    /// rest), and its value (literal text, as nginx's values are).
    public var buckets: [(bound: UInt32, value: [UInt8])]

    public func value(for key: [UInt8]) -> [UInt8] {
        let hash = Self.murmurHash2(key)
        for bucket in buckets where hash < bucket.bound || bucket.bound == 0 { return bucket.value }
        return []  // past the last percentage and no `*`: nginx's empty value
    }

    /// Bounds from percentages in hundredths (`0.5%` is 50; `*` is 0), as nginx computes them:
    /// each bound is the running sum of `hundredths × 0xffffffff / 10000`. nil when they add up
    /// to more than 100 %.
    static func bounds(_ hundredths: [UInt32]) -> [UInt32]? {
        var sum: UInt32 = 0
        var last: UInt32 = 0
        var bounds: [UInt32] = []
        for part in hundredths {
            sum = part == 0 ? 10_000 : sum + part
            if sum > 10_000 { return nil }
            if part == 0 {
                bounds.append(0)
            } else {
                last &+= UInt32(truncatingIfNeeded: UInt64(part) * 0xFFFF_FFFF / 10_000)
                bounds.append(last)
            }
        }
        return bounds
    }

    /// nginx's `ngx_murmur_hash2` (Austin Appleby's MurmurHash2, seed 0, little-endian words).
    static func murmurHash2(_ data: [UInt8]) -> UInt32 {
        let m: UInt32 = 0x5BD1_E995
        var h = UInt32(truncatingIfNeeded: data.count)
        var index = 0
        while data.count - index >= 4 {
            var k = UInt32(data[index]) | UInt32(data[index + 1]) << 8 | UInt32(data[index + 2]) << 16 | UInt32(data[index + 3]) << 24
            k &*= m
            k ^= k >> 24
            k &*= m
            h &*= m
            h ^= k
            index += 4
        }
        let rest = data.count - index
        if rest == 3 { h ^= UInt32(data[index + 2]) << 16 }
        if rest >= 2 { h ^= UInt32(data[index + 1]) << 8 }
        if rest >= 1 {
            h ^= UInt32(data[index])
            h &*= m
        }
        h ^= h >> 13
        h &*= m
        h ^= h >> 15
        return h
    }

    /// nginx's `ngx_atofp(text, 2)` for a percentage without its `%`: digits with at most two
    /// after the point, in hundredths; nil when malformed or zero.
    static func hundredths(_ text: Substring) -> UInt32? {
        let parts = text.split(separator: ".", maxSplits: 1, omittingEmptySubsequences: false)
        guard let whole = parts.first, !whole.isEmpty || parts.count == 2,
              whole.allSatisfy({ $0.isASCII && $0.isNumber }) else { return nil }
        var fraction = parts.count == 2 ? parts[1] : ""
        guard fraction.count <= 2, fraction.allSatisfy({ $0.isASCII && $0.isNumber }) else { return nil }
        while fraction.count < 2 { fraction += "0" }
        guard let value = UInt32((whole.isEmpty ? "0" : whole) + fraction), value > 0 else { return nil }
        return value
    }
}
