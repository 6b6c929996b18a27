public import PortcullisCore

/// The two DNS messages the resolver needs (RFC 1035): an A or AAAA query, and the addresses a
/// response gives for it. Pure bytes in, values out, like the PROXY codec: the resolver's
/// sockets live in the engine. A response is read defensively, since anyone who can reach the
/// resolver's port can send one: every length is checked, compression pointers may only point
/// backwards and at most 32 are followed per name, and a response must echo the query's id and
/// question to count.
public enum DNSMessage {
    public enum RecordType: UInt16, Sendable {
        case a = 1
        case aaaa = 28
    }

    /// What a response says about one name.
    public enum Answer: Sendable, Equatable {
        /// The addresses (possibly none: NOERROR with no records of the type) and the smallest
        /// TTL among them, in seconds.
        case addresses([IPAddress], ttl: UInt32)
        /// NXDOMAIN: the name does not exist.
        case nameError
        /// Any other response code (SERVFAIL, REFUSED, …), as its number.
        case failure(UInt8)
        /// A truncated response (TC): the answer did not fit in a datagram.
        case truncated
    }

    public enum DecodeError: Error, Equatable {
        case malformed(String)
        /// Not the answer to our query (another id, another question): ignore it.
        case notOurs
    }

    /// A recursive query for `name` (dots between labels, no trailing dot needed).
    /// Nil when the name cannot be a DNS name (a label over 63 bytes, 255 in all, empty labels).
    public static func query(id: UInt16, name: String, type: RecordType) -> [UInt8]? {
        guard let encoded = encodeName(name) else { return nil }
        var out: [UInt8] = []
        out.reserveCapacity(12 + encoded.count + 4)
        append16(id, to: &out)
        append16(0x0100, to: &out)  // standard query, recursion desired
        append16(1, to: &out)       // one question
        append16(0, to: &out)
        append16(0, to: &out)
        append16(0, to: &out)
        out += encoded
        append16(type.rawValue, to: &out)
        append16(1, to: &out)       // class IN
        return out
    }

    /// The answer `response` gives to the query `id` for `name` and `type`. CNAME records in
    /// between are followed within the response (the recursive server puts the chain there).
    public static func answer(_ response: [UInt8], id: UInt16, name: String, type: RecordType) throws(DecodeError) -> Answer {
        guard response.count >= 12 else { throw .malformed("shorter than a DNS header") }
        guard read16(response, 0) == id else { throw .notOurs }
        let flags = read16(response, 2)
        guard flags & 0x8000 != 0 else { throw .notOurs }  // a query, not a response
        let questions = Int(read16(response, 4))
        let answers = Int(read16(response, 6))
        var offset = 12
        guard questions == 1 else { throw .notOurs }
        let (asked, afterName) = try readName(response, at: offset)
        offset = afterName
        guard offset + 4 <= response.count else { throw .malformed("question cut short") }
        guard asked == normalized(name), read16(response, offset) == type.rawValue else { throw .notOurs }
        offset += 4
        if flags & 0x0200 != 0 { return .truncated }
        let code = UInt8(flags & 0x000F)
        if code == 3 { return .nameError }
        if code != 0 { return .failure(code) }
        var wanted: Set<String> = [asked]
        var addresses: [IPAddress] = []
        var ttl = UInt32.max
        for _ in 0..<answers {
            let (owner, afterOwner) = try readName(response, at: offset)
            offset = afterOwner
            guard offset + 10 <= response.count else { throw .malformed("record cut short") }
            let recordType = read16(response, offset)
            let recordClass = read16(response, offset + 2)
            var recordTTL = UInt32(read16(response, offset + 4)) << 16 | UInt32(read16(response, offset + 6))
            if recordTTL > 0x7FFF_FFFF { recordTTL = 0 }  // RFC 2181 §8: the top bit set means 0
            let length = Int(read16(response, offset + 8))
            offset += 10
            guard offset + length <= response.count else { throw .malformed("record data cut short") }
            defer { offset += length }
            guard recordClass == 1, wanted.contains(owner) else { continue }
            switch recordType {
            case 5:  // CNAME: the chain goes on under the alias
                let (alias, _) = try readName(response, at: offset)
                wanted.insert(alias)
            case type.rawValue where type == .a && length == 4:
                addresses.append(IPAddress(bytes: response[offset..<(offset + 4)])!)
                ttl = min(ttl, recordTTL)
            case type.rawValue where type == .aaaa && length == 16:
                addresses.append(IPAddress(bytes: response[offset..<(offset + 16)])!)
                ttl = min(ttl, recordTTL)
            default:
                continue
            }
        }
        return .addresses(addresses, ttl: addresses.isEmpty ? 0 : ttl)
    }

    // MARK: Names

    static func normalized(_ name: String) -> String {
        var name = name.lowercased()
        if name.hasSuffix(".") { name.removeLast() }
        return name
    }

    static func encodeName(_ name: String) -> [UInt8]? {
        let name = normalized(name)
        guard !name.isEmpty else { return nil }
        var out: [UInt8] = []
        for label in name.split(separator: ".", omittingEmptySubsequences: false) {
            let bytes = Array(label.utf8)
            guard !bytes.isEmpty, bytes.count <= 63 else { return nil }
            out.append(UInt8(bytes.count))
            out += bytes
        }
        out.append(0)
        return out.count <= 255 ? out : nil
    }

    /// A (possibly compressed) name at `offset`, lowercased; and where the record goes on.
    static func readName(_ message: [UInt8], at start: Int) throws(DecodeError) -> (String, Int) {
        var labels: [String] = []
        var offset = start
        var end: Int?
        var jumps = 0
        var length = 0
        while true {
            guard offset < message.count else { throw .malformed("name runs past the end") }
            let byte = message[offset]
            switch byte & 0xC0 {
            case 0x00:
                if byte == 0 {
                    return (labels.joined(separator: ".").lowercased(), end ?? offset + 1)
                }
                let count = Int(byte)
                guard offset + 1 + count <= message.count else { throw .malformed("label runs past the end") }
                length += count + 1
                guard length <= 255 else { throw .malformed("name longer than 255 bytes") }
                labels.append(String(decoding: message[(offset + 1)...(offset + count)], as: UTF8.self))
                offset += 1 + count
            case 0xC0:
                guard offset + 1 < message.count else { throw .malformed("pointer cut short") }
                let target = Int(byte & 0x3F) << 8 | Int(message[offset + 1])
                // Only backwards, and not forever: a loop of pointers is a malformed message.
                guard target < offset, jumps < 32 else { throw .malformed("bad compression pointer") }
                jumps += 1
                if end == nil { end = offset + 2 }
                offset = target
            default:
                throw .malformed("unknown label type")
            }
        }
    }

    static func append16(_ value: UInt16, to out: inout [UInt8]) {
        out.append(UInt8(value >> 8))
        out.append(UInt8(value & 0xFF))
    }

    static func read16(_ bytes: [UInt8], _ offset: Int) -> UInt16 {
        UInt16(bytes[offset]) << 8 | UInt16(bytes[offset + 1])
    }
}
