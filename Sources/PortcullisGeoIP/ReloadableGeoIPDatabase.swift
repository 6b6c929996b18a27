#if canImport(Glibc)
import Glibc
#endif
import PortcullisCore
public import PortcullisPolicy
import Synchronization

/// A `geoip2` block's database, which `auto_reload` may replace while sessions look up in it.
///
/// Where nginx's geoip2 module reopens the file with libmaxminddb (mapping the file itself, so a
/// rewrite in place can crash every worker) and replaces its database structure under running
/// lookups, a reload here:
/// - opens a new `MaxMindDatabase` (a private in-memory copy, checked by probe lookups) beside
///   the current one, without holding the lock lookups take;
/// - swaps one reference under that lock only if the open worked, so a missing, truncated,
///   half-written or damaged file leaves the loaded database answering;
/// - frees nothing itself: a lookup copies the reference out under the lock and looks up outside
///   it, so the old database closes (ARC) when its last lookup returns.
///
/// Queries keep no answers between calls: each call looks up in the database current at that
/// moment, so nothing stale is served after a swap. Changes are seen by file identity (device,
/// inode, size, times), so a file renamed over the old one and one rewritten in place are both
/// reloaded, whatever their modification times (nginx only reloads a newer mtime).
public final class ReloadableGeoIPDatabase: GeoIPDatabase {
    public let path: String
    /// How often the gateway should call `reloadIfChanged` (nginx's `auto_reload`), or nil for
    /// never (nginx's default; `auto_reload 0` also means never there).
    public let autoReloadMilliseconds: Int?

    private struct State: Sendable {
        var database: MaxMindDatabase
        /// nginx's `last_check`: the time of the load, then of each reload check.
        var lastCheck: UInt64
    }

    /// Held only to copy or swap the reference and update the times: never across a lookup or
    /// an open, so a reload reading a large file never stalls a session.
    private let state: Mutex<State>
    /// Serializes `reloadIfChanged` callers, so two checks at once do not both copy the file.
    private let reloading = Mutex(())

    /// Opens `path` now (`now`: seconds since 1970, for `last_check`).
    public init(
        path: String, autoReloadMilliseconds: Int? = nil, now: Double = unixTime()
    ) throws(MaxMindDatabase.OpenError) {
        let database = try MaxMindDatabase(path: path)
        self.path = path
        self.autoReloadMilliseconds = autoReloadMilliseconds.flatMap { $0 > 0 ? $0 : nil }
        state = Mutex(State(database: database, lastCheck: Self.seconds(now)))
    }

    /// The database lookups use at this moment.
    public var current: MaxMindDatabase { state.withLock { $0.database } }

    public func makeQuery(_ path: [String]) -> any GeoIPQuery {
        Query(database: self, path: GeoPath(path))
    }

    /// `build_epoch` of the database loaded now; `last_check` as nginx's (the load, then every
    /// check); `last_change` the modification time of the file version loaded (nginx says the
    /// time of the first load until its first reload, then the file's modification time).
    public func metadata(_ field: GeoIPMetadataField) -> UInt64 {
        state.withLock { state in
            switch field {
            case .buildEpoch: return state.database.metadata.buildEpoch
            case .lastCheck: return state.lastCheck
            case .lastChange: return UInt64(max(0, state.database.fileIdentity.modificationSeconds))
            }
        }
    }

    /// One `auto_reload` check: if the path names a different file version than the one
    /// loaded, load it and swap. Safe to call from any thread while others look up. The caller
    /// logs the outcome (this layer has no logger).
    public func reloadIfChanged(now: Double = unixTime()) -> ReloadOutcome {
        reloading.withLock { _ in
            let loaded = state.withLock { state in
                state.lastCheck = Self.seconds(now)
                return state.database
            }
            let onDisk: FileIdentity
            do throws(MaxMindDatabase.OpenError) {
                onDisk = try FileIdentity(path: path)
            } catch {
                return .failed(error.description)
            }
            if onDisk == loaded.fileIdentity { return .unchanged }
            do throws(MaxMindDatabase.OpenError) {
                // The new database remembers the identity of the version it actually copied
                // (which may be newer than `onDisk`), so the next check compares with that.
                let fresh = try MaxMindDatabase(path: path)
                state.withLock { $0.database = fresh }
                return .reloaded(buildEpoch: fresh.metadata.buildEpoch)
            } catch {
                return .failed(error.description)
            }
        }
    }

    /// Seconds since 1970, as a `Double`: the default `now`.
    public static func unixTime() -> Double {
        var time = timespec()
        clock_gettime(CLOCK_REALTIME, &time)
        return Double(time.tv_sec) + Double(time.tv_nsec) / 1e9
    }

    private static func seconds(_ time: Double) -> UInt64 {
        time > 0 ? UInt64(time.rounded(.down)) : 0
    }

    /// One `geoip2` variable's lookup path, answered by whichever database is current at each
    /// call: the reference is fetched per call, never kept.
    private struct Query: GeoIPQuery {
        let database: ReloadableGeoIPDatabase
        let path: GeoPath

        func value(for address: IPAddress) -> [UInt8]? {
            database.current.lookup(address, path: path)?.nginxText
        }
    }
}

/// What one `ReloadableGeoIPDatabase.reloadIfChanged` check did.
public enum ReloadOutcome: Equatable, Sendable {
    /// The path names the same file version as the one loaded.
    case unchanged
    /// A new version was loaded and is answering from now on.
    case reloaded(buildEpoch: UInt64)
    /// The path changed (or names nothing any more) but its file could not be loaded (the
    /// message says why, in an operator's words); the database loaded before keeps answering. The next check tries
    /// again, so a file that was caught half-written is picked up once it is complete.
    case failed(String)
}

/// The libmaxminddb `GeoIPOpener` the gateway hands the policy compiler.
public struct MaxMindOpener: GeoIPOpener {
    public init() {}

    public func open(path: String, autoReloadMilliseconds: Int?) throws(GeoIPOpenFailure) -> any GeoIPDatabase {
        do throws(MaxMindDatabase.OpenError) {
            return try ReloadableGeoIPDatabase(path: path, autoReloadMilliseconds: autoReloadMilliseconds)
        } catch {
            throw GeoIPOpenFailure(error.description)
        }
    }
}

/// The opener of a reload: a database the running rules opened at the same path (with the
/// same `auto_reload`) is taken as it is — not read again, its `auto_reload` checks going on —
/// and only a new path is opened (docs/decisions/0014-hot-reload.md).
public struct CarryingOpener: GeoIPOpener {
    private let running: [ReloadableGeoIPDatabase]
    private let base: any GeoIPOpener

    public init(running: [any GeoIPDatabase], base: any GeoIPOpener = MaxMindOpener()) {
        self.running = running.compactMap { $0 as? ReloadableGeoIPDatabase }
        self.base = base
    }

    public func open(path: String, autoReloadMilliseconds: Int?) throws(GeoIPOpenFailure) -> any GeoIPDatabase {
        let interval = autoReloadMilliseconds.flatMap { $0 > 0 ? $0 : nil }
        if let database = running.first(where: { $0.path == path && $0.autoReloadMilliseconds == interval }) {
            return database
        }
        return try base.open(path: path, autoReloadMilliseconds: autoReloadMilliseconds)
    }
}
