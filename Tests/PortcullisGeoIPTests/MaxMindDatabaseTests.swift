import Foundation
import PortcullisCore
import PortcullisGeoIP
import PortcullisTestSupport
import Testing

/// libmaxminddb through the wrapper, on real .mmdb files this project builds itself:
/// data/country.mmdb (shipped) and Tests/Fixtures/geoip/*.mmdb (test fixtures).
@Suite struct MaxMindDatabaseTests {
    static let fixtures = packageRoot.appendingPathComponent("Tests/Fixtures/geoip")
    static let country = packageRoot.appendingPathComponent("data/country.mmdb").path

    static func text(_ value: GeoValue?) -> String? {
        value.map { String(decoding: $0.nginxText, as: UTF8.self) }
    }

    @Test func openErrorsSayWhatIsWrong() {
        #expect(throws: MaxMindDatabase.OpenError.missing(path: "/nonexistent/x.mmdb", reason: "No such file or directory")) {
            try MaxMindDatabase(path: "/nonexistent/x.mmdb")
        }
        let truncated = Self.fixtures.appendingPathComponent("truncated.mmdb").path
        #expect(throws: MaxMindDatabase.OpenError.notMaxMindDB(path: truncated)) { try MaxMindDatabase(path: truncated) }
        let garbage = Self.fixtures.appendingPathComponent("not-an-mmdb.mmdb").path
        #expect(throws: MaxMindDatabase.OpenError.notMaxMindDB(path: garbage)) { try MaxMindDatabase(path: garbage) }
        #expect(MaxMindDatabase.OpenError.notMaxMindDB(path: "x").description.contains("not a MaxMind DB"))
    }

    @Test func shippedCountryDatabase() throws {
        let db = try MaxMindDatabase(path: Self.country)
        #expect(db.metadata.databaseType == "Portcullis-Country")
        #expect(db.metadata.ipVersion == 6)
        #expect(db.metadata.buildEpoch > 1_700_000_000)
        let code = GeoPath(["country", "iso_code"])
        #expect(Self.text(db.lookup(IPAddress("8.8.8.8")!, path: code)) == "US")
        // IPv4-mapped IPv6 is looked up as IPv4: one client, one country.
        #expect(Self.text(db.lookup(IPAddress("::ffff:8.8.8.8")!, path: code)) == "US")
        #expect(Self.text(db.lookup(IPAddress("2001:4860:4860::8888")!, path: code)) == "US")
        #expect(db.lookup(IPAddress("127.0.0.1")!, path: code) == nil)
        #expect(db.lookup(IPAddress("10.1.2.3")!, path: code) == nil)
        // A map is not a value (nginx's geoip2 gives "not found").
        #expect(db.lookup(IPAddress("8.8.8.8")!, path: GeoPath(["country"])) == nil)
        #expect(db.lookup(IPAddress("8.8.8.8")!, path: GeoPath(["country", "no_such_key"])) == nil)
    }

    @Test(arguments: [
        (["country", "iso_code"], "NL"),
        (["country", "names", "en"], "Netherlands"),
        (["location", "latitude"], "52.37403"),
        (["location", "longitude"], "4.88969"),
        (["location", "accuracy_radius"], "100"),
        (["asn"], "64500"),
        (["delta"], "-42"),
        (["big"], "18446744073709551615"),
        (["huge"], "0x0102030405060708090a0b0c0d0e0f10"),
        (["flag_true"], "1"),
        (["flag_false"], "0"),
        (["ratio"], "0.50000"),
        (["unicode"], "Zürich ✓"),
        (["list", "1"], "b"),
    ])
    func valuesRenderAsNginxGeoip2(path: [String], expected: String) throws {
        let db = try MaxMindDatabase(path: Self.fixtures.appendingPathComponent("types.mmdb").path)
        #expect(Self.text(db.lookup(IPAddress("1.2.3.4")!, path: GeoPath(path))) == expected)
        #expect(Self.text(db.lookup(IPAddress("::ffff:1.2.3.4")!, path: GeoPath(path))) == expected)
    }

    @Test func rawBytesAndNonValues() throws {
        let db = try MaxMindDatabase(path: Self.fixtures.appendingPathComponent("types.mmdb").path)
        #expect(db.lookup(IPAddress("1.2.3.4")!, path: GeoPath(["raw"])) == .bytes([0x00, 0x01, 0xFE, 0xFF]))
        #expect(db.lookup(IPAddress("1.2.3.4")!, path: GeoPath(["list"])) == nil)
        #expect(Self.text(db.lookup(IPAddress("1.2.4.5")!, path: GeoPath(["country", "iso_code"]))) == "DE")
        #expect(Self.text(db.lookup(IPAddress("2001:db8:1::5")!, path: GeoPath(["country", "iso_code"]))) == "JP")
        #expect(db.lookup(IPAddress("10.1.2.3")!, path: GeoPath(["country", "iso_code"])) == nil)
        #expect(db.metadata.buildEpoch == 1_700_000_000)
    }

    @Test func concurrentLookupsFromManyThreadsAgree() async throws {
        let db = try MaxMindDatabase(path: Self.country)
        let path = GeoPath(["country", "iso_code"])
        let probes: [(IPAddress, String?)] = [
            (IPAddress("8.8.8.8")!, "US"), (IPAddress("1.1.1.1")!, "AU"), (IPAddress("127.0.0.1")!, nil),
            (IPAddress("::ffff:8.8.8.8")!, "US"), (IPAddress("2a00:1450:4001::1")!, "IE"),
        ]
        let mismatches = await withTaskGroup(of: Int.self) { group in
            for worker in 0..<8 {
                group.addTask {
                    var wrong = 0
                    for i in 0..<5_000 {
                        let (address, expected) = probes[(i + worker) % probes.count]
                        if Self.text(db.lookup(address, path: path)) != expected { wrong += 1 }
                    }
                    return wrong
                }
            }
            return await group.reduce(0, +)
        }
        #expect(mismatches == 0)
    }
}
