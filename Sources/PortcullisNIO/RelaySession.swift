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

/// One TCP session from accept to log: runs the access phase, dials the upstream on the
/// client's event loop, pairs the two relay handlers, enforces `proxy_timeout`, and writes
/// exactly one record when both sides are gone. Lives on the client's event loop only.
final class RelaySession: IdleWatched {
    let runtime: ServerRuntime
    let eventLoop: any EventLoop
    var record: SessionRecord
    let id: UInt64

    private let client: RelayHandler
    private var upstream: RelayHandler?
    private var triedUpstreams: [Int] = []
    /// The upstream group this session uses (fixed, or what `proxy_pass $var` named).
    private var upstreamGroup: UpstreamGroup?
    /// What the access and limit phases decided and hold (slots, buckets); released once.
    private var gate = SessionGate()
    private var connectStarted: NIODeadline = .now()
    private var upstreamConnectedAt: NIODeadline?
    private var idleTimeout: IdleTimeout
    private var timedOut = false
    private(set) var lastActivity = NIODeadline.now()
    /// Client bytes read while waiting for the PROXY header, and those that followed it.
    private var headerBytes: ByteBuffer?
    private var earlyPayload: ByteBuffer?
    private var headerTimer: Scheduled<Void>?
    private var readingProxyHeader = false
    /// The client's EOF came while the upstream was being dialled (see `inputClosed`).
    private var clientEOFBeforeRelay = false
    private var clientOpen = true
    private var upstreamOpen = false
    private var connecting = false
    private var finished = false

    init(runtime: ServerRuntime, channel: any Channel, client: RelayHandler) {
        self.runtime = runtime
        self.eventLoop = channel.eventLoop
        self.client = client
        self.id = runtime.registry.open(channel)
        idleTimeout = IdleTimeout(milliseconds: runtime.policy.proxy.idleTimeoutMilliseconds)
        let peer = channel.remoteAddress.flatMap(SocketEndpoint.init) ?? SocketEndpoint(address: .v4(0), port: 0)
        let local = channel.localAddress.flatMap(SocketEndpoint.init) ?? runtime.listen.endpoint
        record = SessionRecord(
            connection: id, transport: .tcp, client: peer, server: local,
            listener: runtime.listen.description, startTime: Date().timeIntervalSince1970)
        record.variables = runtime.policy.makeSessionVariables()
    }

    private var logger: Logger {
        var logger = runtime.errorLog
        logger[metadataKey: "connection"] = "\(id)"
        return logger
    }

    private var where_: String { SessionGate.place(record) }

    // MARK: Phases

    /// accept → [proxy_header_read → realip] → access → upstream_pick. Called once the client
    /// channel is active.
    func start() {
        guard runtime.listen.proxyProtocol else {
            admit()
            return
        }
        readingProxyHeader = true
        let timeout = TimeAmount.milliseconds(Int64(runtime.policy.proxy.proxyProtocolTimeoutMilliseconds))
        headerTimer = eventLoop.assumeIsolated().scheduleTask(in: timeout) { [self] in
            guard readingProxyHeader else { return }
            readingProxyHeader = false
            logger.info("client timed out (110: Connection timed out) while reading PROXY protocol, \(where_)")
            refuse(.badRequest, phase: .proxyHeaderRead, reason: "PROXY protocol header timed out")
        }
        client.readMore()
    }

    /// Bytes that arrived before the relay started: the PROXY header, and perhaps payload.
    func receivedBeforeRelay(_ buffer: ByteBuffer) {
        guard readingProxyHeader else {
            // Payload while the upstream is being dialled. Reads wait for the relay, but when
            // the client's FIN arrives SwiftNIO drains the socket anyway (its RDHUP handling):
            // keep the bytes for the upstream, as nginx would send them.
            if earlyPayload == nil { earlyPayload = buffer } else { earlyPayload!.writeImmutableBuffer(buffer) }
            return
        }
        if headerBytes == nil {
            headerBytes = buffer
        } else {
            headerBytes!.writeImmutableBuffer(buffer)
        }
        let outcome = headerBytes!.withUnsafeReadableBytes { raw in
            Result { () throws(ProxyHeaderError) in try ProxyHeaderDecoder.decode(raw) }
        }
        switch outcome {
        case .success(nil):
            client.readMore()  // bounded: a v1 line is refused after 107 bytes, v2 after 16 + 65535
        case .failure(let error):
            readingProxyHeader = false
            headerTimer?.cancel()
            logger.error("broken header: \"\(Self.excerpt(headerBytes!))\" (\(error)) while reading PROXY protocol, \(where_)")
            refuse(.badRequest, phase: .proxyHeaderRead, reason: "broken PROXY protocol header: \(error)")
        case .success(let (header, length)?):
            readingProxyHeader = false
            headerTimer?.cancel()
            headerBytes!.moveReaderIndex(forwardBy: length)
            if headerBytes!.readableBytes > 0 { earlyPayload = headerBytes }
            headerBytes = nil
            var header = header
            if header.transport != .stream {
                // A DGRAM or UNSPEC header says nothing about a TCP client: the spec's UNSPEC
                // fallback (nginx and HAProxy keep the peer too).
                header.addresses = .unspecified
            }
            record.proxyHeader = header
            // realip: only a trusted sender's header becomes $remote_addr, as nginx.
            if let source = header.source, runtime.policy.realIPFrom.trusts(record.peer.address) {
                record.client = source
            }
            admit()
        }
    }

    /// Up to 64 bytes of a refused header, printable, for the error log.
    /// (nginx's default log escaping: `"`, `\\`, control bytes and bytes above 0x7E as `\\xHH`.)
    static func excerpt(_ buffer: ByteBuffer) -> String {
        let bytes = buffer.getBytes(at: buffer.readerIndex, length: min(64, buffer.readableBytes)) ?? []
        var text = ""
        LogEscaping.append(bytes, escape: .default, to: &text)
        return text
    }

    /// access → limit_conn → limit_rate → upstream_pick, on the client address the earlier
    /// phases settled.
    private func admit() {
        guard let group = gate.admit(runtime.policy, record: &record, now: NIODeadline.now().uptimeNanoseconds,
                                     wallClock: Date().timeIntervalSince1970, report: runtime.report(for: id))
        else {
            client.close()
            return
        }
        upstreamGroup = group
        connectStarted = .now()
        connectNextUpstream()
    }

    // MARK: Limits

    /// How long `side` must wait before reading again, in nanoseconds (0 = now).
    func readDelay(for side: RelayHandler.Side) -> UInt64 {
        guard gate.throttles else { return 0 }  // no clock read on the unthrottled path
        return gate.delay(side == .client ? .fromClient : .fromUpstream, now: NIODeadline.now().uptimeNanoseconds)
    }

    var throttles: Bool { gate.throttles }

    private func connectNextUpstream() {
        guard let group = upstreamGroup else { return }
        let proxy = runtime.policy.proxy
        let tries = triedUpstreams.count
        let outOfTries = proxy.nextUpstreamTries > 0 && tries >= proxy.nextUpstreamTries
        let outOfTime = proxy.nextUpstreamTimeoutMilliseconds > 0
            && NIODeadline.now() - connectStarted >= .milliseconds(Int64(proxy.nextUpstreamTimeoutMilliseconds))
        let mayRetry = tries == 0 || (proxy.nextUpstream && !outOfTries && !outOfTime)
        // The client left while we were connecting: nothing more to try, and the client's close
        // already ran (and found `connecting` set), so finishing is up to us.
        guard clientOpen else { maybeFinish(); return }
        guard mayRetry, let index = group.pick(excluding: triedUpstreams, now: Self.milliseconds()) else {
            if tries == 0 { logger.error("no live upstreams while connecting to upstream, \(where_)") }
            refuse(.badGateway, phase: .upstreamPick, reason: tries == 0 ? "no live upstreams" : "upstream unreachable")
            return
        }
        triedUpstreams.append(index)
        let server = group.servers[index]
        let handler = RelayHandler(side: .upstream)
        handler.session = self
        let boundHandler = NIOLoopBound(handler, eventLoop: eventLoop)
        let attemptStart = NIODeadline.now()
        connecting = true
        let tcpNoDelay = proxy.tcpNoDelay
        let keepalive = proxy.socketKeepalive
        ClientBootstrap(group: eventLoop)
            .connectTimeout(.milliseconds(Int64(proxy.connectTimeoutMilliseconds)))
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
            .connect(to: server.endpoint.socketAddress)
            .assumeIsolated()
            .whenComplete { [self] result in
                connecting = false
                let now = Self.milliseconds()
                switch result {
                case .success(let channel):
                    group.report(index, succeeded: true, now: now)
                    let elapsed = Double((NIODeadline.now() - attemptStart).nanoseconds) / 1e9
                    record.upstreamAttempts.append(UpstreamAttempt(address: server.endpoint, connectTime: elapsed))
                    guard clientOpen else {
                        // Not the session's upstream yet, so its close is ignored: finish here.
                        channel.close(promise: nil)
                        maybeFinish()
                        return
                    }
                    upstreamOpen = true
                    upstream = handler
                    upstreamConnectedAt = .now()
                    lastActivity = .now()  // proxy_timeout counts from the connect, as nginx
                    writeProxyHeader(to: handler)
                    if let earlyPayload {
                        counted(earlyPayload.readableBytes, readBy: .client)
                        handler.write(earlyPayload)
                        self.earlyPayload = nil
                    }
                    if throttles {
                        // Small reads keep a throttled key's debt small and its sessions taking turns.
                        client.limitReadSize()
                        handler.limitReadSize()
                    }
                    client.pair(with: handler)
                    idleTimeout.arm(self, on: eventLoop, lastActivity: lastActivity)
                    if clientEOFBeforeRelay { inputClosed(on: .client) }
                case .failure(let error):
                    group.report(index, succeeded: false, now: now)
                    record.upstreamAttempts.append(UpstreamAttempt(address: server.endpoint, connectTime: nil))
                    logger.error("\(Self.describe(connectError: error)) while connecting to upstream, \(where_), upstream: \"\(server.endpoint)\"")
                    connectNextUpstream()
                }
            }
    }

    /// proxy_header_write: the header goes out before any payload, naming the client after
    /// realip and the address it connected to.
    private func writeProxyHeader(to upstream: RelayHandler) {
        let proxy = runtime.policy.proxy
        switch proxy.sendProxyProtocol {
        case .off:
            return
        case .v1:
            let bytes = ProxyHeaderEncoder.v1(source: record.client, destination: record.server)
            record.upstreamBytesSent += UInt64(bytes.count)  // nginx counts the header as sent
            upstream.write(bytes)
        case .v2:
            let tlvs = runtime.upstreamTLVs(for: record)
            let bytes = ProxyHeaderEncoder.v2(
                source: record.client, destination: record.server, transport: .stream, tlvs: tlvs,
                crc32c: proxy.proxyProtocolCRC32C)
            // The encoder leaves out TLVs that would push the header past 65,535 bytes; say so.
            // (The family nibble it wrote says how long its address block is.)
            let addressLength = [1: 12, 2: 36][Int(bytes[13] >> 4)] ?? 0
            let wanted = tlvs.reduce(0) { $0 + 3 + $1.value.count } + (proxy.proxyProtocolCRC32C ? 7 : 0)
            if bytes.count - 16 - addressLength < wanted {
                logger.warning("PROXY v2 header to upstream: TLVs that did not fit in 65535 bytes were left out, \(where_)")
            }
            record.upstreamBytesSent += UInt64(bytes.count)
            upstream.write(bytes)
        }
    }

    static func describe(connectError error: any Error) -> String {
        if let io = error as? IOError {
            return "connect() failed (\(io.errnoCode): \(String(cString: strerror(io.errnoCode))))"
        }
        if case ChannelError.connectTimeout = error {
            return "upstream timed out (110: Connection timed out)"
        }
        return "connect() failed (\(error))"
    }

    private func refuse(_ status: SessionStatus, phase: Phase, reason: String) {
        record.status = status
        record.phase = phase
        record.reason = reason
        client.close()
    }

    // MARK: Relay events

    func noteActivity() { lastActivity = .now() }

    func counted(_ bytes: Int, readBy side: RelayHandler.Side) {
        if gate.throttles {
            gate.spend(bytes, side == .client ? .fromClient : .fromUpstream, now: NIODeadline.now().uptimeNanoseconds)
        }
        if side == .client {
            record.bytesReceived += UInt64(bytes)
            record.upstreamBytesSent += UInt64(bytes)
        } else {
            record.upstreamBytesReceived += UInt64(bytes)
            record.bytesSent += UInt64(bytes)
        }
    }

    /// One side sent EOF. With `proxy_half_close on` the other side's output is shut once its
    /// pending bytes are written, and the session ends when both directions are done; with it
    /// off (nginx's default) the session ends as soon as the pending bytes are written.
    func inputClosed(on side: RelayHandler.Side) {
        if side == .client && readingProxyHeader {
            headerIncomplete("the client closed the connection")
            return
        }
        if side == .client && upstream == nil && connecting {
            // The client finished sending before the upstream answered: pass its bytes and its
            // EOF on once the relay begins (`connectNextUpstream`), rather than dropping both.
            clientEOFBeforeRelay = true
            return
        }
        let (from, to) = side == .client ? (client, upstream) : (upstream, client)
        guard let from else { return }
        guard let to, to.isActive else {
            from.close()
            return
        }
        guard runtime.policy.proxy.halfClose else {
            // nginx's default: the session ends once what is queued for `to` is written. A
            // close after the last write sends the same FIN a shutdown would, without the
            // extra system call and its futures (4.5 % of the gateway's CPU under a
            // connection flood).
            to.afterQueuedWrites { [self] in closeBoth() }
            return
        }
        to.shutdownOutput { [self] in
            // Done when both directions are: each output shut after its last byte was written.
            // Closing on "both inputs ended" instead would drop bytes still queued.
            if client.outputIsClosed && upstream?.outputIsClosed == true {
                closeBoth()
            }
        }
    }

    /// The spec: a partial header must be rejected. nginx logs it as a broken header, 400.
    private func headerIncomplete(_ why: String) {
        readingProxyHeader = false
        headerTimer?.cancel()
        let excerpt = headerBytes.map(Self.excerpt) ?? ""
        logger.error("broken header: \"\(excerpt)\" (\(why) before it was complete) while reading PROXY protocol, \(where_)")
        refuse(.badRequest, phase: .proxyHeaderRead, reason: "incomplete PROXY protocol header: \(why)")
    }

    /// One side failed (reset, timeout, …): end both, passing a reset on as a reset.
    func failed(on side: RelayHandler.Side, error: any Error) {
        if side == .client && readingProxyHeader {
            headerIncomplete("\(error)")
            return
        }
        let other = side == .client ? upstream : client
        if let io = error as? IOError, io.errnoCode == ECONNRESET || io.errnoCode == EPIPE {
            other?.resetOnClose()
        } else if !(error is ChannelError) {
            logger.info("\(error) while proxying, \(where_)")
        }
        closeBoth()
    }

    func channelClosed(_ side: RelayHandler.Side, handler: RelayHandler) {
        let other: RelayHandler?
        if side == .client {
            clientOpen = false
            other = upstream
        } else {
            // A failed connect attempt's channel is not the session's upstream: ignore it.
            guard handler === upstream else { return }
            upstreamOpen = false
            other = client
        }
        // A side that ended in order is an EOF for its partner: let the partner write what it
        // holds, then close. Any other end (reset, error, timeout, refusal) ends the session now.
        if handler.endedInOrder, let other, other.isActive {
            // (Only with proxy_half_close on: `endedInOrder` needs an output shut down.)
            other.shutdownOutput { [self] in closeBoth() }
        } else {
            other?.close()
        }
        maybeFinish()
    }

    func closeBoth() {
        client.close()
        upstream?.close()
    }

    func isIdle(now: NIODeadline) -> Bool { idleTimeout.isIdle(since: lastActivity, now: now) }

    func checkIdle(now: NIODeadline) {
        guard !timedOut, !finished else { return }
        if isIdle(now: now) {
            timedOut = true
            idleTimeout.stop(self, on: eventLoop)
            logger.info("connection timed out (proxy_timeout), \(where_)")
            closeBoth()
        } else {
            idleTimeout.arm(self, on: eventLoop, lastActivity: lastActivity)
        }
    }

    private func maybeFinish() {
        guard !finished, !clientOpen, !upstreamOpen, !connecting else { return }
        finished = true
        // Exactly once, however the session ended: this runs once (`finished`).
        gate.release()
        idleTimeout.stop(self, on: eventLoop)
        headerTimer?.cancel()
        record.endTime = Date().timeIntervalSince1970
        if let upstreamConnectedAt {
            record.upstreamSessionTime = Double((NIODeadline.now() - upstreamConnectedAt).nanoseconds) / 1e9
        }
        runtime.registry.close(id)
        runtime.sessionLogger.log(record, accessLogs: runtime.policy.accessLogs)
    }

    static func milliseconds() -> Int64 { Int64(NIODeadline.now().uptimeNanoseconds / 1_000_000) }
}

extension SocketEndpoint {
    init?(_ address: SocketAddress) {
        switch address {
        case .v4(let v4):
            self.init(address: .v4(UInt32(bigEndian: v4.address.sin_addr.s_addr)), port: UInt16(address.port ?? 0))
        case .v6(let v6):
            let bytes = withUnsafeBytes(of: v6.address.sin6_addr) { Array($0) }
            guard let ip = IPAddress(bytes: bytes) else { return nil }
            self.init(address: ip, port: UInt16(address.port ?? 0))
        case .unixDomainSocket:
            return nil
        }
    }

    var socketAddress: SocketAddress {
        switch address {
        case .v4(let value):
            var sin = sockaddr_in()
            sin.sin_family = sa_family_t(AF_INET)
            sin.sin_port = port.bigEndian
            sin.sin_addr.s_addr = value.bigEndian
            return SocketAddress(sin, host: "")
        case .v6:
            var sin6 = sockaddr_in6()
            sin6.sin6_family = sa_family_t(AF_INET6)
            sin6.sin6_port = port.bigEndian
            let bytes = address.bytes
            withUnsafeMutableBytes(of: &sin6.sin6_addr) { raw in
                for i in 0..<16 { raw[i] = bytes[i] }
            }
            return SocketAddress(sin6, host: "")
        }
    }
}
