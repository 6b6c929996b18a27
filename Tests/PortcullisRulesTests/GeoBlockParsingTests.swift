import Foundation
import PortcullisCore
import PortcullisRules
import Testing

/// A `geo` block's lines are read into an `EntryTable` instead of directives: the same token
/// rules, includes, locations and errors as everywhere else must hold there too.
@Suite struct GeoBlockParsingTests {
    private func parse(_ text: String, file: String = "g.conf") -> (RuleFile, [Diagnostic]) {
        var parser = RuleParser()
        let parsed = parser.parse(text: text, file: file)
        return (parsed, parser.diagnostics.all)
    }

    private func geo(_ file: RuleFile) throws -> EntryTable {
        let stream = try #require(file.directives.first { $0.name == "stream" })
        let geo = try #require(stream.block?.first { $0.name == "geo" })
        #expect(geo.block == [])
        return try #require(geo.entries)
    }

    @Test func rowsWordsAndLocations() throws {
        let (file, diagnostics) = parse("""
            stream {
                geo $remote_addr $country {
                    default    ZZ;
                    10.0.0.0/8 "private net";   # a comment
                  \t192.168.1.1 'q\\'uoted' ;
                    es\\x\\;caped v;
                    ranges;
                }
            }
            """)
        #expect(diagnostics.isEmpty)
        let table = try geo(file)
        #expect(table.count == 5)
        #expect((0..<table.count).map { table.wordCount($0) } == [2, 2, 2, 2, 1])
        #expect(table.word(0, 0) == "default" && table.word(0, 1) == "ZZ")
        #expect(table.word(1, 1) == "private net")
        #expect(table.word(2, 1) == "q'uoted")
        // As nginx: an unknown escape keeps its backslash, and `\;` does not end the word.
        #expect(table.word(3, 0) == "es\\x\\;caped")
        #expect(table.location(1, 0) == SourceLocation(file: "g.conf", line: 4, column: 9))
        #expect(table.location(1, 1) == SourceLocation(file: "g.conf", line: 4, column: 20))
        #expect(table.location(2, 0).column == 8)  // six spaces and a tab: seven columns
        table.withWord(1, 0) { bytes in #expect(Array(bytes) == Array("10.0.0.0/8".utf8)) }
    }

    @Test func includeInsideTheBlockAddsRowsFromThatFile() throws {
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("geo-include-\(UUID())")
        try FileManager.default.createDirectory(at: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(at: dir) }
        try "1.2.3.0/24 NL;\n\n  5.6.7.8 DE;\n".write(to: dir.appendingPathComponent("nets.inc"), atomically: true, encoding: .utf8)
        let main = dir.appendingPathComponent("main.conf").path
        try "stream {\n  geo $g {\n    default -;\n    include nets.inc;\n    9.9.9.9 US;\n  }\n}\n"
            .write(toFile: main, atomically: true, encoding: .utf8)
        var parser = RuleParser()
        let file = parser.parse(file: main)
        #expect(parser.diagnostics.all.isEmpty)
        let table = try geo(file)
        #expect((0..<table.count).map { table.word($0, 0) } == ["default", "1.2.3.0/24", "5.6.7.8", "9.9.9.9"])
        #expect(table.location(2, 0) == SourceLocation(file: dir.path + "/nets.inc", line: 3, column: 3))
        #expect(table.location(3, 0) == SourceLocation(file: main, line: 5, column: 5))
        #expect(file.sources.line(3, of: dir.path + "/nets.inc") == "  5.6.7.8 DE;")
    }

    @Test(arguments: [
        ("stream { geo $g { 10.0.0.0/8 a } }", "g.conf:1:32: error: unexpected \"}\"; expected \";\" to end the entry that starts at g.conf:1:19"),
        ("stream { geo $g { 10.0.0.0/8 { } } }", "g.conf:1:30: error: unexpected \"{\" inside a \"geo\" block; its entries are \"NETWORK VALUE;\" lines"),
        ("stream { geo $g { 10.0.0.0/8 a;", "g.conf:1:10: error: unexpected end of file, expecting \"}\" to close the block \"geo\" opened here"),
        ("stream { geo $g { ; } }", "g.conf:1:19: error: unexpected \";\"; expected an entry such as \"10.0.0.0/8 value;\""),
        ("stream { geo $g { 1.2.3.4 \"open } }", "g.conf:1:27: error: unterminated quoted string, expecting '\"'"),
    ])
    func syntaxErrorsAreLocated(text: String, expected: String) {
        let (_, diagnostics) = parse(text)
        #expect(diagnostics.map(\.description) == [expected])
    }

    @Test func directivesAfterTheGeoBlockAreStillParsed() throws {
        let (file, diagnostics) = parse("stream { geo $g { default x; } server { listen 1; } }")
        #expect(diagnostics.isEmpty)
        let stream = try #require(file.directives.first)
        #expect(stream.block?.map(\.name) == ["geo", "server"])
    }
}
