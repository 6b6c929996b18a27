#if canImport(Glibc)
import Glibc
#endif
import Foundation
import NIOCore
import NIOPosix
import PortcullisCore
import PortcullisPolicy
import PortcullisEngine
import PortcullisWire

/// The SwiftNIO engine of one UDP session: the session machine decides (the policy once, on the
/// first datagram; what each datagram in either direction does; `proxy_requests`,
/// `proxy_responses`, `proxy_timeout`); this keeps the session's upstream socket, sends and
/// replies. Replies leave from the listener's socket. Lives on the listener's event loop only.
final class UDPSession: IdleWatched {
    let runtime: ServerRuntime
    let key: UDPListenerHandler.SessionKey
    private let listener: UDPListenerHandler
    private let eventLoop: any EventLoop
    let id: UInt64
    private var machine: SessionMachine
    private var upstream: (any Channel)?
    /// Where the upstream socket is connected. Every write names it: SwiftNIO's write queue does
    /// not know a socket handed to it (`withBoundSocket`) is connected, and wants an address.
    private var upstreamAddress: SocketAddress?
    /// Client datagrams that arrived before the upstream socket was ready (the machine bounds them).
    private var held: [ByteBuffer] = []
    private var idleTimeout: IdleTimeout
    /// Datagrams written to the upstream socket and not flushed yet (see `needsFlush`).
    private var flushPending = false

    init(runtime: ServerRuntime, listener: UDPListenerHandler, eventLoop: any EventLoop,
         key: UDPListenerHandler.SessionKey, server: SocketEndpoint, header: ProxyHeader?) {
        self.runtime = runtime
        self.listener = listener
        self.eventLoop = eventLoop
        self.key = key
        idleTimeout = IdleTimeout(milliseconds: runtime.policy.proxy.idleTimeoutMilliseconds)
        let bound = NIOLoopBound(WeakSession(), eventLoop: eventLoop)
        self.id = runtime.registry.open(end: { [eventLoop] in
            eventLoop.execute { bound.value.session?.end() }
        })
        machine = SessionMachine(listener: runtime.listener, connection: id, client: key.client, peer: key.peer,
                                 server: server, proxyHeader: header, now: Clock.monotonic(),
                                 wallClock: Date().timeIntervalSince1970)
        bound.value.session = self
    }

    /// A drain's way in without keeping the session alive.
    private final class WeakSession {
        weak var session: UDPSession?
    }

    /// Whether a datagram from this client still belongs to this session.
    var takesDatagrams: Bool { machine.takesDatagrams }

    /// The first datagram: the machine decides the session, then the datagram goes its way.
    func start(_ first: ByteBuffer) {
        // From the machine's accept time: no second clock read for a one-datagram session.
        idleTimeout.arm(self, on: eventLoop, lastActivity: .uptimeNanoseconds(machine.lastActivity))
        perform(machine.datagramSessionStarted(now: machine.lastActivity))
        clientDatagram(first)
    }

    private func perform(_ action: SessionMachine.Action) {
        if !machine.notes.isEmpty { runtime.write(machine.takeNotes(), connection: id) }
        switch action {
        case .dial(let dial):
            connect(to: dial.endpoint)
        case .refused(let record):
            runtime.sessionLogger.logRefusal(record)
            listener.moveToRefused(self)
        case .watchIdle:
            idleTimeout.arm(self, on: eventLoop, lastActivity: .uptimeNanoseconds(machine.lastActivity))
        case .end(let record, let audit):
            if flushPending { flushUpstream() }  // proxy_responses 0: the datagram must leave first
            idleTimeout.stop(self, on: eventLoop)
            listener.detach(self)
            upstream?.close(promise: nil)
            held = []
            runtime.registry.close(id)
            runtime.sessionLogger.log(record, accessLogs: runtime.policy.accessLogs, audit: audit)
        case .none, .readProxyHeader, .readMore, .startRelay, .closeClient, .close, .closeBoth, .closeWhenWritten,
             .shutdownOutput:
            break  // TCP only, or nothing to do
        }
    }

    private func connect(to endpoint: SocketEndpoint) {
        let handler = UDPUpstreamHandler()
        let boundHandler = NIOLoopBound(handler, eventLoop: eventLoop)
        let replySize = min(max(runtime.policy.proxy.bufferSize, 1), 65_536)  // a datagram is at most 64 KiB
        // The socket is made and connected here (a UDP connect only sets the peer), then handed
        // to SwiftNIO: its own connect path costs two more system calls and a future chain per
        // session, and a session per datagram is common for DNS.
        let channel: EventLoopFuture<any Channel>
        do {
            let fd = try Self.connectedSocket(to: endpoint)
            channel = Self.bootstrap(eventLoop, handler: boundHandler, replySize: replySize).withBoundSocket(fd)
        } catch {
            channel = eventLoop.makeFailedFuture(error)
        }
        channel
            .assumeIsolated()
            .whenComplete { [self] result in
                switch result {
                case .success(let channel):
                    let action = machine.dialSucceeded(now: Clock.monotonic())
                    guard case .startRelay = action else {
                        channel.close(promise: nil)  // the session ended meanwhile
                        return perform(action)
                    }
                    handler.session = self
                    upstream = channel
                    upstreamAddress = channel.remoteAddress ?? endpoint.socketAddress  // what SwiftNIO compares writes to
                    let queued = held
                    held = []
                    for datagram in queued { sendUpstream(datagram) }
                    flushUpstream()  // outside a read batch: nothing else would flush them
                    perform(machine.heldDatagramsSent(now: Clock.monotonic()))
                case .failure(let error):
                    perform(machine.dialFailed(DialFailure(error), now: Clock.monotonic()))
                }
            }
    }

    /// A non-blocking UDP socket connected to `endpoint` (replies are then only taken from it).
    static func connectedSocket(to endpoint: SocketEndpoint) throws -> CInt {
        let address = endpoint.socketAddress
        let fd = socket(Int32(address.protocol.rawValue), Int32(SOCK_DGRAM.rawValue) | Int32(SOCK_NONBLOCK.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard fd >= 0 else { throw IOError(errnoCode: errno, reason: "socket") }
        let result = address.withSockAddr { Glibc.connect(fd, $0, socklen_t($1)) }
        guard result == 0 else {
            let error = IOError(errnoCode: errno, reason: "connect")
            close(fd)
            throw error
        }
        return fd
    }

    static func bootstrap(_ eventLoop: any EventLoop, handler: NIOLoopBound<UDPUpstreamHandler>, replySize: Int) -> DatagramBootstrap {
        DatagramBootstrap(group: eventLoop).channelInitializer { channel in
            channel.eventLoop.makeCompletedFuture {
                // A reply is read into proxy_buffer_size bytes (16k), as nginx does; longer
                // ones are cut there. One read per wake-up, so SwiftNIO keeps one such
                // buffer per session, not four.
                let options = channel.syncOptions!
                try options.setOption(.recvAllocator, value: FixedSizeRecvByteBufferAllocator(capacity: replySize))
                try options.setOption(.maxMessagesPerRead, value: 1)
                try channel.pipeline.syncOperations.addHandler(handler.value)
            }
        }
    }

    // MARK: Datagrams

    /// A datagram from the client (after its PROXY header, if the listener reads one).
    func clientDatagram(_ payload: ByteBuffer) {
        let verdict = machine.clientDatagram(payload.readableBytes, now: Clock.monotonic())
        if verdict.detach { listener.detach(self) }
        switch verdict.disposition {
        case .drop:
            break
        case .hold:
            // Its own copy: the payload is a slice of the listener's vector-read buffer, which
            // must be free again by the next read batch.
            held.append(ByteBuffer(buffer: payload))
        case .forward:
            sendUpstream(payload)
            if verdict.endAfterSending { end() }
        }
    }

    /// Queues one datagram for the upstream (flushed at the end of the read batch).
    private func sendUpstream(_ payload: ByteBuffer) {
        guard let upstream, let upstreamAddress else { return }
        if !upstream.isWritable {
            // Writes wait for the end of the read batch; a batch of large datagrams can pass
            // the high-water mark (64 KiB) by itself: send what is queued, and drop only if
            // the socket still cannot take more.
            flushUpstream()
            guard upstream.isWritable else {
                machine.upstreamQueueFull()
                return
            }
        }
        // Always a buffer of its own: the payload is a slice of the listener's 2 MiB vector-read
        // buffer, and a write the socket cannot take at once would keep that alive (and make
        // SwiftNIO allocate another for the next read) until it drains.
        let header = machine.datagramHeader
        var datagram = upstream.allocator.buffer(capacity: (header?.count ?? 0) + payload.readableBytes)
        if let header {
            // The spec's UDP rule: header and payload in one datagram, every datagram.
            datagram.writeBytes(header)
        }
        datagram.writeImmutableBuffer(payload)
        machine.sentUpstream(datagram.readableBytes)
        upstream.write(AddressedEnvelope(remoteAddress: upstreamAddress, data: datagram), promise: nil)
        if !flushPending {
            flushPending = true
            listener.needsFlush(self)
        }
    }

    func flushUpstream() {
        flushPending = false
        upstream?.flush()
    }

    /// A datagram from the upstream: back to the client, from the listener's address.
    func upstreamDatagram(_ payload: ByteBuffer) {
        let verdict = machine.upstreamDatagram(payload.readableBytes, now: Clock.monotonic())
        if verdict.reply { listener.send(payload, to: key.peer) }
        if verdict.ends {
            listener.flush()  // the handler's batch flush would not come after the session ends
            end()
        }
    }

    func flushReplies() { listener.flush() }

    /// The upstream socket failed (an ICMP "port unreachable" shows up as ECONNREFUSED).
    func upstreamFailed(_ error: any Error) {
        let reason = (error as? IOError).map { $0.described(as: "recv") } ?? "\(error)"
        perform(machine.upstreamFailed(reason, now: Clock.monotonic()))
    }

    // MARK: End

    func isIdle(now: NIODeadline) -> Bool { machine.isIdle(now: now.uptimeNanoseconds) }

    func checkIdle(now: NIODeadline) { perform(machine.idleTimerFired(now: now.uptimeNanoseconds)) }

    /// Ends the session once: gives back its limit slots, closes its upstream socket, logs one
    /// record (the audit line of a refusal was written when it was refused).
    func end() { perform(machine.end(now: Clock.monotonic())) }
}

/// The session's upstream socket: replies in, errors to the session.
final class UDPUpstreamHandler: ChannelInboundHandler {
    typealias InboundIn = AddressedEnvelope<ByteBuffer>
    var session: UDPSession?

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        session?.upstreamDatagram(unwrapInboundIn(data).data)
    }

    func channelReadComplete(context: ChannelHandlerContext) {
        session?.flushReplies()
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        session?.upstreamFailed(error)
    }

    func channelInactive(context: ChannelHandlerContext) {
        session = nil  // breaks the session ↔ handler cycle
        context.fireChannelInactive()
    }
}
