#if canImport(Glibc)
import Glibc
#endif
import Foundation
import Logging
import NIOCore
import NIOPosix
import PortcullisCore
import PortcullisPolicy
import PortcullisTelemetry
import PortcullisWire

/// One UDP session: the policy runs once, on its first datagram (access, limits, upstream
/// choice); then datagrams go to the session's own upstream socket and replies come back from
/// the listener's socket. `proxy_requests`, `proxy_responses` and `proxy_timeout` end it as in
/// nginx; its record is logged when it ends. Lives on the listener's event loop only.
final class UDPSession: IdleWatched {
    let runtime: ServerRuntime
    let key: UDPListenerHandler.SessionKey
    private let listener: UDPListenerHandler
    private let eventLoop: any EventLoop
    private(set) var record: SessionRecord
    let id: UInt64

    private var gate = SessionGate()
    private var upstream: (any Channel)?
    /// Where the upstream socket is connected. Every write names it: SwiftNIO's write queue does
    /// not know a socket handed to it (`withBoundSocket`) is connected, and wants an address.
    private var upstreamAddress: SocketAddress?
    /// Client datagrams that arrived before the upstream socket was ready (bounded).
    private var pending: [ByteBuffer] = []
    private static let maximumPending = 64
    /// `proxy_protocol v2` to the upstream: the header every datagram starts with.
    private var proxyHeader: [UInt8]?
    /// Client datagrams this session took for its upstream (queued or sent): `proxy_requests`.
    private var taken = 0
    /// Datagrams actually written to the upstream: each expects `proxy_responses` answers.
    private var requests = 0
    private var responses = 0
    /// Datagrams dropped by a bandwidth limit (UDP has no backpressure), for the error log.
    private var throttled = 0
    /// Datagrams dropped because the upstream socket's send queue was full (bounded memory:
    /// a stuck upstream socket must not queue without end), for the error log.
    private var overflowed = 0
    private var refused = false
    private var detached = false
    private var finished = false
    private var idleTimeout: IdleTimeout
    private var lastActivity = NIODeadline.now()
    private var upstreamStarted: NIODeadline?
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
        record = SessionRecord(connection: id, transport: .udp, client: key.client, server: server,
                               listener: runtime.listen.description, startTime: Date().timeIntervalSince1970)
        record.peer = key.peer
        record.proxyHeader = header
        record.variables = runtime.policy.makeSessionVariables()
        bound.value.session = self
    }

    /// A drain's way in without keeping the session alive.
    private final class WeakSession {
        weak var session: UDPSession?
    }

    private var where_: String { SessionGate.place(record) }

    /// Whether a datagram from this client still belongs to this session.
    var takesDatagrams: Bool { !finished && !detached }

    // MARK: Phases

    /// access → limit_conn → limit_rate → upstream_pick, once, on the first datagram.
    func start(_ first: ByteBuffer) {
        idleTimeout.arm(self, on: eventLoop, lastActivity: lastActivity)
        let policy = runtime.policy
        guard let group = gate.admit(policy, record: &record, now: NIODeadline.now().uptimeNanoseconds,
                                     wallClock: Date().timeIntervalSince1970, report: runtime.report(for: id))
        else {
            refuse(first)
            return
        }
        guard let index = group.pick(excluding: [], now: Int64(NIODeadline.now().uptimeNanoseconds / 1_000_000)) else {
            runtime.errorLog.log(.error, "no live upstreams while connecting to upstream, \(where_)", connection: id)
            record.status = .badGateway
            record.phase = .upstreamPick
            record.reason = "no live upstreams"
            refuse(first)
            return
        }
        if policy.proxy.sendProxyProtocol == .v2 {
            proxyHeader = ProxyHeaderEncoder.v2(source: record.client, destination: record.server, transport: .datagram,
                                                tlvs: runtime.upstreamTLVs(for: record), crc32c: policy.proxy.proxyProtocolCRC32C)
        }
        connect(to: group.servers[index].endpoint, group: group, index: index)
        clientDatagram(first)
    }

    /// A refused session keeps its place in the table until it is idle, so that the client's
    /// further datagrams are dropped without a second decision or a second audit line.
    private func refuse(_ first: ByteBuffer) {
        refused = true
        gate.release()  // a refusal after limit_conn (no upstream) must not hold its slots while it lingers
        countFromClient(first.readableBytes)
        runtime.sessionLogger.logRefusal(record)
        listener.moveToRefused(self)
    }

    private func connect(to endpoint: SocketEndpoint, group: UpstreamGroup, index: Int) {
        upstreamStarted = .now()
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
                let now = Int64(NIODeadline.now().uptimeNanoseconds / 1_000_000)
                switch result {
                case .success(let channel):
                    group.report(index, succeeded: true, now: now)
                    record.upstreamAttempts.append(UpstreamAttempt(address: endpoint, connectTime: 0))
                    guard !finished else {
                        channel.close(promise: nil)
                        return
                    }
                    handler.session = self
                    upstream = channel
                    upstreamAddress = channel.remoteAddress ?? endpoint.socketAddress  // what SwiftNIO compares writes to
                    let queued = pending
                    pending = []
                    for datagram in queued { sendUpstream(datagram) }
                    flushUpstream()  // outside a read batch: nothing else would flush them
                    if runtime.policy.proxy.udpResponses == 0 && !queued.isEmpty { end() }
                case .failure(let error):
                    group.report(index, succeeded: false, now: now)
                    record.upstreamAttempts.append(UpstreamAttempt(address: endpoint, connectTime: nil))
                    runtime.errorLog.log(.error, "\(RelaySession.describe(connectError: error)) while connecting to upstream, \(where_), upstream: \"\(endpoint)\"", connection: id)
                    record.status = .badGateway
                    record.phase = .upstreamPick
                    record.reason = "upstream unreachable"
                    end()
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

    private func countFromClient(_ bytes: Int) {
        record.bytesReceived += UInt64(bytes)
        lastActivity = .now()
    }

    /// A datagram from the client (after its PROXY header, if the listener reads one).
    func clientDatagram(_ payload: ByteBuffer) {
        countFromClient(payload.readableBytes)
        guard !refused, !finished else { return }
        let requestLimit = runtime.policy.proxy.udpRequests
        if requestLimit > 0 && taken + 1 >= requestLimit {
            // nginx's proxy_requests: this session takes no more; it ends once the responses
            // are in (or at proxy_timeout).
            detached = true
            listener.detach(self)
        }
        if gate.throttles {
            let now = NIODeadline.now().uptimeNanoseconds
            if gate.delay(.fromClient, now: now, reserve: false) > 0 {
                throttled += 1
                return
            }
            gate.spend(payload.readableBytes, .fromClient, now: now)
        }
        guard upstream != nil else {
            if pending.count < Self.maximumPending {
                // Its own copy: the payload is a slice of the listener's vector-read buffer,
                // which must be free again by the next read batch.
                pending.append(ByteBuffer(buffer: payload))
                taken += 1
            } else {
                throttled += 1
            }
            return
        }
        taken += 1
        sendUpstream(payload)
        if runtime.policy.proxy.udpResponses == 0 { end() }  // fire and forget
    }

    /// Queues one datagram for the upstream (flushed at the end of the read batch). Only a
    /// datagram that is sent counts as a request that expects `proxy_responses` answers.
    private func sendUpstream(_ payload: ByteBuffer) {
        guard let upstream, let upstreamAddress else { return }
        if !upstream.isWritable {
            // Writes wait for the end of the read batch; a batch of large datagrams can pass
            // the high-water mark (64 KiB) by itself: send what is queued, and drop only if
            // the socket still cannot take more.
            flushUpstream()
            guard upstream.isWritable else {
                overflowed += 1
                return
            }
        }
        // Always a buffer of its own: the payload is a slice of the listener's 2 MiB vector-read
        // buffer, and a write the socket cannot take at once would keep that alive (and make
        // SwiftNIO allocate another for the next read) until it drains.
        var datagram = upstream.allocator.buffer(capacity: (proxyHeader?.count ?? 0) + payload.readableBytes)
        if let proxyHeader {
            // The spec's UDP rule: header and payload in one datagram, every datagram.
            datagram.writeBytes(proxyHeader)
        }
        datagram.writeImmutableBuffer(payload)
        requests += 1
        record.upstreamBytesSent += UInt64(datagram.readableBytes)
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
        guard !finished else { return }
        lastActivity = .now()
        record.upstreamBytesReceived += UInt64(payload.readableBytes)
        responses += 1
        var dropped = false
        if gate.throttles {
            let now = NIODeadline.now().uptimeNanoseconds
            dropped = gate.delay(.fromUpstream, now: now, reserve: false) > 0
            if !dropped { gate.spend(payload.readableBytes, .fromUpstream, now: now) }
        }
        if dropped {
            throttled += 1
        } else {
            record.bytesSent += UInt64(payload.readableBytes)
            listener.send(payload, to: key.peer)
        }
        // nginx's proxy_responses: the session is done once every request has its answers.
        if let expected = runtime.policy.proxy.udpResponses, responses >= expected.multipliedReportingOverflow(by: requests).partialValue {
            listener.flush()  // the handler's batch flush would not come after the session ends
            end()
        }
    }

    func flushReplies() { listener.flush() }

    /// The upstream socket failed (an ICMP "port unreachable" shows up as ECONNREFUSED).
    func upstreamFailed(_ error: any Error) {
        let reason = (error as? IOError).map { "recv() failed (\($0.errnoCode): \(String(cString: strerror($0.errnoCode))))" } ?? "\(error)"
        runtime.errorLog.log(.error, "\(reason) while proxying connection, \(where_)", connection: id)
        if responses == 0 {
            record.status = .badGateway
            record.phase = .relay
            record.reason = "upstream refused the datagrams"
        }
        end()
    }

    // MARK: End

    func isIdle(now: NIODeadline) -> Bool { idleTimeout.isIdle(since: lastActivity, now: now) }

    func checkIdle(now: NIODeadline) {
        guard !finished else { return }
        if isIdle(now: now) {
            // nginx: a session still waiting for proxy_responses answers ends with 502.
            if !refused, upstream != nil, let expected = runtime.policy.proxy.udpResponses,
               expected > 0, responses < expected.multipliedReportingOverflow(by: requests).partialValue {
                runtime.errorLog.log(.error, "upstream timed out (110: Connection timed out) while proxying connection, \(where_)", connection: id)
                record.status = .badGateway
                record.phase = .relay
                record.reason = "upstream timed out"
            }
            end()
        } else {
            idleTimeout.arm(self, on: eventLoop, lastActivity: lastActivity)
        }
    }

    /// Ends the session once: gives back its limit slots, closes its upstream socket, logs one
    /// record (the audit line of a refusal was written when it was refused).
    func end() {
        guard !finished else { return }
        finished = true
        if flushPending { flushUpstream() }  // proxy_responses 0: the datagram must leave first
        idleTimeout.stop(self, on: eventLoop)
        listener.detach(self)
        upstream?.close(promise: nil)
        gate.release()
        if throttled > 0 {
            runtime.errorLog.log(.info, "dropped \(throttled) datagrams over the session's rate limit, \(where_)", connection: id)
        }
        if overflowed > 0 {
            runtime.errorLog.log(.warn, "dropped \(overflowed) datagrams: the upstream socket's send queue was full, \(where_)", connection: id)
        }
        record.endTime = Date().timeIntervalSince1970
        if let upstreamStarted {
            record.upstreamSessionTime = Double((NIODeadline.now() - upstreamStarted).nanoseconds) / 1e9
        }
        runtime.registry.close(id)
        runtime.sessionLogger.log(record, accessLogs: runtime.policy.accessLogs, audit: !refused)
    }
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
