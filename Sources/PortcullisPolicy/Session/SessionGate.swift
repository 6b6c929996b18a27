internal import PortcullisCore
internal import PortcullisRules

/// The access and limit phases, the same for TCP and UDP: access (address and variable rules),
/// then `limit_conn`, then `limit_rate`. Pure: it sets the session's outcome when it refuses
/// and holds what the session took (limit slots, buckets); the session machine runs it, says
/// what it reports, and gives everything back once, when the session ends.
public struct SessionGate: Sendable {
    /// What a decision wants said, in nginx's words where nginx has them.
    public enum Event: Sendable {
        /// An error-log line at the given level.
        case log(ErrorLogSpec.Level, String)
        /// A refusal a dry run did not carry out: the audit line it would have written.
        case dryRun(SessionRecord)
    }

    private var connSlots: [(zone: LimitConnZone, key: [UInt8])] = []
    /// Bandwidth buckets of `limit_rate` zones this session's key shares.
    public private(set) var sharedBuckets: [SharedBucket] = []
    /// `proxy_upload_rate` / `proxy_download_rate`: this session's own buckets.
    private var uploadBucket: TokenBucket?
    private var downloadBucket: TokenBucket?

    public init() {}

    // MARK: The sequence

    /// access → limit_conn → limit_rate, for a session's first moment (TCP: the client is
    /// connected, and its PROXY header read; UDP: its first datagram). False when the session
    /// is refused: its outcome then says why, and `report` has been told what to log.
    public mutating func admit(_ policy: ServerPolicy, record: inout SessionRecord, now: UInt64, wallClock: Double,
                               report: (Event) -> Void) -> Bool {
        let before = record.outcome
        if !Self.access(policy, record: &record) {
            guard policy.limits.accessDryRun else {
                report(.log(.error, "access forbidden by rule, \(Self.place(record))"))
                return false
            }
            // access_dry_run: the refusal is said and audited, and not carried out.
            var wouldBe = record
            wouldBe.outcome.enforcement = .dryRun
            wouldBe.endTime = wallClock
            report(.log(.error, "access forbidden by rule, dry run, \(Self.place(record))"))
            report(.dryRun(wouldBe))
            record.outcome = before
            record.decidingVariable = nil
        }
        return limits(policy, record: &record, now: now, wallClock: wallClock, report: report)
    }

    /// "client: …, server: …", the end of nginx's error-log lines (with "udp " for UDP).
    public static func place(_ record: SessionRecord) -> String {
        "\(record.transport == .udp ? "udp " : "")client: \(record.client.hostText), server: \(record.server)"
    }

    // MARK: Access

    /// access: first match over address and variable rules. On refusal the record says 403,
    /// the rule, and the variable that decided.
    public static func access(_ policy: ServerPolicy, record: inout SessionRecord) -> Bool {
        let access = policy.access
        let verdict: AccessVerdict
        if access.hasVariableRules {
            // Variables are read lazily, only for variable rules that precede the address match.
            let current = record
            verdict = access.evaluate(current.client) { VariableRenderer.value(of: $0, in: current, host: .current) }
        } else {
            verdict = access.evaluate(record.client)
        }
        guard !verdict.allowed else { return true }
        record.outcome = SessionOutcome(phase: .access, cause: .accessDenied, rule: verdict.rule?.reference)
        if let rule = verdict.rule, let name = rule.variableName {
            record.decidingVariable = (name, verdict.variableValue ?? [])
        }
        return false
    }

    // MARK: Limits

    /// limit_conn, then limit_rate: true if the session may go on (the record then says why
    /// not: 503, the phase, the rule, the zone and key). `now`: monotonic nanoseconds;
    /// `wallClock`: seconds since 1970. `report` is told what to log.
    public mutating func limits(_ policy: ServerPolicy, record: inout SessionRecord, now: UInt64, wallClock: Double,
                                report: (Event) -> Void) -> Bool {
        let limits = policy.limits
        guard !limits.conn.isEmpty || !limits.rate.isEmpty || limits.throttles else { return true }
        for rule in limits.conn {
            let zone = rule.zone
            guard let key = Self.key(zone.key, zone: zone.name, record: record, report: report) else { continue }
            let outcome = zone.acquire(key, limit: rule.limit)
            if outcome == .acquired {
                connSlots.append((zone, key))
                record.limitConnStatus = "PASSED"
                continue
            }
            let decision = LimitDecision(zone: zone.name, key: key, limit: String(rule.limit))
            let cause: SessionOutcome.Cause
            if outcome == .zoneFull {
                cause = .connectionZoneFull(zone: zone.name)
                // nginx: "[crit] ngx_slab_alloc() failed: no memory in limit_conn_zone"; at most once a second.
                if zone.shouldReportFull(now: Int64(wallClock.rounded(.down))) {
                    report(.log(.crit, "no memory in limit_conn_zone \"\(zone.name)\": the part of the zone this key falls in is full (the zone holds up to \(zone.capacity) keys in 16 parts, \(zone.size) bytes); new keys there are refused, \(Self.place(record))"))
                }
            } else {
                cause = .connectionLimit(zone: zone.name)
                report(.log(limits.connLogLevel, "limiting connections\(limits.connDryRun ? ", dry run," : "") by zone \"\(zone.name)\", \(Self.place(record))"))
            }
            if limits.connDryRun {
                // nginx: a dry-run rejection gives back the slots taken so far and stops checking
                // limit_conn (the session goes on, counted in no zone).
                release()
                record.limitConnStatus = "REJECTED_DRY_RUN"
                report(.dryRun(Self.wouldBe(record, phase: .limitConn, rule: rule.reference, decision: decision, cause: cause, at: wallClock)))
                break
            }
            // Earlier zones' slots go back now, as nginx's rollback, not when the session ends.
            release()
            record.limitConnStatus = "REJECTED"
            Self.refuse(&record, phase: .limitConn, rule: rule.reference, decision: decision, cause: cause)
            return false
        }
        for rule in limits.rate {
            let zone = rule.zone
            guard let key = Self.key(zone.key, zone: zone.name, record: record, report: report) else { continue }
            switch zone.kind {
            case .bandwidth:
                // A dry run refuses nothing; for a bandwidth zone that means it does not throttle.
                if !limits.rateDryRun { sharedBuckets.append(zone.bucket(for: key, now: now)) }
            case .sessions:
                guard !zone.admit(key, now: now) else { continue }
                let decision = LimitDecision(zone: zone.name, key: key, limit: "\(zone.rateText) burst=\(Int(zone.burst))")
                let cause = SessionOutcome.Cause.sessionRateLimit(zone: zone.name)
                report(.log(.error, "\(cause.reason ?? "")\(limits.rateDryRun ? ", dry run" : ""), \(Self.place(record))"))
                if limits.rateDryRun {
                    report(.dryRun(Self.wouldBe(record, phase: .limitRate, rule: rule.reference, decision: decision, cause: cause, at: wallClock)))
                    continue
                }
                Self.refuse(&record, phase: .limitRate, rule: rule.reference, decision: decision, cause: cause)
                return false
            }
        }
        let upload = Self.rate(limits.uploadRate, limits.uploadRateTemplate, "proxy_upload_rate", record: record, report: report)
        if upload > 0 { uploadBucket = TokenBucket(rate: Double(upload), burst: Double(upload), now: now) }
        let download = Self.rate(limits.downloadRate, limits.downloadRateTemplate, "proxy_download_rate", record: record, report: report)
        if download > 0 { downloadBucket = TokenBucket(rate: Double(download), burst: Double(download), now: now) }
        return true
    }

    /// Gives back every `limit_conn` slot; call once, when the session ends.
    public mutating func release() {
        for slot in connSlots { slot.zone.release(slot.key) }
        connSlots = []
    }

    /// A zone's key for this session; nil when it is not counted: empty (as nginx), or longer
    /// than 255 bytes (nginx refuses to count it and says so).
    /// A per-connection rate: the fixed one, or its variables' value as a size (empty: no
    /// limit; not a size: no limit and nginx's error line, `invalid size "…"`).
    private static func rate(_ fixed: Int, _ template: LogTemplate?, _ directive: String, record: SessionRecord,
                             report: (Event) -> Void) -> Int {
        guard let template else { return fixed }
        let text = String(decoding: template.bytes(for: record), as: UTF8.self)
        guard !text.isEmpty else { return 0 }
        guard let bytes = Units.size(text) else {
            report(.log(.error, "invalid size \"\(text)\" in \"\(directive)\", not limited, \(Self.place(record))"))
            return 0
        }
        return bytes
    }

    private static func key(_ template: LogTemplate, zone: String, record: SessionRecord,
                            report: (Event) -> Void) -> [UInt8]? {
        let key = template.bytes(for: record)
        guard !key.isEmpty else { return nil }
        guard key.count <= 255 else {
            report(.log(.error, "the value of the key of zone \"\(zone)\" is more than 255 bytes, not counted, \(Self.place(record))"))
            return nil
        }
        return key
    }

    private static func refuse(_ record: inout SessionRecord, phase: Phase, rule: RuleReference, decision: LimitDecision,
                               cause: SessionOutcome.Cause, enforcement: SessionOutcome.Enforcement = .enforced) {
        record.outcome = SessionOutcome(phase: phase, cause: cause, rule: rule, enforcement: enforcement)
        record.limit = decision
    }

    /// The record a refusal a dry run did not carry out would have ended in, for its audit line.
    private static func wouldBe(_ record: SessionRecord, phase: Phase, rule: RuleReference, decision: LimitDecision,
                                cause: SessionOutcome.Cause, at time: Double) -> SessionRecord {
        var wouldBe = record
        refuse(&wouldBe, phase: phase, rule: rule, decision: decision, cause: cause, enforcement: .dryRun)
        wouldBe.endTime = time
        return wouldBe
    }

    // MARK: Bandwidth

    public enum Direction: Sendable { case fromClient, fromUpstream }

    public var throttles: Bool { uploadBucket != nil || downloadBucket != nil || !sharedBuckets.isEmpty }

    /// Nanoseconds to wait before reading in `direction`; 0 = now. TCP waits, and so takes a
    /// turn on shared buckets; UDP (`reserve: false`) drops the datagram instead of waiting.
    public mutating func delay(_ direction: Direction, now: UInt64, reserve: Bool = true) -> UInt64 {
        guard throttles else { return 0 }
        var wait: UInt64 = 0
        if direction == .fromClient, uploadBucket != nil { wait = uploadBucket!.wait(now: now) }
        if direction == .fromUpstream, downloadBucket != nil { wait = downloadBucket!.wait(now: now) }
        for bucket in sharedBuckets { wait = max(wait, bucket.wait(now: now, reserve: reserve)) }
        return wait
    }

    /// Counts `bytes` moved in `direction` against every bucket that applies.
    public mutating func spend(_ bytes: Int, _ direction: Direction, now: UInt64) {
        guard throttles else { return }
        if direction == .fromClient { uploadBucket?.spend(Double(bytes), now: now) } else { downloadBucket?.spend(Double(bytes), now: now) }
        for bucket in sharedBuckets { bucket.spend(bytes, now: now) }
    }
}
