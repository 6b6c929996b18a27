import Foundation
import PortcullisWire
import PortcullisTestSupport
import Testing

/// Replays the fuzzer's committed corpus (Tests/Fuzz/corpus/proxy-header) through the decoder.
/// Names say what a file must do: `v1-…`/`v2-…` (without "bad") decode to exactly the whole
/// file, `bad-…` throw, `partial-…` need more bytes; anything else (`crash-…` reproducers,
/// `encoder-…` seeds of the harness's encoder mode, inputs merged in by the fuzzer) must only
/// not crash. See docs/fuzzing.md.
@Suite struct FuzzCorpusReplayTests {
    static let corpus = FuzzCorpus("proxy-header")
    static var files: [String] { corpus.files }

    @Test func corpusIsThere() {
        #expect(Self.files.count >= 50, "corpus at \(Self.corpus.directory.path)")
        #expect(Self.files.contains { $0.hasPrefix("bad-") })
        #expect(Self.files.contains { $0.hasPrefix("v1-") })
        #expect(Self.files.contains { $0.hasPrefix("v2-") })
    }

    @Test func replaysEveryFile() throws {
        for name in Self.files {
            let data = try Data(contentsOf: Self.corpus.directory.appendingPathComponent(name))
            let bytes = [UInt8](data)
            let outcome: Result<(header: ProxyHeader, length: Int)?, ProxyHeaderError> = Result {
                () throws(ProxyHeaderError) in try ProxyHeaderDecoder.decode(bytes)
            }
            let isValidName = (name.hasPrefix("v1-") || name.hasPrefix("v2-")) && !name.contains("bad")
            switch outcome {
            case .success(let decoded?):
                #expect(decoded.length > 0 && decoded.length <= bytes.count, "\(name)")
                if isValidName { #expect(decoded.length == bytes.count, "\(name) decoded only \(decoded.length) bytes") }
                #expect(!name.hasPrefix("bad-") && !name.hasPrefix("partial-"), "\(name) decoded")
            case .success(nil):
                #expect(!isValidName && !name.hasPrefix("bad-"), "\(name) needs more bytes")
            case .failure(let error):
                #expect(!isValidName && !name.hasPrefix("partial-"), "\(name) threw \(error)")
            }
        }
    }

    /// Every spec vector in the tests is also a seed of the fuzzer, byte for byte.
    @Test func corpusHoldsTheSpecVectors() throws {
        for vector in SpecVectors.valid {
            let data = try? Data(contentsOf: Self.corpus.directory.appendingPathComponent("\(vector.name).bin"))
            #expect(data.map { [UInt8]($0) } == vector.bytes, "\(vector.name).bin")
        }
        for vector in SpecVectors.invalid {
            let data = try? Data(contentsOf: Self.corpus.directory.appendingPathComponent("\(vector.name).bin"))
            #expect(data.map { [UInt8]($0) } == vector.bytes, "\(vector.name).bin")
        }
    }
}
