import Foundation

/// A fuzz target's committed corpus (Tests/Fuzz/corpus/TARGET), which the ordinary tests replay
/// through the same checks as the fuzzer. See docs/fuzzing.md.
public struct FuzzCorpus: Sendable {
    public let directory: URL
    /// The file names, sorted (hidden files left out).
    public let files: [String]

    public init(_ target: String) {
        directory = packageRoot.appendingPathComponent("Tests/Fuzz/corpus/\(target)")
        let names = (try? FileManager.default.contentsOfDirectory(atPath: directory.path)) ?? []
        files = names.filter { !$0.hasPrefix(".") }.sorted()
    }

    public func bytes(_ name: String) throws -> [UInt8] {
        [UInt8](try Data(contentsOf: directory.appendingPathComponent(name)))
    }
}
