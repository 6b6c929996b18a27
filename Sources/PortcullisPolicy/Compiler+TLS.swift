import PortcullisCore
import PortcullisRules

/// The `ssl_*` (termination, ngx_stream_ssl_module), `proxy_ssl*` (TLS to upstreams) and
/// `ssl_preread` directives. Stream-level settings are inherited by servers; a server's own
/// `ssl_certificate` list replaces the stream's, as nginx's array directives do.
extension PolicyCompiler {
    /// What one level (stream or server) wrote, before certificates are paired with keys.
    struct TLSLevel {
        var server = TLSServerSettings()
        var upstream = UpstreamTLSSettings()
        var prereadOn = false
        var certificates: [(LogTemplate, Argument)] = []
        var keys: [(LogTemplate, Argument)] = []
        var ownCertificates = false
        var ownKeys = false
        var ownConfCommands = false
        /// Where `proxy_ssl_verify on` and `proxy_ssl_certificate` are, for their checks.
        var verifySite: Directive?
        var clientCertificateSite: Directive?
        /// A certificate or key path did not compile (its error is said): no pairing errors.
        var brokenPath = false

        /// A server's level starts from the stream's (its lists until it writes its own).
        func inherited() -> TLSLevel {
            var level = self
            level.ownCertificates = false
            level.ownKeys = false
            level.ownConfCommands = false
            return level
        }
    }

    static let tlsDirectiveNames: Set<String> = [
        "ssl_certificate", "ssl_certificate_key", "ssl_protocols", "ssl_ciphers", "ssl_prefer_server_ciphers",
        "ssl_ecdh_curve", "ssl_session_cache", "ssl_session_tickets", "ssl_session_timeout", "ssl_handshake_timeout",
        "ssl_client_certificate", "ssl_trusted_certificate", "ssl_verify_client", "ssl_verify_depth", "ssl_alpn",
        "ssl_conf_command", "ssl_preread",
        "proxy_ssl", "proxy_ssl_protocols", "proxy_ssl_ciphers", "proxy_ssl_server_name", "proxy_ssl_name",
        "proxy_ssl_verify", "proxy_ssl_verify_depth", "proxy_ssl_trusted_certificate", "proxy_ssl_certificate",
        "proxy_ssl_certificate_key", "proxy_ssl_session_reuse",
    ]

    /// Applies one TLS directive to `level`; false if `d` is not one.
    mutating func applyTLSSetting(_ d: Directive, to level: inout TLSLevel) -> Bool {
        guard Self.tlsDirectiveNames.contains(d.name) else { return false }
        let argument = d.arguments[0]
        switch d.name {
        case "ssl_certificate", "ssl_certificate_key":
            guard let path = template(argument, in: d) else {
                level.brokenPath = true
                return true
            }
            if d.name == "ssl_certificate" {
                if !level.ownCertificates { level.certificates = []; level.ownCertificates = true }
                level.certificates.append((path, argument))
            } else {
                if !level.ownKeys { level.keys = []; level.ownKeys = true }
                level.keys.append((path, argument))
            }
        case "ssl_protocols", "proxy_ssl_protocols":
            var protocols = TLSProtocols()
            for a in d.arguments {
                guard let (_, bits) = TLSProtocols.names.first(where: { $0.0 == a.text }) else {
                    var message = "invalid value \"\(a.text)\" in \"\(d.name)\"; expected SSLv3, TLSv1, TLSv1.1, TLSv1.2 or TLSv1.3"
                    if let guess = closestMatch(to: a.text, in: TLSProtocols.names.map(\.0)) { message += " (did you mean \"\(guess)\"?)" }
                    error(message, at: a)
                    return true
                }
                protocols.formUnion(bits)
            }
            if d.name == "ssl_protocols" { level.server.protocols = protocols } else { level.upstream.protocols = protocols }
        case "ssl_ciphers": level.server.ciphers = argument.text
        case "proxy_ssl_ciphers": level.upstream.ciphers = argument.text
        case "ssl_prefer_server_ciphers": if let v = flag(argument, in: d) { level.server.preferServerCiphers = v }
        case "ssl_ecdh_curve": level.server.ecdhCurve = argument.text
        case "ssl_session_cache": sessionCache(d, to: &level.server)
        case "ssl_session_tickets": if let v = flag(argument, in: d) { level.server.sessionTickets = v }
        case "ssl_session_timeout":
            if let t = time(argument, in: d) { level.server.sessionTimeoutSeconds = max(t / 1000, 1) }
        case "ssl_handshake_timeout":
            if let t = time(argument, in: d) { level.server.handshakeTimeoutMilliseconds = max(t, 1) }
        case "ssl_client_certificate": level.server.clientCertificate = argument.text
        case "ssl_trusted_certificate": level.server.trustedCertificate = argument.text
        case "ssl_verify_client":
            let modes: [String: TLSVerifyClient] = ["off": .off, "on": .on, "optional": .optional, "optional_no_ca": .optionalNoCA]
            guard let mode = modes[argument.text] else {
                error("invalid value \"\(argument.text)\" in \"ssl_verify_client\"; it must be \"on\", \"off\", \"optional\" or \"optional_no_ca\"", at: argument)
                return true
            }
            level.server.verifyClient = mode
        case "ssl_verify_depth", "proxy_ssl_verify_depth":
            guard let n = Int(argument.text), n >= 0, n <= 100 else {
                error("invalid value \"\(argument.text)\" in \"\(d.name)\"; expected a number from 0 to 100", at: argument)
                return true
            }
            if d.name == "ssl_verify_depth" { level.server.verifyDepth = n } else { level.upstream.verifyDepth = n }
        case "ssl_alpn":
            var names: [String] = []
            for a in d.arguments {
                guard !a.text.isEmpty, a.text.utf8.count <= 255 else {
                    error("invalid ALPN protocol \"\(a.text)\" in \"ssl_alpn\"; expected a name of 1 to 255 bytes such as h2", at: a)
                    return true
                }
                names.append(a.text)
            }
            level.server.alpn = names
        case "ssl_conf_command":
            guard d.arguments.count == 2 else {
                error("invalid number of arguments in \"ssl_conf_command\"; expected NAME VALUE", at: d)
                return true
            }
            // nginx: a level with its own ssl_conf_command list inherits none.
            if !level.ownConfCommands { level.server.confCommands = []; level.ownConfCommands = true }
            level.server.confCommands.append((argument.text, d.arguments[1].text))
        case "ssl_preread": if let v = flag(argument, in: d) { level.prereadOn = v }
        case "proxy_ssl":
            if let v = flag(argument, in: d) {
                level.upstream.enabled = v
                level.upstream.location = d.nameLocation
            }
        case "proxy_ssl_server_name": if let v = flag(argument, in: d) { level.upstream.sendServerName = v }
        case "proxy_ssl_name": level.upstream.name = template(argument, in: d)
        case "proxy_ssl_verify":
            if let v = flag(argument, in: d) {
                level.upstream.verify = v
                level.verifySite = d
            }
        case "proxy_ssl_trusted_certificate": level.upstream.trustedCertificate = argument.text
        case "proxy_ssl_certificate", "proxy_ssl_certificate_key":
            guard !argument.text.contains("$") else {
                error("variables in \"\(d.name)\" are not supported yet; name one file", at: argument)
                return true
            }
            if d.name == "proxy_ssl_certificate" {
                level.upstream.certificate = argument.text
                level.clientCertificateSite = d
            } else {
                level.upstream.certificateKey = argument.text
            }
        case "proxy_ssl_session_reuse": if let v = flag(argument, in: d) { level.upstream.sessionReuse = v }
        default: return false
        }
        return true
    }

    /// `ssl_session_cache off | none | [builtin[:SIZE]] [shared:NAME:SIZE]`, with nginx's checks.
    private mutating func sessionCache(_ d: Directive, to settings: inout TLSServerSettings) {
        var cache: TLSSessionCache?
        var builtin: Int??
        var sharedSessions: Int?
        for a in d.arguments {
            let text = a.text
            if text == "off" || text == "none" {
                guard d.arguments.count == 1 else {
                    error("\"\(text)\" cannot be combined with other values in \"ssl_session_cache\"", at: a)
                    return
                }
                cache = text == "off" ? .off : TLSSessionCache.none
            } else if text == "builtin" {
                builtin = .some(nil)
            } else if text.hasPrefix("builtin:"), let n = Int(text.dropFirst(8)), n > 0 {
                builtin = .some(n)
            } else if text.hasPrefix("shared:") {
                let parts = text.dropFirst(7).split(separator: ":", omittingEmptySubsequences: false)
                guard parts.count == 2, !parts[0].isEmpty, let bytes = Units.size(String(parts[1])), bytes >= 8 * 4096 else {
                    error("invalid session cache \"\(text)\" in \"ssl_session_cache\"; expected shared:NAME:SIZE with a size of at least 32k", at: a)
                    return
                }
                sharedSessions = bytes / 256  // nginx: about 4,000 sessions per megabyte
            } else {
                error("invalid session cache \"\(text)\" in \"ssl_session_cache\"; expected off, none, builtin[:SIZE] or shared:NAME:SIZE", at: a)
                return
            }
        }
        if let cache {
            settings.sessionCache = cache
            return
        }
        // Both builtin and shared: one OpenSSL cache holds the larger number (see TLSSessionCache).
        let sizes = [builtin ?? nil, sharedSessions].compactMap { $0 }
        settings.sessionCache = .builtin(sessions: sizes.max())
    }

    /// Pairs the n-th certificate with the n-th key and checks what nginx checks when a server
    /// has `listen … ssl`. Returns nil (errors said) if it cannot be used.
    mutating func finishTLS(_ level: TLSLevel, listens: [ListenSpec], block: Directive) -> (TLSServerSettings?, UpstreamTLSSettings) {
        var server = level.server
        let sslListen = listens.first { $0.ssl }
        if level.prereadOn, let sslListen {
            diagnostics.error("\"ssl_preread on\" cannot be used with \"listen … ssl\" in the same server: preread reads the ClientHello that termination consumes; route by $ssl_server_name instead",
                              at: sslListen.location, length: sslListen.writtenLength)
        }
        if level.upstream.enabled {
            // nginx -t's checks, here so that `check` says them too.
            if level.upstream.verify && level.upstream.trustedCertificate == nil, let site = level.verifySite {
                error("no \"proxy_ssl_trusted_certificate\" for \"proxy_ssl_verify\"", at: site)
            }
            if level.upstream.certificate != nil && level.upstream.certificateKey == nil, let site = level.clientCertificateSite {
                error("no \"proxy_ssl_certificate_key\" is defined for certificate \"\(site.arguments[0].text)\"", at: site)
            }
        }
        guard let sslListen, !level.brokenPath else {
            return (nil, level.upstream)
        }
        if level.certificates.isEmpty {
            diagnostics.error("no \"ssl_certificate\" is defined for the \"listen … ssl\" directive in this server",
                              at: sslListen.location, length: sslListen.writtenLength)
            return (nil, level.upstream)
        }
        if level.keys.count < level.certificates.count {
            let (_, argument) = level.certificates[level.keys.count]
            error("no \"ssl_certificate_key\" is defined for certificate \"\(argument.text)\"", at: argument)
            return (nil, level.upstream)
        }
        server.certificates = zip(level.certificates, level.keys).map { certificate, key in
            TLSCertificateSpec(certificate: certificate.0, key: key.0, certificateText: certificate.1.text,
                               keyText: key.1.text, location: certificate.1.location)
        }
        if server.verifyClient != .off && server.verifyClient != .optionalNoCA
            && server.clientCertificate == nil && server.trustedCertificate == nil {
            diagnostics.error("no ssl_client_certificate or ssl_trusted_certificate for ssl_verify_client",
                              at: sslListen.location, length: sslListen.writtenLength)
            return (nil, level.upstream)
        }
        return (server, level.upstream)
    }

    static let prereadVariables: Set<LogVariable> = [.sslPrereadServerName, .sslPrereadALPNProtocols, .sslPrereadProtocol]
    static let handshakeVariables: Set<LogVariable> = [.sslProtocol, .sslCipher, .sslServerName, .sslALPNProtocol,
                                                        .sslSessionReused, .sslClientSubjectDN, .sslClientVerify]

    /// Whether `server`'s allow/deny rules or limit keys read a `$ssl_preread_*` variable,
    /// directly or through map, geo or set.
    func accessReadsClientHello(_ server: ServerPolicy) -> Bool {
        !accessRulesReading(Self.prereadVariables, in: server).isEmpty
    }

    /// The access rules and limits of `server` that read one of `wanted` (directly or through
    /// map, geo or set), with where they are written.
    func accessRulesReading(_ wanted: Set<LogVariable>, in server: ServerPolicy) -> [RuleReference] {
        var seen: [Int: Bool] = [:]
        func reads(_ variable: Variable) -> Bool {
            switch variable {
            case .fixed(let fixed): return wanted.contains(fixed)
            case .defined(let index):
                if let known = seen[index] { return known }
                seen[index] = false  // a cycle is reported elsewhere
                let result = variables.definitions[index].templates.contains { $0.variables.contains(where: reads) }
                seen[index] = result
                return result
            default: return false
            }
        }
        var found: [RuleReference] = []
        for rule in server.access.rules {
            if case .variable(let variable) = rule.match, reads(variable) { found.append(rule.reference) }
        }
        for rule in server.limits.conn where rule.zone.key.variables.contains(where: reads) { found.append(rule.reference) }
        for rule in server.limits.rate where rule.zone.key.variables.contains(where: reads) { found.append(rule.reference) }
        return found
    }

    /// Rules that can never see what they read: `$ssl_*` of a handshake comes after the access
    /// phases; `$ssl_preread_*` without `ssl_preread on` is never set. Warnings, at the rule.
    /// `warned`: rules already warned about (a stream-level rule is every server's).
    mutating func warnAboutUnknowableTLSVariables(_ server: ServerPolicy, warned: inout Set<RuleReference>) {
        for reference in accessRulesReading(Self.handshakeVariables, in: server) where warned.insert(reference).inserted {
            diagnostics.warning("\"\(reference.text)\" reads $ssl_* variables of the TLS handshake, which happens after the access phases: they have no value here (use ssl_preread and $ssl_preread_server_name to decide by SNI)",
                                at: SourceLocation(file: reference.file, line: reference.line, column: 1))
        }
        if !server.preread {
            for reference in accessRulesReading(Self.prereadVariables, in: server) where warned.insert(reference).inserted {
                diagnostics.warning("\"\(reference.text)\" reads $ssl_preread_* variables, but this server has no \"ssl_preread on\": they have no value",
                                    at: SourceLocation(file: reference.file, line: reference.line, column: 1))
            }
        }
    }
}
