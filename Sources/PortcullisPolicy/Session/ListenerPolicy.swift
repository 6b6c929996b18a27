public import PortcullisCore
import PortcullisWire

/// What every session of one `listen` reads: its server's compiled policy and the listen itself.
/// A class, shared by reference: as a struct it would be copied into every session (the policy
/// alone is a few hundred bytes, and a retain per field on each copy).
public final class ListenerPolicy: Sendable {
    public let server: ServerPolicy
    public let listen: ListenSpec

    public init(server: ServerPolicy, listen: ListenSpec) {
        self.server = server
        self.listen = listen
    }

    public var transport: TransportProtocol { listen.udp ? .udp : .tcp }
}

extension ServerPolicy {
    /// The TLVs of the PROXY v2 header sent upstream for `record` (TCP and UDP alike): this
    /// server's `proxy_protocol_tlv` list, then a trusted sender's AUTHORITY and UNIQUE_ID when
    /// the list does not set them.
    public func upstreamTLVs(for record: SessionRecord) -> [ProxyTLV] {
        var tlvs = proxy.proxyProtocolTLVs.map { ProxyTLV(type: $0.type, value: $0.value.bytes(for: record)) }
        if let received = record.proxyHeader, realIPFrom.trusts(record.peer) {
            for type in [ProxyTLVType.authority, .uniqueID] where !tlvs.contains(where: { $0.type == type.rawValue }) {
                if let value = received.tlv(type.rawValue) { tlvs.append(ProxyTLV(type, value)) }
            }
        }
        return tlvs
    }
}

/// Why a dial to an upstream failed, as the engine saw it; worded once, as nginx words it.
public enum DialFailure: Sendable, Equatable, CustomStringConvertible {
    /// connect() (or the socket before it) failed with `errno`; `message` is its strerror text.
    case failed(errno: Int32, message: String)
    /// `proxy_connect_timeout` passed.
    case timedOut
    /// Anything else the engine could not put in those terms.
    case other(String)

    public var description: String {
        switch self {
        case .failed(let errno, let message): "connect() failed (\(errno): \(message))"
        case .timedOut: "upstream timed out (110: Connection timed out)"
        case .other(let text): "connect() failed (\(text))"
        }
    }
}
