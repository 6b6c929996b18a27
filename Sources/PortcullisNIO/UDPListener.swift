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

/// One `listen … udp` socket and its sessions (docs/decisions/0008-udp-sessions.md).
///
/// A session is keyed by who sent the datagram (and, behind a trusted PROXY sender, the client
/// its v2 header names). Every session lives on this socket's event loop, so the tables need
/// no lock. Both are bounded:
/// - sessions that were let through (or are being decided): at most `maximumSessions`; past
///   that, datagrams that would start a new one are dropped (said in the error log at most
///   once a second), as a full `limit_conn` zone refuses new keys;
/// - refused sessions, kept so that a client's retries cost no second decision or audit line:
///   at most `maximumRefused`, the oldest ended to make room. They never take the first
///   table's places, so a flood of forged (refused) sources cannot lock allowed clients out.
final class UDPListenerHandler: ChannelInboundHandler {
    typealias InboundIn = AddressedEnvelope<ByteBuffer>
    typealias OutboundOut = AddressedEnvelope<ByteBuffer>

    static let maximumSessions = 65_536
    static let maximumRefused = 65_536
    /// Per-address sockets a wildcard socket opens at most; past that it answers itself.
    static let maximumAddressSockets = 1_024

    struct SessionKey: Hashable {
        /// The sender of the datagram (where replies go).
        var peer: SocketEndpoint
        /// The client: the peer, or the address a trusted PROXY v2 header names.
        var client: SocketEndpoint
    }

    private let box: RuntimeBox
    /// A socket bound to a wildcard address (`listen 53 udp`). Replies must leave from the
    /// address each client dialled, and SwiftNIO cannot choose a datagram's source address, so
    /// the wildcard socket reads the dialled address (IP_PKTINFO) and hands each datagram to a
    /// socket bound to that address and port, opened on first use. The kernel then delivers
    /// later datagrams for that address to it directly (the more specific bind wins).
    private let wildcard: Bool
    private enum AddressSocket {
        case opening([AddressedEnvelope<ByteBuffer>])
        case open(UDPListenerHandler)
        /// Could not be bound: this socket answers, from whatever address routing picks.
        case failed
    }
    private var addressSockets: [IPAddress: AddressSocket] = [:]
    private var addressChannels: [any Channel] = []
    /// Per-address sockets this batch handed datagrams to: their sessions' writes are flushed
    /// at the end of this socket's batch (theirs does not run for datagrams they did not read).
    private var handedTo: [UDPListenerHandler] = []
    /// The box's runtime, read once per read batch rather than per datagram (a lock and a copy
    /// of the server's policy each time showed in profiles).
    private var runtime: ServerRuntime
    private var context: ChannelHandlerContext?
    private var sessions: [SessionKey: UDPSession] = [:]
    private var refused: [SessionKey: UDPSession] = [:]
    /// Refused sessions' keys, oldest first (from `refusedHead`), for making room.
    private var refusedOrder: [SessionKey] = []
    private var refusedHead = 0
    /// Sessions that queued datagrams for their upstream in this read batch: flushed together
    /// at its end, so NIO can send them with one sendmmsg per socket instead of one sendmsg each.
    private var unflushed: [UDPSession] = []
    /// Datagrams dropped since the last report: bad or missing PROXY header, full table.
    private var droppedHeaders = 0
    private var droppedFull = 0
    private var lastReport = NIODeadline.distantPast
    /// A report is due at the end of the current second (drops seen since the last one).
    private var reportScheduled = false

    init(box: RuntimeBox, wildcard: Bool = false) {
        self.box = box
        self.wildcard = wildcard
        self.runtime = box.runtime
    }

    func channelReadComplete(context: ChannelHandlerContext) {
        runtime = box.runtime
        flushSessions()
        for handler in handedTo { handler.flushSessions() }
        handedTo.removeAll(keepingCapacity: true)
        context.fireChannelReadComplete()
    }

    func flushSessions() {
        let sessions = unflushed
        unflushed.removeAll(keepingCapacity: true)
        for session in sessions { session.flushUpstream() }
    }

    /// `session` wrote to its upstream without flushing; flush it at the end of this batch.
    func needsFlush(_ session: UDPSession) { unflushed.append(session) }

    func handlerAdded(context: ChannelHandlerContext) { self.context = context }
    func handlerRemoved(context: ChannelHandlerContext) {
        self.context = nil
        for session in Array(sessions.values) + Array(refused.values) { session.end() }
        sessions = [:]
        refused = [:]
        for channel in addressChannels { channel.close(promise: nil) }
        addressChannels = []
    }

    var localAddress: SocketEndpoint? { context?.channel.localAddress.flatMap(SocketEndpoint.init) }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        let envelope = unwrapInboundIn(data)
        if wildcard, let dialled = envelope.metadata?.packetInfo.flatMap({ SocketEndpoint($0.destinationAddress) })?.address {
            switch addressSockets[dialled] {
            case .open(let handler):
                handler.process(envelope)
                if !handedTo.contains(where: { $0 === handler }) { handedTo.append(handler) }
                return
            case .opening(var waiting):
                waiting.append(Self.detached(envelope))
                addressSockets[dialled] = .opening(waiting)
                return
            case .failed: break
            case nil:
                // Local addresses are few, but 127.0.0.0/8 alone is 16 million: bound the sockets.
                guard addressSockets.count < Self.maximumAddressSockets else { break }
                addressSockets[dialled] = .opening([Self.detached(envelope)])
                openAddressSocket(dialled, context: context)
                return
            }
        }
        process(envelope)
    }

    /// A datagram kept past its read batch: its own bytes, not a slice that would pin the
    /// vector read's 2 MiB buffer.
    static func detached(_ envelope: AddressedEnvelope<ByteBuffer>) -> AddressedEnvelope<ByteBuffer> {
        AddressedEnvelope(remoteAddress: envelope.remoteAddress, data: ByteBuffer(buffer: envelope.data),
                          metadata: envelope.metadata)
    }

    /// A socket for `address` and this listener's port, on this event loop.
    private func openAddressSocket(_ address: IPAddress, context: ChannelHandlerContext) {
        let listen = runtime.listen
        let handler = UDPListenerHandler(box: box)
        let bound = NIOLoopBound(handler, eventLoop: context.eventLoop)
        DatagramBootstrap(group: context.eventLoop)
            .channelOption(.socketOption(.so_reuseaddr), value: 1)
            .channelInitializer { channel in
                channel.eventLoop.makeCompletedFuture {
                    try Listener.configureUDP(channel, listen: listen, handler: bound.value, readsDestination: false,
                                              vectorReads: false)
                }
            }
            .bind(to: SocketEndpoint(address: address, port: listen.port).socketAddress)
            .assumeIsolated()
            .whenComplete { [self] result in
                guard case .opening(let waiting) = addressSockets[address] else { return }
                switch result {
                case .success(let channel):
                    guard self.context != nil else {
                        channel.close(promise: nil)
                        return
                    }
                    addressChannels.append(channel)
                    addressSockets[address] = .open(handler)
                    for envelope in waiting { handler.process(envelope) }
                    handler.flushSessions()
                case .failure(let error):
                    runtime.errorLog.warning("cannot bind \(SocketEndpoint(address: address, port: listen.port)) udp (\(error)): clients that dialled it are answered from the address routing picks")
                    addressSockets[address] = .failed
                    for envelope in waiting { process(envelope) }
                }
            }
    }

    /// One datagram for this socket: the session it belongs to, or a new one.
    func process(_ envelope: AddressedEnvelope<ByteBuffer>) {
        guard let context, let peer = SocketEndpoint(envelope.remoteAddress) else { return }
        var payload = envelope.data
        let runtime = self.runtime
        var client = peer
        var header: ProxyHeader?
        if runtime.listen.proxyProtocol {
            // The spec's UDP rule: a v2 header in every datagram, parsed on its own.
            guard let (parsed, length) = Self.proxyHeader(payload) else {
                droppedHeaders += 1
                report(runtime)
                return
            }
            payload.moveReaderIndex(forwardBy: length)
            header = parsed
            // Believed only from set_real_ip_from senders, as for TCP.
            if runtime.policy.realIPFrom.trusts(peer.address), parsed.transport == .datagram, let source = parsed.source {
                client = source
            }
        }
        let key = SessionKey(peer: peer, client: client)
        if let session = sessions[key] ?? refused[key], session.takesDatagrams {
            session.clientDatagram(payload)
            return
        }
        guard sessions.count < Self.maximumSessions else {
            droppedFull += 1
            report(runtime)
            return
        }
        let session = UDPSession(runtime: runtime, listener: self, eventLoop: context.eventLoop, key: key,
                                 server: localAddress ?? runtime.listen.endpoint, header: header)
        sessions[key] = session
        session.start(payload)
    }

    /// A v2 header at the front of a datagram; nil for anything else (a v1 line, a partial or
    /// broken header, none at all).
    static func proxyHeader(_ datagram: ByteBuffer) -> (ProxyHeader, Int)? {
        datagram.withUnsafeReadableBytes { raw in
            guard raw.count >= 16, raw.starts(with: ProxyHeaderDecoder.v2Signature) else { return nil }
            return try? ProxyHeaderDecoder.decode(raw)  // nil: incomplete; a throw: broken
        }
    }

    private func report(_ runtime: ServerRuntime) {
        let now = NIODeadline.now()
        guard now - lastReport >= .seconds(1) else {
            // At most once a second, but said: drops within the second are reported when it is
            // up, even if no further datagram is dropped to trigger it.
            if !reportScheduled, let context {
                reportScheduled = true
                context.eventLoop.assumeIsolated().scheduleTask(deadline: lastReport + .seconds(1)) { [self] in
                    reportScheduled = false
                    if self.context != nil { report(box.runtime) }
                }
            }
            return
        }
        lastReport = now
        if droppedHeaders > 0 {
            runtime.errorLog.error("dropped \(droppedHeaders) datagrams without a valid PROXY protocol v2 header on \(runtime.listen)")
            droppedHeaders = 0
        }
        if droppedFull > 0 {
            runtime.errorLog.error("dropped \(droppedFull) datagrams: \(runtime.listen) already has \(Self.maximumSessions) UDP sessions")
            droppedFull = 0
        }
    }

    /// Queues a reply to `peer` from this socket (the address the client sent to); `flush`
    /// sends what is queued, once per batch of upstream reads.
    func send(_ buffer: ByteBuffer, to peer: SocketEndpoint) {
        context?.write(wrapOutboundOut(AddressedEnvelope(remoteAddress: peer.socketAddress, data: buffer)), promise: nil)
    }

    func flush() { context?.flush() }

    /// The session takes no more datagrams: later ones from the same client start a new one.
    func detach(_ session: UDPSession) {
        if sessions[session.key] === session { sessions.removeValue(forKey: session.key) }
        if refused[session.key] === session { refused.removeValue(forKey: session.key) }
    }

    /// A session was refused on its first datagram: it moves to the refused table (ending the
    /// oldest refused session if that table is full).
    func moveToRefused(_ session: UDPSession) {
        guard sessions[session.key] === session else { return }
        sessions.removeValue(forKey: session.key)
        while refused.count >= Self.maximumRefused, refusedHead < refusedOrder.count {
            let oldest = refusedOrder[refusedHead]
            refusedHead += 1
            refused[oldest]?.end()
        }
        // Keys of sessions that already ended stay in the order until here: keep it bounded.
        if refusedOrder.count - refusedHead > 2 * Self.maximumRefused || (refusedHead > 4096 && refusedHead * 2 > refusedOrder.count) {
            refusedOrder = refusedOrder[refusedHead...].filter { refused[$0] != nil }
            refusedHead = 0
        }
        refused[session.key] = session
        refusedOrder.append(session.key)
    }

    var sessionCount: Int { sessions.count }
}

extension Listener {
    /// `listen … udp`: one datagram socket (one per event loop with `reuseport`; the kernel
    /// then keeps each client on one socket by hashing its address and port).
    static func bindUDP(_ box: RuntimeBox, group: MultiThreadedEventLoopGroup) async throws -> [any Channel] {
        let listen = box.runtime.listen
        let loops: [any EventLoop] = listen.reusePort ? group.makeIterator().map { $0 } : [group.next()]
        var channels: [any Channel] = []
        do {
            for loop in loops {
                let wildcard = listen.address == .v4(0) || listen.address == .v6(0)
                let bootstrap = DatagramBootstrap(group: loop)
                    .channelOption(.socketOption(.so_reuseaddr), value: 1)
                    .channelInitializer { channel in
                        channel.eventLoop.makeCompletedFuture {
                            try configureUDP(channel, listen: listen, handler: UDPListenerHandler(box: box, wildcard: wildcard),
                                             readsDestination: wildcard, vectorReads: true)
                        }
                    }
                channels.append(try await bootstrap.bind(to: listen.endpoint.socketAddress).get())
            }
        } catch {
            for channel in channels { try? await channel.close() }
            throw ListenError(listen: listen, underlying: error)
        }
        return channels
    }

    static let udpVectorReadCount = 32

    /// Options and handler of a listening UDP socket (`readsDestination`: IP_PKTINFO, for a
    /// wildcard socket that hands datagrams to per-address sockets; `vectorReads`: recvmmsg, for
    /// the listen sockets that take a gateway's load, not the up to 1,024 per-address ones).
    static func configureUDP(_ channel: any Channel, listen: ListenSpec, handler: UDPListenerHandler,
                             readsDestination: Bool, vectorReads: Bool) throws {
        let options = channel.syncOptions!
        if listen.reusePort {
            try options.setOption(.socketOption(.init(rawValue: SO_REUSEPORT)), value: 1)
        }
        if case .v6 = listen.address {
            try options.setOption(
                ChannelOptions.Types.SocketOption(level: .ipv6, name: .init(rawValue: IPV6_V6ONLY)),
                value: listen.ipv6Only ? 1 : 0)
        }
        if readsDestination { try options.setOption(.receivePacketInfo, value: true) }
        // Room for bursts of queries before the loop gets to them.
        try options.setOption(.socketOption(.so_rcvbuf), value: 4 * 1024 * 1024)
        if vectorReads {
            // One recvmmsg reads up to 32 datagrams into one buffer cut in 32 slots. A slot must
            // hold the largest datagram (the kernel truncates silently and SwiftNIO does not say
            // so), hence 32 × 64 KiB; only the pages datagrams land on are touched. Two reads per
            // wake-up: up to 64 datagrams per batch, and SwiftNIO's pool keeps two such buffers.
            // Slices of them must not be kept past the batch (see UDPSession.clientDatagram).
            try options.setOption(.datagramVectorReadMessageCount, value: Self.udpVectorReadCount)
            try options.setOption(.recvAllocator,
                                  value: FixedSizeRecvByteBufferAllocator(capacity: Self.udpVectorReadCount * 65_536))
            try options.setOption(.maxMessagesPerRead, value: 2)
        } else {
            // A per-address socket of a wildcard listen (up to 1,024 of them): SwiftNIO keeps
            // up to maxMessagesPerRead 64 KiB buffers per socket after a burst, so few.
            try options.setOption(.recvAllocator, value: FixedSizeRecvByteBufferAllocator(capacity: 65_536))
            try options.setOption(.maxMessagesPerRead, value: 4)
        }
        try channel.pipeline.syncOperations.addHandler(handler)
    }
}
