import CPortcullisLinux
import Glibc
import Logging
import PortcullisCore
import PortcullisPolicy
import PortcullisWire
import PortcullisTelemetry

/// One socket of one `listen … udp`, on one event loop, and the sessions of the clients that
/// send to it (docs/decisions/0008-udp-sessions.md).
///
/// Datagrams are read with `recvmmsg`, up to 32 a call and two calls a wake-up (the socket is
/// level-triggered, so a burst longer than that waits for the next turn instead of starving
/// the loop's other sockets). A session is keyed by who sent the datagram (and, behind a
/// trusted PROXY sender, the client its v2 header names); every session of this socket lives on
/// its loop, so the tables need no lock. Both are bounded:
/// - sessions that were let through (or are being decided): at most `maximumSessions`; past
///   that, datagrams that would start a new one are dropped (said in the error log at most
///   once a second), as a full `limit_conn` zone refuses new keys;
/// - refused sessions, kept so that a client's retries cost no second decision or audit line:
///   at most `maximumRefused`, the oldest ended to make room. They never take the first
///   table's places, so a flood of forged (refused) sources cannot lock allowed clients out.
///
/// A socket bound to a wildcard address (`listen 53 udp`) reads where each datagram was sent
/// (IP_PKTINFO) and answers from that address, as nginx does.
final class UDPListener: LoopListener {
    static let maximumSessions = 65_536
    static let maximumRefused = 65_536
    /// recvmmsg calls per wake-up.
    private static let readsPerTurn = 2

    struct SessionKey: Hashable {
        /// The sender of the datagram (where replies go).
        var peer: SocketEndpoint
        /// The client: the peer, or the address a trusted PROXY v2 header names.
        var client: SocketEndpoint
        /// The address and port the datagram was sent to (where replies leave from).
        var server: SocketEndpoint
        /// Non-zero for a unix sender without a path name: no one to key on, so each of its
        /// datagrams gets a key of its own, and a session, as in nginx (an unnamed sender
        /// cannot even be answered). Such sessions still count against the table's bound.
        var unnamedSerial: UInt64 = 0
    }

    let fd: Int32
    let box: RuntimeBox
    let endpoint: SocketEndpoint
    var slot: UInt32 = 0
    private let wildcard: Bool
    /// The box's runtime, read once per wake-up rather than per datagram: a reload's new rules
    /// apply from the next one.
    private var runtime: ServerRuntime
    private var sessions: [SessionKey: UDPSession] = [:]
    private var refused: [SessionKey: UDPSession] = [:]
    /// Refused sessions' keys, oldest first (from `refusedHead`), for making room.
    private var refusedOrder: [SessionKey] = []
    private var refusedHead = 0
    /// Datagrams dropped since the last report: bad or missing PROXY header, full table.
    private var droppedHeaders = 0
    private var droppedFull = 0
    private var lastReport: UInt64 = 0
    /// A report is due at the end of the current second (drops seen since the last one).
    private var reportScheduled = false
    private var closed = false
    /// Sessions with datagrams forwarded in the current batch read, not sent yet.
    private var unflushed: [UDPSession] = []
    /// Datagrams from unix senders without a path name so far (`SessionKey.unnamedSerial`).
    private var unnamedSenders: UInt64 = 0

    private init(fd: Int32, box: RuntimeBox, endpoint: SocketEndpoint) {
        self.fd = fd
        self.box = box
        self.endpoint = endpoint
        runtime = box.runtime
        wildcard = endpoint.address == .v4(0) || endpoint.address == .v6(0)
    }

    /// The sockets of `box`'s listen: one per loop with `reuseport` (the kernel then keeps each
    /// client on one socket by hashing its address and port), else one. Throws `ListenError`,
    /// with nothing left open.
    static func bind(_ box: RuntimeBox, loops: Int) throws(ListenError) -> [UDPListener] {
        let listen = box.runtime.listen
        let wildcard = listen.address == .v4(0) || listen.address == .v6(0)
        let sockets = try ListeningSocket.open(listen, count: listen.reusePort ? loops : 1, type: SOCK_DGRAM) { fd throws(SystemCallError) in
            // Room for bursts of queries before the loop gets to them.
            try Socket.setOption(fd, SOL_SOCKET, SO_RCVBUF, 4 * 1024 * 1024)
            if wildcard {
                if case .v6 = listen.address {
                    try Socket.setOption(fd, Int32(IPPROTO_IPV6), IPV6_RECVPKTINFO, 1)
                } else {
                    try Socket.setOption(fd, Int32(IPPROTO_IP), IP_PKTINFO, 1)
                }
            }
        }
        return sockets.map { UDPListener(fd: $0.fd, box: box, endpoint: $0.endpoint) }
    }

    /// Ends every session (with its record, as when its client went quiet) and closes the socket.
    func close() {
        guard !closed else { return }
        closed = true
        for session in Array(sessions.values) + Array(refused.values) { session.end() }
        sessions = [:]
        refused = [:]
        Glibc.close(fd)
        ListeningSocket.removeSocketFile(of: endpoint)
    }

    // MARK: Datagrams from clients

    func readable(on loop: EventLoop) {
        runtime = box.runtime
        let buffer = loop.datagramBuffer
        for _ in 0..<Self.readsPerTurn {
            let count = portcullis_receive_datagrams(fd, buffer.datagrams, CUnsignedInt(DatagramBuffer.count),
                                                     buffer.bytes.baseAddress!.assumingMemoryBound(to: UInt8.self),
                                                     CUnsignedInt(DatagramBuffer.slot))
            guard count > 0 else { return }  // EAGAIN; other errors (ICMP on a listener) are not ours
            for index in 0..<Int(count) {
                let datagram = buffer.datagrams[index]
                // An unnamed unix-domain sender comes with no address at all (length 0).
                guard let peer = datagram.sender_length == 0 && endpoint.isUnix
                        ? SocketEndpoint(unixPath: "") : SocketEndpoint(datagram.sender, length: datagram.sender_length)
                else { continue }
                var server = endpoint
                if wildcard, let dialled = SocketEndpoint(datagram.destination) { server.address = dialled.address }
                process(buffer.payload(index), from: peer, to: server, loop: loop)
            }
            // Before the next read overwrites the buffer the datagrams point into.
            for session in unflushed { session.flushUpstream() }
            unflushed.removeAll(keepingCapacity: true)
            if Int(count) < DatagramBuffer.count { return }
        }
    }

    /// One datagram for this socket: the session it belongs to, or a new one.
    private func process(_ datagram: UnsafeRawBufferPointer, from peer: SocketEndpoint, to server: SocketEndpoint,
                         loop: EventLoop) {
        var payload = datagram
        var client = peer
        var header: ProxyHeader?
        if runtime.listen.proxyProtocol {
            // The spec's UDP rule: a v2 header in every datagram, parsed on its own.
            guard let (parsed, length) = Self.proxyHeader(payload) else {
                droppedHeaders += 1
                report(loop)
                return
            }
            payload = UnsafeRawBufferPointer(rebasing: payload[length...])
            header = parsed
            // Believed only from set_real_ip_from senders, as for TCP.
            if runtime.policy.realIPFrom.trusts(peer), parsed.transport == .datagram, let source = parsed.source {
                client = source
            }
        }
        var key = SessionKey(peer: peer, client: client, server: server)
        if peer.isUnnamedUnix {
            unnamedSenders &+= 1
            key.unnamedSerial = unnamedSenders
        }
        if let session = sessions[key] ?? refused[key], session.takesDatagrams {
            session.clientDatagram(payload, batched: true)
            return
        }
        guard sessions.count < Self.maximumSessions else {
            droppedFull += 1
            report(loop)
            return
        }
        guard let session = UDPSession(runtime: runtime, listener: self, loop: loop, key: key, header: header) else {
            return  // the loop's slab is full
        }
        sessions[key] = session
        session.start(payload)
    }

    /// A v2 header at the front of a datagram; nil for anything else (a v1 line, a partial or
    /// broken header, none at all).
    static func proxyHeader(_ datagram: UnsafeRawBufferPointer) -> (ProxyHeader, Int)? {
        guard datagram.count >= 16, datagram.starts(with: ProxyHeaderDecoder.v2Signature) else { return nil }
        return try? ProxyHeaderDecoder.decode(datagram)  // nil: incomplete; a throw: broken
    }

    /// What was dropped, at most once a second; drops within the second are reported when it is
    /// up, even if no further datagram is dropped to trigger it.
    private func report(_ loop: EventLoop) {
        let now = loop.now
        guard lastReport == 0 || now &- lastReport >= 1_000_000_000 else {
            if !reportScheduled {
                reportScheduled = true
                loop.run(at: lastReport + 1_000_000_000) { [self] in
                    reportScheduled = false
                    if !closed { report(loop) }
                }
            }
            return
        }
        lastReport = now
        if droppedHeaders > 0 {
            runtime.errorLog.error("dropped \(droppedHeaders) datagrams without a valid PROXY protocol v2 header on \(runtime.listen)")
            runtime.sessionLogger.metrics?.udpDropped(droppedHeaders, listen: runtime.listen.description, reason: "proxy_header")
            droppedHeaders = 0
        }
        if droppedFull > 0 {
            runtime.errorLog.error("dropped \(droppedFull) datagrams: \(runtime.listen) already has \(Self.maximumSessions) UDP sessions")
            runtime.sessionLogger.metrics?.udpDropped(droppedFull, listen: runtime.listen.description, reason: "session_table_full")
            droppedFull = 0
        }
    }

    // MARK: Sessions

    /// A reply to `peer`, from the address it sent to. A reply the socket cannot take now
    /// (its send buffer full) is lost, as UDP loses it.
    func send(_ bytes: UnsafeRawBufferPointer, to key: SessionKey) {
        guard !closed else { return }
        var to = sockaddr_storage()
        let length = key.peer.store(into: &to)
        guard wildcard else {
            _ = portcullis_send_datagram(fd, bytes.baseAddress, bytes.count, &to, length, nil)
            return
        }
        var from = sockaddr_storage()
        // (On a dual-stack socket an IPv4 client's dialled address is in its mapped form, which
        // is what Linux wants there.)
        key.server.store(into: &from)
        if portcullis_send_datagram(fd, bytes.baseAddress, bytes.count, &to, length, &from) < 0 && errno == EINVAL {
            // Not an address this host can send from (a broadcast): let routing pick one.
            _ = portcullis_send_datagram(fd, bytes.baseAddress, bytes.count, &to, length, nil)
        }
    }

    /// `session` forwarded datagrams of this batch without sending them yet.
    func needsFlush(_ session: UDPSession) { unflushed.append(session) }

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
}
