public import PortcullisCore

/// A token of nginx configuration syntax.
public enum Token: Equatable, Sendable {
    /// A word after quote removal and escape processing; `quoted` if written in quotes.
    case word(String, quoted: Bool)
    case semicolon
    case blockStart
    case blockEnd
    case endOfFile
}

public struct LocatedToken: Equatable, Sendable {
    public var token: Token
    public var location: SourceLocation
    /// Length of the token as written, for the caret underline.
    public var length: Int
}

/// Splits rule-file text into tokens exactly as nginx's `ngx_conf_read_token` does:
/// - words end at whitespace, `;` or `{` (but `${` stays inside a word, and `}` inside a word
///   is part of it);
/// - `#` starts a comment only at the start of a token;
/// - `"…"` and `'…'` quote, and must be followed by whitespace, `;` or `{`;
/// - `\"`, `\'`, `\\`, `\t`, `\r`, `\n` are escapes in every word; other backslashes stay.
public struct Lexer {
    /// nginx reads a configuration through a 4 KiB buffer, so no word of a valid nginx config is
    /// longer ("too long parameter"). The same bound keeps a 50 MB token out of memory twice
    /// over and out of error messages.
    public static let maximumWordLength = 4096

    private let bytes: [UInt8]
    public let file: String
    private var index = 0
    private var line = 1
    private var column = 1

    public init(text: String, file: String) {
        self.init(bytes: Array(text.utf8), file: file)
    }

    /// `bytes` must be valid UTF-8 (the parser checks).
    public init(bytes: [UInt8], file: String) {
        self.bytes = bytes
        self.file = file
    }

    /// The text being read; a word's `span` from `nextRaw` indexes into it.
    public var text: [UInt8] { bytes }

    public struct Failure: Error, Sendable {
        public var message: String
        public var location: SourceLocation
    }

    private var here: SourceLocation { SourceLocation(file: file, line: line, column: column) }

    private mutating func advance() {
        if bytes[index] == UInt8(ascii: "\n") {
            line += 1
            column = 1
        } else if bytes[index] & 0xC0 != 0x80 {
            column += 1  // count characters, not UTF-8 continuation bytes
        }
        index += 1
    }

    private static func isSpace(_ byte: UInt8) -> Bool {
        byte == UInt8(ascii: " ") || byte == UInt8(ascii: "\t") || byte == UInt8(ascii: "\r")
            || byte == UInt8(ascii: "\n")
    }

    public mutating func next() throws(Failure) -> LocatedToken {
        var out: [UInt8] = []
        let (raw, location, length, span) = try nextRaw(wordBytes: &out)
        let token: Token
        switch raw {
        case .word(let quoted):
            token = .word(String(decoding: span.map { bytes[$0] } ?? out[...], as: UTF8.self), quoted: quoted)
        case .semicolon: token = .semicolon
        case .blockStart: token = .blockStart
        case .blockEnd: token = .blockEnd
        case .endOfFile: token = .endOfFile
        }
        return LocatedToken(token: token, location: location, length: length)
    }

    /// A token whose word, if it is one, is not made into a `String`.
    public enum RawToken: Equatable, Sendable {
        case word(quoted: Bool)
        case semicolon, blockStart, blockEnd, endOfFile
    }

    /// The next token, for bulk blocks (`geo`) that would otherwise make a million strings.
    /// A word's bytes (after quote removal and escapes) are `text[span]` when it has no escapes,
    /// else appended to `wordBytes` (and `span` is nil). The Int is the length as written.
    public mutating func nextRaw(wordBytes out: inout [UInt8]) throws(Failure)
        -> (RawToken, SourceLocation, Int, span: Range<Int>?) {
        // Skip blanks and comments.
        while index < bytes.count {
            if Self.isSpace(bytes[index]) {
                advance()
            } else if bytes[index] == UInt8(ascii: "#") {
                while index < bytes.count && bytes[index] != UInt8(ascii: "\n") { advance() }
            } else {
                break
            }
        }
        let start = here
        guard index < bytes.count else { return (.endOfFile, start, 1, nil) }
        switch bytes[index] {
        case UInt8(ascii: ";"):
            advance()
            return (.semicolon, start, 1, nil)
        case UInt8(ascii: "{"):
            advance()
            return (.blockStart, start, 1, nil)
        case UInt8(ascii: "}"):
            advance()
            return (.blockEnd, start, 1, nil)
        case UInt8(ascii: "\""), UInt8(ascii: "'"):
            let startIndex = index
            let span = try quoted(start: start, into: &out)
            return (.word(quoted: true), start, index - startIndex, span)
        default:
            let startIndex = index
            let span = try unquoted(start: start, into: &out)
            return (.word(quoted: false), start, index - startIndex, span)
        }
    }

    /// Returns the word's span in `bytes` if it had no escape; else its bytes are in `out`.
    private mutating func unquoted(start: SourceLocation, into out: inout [UInt8]) throws(Failure) -> Range<Int>? {
        let startIndex = index
        var copying = false
        var previous: UInt8 = 0
        while index < bytes.count {
            try checkLength(from: startIndex, start: start, pending: 0)
            let byte = bytes[index]
            if Self.isSpace(byte) || byte == UInt8(ascii: ";") { break }
            if byte == UInt8(ascii: "{") && previous != UInt8(ascii: "$") { break }
            if byte == UInt8(ascii: "\\"), index + 1 < bytes.count {
                if !copying {
                    out.append(contentsOf: bytes[startIndex..<index])
                    copying = true
                }
                advance()
                appendEscape(bytes[index], to: &out)
                previous = 0
                advance()
                continue
            }
            if copying { out.append(byte) }
            previous = byte
            advance()
        }
        try checkLength(from: startIndex, start: start, pending: 0)  // a word that ends the file
        return copying ? nil : startIndex..<index
    }

    /// Returns the span inside the quotes if there was no escape; else the bytes are in `out`.
    private mutating func quoted(start: SourceLocation, into out: inout [UInt8]) throws(Failure) -> Range<Int>? {
        let quote = bytes[index]
        let startIndex = index
        advance()
        let contentStart = index
        var contentEnd = index
        var copying = false
        while true {
            try checkLength(from: startIndex, start: start, pending: 1)  // the closing quote
            guard index < bytes.count else {
                throw Failure(message: "unterminated quoted string, expecting \(quote == UInt8(ascii: "\"") ? "'\"'" : "\"'\"")", location: start)
            }
            let byte = bytes[index]
            if byte == quote {
                contentEnd = index
                advance()
                break
            }
            if byte == UInt8(ascii: "\\"), index + 1 < bytes.count {
                if !copying {
                    out.append(contentsOf: bytes[contentStart..<index])
                    copying = true
                }
                advance()
                appendEscape(bytes[index], to: &out)
                advance()
                continue
            }
            if copying { out.append(byte) }
            advance()
        }
        if index < bytes.count {
            let after = bytes[index]
            if !(Self.isSpace(after) || after == UInt8(ascii: ";") || after == UInt8(ascii: "{")) {
                throw Failure(
                    message: "unexpected \"\(Character(Unicode.Scalar(after)))\" after a quoted string; expected a space, \";\" or \"{\"",
                    location: here)
            }
        }
        return copying ? nil : contentStart..<contentEnd
    }

    /// A word is at most `maximumWordLength` bytes as written, quotes included; `pending` is
    /// what it must still have (a closing quote).
    private func checkLength(from startIndex: Int, start: SourceLocation, pending: Int) throws(Failure) {
        guard index - startIndex + pending > Self.maximumWordLength else { return }
        // The first 24 bytes, less a character they would cut in two.
        var end = startIndex + 24
        while end > startIndex && bytes[end] & 0xC0 == 0x80 { end -= 1 }
        let opening = String(decoding: bytes[startIndex..<end], as: UTF8.self)
        let shown = opening.unicodeScalars.map { scalar in
            scalar.value < 0x20 || scalar.value == 0x7F || scalar == "\"" || scalar == "\\"
                ? scalar.escaped(asASCII: true) : String(scalar)
        }.joined()
        var message = "too long word (more than \(Self.maximumWordLength) bytes) starting \"\(shown)...\""
        if bytes[startIndex] == UInt8(ascii: "\"") || bytes[startIndex] == UInt8(ascii: "'") {
            message += "; a missing closing quote?"
        }
        throw Failure(message: message, location: start)
    }

    /// What `\` followed by `byte` stands for, or nil if that is no escape (both bytes stay).
    /// Diagnostics that map a word's text back to its source use the same rule.
    static func escaped(_ byte: UInt8) -> UInt8? {
        switch byte {
        case UInt8(ascii: "\""), UInt8(ascii: "'"), UInt8(ascii: "\\"): byte
        case UInt8(ascii: "t"): UInt8(ascii: "\t")
        case UInt8(ascii: "r"): UInt8(ascii: "\r")
        case UInt8(ascii: "n"): UInt8(ascii: "\n")
        default: nil
        }
    }

    private func appendEscape(_ byte: UInt8, to out: inout [UInt8]) {
        if let meaning = Self.escaped(byte) {
            out.append(meaning)
        } else {
            out += [UInt8(ascii: "\\"), byte]
        }
    }
}
