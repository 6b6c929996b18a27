import ArgumentParser
#if canImport(Glibc)
import Glibc
#endif
import Foundation
import PortcullisCore
import PortcullisGateway
import PortcullisGeoIP
import PortcullisPolicy
import PortcullisRules
import PortcullisTelemetry
import ServiceLifecycle
import Logging
import NIOCore

@main
struct Portcullis: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "portcullis",
        abstract: "A TCP access-control gateway that reads nginx stream rule files.",
        discussion: """
            Rule files use nginx's stream syntax: see docs/directives.md.
            Signals while running: TERM/INT stop (sessions get up to worker_shutdown_timeout, \
            default 5s, to finish), QUIT stops gracefully (waits for every session unless \
            worker_shutdown_timeout is set), USR1 reopens log files, HUP reloads the rule file \
            (see `portcullis reload`).
            As nginx, `portcullis -s reload|reopen|quit|stop [-c FILE]` signals the running \
            gateway named by the rule file's pid file (reload waits for its answer, as \
            `portcullis reload`).
            """,
        version: "portcullis \(ProductVersion.portcullis) (nginx \(ProductVersion.nginxCompatible) stream decisions)",
        subcommands: [Check.self, Run.self, Reload.self, Signal.self, Explain.self, Audit.self])

    /// nginx's `-s SIGNAL` is an option of the bare command, which ArgumentParser cannot give a
    /// command with subcommands without taking their `-c` too: `portcullis -s reload -c FILE`
    /// becomes the `signal` subcommand here.
    static func main() async {
        var arguments = Array(CommandLine.arguments.dropFirst())
        // (Only before any subcommand: `portcullis -c FILE -s reload` or `portcullis -s reload`.)
        if arguments.first?.hasPrefix("-") == true, let index = arguments.firstIndex(of: "-s") {
            arguments.remove(at: index)
            arguments.insert("signal", at: 0)
        }
        await Self.main(arguments)
    }
}

/// `portcullis -s reload|reopen|quit|stop` (as nginx -s); hidden, reached through `-s`.
struct Signal: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Signal the running gateway named by the rule file's pid file: reload, reopen, quit or stop.",
        shouldDisplay: false)

    @ArgumentParser.Argument(help: "reload, reopen, quit or stop") var signal: String
    @OptionGroup var options: RuleFileOption

    func run() throws {
        switch signal {
        case "reload": try Reload.reload(config: options.config)
        case "reopen": try Reload.send(SIGUSR1, config: options.config)
        case "quit": try Reload.send(SIGQUIT, config: options.config)
        case "stop": try Reload.send(SIGTERM, config: options.config)
        default: throw ValidationError("invalid option: \"-s \(signal)\"; expected reload, reopen, quit or stop")
        }
    }
}

struct Reload: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Reload the running gateway's rules (as nginx -s reload), and say whether it took them.",
        discussion: """
            Checks the rule file first (as check: a file with errors is not sent), then sends \
            HUP to the process in the rule file's pid file and waits for its answer in the \
            status file beside it (PID_FILE.reload). Exits 0 when the gateway runs the new rules, \
            1 when it refused them (its errors are printed; the old rules keep running) or \
            could not be reached.
            """)

    @OptionGroup var options: RuleFileOption
    @Option(help: "Seconds to wait for the gateway's answer.") var timeout: Double = 30

    func run() throws { try Self.reload(config: options.config, timeout: timeout) }

    static func fail(_ message: String) -> ExitCode {
        FileHandle.standardError.write(Data("portcullis: [error] \(message)\n".utf8))
        return ExitCode(1)
    }

    /// The compiled rules, and the process in their pid file, alive.
    static func runningGateway(config: String) throws -> (snapshot: PolicySnapshot, pid: pid_t) {
        let result = RuleLoader.load(path: config, geoip: MaxMindOpener())
        guard let snapshot = result.snapshot else {
            FileHandle.standardError.write(Data((result.rendered + "\n").utf8))
            throw fail("\(config) has errors; the running gateway was not signalled")
        }
        guard let pidFile = snapshot.main.pidFile else {
            throw fail("\(config) has no \"pid\" directive, so the running gateway cannot be found; add e.g. \"pid /run/portcullis/portcullis.pid;\"")
        }
        guard let text = try? String(contentsOfFile: pidFile, encoding: .utf8),
              let pid = pid_t(text.trimmingCharacters(in: .whitespacesAndNewlines)), pid > 0 else {
            throw fail("cannot read the pid file \"\(pidFile)\": is portcullis running?")
        }
        guard kill(pid, 0) == 0 else {
            throw fail("no process \(pid) (from \"\(pidFile)\"): \(String(cString: strerror(errno)))")
        }
        return (snapshot, pid)
    }

    static func send(_ signal: Int32, config: String) throws {
        let (_, pid) = try runningGateway(config: config)
        guard kill(pid, signal) == 0 else { throw fail("kill(\(pid)) failed: \(String(cString: strerror(errno)))") }
    }

    static func reload(config: String, timeout: Double = 30) throws {
        let (snapshot, pid) = try runningGateway(config: config)
        // As check: certificates that do not load are said here, not only in the gateway's log.
        let tlsErrors = Gateway.checkTLS(snapshot)
        if !tlsErrors.isEmpty {
            for error in tlsErrors { FileHandle.standardError.write(Data("\(error)\n".utf8)) }
            throw fail("\(config) has TLS errors; the running gateway was not signalled")
        }
        let statusPath = ProcessSetup.reloadStatusPath(snapshot.main)!
        let before = ProcessSetup.readReloadStatus(statusPath)?.attempt ?? 0
        guard kill(pid, SIGHUP) == 0 else { throw fail("kill(\(pid), HUP) failed: \(String(cString: strerror(errno)))") }
        let deadline = Date().addingTimeInterval(timeout)
        while Date() < deadline {
            if let status = ProcessSetup.readReloadStatus(statusPath), status.attempt > before {
                if status.succeeded {
                    print("portcullis: reloaded \(config): generation \(status.generation) is running (pid \(pid))")
                    return
                }
                for line in status.errors { FileHandle.standardError.write(Data("\(line)\n".utf8)) }
                throw fail("the gateway (pid \(pid)) refused the new rules; generation \(status.generation) keeps running")
            }
            usleep(50_000)
        }
        throw fail("no answer from the gateway (pid \(pid)) in \(Int(timeout)) s; see its error log")
    }
}

struct RuleFileOption: ParsableArguments {
    @Option(name: [.customShort("c"), .long], help: "The rule file to read.")
    var config = "rules/gateway.conf"
}

struct Check: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Check a rule file and report every problem (like nginx -t).",
        discussion: "Exits 0 with a one-line summary if the file compiles, 1 with every diagnostic if not.")

    @OptionGroup var options: RuleFileOption

    func run() throws {
        let result = RuleLoader.load(path: options.config, geoip: MaxMindOpener())
        if !result.diagnostics.isEmpty {
            FileHandle.standardError.write(Data((result.rendered + "\n").utf8))
        }
        guard let snapshot = result.snapshot else {
            let count = result.diagnostics.filter { $0.severity == .error }.count
            FileHandle.standardError.write(Data("portcullis: \(options.config): \(count) error\(count == 1 ? "" : "s"), test failed\n".utf8))
            throw ExitCode(1)
        }
        // As nginx -t: certificates and keys are loaded, OpenSSL takes the settings.
        let tlsErrors = Gateway.checkTLS(snapshot)
        if !tlsErrors.isEmpty {
            for error in tlsErrors { FileHandle.standardError.write(Data("\(error)\n".utf8)) }
            FileHandle.standardError.write(Data("portcullis: \(options.config): \(tlsErrors.count) TLS error\(tlsErrors.count == 1 ? "" : "s"), test failed\n".utf8))
            throw ExitCode(1)
        }
        let listens = snapshot.servers.reduce(0) { $0 + $1.listens.count }
        let rules = snapshot.servers.reduce(0) { $0 + $1.access.rules.count }
        print("portcullis: \(options.config): syntax is ok, test is successful "
            + "(\(snapshot.servers.count) server\(snapshot.servers.count == 1 ? "" : "s"), \(listens) listen, \(rules) access rules)")
    }
}

struct Run: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Run the gateway in the foreground on a rule file.",
        discussion: "Refuses to start (exit 1) if the rule file has errors or a listen address cannot be bound.")

    @OptionGroup var options: RuleFileOption

    func run() async throws {
        SignalHandlers.unblockHandledSignals()
        let snapshot = loadRules()
        // Loading a large file (a million-line geo block) frees far more than the snapshot
        // keeps: hand those pages back to the system rather than hold them for the process's life.
        _ = malloc_trim(0)
        let gateway: Gateway
        do {
            try ProcessSetup.applyLimits(snapshot.main)
            gateway = try Gateway(snapshot: snapshot)
            try await gateway.start()
            try ProcessSetup.writePidFile(snapshot.main)  // as root, like nginx's master
            ProcessSetup.writeReloadStatus(snapshot.main, attempt: 0, generation: 1, errors: [], log: gateway.errorLog)
            try ProcessSetup.dropPrivileges(snapshot.main, log: gateway.errorLog)
        } catch {
            fail("\(error)")
        }
        defer { ProcessSetup.removePidFile(snapshot.main) }

        let group = ServiceGroup(configuration: .init(
            services: [.init(service: gateway)],
            gracefulShutdownSignals: [],
            cancellationSignals: [],
            logger: Logger(label: "portcullis.lifecycle", factory: { _ in SwiftLogNoOpLogHandler() })))
        let signals = SignalHandlers(gateway: gateway, group: group, config: options.config, main: snapshot.main)
        signals.install()
        try await group.run()
        signals.cancel()
    }

    /// The compiled rules; the parse tree and file texts are released on return.
    private func loadRules() -> PolicySnapshot {
        let result = RuleLoader.load(path: options.config, geoip: MaxMindOpener())
        if !result.diagnostics.isEmpty {
            FileHandle.standardError.write(Data((result.rendered + "\n").utf8))
        }
        guard let snapshot = result.snapshot else {
            fail("\(options.config) has errors; not starting")
        }
        return snapshot
    }

    private func fail(_ message: String) -> Never {
        FileHandle.standardError.write(Data("portcullis: [emerg] \(message)\n".utf8))
        Foundation.exit(1)
    }
}

/// nginx's signals: TERM/INT stop (short drain), QUIT stops gracefully, USR1 reopens logs.
final class SignalHandlers: @unchecked Sendable {
    private var sources: [any DispatchSourceSignal] = []
    private let gateway: Gateway
    private let group: ServiceGroup
    private let queue = DispatchQueue(label: "portcullis.signals")
    /// The rule file HUP reloads, and the settings the process started with (the status file).
    private let config: String
    private let main: MainSettings

    init(gateway: Gateway, group: ServiceGroup, config: String, main: MainSettings) {
        self.gateway = gateway
        self.group = group
        self.config = config
        self.main = main
    }

    /// Like nginx at start: a blocked mask inherited from the parent must not silence us.
    /// Called before any thread exists, so every thread inherits the unblocked mask.
    static func unblockHandledSignals() {
        var handled = sigset_t()
        sigemptyset(&handled)
        for signal in [SIGTERM, SIGINT, SIGQUIT, SIGUSR1, SIGUSR2, SIGHUP] { sigaddset(&handled, signal) }
        pthread_sigmask(SIG_UNBLOCK, &handled, nil)
    }

    func install() {
        on(SIGTERM) { [gateway, group] in
            gateway.setDrainTimeout(.seconds(5))
            Task { await group.triggerGracefulShutdown() }
        }
        on(SIGINT) { [gateway, group] in
            gateway.setDrainTimeout(.seconds(5))
            Task { await group.triggerGracefulShutdown() }
        }
        on(SIGQUIT) { [gateway, group] in
            gateway.setDrainTimeout(nil)
            Task { await group.triggerGracefulShutdown() }
        }
        on(SIGUSR1) { [gateway] in gateway.reopenLogs() }
        // HUP: the rule file again (certificates included), as nginx's reload; the status file
        // tells `portcullis reload` how it went.
        on(SIGHUP) { [gateway, config, main] in
            gateway.errorLog.notice("SIGHUP received, reloading \(config)")
            Task {
                let report = await gateway.reload(path: config)
                ProcessSetup.writeReloadStatus(main, attempt: report.attempt, generation: report.generation,
                                               errors: report.errors, log: gateway.errorLog)
            }
        }
        on(SIGUSR2) { [gateway] in gateway.errorLog.warning("SIGUSR2 received: binary upgrade is not supported, ignored") }
    }

    private func on(_ signal: Int32, _ handler: @escaping @Sendable () -> Void) {
        Glibc.signal(signal, SIG_IGN)
        let source = DispatchSource.makeSignalSource(signal: signal, queue: queue)
        source.setEventHandler(handler: handler)
        source.resume()
        sources.append(source)
    }

    func cancel() { sources.forEach { $0.cancel() } }
}

#if os(Linux)
/// glibc's `malloc_trim` (in <malloc.h>, which the Glibc module does not export).
@_silgen_name("malloc_trim")
func malloc_trim(_ pad: Int) -> Int32
#else
func malloc_trim(_ pad: Int) -> Int32 { 0 }
#endif

struct Explain: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Say what the rules decide for one client, phase by phase (no other gateway has this).",
        discussion: """
            Runs the session machine the gateway runs, without connecting anything: realip, \
            preread or the TLS handshake (with --sni), access, limit_conn, limit_rate, and the \
            upstream it would connect to, with every geo/map/geoip2/set variable evaluated. \
            Limit zones start empty, as after a start. Exits 0 if the client would be let \
            through (or answered by return), 2 if refused, 1 for a rule file with errors.
            """)

    @OptionGroup var options: RuleFileOption
    @ArgumentParser.Argument(help: "The client: ADDRESS or ADDRESS:PORT ([V6]:PORT).") var client: String
    @Option(help: "The listen it connects to: ADDRESS:PORT or PORT as written in a listen (default: the first listen).")
    var server: String?
    @Option(help: "The server name its ClientHello or handshake sends.") var sni: String?
    @Option(name: .customLong("proxy-from"), help: "The TCP peer that sent a PROXY header naming the client (proxy_protocol listens).")
    var proxyFrom: String?
    @Flag(help: "Print JSON, for scripts.") var json = false

    func run() throws {
        let result = RuleLoader.load(path: options.config, geoip: MaxMindOpener())
        guard let snapshot = result.snapshot else {
            FileHandle.standardError.write(Data((result.rendered + "\n").utf8))
            throw ExitCode(1)
        }
        // ADDRESS (port 0) or ADDRESS:PORT, as proxy_bind reads addresses.
        guard let clientEndpoint = SocketEndpoint.local(client) else { throw ValidationError("not an address: \(client)") }
        let peer = try proxyFrom.map { text -> SocketEndpoint in
            guard let endpoint = SocketEndpoint.local(text) else { throw ValidationError("not an address: \(text)") }
            return endpoint
        }
        let pairs = snapshot.servers.flatMap { server in server.listens.map { (server, $0) } }
        let chosen = server.map { wanted in
            pairs.first { _, listen in
                listen.endpoint.description == wanted || listen.description == wanted || String(listen.port) == wanted
            }
        } ?? pairs.first
        guard let (policy, listen) = chosen else {
            throw ValidationError("no listen \(server ?? "") in \(options.config); the listens are: "
                + pairs.map { $0.1.description }.joined(separator: ", "))
        }
        let explanation = Explainer.explain(policy, listen: listen, client: clientEndpoint, peer: peer, serverName: sni,
                                            wallClock: Date().timeIntervalSince1970)
        print(json ? Self.json(explanation) : Self.text(explanation))
        if explanation.outcome.refused { throw ExitCode(2) }
    }

    static func value(_ bytes: [UInt8]?) -> String {
        bytes.map { "\"" + String(decoding: $0, as: UTF8.self) + "\"" } ?? "(not found)"
    }

    static func text(_ e: Explanation) -> String {
        var lines = ["client \(e.client.hostText) (peer \(e.peer)) on listen \(e.listen) (\(e.listenLocation))"]
        for step in e.steps {
            let rule = step.rule.map { "  [\($0.position) \($0.text)]" } ?? ""
            lines.append("  " + step.phase.padding(toLength: 18, withPad: " ", startingAt: 0) + step.text + rule)
        }
        if !e.variables.isEmpty {
            lines.append("  variables")
            for (name, bytes) in e.variables { lines.append("    $\(name) = \(value(bytes))") }
        }
        for line in e.errorLog { lines.append("  error log: \(line)") }
        let outcome = e.outcome
        var verdict = "  verdict           \(outcome.status.rawValue)"
        if outcome.refused {
            verdict += ", refused in \(outcome.phase.rawValue): \(outcome.cause.reason ?? "")"
            if let rule = outcome.rule { verdict += " [\(rule.position) \(rule.text)]" }
        } else if let upstream = e.upstream {
            verdict += ", let through to \(upstream)"
        } else {
            verdict += ", let through"
        }
        lines.append(verdict)
        return lines.joined(separator: "\n")
    }

    static func json(_ e: Explanation) -> String {
        func rule(_ reference: RuleReference?) -> Any {
            reference.map { ["file": $0.file, "line": $0.line, "text": $0.text] as [String: Any] } ?? NSNull()
        }
        var variables: [String: Any] = [:]
        for (name, value) in e.variables { variables[name] = value.map { String(decoding: $0, as: UTF8.self) } ?? NSNull() }
        let object: [String: Any] = [
            "client": e.client.description, "peer": e.peer.description, "listen": e.listen,
            "steps": e.steps.map { ["phase": $0.phase, "text": $0.text, "rule": rule($0.rule)] as [String: Any] },
            "variables": variables,
            "status": e.outcome.status.rawValue, "phase": e.outcome.phase.rawValue, "refused": e.outcome.refused,
            "reason": e.outcome.cause.reason ?? NSNull(), "rule": rule(e.outcome.rule),
            "upstream": e.upstream ?? NSNull(), "error_log": e.errorLog,
        ]
        let data = (try? JSONSerialization.data(withJSONObject: object, options: [.sortedKeys])) ?? Data()
        return String(decoding: data, as: UTF8.self)
    }
}

struct Audit: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Summarise the JSON audit log: who was refused, by which rule, from where, when.",
        discussion: """
            Reads the files given (plain or gzip: rotated files too), or, without files, the \
            audit_log files of the rule file (-c) with their rotated siblings (FILE.1, FILE.2.gz, …). \
            --by country looks clients up in --geoip (default: the rule file's first geoip2 database).
            """)

    @OptionGroup var options: RuleFileOption
    @ArgumentParser.Argument(help: "Audit log files (default: the rule file's).") var files: [String] = []
    @Option(help: "Only refusals since then: an ISO 8601 time, or an age such as 30m, 2h, 7d.") var since: String?
    @Option(help: "Group by client, rule, country, phase or server.") var by: String = "client"
    @Option(help: "How many groups to show.") var top: Int = 10
    @Option(help: "A MaxMind database for --by country.") var geoip: String?
    @Flag(help: "Print JSON, for scripts.") var json = false

    func run() throws {
        guard let grouping = AuditSummary.Grouping(rawValue: by) else {
            throw ValidationError("--by must be one of \(AuditSummary.Grouping.allCases.map(\.rawValue).joined(separator: ", "))")
        }
        let now = Date().timeIntervalSince1970
        let start = try since.map { text -> Double in
            guard let time = AuditSummary.since(text, now: now) else { throw ValidationError("--since: not a time or an age: \(text)") }
            return time
        }
        var paths = files
        var databasePath = geoip
        if paths.isEmpty || (grouping == .country && databasePath == nil) {
            let result = RuleLoader.load(path: options.config, geoip: MaxMindOpener())
            if let snapshot = result.snapshot {
                if paths.isEmpty { paths = Self.auditFiles(snapshot) }
                if databasePath == nil {
                    databasePath = snapshot.geoipDatabases.compactMap { ($0 as? ReloadableGeoIPDatabase)?.path }.first
                }
            } else if paths.isEmpty {
                FileHandle.standardError.write(Data((result.rendered + "\n").utf8))
                throw ExitCode(1)
            }
        }
        var summary = AuditSummary()
        for path in paths {
            guard let data = FileManager.default.contents(atPath: path) else {
                FileHandle.standardError.write(Data("portcullis: cannot read \(path)\n".utf8))
                continue
            }
            if !summary.add(file: [UInt8](data)) {
                FileHandle.standardError.write(Data("portcullis: \(path) is not a whole gzip file; skipped\n".utf8))
            }
        }
        var lookup: (String) -> String? = { _ in nil }
        if grouping == .country {
            guard let databasePath, let database = try? MaxMindDatabase(path: databasePath) else {
                throw ValidationError("--by country needs a readable --geoip database")
            }
            let countryPath = GeoPath(["country", "iso_code"])
            lookup = { client in
                guard let address = IPAddress(client), case .string(let code)? = database.lookup(address, path: countryPath) else { return nil }
                return code
            }
        }
        let rows = summary.rows(by: grouping, since: start, top: top, country: lookup)
        let total = summary.count(since: start)
        if json {
            let object: [String: Any] = [
                "by": grouping.rawValue, "refusals": total, "unreadable_lines": summary.unreadable,
                "groups": rows.map { ["key": $0.key, "count": $0.count, "dry_runs": $0.dryRuns,
                                      "first": Self.iso($0.first), "last": Self.iso($0.last)] as [String: Any] },
            ]
            let data = (try? JSONSerialization.data(withJSONObject: object, options: [.sortedKeys])) ?? Data()
            print(String(decoding: data, as: UTF8.self))
            return
        }
        print("\(total) refusal\(total == 1 ? "" : "s") in \(paths.count) file\(paths.count == 1 ? "" : "s")"
            + (since.map { " since \($0)" } ?? "") + ", by \(grouping.rawValue)"
            + (summary.unreadable > 0 ? " (\(summary.unreadable) unreadable lines skipped)" : ""))
        for row in rows {
            let dry = row.dryRuns > 0 ? " (\(row.dryRuns) dry run)" : ""
            print(String(row.count).leftPadded(to: 8) + "  " + row.key + dry + "  [\(Self.iso(row.first)) … \(Self.iso(row.last))]")
        }
    }

    /// The rule file's audit logs and their rotated siblings (FILE.1, FILE.2.gz, …).
    static func auditFiles(_ snapshot: PolicySnapshot) -> [String] {
        var paths = Set<String>()
        if let log = snapshot.auditLog { paths.insert(log.path) }
        for server in snapshot.servers { if let log = server.auditLog { paths.insert(log.path) } }
        var files: [String] = []
        for path in paths.sorted() {
            let url = URL(fileURLWithPath: path)
            let folder = url.deletingLastPathComponent().path
            let name = url.lastPathComponent
            let siblings = ((try? FileManager.default.contentsOfDirectory(atPath: folder)) ?? [])
                .filter { $0 == name || $0.hasPrefix(name + ".") }.sorted()
            files += siblings.map { folder + "/" + $0 }
        }
        return files
    }

    nonisolated(unsafe) static let formatter = ISO8601DateFormatter()  // thread-safe for formatting

    static func iso(_ time: Double) -> String { formatter.string(from: Date(timeIntervalSince1970: time)) }
}

extension String {
    func leftPadded(to width: Int) -> String { String(repeating: " ", count: max(0, width - count)) + self }
}
