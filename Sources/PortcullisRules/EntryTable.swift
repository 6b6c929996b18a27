public import PortcullisCore

/// The body of a `geo` block, kept as compact rows of words instead of one `Directive` per
/// line: a geo block may hold a million `NETWORK VALUE;` lines, and a `Directive` costs a few
/// hundred bytes and several allocations each. A word is a span of the file's bytes (shared
/// with the lexer and the diagnostics, not copied); only words with escapes are copied.
/// `include` lines inside the block are already expanded, as everywhere else.
public struct EntryTable: Sendable, Equatable {
    struct Row: Sendable, Equatable {
        var firstWord: UInt32
        var wordCount: UInt16
        /// Index into `buffers` (and `files`) of the file the row is in.
        var file: UInt16
        var line: UInt32
    }

    /// `buffers[0]` holds words that had escapes; `buffers[i]` is the text of `files[i]`.
    private var buffers: [[UInt8]] = [[]]
    public private(set) var files: [String] = [""]
    /// Where each word is: the top bit set means "in buffers[0]", else in its row's file.
    private var starts: [UInt32] = []
    private var ends: [UInt32] = []
    private var rows: [Row] = []
    private static let copied: UInt32 = 1 << 31

    public init() {}

    public var count: Int { rows.count }

    public func wordCount(_ row: Int) -> Int { Int(rows[row].wordCount) }

    private func place(_ row: Int, _ word: Int) -> (buffer: Int, span: Range<Int>) {
        let index = Int(rows[row].firstWord) + word
        let start = starts[index]
        if start & Self.copied != 0 { return (0, Int(start & ~Self.copied)..<Int(ends[index])) }
        return (Int(rows[row].file), Int(start)..<Int(ends[index]))
    }

    /// A word's bytes, without copying them.
    public func withWord<R>(_ row: Int, _ word: Int, _ body: (UnsafeBufferPointer<UInt8>) -> R) -> R {
        let (buffer, span) = place(row, word)
        return buffers[buffer].withUnsafeBufferPointer { body(UnsafeBufferPointer(rebasing: $0[span])) }
    }

    public func bytes(_ row: Int, _ word: Int) -> ArraySlice<UInt8> {
        let (buffer, span) = place(row, word)
        return buffers[buffer][span]
    }

    public func word(_ row: Int, _ word: Int) -> String { String(decoding: bytes(row, word), as: UTF8.self) }

    /// Where a word was written. Columns are counted back from the word to its line's start,
    /// only when a diagnostic needs one.
    public func location(_ row: Int, _ word: Int) -> SourceLocation {
        let r = rows[row]
        let (buffer, span) = place(row, word)
        var column = 1
        if buffer != 0 {
            let text = buffers[buffer]
            var i = span.lowerBound
            // A quoted word's span starts after its quote.
            if i > 0 && (text[i - 1] == UInt8(ascii: "\"") || text[i - 1] == UInt8(ascii: "'")) { i -= 1 }
            while i > 0 && text[i - 1] != UInt8(ascii: "\n") {
                i -= 1
                if text[i] & 0xC0 != 0x80 { column += 1 }
            }
        }
        return SourceLocation(file: files[Int(r.file)], line: Int(r.line), column: column)
    }

    /// A word as an `Argument`, for diagnostics.
    public func argument(_ row: Int, _ word: Int) -> Argument {
        let text = self.word(row, word)
        return Argument(text: text, quoted: false, location: location(row, word), length: max(1, text.count))
    }

    // MARK: Building (the parser)

    /// Registers a file's text (the same array the lexer reads) and returns its number.
    mutating func addFile(_ file: String, text: [UInt8]) -> UInt16 {
        files.append(file)
        buffers.append(text)
        return UInt16(files.count - 1)
    }

    private var pendingWords = 0
    private var pendingLine: UInt32 = 0

    /// The next word of the current row: a span of the file's text, or copied `bytes`.
    mutating func addWord(span: Range<Int>?, copied bytes: [UInt8], line: Int) {
        if pendingWords == 0 { pendingLine = UInt32(line) }
        if let span {
            starts.append(UInt32(span.lowerBound))
            ends.append(UInt32(span.upperBound))
        } else {
            starts.append(UInt32(buffers[0].count) | Self.copied)
            buffers[0].append(contentsOf: bytes)
            ends.append(UInt32(buffers[0].count))
        }
        pendingWords += 1
    }

    mutating func endRow(file: UInt16) {
        rows.append(Row(firstWord: UInt32(starts.count - pendingWords), wordCount: UInt16(min(pendingWords, Int(UInt16.max))),
                        file: file, line: pendingLine))
        pendingWords = 0
    }

    /// Drops the words of an unfinished row (after a syntax error or an `include` line).
    mutating func dropPendingRow() {
        guard pendingWords > 0 else { return }
        starts.removeLast(pendingWords)
        ends.removeLast(pendingWords)
        pendingWords = 0
    }

    /// Room for about `rows` more rows of two words, so a large block grows its arrays once.
    mutating func reserve(rows extra: Int) {
        rows.reserveCapacity(rows.count + extra)
        starts.reserveCapacity(starts.count + extra * 2)
        ends.reserveCapacity(ends.count + extra * 2)
    }
}
