import Foundation
import Logging
public import PortcullisPolicy
import PortcullisEngine
import PortcullisGeoIP
import PortcullisRules
import PortcullisCore
import PortcullisTelemetry

/// What a reload did, for the error log, the status file `portcullis reload` reads, and tests.
public struct ReloadReport: Sendable, CustomStringConvertible {
    /// Which attempt this was (1 for the first reload), taken or not.
    public var attempt: Int
    /// The rules running after it: 1 at start, one more for each reload that took.
    public var generation: Int
    /// Empty when the new rules run; else every located error, one line each
    /// (`file:line:column: error: …`), and the old rules still run.
    public var errors: [String]
    /// Listens by address: kept (their sockets stay open), added (bound), removed (closed).
    public var kept: [String] = []
    public var added: [String] = []
    public var removed: [String] = []
    /// Zones and upstream groups whose state the new rules took over.
    public var carried = 0
    /// Main-context settings that changed but take effect only at a restart.
    public var needsRestart: [String] = []

    public var succeeded: Bool { errors.isEmpty }

    public var description: String {
        guard succeeded else {
            return "reload \(attempt) failed, generation \(generation) keeps running: \(errors.count) error\(errors.count == 1 ? "" : "s")"
        }
        return "reload \(attempt): generation \(generation) running; listens kept \(kept.count), added \(added.count), "
            + "removed \(removed.count); \(carried) zone(s) and upstream group(s) kept their state"
    }
}

/// Hot reload (docs/decisions/0014-hot-reload.md): the new file is compiled with the running
/// rules' zones, groups and databases on offer; on any error nothing changes. Then, by listen
/// address, a listen in both files gets the new rules in its box (its sockets are never
/// closed, so no connection is refused), a new listen is bound (a failure undoes the reload),
/// a listen gone is closed. New sessions run on the new rules, live ones finish on theirs.
extension Gateway {
    /// Reloads from the rule file at `path`.
    public func reload(path: String) async -> ReloadReport {
        await reload { carried, opener in RuleLoader.load(path: path, geoip: opener, carrying: carried) }
    }

    /// Reloads from what `compile` returns, given the running rules' state to carry and a
    /// GeoIP opener that reuses the open databases. Reloads run one after the other.
    public func reload(_ compile: @escaping @Sendable (CarriedState, any GeoIPOpener) -> CompileResult) async -> ReloadReport {
        let task = lastReload.withLock { last -> Task<ReloadReport, Never> in
            let previous = last
            let next = Task {
                _ = await previous?.value
                return await self.performReload(compile)
            }
            last = next
            return next
        }
        return await task.value
    }

    private func performReload(_ compile: (CarriedState, any GeoIPOpener) -> CompileResult) async -> ReloadReport {
        let attempt = reloadAttempts.wrappingAdd(1, ordering: .relaxed).newValue
        let old = current.withLock { $0 }
        func refuse(_ errors: [String]) -> ReloadReport {
            for line in errors { errorLog.error("\(line)") }
            let report = ReloadReport(attempt: attempt, generation: old.number, errors: errors)
            errorLog.error("\(report)")
            metrics?.reloaded(succeeded: false, generation: old.number)
            return report
        }
        guard !stopping.load(ordering: .relaxed) else { return refuse(["the gateway is stopping"]) }

        // 1. Compile, with the running zones, groups and databases on offer.
        let result = compile(CarriedState(from: old.snapshot), CarryingOpener(running: old.snapshot.geoipDatabases))
        for warning in result.diagnostics where warning.severity != .error { errorLog.warning("\(warning)") }
        guard let snapshot = result.snapshot else {
            return refuse(result.diagnostics.filter { $0.severity == .error }.map(\.description))
        }
        // 2. Everything that can fail before anything changes: TLS files, log files.
        var contexts: [Int: (TLSServerContext?, TLSClientContext?)] = [:]
        var tlsErrors: [String] = []
        for server in snapshot.servers {
            do throws(TLSSetupError) {
                contexts[server.ordinal] = try Self.tlsContexts(for: server)
            } catch {
                tlsErrors.append("\(error)")
            }
        }
        guard tlsErrors.isEmpty else { return refuse(tlsErrors) }
        let sessionLogger: SessionLogger
        do {
            sessionLogger = try SessionLogger(snapshot: snapshot, pool: logFiles, metrics: metrics)
        } catch {
            return refuse(["\(error)"])
        }
        let lookups = Self.nameResolver(for: snapshot, errorLog: errorLog)
        // The new health checks hold their servers out before any listen can hand the new
        // rules a session (a `mandatory` check's servers start "checking"); started after the swap.
        let oldGroups = Set(Self.groups(of: old.snapshot).map(ObjectIdentifier.init))
        let carriedGroups = Set(Self.groups(of: snapshot).map(ObjectIdentifier.init)).intersection(oldGroups)
        let checker = snapshot.healthChecks.isEmpty ? nil
            : HealthChecker(checks: snapshot.healthChecks, errorLog: errorLog, carried: carriedGroups)

        // 3. Each listen's new runtime, in a kept box or a new one; new listens bound now.
        let oldBoxes = Dictionary(old.boxes.map { ($0.key, $0.box) }, uniquingKeysWith: { first, _ in first })
        var boxes: [(key: String, box: RuntimeBox)] = []
        var keptRuntimes: [(RuntimeBox, ServerRuntime)] = []
        var bound: [(key: String, box: RuntimeBox, endpoint: SocketEndpoint)] = []
        var report = ReloadReport(attempt: attempt, generation: old.number + 1, errors: [])
        report.carried = carriedGroups.count + Self.zones(of: snapshot).intersection(Self.zones(of: old.snapshot)).count
        for server in snapshot.servers {
            let (tlsServer, tlsClient) = contexts[server.ordinal] ?? (nil, nil)
            for listen in server.listens {
                let runtime = ServerRuntime(policy: server, listen: listen, sessionLogger: sessionLogger, errorLog: errorLog,
                                            registry: registry, lookups: lookups, tlsServer: tlsServer, tlsClient: tlsClient)
                let key = listen.description
                if let box = oldBoxes[key] {
                    keptRuntimes.append((box, runtime))
                    boxes.append((key, box))
                    report.kept.append(key)
                    continue
                }
                let box = RuntimeBox(runtime)
                do {
                    bound.append((key, box, try await engine.bind(box)))
                } catch {
                    for (_, box, _) in bound { await engine.unbind(box) }
                    checker?.abandon()
                    return refuse(["\(error)"])
                }
                boxes.append((key, box))
                report.added.append(key)
            }
        }

        // 4. The swap. From here on nothing fails.
        for (box, runtime) in keptRuntimes { box.replace(with: runtime) }
        checker?.start()
        old.healthChecker?.stop()  // (after the new one holds its votes: no server slips back in)
        lookups?.start()
        if let resolver = old.nameResolver { retire(resolver) }
        current.withLock {
            $0 = Generation(number: old.number + 1, snapshot: snapshot, sessionLogger: sessionLogger, boxes: boxes,
                            healthChecker: checker, nameResolver: lookups)
        }
        let keys = Set(boxes.map(\.key))
        for (key, box) in old.boxes where !keys.contains(key) {
            await engine.unbind(box)
            report.removed.append(key)
        }
        addresses.withLock { addresses in
            let known = Dictionary(addresses.map { ($0.key, $0.endpoint) }, uniquingKeysWith: { first, _ in first })
                .merging(bound.map { ($0.key, $0.endpoint) }, uniquingKeysWith: { _, new in new })
            addresses = boxes.compactMap { entry in known[entry.key].map { (entry.key, $0) } }
        }
        scheduleGeoIPReloads(snapshot)
        applyMainSettings(from: old.snapshot.main, to: snapshot.main, report: &report)
        // As nginx's reload, which opens the log files anew: a rotated file is let go.
        logFiles.reopenAll()
        errorLogFile.reopen()
        errorLog.notice("\(report)")
        metrics?.reloaded(succeeded: true, generation: report.generation)
        return report
    }

    /// A replaced resolver answers lookups of sessions begun before the reload until the
    /// longest `resolver_timeout` has passed, then stops.
    private func retire(_ resolver: NameResolver) {
        retiredResolvers.withLock { $0.append(resolver) }
        DispatchQueue.global().asyncAfter(deadline: .now() + .seconds(35)) { [weak self] in
            resolver.stop()
            self?.retiredResolvers.withLock { $0.removeAll { $0 === resolver } }
        }
    }

    /// `worker_shutdown_timeout` applies at once; the rest of the main context (threads,
    /// user, pid file, error log, descriptor limit, metrics_listen) only at a restart, with a warning.
    private func applyMainSettings(from old: MainSettings, to new: MainSettings, report: inout ReloadReport) {
        if old.workerShutdownTimeoutMilliseconds != new.workerShutdownTimeoutMilliseconds,
           let timeout = new.workerShutdownTimeoutMilliseconds {
            drainTimeout.withLock { $0 = .milliseconds(Int64(timeout)) }
        }
        let checks: [(String, Bool)] = [
            ("worker_processes", old.workerProcesses != new.workerProcesses),
            ("worker_rlimit_nofile", old.workerRlimitNofile != new.workerRlimitNofile),
            ("user", old.user != new.user || old.group != new.group),
            ("pid", old.pidFile != new.pidFile),
            ("error_log", old.errorLog != new.errorLog),
            ("metrics_listen", old.metricsListen != new.metricsListen),
        ]
        for (name, changed) in checks where changed {
            report.needsRestart.append(name)
            errorLog.warning("\"\(name)\" changed; it takes effect when portcullis is restarted, the running value stays")
        }
    }

    static func groups(of snapshot: PolicySnapshot) -> [UpstreamGroup] {
        Array(snapshot.upstreams.values) + snapshot.servers.compactMap(\.upstream)
    }

    static func zones(of snapshot: PolicySnapshot) -> Set<ObjectIdentifier> {
        Set(snapshot.servers.flatMap { server in
            server.limits.conn.map { ObjectIdentifier($0.zone) } + server.limits.rate.map { ObjectIdentifier($0.zone) }
        })
    }
}
