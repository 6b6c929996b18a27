import Foundation
import Testing
import PortcullisCore
@testable import PortcullisRules

/// A fresh folder under the temporary directory, removed by `cleanup()`.
struct TempFolder {
    let path: String
    init() throws {
        path = FileManager.default.temporaryDirectory
            .appendingPathComponent("portcullis-parser-\(UUID().uuidString)").path
        try FileManager.default.createDirectory(atPath: path, withIntermediateDirectories: true)
    }
    func write(_ name: String, _ text: String) throws {
        let full = path + "/" + name
        try FileManager.default.createDirectory(
            atPath: (full as NSString).deletingLastPathComponent, withIntermediateDirectories: true)
        try text.write(toFile: full, atomically: true, encoding: .utf8)
    }
    func cleanup() { try? FileManager.default.removeItem(atPath: path) }
}

/// "name arg arg" for each directive, children indented, for compact comparisons.
func outline(_ directives: [Directive], depth: Int = 0) -> [String] {
    directives.flatMap { d -> [String] in
        let line = String(repeating: "  ", count: depth) + ([d.name] + d.arguments.map(\.text)).joined(separator: " ")
        return [line] + outline(d.block ?? [], depth: depth + 1)
    }
}

@Suite struct ParserTests {
    func parse(_ text: String, file: String = "p.conf") -> (RuleFile, [Diagnostic]) {
        var parser = RuleParser()
        let result = parser.parse(text: text, file: file)
        return (result, parser.diagnostics.all)
    }

    @Test func nestedBlocks() {
        let (file, diagnostics) = parse("""
            worker_processes auto;
            stream {
                # comment
                upstream b { server 127.0.0.1:9000 weight=2; }
                server {
                    listen 8080;
                    proxy_pass b;
                }
            }
            """)
        #expect(diagnostics.isEmpty)
        #expect(file.mainFile == "p.conf")
        #expect(outline(file.directives) == [
            "worker_processes auto", "stream", "  upstream b", "    server 127.0.0.1:9000 weight=2", "  server",
            "    listen 8080", "    proxy_pass b",
        ])
        #expect(file.directives[0].block == nil)
        #expect(file.directives[1].block?.count == 2)
        #expect(file.directives[1].block?[1].block?.isEmpty == false)
    }

    @Test func emptyBlockIsNotNil() {
        let (file, diagnostics) = parse("events {}")
        #expect(diagnostics.isEmpty)
        #expect(file.directives.first?.block == [])
    }

    @Test func locationsOfDirectivesAndArguments() throws {
        let (file, _) = parse("stream {\n    allow   10.0.0.0/8;\n\tdeny \"all\" ;\n}\n")
        let children = try #require(file.directives.first?.block)
        #expect(file.directives[0].nameLocation == SourceLocation(file: "p.conf", line: 1, column: 1))
        #expect(children[0].nameLocation == SourceLocation(file: "p.conf", line: 2, column: 5))
        #expect(children[0].arguments[0].location == SourceLocation(file: "p.conf", line: 2, column: 13))
        #expect(children[0].arguments[0].length == 10)
        #expect(children[0].arguments[0].quoted == false)
        #expect(children[1].nameLocation == SourceLocation(file: "p.conf", line: 3, column: 2))
        #expect(children[1].arguments[0].location == SourceLocation(file: "p.conf", line: 3, column: 7))
        #expect(children[1].arguments[0].text == "all")
        #expect(children[1].arguments[0].quoted)
        #expect(children[1].arguments[0].length == 5)
        #expect(children[1].text == "deny \"all\";")
        #expect(children[0].reference == RuleReference(file: "p.conf", line: 2, text: "allow 10.0.0.0/8;"))
        #expect(file.directives[0].text == "stream { … }")
    }

    @Test func missingSemicolonAtEndOfFile() throws {
        let (_, diagnostics) = parse("stream {\n}\nallow all")
        let d = try #require(diagnostics.first)
        #expect(diagnostics.count == 1)
        #expect(d.description == "p.conf:3:1: error: unexpected end of file, expecting \";\" or \"}\" after the directive \"allow\"")
        #expect(d.length == 5)
    }

    @Test func unclosedBlock() throws {
        let (_, diagnostics) = parse("stream {\n  server {\n    listen 1;\n  }\n")
        #expect(diagnostics.map(\.description) == [
            "p.conf:1:1: error: unexpected end of file, expecting \"}\" to close the block \"stream\" opened here",
        ])
    }

    @Test func unexpectedClosingBrace() {
        let (_, diagnostics) = parse("allow all;\n}\n")
        #expect(diagnostics.map(\.description) == ["p.conf:2:1: error: unexpected \"}\" with no block open"])
    }

    @Test func braceAfterWordsWithoutSemicolon() {
        let (_, diagnostics) = parse("stream { allow all }")
        #expect(diagnostics.map(\.description) == [
            "p.conf:1:20: error: unexpected \"}\"; expected \";\" to end the directive \"allow\"",
        ])
    }

    @Test func strayPunctuation() {
        #expect(parse("stream { ; }").1.map(\.description) == [
            "p.conf:1:10: error: unexpected \";\"; expected a directive name",
        ])
        #expect(parse("{ }").1.map(\.description) == [
            "p.conf:1:1: error: unexpected \"{\"; expected a directive name before a block",
        ])
    }

    @Test func lexerErrorsBecomeDiagnostics() {
        #expect(parse("a \"b\"c;").1.map(\.description) == [
            "p.conf:1:6: error: unexpected \"c\" after a quoted string; expected a space, \";\" or \"{\"",
        ])
    }

    // MARK: include

    @Test func includeGlobRelativeToIncludingFile() throws {
        let dir = try TempFolder()
        defer { dir.cleanup() }
        try dir.write("main.conf", "stream {\n    include conf.d/*.conf;\n    include extra/one.conf;\n}\n")
        try dir.write("conf.d/b.conf", "deny 10.0.0.2;\n")
        try dir.write("conf.d/a.conf", "allow 10.0.0.1;\ninclude ../extra/nested/*.rules;\n")
        try dir.write("conf.d/c.txt", "ignored;\n")
        try dir.write("extra/one.conf", "\n  allow 10.0.0.3;\n")
        try dir.write("extra/nested/n.rules", "deny all;\n")
        var parser = RuleParser()
        let file = parser.parse(file: dir.path + "/main.conf")
        #expect(parser.diagnostics.all.isEmpty, "\(parser.diagnostics.all)")
        #expect(outline(file.directives) == [
            "stream", "  allow 10.0.0.1", "  deny all", "  deny 10.0.0.2", "  allow 10.0.0.3",
        ])
        let children = try #require(file.directives.first?.block)
        #expect(children[0].nameLocation == SourceLocation(file: dir.path + "/conf.d/a.conf", line: 1, column: 1))
        #expect(children[1].nameLocation.file == dir.path + "/conf.d/../extra/nested/n.rules")
        #expect(children[3].nameLocation == SourceLocation(file: dir.path + "/extra/one.conf", line: 2, column: 3))
        #expect(children[3].arguments[0].location == SourceLocation(file: dir.path + "/extra/one.conf", line: 2, column: 9))
        // Sources are kept for every file, so diagnostics can quote them.
        #expect(file.sources.line(2, of: dir.path + "/extra/one.conf") == "  allow 10.0.0.3;")
    }

    @Test func globWithoutMatchesIsFine() throws {
        let dir = try TempFolder()
        defer { dir.cleanup() }
        try dir.write("main.conf", "stream { include none/*.conf; allow all; }\n")
        var parser = RuleParser()
        let file = parser.parse(file: dir.path + "/main.conf")
        #expect(parser.diagnostics.all.isEmpty)
        #expect(outline(file.directives) == ["stream", "  allow all"])
    }

    @Test func missingIncludeFile() throws {
        let dir = try TempFolder()
        defer { dir.cleanup() }
        try dir.write("main.conf", "stream {\n  include missing.conf;\n}\n")
        var parser = RuleParser()
        _ = parser.parse(file: dir.path + "/main.conf")
        let d = try #require(parser.diagnostics.all.first)
        #expect(parser.diagnostics.all.count == 1)
        #expect(d.severity == .error)
        #expect(d.location == SourceLocation(file: dir.path + "/main.conf", line: 2, column: 11))
        #expect(d.length == "missing.conf".count)
        #expect(d.message.hasPrefix("cannot open rule file \"\(dir.path)/missing.conf\": "))
        #expect(d.message.contains("No such file") || d.message.contains("doesn’t exist"), "\(d.message)")
    }

    @Test func missingMainFile() throws {
        var parser = RuleParser()
        _ = parser.parse(file: "/nonexistent-portcullis/x.conf")
        let d = try #require(parser.diagnostics.all.first)
        #expect(d.location == nil)
        #expect(d.message.hasPrefix("cannot open rule file \"/nonexistent-portcullis/x.conf\": "))
    }

    @Test func includeLoop() throws {
        let dir = try TempFolder()
        defer { dir.cleanup() }
        try dir.write("a.conf", "stream {\n  include b.conf;\n}\n")
        try dir.write("b.conf", "allow all;\ninclude a.conf;\n")
        var parser = RuleParser()
        let file = parser.parse(file: dir.path + "/a.conf")
        #expect(parser.diagnostics.all.map(\.description) == [
            "\(dir.path)/b.conf:2:9: error: \"\(dir.path)/a.conf\" includes itself",
        ])
        #expect(outline(file.directives) == ["stream", "  allow all"])
    }

    @Test func selfIncludeThroughGlob() throws {
        let dir = try TempFolder()
        defer { dir.cleanup() }
        try dir.write("a.conf", "include *.conf;\n")
        var parser = RuleParser()
        _ = parser.parse(file: dir.path + "/a.conf")
        #expect(parser.diagnostics.errors.count == 1)
        #expect(parser.diagnostics.errors.first?.message == "\"\(dir.path)/a.conf\" includes itself")
    }

    @Test func includeArgumentCount() {
        let (_, diagnostics) = parse("include a b;")
        #expect(diagnostics.map(\.description) == [
            "p.conf:1:1: error: invalid number of arguments in \"include\": expected 1 path, got 2",
        ])
    }

    @Test func syntaxErrorInIncludedFileEndsOnlyThatFile() throws {
        let dir = try TempFolder()
        defer { dir.cleanup() }
        try dir.write("main.conf", "stream {\n  include bad.conf;\n  allow 10.0.0.9;\n}\n")
        try dir.write("bad.conf", "deny all\n")
        var parser = RuleParser()
        let file = parser.parse(file: dir.path + "/main.conf")
        #expect(parser.diagnostics.all.map(\.description) == [
            "\(dir.path)/bad.conf:1:1: error: unexpected end of file, expecting \";\" or \"}\" after the directive \"deny\"",
        ])
        #expect(outline(file.directives) == ["stream", "  allow 10.0.0.9"])
    }
}
