import Testing
import PortcullisCore
@testable import PortcullisRules

func lex(_ text: String) throws -> [LocatedToken] {
    var lexer = Lexer(text: text, file: "l.conf")
    var tokens: [LocatedToken] = []
    while true {
        let token = try lexer.next()
        tokens.append(token)
        if token.token == .endOfFile { return tokens }
    }
}

func kinds(_ text: String) throws -> [Token] { try lex(text).map(\.token) }

func lexFailure(_ text: String) -> Lexer.Failure? {
    do {
        _ = try lex(text)
        return nil
    } catch let failure as Lexer.Failure {
        return failure
    } catch {
        return nil
    }
}

@Suite struct LexerTests {
    @Test func simpleDirective() throws {
        #expect(try kinds("allow 10.0.0.0/8;") == [
            .word("allow", quoted: false), .word("10.0.0.0/8", quoted: false), .semicolon, .endOfFile,
        ])
    }

    @Test func blocks() throws {
        #expect(try kinds("stream{server{}}") == [
            .word("stream", quoted: false), .blockStart, .word("server", quoted: false), .blockStart,
            .blockEnd, .blockEnd, .endOfFile,
        ])
    }

    @Test func commentsRunToEndOfLine() throws {
        #expect(try kinds("# header\nallow all; # trailing ; { }\n  #x\ndeny all;") == [
            .word("allow", quoted: false), .word("all", quoted: false), .semicolon,
            .word("deny", quoted: false), .word("all", quoted: false), .semicolon, .endOfFile,
        ])
    }

    @Test func hashInsideAWordIsNotAComment() throws {
        #expect(try kinds("a#b c;") == [.word("a#b", quoted: false), .word("c", quoted: false), .semicolon, .endOfFile])
    }

    @Test func doubleQuotedEscapes() throws {
        #expect(try kinds(#"x "a\"b\'c\\d\te\nf\rg";"#) == [
            .word("x", quoted: false), .word("a\"b'c\\d\te\nf\rg", quoted: true), .semicolon, .endOfFile,
        ])
    }

    @Test func singleQuotedEscapes() throws {
        #expect(try kinds(#"x 'it\'s "fine" \\ \t';"#) == [
            .word("x", quoted: false), .word("it's \"fine\" \\ \t", quoted: true), .semicolon, .endOfFile,
        ])
    }

    @Test func otherBackslashesAreKept() throws {
        #expect(try kinds(#"x "\d\w\." \d;"#) == [
            .word("x", quoted: false), .word(#"\d\w\."#, quoted: true), .word(#"\d"#, quoted: false), .semicolon,
            .endOfFile,
        ])
    }

    @Test func escapesInUnquotedWords() throws {
        // As nginx: the backslash keeps ";" and " " inside the word, and stays in the text.
        #expect(try kinds(#"a\;b c\ d e\"f\tg;"#) == [
            .word(#"a\;b"#, quoted: false), .word(#"c\ d"#, quoted: false), .word("e\"f\tg", quoted: false),
            .semicolon, .endOfFile,
        ])
    }

    @Test func quotedSpecialsAreOneWord() throws {
        #expect(try kinds(#"log_format f "a; b { c } # d";"#) == [
            .word("log_format", quoted: false), .word("f", quoted: false), .word("a; b { c } # d", quoted: true),
            .semicolon, .endOfFile,
        ])
        #expect(try kinds(#"x "";"#) == [.word("x", quoted: false), .word("", quoted: true), .semicolon, .endOfFile])
    }

    @Test func variableBraceStaysInsideAWord() throws {
        #expect(try kinds("log_format f ${remote_addr}x;") == [
            .word("log_format", quoted: false), .word("f", quoted: false), .word("${remote_addr}x", quoted: false),
            .semicolon, .endOfFile,
        ])
        // Without "$", "{" ends the word and opens a block.
        #expect(try kinds("a{b;}") == [
            .word("a", quoted: false), .blockStart, .word("b", quoted: false), .semicolon, .blockEnd, .endOfFile,
        ])
    }

    @Test func closingBraceInsideAWordIsPartOfIt() throws {
        #expect(try kinds("a}b c};") == [
            .word("a}b", quoted: false), .word("c}", quoted: false), .semicolon, .endOfFile,
        ])
    }

    @Test func quotedStringFollowedByALetterIsAnError() throws {
        let failure = try #require(lexFailure("x \"abc\"d;"))
        #expect(failure.message == "unexpected \"d\" after a quoted string; expected a space, \";\" or \"{\"")
        #expect(failure.location == SourceLocation(file: "l.conf", line: 1, column: 8))
        let single = try #require(lexFailure("x 'abc''d';"))
        #expect(single.message == "unexpected \"'\" after a quoted string; expected a space, \";\" or \"{\"")
    }

    @Test func quotedStringMayBeFollowedBySemicolonBraceOrSpace() throws {
        #expect(try kinds("\"a\";\"b\"{'c'\t}") == [
            .word("a", quoted: true), .semicolon, .word("b", quoted: true), .blockStart, .word("c", quoted: true),
            .blockEnd, .endOfFile,
        ])
    }

    @Test func unterminatedQuote() throws {
        let failure = try #require(lexFailure("x\n  \"abc;\n"))
        #expect(failure.message == "unterminated quoted string, expecting '\"'")
        #expect(failure.location == SourceLocation(file: "l.conf", line: 2, column: 3))
        let single = try #require(lexFailure("x 'abc"))
        #expect(single.message == "unterminated quoted string, expecting \"'\"")
    }

    @Test func locationsAndLengths() throws {
        let tokens = try lex("stream {\n\tallow  \"10.0.0.1\";\n  é x;\n}")
        let summary = tokens.map { "\($0.location.line):\($0.location.column)/\($0.length)" }
        #expect(summary == ["1:1/6", "1:8/1", "2:2/5", "2:9/10", "2:19/1", "3:3/2", "3:5/1", "3:6/1", "4:1/1", "4:2/1"])
        #expect(tokens[0].location.file == "l.conf")
    }

    @Test func crlfLineEndings() throws {
        let tokens = try lex("a;\r\nb;\r\n")
        #expect(tokens.map(\.token) == [.word("a", quoted: false), .semicolon, .word("b", quoted: false), .semicolon, .endOfFile])
        #expect(tokens[2].location == SourceLocation(file: "l.conf", line: 2, column: 1))
    }
}
