import CPortcullisTLS
public import PortcullisCore
public import PortcullisPolicy
import Synchronization

/// A TLS setting that could not be used when the gateway starts (a certificate that does not
/// load, a cipher list OpenSSL refuses): the rule file's place and OpenSSL's words. The gateway
/// refuses to start, as nginx does.
public struct TLSSetupError: Error, CustomStringConvertible {
    public var location: SourceLocation?
    public var message: String

    public var description: String {
        (location.map { "\($0): " } ?? "") + message
    }
}

/// OpenSSL's error queue as one line (emptied), or `fallback` when it is empty.
func openSSLErrors(or fallback: String = "") -> String {
    var buffer = [CChar](repeating: 0, count: 1024)
    let length = portcullis_tls_errors(&buffer, buffer.count)
    guard length > 0 else { return fallback }
    return String(decoding: buffer.prefix(length).map { UInt8(bitPattern: $0) }, as: UTF8.self)
}

/// One server's TLS termination: an `SSL_CTX` built from its `ssl_*` settings, shared by every
/// event loop (OpenSSL contexts are thread-safe once built; its session cache and ticket keys
/// are then shared by the loops, as nginx's shared cache is by its workers).
public final class TLSServerContext: @unchecked Sendable {
    let context: OpaquePointer
    public let settings: TLSServerSettings
    /// Certificates whose paths have variables: loaded per handshake (`TLSStream`).
    let perHandshakeCertificates: [TLSCertificateSpec]

    public init(settings: TLSServerSettings, serverLocation: SourceLocation) throws(TLSSetupError) {
        self.settings = settings
        guard let context = portcullis_tls_context_new(1, settings.protocols.rawValue) else {
            throw TLSSetupError(location: serverLocation, message: "SSL_CTX_new() failed: \(openSSLErrors())")
        }
        self.context = context
        perHandshakeCertificates = settings.certificates.filter(\.usesVariables)
        // Every property is set: if this throws, deinit frees the context.
        try configure(serverLocation: serverLocation)
    }

    deinit { SSL_CTX_free(context) }

    private func configure(serverLocation: SourceLocation) throws(TLSSetupError) {
        let s = settings
        for certificate in s.certificates where !certificate.usesVariables {
            guard SSL_CTX_use_certificate_chain_file(context, certificate.certificateText) == 1 else {
                throw TLSSetupError(location: certificate.location,
                                    message: "cannot load certificate \"\(certificate.certificateText)\": \(openSSLErrors())")
            }
            guard SSL_CTX_use_PrivateKey_file(context, certificate.keyText, SSL_FILETYPE_PEM) == 1 else {
                throw TLSSetupError(location: certificate.location,
                                    message: "cannot load certificate key \"\(certificate.keyText)\": \(openSSLErrors())")
            }
        }
        if !perHandshakeCertificates.isEmpty {
            SSL_CTX_set_cert_cb(context, { ssl, _ in TLSStream.loadCertificates(ssl) }, nil)
        }
        guard SSL_CTX_set_cipher_list(context, s.ciphers) == 1 else {
            throw TLSSetupError(location: serverLocation, message: "SSL_CTX_set_cipher_list(\"\(s.ciphers)\") failed: \(openSSLErrors())")
        }
        portcullis_tls_server_options(context, s.sessionTickets ? 1 : 0, s.preferServerCiphers ? 1 : 0)
        if s.ecdhCurve != "auto" {
            guard portcullis_tls_set_groups(context, s.ecdhCurve) == 1 else {
                throw TLSSetupError(location: serverLocation, message: "SSL_CTX_set1_curves_list(\"\(s.ecdhCurve)\") failed: \(openSSLErrors())")
            }
        }
        let (mode, size): (Int32, Int) = switch s.sessionCache {
        case .off: (0, 0)
        case .none: (1, 0)
        case .builtin(let sessions): (2, sessions ?? 0)
        }
        // The id context names the server, so a session is resumed only where it began.
        let id = Array("PORTCULLIS \(serverLocation)".utf8.prefix(32))
        portcullis_tls_set_session_cache(context, mode, size, s.sessionTimeoutSeconds, id, UInt32(id.count))
        if s.verifyClient != .off {
            if let path = s.clientCertificate {
                guard SSL_CTX_load_verify_locations(context, path, nil) == 1 else {
                    throw TLSSetupError(location: serverLocation, message: "SSL_CTX_load_verify_locations(\"\(path)\") failed: \(openSSLErrors())")
                }
                // The CAs' names go to the client, so it knows which certificate to send.
                if let names = SSL_load_client_CA_file(path) { SSL_CTX_set_client_CA_list(context, names) }
            }
            portcullis_tls_set_verify_client(context, Int32(s.verifyClient.rawValue), Int32(s.verifyDepth))
        }
        if let path = s.trustedCertificate {
            guard SSL_CTX_load_verify_locations(context, path, nil) == 1 else {
                throw TLSSetupError(location: serverLocation, message: "SSL_CTX_load_verify_locations(\"\(path)\") failed: \(openSSLErrors())")
            }
        }
        if !s.alpn.isEmpty {
            let wire = s.alpn.flatMap { [UInt8($0.utf8.count)] + Array($0.utf8) }
            guard portcullis_tls_set_alpn_protocols(context, wire, UInt32(wire.count)) == 1 else {
                throw TLSSetupError(location: serverLocation, message: "ssl_alpn: \(openSSLErrors())")
            }
        }
        for (name, value) in s.confCommands {
            guard portcullis_tls_conf_command(context, 1, name, value) == 1 else {
                throw TLSSetupError(location: serverLocation,
                                    message: "SSL_CONF_cmd(\"\(name)\", \"\(value)\") failed: \(openSSLErrors(or: "unknown command or value"))")
            }
        }
    }
}

/// One server's `proxy_ssl`: the client `SSL_CTX`, and the sessions kept per upstream address
/// for `proxy_ssl_session_reuse` (nginx keeps the last one per peer).
public final class TLSClientContext: @unchecked Sendable {
    let context: OpaquePointer
    public let settings: UpstreamTLSSettings
    private let sessions = Mutex<[SessionKey: SessionBox]>([:])

    /// Sessions are kept per upstream address and name: a session verified for one name is
    /// never offered for another on the same address.
    struct SessionKey: Hashable {
        var endpoint: SocketEndpoint
        var name: String
    }

    /// An `SSL_SESSION` reference, freed when replaced.
    private final class SessionBox: @unchecked Sendable {
        let session: OpaquePointer
        init(_ session: OpaquePointer) { self.session = session }
        deinit { SSL_SESSION_free(session) }
    }

    public init(settings: UpstreamTLSSettings) throws(TLSSetupError) {
        self.settings = settings
        let location = settings.location
        guard let context = portcullis_tls_context_new(0, settings.protocols.rawValue) else {
            throw TLSSetupError(location: location, message: "SSL_CTX_new() failed: \(openSSLErrors())")
        }
        self.context = context
        // Every property is set from here: a throw leaves the context to deinit.
        do {
            guard SSL_CTX_set_cipher_list(context, settings.ciphers) == 1 else {
                throw TLSSetupError(location: location, message: "SSL_CTX_set_cipher_list(\"\(settings.ciphers)\") failed: \(openSSLErrors())")
            }
            if let certificate = settings.certificate {
                guard SSL_CTX_use_certificate_chain_file(context, certificate) == 1 else {
                    throw TLSSetupError(location: location, message: "cannot load certificate \"\(certificate)\": \(openSSLErrors())")
                }
                let key = settings.certificateKey ?? certificate  // (the compiler requires a key)
                guard SSL_CTX_use_PrivateKey_file(context, key, SSL_FILETYPE_PEM) == 1 else {
                    throw TLSSetupError(location: location, message: "cannot load certificate key \"\(key)\": \(openSSLErrors())")
                }
            }
            if let trusted = settings.trustedCertificate {
                guard SSL_CTX_load_verify_locations(context, trusted, nil) == 1 else {
                    throw TLSSetupError(location: location, message: "SSL_CTX_load_verify_locations(\"\(trusted)\") failed: \(openSSLErrors())")
                }
            } else if settings.verify {
                throw TLSSetupError(location: location, message: "no proxy_ssl_trusted_certificate for proxy_ssl_verify")
            }
            if settings.sessionReuse {
                portcullis_tls_set_new_session_callback(context) { ssl, session in
                    TLSStream.clientSessionArrived(ssl, session)
                }
            }
        }
    }

    deinit { SSL_CTX_free(context) }

    /// The last session for `key`, set on `ssl` before its handshake.
    func resume(_ ssl: OpaquePointer, for key: SessionKey) {
        guard settings.sessionReuse else { return }
        sessions.withLock { sessions in
            if let box = sessions[key] { SSL_set_session(ssl, box.session) }
        }
    }

    /// A new session for `key`: kept (the reference is ours now), replacing the last.
    func store(_ session: OpaquePointer, for key: SessionKey) {
        let box = SessionBox(session)
        // Bounded: one per upstream address and name, at most 10,000 of them.
        sessions.withLock { sessions in
            if sessions.count >= 10_000 && sessions[key] == nil { sessions.removeAll() }
            sessions[key] = box
        }
    }
}
