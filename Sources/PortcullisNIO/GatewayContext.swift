import NIOCore
public import Logging
public import PortcullisPolicy
import PortcullisWire
public import PortcullisTelemetry
import Synchronization

/// What every session of one `server { }` needs: its compiled policy and where to log.
///
/// A class: every session and every client handler keeps it, and as a struct (policy, listen
/// spec, loggers: about 600 bytes) it was copied into each — 1.8 KB of every idle TCP
/// connection's 7.3 KB, and a retain per field on each copy.
public final class ServerRuntime: Sendable {
    public let policy: ServerPolicy
    public let listen: ListenSpec
    public let sessionLogger: SessionLogger
    public let errorLog: Logger
    public let registry: SessionRegistry

    public init(policy: ServerPolicy, listen: ListenSpec, sessionLogger: SessionLogger, errorLog: Logger,
                registry: SessionRegistry) {
        self.policy = policy
        self.listen = listen
        self.sessionLogger = sessionLogger
        self.errorLog = errorLog
        self.registry = registry
    }
}

/// Live sessions, so that a graceful stop can wait for them and then close the stragglers.
/// Also hands out `$connection` numbers.
public final class SessionRegistry: Sendable {
    private let nextConnection = Atomic<UInt64>(1)
    /// How to end each live session: close its client connection (TCP) or end it (UDP).
    private let live = Mutex<[UInt64: @Sendable () -> Void]>([:])

    public init() {}

    func open(_ channel: any Channel) -> UInt64 {
        open { channel.close(promise: nil) }
    }

    /// A session without a channel of its own (UDP): `end` is how a drain stops it.
    func open(end: @escaping @Sendable () -> Void) -> UInt64 {
        let id = nextConnection.wrappingAdd(1, ordering: .relaxed).oldValue
        live.withLock { $0[id] = end }
        return id
    }

    func close(_ id: UInt64) {
        _ = live.withLock { $0.removeValue(forKey: id) }
    }

    public var count: Int { live.withLock { $0.count } }

    /// Closes every live session's client connection (the end of a drain).
    public func closeAll() {
        let ends = live.withLock { Array($0.values) }
        for end in ends { end() }
    }
}

extension ServerRuntime {
    /// Where `SessionGate` says what to log for session `connection`.
    func report(for connection: UInt64) -> (SessionGate.Event) -> Void {
        { [self] event in
            switch event {
            case .log(let level, let message): errorLog.log(level, message, connection: connection)
            case .dryRun(let wouldBe): sessionLogger.logDryRun(wouldBe)
            }
        }
    }
}

extension ServerRuntime {
    /// The TLVs of the PROXY v2 header sent upstream for `record` (TCP and UDP alike): this
    /// server's `proxy_protocol_tlv` list, then a trusted sender's AUTHORITY and UNIQUE_ID when
    /// the list does not set them.
    func upstreamTLVs(for record: SessionRecord) -> [ProxyTLV] {
        var tlvs = policy.proxy.proxyProtocolTLVs.map { ProxyTLV(type: $0.type, value: $0.value.bytes(for: record)) }
        if let received = record.proxyHeader, policy.realIPFrom.trusts(record.peer.address) {
            for type in [ProxyTLVType.authority, .uniqueID] where !tlvs.contains(where: { $0.type == type.rawValue }) {
                if let value = received.tlv(type.rawValue) { tlvs.append(ProxyTLV(type, value)) }
            }
        }
        return tlvs
    }
}

extension Logger {
    /// A line at an nginx level for session `connection` (`*N` in the error log).
    func log(_ level: ErrorLogSpec.Level, _ message: String, connection: UInt64) {
        var logger = self
        logger[metadataKey: "connection"] = "\(connection)"
        logger.log(level: ErrorLogHandler.swiftLogLevel(level), "\(message)")
    }
}
