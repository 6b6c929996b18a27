import CPortcullisLinux
import Glibc
import PortcullisCore
import PortcullisPolicy
import PortcullisTelemetry
import PortcullisWire

/// One UDP session on the epoll engine. The session machine decides (the policy once, on the
/// first datagram; what each datagram in either direction does; `proxy_requests`,
/// `proxy_responses`, `proxy_timeout`); this keeps the session's connected upstream socket,
/// sends to it and passes replies back through the listener's socket. Lives on its loop's
/// thread only.
///
/// The upstream socket is made and connected at once (a UDP connect only sets the peer), so
/// a session's datagrams never wait for it; it is registered once, level-triggered, for input
/// (unless no answers are expected: `proxy_responses 0`).
final class UDPSession: LoopSession {
    unowned let loop: EventLoop
    unowned let listener: UDPListener
    let runtime: ServerRuntime
    let key: UDPListener.SessionKey
    let id: UInt64
    private var machine: SessionMachine
    private var slot: UInt32 = 0
    private var generation: UInt32 = 0
    /// The upstream socket (-1: none yet, or closed).
    private var upstream: Int32 = -1
    private var dialAttempt: UInt8 = 0
    /// Client datagrams that came while the upstream was not ready (the machine bounds them).
    private var held: [[UInt8]] = []
    /// Datagrams forwarded during the listener's current batch read, sent together with one
    /// `sendmmsg` when the batch has been gone through (`flushUpstream`). They point into the
    /// loop's read buffer, which the next batch read overwrites: the listener flushes first.
    private var outgoing: [UnsafeRawBufferPointer] = []
    private let idleTimeout: UInt64
    /// The earliest deadline this session has in the loop's heap (0: none).
    private var heapDeadline: UInt64 = 0
    private var ended = false
    /// A reply is read into proxy_buffer_size bytes (16k), as nginx does; longer ones are cut
    /// there. (A datagram is at most 64 KiB, the loop's scratch 256 KiB.)
    private let replySize: Int
    /// Replies read per readable event at most (the socket is level-triggered: the rest waits
    /// for the next turn).
    private static let repliesPerTurn = 16

    /// Nil when the loop has no slot left for it.
    init?(runtime: ServerRuntime, listener: UDPListener, loop: EventLoop, key: UDPListener.SessionKey,
          header: ProxyHeader?) {
        self.loop = loop
        self.listener = listener
        self.runtime = runtime
        self.key = key
        idleTimeout = UInt64(max(runtime.policy.proxy.idleTimeoutMilliseconds, 0)) * 1_000_000
        replySize = min(max(runtime.policy.proxy.bufferSize, 1), 65_536)
        id = runtime.registry.openSession()
        machine = SessionMachine(listener: runtime.listener, connection: id, client: key.client, peer: key.peer,
                                 server: key.server, proxyHeader: header, now: loop.now, wallClock: Clock.wall())
        guard let (slot, generation) = loop.slab.insert(self) else {
            runtime.registry.closeSession()
            return nil
        }
        self.slot = slot
        self.generation = generation
    }

    /// Whether a datagram from this client still belongs to this session.
    var takesDatagrams: Bool { machine.takesDatagrams }

    var isWatchingIdle: Bool { !ended }

    /// The first datagram: the machine decides the session, then the datagram goes its way.
    /// (A refused session is kept, and watched, until its client is quiet for proxy_timeout.)
    func start(_ first: UnsafeRawBufferPointer) {
        armTimer()
        perform(machine.datagramSessionStarted(size: first.count, now: loop.now))
        guard !ended else { return }
        clientDatagram(first, batched: true)
    }

    private func perform(_ action: SessionMachine.Action) {
        if !machine.notes.isEmpty { runtime.write(machine.takeNotes(), connection: id) }
        switch action {
        case .dial(let dial):
            connect(to: dial)
        case .resolve(let host, let resolver):
            runtime.lookUp(host, with: resolver, on: loop) { [self] result in
                if !ended { perform(machine.resolved(result, now: loop.now)) }
            }
        case .refused(let record):
            runtime.sessionLogger.logRefusal(record, to: runtime.policy.auditLog)
            listener.moveToRefused(self)
        case .watchIdle:
            armTimer()
        case .reply(let bytes):
            bytes.withUnsafeBytes { listener.send($0, to: key) }
            perform(machine.end(now: loop.now))
        case .end(let record, let audit):
            close()
            runtime.sessionLogger.log(record, accessLogs: runtime.policy.accessLogs, auditLog: runtime.policy.auditLog, audit: audit,
                                      upstream: runtime.policy.upstream?.name)
        case .none, .readProxyHeader, .readMore, .startRelay, .closeClient, .close, .closeBoth, .closeWhenWritten,
             .shutdownOutput, .readClientHello, .startTLS, .startUpstreamTLS:
            break  // TCP only, or nothing to do
        }
    }

    /// A connected, registered upstream socket, or the machine hears why not (and may pick the
    /// next server).
    private func connect(to dial: SessionMachine.Dial) {
        let endpoint = dial.endpoint
        dialAttempt &+= 1
        let fd = socket(endpoint.family, Int32(SOCK_DGRAM.rawValue | SOCK_NONBLOCK.rawValue | SOCK_CLOEXEC.rawValue), 0)
        guard fd >= 0 else { return perform(machine.dialFailed(DialFailure(errno: errno), now: loop.now)) }
        if let local = dial.local, let failure = Socket.bindLocal(fd, local, datagram: true) {
            Glibc.close(fd)
            return perform(machine.localBindFailed(failure.message, critical: failure.critical, now: loop.now))
        }
        if endpoint.isUnix && dial.local == nil {
            // An unbound unix datagram socket cannot be answered (nginx's cannot): the kernel
            // gives it an abstract name of its own (autobind), so the upstream's replies come back.
            var family = sockaddr_storage()
            family.ss_family = sa_family_t(AF_UNIX)
            _ = withUnsafePointer(to: &family) {
                $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { Glibc.bind(fd, $0, socklen_t(MemoryLayout<sa_family_t>.size)) }
            }
        }
        let token = EventToken(tag: .upstream, slot: slot, generation: generation, attempt: dialAttempt)
        // With `proxy_responses 0` nothing is read from it, so it is not watched either.
        guard endpoint.withSockAddr({ Glibc.connect(fd, $0, $1) }) == 0,
              !machine.expectsReplies || loop.registerDatagramSocket(fd, token) else {
            let error = errno
            Glibc.close(fd)
            return perform(machine.dialFailed(DialFailure(errno: error), now: loop.now))
        }
        let action = machine.dialSucceeded(now: loop.now)
        guard case .startRelay = action else {
            Glibc.close(fd)  // the session ended meanwhile
            return perform(action)
        }
        upstream = fd
        let queued = held
        held = []
        for datagram in queued {
            datagram.withUnsafeBytes { sendUpstream($0) }
            if ended { return }
        }
        perform(machine.heldDatagramsSent(now: loop.now))
    }

    // MARK: Datagrams

    /// A datagram from the client (after its PROXY header, if the listener reads one); part of
    /// the listener's batch read when `batched`, so it may wait for `flushUpstream`.
    func clientDatagram(_ payload: UnsafeRawBufferPointer, batched: Bool) {
        let verdict = machine.clientDatagram(payload.count, now: loop.now)
        if verdict.detach { listener.detach(self) }
        switch verdict.disposition {
        case .drop:
            break
        case .hold:
            held.append(Array(payload))  // its own copy: the loop's read buffer is reused next batch
        case .forward where batched && !verdict.endAfterSending && upstream >= 0:
            if outgoing.isEmpty { listener.needsFlush(self) }
            outgoing.append(payload)
            if outgoing.count == DatagramBuffer.count { flushUpstream() }
        case .forward:
            sendUpstream(payload)
            if verdict.endAfterSending { end() }
        }
    }

    /// Sends the datagrams forwarded during the batch read, as few `sendmmsg` calls as it takes:
    /// each is the PROXY v2 header (`proxy_protocol on`) and the payload as two iovecs of one
    /// datagram, as the spec's UDP rule says, neither copied.
    func flushUpstream() {
        guard !outgoing.isEmpty else { return }
        defer { outgoing.removeAll(keepingCapacity: true) }
        guard upstream >= 0, !ended else { return }
        let vectors = loop.datagramBuffer.vectors
        let header = machine.datagramHeader ?? []
        let parts = header.isEmpty ? 1 : 2
        header.withUnsafeBytes { header in
            for (index, payload) in outgoing.enumerated() {
                if parts == 2 {
                    vectors[2 * index] = iovec(iov_base: UnsafeMutableRawPointer(mutating: header.baseAddress), iov_len: header.count)
                }
                vectors[parts * index + parts - 1] = iovec(iov_base: UnsafeMutableRawPointer(mutating: payload.baseAddress),
                                                           iov_len: payload.count)
            }
            var index = 0
            while index < outgoing.count {
                let sent = portcullis_send_connected(upstream, vectors + parts * index, CUnsignedInt(parts),
                                                     CUnsignedInt(outgoing.count - index))
                guard sent > 0 else {
                    let error = errno
                    for _ in index..<outgoing.count where !ended { sendFailed(error) }
                    return
                }
                for sentIndex in index..<index + Int(sent) { machine.sentUpstream(header.count + outgoing[sentIndex].count) }
                index += Int(sent)
            }
        }
    }

    /// Sends one datagram now (a held one, or one that ends its session): a batch of one, after
    /// whatever this batch queued before it, so the order holds.
    private func sendUpstream(_ payload: UnsafeRawBufferPointer) {
        flushUpstream()
        outgoing.append(payload)
        flushUpstream()
    }

    /// A datagram the upstream socket did not take.
    private func sendFailed(_ error: Int32) {
        switch error {
        case EAGAIN, EWOULDBLOCK, ENOBUFS:
            machine.upstreamQueueFull()  // a stuck upstream socket must not queue without end
        default:
            // An ICMP error that came back for an earlier datagram (port unreachable).
            perform(machine.upstreamFailed("\(SystemCallError("send", errno: error))", now: loop.now))
        }
    }

    /// The upstream socket is readable: replies back to the client, from the listener's socket.
    func handle(_ flags: UInt32, side: SessionMachine.Side, attempt: UInt8) {
        guard !ended, side == .upstream, attempt == dialAttempt, upstream >= 0 else { return }
        let scratch = loop.scratch
        for _ in 0..<Self.repliesPerTurn {
            let count = recv(upstream, scratch.baseAddress, replySize, Int32(MSG_DONTWAIT))
            guard count >= 0 else {
                let error = errno
                if error == EAGAIN || error == EWOULDBLOCK || error == EINTR { return }
                // ECONNREFUSED: the upstream's host said "port unreachable".
                return perform(machine.upstreamFailed("\(SystemCallError("recv", errno: error))", now: loop.now))
            }
            let verdict = machine.upstreamDatagram(count, now: loop.now)
            if verdict.reply { listener.send(UnsafeRawBufferPointer(rebasing: scratch[..<count]), to: key) }
            if verdict.ends { return end() }
        }
    }

    // MARK: Time

    func timerFired(_ deadline: UInt64) {
        guard !ended else { return }
        if deadline == heapDeadline { heapDeadline = 0 }
        if machine.isIdle(now: loop.now) {
            perform(machine.idleTimerFired(now: loop.now))
        }
        armTimer()
    }

    /// One entry in the loop's heap at the idle deadline; an entry that comes due early (the
    /// session was active since) finds it not idle and arms the next.
    private func armTimer() {
        guard !ended, idleTimeout > 0 else { return }
        let next = machine.lastActivity &+ idleTimeout
        guard heapDeadline == 0 || next < heapDeadline else { return }
        heapDeadline = next
        loop.schedule(TimerHeap.Entry(deadline: next, slot: slot, generation: generation))
    }

    // MARK: End

    /// Ends the session once: gives back its limit slots, closes its upstream socket, logs one
    /// record (the audit line of a refusal was written when it was refused).
    func end() {
        flushUpstream()  // what this batch forwarded leaves first
        perform(machine.end(now: loop.now))
    }

    func closeClient() { end() }

    func abandon() {
        guard !ended else { return }
        close()
    }

    private func close() {
        guard !ended else { return }
        ended = true
        listener.detach(self)
        if upstream >= 0 {
            Glibc.close(upstream)
            upstream = -1
        }
        held = []
        loop.slab.remove(slot: slot)
        runtime.registry.closeSession()
    }
}
