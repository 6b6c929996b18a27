import CPortcullisTLS
import Glibc
import PortcullisCore
import PortcullisPolicy

/// One TLS connection on an engine socket (the client's with `listen … ssl`, the upstream's
/// with `proxy_ssl on`). OpenSSL reads and writes the non-blocking socket itself
/// (`SSL_set_fd`); its "want read" / "want write" answers are the engine's edges: `read` and
/// `write` behave like recv/send (a count, 0 at EOF, -1 with errno EAGAIN when the socket has
/// nothing or is full), so the relay code stays the same for plain and TLS sockets.
/// Lives on its session's loop thread.
final class TLSStream {
    let ssl: OpaquePointer
    /// The last read wants the socket writable first (a TLS 1.3 KeyUpdate answer into a full
    /// socket): retry the read on the writable edge.
    var readWantsWrite = false
    /// Why the last call returned -1 with errno EPROTO: OpenSSL's words.
    private(set) var failure = ""
    /// A fatal error, or the peer's end, came after bytes a read returned: said by every
    /// later call without asking OpenSSL again (in its error state it returns -1 with an empty
    /// error queue and a stale errno, which would read as EAGAIN or a clean end).
    private var stickyEnd: StickyEnd?
    private enum StickyEnd { case closed, failed(Int32) }

    // For OpenSSL's callbacks, which get only the SSL pointer.
    /// Renders the `ssl_certificate`/`_key` paths that have variables for this handshake
    /// (the SNI is known then), as nginx's certificate callback does.
    var certificatePaths: ((String) -> [(certificate: String, key: String)])?
    /// What the certificate callback could not load, for the handshake's error line.
    var certificateError: String?
    /// `proxy_ssl_session_reuse`: where new sessions are kept, under which key.
    var clientContext: TLSClientContext?
    var sessionKey: TLSClientContext.SessionKey?
    /// `proxy_ssl_verify`: the name the upstream's certificate must carry; sessions arriving
    /// before the check passed wait in `unverifiedSession` (a resumed session skips the chain
    /// check, so only a verified one may be kept).
    var verifyName: String?
    /// An upstream's: what of the PROXY header is still to go, in the clear, before the
    /// handshake (kept here, not in every session: only upstream TLS has it).
    var preface: [UInt8] = []
    var sessionTrusted = true
    private var unverifiedSession: OpaquePointer?

    enum Progress: Equatable {
        case done, wantRead, wantWrite
        case failed(String)
    }

    /// nil if OpenSSL cannot make the connection (out of memory).
    init?(context: OpaquePointer, fd: Int32, accepting: Bool) {
        guard let ssl = SSL_new(context) else { return nil }
        self.ssl = ssl
        SSL_set_fd(ssl, fd)
        if accepting { SSL_set_accept_state(ssl) } else { SSL_set_connect_state(ssl) }
        portcullis_tls_set_app_data(ssl, Unmanaged.passUnretained(self).toOpaque())
    }

    deinit {
        if let unverifiedSession { SSL_SESSION_free(unverifiedSession) }
        SSL_free(ssl)
    }

    // MARK: Handshake

    /// One step of the handshake.
    func handshake() -> Progress {
        let result = SSL_do_handshake(ssl)
        if result == 1 { return .done }
        let code = SSL_get_error(ssl, result)
        switch code {
        case SSL_ERROR_WANT_READ: return .wantRead
        case SSL_ERROR_WANT_WRITE: return .wantWrite
        case SSL_ERROR_SYSCALL:
            let error = errno
            _ = openSSLErrors()
            // nginx's words for a peer that left mid-handshake.
            if error == 0 || result == 0 { return .failed("peer closed connection in SSL handshake") }
            return .failed("SSL_do_handshake() failed (\(error): \(SystemCallError.text(error)))")
        case SSL_ERROR_ZERO_RETURN:
            return .failed("peer closed connection in SSL handshake")
        default:
            var reason = openSSLErrors(or: "unknown error")
            if let certificateError { reason = certificateError + "; " + reason }
            return .failed("SSL_do_handshake() failed (SSL: \(reason))")
        }
    }

    // MARK: Relay

    /// The last `read` ended because the socket had nothing more (OpenSSL wants to read):
    /// nothing is buffered, wait for the next edge.
    private(set) var drained = false

    /// Like recv: the count, 0 at the peer's close_notify (or its EOF), -1 with errno. Takes
    /// as many records as fit (SSL_read returns one at a time), so one write passes them on:
    /// an end or an error after some bytes is said by the next call (OpenSSL repeats it).
    func read(_ buffer: UnsafeMutableRawPointer, _ size: Int) -> Int {
        var total = 0
        readWantsWrite = false
        drained = false
        if let sticky = stickyEnd { return replay(sticky) }
        while total < size {
            var count = 0
            if SSL_read_ex(ssl, buffer + total, size - total, &count) == 1 {
                total += count
                continue
            }
            let code = SSL_get_error(ssl, 0)
            let result = failed(code, call: "SSL_read")
            if result < 0 && errno == EAGAIN {
                if !readWantsWrite { drained = true }
                return total > 0 ? total : -1
            }
            // The end or an error: kept for the next call when bytes came first.
            stickyEnd = result == 0 ? .closed : .failed(errno)
            return total > 0 ? total : result
        }
        return total
    }

    /// Like send: the count written (a partial write is a whole record), -1 with errno.
    /// After EAGAIN the same bytes must be offered again (OpenSSL holds the record).
    func write(_ buffer: UnsafeRawPointer, _ size: Int) -> Int {
        if let sticky = stickyEnd {
            errno = { if case .failed(let error) = sticky { error } else { EPIPE } }()
            return -1
        }
        var count = 0
        if SSL_write_ex(ssl, buffer, size, &count) == 1 { return count }
        let result = failed(SSL_get_error(ssl, 0), call: "SSL_write")
        if result < 0 && errno == EAGAIN { return -1 }
        // A write never returns 0: the connection is gone.
        if result == 0 { errno = EPIPE }
        stickyEnd = .failed(errno)
        return -1
    }

    private func replay(_ sticky: StickyEnd) -> Int {
        switch sticky {
        case .closed: return 0
        case .failed(let error):
            errno = error
            return -1
        }
    }

    /// Bytes OpenSSL already decrypted that no read has taken: read again without an edge.
    var hasBufferedInput: Bool { SSL_pending(ssl) > 0 }

    private func failed(_ code: Int32, call: String) -> Int {
        switch code {
        case SSL_ERROR_WANT_READ:
            errno = EAGAIN
            return -1
        case SSL_ERROR_WANT_WRITE:
            if call == "SSL_read" { readWantsWrite = true }
            errno = EAGAIN
            return -1
        case SSL_ERROR_ZERO_RETURN:
            return 0
        case SSL_ERROR_SYSCALL:
            let error = errno
            _ = openSSLErrors()
            if error == 0 { return 0 }  // EOF without close_notify
            errno = error
            return -1
        default:
            failure = "\(call)() failed (SSL: \(openSSLErrors(or: "unknown error")))"
            errno = EPROTO
            return -1
        }
    }

    /// Sends close_notify (once, without waiting for the peer's), before a shutdown or close;
    /// not after a fatal error (OpenSSL would write to a dead connection).
    func sendCloseNotify() {
        if case .failed = stickyEnd { return }
        guard SSL_get_shutdown(ssl) & SSL_SENT_SHUTDOWN == 0 else { return }
        _ = SSL_shutdown(ssl)
        _ = openSSLErrors()
    }

    // MARK: What was negotiated

    /// The `$ssl_*` variables and the PROXY v2 SSL TLV's facts, after a server handshake.
    func serverSessionInfo() -> (TLSSessionInfo, SessionMachine.ClientCertificateCheck) {
        let version = String(cString: SSL_get_version(ssl))
        let cipher = String(cString: portcullis_tls_cipher_name(ssl))
        let serverName = SSL_get_servername(ssl, Int32(TLSEXT_NAMETYPE_host_name)).map { String(cString: $0) } ?? ""
        var alpnData: UnsafePointer<UInt8>?
        var alpnLength: UInt32 = 0
        SSL_get0_alpn_selected(ssl, &alpnData, &alpnLength)
        let alpn = alpnData.map { String(decoding: UnsafeBufferPointer(start: $0, count: Int(alpnLength)), as: UTF8.self) } ?? ""
        var dn = [CChar](repeating: 0, count: 1024)
        var cn = [CChar](repeating: 0, count: 256)
        let presented = portcullis_tls_peer_subject(ssl, &dn, dn.count, &cn, cn.count) == 1
        let code = presented ? Int(SSL_get_verify_result(ssl)) : 0
        let text = String(cString: X509_verify_cert_error_string(CLong(code)))
        // nginx's $ssl_client_verify.
        let verify = !presented ? "NONE" : code == 0 ? "SUCCESS" : "FAILED:" + text
        var sig = [CChar](repeating: 0, count: 64)
        var key = [CChar](repeating: 0, count: 64)
        portcullis_tls_local_algorithms(ssl, &sig, sig.count, &key, key.count)
        let info = TLSSessionInfo(
            protocolName: version, cipher: cipher, serverName: serverName, alpnProtocol: alpn,
            sessionReused: SSL_session_reused(ssl) == 1, clientVerify: verify,
            clientSubject: Self.text(dn), clientCommonName: Self.text(cn),
            clientPresentedCertificate: presented, signatureAlgorithm: Self.text(sig),
            keyAlgorithm: Self.text(key))
        // ngx_ssl_verify_error_optional: what optional_no_ca forgives.
        let caUnknown = [18, 19, 2, 20, 27, 21].contains(code)
        return (info, SessionMachine.ClientCertificateCheck(presented: presented, code: code, text: text, caUnknown: caUnknown))
    }

    /// `proxy_ssl_verify`: the upstream's chain, then its name (checked on every handshake,
    /// resumed ones too, as nginx's ngx_ssl_check_host), in nginx's words; nil if good. Once
    /// good, the sessions it brought may be kept.
    func upstreamVerifyError() -> String? {
        guard let certificate = SSL_get0_peer_certificate(ssl) else { return "upstream sent no SSL certificate" }
        let code = SSL_get_verify_result(ssl)
        if code != 0 {
            return "upstream SSL certificate verify error: (\(code):\(String(cString: X509_verify_cert_error_string(code))))"
        }
        let name = verifyName ?? ""
        let matches = !name.isEmpty && (IPAddress(name) != nil
            ? X509_check_ip_asc(certificate, name, 0) == 1
            : X509_check_host(certificate, name, name.utf8.count, UInt32(X509_CHECK_FLAG_NO_PARTIAL_WILDCARDS), nil) == 1)
        guard matches else { return "upstream SSL certificate does not match \"\(name)\"" }
        trustSessions()
        return nil
    }

    /// The upstream is verified: the session that came during the handshake is kept now.
    func trustSessions() {
        sessionTrusted = true
        if let session = unverifiedSession, let context = clientContext, let key = sessionKey {
            unverifiedSession = nil
            context.store(session, for: key)
        }
    }

    /// A NUL-terminated buffer the shim filled.
    private static func text(_ buffer: [CChar]) -> String {
        String(decoding: buffer.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
    }

    // MARK: OpenSSL's callbacks

    private static func stream(of ssl: OpaquePointer?) -> TLSStream? {
        guard let ssl, let data = portcullis_tls_get_app_data(ssl) else { return nil }
        return Unmanaged<TLSStream>.fromOpaque(data).takeUnretainedValue()
    }

    /// SSL_CTX_set_cert_cb: loads the certificates whose paths have variables.
    static func loadCertificates(_ ssl: OpaquePointer?) -> Int32 {
        guard let ssl, let stream = stream(of: ssl), let paths = stream.certificatePaths else { return 1 }
        let serverName = SSL_get_servername(ssl, Int32(TLSEXT_NAMETYPE_host_name)).map { String(cString: $0) } ?? ""
        // The client chooses the name and it goes into a file path: only host-name bytes, no
        // "..", no "/" or "\\" (nginx 1.25's ngx_stream_validate_host refuses the same).
        guard Self.isSafeHostName(serverName) else {
            stream.certificateError = "invalid server name \"\(serverName.prefix(64))\" for a certificate path"
            return 0
        }
        for (certificate, key) in paths(serverName) {
            guard SSL_use_certificate_chain_file(ssl, certificate) == 1 else {
                stream.certificateError = "cannot load certificate \"\(certificate)\": \(openSSLErrors())"
                return 0
            }
            guard SSL_use_PrivateKey_file(ssl, key, SSL_FILETYPE_PEM) == 1 else {
                stream.certificateError = "cannot load certificate key \"\(key)\": \(openSSLErrors())"
                return 0
            }
        }
        return 1
    }

    /// Letters, digits, "-", "_", "." and ":" only, no "..", at most 253 bytes.
    static func isSafeHostName(_ name: String) -> Bool {
        guard name.utf8.count <= 253, !name.contains("..") else { return false }
        return name.utf8.allSatisfy { byte in
            (byte >= 0x61 && byte <= 0x7A) || (byte >= 0x41 && byte <= 0x5A) || (byte >= 0x30 && byte <= 0x39)
                || byte == UInt8(ascii: "-") || byte == UInt8(ascii: "_") || byte == UInt8(ascii: ".") || byte == UInt8(ascii: ":")
        }
    }

    /// SSL_CTX_sess_set_new_cb (client side): keeps the upstream's session for the next
    /// connection to the same address. 1: the reference is kept.
    static func clientSessionArrived(_ ssl: OpaquePointer?, _ session: OpaquePointer?) -> Int32 {
        guard let session, let stream = stream(of: ssl), let context = stream.clientContext,
              let key = stream.sessionKey else { return 0 }
        if stream.sessionTrusted {
            context.store(session, for: key)
        } else {
            if let older = stream.unverifiedSession { SSL_SESSION_free(older) }
            stream.unverifiedSession = session
        }
        return 1
    }
}
