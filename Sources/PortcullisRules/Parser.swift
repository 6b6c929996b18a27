#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif
import Foundation
import PortcullisCore

/// Reads a rule file and everything it includes into directives, collecting every problem it can
/// find instead of stopping at the first (a syntax error ends only the file it is in).
public struct RuleParser {
    public static let maximumIncludeDepth = 16
    /// Blocks inside blocks, across includes. nginx's grammar has at most four levels
    /// (stream, server, a block inside); the bound keeps a hostile file from exhausting the stack.
    public static let maximumBlockDepth = 64
    /// Files read in one load, includes of includes counted; globs can fan out quickly.
    public static let maximumFiles = 10_000

    public private(set) var diagnostics = DiagnosticBag()
    public private(set) var sources = SourceFiles()
    private var includeStack: [String] = []
    private var blockDepth = 0
    private var filesRead = 0
    private var fileLimitReported = false

    public init() {}

    /// Parses `path` and its includes. Diagnostics are in `diagnostics`; the result holds what
    /// could be parsed.
    public mutating func parse(file path: String) -> RuleFile {
        let directives = parseFile(path: path, includedFrom: nil)
        return RuleFile(mainFile: path, directives: directives, sources: sources)
    }

    /// Parses text that did not come from disk (tests, `explain`); includes resolve against
    /// the current directory.
    public mutating func parse(text: String, file: String) -> RuleFile {
        let directives = parseText(text, file: file)
        return RuleFile(mainFile: file, directives: directives, sources: sources)
    }

    private mutating func parseFile(path: String, includedFrom: Argument?) -> [Directive] {
        guard let bytes = readFile(path: path, includedFrom: includedFrom) else { return [] }
        return parseBytes(bytes, file: path)
    }

    /// The file's bytes, checked to be text: UTF-8 without NUL bytes. Only regular files are
    /// read (a directory, /dev/zero or a FIFO named by mistake is an error, not a hang), and
    /// a problem inside the file is reported where it is, with a note where it was included.
    private mutating func readFile(path: String, includedFrom: Argument?) -> [UInt8]? {
        func refuse(_ problem: String) -> [UInt8]? {
            diagnostics.error(problem, at: includedFrom?.location, length: includedFrom?.length ?? 1)
            return nil
        }
        guard filesRead < Self.maximumFiles else {
            // Once, not once per further path (a glob past the limit can name thousands).
            if !fileLimitReported {
                fileLimitReported = true
                _ = refuse("more than \(Self.maximumFiles) rule files are included; \"\(path)\" and any after it are not read")
            }
            return nil
        }
        // The type first, from the path: opening a device can itself do something (a tty
        // becomes the controlling terminal, a watchdog is armed, a tape rewinds).
        var status = stat()
        guard stat(path, &status) == 0 else {
            return refuse("cannot open rule file \"\(path)\": \(String(cString: strerror(errno)))")
        }
        switch status.st_mode & S_IFMT {
        case S_IFREG: break
        case S_IFDIR:
            return refuse("cannot read rule file \"\(path)\": it is a directory (to include the files in it, write \"\(path)/*.conf\")")
        default:
            return refuse("cannot read rule file \"\(path)\": it is not a regular file")
        }
        // O_NONBLOCK and O_NOCTTY in case the path was swapped for a FIFO or a tty since the
        // stat; fstat then says whether it is still the file that was checked.
        let descriptor = open(path, O_RDONLY | O_NONBLOCK | O_NOCTTY | O_CLOEXEC)
        guard descriptor >= 0 else {
            return refuse("cannot open rule file \"\(path)\": \(String(cString: strerror(errno)))")
        }
        defer { close(descriptor) }
        var opened = stat()
        guard fstat(descriptor, &opened) == 0 else {
            return refuse("cannot read rule file \"\(path)\": \(String(cString: strerror(errno)))")
        }
        guard opened.st_dev == status.st_dev, opened.st_ino == status.st_ino, opened.st_mode & S_IFMT == S_IFREG else {
            return refuse("cannot read rule file \"\(path)\": it was replaced while being opened")
        }
        filesRead += 1
        // Word offsets in bulk blocks are 31-bit (EntryTable): a rule file stays under 2 GiB.
        guard opened.st_size < 1 << 31 else { return refuse("rule file \"\(path)\" is larger than 2 GiB") }
        let size = Int(opened.st_size)
        // A file that grows while it is read may add a little; one whose size says 0 but which
        // has content (/proc, /sys) is read up to 64 MiB.
        let limit = size > 0 ? min(1 << 31, size + (1 << 20)) : 64 << 20
        // One byte more than its size, so the read that finds the end needs no larger buffer.
        var bytes = [UInt8](repeating: 0, count: size + 1)
        var count = 0
        var nul: Int?
        while nul == nil {
            if count == bytes.count { bytes += [UInt8](repeating: 0, count: min(max(4096, bytes.count), limit + 1 - count)) }
            let n = bytes.withUnsafeMutableBytes { read(descriptor, $0.baseAddress! + count, $0.count - count) }
            if n < 0 && errno == EINTR { continue }
            guard n >= 0 else { return refuse("cannot read rule file \"\(path)\": \(String(cString: strerror(errno)))") }
            if n == 0 { break }
            // A binary file stops at its first NUL, not after all of it is read.
            nul = UTF8Check.firstNul(bytes, in: count..<count + n)
            count += n
            guard count <= limit else {
                return refuse("rule file \"\(path)\" is larger than \(size > 0 ? "2 GiB, or grew by over 1 MiB while read" : "64 MiB")")
            }
        }
        bytes.removeSubrange(count...)
        // Whichever comes first: a NUL is valid UTF-8, so the check stops before it.
        if let bad = UTF8Check.firstInvalidByte(bytes[..<(nul ?? count)]) {
            return refuseContent(bytes, path: path, at: bad, includedFrom: includedFrom,
                                 "invalid UTF-8 (byte 0x\(String(bytes[bad], radix: 16, uppercase: true))); rule files are UTF-8 text")
        }
        if let nul {
            return refuseContent(bytes, path: path, at: nul, includedFrom: includedFrom,
                                 "a NUL byte (0x00) in a rule file; is this a binary file?")
        }
        return bytes
    }

    /// An error at byte `offset` of a file that is not read further. The readable part is kept
    /// as the file's source so the diagnostic can quote its line.
    private mutating func refuseContent(_ bytes: [UInt8], path: String, at offset: Int,
                                        includedFrom: Argument?, _ problem: String) -> [UInt8]? {
        // Quote the line only up to the bad byte: what follows may not be text at all.
        sources.add(file: path, bytes: Array(bytes[..<offset]))
        diagnostics.error(problem, at: SourceLocation(offset: offset, in: bytes, file: path))
        if let includedFrom {
            diagnostics.note("included from here", at: includedFrom.location, length: includedFrom.length)
        }
        return nil
    }

    private mutating func parseText(_ text: String, file: String) -> [Directive] {
        let bytes = Array(text.utf8)
        if let nul = UTF8Check.firstNul(bytes, in: 0..<bytes.count) {
            _ = refuseContent(bytes, path: file, at: nul, includedFrom: nil,
                              "a NUL byte (0x00) in a rule file; is this a binary file?")
            return []
        }
        return parseBytes(bytes, file: file)
    }

    private mutating func parseBytes(_ bytes: [UInt8], file: String) -> [Directive] {
        sources.add(file: file, bytes: bytes)
        includeStack.append(file)
        defer { includeStack.removeLast() }
        var lexer = Lexer(bytes: bytes, file: file)
        // Directives parsed before a syntax error are kept, so the rest is still checked.
        var directives: [Directive] = []
        do {
            try parseBlock(&lexer, opener: nil, into: &directives)
        } catch {
            diagnostics.error(error.message, at: error.location, length: error.length)
        }
        return directives
    }

    struct SyntaxError: Error {
        var message: String
        var location: SourceLocation
        var length: Int = 1
    }

    /// Parses directives until the matching `}` (or end of file at top level).
    private mutating func parseBlock(_ lexer: inout Lexer, opener: LocatedToken?,
                                     into directives: inout [Directive]) throws(SyntaxError) {
        var words: [LocatedToken] = []
        while true {
            let token: LocatedToken
            do {
                token = try lexer.next()
            } catch {
                throw SyntaxError(message: error.message, location: error.location)
            }
            switch token.token {
            case .word:
                words.append(token)
            case .semicolon:
                guard let first = words.first else {
                    throw SyntaxError(message: "unexpected \";\"; expected a directive name", location: token.location)
                }
                let directive = makeDirective(first, words.dropFirst(), block: nil)
                if directive.name == "include" {
                    directives += expandInclude(directive)
                } else {
                    directives.append(directive)
                }
                words = []
            case .blockStart:
                guard let first = words.first else {
                    throw SyntaxError(message: "unexpected \"{\"; expected a directive name before a block", location: token.location)
                }
                if wordText(first) == "geo" {
                    // Bulk data: read into compact rows rather than a Directive per line.
                    var table = EntryTable()
                    try parseEntries(&lexer, opener: first, into: &table)
                    var directive = makeDirective(first, words.dropFirst(), block: [])
                    directive.entries = table
                    directives.append(directive)
                    words = []
                    continue
                }
                guard blockDepth < Self.maximumBlockDepth else {
                    throw SyntaxError(message: "blocks nested deeper than \(Self.maximumBlockDepth) levels",
                                      location: first.location, length: first.length)
                }
                blockDepth += 1
                defer { blockDepth -= 1 }
                var children: [Directive] = []
                try parseBlock(&lexer, opener: first, into: &children)
                directives.append(makeDirective(first, words.dropFirst(), block: children))
                words = []
            case .blockEnd:
                if let first = words.first {
                    throw SyntaxError(
                        message: "unexpected \"}\"; expected \";\" to end the directive \"\(wordText(first))\"",
                        location: token.location)
                }
                guard opener != nil else {
                    throw SyntaxError(message: "unexpected \"}\" with no block open", location: token.location)
                }
                return
            case .endOfFile:
                if let first = words.first {
                    throw SyntaxError(
                        message: "unexpected end of file, expecting \";\" or \"}\" after the directive \"\(wordText(first))\"",
                        location: first.location, length: first.length)
                }
                if let opener {
                    throw SyntaxError(
                        message: "unexpected end of file, expecting \"}\" to close the block \"\(wordText(opener))\" opened here",
                        location: opener.location, length: opener.length)
                }
                return
            }
        }
    }

    /// The lines of a `geo` block (or of a file included inside one, `opener` nil) into
    /// `table`, with the same token rules and errors as `parseBlock`.
    private mutating func parseEntries(_ lexer: inout Lexer, opener: LocatedToken?,
                                       into table: inout EntryTable) throws(SyntaxError) {
        let file = table.addFile(lexer.file, text: lexer.text)
        table.reserve(rows: lexer.text.count / 24)  // a typical line is about that long
        var scratch: [UInt8] = []
        scratch.reserveCapacity(64)
        var firstWord: (text: String, location: SourceLocation, length: Int)?
        var includeArguments: [Argument] = []
        let includeWord = Array("include".utf8)
        while true {
            scratch.removeAll(keepingCapacity: true)
            let (token, location, length, span): (Lexer.RawToken, SourceLocation, Int, Range<Int>?)
            do {
                (token, location, length, span) = try lexer.nextRaw(wordBytes: &scratch)
            } catch {
                table.dropPendingRow()
                throw SyntaxError(message: error.message, location: error.location)
            }
            switch token {
            case .word(let quoted):
                let text = span.map { lexer.text[$0] } ?? scratch[...]
                if firstWord == nil {
                    firstWord = (text.elementsEqual(includeWord) ? "include" : "", location, length)
                } else if firstWord?.text == "include" {
                    includeArguments.append(Argument(text: String(decoding: text, as: UTF8.self), quoted: quoted,
                                                     location: location, length: length))
                }
                table.addWord(span: span, copied: scratch, line: location.line)
            case .semicolon:
                guard let first = firstWord else {
                    throw SyntaxError(message: "unexpected \";\"; expected an entry such as \"10.0.0.0/8 value;\"", location: location)
                }
                if first.text == "include" {
                    table.dropPendingRow()
                    let directive = Directive(name: "include", nameLocation: first.location, arguments: includeArguments, block: nil)
                    expandInclude(directive, intoEntries: &table)
                    includeArguments = []
                } else {
                    table.endRow(file: file)
                }
                firstWord = nil
            case .blockStart:
                table.dropPendingRow()
                throw SyntaxError(message: "unexpected \"{\" inside a \"geo\" block; its entries are \"NETWORK VALUE;\" lines",
                                  location: location)
            case .blockEnd:
                if let first = firstWord {
                    table.dropPendingRow()
                    throw SyntaxError(message: "unexpected \"}\"; expected \";\" to end the entry that starts at \(first.location)",
                                      location: location)
                }
                guard opener != nil else {
                    throw SyntaxError(message: "unexpected \"}\" with no block open", location: location)
                }
                return
            case .endOfFile:
                if let first = firstWord {
                    table.dropPendingRow()
                    throw SyntaxError(message: "unexpected end of file, expecting \";\" after the entry that starts here",
                                      location: first.location, length: first.length)
                }
                if let opener {
                    throw SyntaxError(
                        message: "unexpected end of file, expecting \"}\" to close the block \"\(wordText(opener))\" opened here",
                        location: opener.location, length: opener.length)
                }
                return
            }
        }
    }

    /// `include` inside a `geo` block: the files' lines become rows of the same table.
    private mutating func expandInclude(_ directive: Directive, intoEntries table: inout EntryTable) {
        for path in includePaths(directive) {
            guard table.files.count < Int(UInt16.max) else {
                diagnostics.error("a \"geo\" block may include at most 65,534 files", at: directive.nameLocation)
                return
            }
            guard let bytes = readFile(path: path, includedFrom: directive.arguments[0]) else { continue }
            sources.add(file: path, bytes: bytes)
            includeStack.append(path)
            defer { includeStack.removeLast() }
            var lexer = Lexer(bytes: bytes, file: path)
            do {
                try parseEntries(&lexer, opener: nil, into: &table)
            } catch {
                diagnostics.error(error.message, at: error.location, length: error.length)
            }
        }
    }

    private func wordText(_ token: LocatedToken) -> String {
        if case .word(let text, _) = token.token { return text }
        return ""
    }

    private func makeDirective(_ name: LocatedToken, _ rest: ArraySlice<LocatedToken>, block: [Directive]?) -> Directive {
        let arguments = rest.map { token -> Argument in
            guard case .word(let text, let quoted) = token.token else { fatalError("only words are arguments") }
            return Argument(text: text, quoted: quoted, location: token.location, length: token.length)
        }
        return Directive(name: wordText(name), nameLocation: name.location, arguments: arguments, block: block)
    }

    /// `include PATTERN;` — a path or glob relative to the including file, as the issue asks
    /// (nginx resolves against its prefix; for a rule file the including file's folder is what
    /// an operator means). No match for a glob is fine; a missing plain file is an error.
    private mutating func expandInclude(_ directive: Directive) -> [Directive] {
        var result: [Directive] = []
        for path in includePaths(directive) {
            result += parseFile(path: path, includedFrom: directive.arguments[0])
        }
        return result
    }

    /// The files an `include` names, after checking its form, depth and loops.
    private mutating func includePaths(_ directive: Directive) -> [String] {
        guard directive.arguments.count == 1 else {
            diagnostics.error(
                "invalid number of arguments in \"include\": expected 1 path, got \(directive.arguments.count)",
                at: directive.nameLocation, length: directive.name.count)
            return []
        }
        let argument = directive.arguments[0]
        guard includeStack.count < Self.maximumIncludeDepth else {
            diagnostics.error(
                "includes nested deeper than \(Self.maximumIncludeDepth) levels (an include loop?)",
                at: argument.location, length: argument.length)
            return []
        }
        let pattern = Self.resolve(argument.text, relativeTo: directive.nameLocation.file)
        let isGlob = pattern.contains { "*?[".contains($0) }
        let paths = isGlob ? Self.glob(pattern) : [pattern]
        return paths.filter { path in
            guard includeStack.contains(path) else { return true }
            diagnostics.error("\"\(path)\" includes itself", at: argument.location, length: argument.length)
            return false
        }
    }

    public static func resolve(_ path: String, relativeTo file: String) -> String {
        if path.hasPrefix("/") { return path }
        let folder = (file as NSString).deletingLastPathComponent
        return folder.isEmpty ? path : folder + "/" + path
    }

    static func glob(_ pattern: String) -> [String] {
        var result = glob_t()
        defer { globfree(&result) }
        guard Glibc.glob(pattern, 0, nil, &result) == 0 else { return [] }
        return (0..<Int(result.gl_pathc)).compactMap { index in
            result.gl_pathv[index].map { String(cString: $0) }
        }.sorted()
    }
}
