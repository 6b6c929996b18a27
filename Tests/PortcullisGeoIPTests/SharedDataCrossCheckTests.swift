import Foundation
import PortcullisCore
import PortcullisGeoIP
import PortcullisPolicy
import PortcullisTestSupport
import Testing

/// Cross-checks the wrapper against third-party data in `../shared/geoip/` (issue #4): MaxMind's
/// official test databases with the source JSON they were written from, their corrupt
/// databases, and DB-IP Lite as a second opinion on data/country.mmdb. See
/// ../shared/geoip/README.md for what each file is.
///
/// The folder lives beside the package, not in it: it is in some workspaces and not others, and
/// nothing from it is copied into the project (licences, size, and MaxMind's data is fake). So
/// every test here is gated with `.enabled(if: sharedFolderExists)`: without the folder they are
/// reported as skipped, not failed, and the project's own tests (MaxMindDatabaseTests and the
/// fixtures in Tests/Fixtures/geoip) still stand on their own.
@Suite struct SharedDataCrossCheckTests {
    /// The package root is three levels up from this file (Tests/PortcullisGeoIPTests/<file>).
    static let root = URL(fileURLWithPath: #filePath)
        .deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()
    static let shared = root.appendingPathComponent("../shared/geoip").standardized
    static let testData = shared.appendingPathComponent("maxmind/test-data")
    static let sourceData = shared.appendingPathComponent("maxmind/source-data")

    /// Evaluated when the tests run, so a folder added or removed later is noticed.
    static var sharedFolderExists: Bool {
        var isDirectory: ObjCBool = false
        return FileManager.default.fileExists(atPath: shared.path, isDirectory: &isDirectory) && isDirectory.boolValue
    }

    static func text(_ value: GeoValue?) -> String? {
        value.map { String(decoding: $0.nginxText, as: UTF8.self) }
    }

    // MARK: 1. Every network of the source JSON, through the wrapper

    /// How a JSON scalar is rendered by nginx's geoip2 (and `GeoValue.nginxText`).
    enum Kind { case text, integer, fiveDecimals, flag }

    /// Scalar paths compared wherever the JSON record has them. `subdivisions 0 iso_code` goes
    /// through an array.
    static let comparedPaths: [([String], Kind)] = [
        (["country", "iso_code"], .text),
        (["country", "names", "en"], .text),
        (["country", "is_in_european_union"], .flag),
        (["registered_country", "iso_code"], .text),
        (["represented_country", "iso_code"], .text),
        (["continent", "code"], .text),
        (["city", "names", "en"], .text),
        (["city", "geoname_id"], .integer),
        (["subdivisions", "0", "iso_code"], .text),
        (["postal", "code"], .text),
        (["location", "latitude"], .fiveDecimals),
        (["location", "longitude"], .fiveDecimals),
        (["location", "accuracy_radius"], .integer),
        (["location", "time_zone"], .text),
        (["traits", "is_anycast"], .flag),
        (["autonomous_system_number"], .integer),
        (["autonomous_system_organization"], .text),
        (["is_anonymous"], .flag),
        (["is_anonymous_vpn"], .flag),
        (["is_hosting_provider"], .flag),
        (["is_public_proxy"], .flag),
        (["is_residential_proxy"], .flag),
        (["is_tor_exit_node"], .flag),
        (["connection_type"], .text),
    ]

    /// The value at `path` in a JSONSerialization record, if it is a scalar.
    static func jsonScalar(_ record: Any, _ path: [String]) -> Any? {
        var node = record
        for component in path {
            if let map = node as? [String: Any], let next = map[component] {
                node = next
            } else if let list = node as? [Any], let index = Int(component), list.indices.contains(index) {
                node = list[index]
            } else {
                return nil
            }
        }
        return node is [String: Any] || node is [Any] ? nil : node
    }

    static func expectedText(_ value: Any, _ kind: Kind) -> String? {
        switch kind {
        case .text:
            return value as? String
        case .integer:
            if let number = value as? NSNumber { return String(number.int64Value) }
            return (value as? Int).map { String($0) }
        case .fiveDecimals:
            let double = (value as? NSNumber)?.doubleValue ?? (value as? Double) ?? (value as? Int).map(Double.init)
            return double.map { String(format: "%.5f", $0) }
        case .flag:
            let flag = (value as? NSNumber)?.boolValue ?? (value as? Bool)
            return flag.map { $0 ? "1" : "0" }
        }
    }

    /// One network of a source JSON file, in IPv6 terms: IPv4 networks (plain in GeoLite2-*,
    /// inside `::/96` in GeoIP2-*) become `::a.b.c.d/(96 + length)`, as the tree stores them.
    struct Network {
        var key: String
        var index: Int
        var low: UInt128
        var prefixLength: Int
        var record: Any
        var high: UInt128 { prefixLength == 128 ? low : low | ~UInt128(0) >> prefixLength }
        func contains(_ value: UInt128) -> Bool { low <= value && value <= high }
        /// Whether this is an IPv4 network (README: the GeoIP2-* `::/96` form means IPv4).
        var isIPv4: Bool { prefixLength >= 96 && low >> 32 == 0 }
    }

    static func loadNetworks(_ name: String) throws -> [Network] {
        let data = try Data(contentsOf: sourceData.appendingPathComponent("\(name).json"))
        let list = try #require(try JSONSerialization.jsonObject(with: data) as? [Any], "\(name).json is not a list")
        return try list.enumerated().map { index, item in
            let object = try #require(item as? [String: Any], "\(name).json item \(index) is not an object")
            let (key, record) = try #require(object.first, "\(name).json item \(index) is empty")
            let cidr = try #require(CIDR(key), "\(name).json: bad network \(key)")
            switch cidr.network {
            case .v4(let value):
                return Network(key: key, index: index, low: UInt128(value), prefixLength: cidr.prefixLength + 96, record: record)
            case .v6(let value):
                return Network(key: key, index: index, low: value, prefixLength: cidr.prefixLength, record: record)
            }
        }
    }

    /// The network an address gets its record from: the longest prefix containing it; of equal
    /// prefixes (a network written twice), the later one, as the writer inserts in order.
    static func mostSpecific(_ value: UInt128, in networks: [Network]) -> Int? {
        var best: Network? = nil
        for network in networks where network.contains(value) {
            if best == nil || network.prefixLength >= best!.prefixLength { best = network }
        }
        return best?.index
    }

    /// The ways a query for `value` is written. An IPv4 address is asked as IPv4, and in an
    /// IPv6 tree also as `::ffff:a.b.c.d` (folded to IPv4 by the wrapper), `::a.b.c.d` (the
    /// `::/96` subtree itself) and `2002:aabb:ccdd::` (6to4; MaxMind's writer aliases
    /// `::ffff:0:0/96` and `2002::/16` to the IPv4 subtree, README "Notes").
    static func queries(for value: UInt128, isIPv4: Bool, ipv6Tree: Bool) -> [IPAddress] {
        guard isIPv4 else { return [.v6(value)] }
        let v4 = UInt32(truncatingIfNeeded: value)
        guard ipv6Tree else { return [.v4(v4)] }
        return [.v4(v4), .v6(0xFFFF << 32 | UInt128(v4)), .v6(UInt128(v4)), .v6(0x2002 << 112 | UInt128(v4) << 80)]
    }

    static let sourceDatabases = [
        "GeoIP2-Country-Test", "GeoIP2-City-Test", "GeoIP2-Anonymous-IP-Test", "GeoIP2-Connection-Type-Test",
        "GeoLite2-Country-Test", "GeoLite2-City-Test", "GeoLite2-ASN-Test",
    ]

    @Test(.enabled(if: SharedDataCrossCheckTests.sharedFolderExists), arguments: SharedDataCrossCheckTests.sourceDatabases)
    func everyNetworkOfTheSourceJSONAgrees(name: String) throws {
        let db = try MaxMindDatabase(path: Self.testData.appendingPathComponent("\(name).mmdb").path)
        let networks = try Self.loadNetworks(name)
        #expect(!networks.isEmpty)
        let paths = Self.comparedPaths.map { (GeoPath($0.0), $0.0, $0.1) }
        var comparisons = 0
        var shadowed = 0
        var absentChecked = 0
        var mismatches: [String] = []
        for network in networks {
            for value in Set([network.low, network.high]).sorted() {
                // A more specific network (or a later copy) overrides this one here.
                guard Self.mostSpecific(value, in: networks) == network.index else {
                    shadowed += 1
                    continue
                }
                for address in Self.queries(for: value, isIPv4: network.isIPv4, ipv6Tree: db.metadata.ipVersion == 6) {
                    for (geoPath, components, kind) in paths {
                        let actual = Self.text(db.lookup(address, path: geoPath))
                        guard let scalar = Self.jsonScalar(network.record, components) else {
                            // A path the record lacks must not be found (nothing merged in).
                            absentChecked += 1
                            if let actual {
                                mismatches.append(
                                    "\(name) \(network.key) \(address) \(components.joined(separator: " ")): "
                                        + "not in JSON, wrapper \(actual)")
                            }
                            continue
                        }
                        let expected = Self.expectedText(scalar, kind)
                        comparisons += 1
                        if expected == nil || actual != expected {
                            mismatches.append(
                                "\(name) \(network.key) \(address) \(components.joined(separator: " ")): "
                                    + "JSON \(expected ?? "<\(type(of: scalar))>"), wrapper \(actual ?? "nil")")
                        }
                    }
                }
            }
        }
        print("\(name): \(networks.count) networks, \(comparisons) value comparisons, \(absentChecked) absent paths "
            + "checked, \(shadowed) shadowed ends, \(mismatches.count) mismatches")
        #expect(comparisons > 0)
        // A count, not the array: #expect would print every element of a failing array.
        let mismatchCount = mismatches.count
        #expect(
            mismatchCount == 0,
            "\(mismatchCount) mismatches; first 10:\n\(mismatches.prefix(10).joined(separator: "\n"))")
    }

    // MARK: 2. The README's known answers

    /// README 1a, `GeoIP2-Country-Test.mmdb`, `country iso_code`: nil is "no country" (214.1.1.1,
    /// 2a02:d500::1, 2a02:ec80::1: found, but no `country`) or "not found" (1.1.1.1, 127.0.0.1,
    /// 8.8.8.8).
    static let countryKnownAnswers: [(String, String?)] = [
        ("81.2.69.142", "GB"), ("81.2.69.143", "GB"), ("81.2.69.160", "GB"), ("81.2.69.191", "GB"),
        ("216.160.83.56", "US"),
        ("89.160.20.112", "SE"), ("89.160.20.128", "SE"),
        ("67.43.156.1", "BT"),
        ("202.196.224.0", "PH"),
        ("175.16.199.0", "CN"), ("175.16.199.1", "CN"), ("175.16.199.255", "CN"),
        ("2.125.160.216", "GB"),
        ("214.78.120.1", "US"),
        ("2001:218::1", "JP"),
        ("2a02:d3c0::1", "GB"),
        ("::ffff:81.2.69.142", "GB"),
        ("214.1.1.1", nil), ("2a02:d500::1", nil), ("2a02:ec80::1", nil),
        ("1.1.1.1", nil), ("127.0.0.1", nil), ("8.8.8.8", nil),
    ]

    @Test(.enabled(if: SharedDataCrossCheckTests.sharedFolderExists), arguments: SharedDataCrossCheckTests.countryKnownAnswers)
    func readmeKnownCountryAnswers(address: String, expected: String?) throws {
        let db = try MaxMindDatabase(path: Self.testData.appendingPathComponent("GeoIP2-Country-Test.mmdb").path)
        let ip = try #require(IPAddress(address))
        #expect(Self.text(db.lookup(ip, path: GeoPath(["country", "iso_code"]))) == expected)
    }

    /// The README's other notes: registered and represented countries, "no country" that is still
    /// found, and a few City and Anonymous-IP answers.
    @Test(.enabled(if: SharedDataCrossCheckTests.sharedFolderExists))
    func readmeNotes() throws {
        func answer(_ file: String, _ address: String, _ path: [String]) throws -> String? {
            let db = try MaxMindDatabase(path: Self.testData.appendingPathComponent(file).path)
            return Self.text(db.lookup(try #require(IPAddress(address)), path: GeoPath(path)))
        }
        let country = "GeoIP2-Country-Test.mmdb"
        #expect(try answer(country, "81.2.69.142", ["registered_country", "iso_code"]) == "US")
        #expect(try answer(country, "216.160.83.56", ["registered_country", "iso_code"]) == "GB")
        #expect(try answer(country, "89.160.20.112", ["registered_country", "iso_code"]) == "DE")
        #expect(try answer(country, "67.43.156.1", ["registered_country", "iso_code"]) == "RO")
        #expect(try answer(country, "2.125.160.216", ["registered_country", "iso_code"]) == "FR")
        #expect(try answer(country, "202.196.224.0", ["represented_country", "iso_code"]) == "US")
        // Found, only without a country: the record is {"traits":{"is_anycast":true}}.
        #expect(try answer(country, "214.1.1.1", ["traits", "is_anycast"]) == "1")
        for file in ["GeoIP2-City-Test.mmdb", "GeoLite2-City-Test.mmdb"] {
            #expect(try answer(file, "81.2.69.142", ["city", "names", "en"]) == "London")
            #expect(try answer(file, "81.2.69.142", ["country", "iso_code"]) == "GB")
            #expect(try answer(file, "89.160.20.112", ["city", "names", "en"]) == "Linköping")
            #expect(try answer(file, "175.16.199.0", ["city", "names", "en"]) == "Changchun")
            #expect(try answer(file, "175.16.199.0", ["country", "iso_code"]) == "CN")
        }
        let anonymous = "GeoIP2-Anonymous-IP-Test.mmdb"
        for flag in ["is_anonymous", "is_anonymous_vpn", "is_hosting_provider", "is_public_proxy",
                     "is_residential_proxy", "is_tor_exit_node"] {
            #expect(try answer(anonymous, "81.2.69.1", [flag]) == "1", "81.2.69.1 \(flag)")
        }
        #expect(try answer(anonymous, "1.124.213.1", ["is_tor_exit_node"]) == "1")
        #expect(try answer(anonymous, "1.124.213.1", ["is_anonymous_vpn"]) == "1")
    }

    // MARK: 3. Corrupt databases: refused, or answering without crashing

    static func brokenFiles() -> [URL] {
        let badData = shared.appendingPathComponent("maxmind/bad-data")
        var files: [URL] = []
        if let walk = FileManager.default.enumerator(at: badData, includingPropertiesForKeys: nil) {
            for case let url as URL in walk where url.pathExtension == "mmdb" { files.append(url) }
        }
        for name in [
            "MaxMind-DB-test-broken-pointers-24", "MaxMind-DB-test-broken-search-tree-24",
            "GeoIP2-City-Test-Broken-Double-Format", "GeoIP2-City-Test-Invalid-Node-Count",
        ] {
            files.append(testData.appendingPathComponent("\(name).mmdb"))
        }
        return files.sorted { $0.path < $1.path }
    }

    /// Addresses and paths tried on each corrupt file that opens: the README's probes, the
    /// 1.1.1.x ranges of the format databases, the known test networks, and IPv6.
    static let brokenProbeAddresses: [IPAddress] = (
        ["1.1.1.1", "8.8.8.8", "::1", "2001:db8::1", "::ffff:1.1.1.1", "2002:101:101::", "81.2.69.142", "2.125.160.216",
         "216.160.83.56", "89.160.20.112", "175.16.199.0", "67.43.156.1", "2001:218::1", "::1:ffff:ffff", "::2:0:0",
         "255.255.255.255", "0.0.0.0", "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"]
        + (0...40).map { "1.1.1.\($0)" }
    ).map { IPAddress($0)! }

    static let brokenProbePaths: [[String]] = [
        ["country", "iso_code"], ["city", "names", "en"], ["location", "latitude"], ["ip"], ["subdivisions", "0", "iso_code"],
    ]

    @Test(.enabled(if: SharedDataCrossCheckTests.sharedFolderExists))
    func corruptDatabasesAreRefusedOrAnswerWithoutCrashing() throws {
        let files = Self.brokenFiles()
        #expect(files.count >= 25, "found only \(files.count) corrupt files")
        let paths = Self.brokenProbePaths.map(GeoPath.init)
        var opened: [String] = []
        var refused: [String] = []
        for file in files {
            let name = file.path.replacingOccurrences(of: Self.shared.path + "/maxmind/", with: "")
            let database: MaxMindDatabase
            do {
                database = try MaxMindDatabase(path: file.path)
            } catch {
                // Typed throws: every failure is a `MaxMindDatabase.OpenError`.
                #expect(!error.description.isEmpty, "\(name): empty error description")
                refused.append("\(name): \(error.description.replacingOccurrences(of: file.path, with: "<file>"))")
                // The reloadable wrapper (what `geoip2` blocks use) refuses the same files.
                #expect(throws: MaxMindDatabase.OpenError.self, "\(name)") {
                    try ReloadableGeoIPDatabase(path: file.path)
                }
                continue
            }
            // Answers may be nil or any value; the point is that none of these crashes.
            var found = 0
            for address in Self.brokenProbeAddresses {
                for path in paths where database.lookup(address, path: path) != nil { found += 1 }
            }
            let reloadable = try ReloadableGeoIPDatabase(path: file.path)
            let query = reloadable.makeQuery(["country", "iso_code"])
            for address in Self.brokenProbeAddresses { _ = query.value(for: address) }
            for field in [GeoIPMetadataField.buildEpoch, .lastCheck, .lastChange] { _ = reloadable.metadata(field) }
            if name.hasSuffix("libmaxminddb-uint64-max-epoch.mmdb") {
                // README: build_epoch is UINT64_MAX; nothing may narrow it (or trap doing so).
                #expect(database.metadata.buildEpoch == UInt64.max)
                #expect(reloadable.metadata(.buildEpoch) == UInt64.max)
            }
            opened.append("\(name) (\(database.metadata.databaseType), \(found) values found)")
        }
        print("corrupt databases opened (\(opened.count)):\n  " + opened.joined(separator: "\n  "))
        print("corrupt databases refused (\(refused.count)):\n  " + refused.joined(separator: "\n  "))
        #expect(opened.count + refused.count == files.count)
    }

    // MARK: 4. data/country.mmdb against DB-IP Lite

    /// Blocks that are not public unicast (RFC 6890 and friends): neither database should know
    /// them, and they say nothing about agreement.
    static let reservedIPv4: [CIDR] = [
        "0.0.0.0/8", "10.0.0.0/8", "100.64.0.0/10", "127.0.0.0/8", "169.254.0.0/16", "172.16.0.0/12",
        "192.0.0.0/24", "192.0.2.0/24", "192.31.196.0/24", "192.52.193.0/24", "192.88.99.0/24", "192.168.0.0/16",
        "192.175.48.0/24", "198.18.0.0/15", "198.51.100.0/24", "203.0.113.0/24", "224.0.0.0/4", "240.0.0.0/4",
    ].map { CIDR($0)! }

    @Test(.enabled(if: SharedDataCrossCheckTests.sharedFolderExists))
    func shippedCountryDatabaseMostlyAgreesWithDBIPLite() throws {
        let ours = try MaxMindDatabase(path: Self.root.appendingPathComponent("data/country.mmdb").path)
        let dbip = try MaxMindDatabase(path: Self.shared.appendingPathComponent("demo/dbip-country-lite-v4.mmdb").path)
        let path = GeoPath(["country", "iso_code"])
        var random = SplitMix64(seed: 0x5EED_0004)
        var sampled = 0, bothKnown = 0, agree = 0, onlyOurs = 0, onlyDBIP = 0
        var disagreements: [String: Int] = [:]
        while sampled < 20_000 {
            let address = IPAddress.v4(UInt32(truncatingIfNeeded: random.next() >> 32))
            if Self.reservedIPv4.contains(where: { $0.contains(address) }) { continue }
            sampled += 1
            let a = Self.text(ours.lookup(address, path: path))
            let b = Self.text(dbip.lookup(address, path: path))
            switch (a, b) {
            case (let a?, let b?):
                bothKnown += 1
                if a == b { agree += 1 } else { disagreements["\(a)/\(b)", default: 0] += 1 }
            case (_?, nil): onlyOurs += 1
            case (nil, _?): onlyDBIP += 1
            case (nil, nil): break
            }
        }
        let agreement = bothKnown == 0 ? 0 : Double(agree) / Double(bothKnown)
        let top = disagreements.sorted { $0.value > $1.value || ($0.value == $1.value && $0.key < $1.key) }.prefix(10)
        print(String(
            format: "data/country.mmdb vs DB-IP Lite: %d public IPv4 addresses, both know %d, agree %d (%.2f%%); "
                + "only ours %d, only DB-IP %d", sampled, bothKnown, agree, agreement * 100, onlyOurs, onlyDBIP)
            + "; most common disagreements (ours/DB-IP): "
            + top.map { "\($0.key) \($0.value)" }.joined(separator: ", "))
        #expect(bothKnown > 10_000, "only \(bothKnown) of \(sampled) addresses are known to both")
        #expect(agreement >= 0.90, "agreement \(agreement * 100)% is below 90%")
    }
}
