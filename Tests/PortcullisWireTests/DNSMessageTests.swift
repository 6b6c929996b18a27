import PortcullisCore
import PortcullisWire
import Testing

/// The resolver's DNS codec: the query as RFC 1035 lays it out, and answers read defensively.
@Suite struct DNSMessageTests {
    @Test("an A query: header (id, RD), one question, the name as labels, type and class")
    func query() {
        let bytes = DNSMessage.query(id: 0x1234, name: "Backend.Test.", type: .a)
        #expect(bytes == [0x12, 0x34, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0,
                          7] + Array("backend".utf8) + [4] + Array("test".utf8) + [0, 0, 1, 0, 1])
        #expect(DNSMessage.query(id: 1, name: String(repeating: "a", count: 64) + ".test", type: .a) == nil)
        #expect(DNSMessage.query(id: 1, name: "a..test", type: .a) == nil)
    }

    /// A response to `query`: its header with `flags`, the question echoed, then `records`.
    static func response(to query: [UInt8], flags: UInt16 = 0x8180, records: [[UInt8]]) -> [UInt8] {
        var out = Array(query[0..<2]) + [UInt8(flags >> 8), UInt8(flags & 0xFF), 0, 1, 0, UInt8(records.count), 0, 0, 0, 0]
        out += query[12...]
        for record in records { out += record }
        return out
    }

    /// A record whose owner is a pointer to offset 12 (the question's name).
    static func record(type: UInt16, ttl: UInt32, data: [UInt8], owner: [UInt8] = [0xC0, 12]) -> [UInt8] {
        owner + [UInt8(type >> 8), UInt8(type & 0xFF), 0, 1,
                 UInt8(ttl >> 24), UInt8(ttl >> 16 & 0xFF), UInt8(ttl >> 8 & 0xFF), UInt8(ttl & 0xFF),
                 0, UInt8(data.count)] + data
    }

    @Test("answers: addresses with the smallest TTL, a CNAME chain followed, records for other names ignored")
    func answers() throws {
        let query = DNSMessage.query(id: 7, name: "backend.test", type: .a)!
        let plain = Self.response(to: query, records: [
            Self.record(type: 1, ttl: 30, data: [127, 0, 0, 21]),
            Self.record(type: 1, ttl: 5, data: [127, 0, 0, 22]),
        ])
        #expect(try DNSMessage.answer(plain, id: 7, name: "backend.test", type: .a)
            == .addresses([IPAddress("127.0.0.21")!, IPAddress("127.0.0.22")!], ttl: 5))
        // backend.test CNAME real.test (written out at offset 47), real.test A 192.0.2.9.
        let alias: [UInt8] = [4] + Array("real".utf8) + [0xC0, 20]  // "real" + ".test" from the question
        let cnameOffset = UInt8(query.count + 12)  // where the CNAME's data starts
        let chained = Self.response(to: query, records: [
            Self.record(type: 5, ttl: 60, data: alias),
            Self.record(type: 1, ttl: 60, data: [192, 0, 2, 9], owner: [0xC0, cnameOffset]),
            Self.record(type: 1, ttl: 60, data: [10, 0, 0, 1], owner: [5] + Array("other".utf8) + [0]),
        ])
        #expect(try DNSMessage.answer(chained, id: 7, name: "backend.test", type: .a) == .addresses([IPAddress("192.0.2.9")!], ttl: 60))
        // RFC 2181 §8: a TTL with the top bit set is 0, not 136 years.
        let huge = Self.response(to: query, records: [Self.record(type: 1, ttl: 0x8000_0000, data: [127, 0, 0, 21])])
        #expect(try DNSMessage.answer(huge, id: 7, name: "backend.test", type: .a) == .addresses([IPAddress("127.0.0.21")!], ttl: 0))
        #expect(try DNSMessage.answer(Self.response(to: query, flags: 0x8183, records: []), id: 7, name: "backend.test", type: .a) == .nameError)
        #expect(try DNSMessage.answer(Self.response(to: query, flags: 0x8182, records: []), id: 7, name: "backend.test", type: .a) == .failure(2))
        #expect(try DNSMessage.answer(Self.response(to: query, flags: 0x8380, records: []), id: 7, name: "backend.test", type: .a) == .truncated)
    }

    @Test("hostile responses: another id or question is not ours; cut-short records, forward or looping pointers are malformed, never a crash")
    func hostile() {
        let query = DNSMessage.query(id: 7, name: "backend.test", type: .a)!
        let good = Self.response(to: query, records: [Self.record(type: 1, ttl: 30, data: [127, 0, 0, 21])])
        #expect(throws: DNSMessage.DecodeError.notOurs) { try DNSMessage.answer(good, id: 8, name: "backend.test", type: .a) }
        #expect(throws: DNSMessage.DecodeError.notOurs) { try DNSMessage.answer(good, id: 7, name: "other.test", type: .a) }
        #expect(throws: DNSMessage.DecodeError.notOurs) { try DNSMessage.answer(query, id: 7, name: "backend.test", type: .a) }
        for cut in 0..<good.count {
            _ = try? DNSMessage.answer(Array(good.prefix(cut)), id: 7, name: "backend.test", type: .a)
        }
        let loop = Self.response(to: query, records: [Self.record(type: 1, ttl: 30, data: [1, 2, 3, 4], owner: [0xC0, UInt8(query.count)])])
        #expect(throws: DNSMessage.DecodeError.self) { try DNSMessage.answer(loop, id: 7, name: "backend.test", type: .a) }
        var state: UInt64 = 42
        for _ in 0..<2_000 {  // random corruption of a good answer
            var bytes = good
            for _ in 0..<3 {
                state = state &* 6364136223846793005 &+ 1442695040888963407
                bytes[Int(state >> 33) % bytes.count] = UInt8(truncatingIfNeeded: state >> 13)
            }
            _ = try? DNSMessage.answer(bytes, id: 7, name: "backend.test", type: .a)
        }
    }
}
