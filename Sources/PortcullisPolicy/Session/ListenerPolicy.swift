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
        func add(_ type: ProxyTLVType, _ value: [UInt8]) {
            if !value.isEmpty && !tlvs.contains(where: { $0.type == type.rawValue }) { tlvs.append(ProxyTLV(type, value)) }
        }
        if let tls = record.tls {
            // Terminated here: what HAProxy's send-proxy-v2-ssl-cn sends, from this handshake.
            add(.alpn, Array(tls.alpnProtocol.utf8))
            add(.authority, Array(tls.serverName.utf8))
            tlvs.append(ProxyTLV(.ssl, Self.sslTLV(tls)))
        } else if let hello = record.preread {
            // Prereading: the SNI, and a copy of the ALPN extension's list (the spec's words).
            add(.authority, hello.serverNameBytes)
            add(.alpn, hello.alpnProtocols.flatMap { name -> [UInt8] in
                let bytes = Array(name.unicodeScalars.map { UInt8(truncatingIfNeeded: $0.value) }.prefix(255))
                return [UInt8(bytes.count)] + bytes
            })
        }
        if let received = record.proxyHeader, realIPFrom.trusts(record.peer) {
            for type in [ProxyTLVType.authority, .uniqueID] where !tlvs.contains(where: { $0.type == type.rawValue }) {
                if let value = received.tlv(type.rawValue) { tlvs.append(ProxyTLV(type, value)) }
            }
        }
        return tlvs
    }
}

extension ServerPolicy {
    /// PP2_TYPE_SSL's value: client bits (SSL; a certificate in the session, and on this
    /// connection when it was a full handshake, as HAProxy sets them), verify (0 only for a certificate that verified), then the VERSION, CN,
    /// CIPHER, SIG_ALG and KEY_ALG sub-TLVs.
    static func sslTLV(_ tls: TLSSessionInfo) -> [UInt8] {
        var client: UInt8 = 0x01
        // CERT_SESS: a certificate at least once in the TLS session; CERT_CONN: on this
        // connection too (a full handshake; a resumed one did not send it again).
        if tls.clientPresentedCertificate { client |= tls.sessionReused ? 0x04 : 0x06 }
        let verified = tls.clientPresentedCertificate && tls.clientVerify == "SUCCESS"
        var value: [UInt8] = [client, 0, 0, 0, verified ? 0 : 1]
        func sub(_ type: ProxyTLVType, _ text: String) {
            let bytes = Array(text.utf8.prefix(65_535))
            guard !bytes.isEmpty else { return }
            value += [type.rawValue, UInt8(bytes.count >> 8), UInt8(bytes.count & 0xFF)] + bytes
        }
        sub(.sslVersion, tls.protocolName)
        if tls.clientPresentedCertificate { sub(.sslCN, tls.clientCommonName) }
        sub(.sslCipher, tls.cipher)
        sub(.sslSigAlg, tls.signatureAlgorithm)
        sub(.sslKeyAlg, tls.keyAlgorithm)
        return value
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
