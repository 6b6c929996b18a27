public import PortcullisCore

/// The TLS versions a `ssl_protocols` / `proxy_ssl_protocols` list names. The raw values are
/// CPortcullisTLS's PORTCULLIS_TLS_* bits.
public struct TLSProtocols: OptionSet, Sendable, Hashable {
    public let rawValue: UInt32
    public init(rawValue: UInt32) { self.rawValue = rawValue }

    public static let sslv3 = TLSProtocols(rawValue: 0x02)
    public static let tlsv1 = TLSProtocols(rawValue: 0x04)
    public static let tlsv1_1 = TLSProtocols(rawValue: 0x08)
    public static let tlsv1_2 = TLSProtocols(rawValue: 0x10)
    public static let tlsv1_3 = TLSProtocols(rawValue: 0x20)

    /// nginx's default since 1.23.4 (1.22 also listed TLSv1 and TLSv1.1, which this OpenSSL's
    /// security level refuses anyway).
    public static let nginxDefault: TLSProtocols = [.tlsv1_2, .tlsv1_3]

    /// nginx's names, in its order.
    public static let names: [(String, TLSProtocols)] = [
        ("SSLv2", []), ("SSLv3", .sslv3), ("TLSv1", .tlsv1), ("TLSv1.1", .tlsv1_1), ("TLSv1.2", .tlsv1_2),
        ("TLSv1.3", .tlsv1_3),
    ]
}

/// One `ssl_certificate` with its `ssl_certificate_key` (the n-th key goes with the n-th
/// certificate, as nginx). Paths may use variables (`$ssl_server_name`): then they are loaded
/// per handshake.
public struct TLSCertificateSpec: Sendable, Equatable {
    public var certificate: LogTemplate
    public var key: LogTemplate
    /// The paths as written, for errors.
    public var certificateText: String
    public var keyText: String
    /// Where `ssl_certificate` is, for load errors.
    public var location: SourceLocation

    public var usesVariables: Bool {
        !(certificate.literalText != nil && key.literalText != nil)
    }
}

/// `ssl_verify_client`.
public enum TLSVerifyClient: Int, Sendable, Equatable {
    case off = 0, on = 1, optional = 2, optionalNoCA = 3
}

/// `ssl_session_cache off | none | [builtin[:size]] [shared:name:size]`.
public enum TLSSessionCache: Sendable, Equatable {
    /// No cache, and the server says so.
    case off
    /// nginx's default: no cache, but clients are told sessions might be resumed.
    case none
    /// OpenSSL's cache of this many sessions (nil: OpenSSL's default, 20,480). `shared:` maps
    /// here too: Portcullis's event loops are threads of one process, and OpenSSL's cache is
    /// shared between them (nginx: about 4,000 sessions per megabyte).
    case builtin(sessions: Int?)
}

/// A server's TLS termination settings (`ngx_stream_ssl_module`), with nginx's defaults.
public struct TLSServerSettings: Sendable, Equatable {
    public var certificates: [TLSCertificateSpec] = []
    public var protocols = TLSProtocols.nginxDefault
    public var ciphers = "HIGH:!aNULL:!MD5"
    public var preferServerCiphers = false
    /// `ssl_ecdh_curve`: "auto" leaves OpenSSL's list.
    public var ecdhCurve = "auto"
    public var sessionCache = TLSSessionCache.none
    public var sessionTickets = true
    public var sessionTimeoutSeconds = 300
    public var handshakeTimeoutMilliseconds = 60_000
    /// `ssl_client_certificate`: CAs to verify clients with, and whose names are sent.
    public var clientCertificate: String?
    /// `ssl_trusted_certificate`: CAs to verify with, not sent.
    public var trustedCertificate: String?
    public var verifyClient = TLSVerifyClient.off
    public var verifyDepth = 1
    /// `ssl_alpn`: protocols offered, in preference order; empty = no ALPN.
    public var alpn: [String] = []
    /// `ssl_conf_command NAME VALUE`, passed to OpenSSL's SSL_CONF (e.g. Ciphersuites).
    public var confCommands: [(String, String)] = []

    public init() {}

    public static func == (a: TLSServerSettings, b: TLSServerSettings) -> Bool {
        a.certificates == b.certificates && a.protocols == b.protocols && a.ciphers == b.ciphers
            && a.preferServerCiphers == b.preferServerCiphers && a.ecdhCurve == b.ecdhCurve
            && a.sessionCache == b.sessionCache && a.sessionTickets == b.sessionTickets
            && a.sessionTimeoutSeconds == b.sessionTimeoutSeconds
            && a.handshakeTimeoutMilliseconds == b.handshakeTimeoutMilliseconds
            && a.clientCertificate == b.clientCertificate && a.trustedCertificate == b.trustedCertificate
            && a.verifyClient == b.verifyClient && a.verifyDepth == b.verifyDepth && a.alpn == b.alpn
            && a.confCommands.elementsEqual(b.confCommands) { $0 == $1 }
    }
}

/// `proxy_ssl*`: TLS to the upstream, with nginx's defaults.
public struct UpstreamTLSSettings: Sendable, Equatable {
    public var enabled = false
    public var protocols = TLSProtocols.nginxDefault
    public var ciphers = "DEFAULT"
    /// `proxy_ssl_server_name on`: send `proxy_ssl_name` as SNI.
    public var sendServerName = false
    /// `proxy_ssl_name`: the name sent and verified; nil = the host of `proxy_pass`.
    public var name: LogTemplate?
    public var verify = false
    public var verifyDepth = 1
    public var trustedCertificate: String?
    public var certificate: String?
    public var certificateKey: String?
    public var sessionReuse = true
    /// Where `proxy_ssl` is, for load errors.
    public var location: SourceLocation?

    public init() {}
}

/// What one TLS connection negotiated: the `$ssl_*` variables, and the PROXY v2 SSL TLV.
public struct TLSSessionInfo: Sendable, Equatable {
    /// `$ssl_protocol`: "TLSv1.3".
    public var protocolName: String
    /// `$ssl_cipher`: OpenSSL's name, "TLS_AES_256_GCM_SHA384".
    public var cipher: String
    /// `$ssl_server_name`: the SNI the client sent ("" if none).
    public var serverName: String
    /// `$ssl_alpn_protocol` ("" if none).
    public var alpnProtocol: String
    /// `$ssl_session_reused`: "r" or ".".
    public var sessionReused: Bool
    /// `$ssl_client_verify`: "NONE", "SUCCESS", "FAILED:reason".
    public var clientVerify: String
    /// `$ssl_client_s_dn` (RFC 2253) and the subject's CN; "" without a client certificate.
    public var clientSubject: String
    public var clientCommonName: String
    public var clientPresentedCertificate: Bool
    /// The local certificate's signature and key algorithms, for the PROXY v2 SSL sub-TLVs.
    public var signatureAlgorithm: String
    public var keyAlgorithm: String

    public init(protocolName: String, cipher: String, serverName: String, alpnProtocol: String, sessionReused: Bool,
                clientVerify: String, clientSubject: String, clientCommonName: String,
                clientPresentedCertificate: Bool, signatureAlgorithm: String, keyAlgorithm: String) {
        self.protocolName = protocolName
        self.cipher = cipher
        self.serverName = serverName
        self.alpnProtocol = alpnProtocol
        self.sessionReused = sessionReused
        self.clientVerify = clientVerify
        self.clientSubject = clientSubject
        self.clientCommonName = clientCommonName
        self.clientPresentedCertificate = clientPresentedCertificate
        self.signatureAlgorithm = signatureAlgorithm
        self.keyAlgorithm = keyAlgorithm
    }
}
