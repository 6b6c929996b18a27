import PortcullisWire
import Testing

/// CRC-32C (Castagnoli) check values: the catalogue's "123456789" check and the iSCSI test
/// patterns of RFC 3720 appendix B.4.
@Suite struct CRC32CTests {
    @Test func checkValue() {
        #expect(CRC32C.checksum(Array("123456789".utf8)) == 0xE306_9283)
    }

    @Test func rfc3720Patterns() {
        #expect(CRC32C.checksum([UInt8](repeating: 0x00, count: 32)) == 0x8A91_36AA)
        #expect(CRC32C.checksum([UInt8](repeating: 0xFF, count: 32)) == 0x62A8_AB43)
        #expect(CRC32C.checksum((0..<32).map { UInt8($0) }) == 0x46DD_794E)
        #expect(CRC32C.checksum((0..<32).reversed().map { UInt8($0) }) == 0x113F_DB5C)
    }

    @Test func emptyInput() {
        #expect(CRC32C.checksum([UInt8]()) == 0)
    }

    @Test func anySequenceOfBytes() {
        let bytes = Array("123456789".utf8)
        #expect(CRC32C.checksum(bytes[...]) == 0xE306_9283)
        #expect(CRC32C.checksum("123456789".utf8) == 0xE306_9283)
    }

    /// The PROXY v2 use: over the whole header with the CRC field zeroed (independently computed).
    @Test func proxyHeaderWithZeroedField() {
        let header = hex("\(signature) 21 11 0013 \(tcp4Block) 03 0004 00000000")
        #expect(CRC32C.checksum(header) == 0x1C1A_E9C6)
    }
}
