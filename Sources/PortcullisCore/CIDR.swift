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
