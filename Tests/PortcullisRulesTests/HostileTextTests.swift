import Foundation
import Testing
import PortcullisCore
@testable import PortcullisRules

/// Rule text built to hurt the parser (issue #16 item 2): each case is one located error, and
/// what is read stays bounded. The same files through `portcullis check` and `run`, with time
/// and peak memory measured, are in PortcullisEndToEndTests/HostileRuleFileTests.swift.
@Suite struct HostileTextTests {
    func parse(file path: String) -> (RuleFile, [Diagnostic], String) {
        var parser = RuleParser()
        let file = parser.parse(file: path)
        return (file, parser.diagnostics.all, file.sources.render(parser.diagnostics.all))
    }

    func parse(text: String, file: String = "h.conf") -> ([Diagnostic], String) {
        var parser = RuleParser()
        let parsed = parser.parse(text: text, file: file)
        return (parser.diagnostics.all, parsed.sources.render(parser.diagnostics.all))
    }

    @Test func deeplyNestedBlocksAreOneErrorNotAStackOverflow() {
        // 100,000 levels used to recurse once per level and overflow the stack (SIGSEGV).
        let depth = 100_000
        let text = "stream {\n" + String(repeating: "a{", count: depth) + String(repeating: "}", count: depth) + "\n}\n"
        let (diagnostics, rendered) = parse(text: text)
        #expect(diagnostics.count == 1)
        // `stream` is level 1; the 64th `a{` opens level 65, at column 2 × 64 - 1 of line 2.
        #expect(diagnostics.first?.description == "h.conf:2:127: error: blocks nested deeper than 64 levels")
        // The quoted line is a window around the caret, not 200,000 characters.
        #expect(rendered.count < 400, "\(rendered.count) characters")
    }

    @Test func sixtyFourLevelsAreFine() {
        let text = "stream {\n" + String(repeating: "a{", count: 63) + String(repeating: "}", count: 63) + "\n}\n"
        #expect(parse(text: text).0.isEmpty)
    }

    @Test func aHugeTokenIsCutShort() {
        let word = String(repeating: "x", count: 50_000_000)
        let (diagnostics, rendered) = parse(text: "stream { allow " + word + "; }\n")
        #expect(diagnostics.map(\.description) == [
            "h.conf:1:16: error: too long word (more than 4096 bytes) starting \"xxxxxxxxxxxxxxxxxxxxxxxx...\"",
        ])
        #expect(rendered.count < 600, "\(rendered.count) characters")
    }

    @Test func anUnclosedQuoteNamesItself() {
        let (diagnostics, _) = parse(text: "stream {\n  log_format main \"$remote_addr\n" + String(repeating: "allow all;\n", count: 500))
        #expect(diagnostics.map(\.description) == [
            "h.conf:2:19: error: too long word (more than 4096 bytes) starting \"\\\"$remote_addr\\nallow all;...\"; a missing closing quote?",
        ])
    }

    @Test func wordsOfExactlyTheLimitAreRead() {
        let word = String(repeating: "y", count: Lexer.maximumWordLength)
        let (diagnostics, _) = parse(text: "stream { map $a $b { " + word + " 1; } }\n")
        #expect(diagnostics.isEmpty)
        let (quoted, _) = parse(text: "stream { map $a $b { \"" + String(word.dropFirst(2)) + "\" 1; } }\n")
        #expect(quoted.isEmpty)
    }

    @Test func theWordLimitCountsBytesAsWritten() {
        let limit = Lexer.maximumWordLength
        func errors(_ text: String) -> [String] { parse(text: text).0.map(\.message) }
        let tooLong = "too long word (more than \(limit) bytes)"
        // Unquoted: limit bytes pass, one more fails, also when the word ends the file.
        #expect(errors("stream { map $a $b { " + String(repeating: "y", count: limit) + " 1; } }\n").isEmpty)
        #expect(errors("stream { map $a $b { " + String(repeating: "y", count: limit + 1) + " 1; } }\n").first?.hasPrefix(tooLong) == true)
        #expect(errors("stream { " + String(repeating: "y", count: limit + 1)).first?.hasPrefix(tooLong) == true)
        // Quoted: both quotes count.
        #expect(errors("stream { map $a $b { \"" + String(repeating: "y", count: limit - 2) + "\" 1; } }\n").isEmpty)
        #expect(errors("stream { map $a $b { \"" + String(repeating: "y", count: limit - 1) + "\" 1; } }\n").first?.hasPrefix(tooLong) == true)
        // The excerpt does not cut a character in two.
        let accented = errors("stream { allow a" + String(repeating: "é", count: limit) + "; }\n").first ?? ""
        #expect(accented.contains("starting \"a" + String(repeating: "é", count: 11) + "...\""), "\(accented)")
    }

    @Test func sourceLinesAreShownWithoutControlCharacters() {
        // An escape sequence in a hostile file reaches the terminal as U+FFFD, caret aligned.
        let (_, rendered) = parse(text: "stream {\n\tallow \u{1B}]0\u{07} }\n")
        #expect(rendered.hasSuffix("\tallow \u{FFFD}]0\u{FFFD} }\n\t" + String(repeating: " ", count: 11) + "^"), "\(rendered.debugDescription)")
        #expect(!rendered.unicodeScalars.contains { $0.value == 0x1B || $0.value == 0x07 })
    }

    @Test func aNulBeforeInvalidUTF8IsWhatIsReported() throws {
        let dir = try TempFolder()
        defer { dir.cleanup() }
        try Data(Array("ab".utf8) + [0] + Array("cdefg".utf8) + [0xFF]).write(to: URL(fileURLWithPath: dir.path + "/main.conf"))
        let (_, diagnostics, _) = parse(file: dir.path + "/main.conf")
        #expect(diagnostics.map(\.description) == ["\(dir.path)/main.conf:1:3: error: a NUL byte (0x00) in a rule file; is this a binary file?"])
    }

    @Test func procFilesAreBounded() {
        // /proc files say their size is 0. cmdline is NUL-separated: refused at its first NUL.
        // pagemap has gigabytes of binary behind the 0 and refuses a read of other than
        // 8-byte multiples: an error at once, not gigabytes read.
        let started = Date()
        let (cmdline, _) = parse(text: "stream { include /proc/self/cmdline; }\n")
        #expect(cmdline.first?.message == "a NUL byte (0x00) in a rule file; is this a binary file?", "\(cmdline)")
        let (pagemap, _) = parse(text: "stream { include /proc/self/pagemap; }\n")
        #expect(pagemap.count == 1 && pagemap.first?.location != nil, "\(pagemap)")
        #expect(Date().timeIntervalSince(started) < 5)
    }

    @Test func aNulByteIsLocated() throws {
        let (diagnostics, rendered) = parse(text: "stream {\n  allow 10.0.0.1;\u{0}\n}\n")
        #expect(rendered == "h.conf:2:18: error: a NUL byte (0x00) in a rule file; is this a binary file?\n"
                + "  allow 10.0.0.1;\n" + String(repeating: " ", count: 17) + "^")
        #expect(diagnostics.count == 1)
    }

    @Test func invalidUTF8IsLocatedWhereItIs() throws {
        let dir = try TempFolder()
        defer { dir.cleanup() }
        try dir.write("main.conf", "stream {\n  include bad.conf;\n}\n")
        let bytes = Array("allow all;\n# caf".utf8) + [0xC3, 0x28] + Array(" here\n".utf8)
        try Data(bytes).write(to: URL(fileURLWithPath: dir.path + "/bad.conf"))
        let (_, diagnostics, rendered) = parse(file: dir.path + "/main.conf")
        #expect(rendered == [
            "\(dir.path)/bad.conf:2:6: error: invalid UTF-8 (byte 0xC3); rule files are UTF-8 text",
            "# caf",
            "     ^",
            "\(dir.path)/main.conf:2:11: note: included from here",
            "  include bad.conf;",
            "          ^~~~~~~~",
        ].joined(separator: "\n"))
        #expect(diagnostics.filter { $0.severity == .error }.count == 1)
    }

    @Test func includingADirectorySaysHowToIncludeItsFiles() throws {
        let dir = try TempFolder()
        defer { dir.cleanup() }
        try dir.write("conf.d/a.conf", "allow all;\n")
        try dir.write("main.conf", "stream {\n  include conf.d;\n}\n")
        let (_, diagnostics, _) = parse(file: dir.path + "/main.conf")
        #expect(diagnostics.map(\.description) == [
            "\(dir.path)/main.conf:2:11: error: cannot read rule file \"\(dir.path)/conf.d\": it is a directory (to include the files in it, write \"\(dir.path)/conf.d/*.conf\")",
        ])
    }

    @Test func includingADeviceOrAFIFOIsRefusedWithoutReading() throws {
        let dir = try TempFolder()
        defer { dir.cleanup() }
        #expect(mkfifo(dir.path + "/fifo", 0o600) == 0)
        // /dev/zero would never end; a FIFO without a writer would block the open.
        try dir.write("main.conf", "stream {\n  include /dev/zero;\n  include fifo;\n}\n")
        let (_, diagnostics, _) = parse(file: dir.path + "/main.conf")
        #expect(diagnostics.map(\.description) == [
            "\(dir.path)/main.conf:2:11: error: cannot read rule file \"/dev/zero\": it is not a regular file",
            "\(dir.path)/main.conf:3:11: error: cannot read rule file \"\(dir.path)/fifo\": it is not a regular file",
        ])
    }

    @Test func aGeoBlockIncludingBinaryIsLocatedToo() throws {
        let dir = try TempFolder()
        defer { dir.cleanup() }
        try dir.write("main.conf", "stream {\n  geo $g {\n    include nets.txt;\n  }\n}\n")
        try Data(Array("10.0.0.0/8 a;\n".utf8) + [0, 1, 2]).write(to: URL(fileURLWithPath: dir.path + "/nets.txt"))
        let (_, diagnostics, _) = parse(file: dir.path + "/main.conf")
        #expect(diagnostics.map(\.description) == [
            "\(dir.path)/nets.txt:2:1: error: a NUL byte (0x00) in a rule file; is this a binary file?",
            "\(dir.path)/main.conf:3:13: note: included from here",
        ])
    }

    @Test func includeFanOutIsBounded() throws {
        let dir = try TempFolder()
        defer { dir.cleanup() }
        // Eight files that each include all eight: the loop check stops a file including an
        // includer, which still leaves 8!/(8-k)! chains of k files (109,600 in all); the file
        // count stops the fan-out.
        for i in 0..<8 { try dir.write("f\(i).rules", "include f*.rules;\n") }
        try dir.write("main.conf", "stream {\n  include f*.rules;\n}\n")
        let started = Date()
        let (_, diagnostics, _) = parse(file: dir.path + "/main.conf")
        #expect(Date().timeIntervalSince(started) < 60)
        #expect(diagnostics.filter { $0.message.hasPrefix("more than 10000 rule files are included") }.count == 1)
        #expect(diagnostics.contains { $0.message.hasSuffix("includes itself") })
        #expect(diagnostics.allSatisfy { $0.location != nil })
    }

    @Test func suggestionsAreTheSameEveryTime() {
        // Both are one edit from "allox"; the alphabetically first wins, whatever the order.
        #expect(closestMatch(to: "allox", in: ["allow", "allot"]) == "allot")
        #expect(closestMatch(to: "allox", in: ["allot", "allow"]) == "allot")
        #expect(closestMatch(to: String(repeating: "a", count: 65), in: [String(repeating: "a", count: 64)]) == nil)
    }

    @Test func longLinesAreQuotedAsAWindow() {
        let line = Array((String(repeating: "a", count: 300) + "X" + String(repeating: "é", count: 300)).utf8)
        let (text, column) = SourceFiles.window(of: line[...], column: 301)
        #expect(text.count == 166)
        #expect(text.hasPrefix("...a") && text.hasSuffix("é..."))
        #expect(Array(text)[column - 1] == "X")
        // Near the end the window ends with the line; near the start it starts with it.
        let (end, endColumn) = SourceFiles.window(of: line[...], column: 600)
        #expect(end.count == 163 && end.hasPrefix("...") && !end.hasSuffix("...") && endColumn == 163 - 1)
        let (start, startColumn) = SourceFiles.window(of: line[...], column: 2)
        #expect(start.count == 163 && !start.hasPrefix("...") && start.hasSuffix("...") && startColumn == 2)
        let short = Array("allow all;".utf8)
        #expect(SourceFiles.window(of: short[...], column: 7) == ("allow all;", 7))
    }
}
