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
    private let bytes: [UInt8]
    private let file: String
    private var index = 0
    private var line = 1
    private var column = 1

    public init(text: String, file: String) {
        self.bytes = Array(text.utf8)
        self.file = file
    }

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
        guard index < bytes.count else { return LocatedToken(token: .endOfFile, location: start, length: 1) }
        switch bytes[index] {
        case UInt8(ascii: ";"):
            advance()
            return LocatedToken(token: .semicolon, location: start, length: 1)
        case UInt8(ascii: "{"):
            advance()
            return LocatedToken(token: .blockStart, location: start, length: 1)
        case UInt8(ascii: "}"):
            advance()
            return LocatedToken(token: .blockEnd, location: start, length: 1)
        case UInt8(ascii: "\""), UInt8(ascii: "'"):
            return try quoted(start: start)
        default:
            return unquoted(start: start)
        }
    }

    private mutating func unquoted(start: SourceLocation) -> LocatedToken {
        var out: [UInt8] = []
        let startIndex = index
        var previous: UInt8 = 0
        while index < bytes.count {
            let byte = bytes[index]
            if Self.isSpace(byte) || byte == UInt8(ascii: ";") { break }
            if byte == UInt8(ascii: "{") && previous != UInt8(ascii: "$") { break }
            if byte == UInt8(ascii: "\\"), index + 1 < bytes.count {
                advance()
                appendEscape(bytes[index], to: &out)
                previous = 0
                advance()
                continue
            }
            out.append(byte)
            previous = byte
            advance()
        }
        return LocatedToken(
            token: .word(String(decoding: out, as: UTF8.self), quoted: false),
            location: start, length: index - startIndex)
    }

    private mutating func quoted(start: SourceLocation) throws(Failure) -> LocatedToken {
        let quote = bytes[index]
        let startIndex = index
        advance()
        var out: [UInt8] = []
        while true {
            guard index < bytes.count else {
                throw Failure(message: "unterminated quoted string, expecting \(quote == UInt8(ascii: "\"") ? "'\"'" : "\"'\"")", location: start)
            }
            let byte = bytes[index]
            if byte == quote {
                advance()
                break
            }
            if byte == UInt8(ascii: "\\"), index + 1 < bytes.count {
                advance()
                appendEscape(bytes[index], to: &out)
                advance()
                continue
            }
            out.append(byte)
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
        return LocatedToken(
            token: .word(String(decoding: out, as: UTF8.self), quoted: true),
            location: start, length: index - startIndex)
    }

    private func appendEscape(_ byte: UInt8, to out: inout [UInt8]) {
        switch byte {
        case UInt8(ascii: "\""), UInt8(ascii: "'"), UInt8(ascii: "\\"): out.append(byte)
        case UInt8(ascii: "t"): out.append(UInt8(ascii: "\t"))
        case UInt8(ascii: "r"): out.append(UInt8(ascii: "\r"))
        case UInt8(ascii: "n"): out.append(UInt8(ascii: "\n"))
        default: out += [UInt8(ascii: "\\"), byte]
        }
    }
}
