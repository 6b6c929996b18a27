/// CRC-32 (IEEE 802.3, the zlib one), kept open for more bytes: nginx's `hash` balancing hashes
/// keys and server names with it (`ngx_crc32_init/update/final`), and the same key must land
/// on the same server as in nginx.
struct CRC32 {
    private static let table: [UInt32] = (0..<256).map { index in
        var crc = UInt32(index)
        for _ in 0..<8 { crc = crc & 1 == 1 ? (crc >> 1) ^ 0xEDB8_8320 : crc >> 1 }
        return crc
    }

    /// The running value (not yet finalised).
    private var state: UInt32 = ~0

    mutating func update(_ bytes: some Sequence<UInt8>) {
        for byte in bytes { state = Self.table[Int((state ^ UInt32(byte)) & 0xFF)] ^ (state >> 8) }
    }

    var value: UInt32 { ~state }

    static func checksum(_ bytes: some Sequence<UInt8>) -> UInt32 {
        var crc = CRC32()
        crc.update(bytes)
        return crc.value
    }
}
