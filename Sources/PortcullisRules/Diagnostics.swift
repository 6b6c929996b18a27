#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif
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

        /// Line `number`'s bytes, without its line break.
        func lineBytes(_ number: Int) -> ArraySlice<UInt8>? {
            let starts = lineStarts.withLock { cached in
                if let cached { return cached }
                var found = [0]
                bytes.withUnsafeBufferPointer { buffer in
                    guard let base = buffer.baseAddress else { return }
                    var offset = 0
                    while offset < buffer.count,
                          let newline = memchr(base + offset, Int32(UInt8(ascii: "\n")), buffer.count - offset) {
                        offset = base.distance(to: newline.assumingMemoryBound(to: UInt8.self)) + 1
                        found.append(offset)
                    }
                }
                cached = found
                return found
            }
            guard number >= 1, number <= starts.count else { return nil }
            let start = starts[number - 1]
            var end = number < starts.count ? starts[number] - 1 : bytes.count
            if end > start && bytes[end - 1] == UInt8(ascii: "\r") { end -= 1 }
            return bytes[start..<max(start, end)]
        }
    }

    public mutating func add(file: String, text: String) {
        files[file] = FileText(Array(text.utf8))
    }

    public mutating func add(file: String, bytes: [UInt8]) {
        files[file] = FileText(bytes)
    }

    public func line(_ number: Int, of file: String) -> Substring? {
        files[file]?.lineBytes(number).map { Substring(String(decoding: $0, as: UTF8.self)) }
    }

    /// Where the scalar at `offset` of `argument.text` was written. The text is the word after
    /// quote removal and escapes, and may run over several lines (a quoted `log_format`
    /// string), so this walks the source as the lexer read it. Falls back to the word's start
    /// if the file is not known.
    public func location(in argument: Argument, scalarOffset offset: Int) -> SourceLocation {
        guard let file = files[argument.location.file],
              let line = file.lineBytes(argument.location.line) else { return argument.location }
        let bytes = file.bytes
        var index = line.startIndex
        var column = 1
        // To the word's first byte: its column counts scalars.
        while column < argument.location.column && index < line.endIndex {
            index += 1
            while index < line.endIndex && bytes[index] & 0xC0 == 0x80 { index += 1 }
            column += 1
        }
        var lineNumber = argument.location.line
        func step() {
            if bytes[index] == UInt8(ascii: "\n") {
                lineNumber += 1
                column = 1
            } else if bytes[index] & 0xC0 != 0x80 {
                column += 1
            }
            index += 1
        }
        if argument.quoted && index < bytes.count { step() }
        var remaining = offset
        while remaining > 0 && index < bytes.count {
            // An escape (Lexer.escaped) is one scalar of the text for two of the source; any
            // other backslash stays, one scalar like the character after it.
            if bytes[index] == UInt8(ascii: "\\"), index + 1 < bytes.count, Lexer.escaped(bytes[index + 1]) != nil {
                step()
            }
            step()
            while index < bytes.count && bytes[index] & 0xC0 == 0x80 { step() }
            remaining -= 1
        }
        return SourceLocation(file: argument.location.file, line: lineNumber, column: column)
    }

    /// `file:line:col: error: message`, the source line, and a caret under the column.
    public func render(_ diagnostic: Diagnostic) -> String {
        var out = diagnostic.description
        guard let location = diagnostic.location, let source = files[location.file]?.lineBytes(location.line) else {
            return out
        }
        let (shown, column) = Self.window(of: source, column: location.column)
        out += "\n" + shown + "\n"
        // Keep tabs so the caret lines up under tab-indented source.
        let prefix = shown.unicodeScalars.prefix(max(0, column - 1))
        out += String(String.UnicodeScalarView(prefix.map { $0 == "\t" ? "\t" : " " }))
        let underline = min(diagnostic.length, max(1, Self.widestLine - column + 1))
        out += "^" + String(repeating: "~", count: max(0, underline - 1))
        return out
    }

    /// Source lines longer than this are quoted as a window around the column.
    static let widestLine = 160

    /// The part of `line` to quote and where `column` falls in it: a line of a minified or
    /// generated file can be megabytes long, and the caret only needs its neighbourhood. The
    /// line is walked at most three times, in constant memory. Control characters and bidi
    /// overrides are shown as U+FFFD: a hostile file must not drive the operator's terminal.
    static func window(of line: ArraySlice<UInt8>, column: Int) -> (text: String, column: Int) {
        /// The byte where scalar `n` starts (the end if there are fewer), and how many scalars
        /// were counted on the way (at most n, or all of them).
        func scalarStart(_ n: Int) -> (byte: Int, counted: Int) {
            var counted = 0
            var offset = line.startIndex
            while offset < line.endIndex {
                if line[offset] & 0xC0 != 0x80 {
                    if counted == n { return (offset, counted) }
                    counted += 1
                }
                offset += 1
            }
            return (line.endIndex, counted)
        }
        let target = max(column - 1, 0)
        // Whether the line reaches past a window that starts half a window before the target.
        var first = max(0, target - widestLine / 2)
        let (_, reached) = scalarStart(first + widestLine)
        let count = reached < first + widestLine ? reached : nil  // known only if the line is short of that
        if let count {
            guard count > widestLine else { return (printable(line), column) }
            first = min(first, count - widestLine)
        }
        let from = scalarStart(first).byte
        let to = scalarStart(first + widestLine).byte
        var text = printable(line[from..<to])
        var shownColumn = min(target, count ?? target) - first + 1
        if first > 0 {
            text = "..." + text
            shownColumn += 3
        }
        if to < line.endIndex { text += "..." }
        return (text, shownColumn)
    }

    /// The bytes as text, each control character (but tab) and bidi control as U+FFFD.
    static func printable(_ bytes: ArraySlice<UInt8>) -> String {
        func isUnsafe(_ scalar: Unicode.Scalar) -> Bool {
            (scalar.value < 0x20 && scalar != "\t") || scalar.value == 0x7F
                || (0x202A...0x202E).contains(scalar.value) || (0x2066...0x2069).contains(scalar.value)
        }
        let text = String(decoding: bytes, as: UTF8.self)
        guard text.unicodeScalars.contains(where: isUnsafe) else { return text }
        return String(String.UnicodeScalarView(text.unicodeScalars.map { isUnsafe($0) ? "\u{FFFD}" : $0 }))
    }

    public func render(_ diagnostics: [Diagnostic]) -> String {
        diagnostics.map(render).joined(separator: "\n")
    }
}

/// "did you mean" by edit distance, only when the guess is close enough to help. Ties go to
/// the alphabetically first candidate, so the same mistake always gets the same suggestion
/// (candidates often come from a Set, whose order changes from run to run).
public func closestMatch(to word: String, in candidates: some Sequence<String>) -> String? {
    // A long word is no typo of a directive or variable name; and edit distance is quadratic.
    let length = word.utf8.count
    guard length <= 64 else { return nil }
    let limit = max(1, word.count / 3)
    var best: (String, Int)?
    for candidate in candidates {
        // The distance is at least the difference in length: skip what cannot be close.
        guard abs(candidate.utf8.count - length) <= limit else { continue }
        let distance = editDistance(word, candidate)
        guard distance <= limit else { continue }
        if let (bestWord, bestDistance) = best, distance > bestDistance || (distance == bestDistance && candidate >= bestWord) {
            continue
        }
        best = (candidate, distance)
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
