import Synchronization
public import PortcullisCore

/// One problem found in a rule file, located and rendered like a compiler message.
public struct Diagnostic: Sendable, Equatable, CustomStringConvertible {
    public enum Severity: String, Sendable, Comparable {
        case error, warning, note

        private var rank: Int { self == .error ? 2 : self == .warning ? 1 : 0 }
        public static func < (a: Severity, b: Severity) -> Bool { a.rank < b.rank }
    }

    public var severity: Severity
    public var message: String
    public var location: SourceLocation?
    /// How many characters the caret line underlines (at least one caret).
    public var length: Int

    public init(_ severity: Severity, _ message: String, at location: SourceLocation?, length: Int = 1) {
        self.severity = severity
        self.message = message
        self.location = location
        self.length = max(1, length)
    }

    /// The first line of the rendering: `file:line:column: severity: message`.
    public var description: String {
        if let location { return "\(location): \(severity.rawValue): \(message)" }
        return "\(severity.rawValue): \(message)"
    }
}

/// Collects diagnostics across lexing, parsing and compiling, so that one run reports them all.
public struct DiagnosticBag: Sendable {
    public private(set) var all: [Diagnostic] = []
    public init() {}

    public mutating func error(_ message: String, at location: SourceLocation?, length: Int = 1) {
        all.append(Diagnostic(.error, message, at: location, length: length))
    }

    public mutating func warning(_ message: String, at location: SourceLocation?, length: Int = 1) {
        all.append(Diagnostic(.warning, message, at: location, length: length))
    }

    public mutating func note(_ message: String, at location: SourceLocation?, length: Int = 1) {
        all.append(Diagnostic(.note, message, at: location, length: length))
    }

    public mutating func append(contentsOf other: [Diagnostic]) { all += other }

    public var hasErrors: Bool { all.contains { $0.severity == .error } }
    public var errors: [Diagnostic] { all.filter { $0.severity == .error } }
    public var warnings: [Diagnostic] { all.filter { $0.severity == .warning } }
}

/// The text of every file read, so that diagnostics can quote the offending line.
public struct SourceFiles: Sendable {
    /// Whole files as read (the lexer shares the arrays). Where each line starts is worked out
    /// once per file, the first time a diagnostic quotes a line of it, not for every file read
    /// (splitting a 20 MB geo file up front cost a quarter of its load time).
    private var files: [String: FileText] = [:]
    public init() {}

    final class FileText: Sendable {
        let bytes: [UInt8]
        private let lineStarts = Mutex<[Int]?>(nil)

        init(_ bytes: [UInt8]) { self.bytes = bytes }

        func line(_ number: Int) -> Substring? {
            let starts = lineStarts.withLock { cached in
                if let cached { return cached }
                var found = [0]
                for (index, byte) in bytes.enumerated() where byte == UInt8(ascii: "\n") { found.append(index + 1) }
                cached = found
                return found
            }
            guard number >= 1, number <= starts.count else { return nil }
            let start = starts[number - 1]
            var end = number < starts.count ? starts[number] - 1 : bytes.count
            if end > start && bytes[end - 1] == UInt8(ascii: "\r") { end -= 1 }
            return Substring(String(decoding: bytes[start..<max(start, end)], as: UTF8.self))
        }
    }

    public mutating func add(file: String, text: String) {
        files[file] = FileText(Array(text.utf8))
    }

    public mutating func add(file: String, bytes: [UInt8]) {
        files[file] = FileText(bytes)
    }

    public func line(_ number: Int, of file: String) -> Substring? {
        files[file]?.line(number)
    }

    /// `file:line:col: error: message`, the source line, and a caret under the column.
    public func render(_ diagnostic: Diagnostic) -> String {
        var out = diagnostic.description
        guard let location = diagnostic.location, let source = line(location.line, of: location.file) else {
            return out
        }
        out += "\n" + source + "\n"
        // Keep tabs so the caret lines up under tab-indented source.
        let prefix = source.utf8.prefix(max(0, location.column - 1))
        out += String(decoding: prefix.map { $0 == UInt8(ascii: "\t") ? $0 : UInt8(ascii: " ") }, as: UTF8.self)
        out += "^" + String(repeating: "~", count: max(0, diagnostic.length - 1))
        return out
    }

    public func render(_ diagnostics: [Diagnostic]) -> String {
        diagnostics.map(render).joined(separator: "\n")
    }
}

/// "did you mean" by edit distance, only when the guess is close enough to help.
public func closestMatch(to word: String, in candidates: some Sequence<String>) -> String? {
    let limit = max(1, word.count / 3)
    var best: (String, Int)?
    for candidate in candidates {
        let distance = editDistance(word, candidate)
        if distance <= limit, distance < (best?.1 ?? .max) { best = (candidate, distance) }
    }
    return best?.0
}

func editDistance(_ a: String, _ b: String) -> Int {
    let a = Array(a.utf8), b = Array(b.utf8)
    if a.isEmpty { return b.count }
    if b.isEmpty { return a.count }
    var previous = Array(0...b.count)
    var current = [Int](repeating: 0, count: b.count + 1)
    for i in 1...a.count {
        current[0] = i
        for j in 1...b.count {
            let substitution = previous[j - 1] + (a[i - 1] == b[j - 1] ? 0 : 1)
            current[j] = min(previous[j] + 1, current[j - 1] + 1, substitution)
            // Transposition ("alwo" → "allow" family of typos).
            if i > 1, j > 1, a[i - 1] == b[j - 2], a[i - 2] == b[j - 1] {
                current[j] = min(current[j], previous[j - 1])
            }
        }
        swap(&previous, &current)
    }
    return previous[b.count]
}
