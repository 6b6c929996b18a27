import Foundation
import NIOCore
import NIOPosix
import PortcullisCore
import PortcullisPolicy

/// The SwiftNIO engine of one TCP session: tells the session machine what happened on the two
/// channels and does what it answers (`perform`). What a session decides, in which order, and
/// how it ends is the machine's; this only moves bytes, dials, arms timers and closes.
/// Lives on the client's event loop only.
final class RelaySession: IdleWatched {
    let runtime: ServerRuntime
    let eventLoop: any EventLoop
    let id: UInt64
    private var machine: SessionMachine
    private let client: RelayHandler
    /// The session's upstream, once a dial succeeded; a dial's handler until then.
    private var upstream: RelayHandler?
    private var dialing: RelayHandler?
    private var idleTimeout: IdleTimeout
    private var headerTimer: Scheduled<Void>?

    init(runtime: ServerRuntime, channel: any Channel, client: RelayHandler) {
        self.runtime = runtime
        self.eventLoop = channel.eventLoop
        self.client = client
        self.id = runtime.registry.open(channel)
        idleTimeout = IdleTimeout(milliseconds: runtime.policy.proxy.idleTimeoutMilliseconds)
        let peer = channel.remoteAddress.flatMap(SocketEndpoint.init) ?? SocketEndpoint(address: .v4(0), port: 0)
        let local = channel.localAddress.flatMap(SocketEndpoint.init) ?? runtime.listen.endpoint
        machine = SessionMachine(listener: runtime.listener, connection: id, client: peer, server: local,
                                 now: Self.now(), wallClock: Date().timeIntervalSince1970)
    }

    static func now() -> UInt64 { NIODeadline.now().uptimeNanoseconds }

    /// Called once the client channel is active.
    func start() { perform(machine.accepted(now: Self.now())) }

    // MARK: Events from the channels

    /// Bytes that arrived before the relay started: the PROXY header, and perhaps payload.
    func receivedBeforeRelay(_ buffer: ByteBuffer) {
        let action = buffer.withUnsafeReadableBytes { machine.received($0, now: Self.now()) }
        if !machine.readingProxyHeader { cancelHeaderTimer() }
        perform(action)
    }

    func readDelay(for side: RelayHandler.Side) -> UInt64 {
        guard machine.throttles else { return 0 }  // no clock read on the unthrottled path
        return machine.readDelay(side.machineSide, now: Self.now())
    }

    /// Bytes read from `side` and passed on: counted, spent from the rate limits, and the
    /// session's last activity (one clock read per read).
    func counted(_ bytes: Int, readBy side: RelayHandler.Side) {
        machine.relayed(bytes, from: side.machineSide, now: Self.now())
    }

    func noteActivity() { machine.wrote(now: Self.now()) }

    func inputClosed(on side: RelayHandler.Side) {
        perform(machine.inputClosed(side.machineSide, now: Self.now()))
    }

    func failed(on side: RelayHandler.Side, error: any Error) {
        perform(machine.failed(side.machineSide, SessionMachine.Failure(error), now: Self.now()))
    }

    func channelClosed(_ side: RelayHandler.Side, handler: RelayHandler) {
        // A failed dial's channel is not the session's upstream: not the machine's business.
        guard side == .client || handler === upstream else { return }
        if side == .client { cancelHeaderTimer() }
        perform(machine.closed(side.machineSide, inOrder: handler.endedInOrder, now: Self.now()))
    }

    func isIdle(now: NIODeadline) -> Bool { machine.isIdle(now: now.uptimeNanoseconds) }

    func checkIdle(now: NIODeadline) {
        let action = machine.idleTimerFired(now: now.uptimeNanoseconds)
        if case .closeBoth = action { idleTimeout.stop(self, on: eventLoop) }
        perform(action)
    }

    // MARK: Doing what the machine says

    private func perform(_ action: SessionMachine.Action) {
        if !machine.notes.isEmpty { runtime.write(machine.takeNotes(), connection: id) }
        switch action {
        case .none:
            break
        case .readProxyHeader(let timeout):
            headerTimer = eventLoop.assumeIsolated().scheduleTask(in: .milliseconds(Int64(timeout))) { [self] in
                headerTimer = nil
                perform(machine.headerTimedOut(now: Self.now()))
            }
            client.readMore()
        case .readMore:
            client.readMore()
        case .dial(let dial):
            self.dial(dial)
        case .startRelay(let start):
            guard let handler = dialing else { return }
            dialing = nil
            upstream = handler
            if !start.toUpstream.isEmpty { handler.write(start.toUpstream) }
            if start.throttled {
                // Small reads keep a throttled key's debt small and its sessions taking turns.
                client.limitReadSize()
                handler.limitReadSize()
            }
            client.pair(with: handler)
            idleTimeout.arm(self, on: eventLoop, lastActivity: NIODeadline.uptimeNanoseconds(machine.lastActivity))
            if start.clientEnded { inputClosed(on: .client) }
        case .closeClient:
            client.close()
        case .close(let side):
            handler(side)?.close()
        case .closeBoth(let resetting):
            if let resetting { handler(resetting)?.resetOnClose() }
            client.close()
            upstream?.close()
        case .closeWhenWritten(let side):
            // A close after the last write sends the same FIN a shutdown would, without the
            // extra system call and its futures (4.5 % of the gateway's CPU under a
            // connection flood).
            handler(side)?.afterQueuedWrites { [self] in perform(.closeBoth(resetting: nil)) }
        case .shutdownOutput(let side):
            handler(side)?.shutdownOutput { [self] in perform(machine.outputShut(side)) }
        case .watchIdle:
            idleTimeout.arm(self, on: eventLoop, lastActivity: NIODeadline.uptimeNanoseconds(machine.lastActivity))
        case .refused:
            break  // UDP only
        case .end(let record, let audit):
            dialing?.close()  // a dial that connected after the client left
            dialing = nil
            cancelHeaderTimer()
            idleTimeout.stop(self, on: eventLoop)
            runtime.registry.close(id)
            runtime.sessionLogger.log(record, accessLogs: runtime.policy.accessLogs, audit: audit)
        }
    }

    private func handler(_ side: SessionMachine.Side) -> RelayHandler? { side == .client ? client : upstream }

    private func cancelHeaderTimer() {
        headerTimer?.cancel()
        headerTimer = nil
    }

    private func dial(_ dial: SessionMachine.Dial) {
        let handler = RelayHandler(side: .upstream)
        handler.session = self
        dialing = handler
        let boundHandler = NIOLoopBound(handler, eventLoop: eventLoop)
        let proxy = runtime.policy.proxy
        let tcpNoDelay = proxy.tcpNoDelay
        let keepalive = proxy.socketKeepalive
        ClientBootstrap(group: eventLoop)
            .connectTimeout(.milliseconds(Int64(dial.timeoutMilliseconds)))
            .channelInitializer { channel in
                channel.eventLoop.makeCompletedFuture {
                    let options = channel.syncOptions!
                    try options.setOption(.autoRead, value: false)
                    try options.setOption(.allowRemoteHalfClosure, value: true)
                    if !tcpNoDelay { try options.setOption(.tcpOption(.tcp_nodelay), value: 0) }
                    if keepalive { try options.setOption(.socketOption(.so_keepalive), value: 1) }
                    try channel.pipeline.syncOperations.addHandler(boundHandler.value)
                }
            }
            .connect(to: dial.endpoint.socketAddress)
            .assumeIsolated()
            .whenComplete { [self] result in
                switch result {
                case .success:
                    perform(machine.dialSucceeded(now: Self.now()))
                case .failure(let error):
                    dialing = nil
                    perform(machine.dialFailed(DialFailure(error), now: Self.now()))
                }
            }
    }
}

extension RelayHandler.Side {
    var machineSide: SessionMachine.Side { self == .client ? .client : .upstream }
}
