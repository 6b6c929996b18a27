import Foundation
import PortcullisWire
import PortcullisTestSupport
import Testing

/// Replays the ClientHello fuzzer's committed corpus (Tests/Fuzz/corpus/client-hello) through
/// the peeker. Names say what a file must give: `hello-…` a hello, `bad-…` not TLS,
/// `partial-…` need more; anything else (`crash-…` reproducers, inputs merged in by the
/// fuzzer) must only not crash. See docs/fuzzing.md and Tests/Fuzz/make-client-hello-corpus.py.
@Suite struct ClientHelloCorpusReplayTests {
    static let corpus = FuzzCorpus("client-hello")
    static var files: [String] { corpus.files }

    static func bytes(_ name: String) throws -> [UInt8] {
        try corpus.bytes(name)
    }

    @Test func corpusIsThere() {
        #expect(Self.files.count >= 100, "corpus at \(Self.corpus.directory.path)")
        #expect(Self.files.filter { $0.hasPrefix("hello-capture-") }.count >= 9)
        #expect(Self.files.contains { $0.hasPrefix("bad-") })
        #expect(Self.files.contains { $0.hasPrefix("partial-") })
    }

    @Test func replaysEveryFile() throws {
        for name in Self.files {
            let bytes = try Self.bytes(name)
            let outcome = ClientHelloPeeker.peek(bytes)
            #expect(bytes.withUnsafeBytes { ClientHelloPeeker.peek($0) } == outcome, "\(name): entry points disagree")
            if name.hasPrefix("hello-") {
                guard case .hello = outcome else { Issue.record("\(name): \(outcome)"); continue }
            } else if name.hasPrefix("bad-") {
                #expect(outcome == .notTLS, "\(name)")
            } else if name.hasPrefix("partial-") {
                #expect(outcome == .needMore, "\(name)")
            }
        }
    }

    /// Parse-or-need-more on every file: as bytes arrive the answer goes from "need more" to a
    /// decision at most once, and then keeps it. Files over 2 KiB are cut every 61 bytes and at
    /// their last 8 bytes.
    @Test func answersOnlyChangeOnce() throws {
        for name in Self.files {
            let bytes = try Self.bytes(name)
            var cuts = Array(0...bytes.count)
            if bytes.count > 2048 {
                cuts = Array(stride(from: 0, to: bytes.count - 8, by: 61)) + Array((bytes.count - 8)...bytes.count)
            }
            var decided: ClientHelloPeek?
            for cut in cuts {
                let outcome = ClientHelloPeeker.peek(Array(bytes[..<cut]))
                if let decided {
                    if outcome != decided { Issue.record("\(name): \(decided) then at \(cut) bytes \(outcome)"); break }
                } else if outcome != .needMore {
                    decided = outcome
                }
            }
        }
    }

    /// The Python seed generator and the Swift tests' builder write the same bytes.
    @Test func pythonAndSwiftBuildersAgree() throws {
        let expected: [(String, [UInt8])] = [
            ("hello-typical", HelloBytes.records(HelloBytes.typical)),
            ("hello-1-byte-records", HelloBytes.records(HelloBytes.typical, size: 1)),
            ("hello-no-extensions", HelloBytes.records(HelloBytes.handshake(HelloBytes.body(nil)))),
            ("hello-sslv2-compatible-tls10", HelloBytes.sslv2(version: 0x0301)),
            ("bad-http-get", HelloBytes.text("GET / HTTP/1.1\r\nHost: example.com\r\n\r\n")),
        ]
        for (name, bytes) in expected {
            #expect(try Self.bytes(name + ".bin") == bytes, "\(name).bin")
        }
    }
}
