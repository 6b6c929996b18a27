// A UDP load generator and counting sink in one process, for bench/udp-throughput.sh.
// No dependencies beyond Glibc: sendmmsg/recvmmsg batches, so that the generator spends as
// little CPU per datagram as the kernel allows and the gateway under test is the bottleneck.
//
//   udp-load TARGET_PORT SINK_PORT SOCKETS SIZE WARMUP_S MEASURE_S
//
// Binds a sink on 127.0.0.1:SINK_PORT, opens SOCKETS client sockets connected to
// 127.0.0.1:TARGET_PORT (TARGET_PORT = SINK_PORT measures direct loopback) and sends SIZE-byte
// datagrams from all of them, round robin, as fast as it can for WARMUP_S + MEASURE_S seconds.
// Prints one line: "delivered/s sent/s sources", where delivered/s counts the datagrams the sink
// received during the last MEASURE_S seconds (the receiver side, not the sender's rate), and
// sources is the number of distinct source ports the sink saw while it counted (the gateway's
// upstream sockets: one per session).
import Glibc
import Synchronization

func fail(_ what: String) -> Never {
    fputs("udp-load: \(what): \(String(cString: strerror(errno)))\n", stderr)
    exit(2)
}

func now() -> Double {
    var ts = timespec()
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return Double(ts.tv_sec) + Double(ts.tv_nsec) / 1e9
}

func loopback(_ port: UInt16) -> sockaddr_in {
    var sin = sockaddr_in()
    sin.sin_family = sa_family_t(AF_INET)
    sin.sin_port = port.bigEndian
    sin.sin_addr.s_addr = UInt32(0x7F00_0001).bigEndian
    return sin
}

func udpSocket() -> Int32 {
    let fd = socket(AF_INET, Int32(SOCK_DGRAM.rawValue), 0)
    if fd < 0 { fail("socket") }
    return fd
}

let args = CommandLine.arguments
func number(_ i: Int) -> Double {
    guard args.count == 7, let value = Double(args[i]), value >= 0 else {
        fputs("usage: udp-load TARGET_PORT SINK_PORT SOCKETS SIZE WARMUP_S MEASURE_S\n", stderr)
        exit(64)
    }
    return value
}
let target = UInt16(number(1)), sinkPort = UInt16(number(2)), socketCount = Int(number(3))
let size = Int(number(4)), warmup = number(5), measure = number(6)

// Glibc's module map does not export the _GNU_SOURCE batch calls: declare them here.
struct MMsgHdr {
    var msg_hdr = msghdr()
    var msg_len: UInt32 = 0
}
typealias SendMMsg = @convention(c) (Int32, UnsafeMutableRawPointer, UInt32, Int32) -> Int32
typealias RecvMMsg = @convention(c) (Int32, UnsafeMutableRawPointer, UInt32, Int32, UnsafeMutableRawPointer?) -> Int32
let sendmmsg = unsafeBitCast(dlsym(nil, "sendmmsg")!, to: SendMMsg.self)
let recvmmsg = unsafeBitCast(dlsym(nil, "recvmmsg")!, to: RecvMMsg.self)
let MSG_WAITFORONE: Int32 = 0x10000

let received = Atomic<Int>(0)
let sent = Atomic<Int>(0)
let stop = Atomic<Bool>(false)
/// Source ports are collected during the measured window only (not a previous run's stragglers).
let measuring = Atomic<Bool>(false)
let batch = 64

// The sink: recvmmsg in batches of 64, waking every 100 ms to look at the stop flag.
let sink = udpSocket()
var one: Int32 = 1
setsockopt(sink, SOL_SOCKET, SO_REUSEADDR, &one, socklen_t(MemoryLayout<Int32>.size))
var rcvbuf: Int32 = 4 << 20
setsockopt(sink, SOL_SOCKET, SO_RCVBUF, &rcvbuf, socklen_t(MemoryLayout<Int32>.size))
var tick = timeval(tv_sec: 0, tv_usec: 100_000)
setsockopt(sink, SOL_SOCKET, SO_RCVTIMEO, &tick, socklen_t(MemoryLayout<timeval>.size))
var sinkAddress = loopback(sinkPort)
let bound = withUnsafePointer(to: &sinkAddress) {
    $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(sink, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) }
}
if bound != 0 { fail("bind 127.0.0.1:\(sinkPort)") }

final class Sources: @unchecked Sendable {
    var ports = Set<UInt16>()
}
let sources = Sources()
var sinkThread = pthread_t()
pthread_create(&sinkThread, nil, { _ in
    let buffers = UnsafeMutableRawPointer.allocate(byteCount: batch * 2048, alignment: 64)
    let iovs = UnsafeMutablePointer<iovec>.allocate(capacity: batch)
    let names = UnsafeMutablePointer<sockaddr_in>.allocate(capacity: batch)
    let headers = UnsafeMutablePointer<MMsgHdr>.allocate(capacity: batch)
    while !stop.load(ordering: .relaxed) {
        for i in 0..<batch {
            iovs[i] = iovec(iov_base: buffers + i * 2048, iov_len: 2048)
            headers[i] = MMsgHdr()
            headers[i].msg_hdr.msg_iov = iovs + i
            headers[i].msg_hdr.msg_iovlen = 1
            headers[i].msg_hdr.msg_name = UnsafeMutableRawPointer(names + i)
            headers[i].msg_hdr.msg_namelen = socklen_t(MemoryLayout<sockaddr_in>.size)
        }
        let n = recvmmsg(sink, UnsafeMutableRawPointer(headers), UInt32(batch), MSG_WAITFORONE, nil)
        if n > 0 {
            received.add(Int(n), ordering: .relaxed)
            // Distinct senders: few of them, so a set insert per datagram is cheap enough.
            if measuring.load(ordering: .relaxed) {
                for i in 0..<Int(n) { sources.ports.insert(UInt16(bigEndian: names[i].sin_port)) }
            }
        }
    }
    return nil
}, nil)

// The sender: SOCKETS connected sockets, sendmmsg batches of 64 from each in turn.
var sockets: [Int32] = []
for _ in 0..<socketCount {
    let fd = udpSocket()
    var to = loopback(target)
    let connected = withUnsafePointer(to: &to) {
        $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) }
    }
    if connected != 0 { fail("connect 127.0.0.1:\(target)") }
    sockets.append(fd)
}
var senderThread = pthread_t()
let senderSockets = sockets
pthread_create(&senderThread, nil, { _ in
    let fds = senderSockets
    let payload = UnsafeMutableRawPointer.allocate(byteCount: max(size, 1), alignment: 64)
    memset(payload, 0x5A, max(size, 1))
    let iovs = UnsafeMutablePointer<iovec>.allocate(capacity: batch)
    let headers = UnsafeMutablePointer<MMsgHdr>.allocate(capacity: batch)
    for i in 0..<batch {
        iovs[i] = iovec(iov_base: payload, iov_len: size)
        headers[i] = MMsgHdr()
        headers[i].msg_hdr.msg_iov = iovs + i
        headers[i].msg_hdr.msg_iovlen = 1
    }
    var total = 0
    while !stop.load(ordering: .relaxed) {
        for fd in fds {
            let n = sendmmsg(fd, UnsafeMutableRawPointer(headers), UInt32(batch), 0)
            // ECONNREFUSED: an ICMP from a target that was not there yet; keep going.
            if n > 0 { total += Int(n) }
        }
        sent.store(total, ordering: .relaxed)
    }
    return nil
}, nil)

func sleepSeconds(_ s: Double) {
    var left = timespec(tv_sec: Int(s), tv_nsec: Int((s - Double(Int(s))) * 1e9))
    var rest = timespec()
    while nanosleep(&left, &rest) != 0 && errno == EINTR { left = rest }
}

sleepSeconds(warmup)
let (t1, r1, s1) = (now(), received.load(ordering: .relaxed), sent.load(ordering: .relaxed))
measuring.store(true, ordering: .relaxed)
sleepSeconds(measure)
measuring.store(false, ordering: .relaxed)
let (t2, r2, s2) = (now(), received.load(ordering: .relaxed), sent.load(ordering: .relaxed))
stop.store(true, ordering: .relaxed)
pthread_join(senderThread, nil)
pthread_join(sinkThread, nil)
let seconds: Double = t2 - t1
let deliveredRate = Int((Double(r2 - r1) / seconds).rounded())
let sentRate = Int((Double(s2 - s1) / seconds).rounded())
print("\(deliveredRate) \(sentRate) \(sources.ports.count)")
