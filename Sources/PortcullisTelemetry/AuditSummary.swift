import Foundation

/// `portcullis audit`: counts of the JSON audit log's refusals (rotated and gzipped files too),
/// grouped the way an operator asks after an incident — by client, rule, country, phase or
/// server — since a time, the top N first.
public struct AuditSummary: Sendable {
    public enum Grouping: String, Sendable, CaseIterable {
        case client, rule, country, phase, server
    }

    /// One audit line, the fields the summaries read.
    public struct Entry: Sendable, Equatable {
        public var time: Double
        public var client: String
        public var rule: String
        public var phase: String
        public var server: String
        public var dryRun: Bool
    }

    public private(set) var entries: [Entry] = []
    /// Lines that are not audit JSON (a line cut by a crash, another file's text).
    public private(set) var unreadable = 0

    public init() {}

    /// Adds a file's lines (gzip if it starts with gzip's magic bytes).
    public mutating func add(file bytes: [UInt8]) -> Bool {
        var text = bytes
        if bytes.count >= 2 && bytes[0] == 0x1F && bytes[1] == 0x8B {
            guard let plain = Gzip.decompress(bytes) else { return false }
            text = plain
        }
        for line in text.split(separator: UInt8(ascii: "\n")) where !line.isEmpty {
            if let entry = Self.parse(Array(line)) { entries.append(entry) } else { unreadable += 1 }
        }
        return true
    }

    static func parse(_ line: [UInt8]) -> Entry? {
        guard let object = try? JSONSerialization.jsonObject(with: Data(line)) as? [String: Any],
              let timeText = object["time"] as? String, let time = Self.time(timeText),
              let client = object["client"] as? String else { return nil }
        let rule = (object["rule"] as? [String: Any]).map { rule in
            "\(rule["at"] as? String ?? "?") \(rule["text"] as? String ?? "")"
        } ?? "(no rule: \(object["reason"] as? String ?? "refused"))"
        return Entry(time: time, client: client, rule: rule, phase: object["phase"] as? String ?? "?",
                     server: object["listener"] as? String ?? object["server"] as? String ?? "?",
                     dryRun: object["dry_run"] as? Bool ?? false)
    }

    /// The audit log's time, `2026-12-07T12:27:10.265+00:00`, as seconds since 1970 (one pair of
    /// formatters for every line: making one costs more than parsing with it).
    static func time(_ text: String) -> Double? {
        (withFraction.date(from: text) ?? withoutFraction.date(from: text))?.timeIntervalSince1970
    }

    // ISO8601DateFormatter is thread-safe once configured.
    nonisolated(unsafe) private static let withFraction: ISO8601DateFormatter = {
        let formatter = ISO8601DateFormatter()
        formatter.formatOptions = [.withInternetDateTime, .withFractionalSeconds]
        return formatter
    }()
    nonisolated(unsafe) private static let withoutFraction = ISO8601DateFormatter()

    /// `--since`: an ISO 8601 time, or an age (`90s`, `30m`, `2h`, `7d`) before `now`.
    public static func since(_ text: String, now: Double) -> Double? {
        if let time = time(text) { return time }
        let units: [Character: Double] = ["s": 1, "m": 60, "h": 3600, "d": 86_400]
        guard let unit = text.last, let scale = units[unit], let number = Double(text.dropLast()), number >= 0 else { return nil }
        return now - number * scale
    }

    public struct Row: Sendable, Equatable {
        public var key: String
        public var count: Int
        public var dryRuns: Int
        public var first: Double
        public var last: Double
    }

    /// The groups, most refusals first (ties by key), `top` of them; `country` maps a client
    /// address to its country code (nil: unknown).
    public func rows(by grouping: Grouping, since: Double? = nil, top: Int = 10,
                     country: (String) -> String? = { _ in nil }) -> [Row] {
        var rows: [String: Row] = [:]
        for entry in entries where since.map({ entry.time >= $0 }) ?? true {
            let key: String = switch grouping {
            case .client: entry.client
            case .rule: entry.rule
            case .country: country(entry.client) ?? "(unknown)"
            case .phase: entry.phase
            case .server: entry.server
            }
            var row = rows[key] ?? Row(key: key, count: 0, dryRuns: 0, first: entry.time, last: entry.time)
            row.count += 1
            if entry.dryRun { row.dryRuns += 1 }
            row.first = min(row.first, entry.time)
            row.last = max(row.last, entry.time)
            rows[key] = row
        }
        return Array(rows.values.sorted { $0.count != $1.count ? $0.count > $1.count : $0.key < $1.key }.prefix(max(top, 0)))
    }

    /// How many entries `since` keeps.
    public func count(since: Double?) -> Int {
        entries.filter { entry in since.map { entry.time >= $0 } ?? true }.count
    }
}
