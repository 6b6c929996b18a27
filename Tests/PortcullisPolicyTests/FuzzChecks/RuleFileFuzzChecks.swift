import PortcullisCore
import PortcullisPolicy
import PortcullisRules

/// The checks of the `rule-file` fuzzer (Tests/Fuzz/RuleFileFuzz.swift), shared with the test
/// that replays its corpus (RuleFileCorpusReplayTests): the harness stops on the first
/// violation, the test reports them all. Only public API, no Testing, so that
/// Tests/Fuzz/run-fuzzer.sh can compile this file into the fuzzer with plain swiftc.
enum RuleFileFuzzChecks {
    /// The name the text is loaded under; every location must name it (nothing is included).
    static let file = "fuzz.conf"

    /// Whether the harness runs an input at all: `include` would read the file system (and
    /// glob it), which a fuzzer must not; everything else the compiler reads is the text.
    static func accepts(_ text: String) -> Bool { !text.contains("include") }

    /// Loads the text twice as `portcullis check` does (lexer, parser, compiler), with a fixed
    /// resolver and GeoIP opener, and returns what is wrong, if anything:
    /// - every error has a location; every location is in the text (this file, a line it has,
    ///   a column on that line or just past its end);
    /// - a snapshot exactly when there is no error;
    /// - the second load gives the same diagnostics, in the same order, rendered the same
    ///   (a "did you mean" between equally close names used to follow a dictionary's order).
    /// Not crashing is checked by getting here.
    static func violations(_ text: String) -> [String] {
        let first = load(text)
        let second = load(text)
        var found: [String] = []
        if first.diagnostics != second.diagnostics {
            found.append("two loads disagree:\n\(first.rendered)\n-- then --\n\(second.rendered)")
        } else if first.rendered != second.rendered {
            found.append("two loads render differently:\n\(first.rendered)\n-- then --\n\(second.rendered)")
        }
        if (first.snapshot == nil) != first.hasErrors {
            found.append("snapshot \(first.snapshot == nil ? "missing without" : "present with") errors")
        }
        let lines = text.utf8.split(separator: UInt8(ascii: "\n"), omittingEmptySubsequences: false)
        for diagnostic in first.diagnostics {
            guard let location = diagnostic.location else {
                if diagnostic.severity == .error { found.append("error without a location: \(diagnostic)") }
                continue
            }
            guard location.file == file else {
                found.append("located in another file: \(diagnostic)")
                continue
            }
            guard location.line >= 1, location.line <= lines.count else {
                found.append("line \(location.line) of \(lines.count): \(diagnostic)")
                continue
            }
            // The lexer counts columns in Unicode scalars.
            let width = String(decoding: lines[location.line - 1], as: UTF8.self).unicodeScalars.count
            if location.column < 1 || location.column > width + 1 {
                found.append("column \(location.column) on a line of \(width): \(diagnostic)")
            }
        }
        return found
    }

    static func load(_ text: String) -> CompileResult {
        RuleLoader.load(text: text, file: file, resolver: FixedResolver(), geoip: FixedGeoIP())
    }

    /// Host names without the network: `localhost` is loopback, names under `.invalid` or
    /// `nx` names do not resolve, any other name gets one or two addresses from its bytes.
    struct FixedResolver: HostResolver {
        func addresses(of host: String) -> [IPAddress] {
            if host == "localhost" { return [.v4(0x7F00_0001)] }
            if host.hasSuffix(".invalid") || host.hasPrefix("nx") { return [] }
            var hash: UInt32 = 2_166_136_261
            for byte in host.utf8 { hash = (hash ^ UInt32(byte)) &* 16_777_619 }
            let v4 = IPAddress.v4(0x0A00_0000 | (hash & 0x00FF_FFFF))
            return hash & 0x100_0000 == 0 ? [v4] : [v4, .v4(0x0A00_0000 | (hash >> 8 & 0x00FF_FFFF))]
        }
    }

    /// GeoIP databases without files: a path containing "missing" fails to open, others open
    /// a database that knows no address.
    struct FixedGeoIP: GeoIPOpener {
        func open(path: String, autoReloadMilliseconds: Int?) throws(GeoIPOpenFailure) -> any GeoIPDatabase {
            if path.contains("missing") { throw GeoIPOpenFailure("No such file or directory") }
            return EmptyDatabase(path: path)
        }
    }

    final class EmptyDatabase: GeoIPDatabase {
        let path: String
        init(path: String) { self.path = path }
        func makeQuery(_ path: [String]) -> any GeoIPQuery { NoValues() }
        func metadata(_ field: GeoIPMetadataField) -> UInt64 { 1_700_000_000 }
    }

    struct NoValues: GeoIPQuery {
        func value(for address: IPAddress) -> [UInt8]? { nil }
    }
}
