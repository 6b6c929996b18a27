#if canImport(Glibc)
import Glibc
#endif
import Dispatch
import Foundation
import PortcullisCore
import PortcullisGeoIP
import PortcullisPolicy
import PortcullisTestSupport
import Synchronization
import Testing

/// `auto_reload` done safely: the database behind the policy's `GeoIPDatabase` protocol is
/// replaced only by a file that opens and reads cleanly, whichever way the file is replaced
/// (renamed over, rewritten in place, truncated, deleted), and lookups never crash or see
/// anything but the old or the new database. Every test works on copies of the fixtures in
/// Tests/Fixtures/geoip (types.mmdb: 1.2.3.0/24 is NL, build epoch 1700000000; types-v2.mmdb:
/// BE, 1700000100), in its own temporary folder, with modification times set explicitly.
@Suite struct ReloadableGeoIPDatabaseTests {
    static let country = ["country", "iso_code"]
    static let v1Epoch: UInt64 = 1_700_000_000
    static let v2Epoch: UInt64 = 1_700_000_100

    static func answer(_ query: any GeoIPQuery, _ address: String) -> String? {
        query.value(for: IPAddress(address)!).map { String(decoding: $0, as: UTF8.self) }
    }

    // MARK: Values through the protocol

    @Test func valuesThroughTheProtocol() throws {
        let workspace = try Workspace()
        let db = try MaxMindOpener().open(path: workspace.path, autoReloadMilliseconds: nil)
        #expect(db.path == workspace.path)
        let code = db.makeQuery(Self.country)
        #expect(Self.answer(code, "1.2.3.4") == "NL")
        #expect(Self.answer(code, "::ffff:1.2.3.4") == "NL")
        #expect(Self.answer(code, "1.2.4.5") == "DE")
        #expect(Self.answer(code, "2001:db8:1::5") == "JP")
        #expect(Self.answer(code, "10.1.2.3") == nil)
        #expect(Self.answer(db.makeQuery(["location", "latitude"]), "1.2.3.4") == "52.37403")
        #expect(Self.answer(db.makeQuery(["flag_true"]), "1.2.3.4") == "1")
        // Maps and missing keys are not values.
        #expect(Self.answer(db.makeQuery(["country"]), "1.2.3.4") == nil)
        #expect(Self.answer(db.makeQuery(["country", "no_such_key"]), "1.2.3.4") == nil)
        #expect(db.metadata(.buildEpoch) == Self.v1Epoch)
    }

    @Test func openerPassesTheReloadIntervalAndReportsFailuresInOperatorWords() throws {
        let workspace = try Workspace()
        let opener = MaxMindOpener()
        let reloading = try opener.open(path: workspace.path, autoReloadMilliseconds: 300_000)
        #expect((reloading as? ReloadableGeoIPDatabase)?.autoReloadMilliseconds == 300_000)
        let never = try opener.open(path: workspace.path, autoReloadMilliseconds: nil)
        #expect((never as? ReloadableGeoIPDatabase)?.autoReloadMilliseconds == nil)
        // nginx: `auto_reload 0` is no reloading.
        let zero = try opener.open(path: workspace.path, autoReloadMilliseconds: 0)
        #expect((zero as? ReloadableGeoIPDatabase)?.autoReloadMilliseconds == nil)

        let missing = workspace.directory.appendingPathComponent("nope.mmdb").path
        #expect(throws: GeoIPOpenFailure.self) { try opener.open(path: missing, autoReloadMilliseconds: nil) }
        do {
            _ = try opener.open(path: missing, autoReloadMilliseconds: nil)
        } catch {
            #expect(error.message == "cannot open GeoIP database \"\(missing)\": No such file or directory")
        }
        let garbage = Workspace.fixtures.appendingPathComponent("not-an-mmdb.mmdb").path
        do {
            _ = try opener.open(path: garbage, autoReloadMilliseconds: nil)
            Issue.record("a file that is not an MMDB opened")
        } catch {
            #expect(error.message == MaxMindDatabase.OpenError.notMaxMindDB(path: garbage).description)
        }
    }

    // MARK: Reload checks

    @Test func unchangedFileIsNotReloaded() throws {
        let workspace = try Workspace()
        let db = try ReloadableGeoIPDatabase(path: workspace.path, autoReloadMilliseconds: 1000)
        let loaded = db.current
        #expect(db.reloadIfChanged() == .unchanged)
        #expect(db.reloadIfChanged() == .unchanged)
        #expect(db.current === loaded)
    }

    @Test func reloadByRename() throws {
        let workspace = try Workspace()
        let db = try ReloadableGeoIPDatabase(path: workspace.path)
        // A query prepared before the reload (as the compiler prepares them) sees the new file.
        let code = db.makeQuery(Self.country)
        #expect(Self.answer(code, "1.2.3.4") == "NL")
        try workspace.renameOver("types-v2.mmdb", mtime: 1_700_000_900)
        #expect(db.reloadIfChanged() == .reloaded(buildEpoch: Self.v2Epoch))
        #expect(Self.answer(code, "1.2.3.4") == "BE")
        #expect(Self.answer(code, "::ffff:1.2.3.4") == "BE")
        #expect(Self.answer(db.makeQuery(["country", "names", "en"]), "1.2.3.4") == "Belgium")
        #expect(db.metadata(.buildEpoch) == Self.v2Epoch)
        #expect(db.reloadIfChanged() == .unchanged)
    }

    /// nginx reloads only a file whose mtime is newer than the last load; a database restored
    /// from a backup or unpacked with its original time is a change all the same.
    @Test func reloadByRenameOfAFileWithAnOlderModificationTime() throws {
        let workspace = try Workspace(mtime: 1_700_000_500)
        let db = try ReloadableGeoIPDatabase(path: workspace.path)
        try workspace.renameOver("types-v2.mmdb", mtime: 1_600_000_000)
        #expect(db.reloadIfChanged() == .reloaded(buildEpoch: Self.v2Epoch))
        #expect(Self.answer(db.makeQuery(Self.country), "1.2.3.4") == "BE")
    }

    @Test func reloadAfterARewriteInPlace() throws {
        let workspace = try Workspace()
        let db = try ReloadableGeoIPDatabase(path: workspace.path)
        let code = db.makeQuery(Self.country)
        let inode = try FileIdentity(path: workspace.path).inode
        try workspace.rewriteInPlace("types-v2.mmdb", mtime: 1_700_000_900)
        #expect(try FileIdentity(path: workspace.path).inode == inode)
        #expect(db.reloadIfChanged() == .reloaded(buildEpoch: Self.v2Epoch))
        #expect(Self.answer(code, "1.2.3.4") == "BE")
    }

    /// A rewrite in place that keeps the size and puts the old modification time back
    /// (`cp -p`, `rsync --inplace -t`) still changes the file's ctime.
    @Test func rewriteInPlaceThatRestoresSizeAndModificationTimeIsSeen() throws {
        let workspace = try Workspace(mtime: 1_700_000_500)
        let db = try ReloadableGeoIPDatabase(path: workspace.path)
        let loaded = db.current
        // File times come from a clock that ticks every few milliseconds.
        usleep(30_000)
        try workspace.rewriteInPlace("types.mmdb", mtime: 1_700_000_500)
        #expect(db.reloadIfChanged() == .reloaded(buildEpoch: Self.v1Epoch))
        #expect(db.current !== loaded)
        #expect(Self.answer(db.makeQuery(Self.country), "1.2.3.4") == "NL")
    }

    /// nginx's crash: the mapped file is truncated in place while workers look up in it. Here
    /// the loaded database is a private copy, so lookups go on answering from it, and the
    /// truncated file is refused at the reload check.
    @Test func fileTruncatedInPlaceUnderALoadedDatabase() throws {
        let workspace = try Workspace()
        let db = try ReloadableGeoIPDatabase(path: workspace.path)
        let queries = [Self.country, ["country", "names", "en"], ["unicode"], ["list", "1"], ["huge"]].map {
            db.makeQuery($0)
        }
        let refused = ReloadOutcome.failed(MaxMindDatabase.OpenError.notMaxMindDB(path: workspace.path).description)
        let addresses = ["1.2.3.4", "::ffff:1.2.3.4", "2002:102:304::1", "1.2.4.5", "2001:db8:1::5"].map {
            IPAddress($0)!
        }
        func lookUpEverywhere() {
            for _ in 0..<200 {
                for query in queries {
                    for address in addresses { _ = query.value(for: address) }
                }
            }
        }
        // Half the file: its mapped page would now read zeros past the end.
        try workspace.truncateInPlace(to: 854)
        lookUpEverywhere()
        #expect(Self.answer(queries[0], "1.2.3.4") == "NL")
        #expect(Self.answer(queries[2], "1.2.3.4") == "Zürich ✓")
        #expect(db.reloadIfChanged() == refused)
        #expect(Self.answer(queries[0], "1.2.3.4") == "NL")

        // Truncated to nothing (the moment between O_TRUNC and the first write): its mapped
        // page would now be past the end of the file, which is SIGBUS.
        try workspace.truncateInPlace(to: 0)
        lookUpEverywhere()
        #expect(Self.answer(queries[0], "1.2.3.4") == "NL")
        #expect(db.reloadIfChanged() == refused)

        // The writer finishes: the next check loads the complete file.
        try workspace.rewriteInPlace("types-v2.mmdb", mtime: 1_700_000_900)
        #expect(db.reloadIfChanged() == .reloaded(buildEpoch: Self.v2Epoch))
        #expect(Self.answer(queries[0], "1.2.3.4") == "BE")
    }

    @Test(arguments: ["truncated.mmdb", "not-an-mmdb.mmdb"])
    func badReplacementKeepsTheLoadedDatabase(fixture: String) throws {
        let workspace = try Workspace()
        let db = try ReloadableGeoIPDatabase(path: workspace.path)
        let code = db.makeQuery(Self.country)
        try workspace.renameOver(fixture, mtime: 1_700_000_900)
        let refused = MaxMindDatabase.OpenError.notMaxMindDB(path: workspace.path).description
        #expect(db.reloadIfChanged() == .failed(refused))
        #expect(Self.answer(code, "1.2.3.4") == "NL")
        #expect(db.metadata(.buildEpoch) == Self.v1Epoch)
        // Tried again at every check while the bad file stays.
        #expect(db.reloadIfChanged() == .failed(refused))
        #expect(Self.answer(code, "1.2.3.4") == "NL")
        // A good file later is loaded.
        try workspace.renameOver("types-v2.mmdb", mtime: 1_700_001_000)
        #expect(db.reloadIfChanged() == .reloaded(buildEpoch: Self.v2Epoch))
        #expect(Self.answer(code, "1.2.3.4") == "BE")
    }

    /// A file whose metadata is intact (so `MMDB_open` accepts it) but whose search tree is
    /// garbage: the probe lookups at open find it, before any session does.
    @Test func damagedSearchTreeIsRefusedAtOpenAndAtReload() throws {
        var bytes = try Workspace.fixture("types.mmdb")
        // 194 nodes × 6 bytes (24-bit records): every record now points far past the file.
        for i in 0..<(194 * 6) { bytes[i] = 0xFF }
        let workspace = try Workspace()
        let damaged = workspace.directory.appendingPathComponent("damaged.mmdb").path
        try Workspace.write(bytes, to: damaged, flags: O_CREAT | O_TRUNC, mtime: 1_700_000_000)
        #expect {
            try MaxMindDatabase(path: damaged)
        } throws: { error in
            guard case .corrupt(let path, let reason) = error as? MaxMindDatabase.OpenError else { return false }
            return path == damaged && reason.contains("looking up 1.1.1.1 fails")
        }

        let db = try ReloadableGeoIPDatabase(path: workspace.path)
        try workspace.renameOver(bytes, mtime: 1_700_000_900)
        guard case .failed(let message) = db.reloadIfChanged() else {
            Issue.record("a damaged database was loaded")
            return
        }
        #expect(message.hasPrefix("GeoIP database \"\(workspace.path)\" is damaged: looking up 1.1.1.1 fails"))
        #expect(Self.answer(db.makeQuery(Self.country), "1.2.3.4") == "NL")
    }

    /// A file whose tree is sound but whose record for 1.2.3.0/24 holds an impossible value (a
    /// 15-byte uint64): `MMDB_open` accepts it, decoding the probe's whole record does not.
    @Test func damagedRecordIsRefusedAtOpen() throws {
        var bytes = try Workspace.fixture("types.mmdb")
        // The data section starts at 194 × 6 + 16. "big" is the first record's second key:
        // `43 b i g`, then its value's control bytes `08 02`.
        let big = 194 * 6 + 16 + 12
        #expect(bytes[big - 4..<big + 2] == [0x43, 0x62, 0x69, 0x67, 0x08, 0x02])
        bytes[big] = 0x0F
        let workspace = try Workspace()
        let damaged = workspace.directory.appendingPathComponent("damaged.mmdb").path
        try Workspace.write(bytes, to: damaged, flags: O_CREAT | O_TRUNC, mtime: 1_700_000_000)
        #expect {
            try MaxMindDatabase(path: damaged)
        } throws: { error in
            guard case .corrupt(_, let reason) = error as? MaxMindDatabase.OpenError else { return false }
            return reason.hasPrefix("the record for ::ffff:1.2.3.4 cannot be decoded")
        }
    }

    /// A file written while it is copied is refused rather than loaded half old, half new: a
    /// large file, and a writer touching it without pause (the copy takes several of the file
    /// system clock's ticks, so its times move under the copy).
    @Test func fileWrittenDuringTheCopyIsRefused() throws {
        let workspace = try Workspace()
        let big = workspace.directory.appendingPathComponent("big.mmdb").path
        let junk = [UInt8](repeating: 0x2E, count: 32 << 20)
        try Workspace.write(junk, to: big, flags: O_CREAT | O_TRUNC, mtime: 1_700_000_000)
        let tally = Tally()
        let done = DispatchSemaphore(value: 0)
        let writer = open(big, O_WRONLY | O_CLOEXEC)
        #expect(writer >= 0)
        defer { close(writer) }
        Thread {
            var byte: UInt8 = 0x2E
            while !tally.stop.load(ordering: .relaxed) { _ = pwrite(writer, &byte, 1, 0) }
            done.signal()
        }.start()
        var seen: [MaxMindDatabase.OpenError] = []
        for _ in 0..<20 {
            do {
                _ = try MaxMindDatabase(path: big)
            } catch {
                seen.append(error)
                if error == .changedWhileReading(path: big) { break }
            }
        }
        tally.stop.store(true, ordering: .relaxed)
        done.wait()
        #expect(seen.last == .changedWhileReading(path: big))
        // A copy that happened to be consistent is still not a database.
        #expect(seen.allSatisfy { $0 == .changedWhileReading(path: big) || $0 == .notMaxMindDB(path: big) })
        #expect(MaxMindDatabase.OpenError.changedWhileReading(path: big).description.contains("rename it over"))
    }

    @Test func deletedFileKeepsTheLoadedDatabase() throws {
        let workspace = try Workspace()
        let db = try ReloadableGeoIPDatabase(path: workspace.path)
        let code = db.makeQuery(Self.country)
        #expect(unlink(workspace.path) == 0)
        let missing = "cannot open GeoIP database \"\(workspace.path)\": No such file or directory"
        #expect(db.reloadIfChanged() == .failed(missing))
        #expect(Self.answer(code, "1.2.3.4") == "NL")
        #expect(db.metadata(.buildEpoch) == Self.v1Epoch)
        try workspace.renameOver("types-v2.mmdb", mtime: 1_700_000_900)
        #expect(db.reloadIfChanged() == .reloaded(buildEpoch: Self.v2Epoch))
        #expect(Self.answer(code, "1.2.3.4") == "BE")
    }

    @Test func metadataFields() throws {
        let workspace = try Workspace(mtime: 1_700_000_500)
        let db = try ReloadableGeoIPDatabase(path: workspace.path, now: 1_800_000_000.7)
        #expect(db.metadata(.buildEpoch) == Self.v1Epoch)
        #expect(db.metadata(.lastCheck) == 1_800_000_000)  // the load counts as the first check
        #expect(db.metadata(.lastChange) == 1_700_000_500)  // the loaded file's mtime

        #expect(db.reloadIfChanged(now: 1_800_000_060) == .unchanged)
        #expect(db.metadata(.lastCheck) == 1_800_000_060)
        #expect(db.metadata(.lastChange) == 1_700_000_500)

        try workspace.renameOver("types-v2.mmdb", mtime: 1_700_000_900)
        #expect(db.reloadIfChanged(now: 1_800_000_120) == .reloaded(buildEpoch: Self.v2Epoch))
        #expect(db.metadata(.buildEpoch) == Self.v2Epoch)
        #expect(db.metadata(.lastCheck) == 1_800_000_120)
        #expect(db.metadata(.lastChange) == 1_700_000_900)

        // A failed reload is a check, not a change.
        try workspace.renameOver("not-an-mmdb.mmdb", mtime: 1_700_001_000)
        guard case .failed = db.reloadIfChanged(now: 1_800_000_180) else {
            Issue.record("a file that is not an MMDB was loaded")
            return
        }
        #expect(db.metadata(.buildEpoch) == Self.v2Epoch)
        #expect(db.metadata(.lastCheck) == 1_800_000_180)
        #expect(db.metadata(.lastChange) == 1_700_000_900)
    }

    // MARK: MaxMindDatabase's private copy

    @Test func openRefusesWhatIsNotADatabaseFile() throws {
        let workspace = try Workspace()
        #expect(throws: MaxMindDatabase.OpenError.missing(path: workspace.directory.path, reason: "Is a directory")) {
            try MaxMindDatabase(path: workspace.directory.path)
        }
        let empty = workspace.directory.appendingPathComponent("empty.mmdb").path
        try Workspace.write([], to: empty, flags: O_CREAT | O_TRUNC, mtime: 1_700_000_000)
        #expect(throws: MaxMindDatabase.OpenError.notMaxMindDB(path: empty)) { try MaxMindDatabase(path: empty) }
        #expect(chmod(workspace.path, 0) == 0)
        if geteuid() != 0 {  // root reads anything
            #expect(throws: MaxMindDatabase.OpenError.missing(path: workspace.path, reason: "Permission denied")) {
                try MaxMindDatabase(path: workspace.path)
            }
        }
    }

    @Test func databaseRemembersTheFileVersionItCopied() throws {
        let workspace = try Workspace(mtime: 1_700_000_500)
        let db = try MaxMindDatabase(path: workspace.path)
        #expect(db.path == workspace.path)
        #expect(db.fileIdentity == (try FileIdentity(path: workspace.path)))
        #expect(db.fileIdentity.size == 1708)
        #expect(db.fileIdentity.modificationSeconds == 1_700_000_500)
        // The copy does not depend on the file any more.
        #expect(unlink(workspace.path) == 0)
        #expect(db.lookup(IPAddress("1.2.3.4")!, path: GeoPath(Self.country)) == .string("NL"))
    }

    // MARK: Concurrency

    /// Four threads look up without pause while a fifth replaces the file by rename and reloads,
    /// back and forth, 50 times: every answer is one of the two databases', never nothing.
    @Test func lookupsDuringReloadsAlwaysSeeOneOfTheDatabases() throws {
        let workspace = try Workspace(mtime: 1_700_000_000)
        let db = try ReloadableGeoIPDatabase(path: workspace.path)
        let code = db.makeQuery(Self.country)
        let tally = Tally()
        let group = DispatchGroup()
        for worker in 0..<4 {
            group.enter()
            Thread {
                tally.started.add(1, ordering: .relaxed)
                let addresses = [IPAddress("1.2.3.4")!, IPAddress("::ffff:1.2.3.200")!]
                var nl = 0, be = 0, wrong = 0, i = worker
                while !tally.stop.load(ordering: .acquiring) {
                    switch code.value(for: addresses[i % 2]).map({ String(decoding: $0, as: UTF8.self) }) {
                    case "NL": nl += 1
                    case "BE": be += 1
                    default: wrong += 1
                    }
                    i += 1
                }
                tally.nl.add(nl, ordering: .relaxed)
                tally.be.add(be, ordering: .relaxed)
                tally.wrong.add(wrong, ordering: .relaxed)
                group.leave()
            }.start()
        }
        while tally.started.load(ordering: .relaxed) < 4 { usleep(1000) }
        var outcomes: [ReloadOutcome] = []
        for round in 1...50 {
            // Distinct times: a freed inode number may be reused by the next file.
            try workspace.renameOver(round % 2 == 1 ? "types-v2.mmdb" : "types.mmdb", mtime: 1_700_000_000 + round)
            outcomes.append(db.reloadIfChanged())
        }
        tally.stop.store(true, ordering: .releasing)
        group.wait()

        let expected: [ReloadOutcome] = (1...50).map {
            .reloaded(buildEpoch: $0 % 2 == 1 ? Self.v2Epoch : Self.v1Epoch)
        }
        #expect(outcomes == expected)
        #expect(tally.wrong.load(ordering: .relaxed) == 0)
        #expect(tally.nl.load(ordering: .relaxed) + tally.be.load(ordering: .relaxed) > 0)
        #expect(Self.answer(code, "1.2.3.4") == "NL")
    }
}

/// What the lookup threads saw.
private final class Tally: Sendable {
    let started = Atomic<Int>(0)
    let stop = Atomic<Bool>(false)
    let nl = Atomic<Int>(0)
    let be = Atomic<Int>(0)
    let wrong = Atomic<Int>(0)
}

/// A temporary folder holding `db.mmdb` (a copy of a fixture), and the ways an operator or an
/// updater replaces that file. Removed with the last reference.
private final class Workspace: Sendable {
    static let fixtures = packageRoot.appendingPathComponent("Tests/Fixtures/geoip")

    let directory: URL
    let path: String

    init(_ fixture: String = "types.mmdb", mtime: Int = 1_700_000_500) throws {
        directory = try makeTemporaryDirectory("portcullis-geoip")
        path = directory.appendingPathComponent("db.mmdb").path
        try Self.write(Self.fixture(fixture), to: path, flags: O_CREAT | O_EXCL, mtime: mtime)
    }

    deinit { try? FileManager.default.removeItem(at: directory) }

    static func fixture(_ name: String) throws -> [UInt8] {
        Array(try Data(contentsOf: fixtures.appendingPathComponent(name)))
    }

    /// The usual update: a new file beside the old one, renamed over it (a new inode).
    func renameOver(_ fixture: String, mtime: Int) throws {
        try renameOver(Self.fixture(fixture), mtime: mtime)
    }

    func renameOver(_ bytes: [UInt8], mtime: Int) throws {
        let temporary = path + ".new"
        try Self.write(bytes, to: temporary, flags: O_CREAT | O_TRUNC, mtime: mtime)
        guard rename(temporary, path) == 0 else { throw FileError("rename", temporary) }
    }

    /// The update that crashes nginx: the same inode truncated and written again.
    func rewriteInPlace(_ fixture: String, mtime: Int) throws {
        try Self.write(Self.fixture(fixture), to: path, flags: O_TRUNC, mtime: mtime)
    }

    func truncateInPlace(to size: Int) throws {
        guard truncate(path, off_t(size)) == 0 else { throw FileError("truncate", path) }
    }

    static func write(_ bytes: [UInt8], to path: String, flags: Int32, mtime: Int) throws {
        let fd = open(path, O_WRONLY | O_CLOEXEC | flags, 0o644)
        guard fd >= 0 else { throw FileError("open", path) }
        defer { close(fd) }
        var offset = 0
        while offset < bytes.count {
            let written = bytes[offset...].withUnsafeBytes { Glibc.write(fd, $0.baseAddress, $0.count) }
            guard written > 0 else { throw FileError("write", path) }
            offset += written
        }
        // Explicit times: the file system's clock is too coarse to tell quick updates apart.
        var times = [timespec(tv_sec: mtime, tv_nsec: 0), timespec(tv_sec: mtime, tv_nsec: 0)]
        guard futimens(fd, &times) == 0 else { throw FileError("futimens", path) }
    }
}

private struct FileError: Error, CustomStringConvertible {
    var description: String
    init(_ call: String, _ path: String) { description = "\(call) \(path): \(String(cString: strerror(errno)))" }
}
