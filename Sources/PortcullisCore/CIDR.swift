/// An address block. `hostBitsSet` remembers whether the written address had bits beyond the
/// prefix (nginx warns "low address bits are meaningless" and masks them); `network` is masked.
public struct CIDR: Hashable, Sendable, CustomStringConvertible {
    public let network: IPAddress
    public let prefixLength: Int
    public let hostBitsSet: Bool

    public init(address: IPAddress, prefixLength: Int) {
        switch address {
        case .v4(let value):
            let masked = prefixLength == 0 ? 0 : value & ~UInt32(0) << (32 - prefixLength)
            network = .v4(masked)
            hostBitsSet = masked != value
        case .v6(let value):
            let masked = prefixLength == 0 ? 0 : value & ~UInt128(0) << (128 - prefixLength)
            network = .v6(masked)
            hostBitsSet = masked != value
        }
        self.prefixLength = prefixLength
    }

    /// `10.0.0.0/8`, `::1/128`, or a bare address (a host prefix).
    public init?(_ text: some StringProtocol) {
        let parts = text.split(separator: "/", maxSplits: 1, omittingEmptySubsequences: false)
        guard let address = IPAddress(parts[0]) else { return nil }
        let maxLength = address.isIPv4 ? 32 : 128
        var length = maxLength
        if parts.count == 2 {
            let digits = parts[1]
            guard !digits.isEmpty, digits.count <= 3, digits.allSatisfy(\.isASCII),
                  digits.allSatisfy(\.isNumber), let parsed = Int(digits), parsed <= maxLength
            else { return nil }
            length = parsed
        }
        self.init(address: address, prefixLength: length)
    }

    public var isIPv4: Bool { network.isIPv4 }

    /// First and last IPv4 address, for an IPv4 block.
    public var ipv4Range: ClosedRange<UInt32>? {
        guard case .v4(let low) = network else { return nil }
        let span: UInt32 = prefixLength == 0 ? ~0 : (prefixLength == 32 ? 0 : ~UInt32(0) >> prefixLength)
        return low...(low | span)
    }

    /// First and last IPv6 address, for an IPv6 block.
    public var ipv6Range: ClosedRange<UInt128>? {
        guard case .v6(let low) = network else { return nil }
        let span: UInt128 = prefixLength == 0 ? ~0 : (prefixLength == 128 ? 0 : ~UInt128(0) >> prefixLength)
        return low...(low | span)
    }

    /// An IPv6 block inside `::ffff:0:0/96` is the same set of clients as an IPv4 block.
    public var mappedIPv4Block: CIDR? {
        guard case .v6(let value) = network, prefixLength >= 96, value >> 32 == 0xFFFF else { return nil }
        return CIDR(address: .v4(UInt32(truncatingIfNeeded: value)), prefixLength: prefixLength - 96)
    }

    public func contains(_ address: IPAddress) -> Bool {
        switch address {
        case .v4(let value): return ipv4Range?.contains(value) ?? false
        case .v6(let value): return ipv6Range?.contains(value) ?? false
        }
    }

    public var description: String { "\(network)/\(prefixLength)" }
}

extension CIDR {
    /// The common case of `CIDR(text)` without making a string: a plain dotted-quad IPv4
    /// address with an optional `/length`, octets without leading zeros. Anything else returns
    /// nil, and the caller falls back to `CIDR(text)` (which decides what is valid).
    public static func simpleIPv4(_ bytes: UnsafeBufferPointer<UInt8>) -> CIDR? {
        var value: UInt32 = 0
        var octet: UInt32 = 0
        var digits = 0
        var dots = 0
        var i = 0
        let zero = UInt8(ascii: "0")
        while i < bytes.count {
            let byte = bytes[i]
            if byte >= zero && byte <= zero + 9 {
                if digits == 1 && octet == 0 { return nil }  // leading zero: leave it to the full parser
                octet = octet * 10 + UInt32(byte - zero)
                digits += 1
                guard digits <= 3, octet <= 255 else { return nil }
            } else if byte == UInt8(ascii: ".") {
                guard digits > 0, dots < 3 else { return nil }
                value = value << 8 | octet
                octet = 0
                digits = 0
                dots += 1
            } else {
                break
            }
            i += 1
        }
        guard dots == 3, digits > 0 else { return nil }
        value = value << 8 | octet
        var length = 32
        if i < bytes.count {
            guard bytes[i] == UInt8(ascii: "/"), i + 1 < bytes.count, bytes.count - i - 1 <= 2 else { return nil }
            length = 0
            for byte in bytes[(i + 1)...] {
                guard byte >= zero && byte <= zero + 9 else { return nil }
                length = length * 10 + Int(byte - zero)
            }
            guard length <= 32 else { return nil }
        }
        return CIDR(address: .v4(value), prefixLength: length)
    }
}
