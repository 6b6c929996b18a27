import CPortcullisLinux
import CPortcullisTLS
import Glibc
import PortcullisCore
import PortcullisPolicy
import PortcullisTelemetry

/// One relayed TCP connection on the epoll engine: tells the session machine what the two
/// sockets did and does what it answers (`perform`). What a session decides, in which order,
/// and how it ends is the machine's; this moves bytes, dials, keeps deadlines and closes.
/// Lives on its loop's thread only.
///
/// Each socket is registered once, edge-triggered, for input, output and the peer's FIN; the
/// `Peer` flags remember what the last edge said. Bytes are read into the loop's scratch buffer
/// and written straight to the other socket; only what the other side could not take waits in
/// a pooled buffer, and then this side stops reading until it drains (backpressure: at most one
/// read per direction is held in memory).
final class TCPSession: LoopSession {
    /// One side's socket and what the engine knows about it.
    struct Peer {
        var fd: Int32 = -1
        /// The last edge said input is waiting (cleared by EAGAIN or a short read).
        var readable = false
        /// The last write was complete (cleared by EAGAIN or a short write; EPOLLOUT sets it).
        var writable = true
        /// The peer sent FIN (or the connection is gone): read until read() says 0.
        var peerClosing = false
        var inputClosed = false
        var outputShutStarted = false
        var sawError = false
        var resetOnClose = false
        /// Bytes for this side that it has not taken yet, from `pendingStart` on.
        var pending: [UInt8] = []
        var pendingStart = 0
        /// What waits for `pending` to drain.
        var afterDrain = AfterDrain.nothing
        /// A throttled read waits until then (0: not waiting).
        var resumeAt: UInt64 = 0
        /// The wait was this side's reserved turn on a shared bucket: read once without asking.
        var skipDelayOnce = false
        /// TLS on this side (`listen … ssl`, `proxy_ssl on`): reads and writes go through it.
        var tls: TLSStream?

        var isOpen: Bool { fd >= 0 }
        var hasPending: Bool { pendingStart < pending.count }
        /// Closed cleanly after we shut its output (only with `proxy_half_close on`).
        var endedInOrder: Bool { outputShutStarted && !sawError }
    }

    enum AfterDrain { case nothing, closeBoth, shutdownOutput }

    typealias Side = SessionMachine.Side

    unowned let loop: EventLoop
    let runtime: ServerRuntime
    let id: UInt64
    private var machine: SessionMachine
    private var slot: UInt32 = 0
    private var generation: UInt32 = 0
    private var client: Peer
    /// The dial's socket, then (once `dialSucceeded`) the session's upstream.
    private var upstream = Peer()
    private var upstreamConnected = false
    private var dialAttempt: UInt8 = 0
    private var relaying = false
    /// Sending a `return` value: only writing to the client is left.
    private var replying = false
    private var readSize = EventLoop.scratchSize
    private var ended = false
    private var deferred = false
    /// Bytes taken from the client while its upstream was dialled (`readEarly`), at most 64 KiB.
    private var earlyBytes = 0
    private static let earlyLimit = 64 * 1024
    /// `listen … ssl proxy_protocol`: how many bytes the last peek at the header saw.
    private var peeked = 0
    /// `proxy_ssl on`: the connected upstream's TLS handshake is under way (its socket is still
    /// the dial's, not the session's upstream, until it succeeds).
    private var upstreamHandshaking = false

    // Deadlines in the loop's monotonic nanoseconds; 0: none.
    private var headerDeadline: UInt64 = 0
    private var connectDeadline: UInt64 = 0
    private var watchingIdle = false
    private let idleTimeout: UInt64
    /// The earliest deadline this session has in the loop's heap (0: none).
    private var heapDeadline: UInt64 = 0

    private init(fd: Int32, peer: SocketEndpoint, local: SocketEndpoint, runtime: ServerRuntime, loop: EventLoop) {
        self.loop = loop
        self.runtime = runtime
        id = runtime.registry.openSession()
        client = Peer(fd: fd)
        idleTimeout = UInt64(max(runtime.policy.proxy.idleTimeoutMilliseconds, 0)) * 1_000_000
        machine = SessionMachine(listener: runtime.listener, connection: id, client: peer, server: local,
                                 now: loop.now, wallClock: Clock.wall())
    }

    /// A connection was accepted: the machine's accept phase, then its socket is watched (a
    /// refusal at accept closes it without ever registering it).
    static func start(fd: Int32, peer: SocketEndpoint, local: SocketEndpoint, runtime: ServerRuntime, loop: EventLoop) {
        let session = TCPSession(fd: fd, peer: peer, local: local, runtime: runtime, loop: loop)
        guard let (slot, generation) = loop.slab.insert(session) else {
            Glibc.close(fd)
            runtime.registry.closeSession()
            return
        }
        session.slot = slot
        session.generation = generation
        session.perform(session.machine.accepted(now: loop.now))
        guard !session.ended, session.client.isOpen else { return }
        if !loop.register(fd, session.token(.client)) {
            session.perform(session.machine.failed(.client, .error("\(SystemCallError("epoll_ctl"))"), now: loop.now))
        }
    }

    private func token(_ side: Side) -> EventToken {
        EventToken(tag: side == .client ? .client : .upstream, slot: slot, generation: generation,
                   attempt: side == .client ? 0 : dialAttempt)
    }

    private subscript(side: Side) -> Peer {
        _read { yield side == .client ? client : upstream }
        _modify {
            if side == .client { yield &client } else { yield &upstream }
        }
    }

    // MARK: Events

    func handle(_ flags: UInt32, side: Side, attempt: UInt8) {
        guard !ended else { return }
        if side == .upstream && attempt != dialAttempt { return }  // a retried dial's old socket
        if flags & (EPOLLIN.rawValue | EPOLLHUP.rawValue | EPOLLRDHUP.rawValue) != 0 { self[side].readable = true }
        if flags & (EPOLLHUP.rawValue | EPOLLRDHUP.rawValue) != 0 { self[side].peerClosing = true }
        if flags & EPOLLOUT.rawValue != 0 { self[side].writable = true }
        let failed = flags & EPOLLERR.rawValue != 0
        // TLS: a read that had to wait for the socket to take a write is retried now.
        if flags & EPOLLOUT.rawValue != 0, self[side].tls?.readWantsWrite == true { self[side].readable = true }

        if side == .client && machine.handshaking {
            continueClientHandshake()
            return
        }
        if side == .upstream && upstreamHandshaking {
            continueUpstreamHandshake()
            return
        }
        if side == .upstream && !upstreamConnected {
            guard failed || flags & (EPOLLOUT.rawValue | EPOLLHUP.rawValue) != 0 else { return }
            connectFinished(clean: !failed && flags & EPOLLHUP.rawValue == 0)
            return
        }
        if failed || (side == .client && !relaying && flags & EPOLLHUP.rawValue != 0 && !machine.readingForMachine) {
            // An error (a reset) is taken as it comes, not when the reads reach it; a client
            // that is gone while its upstream is dialled is closed now.
            let error = Socket.pendingError(self[side].fd)
            if error != 0 || !relaying {
                fail(side, SystemCallError("recv", errno: error == 0 ? ECONNRESET : error))
                return
            }
        }
        guard relaying else {
            if replying {
                if side == .client && client.writable && client.hasPending { flush(.client) }
                return
            }
            if side == .client { readBeforeRelay() }
            return
        }
        if self[side].writable && self[side].hasPending { flush(side) }
        if !ended { pump(side) }
    }

    func timerFired(_ deadline: UInt64) {
        guard !ended else { return }
        if deadline == heapDeadline { heapDeadline = 0 }
        let now = loop.now
        if headerDeadline != 0 && now >= headerDeadline {
            headerDeadline = 0
            perform(machine.clientDeadlinePassed(now: now, tls: machine.handshaking ? client.tls?.serverSessionInfo().0 : nil))
        }
        if !ended && connectDeadline != 0 && now >= connectDeadline {
            connectDeadline = 0
            if upstreamHandshaking {
                upstreamTLSFailed("upstream timed out (110: Connection timed out) while SSL handshaking to upstream")
            } else {
                closeDial()
                perform(machine.dialFailed(.timedOut, now: now))
            }
        }
        for side in [Side.client, .upstream] where !ended && self[side].resumeAt != 0 && now >= self[side].resumeAt {
            self[side].resumeAt = 0
            self[side].skipDelayOnce = true
            pump(side)
        }
        if !ended && watchingIdle && now >= idleDeadline {
            watchingIdle = false
            perform(machine.idleTimerFired(now: now))
        }
        armTimer()
    }

    /// After a turn given to other sessions.
    func resumeDeferred() {
        deferred = false
        guard !ended else { return }
        pump(.client)
        if !ended { pump(.upstream) }
    }

    /// proxy_timeout is watched (the relay started); for `Engine.watchedSessions`.
    var isWatchingIdle: Bool { watchingIdle }

    // MARK: Reading and writing

    /// What the client sends before the relay, handed to the machine: its PROXY header (and
    /// whatever follows it in the same reads), and — when the client finished sending while its
    /// upstream is dialled — its bytes, up to `earlyLimit`, and its EOF, kept for the upstream
    /// as nginx sends them once connected; a refusal then closes a drained socket (a FIN, not a
    /// reset). Otherwise the client is not read until the relay starts.
    private func readBeforeRelay() {
        if runtime.listen.ssl && machine.readingProxyHeader {
            peekProxyHeader()
            return
        }
        while client.readable && !ended && !client.inputClosed {
            let size: Int
            if machine.readingForMachine {
                size = machine.readingClientHello ? max(min(readSize, machine.clientHelloRoom), 1) : readSize
            } else if client.peerClosing && upstream.isOpen && !upstreamConnected && earlyBytes < Self.earlyLimit {
                size = min(readSize, Self.earlyLimit - earlyBytes)
            } else {
                return
            }
            let count = receive(.client, into: loop.scratch.baseAddress!, size)
            if count > 0 {
                if !machine.readingForMachine { earlyBytes += count }
                if count < size && !client.peerClosing && client.tls == nil { client.readable = false }
                perform(machine.received(UnsafeRawBufferPointer(rebasing: loop.scratch[0..<count]), now: loop.now))
            } else {
                clientReadGaveNothing(count)
            }
        }
    }

    /// `listen … ssl proxy_protocol`: the header is peeked, and only its own bytes are taken
    /// off the socket, so OpenSSL reads the ClientHello that follows it from the socket.
    private func peekProxyHeader() {
        while client.readable && !ended && machine.readingProxyHeader {
            let count = recv(client.fd, loop.scratch.baseAddress, readSize, Int32(MSG_PEEK))
            if count > 0 {
                // Nothing new since the last peek: the client's FIN came after it (a peek never
                // says 0 while bytes wait), or wait for the next edge.
                if count == peeked {
                    client.readable = false
                    if client.peerClosing {
                        client.inputClosed = true
                        perform(machine.inputClosed(.client, now: loop.now))
                    }
                    return
                }
                peeked = count
                let (action, consumed) = machine.peekedHeader(UnsafeRawBufferPointer(rebasing: loop.scratch[0..<count]), now: loop.now)
                if consumed > 0 { _ = recv(client.fd, loop.scratch.baseAddress, consumed, 0) }
                if !machine.readingProxyHeader { client.readable = true }  // the rest is the handshake's
                perform(action)
            } else {
                clientReadGaveNothing(count)
            }
        }
    }

    /// A read of the client before the relay returned 0 (its EOF, for the machine) or -1 (no
    /// more for now, or an error).
    private func clientReadGaveNothing(_ count: Int) {
        if count == 0 {
            client.readable = false
            client.inputClosed = true
            perform(machine.inputClosed(.client, now: loop.now))
        } else if errno == EAGAIN || errno == EWOULDBLOCK {
            client.readable = false
        } else if errno != EINTR {
            fail(.client, "recv")
        }
    }

    /// Moves bytes from `side` to the other side while both can: 16 reads, then the other
    /// sessions get a turn; throttled, one small read a turn, each when the buckets allow.
    private func pump(_ side: Side) {
        let to = side.other
        var reads = 0
        while !ended && relaying && self[side].readable && !self[side].inputClosed && self[side].isOpen {
            guard self[to].isOpen, !self[to].hasPending, !self[to].outputShutStarted else { return }
            if machine.throttles {
                if self[side].skipDelayOnce {
                    self[side].skipDelayOnce = false
                } else if self[side].resumeAt != 0 {
                    return
                } else {
                    let delay = machine.readDelay(side, now: loop.now)
                    if delay > 0 {
                        self[side].resumeAt = loop.now &+ delay
                        armTimer()
                        return
                    }
                }
            }
            let count = receive(side, into: loop.scratch.baseAddress!, readSize)
            if count > 0 {
                // TLS: its reads say whether the socket ran dry (a short read may just be the
                // last record OpenSSL had buffered).
                if let tls = self[side].tls {
                    if tls.drained { self[side].readable = false }
                } else if count < readSize && !self[side].peerClosing {
                    self[side].readable = false
                }
                machine.relayed(count, from: side, now: loop.now)
                send(UnsafeRawBufferPointer(rebasing: loop.scratch[0..<count]), to: to)
                reads += 1
                if machine.throttles || reads >= 16 {
                    if self[side].readable && !deferred {
                        deferred = true
                        loop.deferRead(self)
                    }
                    return
                }
            } else if count == 0 {
                self[side].readable = false
                inputEnded(side)
            } else if errno == EAGAIN || errno == EWOULDBLOCK {
                self[side].readable = false
            } else if errno != EINTR {
                fail(side, "recv")
            }
        }
    }

    /// recv on `side`'s socket, or SSL_read on its TLS: a count, 0 at EOF, -1 with errno.
    private func receive(_ side: Side, into buffer: UnsafeMutableRawPointer, _ size: Int) -> Int {
        if let tls = self[side].tls { return tls.read(buffer, size) }
        return recv(self[side].fd, buffer, size, 0)
    }

    /// send on `side`'s socket, or SSL_write on its TLS until the socket is full: the count
    /// taken (less than `size` only when the socket is full), -1 with errno on an error.
    private func transmit(_ side: Side, _ buffer: UnsafeRawPointer, _ size: Int) -> Int {
        guard let tls = self[side].tls else { return Glibc.send(self[side].fd, buffer, size, Int32(MSG_NOSIGNAL)) }
        var sent = 0
        while sent < size {
            let count = tls.write(buffer + sent, size - sent)  // never 0
            if count < 0 {
                if errno == EAGAIN && sent > 0 { break }
                return sent > 0 ? sent : -1
            }
            sent += count
        }
        return sent
    }

    /// Writes `bytes` to `side`, or keeps what it cannot take yet.
    private func send(_ bytes: UnsafeRawBufferPointer, to side: Side) {
        var sent = 0
        if self[side].writable && !self[side].hasPending {
            let count = transmit(side, bytes.baseAddress!, bytes.count)
            if count < 0 {
                guard errno == EAGAIN || errno == EWOULDBLOCK else {
                    fail(side, "send")
                    return
                }
            } else {
                sent = count
            }
        }
        guard sent < bytes.count else { return }
        self[side].writable = false
        if self[side].pending.capacity == 0 { self[side].pending = loop.pool.take() }
        self[side].pending.append(contentsOf: bytes[sent...])
    }

    /// `side` can take more: write what waits for it; once it is all out, do what waited for
    /// that, and let the other side read again.
    private func flush(_ side: Side) {
        while self[side].hasPending {
            let count = self[side].pending.withUnsafeBytes { raw in
                transmit(side, raw.baseAddress! + self[side].pendingStart, raw.count - self[side].pendingStart)
            }
            if count < 0 {
                if errno == EAGAIN || errno == EWOULDBLOCK {
                    self[side].writable = false
                    return
                }
                if errno == EINTR { continue }
                fail(side, "send")
                return
            }
            self[side].pendingStart += count
            machine.wrote(now: loop.now)  // bytes leaving for a slow reader are activity (nginx)
        }
        self[side].pendingStart = 0
        loop.pool.giveBack(&self[side].pending)
        let after = self[side].afterDrain
        self[side].afterDrain = .nothing
        switch after {
        case .nothing: break
        case .closeBoth: perform(.closeBoth(resetting: nil))
        case .shutdownOutput: shutOutput(side)
        }
        if !ended { pump(side.other) }
    }

    /// read() said 0. After we shut this side's output, its EOF ends it in order (the other
    /// side then finishes writing); otherwise the machine says what the EOF means.
    private func inputEnded(_ side: Side) {
        self[side].inputClosed = true
        if self[side].outputShutStarted {
            closeSide(side)
        } else {
            perform(machine.inputClosed(side, now: loop.now))
        }
    }

    private func fail(_ side: Side, _ error: SystemCallError) {
        self[side].sawError = true
        perform(machine.failed(side, SessionMachine.Failure(error), now: loop.now))
    }

    /// A read or write failed (errno says how): TLS's own errors carry OpenSSL's words.
    private func fail(_ side: Side, _ call: String) {
        if errno == EPROTO, let tls = self[side].tls, !tls.failure.isEmpty {
            self[side].sawError = true
            perform(machine.failed(side, .error(tls.failure), now: loop.now))
            return
        }
        let name = self[side].tls == nil ? call : (call == "recv" ? "SSL_read" : "SSL_write")
        fail(side, SystemCallError(name))
    }

    // MARK: Dialling

    private func dial(_ dial: SessionMachine.Dial) {
        dialAttempt = (dialAttempt &+ 1) & 0x3F
        let endpoint = dial.endpoint
        let fd = socket(endpoint.family, Int32(SOCK_STREAM.rawValue | SOCK_NONBLOCK.rawValue | SOCK_CLOEXEC.rawValue), 0)
        guard fd >= 0 else {
            perform(machine.dialFailed(DialFailure(errno: errno), now: loop.now))
            return
        }
        let proxy = runtime.policy.proxy
        if proxy.tcpNoDelay { try? Socket.setOption(fd, Int32(IPPROTO_TCP), TCP_NODELAY, 1) }
        if proxy.socketKeepalive { try? Socket.setOption(fd, SOL_SOCKET, SO_KEEPALIVE, 1) }
        if let local = dial.local, let failure = Socket.bindLocal(fd, local, datagram: false) {
            Glibc.close(fd)
            perform(machine.localBindFailed(failure.message, critical: failure.critical, now: loop.now))
            return
        }
        let result = endpoint.withSockAddr { connect(fd, $0, $1) }
        if result != 0 && errno != EINPROGRESS {
            let error = errno
            Glibc.close(fd)
            perform(machine.dialFailed(DialFailure(errno: error), now: loop.now))
            return
        }
        upstream = Peer(fd: fd)
        upstreamConnected = false
        // A connect that finished at once is reported by the registration's first edge too.
        guard loop.register(fd, token(.upstream)) else {
            let error = errno
            closeDial()
            perform(machine.dialFailed(DialFailure(errno: error), now: loop.now))
            return
        }
        connectDeadline = loop.now &+ UInt64(max(dial.timeoutMilliseconds, 1)) * 1_000_000
        armTimer()
    }

    /// `clean`: writable with no error or hang-up, which is a connect that succeeded: no
    /// getsockopt(SO_ERROR) needed to be sure.
    private func connectFinished(clean: Bool) {
        connectDeadline = 0
        let error = clean ? 0 : Socket.pendingError(upstream.fd)
        guard error == 0 else {
            closeDial()
            perform(machine.dialFailed(DialFailure(errno: error), now: loop.now))
            return
        }
        upstreamConnected = true
        perform(machine.dialSucceeded(now: loop.now))
    }

    /// Closes a dial's socket that never became the session's upstream (nothing to report).
    private func closeDial() {
        guard !upstreamConnected, upstream.isOpen else { return }
        upstream.tls = nil
        Glibc.close(upstream.fd)
        upstream = Peer()
        upstreamHandshaking = false
    }

    // MARK: TLS

    /// `listen … ssl`: the handshake with the client begins (bounded by ssl_handshake_timeout).
    private func startClientTLS(timeoutMilliseconds: Int) {
        guard let context = runtime.tlsServer, let tls = TLSStream(context: context.context, fd: client.fd, accepting: true) else {
            perform(machine.tlsFailed("SSL_new() failed: \(openSSLErrors())", now: loop.now))
            return
        }
        if !context.perHandshakeCertificates.isEmpty {
            let specs = context.perHandshakeCertificates
            tls.certificatePaths = { [unowned self] serverName in
                // The paths see the handshake's SNI as $ssl_server_name.
                var record = machine.record
                record.tls = TLSSessionInfo(protocolName: "", cipher: "", serverName: serverName, alpnProtocol: "",
                                            sessionReused: false, clientVerify: "NONE", clientSubject: "",
                                            clientCommonName: "", clientPresentedCertificate: false,
                                            signatureAlgorithm: "", keyAlgorithm: "")
                return specs.map {
                    (String(decoding: $0.certificate.bytes(for: record), as: UTF8.self),
                     String(decoding: $0.key.bytes(for: record), as: UTF8.self))
                }
            }
        }
        client.tls = tls
        headerDeadline = loop.now &+ UInt64(max(timeoutMilliseconds, 1)) * 1_000_000
        armTimer()
        continueClientHandshake()
    }

    /// One step of the client's handshake, on its socket's edges.
    private func continueClientHandshake() {
        guard let tls = client.tls, machine.handshaking else { return }
        switch tls.handshake() {
        case .done:
            headerDeadline = 0
            // Application data may have come with the client's Finished: read at least once.
            client.readable = true
            let (info, check) = tls.serverSessionInfo()
            perform(machine.tlsEstablished(info, certificate: check, now: loop.now))
        case .wantRead:
            client.readable = false
        case .wantWrite:
            client.writable = false
        case .failed(let reason):
            perform(machine.tlsFailed(reason, info: tls.serverSessionInfo().0, now: loop.now))
        }
    }

    /// `proxy_ssl on`: the connected socket goes back to being a dial until its handshake
    /// (bounded by proxy_connect_timeout, as nginx) succeeds; the PROXY header goes first.
    private func startUpstreamTLS(_ start: SessionMachine.UpstreamTLSStart) {
        upstreamConnected = false
        upstreamHandshaking = true
        guard let context = runtime.tlsClient,
              let tls = TLSStream(context: context.context, fd: upstream.fd, accepting: false) else {
            upstreamTLSFailed("SSL_new() failed: \(openSSLErrors())")
            return
        }
        if let name = start.serverName { _ = portcullis_tls_set_server_name(tls.ssl, name) }
        if let name = start.verifyName {
            // The chain here; the name after the handshake (upstreamVerifyError), every time.
            portcullis_tls_set_verify_peer(tls.ssl, Int32(context.settings.verifyDepth), nil)
            tls.verifyName = name
            tls.sessionTrusted = false
        }
        let key = TLSClientContext.SessionKey(endpoint: start.endpoint, name: start.verifyName ?? start.serverName ?? "")
        tls.clientContext = context
        tls.sessionKey = key
        context.resume(tls.ssl, for: key)
        upstream.tls = tls
        tls.preface = start.preface
        connectDeadline = loop.now &+ UInt64(max(runtime.policy.proxy.connectTimeoutMilliseconds, 1)) * 1_000_000
        armTimer()
        continueUpstreamHandshake()
    }

    private func continueUpstreamHandshake() {
        guard upstreamHandshaking, let tls = upstream.tls else { return }
        while !tls.preface.isEmpty {
            let count = tls.preface.withUnsafeBytes { Glibc.send(upstream.fd, $0.baseAddress, $0.count, Int32(MSG_NOSIGNAL)) }
            if count < 0 {
                if errno == EINTR { continue }
                if errno == EAGAIN || errno == EWOULDBLOCK { return }
                upstreamTLSFailed("\(SystemCallError("send")) while sending PROXY header to upstream")
                return
            }
            tls.preface.removeFirst(count)
        }
        switch tls.handshake() {
        case .done:
            if tls.verifyName != nil, let error = tls.upstreamVerifyError() {
                upstreamTLSFailed(error + " while SSL handshaking to upstream")
                return
            }
            connectDeadline = 0
            upstreamHandshaking = false
            upstreamConnected = true
            upstream.readable = true
            perform(machine.upstreamTLSEstablished(now: loop.now))
        case .wantRead:
            upstream.readable = false
        case .wantWrite:
            upstream.writable = false
        case .failed(let reason):
            upstreamTLSFailed(reason + " while SSL handshaking to upstream")
        }
    }

    private func upstreamTLSFailed(_ reason: String) {
        connectDeadline = 0
        closeDial()
        perform(machine.upstreamTLSFailed(reason, now: loop.now))
    }

    // MARK: Doing what the machine says

    private func perform(_ action: SessionMachine.Action) {
        if !machine.notes.isEmpty { runtime.write(machine.takeNotes(), connection: id) }
        switch action {
        case .none, .readMore, .refused:
            break  // reading more goes on in readHeader; refusals of this kind are UDP's
        case .readProxyHeader(let timeout), .readClientHello(let timeout):
            headerDeadline = loop.now &+ UInt64(max(timeout, 1)) * 1_000_000
            armTimer()
            if client.readable { readBeforeRelay() }
        case .startTLS(let timeout):
            startClientTLS(timeoutMilliseconds: timeout)
        case .startUpstreamTLS(let start):
            startUpstreamTLS(start)
        case .dial(let dial):
            self.dial(dial)
        case .resolve(let host, let resolver):
            runtime.lookUp(host, with: resolver, on: loop) { [self] result in
                if !ended { perform(machine.resolved(result, now: loop.now)) }
            }
        case .startRelay(let start):
            startRelay(start)
        case .closeClient:
            closeSide(.client)
        case .reply(let bytes):
            // `return`: the client's own bytes are never read (as nginx, whose close then
            // resets a client that sent some).
            replying = true
            bytes.withUnsafeBytes { send($0, to: .client) }
            if ended || !client.isOpen { return }
            if client.hasPending {
                client.afterDrain = .closeBoth
            } else {
                closeSide(.client)
            }
        case .close(let side):
            closeSide(side)
        case .closeBoth(let resetting):
            if let resetting { self[resetting].resetOnClose = true }
            closeSide(.client)
            closeSide(.upstream)
        case .closeWhenWritten(let side):
            // A close after the last write sends the same FIN a shutdown would.
            if self[side].hasPending && self[side].isOpen {
                self[side].afterDrain = .closeBoth
            } else {
                perform(.closeBoth(resetting: nil))
            }
        case .shutdownOutput(let side):
            if self[side].hasPending && self[side].isOpen {
                self[side].afterDrain = .shutdownOutput
            } else {
                shutOutput(side)
            }
        case .watchIdle:
            watchingIdle = true
            armTimer()
        case .end(let record, let audit):
            end()
            runtime.sessionLogger.log(record, accessLogs: runtime.policy.accessLogs, auditLog: runtime.policy.auditLog, audit: audit,
                                      upstream: runtime.policy.upstream?.name)
        }
    }

    private func startRelay(_ start: SessionMachine.RelayStart) {
        relaying = true
        if start.throttled {
            // Small reads keep a throttled key's debt small and its sessions taking turns; a
            // small receive buffer bounds what a peer's FIN can push through at once.
            readSize = 16 * 1024
            try? Socket.setOption(client.fd, SOL_SOCKET, SO_RCVBUF, 64 * 1024)
            try? Socket.setOption(upstream.fd, SOL_SOCKET, SO_RCVBUF, 64 * 1024)
        }
        if !start.toUpstream.isEmpty {
            start.toUpstream.withUnsafeBytes { send($0, to: .upstream) }
        }
        watchingIdle = true
        armTimer()
        if start.clientEnded { perform(machine.inputClosed(.client, now: loop.now)) }
        if !ended { pump(.upstream) }
        if !ended { pump(.client) }
    }

    /// Shuts `side`'s output (everything for it was written), then tells the machine.
    private func shutOutput(_ side: Side) {
        if self[side].isOpen && !self[side].outputShutStarted {
            self[side].tls?.sendCloseNotify()
            shutdown(self[side].fd, Int32(SHUT_WR))
            self[side].outputShutStarted = true
        }
        perform(machine.outputShut(side))
        // Its peer's FIN may have come already: that closes it now.
        if !ended && self[side].isOpen && self[side].inputClosed { closeSide(side) }
    }

    /// Closes `side`'s socket (what waits for it is dropped) and tells the machine; a dial's
    /// socket is not the session's upstream and closes without a word.
    private func closeSide(_ side: Side) {
        guard self[side].isOpen else { return }
        if side == .upstream && !upstreamConnected {
            closeDial()
            return
        }
        if self[side].resetOnClose {
            Socket.resetOnClose(self[side].fd)
        } else {
            self[side].tls?.sendCloseNotify()
        }
        self[side].tls = nil
        Glibc.close(self[side].fd)  // also leaves the epoll set
        self[side].fd = -1
        self[side].pendingStart = 0
        loop.pool.giveBack(&self[side].pending)
        if side == .client { headerDeadline = 0 }
        perform(machine.closed(side, inOrder: self[side].endedInOrder, now: loop.now))
    }

    /// The record is written: nothing of the session is left but its slot, freed here.
    private func end() {
        guard !ended else { return }
        ended = true
        closeDial()  // a dial that connected after the client left
        for side in [Side.client, .upstream] where self[side].isOpen {
            self[side].tls = nil
            Glibc.close(self[side].fd)
            self[side].fd = -1
            loop.pool.giveBack(&self[side].pending)
        }
        watchingIdle = false
        loop.slab.remove(slot: slot)
        runtime.registry.closeSession()
    }

    /// The engine stops with the session still open (after a drain that closed what it could):
    /// its sockets are closed without a record.
    func abandon() { end() }

    /// Closes the client (the end of a drain): the machine then closes the rest and logs.
    func closeClient() {
        guard !ended else { return }
        if client.isOpen {
            closeSide(.client)
        } else {
            perform(.closeBoth(resetting: nil))
        }
        if !ended { closeSide(.upstream) }
    }

    // MARK: Deadlines

    private var idleDeadline: UInt64 { machine.lastActivity &+ idleTimeout }

    /// Puts the session's earliest deadline in the loop's heap, unless an earlier entry of
    /// its own is there already.
    private func armTimer() {
        guard !ended else { return }
        var next: UInt64 = 0
        func consider(_ deadline: UInt64) {
            if deadline != 0 && (next == 0 || deadline < next) { next = deadline }
        }
        consider(headerDeadline)
        consider(connectDeadline)
        consider(client.resumeAt)
        consider(upstream.resumeAt)
        if watchingIdle { consider(max(idleDeadline, 1)) }
        guard next != 0, heapDeadline == 0 || next < heapDeadline else { return }
        heapDeadline = next
        loop.schedule(TimerHeap.Entry(deadline: next, slot: slot, generation: generation))
    }
}
