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

    public private(set) var diagnostics = DiagnosticBag()
    public private(set) var sources = SourceFiles()
    private var includeStack: [String] = []

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
        // open(2) first, for the system's own words ("No such file or directory").
        let descriptor = open(path, O_RDONLY)
        guard descriptor >= 0 else {
            diagnostics.error(
                "cannot open rule file \"\(path)\": \(String(cString: strerror(errno)))",
                at: includedFrom?.location, length: includedFrom?.length ?? 1)
            return []
        }
        close(descriptor)
        let data: Data
        do {
            data = try Data(contentsOf: URL(fileURLWithPath: path))
        } catch {
            diagnostics.error(
                "cannot read rule file \"\(path)\": \(error.localizedDescription)",
                at: includedFrom?.location, length: includedFrom?.length ?? 1)
            return []
        }
        guard let text = String(data: data, encoding: .utf8) else {
            diagnostics.error("rule file \"\(path)\" is not valid UTF-8 text", at: includedFrom?.location)
            return []
        }
        return parseText(text, file: path)
    }

    private mutating func parseText(_ text: String, file: String) -> [Directive] {
        sources.add(file: file, text: text)
        includeStack.append(file)
        defer { includeStack.removeLast() }
        var lexer = Lexer(text: text, file: file)
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
        var result: [Directive] = []
        for path in paths {
            if includeStack.contains(path) {
                diagnostics.error("\"\(path)\" includes itself", at: argument.location, length: argument.length)
                continue
            }
            result += parseFile(path: path, includedFrom: argument)
        }
        return result
    }

    static func resolve(_ path: String, relativeTo file: String) -> String {
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
