import PortcullisCore
public import PortcullisRules
import PortcullisWire

/// What compiling a rule file produced: a snapshot if there were no errors, and every
/// diagnostic either way.
public struct CompileResult: Sendable {
    public var snapshot: PolicySnapshot?
    public var diagnostics: [Diagnostic]
    public var sources: SourceFiles

    public var hasErrors: Bool { diagnostics.contains { $0.severity == .error } }
    public var rendered: String { sources.render(diagnostics) }
}

/// Parses and compiles rule files. `check`, `run` and the tests all go through here.
public enum RuleLoader {
    /// `geoip`: opens the databases of `geoip2` blocks (the gateway passes libmaxminddb's);
    /// without one, a `geoip2` block is an error. `carrying`: on a reload, the running rules'
    /// zones and upstream groups, taken over where their definitions did not change.
    public static func load(path: String, resolver: any HostResolver = SystemHostResolver(),
                            geoip: (any GeoIPOpener)? = nil, carrying: CarriedState = CarriedState()) -> CompileResult {
        var parser = RuleParser()
        let file = parser.parse(file: path)
        return compile(file, parseDiagnostics: parser.diagnostics.all, resolver: resolver, geoip: geoip, carrying: carrying)
    }

    public static func load(text: String, file: String = "test.conf",
                            resolver: any HostResolver = SystemHostResolver(),
                            geoip: (any GeoIPOpener)? = nil, carrying: CarriedState = CarriedState()) -> CompileResult {
        var parser = RuleParser()
        let parsed = parser.parse(text: text, file: file)
        return compile(parsed, parseDiagnostics: parser.diagnostics.all, resolver: resolver, geoip: geoip, carrying: carrying)
    }

    static func compile(_ file: RuleFile, parseDiagnostics: [Diagnostic], resolver: any HostResolver,
                        geoip: (any GeoIPOpener)?, carrying: CarriedState) -> CompileResult {
        var compiler = PolicyCompiler(resolver: resolver, geoip: geoip, carried: carrying)
        compiler.mainFile = file.mainFile
        compiler.sources = file.sources
        compiler.diagnostics.append(contentsOf: parseDiagnostics)
        let snapshot = compiler.compile(file.directives)
        let diagnostics = compiler.diagnostics.all
        let failed = diagnostics.contains { $0.severity == .error }
        return CompileResult(snapshot: failed ? nil : snapshot, diagnostics: diagnostics, sources: file.sources)
    }
}

/// Turns directives into a `PolicySnapshot`, checking everything that can be checked before a
/// single connection arrives: names, contexts, argument counts and forms, references between
/// blocks, duplicates.
struct PolicyCompiler {
    var diagnostics = DiagnosticBag()
    /// The file the load started from, where problems of the whole file are reported.
    var mainFile = ""
    /// The text of every file read, to locate a problem inside a multi-line argument.
    var sources = SourceFiles()
    /// Upstream blocks that had errors of their own: a `proxy_pass` naming one says nothing more.
    var brokenUpstreams: Set<String> = []
    let resolver: any HostResolver
    let geoip: (any GeoIPOpener)?
    /// Every variable `geo`, `map`, `geoip2` and `set` define, numbered.
    var variables = VariableTable()
    /// Which directive defines each variable ("geo", "map", "geoip2", "set").
    var definedBy: [Int: String] = [:]
    var geoipDatabases: [any GeoIPDatabase] = []
    /// The buffer of each buffered access log file, from the first directive that set one.
    var logBuffers: [String: LogBuffer] = [:]
    /// `match` blocks by name, and every server's `health_check`s.
    var healthMatches: [String: HealthMatch] = [:]
    var healthChecks: [HealthCheck] = []
    /// `resolver` and `resolver_timeout` written in `stream` (what upstream blocks use unless
    /// they have their own), and every `server … resolve`.
    var streamResolver: ResolverSpec?
    var streamResolverTimeout: Int?
    var resolutions: [Resolution] = []
    /// On a reload, the running rules' zones and groups (CarriedState).
    var carried: CarriedState

    init(resolver: any HostResolver, geoip: (any GeoIPOpener)?, carried: CarriedState = CarriedState()) {
        self.resolver = resolver
        self.geoip = geoip
        self.carried = carried
    }

    // MARK: Structure

    /// Checks a directive against the table. Returns its spec when the compiler should act on it.
    mutating func admit(_ d: Directive, in context: BlockContext, seen: inout [String: Directive]) -> DirectiveSpec? {
        guard let spec = DirectiveTable.spec(d.name, in: context) else {
            var message = "unknown directive \"\(d.name)\""
            if let guess = closestMatch(to: d.name, in: DirectiveTable.allNames) { message += "; did you mean \"\(guess)\"?" }
            error(message, at: d)
            return nil
        }
        guard spec.contexts.contains(context) else {
            let allowed = spec.contexts.map(\.rawValue).sorted().joined(separator: ", ")
            error("\"\(d.name)\" directive is not allowed in \(context.rawValue) context; it belongs in: \(allowed)", at: d)
            return nil
        }
        if spec.takesBlock && d.block == nil {
            error("directive \"\(d.name)\" has no opening \"{\"", at: d)
            return nil
        }
        if !spec.takesBlock && d.block != nil {
            error("directive \"\(d.name)\" takes no block; expected \";\"", at: d)
            return nil
        }
        guard spec.arguments.contains(d.arguments.count) else {
            error("invalid number of arguments in \"\(d.name)\" directive: \(expected(spec.arguments)), got \(d.arguments.count)", at: d)
            return nil
        }
        switch spec.support {
        case .supported: break
        case .ignored(let note):
            if let note { diagnostics.note(note, at: d.nameLocation, length: d.name.count) }
            return nil
        case .planned(let what):
            error("\"\(d.name)\" is part of the rule language but not supported yet (\(what))", at: d)
            return nil
        case .refused(let why):
            error(why, at: d)
            return nil
        }
        if spec.single {
            if let first = seen[d.name] {
                error("\"\(d.name)\" directive is duplicate; it was first set at \(first.nameLocation)", at: d)
                return nil
            }
            seen[d.name] = d
        }
        return spec
    }

    /// `metrics_listen ADDRESS:PORT | PORT;` (main or stream, once): a bare port is loopback.
    mutating func metricsListen(_ d: Directive, into main: inout MainSettings) {
        if let first = main.metricsListenLocation {
            error("\"metrics_listen\" directive is duplicate; it was first set at \(first)", at: d)
            return
        }
        let text = d.arguments[0].text
        let endpoint = UInt16(text).flatMap { $0 > 0 ? SocketEndpoint(address: .v4(0x7F00_0001), port: $0) : nil }
            ?? SocketEndpoint.local(text)
        guard let endpoint, endpoint.port > 0 else {
            error("invalid \"metrics_listen\" address \"\(text)\"; expected ADDRESS:PORT or PORT, such as 127.0.0.1:9145", at: d.arguments[0])
            return
        }
        main.metricsListen = endpoint
        main.metricsListenLocation = d.nameLocation
    }

    private func expected(_ range: ClosedRange<Int>) -> String {
        if range.lowerBound == range.upperBound { return "expected \(range.lowerBound)" }
        if range.upperBound == DirectiveTable.unlimited { return "expected at least \(range.lowerBound)" }
        return "expected \(range.lowerBound) to \(range.upperBound)"
    }

    mutating func error(_ message: String, at d: Directive) {
        diagnostics.error(message, at: d.nameLocation, length: d.name.count)
    }

    mutating func error(_ message: String, at a: Argument) {
        diagnostics.error(message, at: a.location, length: a.length)
    }

    // MARK: Main

    mutating func compile(_ directives: [Directive]) -> PolicySnapshot? {
        var main = MainSettings()
        var seen: [String: Directive] = [:]
        var stream: Directive?
        for d in directives {
            guard admit(d, in: .main, seen: &seen) != nil else { continue }
            switch d.name {
            case "stream": stream = d
            case "events":
                var eventsSeen: [String: Directive] = [:]
                for child in d.block ?? [] { _ = admit(child, in: .events, seen: &eventsSeen) }
            case "worker_processes":
                if d.arguments[0].text == "auto" {
                    main.workerProcesses = nil
                } else if let n = positiveInt(d.arguments[0], in: d) {
                    main.workerProcesses = n
                }
            case "worker_rlimit_nofile": main.workerRlimitNofile = positiveInt(d.arguments[0], in: d)
            case "worker_shutdown_timeout": main.workerShutdownTimeoutMilliseconds = time(d.arguments[0], in: d)
            case "pid": main.pidFile = d.arguments[0].text == "off" ? nil : d.arguments[0].text
            case "metrics_listen": metricsListen(d, into: &main)
            case "error_log": if let spec = errorLog(d) { main.errorLog = spec }
            case "user":
                main.user = d.arguments[0].text
                main.group = d.arguments.count > 1 ? d.arguments[1].text : nil
            default: break
            }
        }
        guard let stream else {
            // After a syntax error the block may simply not have been read: say nothing more.
            if !diagnostics.hasErrors {
                diagnostics.error("no \"stream\" block is defined: there is nothing to listen on",
                                  at: SourceLocation(file: mainFile, line: 1, column: 1))
            }
            return nil
        }
        return compileStream(stream, main: main)
    }

    mutating func errorLog(_ d: Directive) -> ErrorLogSpec? {
        var level = ErrorLogSpec.Level.error
        if d.arguments.count == 2 {
            guard let parsed = ErrorLogSpec.Level(rawValue: d.arguments[1].text) else {
                let levels = ErrorLogSpec.Level.allCases.map(\.rawValue).joined(separator: ", ")
                error("invalid log level \"\(d.arguments[1].text)\"; expected one of: \(levels)", at: d.arguments[1])
                return nil
            }
            level = parsed
        }
        return ErrorLogSpec(path: d.arguments[0].text, level: level)
    }

    // MARK: Stream

    mutating func compileStream(_ stream: Directive, main: MainSettings) -> PolicySnapshot? {
        var main = main
        var seen: [String: Directive] = [:]
        var formats: [String: LogFormat] = [:]
        var upstreamBlocks: [Directive] = []
        var serverBlocks: [Directive] = []
        var streamRules: [AccessRule] = []
        var streamRealIP: [(CIDR?, RuleReference)] = []
        var streamTLVs: [ProxyTLVTemplate] = []
        var streamLogs: [Directive] = []
        var streamLogsOff = false
        var proxy = ProxySettings()
        var auditLog: AuditLogSpec?
        let children = stream.block ?? []
        // Variable names before anything reads them: a format may use a map defined below it.
        declareVariables(stream: children, servers: children.filter { $0.name == "server" && $0.block != nil })

        // Zones before the servers that name them (nginx does not mind the order either).
        var connZones: [String: LimitConnZone] = [:]
        var rateZones: [String: LimitRateZone] = [:]
        var zoneSites: [String: SourceLocation] = [:]  // both kinds share one namespace, as nginx's zones
        for d in children where d.name == "limit_conn_zone" || d.name == "limit_rate_zone" {
            guard admit(d, in: .stream, seen: &seen) != nil else { continue }
            let connZone = d.name == "limit_conn_zone" ? limitConnZone(d) : nil
            let rateZone = d.name == "limit_rate_zone" ? limitRateZone(d) : nil
            guard let name = connZone?.name ?? rateZone?.name else { continue }
            if let first = zoneSites[name] {
                error("duplicate zone \"\(name)\"; it was first defined at \(first)", at: d.arguments[1])
                continue
            }
            zoneSites[name] = d.nameLocation
            connZones[name] = connZone ?? connZones[name]
            rateZones[name] = rateZone ?? rateZones[name]
        }
        var streamLimits = LimitSettings()
        var streamTLS = TLSLevel()

        // Formats first, so access_log may name a format defined further down.
        for d in children where d.name == "log_format" {
            guard admit(d, in: .stream, seen: &seen) != nil else { continue }
            if let format = logFormat(d) {
                if formats[format.name] != nil {
                    error("duplicate \"log_format\" name \"\(format.name)\"", at: d.arguments[0])
                } else {
                    formats[format.name] = format
                }
            }
        }
        for d in children where !["log_format", "limit_conn_zone", "limit_rate_zone"].contains(d.name) {
            guard admit(d, in: .stream, seen: &seen) != nil else { continue }
            switch d.name {
            case "server": serverBlocks.append(d)
            case "upstream": upstreamBlocks.append(d)
            case "match": compileMatch(d)
            case "geo": compileGeo(d)
            case "map": compileMap(d)
            case "split_clients": compileSplitClients(d)
            case "geoip2": compileGeoIP2(d)
            case "allow", "deny": if let rule = accessRule(d) { streamRules.append(rule) }
            case "limit_conn": if let rule = limitConn(d, zones: connZones) { streamLimits.conn.append(rule) }
            case "limit_rate": if let rule = limitRate(d, zones: rateZones) { streamLimits.rate.append(rule) }
            case "set_real_ip_from": if let blocks = trustedBlocks(d) { streamRealIP += blocks }
            case "proxy_protocol_tlv": if let tlv = proxyTLV(d, formats: formats) { streamTLVs.append(tlv) }
            case "access_log":
                if d.arguments[0].text == "off" {
                    streamLogsOff = true
                    if d.arguments.count > 1 { error("\"access_log off\" takes no other parameters", at: d.arguments[1]) }
                } else {
                    streamLogs.append(d)
                }
            case "audit_log":
                if let spec = auditLogSpec(d) { auditLog = spec }
            case "error_log": if let spec = errorLog(d) { main.errorLog = spec }
            case "metrics_listen": metricsListen(d, into: &main)
            case "resolver": streamResolver = resolver(d)
            case "resolver_timeout": streamResolverTimeout = time(d.arguments[0], in: d)
            default:
                if applyTLSSetting(d, to: &streamTLS) { break }
                if !applyLimitSetting(d, to: &streamLimits) { applyProxySetting(d, to: &proxy) }
            }
        }

        var upstreams: [String: UpstreamGroup] = [:]
        for block in upstreamBlocks {
            // nginx compares upstream names without regard to case.
            let name = block.arguments[0].text.lowercased()
            if let existing = upstreams[name] {
                error("duplicate upstream \"\(name)\"; it was first defined at \(existing.location.map(\.description) ?? "?")", at: block.arguments[0])
                continue
            }
            if let group = upstream(block) { upstreams[name] = group } else { brokenUpstreams.insert(name) }
        }

        let inheritedLogs = streamLogsOff ? [] : streamLogs.compactMap { accessLog($0, formats: formats) }
        var servers: [ServerPolicy] = []
        var listenSites: [String: SourceLocation] = [:]
        for (ordinal, block) in serverBlocks.enumerated() {
            var inherited = proxy
            inherited.proxyProtocolTLVs = streamTLVs
            if let server = compileServer(block, ordinal: ordinal, inheritedRules: streamRules,
                                          inheritedLimits: streamLimits, connZones: connZones, rateZones: rateZones,
                                          inheritedRealIP: streamRealIP,
                                          inheritedLogs: inheritedLogs, inheritedAudit: auditLog,
                                          proxy: inherited, tls: streamTLS.inherited(), formats: formats,
                                          upstreams: upstreams) {
                for listen in server.listens {
                    // TCP and UDP on the same address and port are different sockets.
                    // (A unix path is one socket file, whether stream or datagram.)
                    let site = listen.endpoint
                    let key = listen.udp && !site.isUnix ? "udp " + site.description : site.description
                    if let first = listenSites[key] {
                        diagnostics.error("duplicate listen \(listen.endpoint); it is already used at \(first)",
                                          at: listen.location, length: listen.writtenLength)
                    } else {
                        listenSites[key] = listen.location
                    }
                }
                servers.append(server)
            }
        }
        if serverBlocks.isEmpty {
            error("no \"server\" block is defined in \"stream\": there is nothing to listen on", at: stream)
        }
        checkVariableCycles()
        // Servers were compiled while `set` definitions were still being added: give every
        // server the finished table.
        var warnedTLSRules = Set<RuleReference>()
        for i in servers.indices {
            servers[i].variables = variables
            servers[i].prereadBeforeAccess = servers[i].preread && accessReadsClientHello(servers[i])
            warnAboutUnknowableTLSVariables(servers[i], warned: &warnedTLSRules)
        }
        return PolicySnapshot(main: main, servers: servers, upstreams: upstreams, auditLog: auditLog, logFormats: formats,
                              variables: variables, geoipDatabases: geoipDatabases, logBuffers: logBuffers,
                              healthChecks: healthChecks, resolutions: resolutions)
    }

    mutating func compileServer(_ block: Directive, ordinal: Int, inheritedRules: [AccessRule],
                                inheritedLimits: LimitSettings, connZones: [String: LimitConnZone],
                                rateZones: [String: LimitRateZone],
                                inheritedRealIP: [(CIDR?, RuleReference)], inheritedLogs: [AccessLogSpec], inheritedAudit: AuditLogSpec?,
                                proxy inherited: ProxySettings, tls inheritedTLS: TLSLevel, formats: [String: LogFormat],
                                upstreams: [String: UpstreamGroup]) -> ServerPolicy? {
        var seen: [String: Directive] = [:]
        var listens: [ListenSpec] = []
        var rules: [AccessRule] = []
        var hasOwnRules = false
        var realIP: [(CIDR?, RuleReference)] = []
        var tlvs: [ProxyTLVTemplate] = []
        var tlvDirectives: [Directive] = []
        var logs: [AccessLogSpec] = []
        var hasOwnLogs = false
        var logsOff = false
        var audit = inheritedAudit
        var proxy = inherited
        var upstream: UpstreamGroup?
        var upstreamTemplate: LogTemplate?
        var returnValue: LogTemplate?
        var limits = inheritedLimits
        var connRules: [LimitConnRule]?
        var rateRules: [LimitRateRule]?
        var healthCheckDirectives: [Directive] = []
        var ownResolver: ResolverSpec?
        var ownResolverTimeout: Int?
        var tlsLevel = inheritedTLS
        var failed = false
        for d in block.block ?? [] {
            guard admit(d, in: .server, seen: &seen) != nil else { failed = true; continue }
            switch d.name {
            case "health_check":
                healthCheckDirectives.append(d)
            case "listen":
                if let listen = listen(d) { listens.append(listen) } else { failed = true }
            case "allow", "deny":
                hasOwnRules = true
                if let rule = accessRule(d) { rules.append(rule) } else { failed = true }
            case "access_log":
                hasOwnLogs = true
                if d.arguments[0].text == "off" {
                    logsOff = true  // nginx: "off" cancels every access_log on this level
                    if d.arguments.count > 1 { error("\"access_log off\" takes no other parameters", at: d.arguments[1]) }
                } else if let log = accessLog(d, formats: formats) {
                    logs.append(log)
                } else {
                    failed = true
                }
            case "audit_log":
                // A server's own audit_log replaces the stream's (off: none for this server).
                if let spec = auditLogSpec(d) { audit = spec } else { failed = true }
            case "set_real_ip_from":
                if let blocks = trustedBlocks(d) { realIP += blocks } else { failed = true }
            case "proxy_protocol_tlv":
                tlvDirectives.append(d)
                if let tlv = proxyTLV(d, formats: formats) { tlvs.append(tlv) } else { failed = true }
            case "return":
                // nginx: return and proxy_pass both set the server's content handler, and the
                // later one is what runs.
                returnValue = template(d.arguments[0], in: d)
                if returnValue == nil { failed = true }
                (upstream, upstreamTemplate) = (nil, nil)
            case "proxy_pass":
                returnValue = nil
                if d.arguments[0].text.contains("$") {
                    // nginx: a value with variables names an upstream block or HOST:PORT per session.
                    upstreamTemplate = template(d.arguments[0], in: d)
                    if upstreamTemplate == nil { failed = true }
                } else {
                    upstream = proxyPass(d.arguments[0], upstreams: upstreams)
                    if upstream == nil { failed = true }
                }
            case "set":
                if !compileSet(d, server: ordinal) { failed = true }
            case "limit_conn":
                // nginx: a level with its own limit_conn inherits none.
                if let rule = limitConn(d, zones: connZones) { connRules = (connRules ?? []) + [rule] } else { failed = true }
            case "limit_rate":
                if let rule = limitRate(d, zones: rateZones) { rateRules = (rateRules ?? []) + [rule] } else { failed = true }
            case "error_log":
                _ = errorLog(d)  // accepted; one error log per process for now
            case "resolver":
                ownResolver = resolver(d)
                if ownResolver == nil { failed = true }
            case "resolver_timeout":
                ownResolverTimeout = time(d.arguments[0], in: d)
                if ownResolverTimeout == nil { failed = true }
            default:
                if applyTLSSetting(d, to: &tlsLevel) { break }
                if !applyLimitSetting(d, to: &limits) { applyProxySetting(d, to: &proxy) }
            }
        }
        let errorsBeforeTLS = diagnostics.errors.count
        let (tls, upstreamTLS) = finishTLS(tlsLevel, listens: listens, block: block)
        if diagnostics.errors.count > errorsBeforeTLS { failed = true }
        if listens.isEmpty && !failed {
            error("no \"listen\" is defined for this server", at: block)
        }
        if upstream == nil && seen["proxy_pass"] == nil && seen["return"] == nil {
            error("no \"proxy_pass\" or \"return\" is defined for this server: it would have nowhere to send connections", at: block)
        }
        // nginx: list directives are inherited only by a level that has none of its own.
        if !tlvDirectives.isEmpty { proxy.proxyProtocolTLVs = tlvs }
        if listens.contains(where: \.udp) && proxy.sendProxyProtocol == .v1 {
            // The v1 text header has no way to say UDP; the spec's UDP rule is a v2 DGRAM header
            // in every datagram.
            let site = (block.block ?? []).first { $0.name == "proxy_protocol" } ?? block
            error("\"proxy_protocol on\" (v1) cannot describe UDP: a server with a \"udp\" listen must use \"proxy_protocol v2\" (a v2 DGRAM header in every datagram)", at: site)
        }
        if proxy.sendProxyProtocol != .v2 && (!proxy.proxyProtocolTLVs.isEmpty || proxy.proxyProtocolCRC32C) {
            let what = proxy.proxyProtocolCRC32C ? "proxy_protocol_crc32c" : "proxy_protocol_tlv"
            let site = (block.block ?? []).first { $0.name == what } ?? tlvDirectives.first ?? block
            error("\"\(what)\" needs \"proxy_protocol v2\" (v1 headers carry no TLVs); this server sends \(proxy.sendProxyProtocol == .off ? "no header" : "v1")", at: site)
        }
        for d in healthCheckDirectives {
            // After the loop: proxy_pass may come after health_check.
            guard let upstream else {
                error("\"health_check\" needs \"proxy_pass\" to name an upstream block or ADDRESS:PORT in this server (not a variable, not \"return\")", at: d)
                continue
            }
            if let check = healthCheck(d, group: upstream, timeout: proxy.healthCheckTimeoutMilliseconds) { healthChecks.append(check) }
        }
        guard upstream != nil || upstreamTemplate != nil || returnValue != nil, !listens.isEmpty else { return nil }
        if let connRules { limits.conn = connRules }
        if let rateRules { limits.rate = rateRules }
        var serverResolver = ownResolver ?? streamResolver
        if let timeout = ownResolverTimeout ?? streamResolverTimeout { serverResolver?.timeoutMilliseconds = timeout }
        // nginx: allow/deny and access_log are inherited only by a server that has none of its own.
        return ServerPolicy(
            listens: listens,
            access: AccessList(rules: hasOwnRules ? rules : inheritedRules),
            realIPFrom: TrustedSources(realIP.isEmpty ? inheritedRealIP : realIP),
            upstream: upstream,
            upstreamTemplate: upstreamTemplate,
            returnValue: returnValue,
            upstreams: upstreams,
            proxy: proxy,
            accessLogs: hasOwnLogs ? (logsOff ? [] : logs) : inheritedLogs,
            auditLog: audit,
            limits: limits,
            location: block.nameLocation,
            ordinal: ordinal,
            variables: variables,
            resolver: serverResolver,
            tls: tls,
            upstreamTLS: upstreamTLS,
            preread: tlsLevel.prereadOn)
    }

    // MARK: Health checks

    /// `match NAME { send STRING; expect STRING | ~ REGEX | ~* REGEX; }`. Both strings take
    /// nginx's `\xHH` escapes.
    mutating func compileMatch(_ d: Directive) {
        let name = d.arguments[0].text
        if healthMatches[name] != nil {
            error("duplicate match \"\(name)\"", at: d.arguments[0])
            return
        }
        var match = HealthMatch(name: name)
        var seen: [String: Directive] = [:]
        var failed = false
        for entry in d.block ?? [] {
            guard admit(entry, in: .match, seen: &seen) != nil else { failed = true; continue }
            let argument = entry.arguments[0]
            switch entry.name {
            case "send":
                match.send = Self.hexUnescaped(argument.text)
            case "expect":
                let caseInsensitive = argument.text.hasPrefix("~*")
                if argument.text.hasPrefix("~") && !argument.quoted {
                    // `expect ~ "re"` (two words) or `expect ~re` (one).
                    let inline = String(argument.text.dropFirst(caseInsensitive ? 2 : 1))
                    let patternArgument = entry.arguments.count == 2 ? entry.arguments[1] : argument
                    let pattern = entry.arguments.count == 2 ? entry.arguments[1].text : inline
                    guard !pattern.isEmpty, entry.arguments.count == 2 ? inline.isEmpty : true else {
                        error("invalid \"expect\" in match \"\(name)\"; expected \"expect STRING;\", \"expect ~ REGEX;\" or \"expect ~* REGEX;\"", at: argument)
                        failed = true
                        continue
                    }
                    do {
                        match.expect = .regex(try HealthRegex(pattern: pattern, caseInsensitive: caseInsensitive))
                    } catch {
                        self.error("invalid regex \"\(pattern)\" in match \"\(name)\": \(error)", at: patternArgument)
                        failed = true
                    }
                } else {
                    guard entry.arguments.count == 1 else {
                        error("invalid \"expect\" in match \"\(name)\"; expected \"expect STRING;\", \"expect ~ REGEX;\" or \"expect ~* REGEX;\"", at: entry.arguments[1])
                        failed = true
                        continue
                    }
                    match.expect = .contains(Self.hexUnescaped(argument.text))
                }
            default:
                break
            }
        }
        if !failed { healthMatches[name] = match }
    }

    /// nginx's `\xHH` escapes in `send` and `expect`; other text as it is.
    static func hexUnescaped(_ text: String) -> [UInt8] {
        let bytes = Array(text.utf8)
        var out: [UInt8] = []
        var i = 0
        while i < bytes.count {
            if bytes[i] == UInt8(ascii: "\\"), i + 3 < bytes.count, bytes[i + 1] == UInt8(ascii: "x"),
               let value = UInt8(String(decoding: bytes[(i + 2)...(i + 3)], as: UTF8.self), radix: 16) {
                out.append(value)
                i += 4
            } else {
                out.append(bytes[i])
                i += 1
            }
        }
        return out
    }

    /// `health_check [interval=T] [jitter=T] [fails=N] [passes=N] [mandatory [persistent]]
    /// [match=NAME] [port=N] [udp]`, nginx Plus's parameters and defaults.
    mutating func healthCheck(_ d: Directive, group: UpstreamGroup, timeout: Int) -> HealthCheck? {
        var check = HealthCheck(group: group)
        check.timeoutMilliseconds = timeout
        check.location = d.nameLocation
        for argument in d.arguments {
            let (key, value) = splitParameter(argument.text)
            switch key {
            case "interval=", "jitter=":
                guard let ms = Units.milliseconds(value), key == "jitter=" || ms > 0 else {
                    error("invalid value \"\(value)\" in \"\(key)\" of \"health_check\"; expected a time such as 5s", at: argument)
                    return nil
                }
                if key == "interval=" { check.intervalMilliseconds = ms } else { check.jitterMilliseconds = ms }
            case "fails=", "passes=":
                guard let n = Int(value), n > 0 else {
                    error("invalid value \"\(value)\" in \"\(key)\" of \"health_check\"; expected a positive number", at: argument)
                    return nil
                }
                if key == "fails=" { check.fails = n } else { check.passes = n }
            case "port=":
                guard let port = UInt16(value), port > 0 else {
                    error("invalid port \"\(value)\" in \"health_check\"; expected 1-65535", at: argument)
                    return nil
                }
                check.port = port
            case "match=":
                guard let match = healthMatches[value] else {
                    var message = "unknown match \"\(value)\" in \"health_check\""
                    if let guess = closestMatch(to: value, in: healthMatches.keys) { message += "; did you mean \"\(guess)\"?" }
                    error(message, at: argument)
                    return nil
                }
                check.match = match
            case "mandatory": check.mandatory = true
            case "persistent":
                guard check.mandatory else {
                    error("\"persistent\" in \"health_check\" needs \"mandatory\" before it", at: argument)
                    return nil
                }
                check.persistent = true
            case "udp": check.udp = true
            default:
                error("invalid parameter \"\(argument.text)\" in \"health_check\"; expected interval=, jitter=, fails=, passes=, mandatory, persistent, match=, port= or udp", at: argument)
                return nil
            }
        }
        return check
    }

    // MARK: Directives

    /// `audit_log PATH [sample=N/s]` or `audit_log off`: `.some(nil)` for off, nil on error.
    mutating func auditLogSpec(_ d: Directive) -> AuditLogSpec?? {
        if d.arguments[0].text == "off" {
            if d.arguments.count > 1 { error("\"audit_log off\" takes no other parameters", at: d.arguments[1]); return nil }
            return .some(nil)
        }
        var spec = AuditLogSpec(path: d.arguments[0].text)
        if d.arguments.count > 1 {
            let text = d.arguments[1].text
            guard text.hasPrefix("sample="), text.hasSuffix("/s"),
                  let n = Int(text.dropFirst("sample=".count).dropLast(2)), n > 0 else {
                error("invalid parameter \"\(text)\" in \"audit_log\"; expected sample=N/s, the most lines a second (default 100)", at: d.arguments[1])
                return nil
            }
            spec.linesPerSecond = n
        }
        return spec
    }

    mutating func accessRule(_ d: Directive) -> AccessRule? {
        let argument = d.arguments[0]
        let action: AccessRule.Action = d.name == "allow" ? .allow : .deny
        if argument.text == "all" {
            return AccessRule(action: action, match: .all, reference: d.reference)
        }
        if argument.text == "unix:" {
            return AccessRule(action: action, match: .unix, reference: d.reference)
        }
        if argument.text.hasPrefix("$") {
            // The extension: `deny $var;` matches when the value is non-empty and not "0".
            let name = String(argument.text.dropFirst())
            guard let variable = resolveVariable(name) else {
                var message = "unknown variable \"\(argument.text)\" in \"\(d.name)\""
                if let guess = closestMatch(to: name, in: knownVariableNames) { message += "; did you mean \"$\(guess)\"?" }
                error(message, at: argument)
                return nil
            }
            return AccessRule(action: action, match: .variable(variable), reference: d.reference, variableName: argument.text)
        }
        guard let block = addressBlock(argument, in: d, alternatives: ", or \"all\"") else { return nil }
        if let mapped = block.mappedIPv4Block {
            diagnostics.warning(
                "\(argument.text) is an IPv4-mapped block: Portcullis applies it to IPv4 clients in \(mapped) too (nginx would skip it for them)",
                at: argument.location, length: argument.length)
        }
        return AccessRule(action: action, match: .block(block), reference: d.reference)
    }

    /// `set_real_ip_from ADDR|CIDR;`
    /// `set_real_ip_from ADDRESS|CIDR|HOST`: a host name is resolved once, when the file is
    /// loaded, and every address it has is trusted, as nginx does.
    /// `set_real_ip_from unix:` trusts clients on unix-domain sockets (a nil block).
    mutating func trustedBlocks(_ d: Directive) -> [(CIDR?, RuleReference)]? {
        let argument = d.arguments[0]
        let text = argument.text
        if text == "unix:" { return [(nil, d.reference)] }
        if !text.hasPrefix("unix:"), CIDR(text) == nil, let first = text.first, first.isLetter,
           text.allSatisfy({ $0.isASCII && ($0.isLetter || $0.isNumber || $0 == "-" || $0 == ".") }) {
            let addresses = resolver.addresses(of: text)
            guard !addresses.isEmpty else {
                error("host not found in set_real_ip_from \"\(text)\"", at: argument)
                return nil
            }
            return addresses.map { (CIDR(address: $0, prefixLength: $0.isIPv4 ? 32 : 128), d.reference) }
        }
        return addressBlock(argument, in: d, alternatives: ", or a host name").map { [($0, d.reference)] }
    }

    /// An address or CIDR argument, with nginx's warning when host bits are set.
    mutating func addressBlock(_ argument: Argument, in d: Directive, alternatives: String) -> CIDR? {
        if argument.text.hasPrefix("unix:") {
            // nginx takes only the bare "unix:", meaning every unix-domain client.
            error("invalid parameter \"\(argument.text)\" in \"\(d.name)\"; \"unix:\" alone means clients on unix-domain sockets (no path)", at: argument)
            return nil
        }
        guard let block = CIDR(argument.text) else {
            error("invalid address or CIDR \"\(argument.text)\" in \"\(d.name)\"; expected an IPv4 or IPv6 address, a block such as 10.0.0.0/8 or 2001:db8::/32\(alternatives)", at: argument)
            return nil
        }
        if block.hostBitsSet {
            diagnostics.warning("low address bits of \(argument.text) are meaningless; the rule applies to \(block)",
                                at: argument.location, length: argument.length)
        }
        return block
    }

    /// `proxy_protocol_tlv TYPE VALUE;` — TYPE is a name nginx uses for the TLV
    /// (`authority`, `unique_id`, …) or a number (`0xE0`, `224`).
    mutating func proxyTLV(_ d: Directive, formats: [String: LogFormat]) -> ProxyTLVTemplate? {
        let typeArgument = d.arguments[0]
        let text = typeArgument.text
        var type: UInt8?
        if let named = ProxyTLVType(name: text) {
            type = named.rawValue
        } else if text.lowercased().hasPrefix("0x") {
            let digits = text.dropFirst(2)
            type = digits.allSatisfy(\.isHexDigit) ? UInt8(digits, radix: 16) : nil
        } else {
            type = text.allSatisfy(\.isWholeNumber) ? UInt8(text) : nil
        }
        guard let type else {
            var message = "invalid TLV type \"\(text)\" in \"proxy_protocol_tlv\"; expected a name (alpn, authority, unique_id, netns, noop) or a number such as 0xE0"
            if let guess = closestMatch(to: text, in: ProxyTLVType.allCases.map(\.name)) { message += "; did you mean \"\(guess)\"?" }
            error(message, at: typeArgument)
            return nil
        }
        if type == ProxyTLVType.crc32c.rawValue {
            error("the CRC32C TLV is computed, not configured: use \"proxy_protocol_crc32c on\"", at: typeArgument)
            return nil
        }
        if type >= ProxyTLVType.ssl.rawValue && type <= 0x2F {  // SSL and its sub-TLV range
            error("SSL TLVs are not configured: a server with \"listen … ssl\" sends them from its handshake (version, CN, cipher, signature and key algorithms)", at: typeArgument)
            return nil
        }
        guard let value = template(d.arguments[1], in: d) else { return nil }
        return ProxyTLVTemplate(type: type, value: value)
    }

    mutating func listen(_ d: Directive) -> ListenSpec? {
        let first = d.arguments[0]
        var spec: ListenSpec
        if first.text.hasPrefix("unix:") {
            guard let path = unixPath(first, in: "of the \"listen\" directive") else { return nil }
            spec = ListenSpec(unixPath: path, location: first.location)
        } else {
            guard let (address, port) = parseListenAddress(first) else { return nil }
            spec = ListenSpec(address: address, port: port, location: first.location)
        }
        spec.writtenLength = first.length
        let parameters = ["reuseport", "backlog=", "so_keepalive=", "ipv6only=", "udp", "proxy_protocol", "ssl",
                          "default_server", "bind", "deferred", "fastopen=", "rcvbuf=", "sndbuf=", "setfib=",
                          "accept_filter=", "multipath"]
        for argument in d.arguments.dropFirst() {
            let text = argument.text
            let (key, value) = splitParameter(text)
            switch key {
            case "reuseport": spec.reusePort = true
            case "default_server", "bind", "deferred": break  // no effect on Linux sockets we open
            case "backlog=":
                guard let n = Int(value), n > 0 else {
                    error("invalid backlog \"\(value)\" in \"listen\"; expected a positive number", at: argument)
                    return nil
                }
                spec.backlog = n
            case "ipv6only=":
                guard value == "on" || value == "off" else {
                    error("invalid value \"\(value)\" for \"ipv6only\"; it must be \"on\" or \"off\"", at: argument)
                    return nil
                }
                spec.ipv6Only = value == "on"
            case "so_keepalive=":
                guard let keepalive = parseKeepalive(value) else {
                    error("invalid \"so_keepalive\" value \"\(value)\"; expected on, off, or IDLE:INTERVAL:COUNT such as 30m::10", at: argument)
                    return nil
                }
                spec.keepalive = keepalive
            case "udp":
                spec.udp = true
            case "proxy_protocol":
                spec.proxyProtocol = true  // on udp: a v2 header in every datagram (an extension)
            case "ssl":
                spec.ssl = true
            case "fastopen=", "rcvbuf=", "sndbuf=", "setfib=", "accept_filter=", "multipath":
                // With udp, some of these are errors, said below; no note for those.
                if d.arguments.contains(where: { $0.text == "udp" }) && key != "rcvbuf=" && key != "sndbuf=" && key != "setfib=" { continue }
                diagnostics.note("\"\(key)\" is accepted but has no effect in Portcullis", at: argument.location, length: argument.length)
            default:
                var message = "invalid parameter \"\(text)\" in \"listen\""
                if let guess = closestMatch(to: key.hasSuffix("=") ? String(key.dropLast()) : key,
                                            in: parameters.map { $0.hasSuffix("=") ? String($0.dropLast()) : $0 }) {
                    message += "; did you mean \"\(guess)\"?"
                }
                error(message, at: argument)
                return nil
            }
        }
        if spec.udp {
            // nginx refuses these with udp too ("… is incompatible with udp").
            for argument in d.arguments.dropFirst() {
                let key = splitParameter(argument.text).0
                if ["backlog=", "so_keepalive=", "deferred", "accept_filter=", "multipath", "fastopen=", "ssl"].contains(key) {
                    error("\"\(key.hasSuffix("=") ? String(key.dropLast()) : key)\" parameter is incompatible with \"udp\"", at: argument)
                    return nil
                }
            }
        }
        return spec
    }

    private func splitParameter(_ text: String) -> (String, String) {
        guard let equals = text.firstIndex(of: "=") else { return (text, "") }
        return (String(text[...equals]), String(text[text.index(after: equals)...]))
    }

    mutating func parseKeepalive(_ text: String) -> ListenSpec.Keepalive? {
        if text == "on" { return .on }
        if text == "off" { return .off }
        let parts = text.split(separator: ":", omittingEmptySubsequences: false)
        guard parts.count == 3 else { return nil }
        func seconds(_ part: Substring) -> Int?? {
            if part.isEmpty { return .some(nil) }
            // Whole seconds only, as nginx (TCP_KEEPIDLE/KEEPINTVL take seconds, and 0 fails).
            guard let ms = Units.milliseconds(String(part)), ms >= 1000, ms % 1000 == 0 else { return nil }
            return .some(ms / 1000)
        }
        guard let idle = seconds(parts[0]), let interval = seconds(parts[1]) else { return nil }
        var count: Int?
        if !parts[2].isEmpty {
            guard let n = Int(parts[2]), n > 0 else { return nil }
            count = n
        }
        return .tuned(idle: idle, interval: interval, count: count)
    }

    /// The path of `unix:PATH`, with nginx's errors (`where`: `of the "listen" directive`,
    /// `in upstream`). A relative path is relative to the working directory, as in nginx.
    mutating func unixPath(_ argument: Argument, in place: String) -> String? {
        let path = String(argument.text.dropFirst("unix:".count))
        guard !path.isEmpty else {
            error("no path in the unix domain socket in \"\(argument.text)\" \(place)", at: argument)
            return nil
        }
        guard path.utf8.count <= SocketEndpoint.maximumUnixPathLength else {
            error("too long path in the unix domain socket in \"\(argument.text)\" \(place); at most \(SocketEndpoint.maximumUnixPathLength) bytes", at: argument)
            return nil
        }
        return path
    }

    /// `ADDR:PORT`, `[V6]:PORT`, `*:PORT` or `PORT`.
    mutating func parseListenAddress(_ argument: Argument) -> (IPAddress, UInt16)? {
        let text = argument.text
        if let port = UInt16(text) {
            guard port > 0 else { error("invalid port \"0\" in \"listen\"; expected 1-65535", at: argument); return nil }
            return (.v4(0), port)
        }
        guard let (host, portText) = SocketEndpoint.split(text), !host.isEmpty else {
            error("invalid listen address \"\(text)\"; expected ADDRESS:PORT, [IPV6]:PORT or PORT", at: argument)
            return nil
        }
        guard let port = UInt16(portText), port > 0 else {
            error("invalid port \"\(portText)\" in \"listen \(text)\"; expected 1-65535", at: argument)
            return nil
        }
        if host == "*" { return (.v4(0), port) }
        if let address = IPAddress(host) { return (address, port) }
        let resolved = resolver.addresses(of: host)
        guard let address = resolved.first else {
            error("host not found in \"\(text)\" of the \"listen\" directive", at: argument)
            return nil
        }
        return (address, port)
    }

    /// The endpoints a `host:port` names: an address, or every address the host resolves to.
    mutating func endpoints(_ argument: Argument, text: String, in directive: String) -> [SocketEndpoint]? {
        if text.hasPrefix("unix:") {
            guard let path = unixPath(argument, in: "of \"\(directive)\"") else { return nil }
            return [SocketEndpoint(unixPath: path)]
        }
        guard let (host, portText) = SocketEndpoint.split(text) else {
            error("no port in \"\(text)\" of \"\(directive)\"; expected HOST:PORT", at: argument)
            return nil
        }
        guard let port = UInt16(portText), port > 0 else {
            error("invalid port \"\(portText)\" in \"\(text)\"; expected 1-65535", at: argument)
            return nil
        }
        if let address = IPAddress(host) { return [SocketEndpoint(address: address, port: port)] }
        let addresses = resolver.addresses(of: host)
        guard !addresses.isEmpty else {
            error("host not found in \"\(text)\" of \"\(directive)\"", at: argument)
            return nil
        }
        return addresses.map { SocketEndpoint(address: $0, port: port) }
    }

    mutating func proxyPass(_ argument: Argument, upstreams: [String: UpstreamGroup]) -> UpstreamGroup? {
        let text = argument.text
        if let group = upstreams[text.lowercased()] { return group }
        if brokenUpstreams.contains(text.lowercased()) { return nil }  // its errors are said
        guard text.contains(":") else {
            var message = "unknown upstream \"\(text)\" in \"proxy_pass\""
            if let guess = closestMatch(to: text, in: upstreams.keys) {
                message += "; did you mean \"\(guess)\"?"
            } else {
                message += "; expected the name of an upstream block or HOST:PORT"
            }
            error(message, at: argument)
            return nil
        }
        guard let endpoints = endpoints(argument, text: text, in: "proxy_pass") else { return nil }
        let servers = endpoints.map { UpstreamServer(endpoint: $0, name: text) }
        return carried.carry(UpstreamGroup(name: text, servers: servers, location: argument.location))
    }

    mutating func upstream(_ block: Directive) -> UpstreamGroup? {
        var servers: [UpstreamServer] = []
        var seen: [String: Directive] = [:]
        var method = BalancingMethod.roundRobin
        var methodDirective: Directive?
        var ownResolver: ResolverSpec?
        var ownTimeout: Int?
        var hasZone = false
        /// `server NAME resolve` lines: the template, the name, the port, where it was written.
        var resolvable: [(server: UpstreamServer, host: String, port: UInt16, at: Directive)] = []
        for d in block.block ?? [] {
            guard admit(d, in: .upstream, seen: &seen) != nil else { continue }
            switch d.name {
            case "resolver":
                ownResolver = resolver(d)
                continue
            case "resolver_timeout":
                ownTimeout = time(d.arguments[0], in: d)
                continue
            case "hash", "least_conn", "random":
                if let earlier = methodDirective {
                    diagnostics.warning("load balancing method redefined; \"\(earlier.name)\" at \(earlier.nameLocation) no longer applies",
                                        at: d.nameLocation, length: d.name.count)
                }
                guard let parsed = balancingMethod(d) else { continue }
                method = parsed
                methodDirective = d
                continue
            case "zone":
                zone(d)
                hasZone = true
                continue
            case "server":
                break
            default:
                continue
            }
            // `resolve` on a name: looked up at run time, not now (nginx 1.27.3); on an address
            // it changes nothing.
            let text = d.arguments[0].text
            var runtimeName: (host: String, port: UInt16)?
            if d.arguments.dropFirst().contains(where: { $0.text == "resolve" }), !text.hasPrefix("unix:"),
               let (host, portText) = SocketEndpoint.split(text), IPAddress(host) == nil {
                guard let port = UInt16(portText), port > 0 else {
                    error("invalid port \"\(portText)\" in \"\(text)\"; expected 1-65535", at: d.arguments[0])
                    continue
                }
                runtimeName = (host, port)
            } else if d.arguments.dropFirst().contains(where: { $0.text == "resolve" }), !text.hasPrefix("unix:"),
                      SocketEndpoint.split(text) == nil, IPAddress(text) == nil {
                error("no port in upstream \"\(text)\"", at: d.arguments[0])
                continue
            }
            let endpoints: [SocketEndpoint]
            if let runtimeName {
                endpoints = [SocketEndpoint(address: .v4(0), port: runtimeName.port)]  // a template, never dialled
            } else {
                guard let found = self.endpoints(d.arguments[0], text: text, in: "server") else { continue }
                endpoints = found
            }
            var template = UpstreamServer(endpoint: endpoints[0], name: text)
            var valid = true
            for argument in d.arguments.dropFirst() {
                let (key, value) = splitParameter(argument.text)
                switch key {
                case "weight=":
                    guard let n = Int(value), n > 0 else {
                        error("invalid weight \"\(value)\"; expected a positive number", at: argument); valid = false; continue
                    }
                    template.weight = n
                case "max_conns=":
                    guard let n = Int(value), n >= 0 else {
                        error("invalid max_conns \"\(value)\"; expected a number (0: no limit)", at: argument); valid = false; continue
                    }
                    template.maxConns = n
                case "max_fails=":
                    guard let n = Int(value), n >= 0 else {
                        error("invalid max_fails \"\(value)\"; expected a number", at: argument); valid = false; continue
                    }
                    template.maxFails = n
                case "fail_timeout=":
                    guard let ms = Units.milliseconds(value) else {
                        error("invalid fail_timeout \"\(value)\"; expected a time such as 10s", at: argument); valid = false; continue
                    }
                    template.failTimeoutMilliseconds = ms
                case "backup":
                    // nginx refuses it once a method that has no backups was chosen (and, as
                    // nginx, not when the method comes after the server lines).
                    if let methodDirective, methodDirective.name != "least_conn" {
                        error("balancing method \"\(methodDirective.name)\" (\(methodDirective.nameLocation)) does not support parameter \"backup\"", at: argument)
                        valid = false
                        continue
                    }
                    template.backup = true
                case "down": template.down = true
                case "resolve": break
                case "service=":
                    error("\"service=\" (DNS SRV records) is not supported yet; name the port: \"server NAME:PORT resolve\"", at: argument)
                    valid = false
                default:
                    var message = "invalid parameter \"\(argument.text)\" in upstream \"server\""
                    if let guess = closestMatch(to: key, in: ["weight=", "max_conns=", "max_fails=", "fail_timeout=", "backup", "down", "resolve"]) {
                        message += "; did you mean \"\(guess)\"?"
                    }
                    error(message, at: argument)
                    valid = false
                }
            }
            guard valid else { continue }
            if let runtimeName {
                resolvable.append((template, runtimeName.host, runtimeName.port, d))
                continue
            }
            for endpoint in endpoints {
                var server = template
                server.endpoint = endpoint
                servers.append(server)
            }
        }
        let name = block.arguments[0].text
        // nginx's checks and wording; a group of only `resolve` servers is fine (it starts empty).
        var resolver = ownResolver ?? streamResolver
        if let first = resolvable.first {
            let site = "upstream \"\(name)\" in \(block.nameLocation.file):\(block.nameLocation.line)"
            if !hasZone {
                error("resolving names at run time requires \(site) to be in shared memory (add \"zone \(name) 64k;\"; Portcullis shares its state anyway, nginx needs it)", at: first.at)
                return nil
            }
            if resolver == nil {
                error("no resolver defined to resolve names at run time in \(site)", at: first.at)
                return nil
            }
            if let timeout = ownTimeout ?? streamResolverTimeout { resolver?.timeoutMilliseconds = timeout }
        }
        let primaries = servers.filter { !$0.backup }.count + resolvable.filter { !$0.server.backup }.count
        if primaries == 0 {
            if !diagnostics.hasErrors { error("no servers are inside upstream \"\(name)\"", at: block) }
            return nil
        }
        let group = carried.carry(UpstreamGroup(name: name, servers: servers, location: block.arguments[0].location,
                                                method: method, resolvable: resolvable.map(\.server)))
        if let resolver {
            for (index, entry) in resolvable.enumerated() {
                resolutions.append(Resolution(group: group, template: index, host: entry.host, port: entry.port, resolver: resolver))
            }
        }
        return group
    }

    /// `resolver ADDRESS[:PORT] … [valid=TIME] [ipv4=on|off] [ipv6=on|off] [status_zone=NAME]`.
    /// A host name among the addresses is resolved now, as nginx does.
    mutating func resolver(_ d: Directive) -> ResolverSpec? {
        var spec = ResolverSpec(servers: [])
        for argument in d.arguments {
            let (key, value) = splitParameter(argument.text)
            switch key {
            case "valid=":
                guard let ms = Units.milliseconds(value) else {
                    error("invalid time \"\(value)\" in \"valid=\" of \"resolver\"; expected a time such as 30s", at: argument)
                    return nil
                }
                spec.validMilliseconds = ms
            case "ipv4=", "ipv6=":
                guard value == "on" || value == "off" else {
                    error("invalid parameter \"\(argument.text)\" in \"resolver\"; \"\(key)\" must be \"on\" or \"off\"", at: argument)
                    return nil
                }
                if key == "ipv4=" { spec.ipv4 = value == "on" } else { spec.ipv6 = value == "on" }
            case "status_zone=":
                break  // nginx Plus's statistics; metrics are issue #15's
            default:
                let text = argument.text
                if let address = IPAddress(text) {
                    spec.servers.append(SocketEndpoint(address: address, port: 53))
                } else if let endpoint = SocketEndpoint(text), !endpoint.isUnix {
                    spec.servers.append(endpoint)
                } else if text.hasPrefix("["), text.hasSuffix("]"), let address = IPAddress(String(text.dropFirst().dropLast())) {
                    spec.servers.append(SocketEndpoint(address: address, port: 53))
                } else {
                    let (host, port) = SocketEndpoint.split(text) ?? (text, "53")
                    let addresses = UInt16(port).map { _ in self.resolver.addresses(of: host) } ?? []
                    guard let number = UInt16(port), number > 0, !addresses.isEmpty else {
                        error("host not found in resolver \"\(text)\"", at: argument)
                        return nil
                    }
                    spec.servers += addresses.map { SocketEndpoint(address: $0, port: number) }
                }
            }
        }
        guard !spec.servers.isEmpty else {
            error("no name servers defined in \"resolver\"", at: d)
            return nil
        }
        guard spec.ipv4 || spec.ipv6 else {
            error("\"ipv4\" and \"ipv6\" cannot both be \"off\" in \"resolver\"", at: d)
            return nil
        }
        return spec
    }

    /// `hash KEY [consistent]`, `least_conn`, `random [two [least_conn]]`.
    mutating func balancingMethod(_ d: Directive) -> BalancingMethod? {
        switch d.name {
        case "least_conn":
            return .leastConn
        case "hash":
            guard let key = template(d.arguments[0], in: d) else { return nil }
            guard d.arguments.count == 1 else {
                guard d.arguments[1].text == "consistent" else {
                    error("invalid parameter \"\(d.arguments[1].text)\" in \"hash\"; expected \"consistent\" or nothing", at: d.arguments[1])
                    return nil
                }
                return .consistentHash(key)
            }
            return .hash(key)
        default:  // random
            if d.arguments.count >= 1 && d.arguments[0].text != "two" {
                error("invalid parameter \"\(d.arguments[0].text)\" in \"random\"; expected \"two\" or nothing", at: d.arguments[0])
                return nil
            }
            if d.arguments.count == 2 && d.arguments[1].text != "least_conn" {
                error("invalid parameter \"\(d.arguments[1].text)\" in \"random two\"; expected \"least_conn\" (the only method nginx's open-source build has)", at: d.arguments[1])
                return nil
            }
            return .random(two: !d.arguments.isEmpty)
        }
    }

    /// `zone NAME [SIZE]`: checked as nginx checks it. It changes nothing else: upstream state
    /// is always shared by every event loop, as a zone makes it shared by nginx's workers.
    mutating func zone(_ d: Directive) {
        guard d.arguments.count == 2 else {
            error("zero size shared memory zone \"\(d.arguments[0].text)\"; expected \"zone NAME SIZE\" (such as 64k)", at: d)
            return
        }
        guard let bytes = Units.size(d.arguments[1].text) else {
            error("invalid zone size \"\(d.arguments[1].text)\"; expected a size such as 64k", at: d.arguments[1])
            return
        }
        if bytes < 32 * 1024 {
            error("zone \"\(d.arguments[0].text)\" is too small; nginx needs at least 32k", at: d.arguments[1])
        }
    }

    mutating func applyProxySetting(_ d: Directive, to proxy: inout ProxySettings) {
        let argument = d.arguments[0]
        switch d.name {
        case "proxy_connect_timeout": if let t = time(argument, in: d) { proxy.connectTimeoutMilliseconds = t }
        case "proxy_timeout": if let t = time(argument, in: d) { proxy.idleTimeoutMilliseconds = t }
        case "proxy_next_upstream_timeout": if let t = time(argument, in: d) { proxy.nextUpstreamTimeoutMilliseconds = t }
        case "proxy_half_close": if let v = flag(argument, in: d) { proxy.halfClose = v }
        case "tcp_nodelay": if let v = flag(argument, in: d) { proxy.tcpNoDelay = v }
        case "proxy_socket_keepalive": if let v = flag(argument, in: d) { proxy.socketKeepalive = v }
        case "proxy_next_upstream": if let v = flag(argument, in: d) { proxy.nextUpstream = v }
        case "proxy_buffer_size": if let s = size(argument, in: d) { proxy.bufferSize = s }
        case "proxy_next_upstream_tries":
            guard let n = Int(argument.text), n >= 0 else {
                error("invalid value \"\(argument.text)\" in \"\(d.name)\"; expected a number (0 = unlimited)", at: argument)
                return
            }
            proxy.nextUpstreamTries = n
        case "proxy_responses", "proxy_requests":
            // UDP only, as in nginx (a TCP server ignores them).
            guard let n = Int(argument.text), n >= 0, n <= 65_535 else {
                error("invalid value \"\(argument.text)\" in \"\(d.name)\"; expected a number from 0 to 65535", at: argument)
                return
            }
            if d.name == "proxy_responses" { proxy.udpResponses = n } else { proxy.udpRequests = n }
        case "proxy_protocol_timeout": if let t = time(argument, in: d) { proxy.proxyProtocolTimeoutMilliseconds = t }
        case "health_check_timeout": if let t = time(argument, in: d) { proxy.healthCheckTimeoutMilliseconds = max(t, 1) }
        case "preread_timeout": if let t = time(argument, in: d) { proxy.prereadTimeoutMilliseconds = max(t, 1) }
        case "proxy_protocol_crc32c": if let v = flag(argument, in: d) { proxy.proxyProtocolCRC32C = v }
        case "proxy_protocol":
            switch argument.text {
            case "off": proxy.sendProxyProtocol = .off
            case "on", "v1": proxy.sendProxyProtocol = .v1  // nginx: on = v1
            case "v2": proxy.sendProxyProtocol = .v2
            default:
                error("invalid value \"\(argument.text)\" in \"proxy_protocol\"; it must be \"on\", \"off\", \"v1\" or \"v2\"", at: argument)
            }
        case "preread_buffer_size": if let n = size(argument, in: d) { proxy.prereadBufferSize = max(n, 1) }
        case "proxy_bind": proxyBind(d, to: &proxy)
        default: break
        }
    }

    /// `proxy_bind ADDRESS [transparent] | off`, with nginx's errors.
    mutating func proxyBind(_ d: Directive, to proxy: inout ProxySettings) {
        let argument = d.arguments[0]
        if d.arguments.count == 1 && argument.text == "off" {
            proxy.bind = nil
            return
        }
        var transparent = false
        if d.arguments.count == 2 {
            guard d.arguments[1].text == "transparent" else {
                error("invalid parameter \"\(d.arguments[1].text)\" in \"proxy_bind\"; expected \"transparent\"", at: d.arguments[1])
                return
            }
            transparent = true
        }
        if argument.text.contains("$") {
            guard let value = template(argument, in: d) else { return }
            proxy.bind = ProxyBind(address: .variable(value), transparent: transparent)
            return
        }
        guard let local = SocketEndpoint.local(argument.text) else {
            error("invalid address \"\(argument.text)\" in \"proxy_bind\"; expected an IP address such as 192.0.2.1 or [2001:db8::1]:5000, a variable, or \"off\"", at: argument)
            return
        }
        proxy.bind = ProxyBind(address: .fixed(local), transparent: transparent)
    }

    mutating func logFormat(_ d: Directive) -> LogFormat? {
        let name = d.arguments[0].text
        var strings = d.arguments.dropFirst()
        var escape = LogEscape.default
        if let first = strings.first, first.text.hasPrefix("escape="), !first.quoted {
            let value = String(first.text.dropFirst("escape=".count))
            guard let parsed = LogEscape(rawValue: value) else {
                error("unknown log format escaping \"\(value)\"; expected default, json or none", at: first)
                return nil
            }
            escape = parsed
            strings = strings.dropFirst()
        }
        guard !strings.isEmpty else {
            error("log format \"\(name)\" has no format string", at: d)
            return nil
        }
        var parts: [LogTemplate.Part] = []
        var ok = true
        for argument in strings {
            guard let template = template(argument, in: d) else { ok = false; continue }
            parts += template.parts
        }
        return ok ? LogFormat(name: name, escape: escape, template: LogTemplate(parts: parts)) : nil
    }

    mutating func template(_ argument: Argument, in d: Directive) -> LogTemplate? {
        template(argument, in: d, resolve: resolveVariable)
    }

    mutating func template(_ argument: Argument, in d: Directive, resolve: (String) -> Variable?) -> LogTemplate? {
        do {
            return try LogTemplate.parse(argument.text, resolve: resolve)
        } catch {
            let offset: Int
            let message: String
            switch error {
            case .unknownVariable(let name, let at):
                offset = at
                var text = "unknown variable \"$\(name)\" in \"\(d.name)\""
                if let guess = closestMatch(to: name, in: knownVariableNames) {
                    text += "; did you mean \"$\(guess)\"?"
                }
                message = text
            case .unterminatedBrace(let at):
                offset = at
                message = "the variable name in \"\(argument.text)\" has no closing \"}\""
            case .emptyName(let at):
                offset = at
                message = "invalid variable name in \"\(argument.text)\": \"$\" must be followed by a name"
            }
            // The parser's offset counts Characters of the text; the source counts scalars.
            let scalars = argument.text.prefix(offset).unicodeScalars.count
            diagnostics.error(message, at: sources.location(in: argument, scalarOffset: scalars))
            return nil
        }
    }

    mutating func accessLog(_ d: Directive, formats: [String: LogFormat]) -> AccessLogSpec? {
        let path = d.arguments[0]
        if path.text.hasPrefix("syslog:") {
            error("\"syslog:\" access logs are not supported yet; log to a file", at: path)
            return nil
        }
        var format = LogFormat.basic
        var condition: LogTemplate?
        var rest = d.arguments.dropFirst()
        if let name = rest.first, !name.text.contains("=") || name.quoted {
            guard let named = formats[name.text] else {
                var message = "unknown log format \"\(name.text)\""
                if let guess = closestMatch(to: name.text, in: formats.keys) { message += "; did you mean \"\(guess)\"?" }
                error(message, at: name)
                return nil
            }
            format = named
            rest = rest.dropFirst()
        }
        var bufferSize: Int?
        var flushMilliseconds: Int?
        var gzipLevel: Int?
        for argument in rest {
            let (key, value) = splitParameter(argument.text)
            switch key {
            case "if=":
                guard let parsed = template(argument, in: d) else { return nil }
                // The template was parsed with the "if=" prefix; drop that literal text.
                var parts = parsed.parts
                if case .literal(let text) = parts.first {
                    let rest = String(text.dropFirst(3))
                    if rest.isEmpty { parts.removeFirst() } else { parts[0] = .literal(rest) }
                }
                condition = LogTemplate(parts: parts)
            case "buffer=":
                guard let bytes = Units.size(value), bytes > 0 else {
                    error("invalid buffer size \"\(value)\" in \"access_log\"; expected a size such as 64k", at: argument)
                    return nil
                }
                bufferSize = bytes
            case "flush=":
                guard let ms = Units.milliseconds(value), ms > 0 else {
                    error("invalid flush time \"\(value)\" in \"access_log\"; expected a time such as 5s", at: argument)
                    return nil
                }
                flushMilliseconds = ms
            case "gzip", "gzip=":
                // As nginx: a bare "gzip" is level 1 (zlib's fastest), and gzip without
                // buffer= buffers 64k.
                if key == "gzip=" {
                    guard let level = Int(value), (1...9).contains(level) else {
                        error("invalid compression level \"\(value)\" in \"access_log\"; expected 1 to 9", at: argument)
                        return nil
                    }
                    gzipLevel = level
                } else {
                    gzipLevel = 1
                }
            default:
                error("invalid parameter \"\(argument.text)\" in \"access_log\"; expected buffer=, flush=, gzip or if=", at: argument)
                return nil
            }
        }
        if gzipLevel != nil && bufferSize == nil { bufferSize = 64 * 1024 }
        if flushMilliseconds != nil && bufferSize == nil {
            error("no buffer is defined for access_log \"\(path.text)\"; \"flush=\" needs \"buffer=\" or \"gzip\"", at: path)
            return nil
        }
        if let bufferSize {
            let buffer = LogBuffer(size: bufferSize, flushMilliseconds: flushMilliseconds, gzipLevel: gzipLevel)
            if let existing = logBuffers[path.text], existing != buffer {
                error("access_log \"\(path.text)\" already defined with conflicting parameters (buffer=, flush=, gzip must be the same for one file)", at: path)
                return nil
            }
            logBuffers[path.text] = buffer
        }
        return AccessLogSpec(path: path.text, format: format, condition: condition)
    }

    // MARK: Values

    mutating func flag(_ argument: Argument, in d: Directive) -> Bool? {
        switch argument.text {
        case "on": return true
        case "off": return false
        default:
            error("invalid value \"\(argument.text)\" in \"\(d.name)\"; it must be \"on\" or \"off\"", at: argument)
            return nil
        }
    }

    mutating func time(_ argument: Argument, in d: Directive) -> Int? {
        guard let ms = Units.milliseconds(argument.text) else {
            error("invalid time \"\(argument.text)\" in \"\(d.name)\"; expected a time such as 500ms, 30s, 10m or 1m30s", at: argument)
            return nil
        }
        return ms
    }

    mutating func size(_ argument: Argument, in d: Directive) -> Int? {
        size(argument.text, argument, in: d)
    }

    mutating func size(_ text: String, _ argument: Argument, in d: Directive) -> Int? {
        guard let bytes = Units.size(text) else {
            error("invalid size \"\(text)\" in \"\(d.name)\"; expected a size such as 512, 16k or 10m", at: argument)
            return nil
        }
        return bytes
    }

    mutating func positiveInt(_ argument: Argument, in d: Directive) -> Int? {
        guard let n = Int(argument.text), n > 0 else {
            error("invalid value \"\(argument.text)\" in \"\(d.name)\"; expected a positive number", at: argument)
            return nil
        }
        return n
    }
}
