/// What `ssl_preread` learns from a TLS ClientHello: the values of nginx's
/// `$ssl_preread_server_name`, `$ssl_preread_alpn_protocols` and `$ssl_preread_protocol`.
///
/// **Text.** nginx copies the SNI host name and the ALPN protocol names byte for byte, checks
/// nothing in them, and leaves escaping to the log writer. So does this type, without losing a
/// byte: `serverName` and `alpnProtocols` hold the bytes **as Latin-1**, each byte one Unicode
/// scalar U+0000…U+00FF (so ASCII, which every real host name and ALPN identifier is, reads as
/// itself; `0xC3 0xA9` is "Ã©", not "é"; a NUL or an ESC stays a NUL or an ESC). Invalid UTF-8
/// is not rejected, because nginx does not reject it and because a variable's value in
/// Portcullis is bytes: `serverNameBytes` and `alpnProtocolsValue` give back exactly the bytes
/// nginx's variables hold. Use those for variables and logs (whose escaping works on bytes);
/// `Array(serverName.utf8)` would re-encode every byte above 0x7F as two bytes.
public struct ClientHelloInfo: Sendable, Equatable {
    /// The first host_name of the first server_name extension (type 0), Latin-1; "" when the
    /// hello has none (or it is empty). Not lower-cased, trailing dot kept (nginx's variable is
    /// raw too; only its virtual-server lookup normalises a copy).
    public var serverName: String
    /// The protocol names of the first ALPN extension (type 16), in the client's order, Latin-1.
    public var alpnProtocols: [String]
    /// `$ssl_preread_protocol`: the highest version the client offers, with nginx's names
    /// ("TLSv1.3", "TLSv1.2", "TLSv1.1", "TLSv1", "SSLv3", "SSLv2"), or "" for a version that
    /// has no name. With a supported_versions extension it is the highest named version in it
    /// (GREASE values such as 0x0A0A and unknown ones have no name and are skipped); without
    /// one, or when it names no known version, `legacyVersion`. nginx instead says "TLSv1.3"
    /// whenever the extension is present, whatever it lists: see `nginxProtocolVersion`.
    public var protocolVersion: String
    /// The hello's client_version field (the SSLv2-compatible hello's version field).
    public var legacyVersion: UInt16
    /// The supported_versions extension (type 43) as sent, GREASE included; nil without one.
    public var supportedVersions: [UInt16]?

    public init(serverName: String = "", alpnProtocols: [String] = [], protocolVersion: String = "",
                legacyVersion: UInt16 = 0, supportedVersions: [UInt16]? = nil) {
        self.serverName = serverName
        self.alpnProtocols = alpnProtocols
        self.protocolVersion = protocolVersion
        self.legacyVersion = legacyVersion
        self.supportedVersions = supportedVersions
    }

    /// `$ssl_preread_server_name`: the host name's bytes exactly as received.
    public var serverNameBytes: [UInt8] { latin1Bytes(serverName) }

    /// `$ssl_preread_alpn_protocols`: the names joined by "," (as nginx does; a name that
    /// itself holds a comma cannot be told apart), exactly as received.
    public var alpnProtocolsValue: [UInt8] {
        var out: [UInt8] = []
        for (i, name) in alpnProtocols.enumerated() {
            if i > 0 { out.append(UInt8(ascii: ",")) }
            out += latin1Bytes(name)
        }
        return out
    }

    /// What nginx's `$ssl_preread_protocol` says for this hello: "TLSv1.3" when a
    /// supported_versions extension is present at all (nginx does not read the list), otherwise
    /// the name of `legacyVersion`.
    public var nginxProtocolVersion: String {
        supportedVersions == nil ? ClientHelloPeeker.protocolName(legacyVersion) : "TLSv1.3"
    }
}

/// The answer to "is this the start of a TLS connection, and what does its ClientHello say?"
public enum ClientHelloPeek: Sendable, Equatable {
    /// The bytes are a proper prefix of what can still become a ClientHello: read more.
    case needMore
    /// A whole ClientHello arrived. Nothing after its last byte was looked at.
    case hello(ClientHelloInfo)
    /// The bytes can never become a ClientHello (nginx's module declines: its variables have
    /// no value, and the session goes on to the next phase).
    case notTLS
}

/// Reads a TLS ClientHello from the first bytes of a connection, as nginx's `ssl_preread` does
/// (ngx_stream_ssl_preread_module.c), without keeping state: call `peek` again with all the
/// bytes read so far whenever more arrive. Work is linear in the bytes given, no byte is read
/// out of bounds, and no input traps.
///
/// Parse-or-need-more: if a prefix of some bytes gives `.notTLS` or `.hello(x)`, so do the
/// bytes (and anything appended: the answer is decided by the bytes up to the deciding one);
/// if the bytes give `.needMore`, so does every prefix.
///
/// What is read, as nginx reads it:
/// - TLS records of content type 22 (handshake) with major version 3 (any minor), each 5 bytes
///   of header and its payload; the ClientHello may be fragmented over any number of them,
///   empty records included (nginx skips those). Any other record before the hello is complete
///   (alert, change_cipher_spec, application data, another version) is `.notTLS`. A record
///   longer than `maximumRecordLength` is `.notTLS` (nginx has no such bound; it would wait for
///   the record until its preread buffer is full).
/// - An SSLv2-compatible ClientHello (first byte with the top bit set, message type 1, version
///   0.x or 3.x): `.hello` with the version from its header and no SNI or ALPN, decided from
///   the first 5 bytes as nginx does (the rest of it is not read).
/// - The first handshake message must be a ClientHello (type 1). Its fields are walked by
///   their lengths; the first server_name, ALPN and supported_versions extensions are read,
///   later duplicates and all other extensions skipped unread.
///
/// What makes it `.notTLS`: a length that does not fit the vector holding it (session id,
/// cipher suites, compression methods, extensions block, an extension, a list inside one), an
/// extensions block that does not end exactly where the hello does, a server_name list that
/// is empty or whose first name is not of type host_name (0), an empty ALPN list or an empty
/// ALPN name, a supported_versions list of odd length. nginx declines on the same conditions
/// where it checks them; where it reads past an inconsistent inner length (it ignores the
/// extension's own length for these three extensions), a malformed hello is refused here.
/// Values inside lists are not checked (an odd cipher_suites length, a session id over 32
/// bytes, a host name with control bytes are fine), as in nginx.
///
/// Decisions are made as soon as the bytes allow: `G` is `.notTLS` at once, where nginx waits
/// for 5 bytes first; a hello is returned once its last byte is in, where nginx waits for the
/// end of the record carrying it.
public enum ClientHelloPeeker {
    /// The longest record accepted: 2^14 bytes of plaintext plus the 2,048 RFC 5246 allows
    /// for expansion.
    public static let maximumRecordLength = 16_384 + 2_048

    public static func peek(_ bytes: [UInt8]) -> ClientHelloPeek {
        bytes.withUnsafeBytes { peek($0) }
    }

    public static func peek(_ bytes: UnsafeRawBufferPointer) -> ClientHelloPeek {
        guard let first = bytes.first else { return .needMore }
        if first & 0x80 != 0 { return peekSSLv2(bytes) }
        return peekRecords(bytes)
    }

    /// nginx's name for a protocol version (OpenSSL's `SSL_get_version` spelling), "" if none.
    public static func protocolName(_ version: UInt16) -> String {
        switch version {
        case 0x0002: "SSLv2"
        case 0x0300: "SSLv3"
        case 0x0301: "TLSv1"
        case 0x0302: "TLSv1.1"
        case 0x0303: "TLSv1.2"
        case 0x0304: "TLSv1.3"
        default: ""
        }
    }

    /// A GREASE value (RFC 8701): 0x0A0A, 0x1A1A, … 0xFAFA.
    public static func isGREASE(_ value: UInt16) -> Bool {
        value & 0x0F0F == 0x0A0A && value >> 8 == value & 0xFF
    }

    // MARK: SSLv2

    /// Two length bytes (top bit set), message type 1, two version bytes (major 0 or 3).
    static func peekSSLv2(_ bytes: UnsafeRawBufferPointer) -> ClientHelloPeek {
        if bytes.count > 2 && bytes[2] != 1 { return .notTLS }
        if bytes.count > 3 && bytes[3] != 0 && bytes[3] != 3 { return .notTLS }
        guard bytes.count >= 5 else { return .needMore }
        let version = UInt16(bytes[3]) << 8 | UInt16(bytes[4])
        return .hello(ClientHelloInfo(protocolVersion: protocolName(version), legacyVersion: version))
    }

    // MARK: records

    static func peekRecords(_ bytes: UnsafeRawBufferPointer) -> ClientHelloPeek {
        var gathered = Handshake(bytes: bytes)
        var position = 0
        // Gather handshake bytes record by record until the whole message is in (4 + its
        // length, once the first 4 bytes are known), or the input runs out.
        while gathered.count < gathered.needed {
            guard position < bytes.count else { break }
            guard bytes[position] == 0x16 else { return .notTLS }
            guard position + 1 < bytes.count else { break }
            guard bytes[position + 1] == 3 else { return .notTLS }
            guard position + 5 <= bytes.count else { break }
            let length = Int(bytes[position + 3]) << 8 | Int(bytes[position + 4])
            guard length <= maximumRecordLength else { return .notTLS }
            let start = position + 5
            let end = min(start + length, bytes.count)
            gathered.append(start..<end)
            if gathered.count > 0 && gathered.byte(0) != 1 { return .notTLS }
            guard end == start + length else { break }
            position = end
        }
        return gathered.withBytes { parseHandshake($0) }
    }

    /// The handshake bytes of the records read so far: a range of the input while there is
    /// only one non-empty record (no copy), a copy once a second one adds to it.
    struct Handshake {
        let bytes: UnsafeRawBufferPointer
        var first: Range<Int> = 0..<0
        var joined: [UInt8]?
        /// 4 + the message length once the 4-byte header is in; until then, unbounded.
        var needed = Int.max

        init(bytes: UnsafeRawBufferPointer) { self.bytes = bytes }

        var count: Int { joined?.count ?? first.count }

        func byte(_ i: Int) -> UInt8 { joined?[i] ?? bytes[first.lowerBound + i] }

        mutating func append(_ range: Range<Int>) {
            guard !range.isEmpty else { return }
            if first.isEmpty {
                first = range
            } else {
                if joined == nil { joined = Array(bytes[first]) }
                joined!.append(contentsOf: bytes[range])
            }
            if needed == Int.max && count >= 4 {
                needed = 4 + (Int(byte(1)) << 16 | Int(byte(2)) << 8 | Int(byte(3)))
            }
        }

        /// At most `needed` bytes: what follows the hello in its last record is not its.
        func withBytes<R>(_ body: (UnsafeRawBufferPointer) -> R) -> R {
            let n = Swift.min(count, needed)
            if let joined {
                return joined.withUnsafeBytes { body(UnsafeRawBufferPointer(rebasing: $0[..<n])) }
            }
            return body(UnsafeRawBufferPointer(rebasing: bytes[first.lowerBound..<(first.lowerBound + n)]))
        }
    }

    // MARK: the ClientHello

    enum Stop: Error { case needMore, malformed }

    /// Reads fields of a message whose first `data.count` bytes have arrived. Every read says
    /// where the vector holding the field ends: a field past that end is malformed (decided
    /// as soon as the length that says so is in), a field past the bytes read is "need more".
    struct Reader {
        let data: UnsafeRawBufferPointer
        var position = 0

        func ensure(_ n: Int, before end: Int) throws(Stop) {
            guard n <= end - position else { throw .malformed }
            guard n <= data.count - position else { throw .needMore }
        }

        mutating func u8(before end: Int) throws(Stop) -> Int {
            try ensure(1, before: end)
            defer { position += 1 }
            return Int(data[position])
        }

        mutating func u16(before end: Int) throws(Stop) -> Int {
            try ensure(2, before: end)
            defer { position += 2 }
            return Int(data[position]) << 8 | Int(data[position + 1])
        }

        mutating func skip(_ n: Int, before end: Int) throws(Stop) {
            try ensure(n, before: end)
            position += n
        }

        mutating func text(_ n: Int, before end: Int) throws(Stop) -> String {
            try ensure(n, before: end)
            defer { position += n }
            return latin1String(UnsafeRawBufferPointer(rebasing: data[position..<(position + n)]))
        }
    }

    /// `handshake`: the message's bytes so far, at most its header and body.
    static func parseHandshake(_ handshake: UnsafeRawBufferPointer) -> ClientHelloPeek {
        guard handshake.count >= 4 else {
            return handshake.isEmpty || handshake[0] == 1 ? .needMore : .notTLS
        }
        guard handshake[0] == 1 else { return .notTLS }
        let length = Int(handshake[1]) << 16 | Int(handshake[2]) << 8 | Int(handshake[3])
        do {
            return .hello(try parseHello(UnsafeRawBufferPointer(rebasing: handshake[4...]), length: length))
        } catch .needMore {
            return .needMore
        } catch {
            return .notTLS
        }
    }

    static func parseHello(_ body: UnsafeRawBufferPointer, length end: Int) throws(Stop) -> ClientHelloInfo {
        var r = Reader(data: body)
        let version = UInt16(try r.u16(before: end))
        try r.skip(32, before: end)                            // random
        try r.skip(try r.u8(before: end), before: end)         // session_id
        try r.skip(try r.u16(before: end), before: end)        // cipher_suites
        try r.skip(try r.u8(before: end), before: end)         // compression_methods
        var serverName: String?
        var alpn: [String]?
        var versions: [UInt16]?
        if r.position < end {
            let extensionsLength = try r.u16(before: end)
            guard extensionsLength == end - r.position else { throw .malformed }
            while r.position < end {
                let type = try r.u16(before: end)
                let dataLength = try r.u16(before: end)
                guard dataLength <= end - r.position else { throw .malformed }
                let dataEnd = r.position + dataLength
                switch type {
                case 0 where serverName == nil: serverName = try readServerName(&r, end: dataEnd)
                case 16 where alpn == nil: alpn = try readALPN(&r, end: dataEnd)
                case 43 where versions == nil: versions = try readSupportedVersions(&r, end: dataEnd)
                default: try r.skip(dataLength, before: dataEnd)
                }
            }
        }
        var protocolVersion = ""
        if let versions {
            var best: UInt16?
            for v in versions where !protocolName(v).isEmpty && v > (best ?? 0) { best = v }
            protocolVersion = best.map(protocolName) ?? ""
        }
        if protocolVersion.isEmpty { protocolVersion = protocolName(version) }
        return ClientHelloInfo(serverName: serverName ?? "", alpnProtocols: alpn ?? [], protocolVersion: protocolVersion,
                               legacyVersion: version, supportedVersions: versions)
    }

    /// server_name (RFC 6066): a 2-byte list length filling the extension, then entries of
    /// name_type, 2-byte length, name. Only the first entry is read; it must be a host_name.
    static func readServerName(_ r: inout Reader, end: Int) throws(Stop) -> String {
        let listLength = try r.u16(before: end)
        guard listLength == end - r.position else { throw .malformed }
        guard try r.u8(before: end) == 0 else { throw .malformed }
        let name = try r.text(try r.u16(before: end), before: end)
        try r.skip(end - r.position, before: end)                 // further entries, unread
        return name
    }

    /// ALPN (RFC 7301): a 2-byte list length filling the extension, then at least one
    /// non-empty name, each with a 1-byte length.
    static func readALPN(_ r: inout Reader, end: Int) throws(Stop) -> [String] {
        let listLength = try r.u16(before: end)
        guard listLength == end - r.position else { throw .malformed }
        var names: [String] = []
        repeat {
            let n = try r.u8(before: end)
            guard n > 0 else { throw .malformed }
            names.append(try r.text(n, before: end))
        } while r.position < end
        return names
    }

    /// supported_versions (RFC 8446 §4.2.1), client form: a 1-byte list length filling the
    /// extension, then 2-byte versions.
    static func readSupportedVersions(_ r: inout Reader, end: Int) throws(Stop) -> [UInt16] {
        let listLength = try r.u8(before: end)
        // (An odd length would also fail at its last byte; refused here at once.)
        guard listLength == end - r.position, listLength % 2 == 0 else { throw .malformed }
        var versions: [UInt16] = []
        versions.reserveCapacity(listLength / 2)
        while r.position < end { versions.append(UInt16(try r.u16(before: end))) }
        return versions
    }
}

/// Each byte as the scalar of the same number (Latin-1).
func latin1String(_ bytes: UnsafeRawBufferPointer) -> String {
    if bytes.allSatisfy({ $0 < 0x80 }) { return String(decoding: bytes, as: UTF8.self) }
    var scalars = String.UnicodeScalarView()
    for byte in bytes { scalars.append(Unicode.Scalar(byte)) }
    return String(scalars)
}

/// The inverse of `latin1String`. A scalar above U+00FF (only in a hand-built value) is written
/// as its UTF-8.
func latin1Bytes(_ text: String) -> [UInt8] {
    var out: [UInt8] = []
    out.reserveCapacity(text.utf8.count)
    for scalar in text.unicodeScalars {
        if scalar.value <= 0xFF {
            out.append(UInt8(scalar.value))
        } else {
            out += Array(String(scalar).utf8)
        }
    }
    return out
}
