#if canImport(Glibc)
import Glibc
#endif
import NIOCore

/// One side of the relay: bytes read here are written to the partner on the other channel of
/// the same event loop. Backpressure: `autoRead` is off and this side asks the kernel for more
/// only while its partner is writable, so a fast sender and a slow receiver hold at most the
/// partner's write-buffer high-water mark plus one read batch in memory.
final class RelayHandler: ChannelDuplexHandler {
    typealias InboundIn = ByteBuffer
    typealias OutboundIn = ByteBuffer
    typealias OutboundOut = ByteBuffer

    enum Side { case client, upstream }

    let side: Side
    /// The client side creates the session once its channel is active.
    private let runtime: ServerRuntime?
    var session: RelaySession?
    private var context: ChannelHandlerContext?
    private var partner: RelayHandler?
    private var wantsRead = false
    /// A read is scheduled for when the session's rate limits allow it.
    private var readScheduled = false
    private var scheduledRead: Scheduled<Void>?
    private(set) var inputIsClosed = false
    /// This side's write direction is shut and everything queued before it was written.
    private(set) var outputIsClosed = false
    /// This side's channel closed in order: we had shut its output after its last byte, no
    /// error was seen, and the peer's EOF then closed it (NIO turns EOF after an output
    /// shutdown into a full close, with no inputClosed event). The partner must then finish
    /// writing, not be cut short.
    var endedInOrder: Bool { outputShutdownStarted && !sawError }
    private var outputShutdownStarted = false
    private var sawError = false
    private var closing = false
    private var resetWhenClosing = false

    init(side: Side, runtime: ServerRuntime? = nil) {
        self.side = side
        self.runtime = runtime
    }

    var isActive: Bool { context?.channel.isActive ?? false }
    private var isWritable: Bool { context?.channel.isWritable ?? false }

    func handlerAdded(context: ChannelHandlerContext) { self.context = context }

    func handlerRemoved(context: ChannelHandlerContext) {
        // A throttled read may be hours away at a low rate: do not keep this handler until then.
        scheduledRead?.cancel()
        scheduledRead = nil
        self.context = nil
        partner = nil
        session = nil  // breaks the session ↔ handler cycle
    }

    func channelActive(context: ChannelHandlerContext) {
        if side == .client, let runtime {
            let session = RelaySession(runtime: runtime, channel: context.channel, client: self)
            self.session = session
            session.start()
        }
        context.fireChannelActive()
    }

    /// Joins the two sides, sends what was written to either before, and starts reading both.
    func pair(with other: RelayHandler) {
        partner = other
        other.partner = self
        other.context?.flush()
        readIfAllowed()
        other.readIfAllowed()
    }

    /// Asks the kernel for more bytes now, or, if a rate limit says wait, once it allows.
    /// Throttling only delays reads: nothing read is ever dropped or reordered.
    func readIfAllowed() {
        guard let context, !inputIsClosed, !readScheduled else { return }
        let delay = session?.readDelay(for: side) ?? 0
        guard delay > 0 else {
            context.read()
            return
        }
        readScheduled = true
        scheduledRead = context.eventLoop.assumeIsolated().scheduleTask(in: .nanoseconds(Int64(clamping: delay))) { [self] in
            readScheduled = false
            // The wait was this side's reserved turn (SharedBucket): read now, without asking
            // again, or the turn would go to the back of the line.
            guard let context = self.context, !inputIsClosed else { return }
            if partner?.isWritable ?? false {
                context.read()
            } else {
                wantsRead = true
            }
        }
    }

    /// 16 KiB reads, one per event loop turn: a throttled session overdraws its bucket by at
    /// most one read. A small receive buffer too: when the peer closes, NIO reads everything
    /// the socket holds at once (autoRead or not), so that is all that can pass unthrottled.
    func limitReadSize() {
        guard let options = context?.channel.syncOptions else { return }
        try? options.setOption(.socketOption(.so_rcvbuf), value: 64 * 1024)
        try? options.setOption(.recvAllocator, value: FixedSizeRecvByteBufferAllocator(capacity: 16 * 1024))
        try? options.setOption(.maxMessagesPerRead, value: 1)
    }

    /// Queues bytes on this side's channel (flushed when the sides are paired).
    func write(_ bytes: [UInt8]) {
        guard let context else { return }
        var buffer = context.channel.allocator.buffer(capacity: bytes.count)
        buffer.writeBytes(bytes)
        context.write(wrapOutboundOut(buffer), promise: nil)
    }

    func write(_ buffer: ByteBuffer) {
        context?.write(wrapOutboundOut(buffer), promise: nil)
    }

    /// Asks for the next read while the session is still before the relay.
    func readMore() { context?.read() }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        let buffer = unwrapInboundIn(data)
        guard partner != nil else {
            // Before the relay: the client's PROXY header (and whatever follows it), or what
            // SwiftNIO drained from the client at its FIN. (The upstream side is paired as soon
            // as it connects, so nothing of its own arrives here.)
            if side == .client { session?.receivedBeforeRelay(buffer) }
            return
        }
        session?.counted(buffer.readableBytes, readBy: side)  // counts as activity too
        partner?.context?.write(wrapOutboundOut(buffer), promise: nil)
    }

    func channelReadComplete(context: ChannelHandlerContext) {
        guard partner != nil else { return }  // header reading asks for more itself
        // Flush once per read batch, never hold back bytes that could be forwarded.
        partner?.context?.flush()
        if partner?.isWritable == true {
            readIfAllowed()
        } else {
            wantsRead = true
        }
    }

    func channelWritabilityChanged(context: ChannelHandlerContext) {
        // Bytes leaving for a slow reader are activity too (nginx counts write events).
        session?.noteActivity()
        if context.channel.isWritable { partner?.resumeReading() }
        context.fireChannelWritabilityChanged()
    }

    private func resumeReading() {
        guard wantsRead, !inputIsClosed else { return }
        wantsRead = false
        readIfAllowed()
    }

    func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
        if case ChannelEvent.inputClosed = event {
            inputIsClosed = true
            // NIO reports EOF before the read batch's channelReadComplete: flush what this
            // batch wrote to the partner, or shutting its output would drop those bytes.
            partner?.context?.flush()
            session?.inputClosed(on: side)
        } else {
            context.fireUserInboundEventTriggered(event)
        }
    }

    func channelInactive(context: ChannelHandlerContext) {
        // Bytes this side read in its last batch may not have been flushed yet.
        partner?.context?.flush()
        session?.channelClosed(side, handler: self)
        context.fireChannelInactive()
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        sawError = true
        session?.failed(on: side, error: error)
    }

    /// Calls `done` once everything queued on this side has been written to the socket (an
    /// empty write's promise completes after every earlier write), or at once if the channel
    /// is gone. SwiftNIO's close cancels queued writes, so a close must wait for this.
    func afterQueuedWrites(_ done: @escaping () -> Void) {
        guard let context, context.channel.isActive else {
            done()
            return
        }
        let drained = context.eventLoop.makePromise(of: Void.self)
        context.writeAndFlush(wrapOutboundOut(context.channel.allocator.buffer(capacity: 0)), promise: drained)
        drained.futureResult.assumeIsolated().whenComplete { _ in done() }
    }

    /// Shuts this side's output once what is queued has been written, then calls `done`.
    ///
    /// The wait is explicit (`afterQueuedWrites`): once NIO has seen EOF on a channel, it turns
    /// `close(mode: .output)` into a full close that cancels queued writes.
    func shutdownOutput(then done: @escaping () -> Void) {
        afterQueuedWrites { [self] in
            guard let context = self.context, context.channel.isActive else {
                outputIsClosed = true
                done()
                return
            }
            outputShutdownStarted = true
            let closed = context.eventLoop.makePromise(of: Void.self)
            context.close(mode: .output, promise: closed)
            closed.futureResult.assumeIsolated().whenComplete { [self] _ in
                outputIsClosed = true
                done()
            }
        }
    }

    /// Makes the coming close send a TCP reset (SO_LINGER 0), to pass a peer's reset on.
    func resetOnClose() { resetWhenClosing = true }

    func close() {
        guard let context, !closing else { return }
        closing = true
        if resetWhenClosing, let socket = context.channel as? any SocketOptionProvider {
            socket.setSoLinger(linger(l_onoff: 1, l_linger: 0)).assumeIsolated().whenComplete { _ in
                context.close(promise: nil)
            }
        } else {
            context.close(promise: nil)
        }
    }
}
