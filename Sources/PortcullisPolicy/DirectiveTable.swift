import PortcullisRules

/// Where a directive may appear.
enum BlockContext: String, Sendable {
    case main, events, stream, server, upstream
    /// `match NAME { send …; expect …; }` (health checks).
    case match
}

/// What the compiler knows about a directive name in one context.
struct DirectiveSpec: Sendable {
    enum Support: Sendable {
        case supported
        /// Accepted so an nginx file loads unchanged; has no effect here.
        case ignored(note: String?)
        /// Part of the rule language but not built yet.
        case planned(String)
        /// Not Portcullis's business.
        case refused(String)
    }

    var contexts: Set<BlockContext>
    var arguments: ClosedRange<Int>
    var takesBlock = false
    /// A directive that may appear once per context ("is duplicate" otherwise).
    var single = true
    var support = Support.supported
}

/// Every directive name the compiler knows, by context. `server` is two directives: a block in
/// `stream`, a simple directive in `upstream`.
enum DirectiveTable {
    static let unlimited = Int.max

    static func spec(_ name: String, in context: BlockContext) -> DirectiveSpec? {
        if name == "server" {
            return context == .upstream
                ? DirectiveSpec(contexts: [.upstream], arguments: 1...unlimited, single: false)
                : DirectiveSpec(contexts: [.stream], arguments: 0...0, takesBlock: true, single: false)
        }
        return table[name]
    }

    static var allNames: [String] { Array(table.keys) + ["server"] }

    private static let streamServer: Set<BlockContext> = [.stream, .server]
    private static func planned(_ what: String) -> DirectiveSpec.Support { .planned(what) }

    static let table: [String: DirectiveSpec] = {
        var t: [String: DirectiveSpec] = [:]
        // Main context (RULES.md "Top level").
        t["events"] = DirectiveSpec(contexts: [.main], arguments: 0...0, takesBlock: true)
        t["stream"] = DirectiveSpec(contexts: [.main], arguments: 0...0, takesBlock: true)
        t["http"] = DirectiveSpec(
            contexts: [.main], arguments: 0...0, takesBlock: true,
            support: .refused("an \"http\" block is not Portcullis's business: Portcullis is a TCP/UDP gateway and reads only \"stream\"; keep HTTP configuration in nginx"))
        t["mail"] = DirectiveSpec(
            contexts: [.main], arguments: 0...0, takesBlock: true,
            support: .refused("a \"mail\" block is not Portcullis's business: Portcullis reads only \"stream\""))
        t["worker_processes"] = DirectiveSpec(contexts: [.main], arguments: 1...1)
        t["worker_rlimit_nofile"] = DirectiveSpec(contexts: [.main], arguments: 1...1)
        t["worker_shutdown_timeout"] = DirectiveSpec(contexts: [.main], arguments: 1...1)
        t["pid"] = DirectiveSpec(contexts: [.main], arguments: 1...1)
        // Extension: the Prometheus endpoint (docs/metrics.md).
        t["metrics_listen"] = DirectiveSpec(contexts: [.main, .stream], arguments: 1...1, single: true)
        t["error_log"] = DirectiveSpec(contexts: [.main, .stream, .server], arguments: 1...2)
        t["user"] = DirectiveSpec(contexts: [.main], arguments: 1...2)
        t["daemon"] = DirectiveSpec(contexts: [.main], arguments: 1...1, support: .ignored(note: nil))
        t["master_process"] = DirectiveSpec(contexts: [.main], arguments: 1...1, support: .ignored(note: nil))
        t["load_module"] = DirectiveSpec(
            contexts: [.main], arguments: 1...1, single: false,
            support: .ignored(note: "\"load_module\" is ignored: every stream feature Portcullis has is built in"))
        t["env"] = DirectiveSpec(
            contexts: [.main], arguments: 1...1, single: false,
            support: .ignored(note: "\"env\" is ignored: Portcullis keeps its environment as it is"))
        // events { } — accepted so nginx files load; Portcullis sizes itself.
        for name in ["worker_connections", "use", "multi_accept", "accept_mutex", "accept_mutex_delay",
                     "worker_aio_requests"] {
            t[name] = DirectiveSpec(contexts: [.events], arguments: 1...1, support: .ignored(note: nil))
        }
        t["debug_connection"] = DirectiveSpec(
            contexts: [.events], arguments: 1...1, single: false, support: .ignored(note: nil))

        // stream { } and server { }
        t["upstream"] = DirectiveSpec(contexts: [.stream], arguments: 1...1, takesBlock: true, single: false)
        t["listen"] = DirectiveSpec(contexts: [.server], arguments: 1...unlimited, single: false)
        t["allow"] = DirectiveSpec(contexts: streamServer, arguments: 1...1, single: false)
        t["deny"] = DirectiveSpec(contexts: streamServer, arguments: 1...1, single: false)
        t["log_format"] = DirectiveSpec(contexts: [.stream], arguments: 2...unlimited, single: false)
        t["access_log"] = DirectiveSpec(contexts: streamServer, arguments: 1...unlimited, single: false)
        t["audit_log"] = DirectiveSpec(contexts: [.stream, .server], arguments: 1...2)
        t["proxy_pass"] = DirectiveSpec(contexts: [.server], arguments: 1...1)
        t["proxy_bind"] = DirectiveSpec(contexts: streamServer, arguments: 1...2)
        for name in ["proxy_connect_timeout", "proxy_timeout", "proxy_half_close", "tcp_nodelay", "proxy_buffer_size",
                     "proxy_socket_keepalive", "proxy_next_upstream", "proxy_next_upstream_tries",
                     "proxy_next_upstream_timeout", "proxy_responses", "proxy_requests",
                     "proxy_protocol_timeout", "preread_timeout", "preread_buffer_size", "health_check_timeout"] {
            t[name] = DirectiveSpec(contexts: streamServer, arguments: 1...1)
        }
        // Active health checks (nginx Plus's health_check and match, issue #13).
        t["health_check"] = DirectiveSpec(contexts: [.server], arguments: 0...10, single: false)
        t["match"] = DirectiveSpec(contexts: [.stream], arguments: 1...1, takesBlock: true, single: false)
        t["send"] = DirectiveSpec(contexts: [.match], arguments: 1...1)
        t["expect"] = DirectiveSpec(contexts: [.match], arguments: 1...2)
        // upstream { }
        // (Balancing methods are not `single`: nginx warns "load balancing method redefined"
        // and the last one wins, so the compiler handles repeats itself.)
        t["zone"] = DirectiveSpec(contexts: [.upstream], arguments: 1...2)
        t["hash"] = DirectiveSpec(contexts: [.upstream], arguments: 1...2, single: false)
        t["least_conn"] = DirectiveSpec(contexts: [.upstream], arguments: 0...0, single: false)
        t["random"] = DirectiveSpec(contexts: [.upstream], arguments: 0...2, single: false)

        // Variables (issue #4). Block contents are entries, not directives: the compiler reads them.
        t["geo"] = DirectiveSpec(contexts: [.stream], arguments: 1...2, takesBlock: true, single: false)
        t["map"] = DirectiveSpec(contexts: [.stream], arguments: 2...2, takesBlock: true, single: false)
        t["split_clients"] = DirectiveSpec(contexts: [.stream], arguments: 2...2, takesBlock: true, single: false)
        t["geoip2"] = DirectiveSpec(contexts: [.stream], arguments: 1...1, takesBlock: true, single: false)
        t["set"] = DirectiveSpec(contexts: [.server], arguments: 2...2, single: false)
        // Limits (issue #5).
        t["limit_conn_zone"] = DirectiveSpec(contexts: [.stream], arguments: 2...2, single: false)
        t["limit_conn"] = DirectiveSpec(contexts: streamServer, arguments: 2...2, single: false)
        t["limit_rate_zone"] = DirectiveSpec(contexts: [.stream], arguments: 3...4, single: false)
        t["limit_rate"] = DirectiveSpec(contexts: streamServer, arguments: 1...1, single: false)
        for name in ["limit_conn_dry_run", "limit_conn_log_level", "limit_rate_dry_run", "access_dry_run", "proxy_upload_rate",
                     "proxy_download_rate"] {
            t[name] = DirectiveSpec(contexts: streamServer, arguments: 1...1)
        }
        // PROXY protocol: sending to upstreams, and whose received headers are believed.
        t["proxy_protocol"] = DirectiveSpec(contexts: streamServer, arguments: 1...1)
        t["proxy_protocol_crc32c"] = DirectiveSpec(contexts: streamServer, arguments: 1...1)
        t["proxy_protocol_tlv"] = DirectiveSpec(contexts: streamServer, arguments: 2...2, single: false)
        t["set_real_ip_from"] = DirectiveSpec(contexts: streamServer, arguments: 1...1, single: false)
        t["return"] = DirectiveSpec(contexts: [.server], arguments: 1...1)
        // Service discovery (nginx 1.27.3): `server NAME resolve` re-resolved by `resolver`.
        t["resolver"] = DirectiveSpec(contexts: [.stream, .server, .upstream], arguments: 1...unlimited)
        t["resolver_timeout"] = DirectiveSpec(contexts: [.stream, .server, .upstream], arguments: 1...1)
        // TLS (issue #14): termination, TLS to upstreams, ssl_preread. See Compiler+TLS.swift.
        for name in ["ssl_certificate", "ssl_certificate_key", "ssl_conf_command"] {
            t[name] = DirectiveSpec(contexts: streamServer, arguments: name == "ssl_conf_command" ? 2...2 : 1...1, single: false)
        }
        for name in ["ssl_protocols", "proxy_ssl_protocols", "ssl_alpn"] {
            t[name] = DirectiveSpec(contexts: streamServer, arguments: 1...unlimited)
        }
        t["ssl_session_cache"] = DirectiveSpec(contexts: streamServer, arguments: 1...2)
        for name in ["ssl_ciphers", "ssl_prefer_server_ciphers", "ssl_ecdh_curve", "ssl_session_tickets", "ssl_session_timeout",
                     "ssl_handshake_timeout", "ssl_client_certificate", "ssl_trusted_certificate", "ssl_verify_client",
                     "ssl_verify_depth", "ssl_preread", "proxy_ssl", "proxy_ssl_ciphers", "proxy_ssl_server_name",
                     "proxy_ssl_name", "proxy_ssl_verify", "proxy_ssl_verify_depth", "proxy_ssl_trusted_certificate",
                     "proxy_ssl_certificate", "proxy_ssl_certificate_key", "proxy_ssl_session_reuse"] {
            t[name] = DirectiveSpec(contexts: streamServer, arguments: 1...1)
        }
        t["server_name"] = DirectiveSpec(contexts: streamServer, arguments: 1...8, single: false,
                                         support: planned("server_name (SNI virtual servers, nginx 1.25.5) is not built yet; route by $ssl_preread_server_name or $ssl_server_name with map and proxy_pass $var"))
        return t
    }()
}
