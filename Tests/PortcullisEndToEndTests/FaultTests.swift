#if canImport(Glibc)
import Glibc
#endif
import Foundation
import Synchronization
import Testing
import PortcullisTestSupport

/// Issue #16 item 3, part B, against the built `portcullis` executable run as a subprocess (so
/// that its memory and descriptors are its own, and a crash is seen as one): a flood of
/// distinct limit keys through PROXY v1 headers, 20,000 UDP source ports towards an upstream
/// that never answers, and a geoip2 database truncated in place and then replaced by rename
/// while clients keep connecting. Figures are printed and written in docs/threat-model.md.
@Suite("Floods and faults", .serialized)
struct FaultTests {
    // MARK: The gateway as a subprocess

    /// A value shared by client threads (escaping closures cannot capture a `Mutex` or an
    /// `Atomic` itself).
    final class Shared<Value: Sendable>: @unchecked Sendable {
        private let lock: Mutex<Value>
        init(_ value: Value) { lock = Mutex(value) }
        @discardableResult func update<R>(_ body: (inout Value) -> R) -> R { lock.withLock { body(&$0) } }
        var value: Value {
            get { lock.withLock { $0 } }
            set { lock.withLock { $0 = newValue } }
        }
    }

    /// The metrics endpoint's samples, `name{labels}` → value.
    static func scrape(_ port: UInt16) throws -> [String: Double] {
        let connection = try TestConnection.connect(to: "127.0.0.1", port: port, timeout: 5)
        defer { connection.close() }
        try connection.send("GET /metrics HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
        let text = String(decoding: try connection.receiveAll(limit: 1 << 22), as: UTF8.self)
        guard text.hasPrefix("HTTP/1.") && text.contains(" 200 ") else { throw HarnessError("metrics: \(text.prefix(200))") }
        var samples: [String: Double] = [:]
        for line in text.split(separator: "\n") where !line.hasPrefix("#") {
            guard let space = line.lastIndex(of: " "), let value = Double(line[line.index(after: space)...]) else { continue }
            samples[String(line[..<space])] = value
        }
        return samples
    }

    static func mib(_ kib: Int) -> String { String(format: "%.1f MiB", Double(kib) / 1024) }

    /// Counters shared by client threads.
    final class Tally: @unchecked Sendable {
        private let counts = Mutex<[String: Int]>([:])
        func add(_ name: String, _ n: Int = 1) { counts.withLock { $0[name, default: 0] += n } }
        subscript(_ name: String) -> Int { counts.withLock { $0[name] ?? 0 } }
    }

    /// Runs `body` on `count` threads and returns when all have finished.
    static func onThreads(_ count: Int, _ body: @escaping @Sendable (Int) -> Void) -> [Thread] {
        (0..<count).map { index in
            let thread = Thread { body(index) }
            thread.start()
            return thread
        }
    }

    static func join(_ done: Shared<Int>, _ count: Int, timeout: Double) -> Bool {
        let deadline = Date().addingTimeInterval(timeout)
        while done.value < count && Date() < deadline { usleep(10_000) }
        return done.value >= count
    }

    /// One connection presenting `source` in a PROXY v1 header: what came back before EOF
    /// ("" when the gateway closed without a byte, its refusal), nil on an error or timeout.
    static func exchange(_ source: String, port: UInt16, payload: String = "", limit: Int = 64, timeout: Double = 5) -> String? {
        guard let client = try? TestConnection.connect(to: "127.0.0.1", port: port, timeout: timeout) else { return nil }
        defer { client.close() }
        do {
            try client.send("PROXY TCP4 \(source) 127.0.0.1 40000 \(port)\r\n" + payload)
            return String(decoding: try client.receiveAll(limit: limit), as: UTF8.self)
        } catch TestSocketError.system(_, let code) where code == ECONNRESET {
            return ""
        } catch {
            return nil
        }
    }

    /// The n-th flood address (n from 0): 10.0.0.1, 10.0.0.2, …
    static func floodAddress(_ n: Int) -> String {
        let a = (10 << 24) + n + 1
        return "\(a >> 24).\((a >> 16) & 255).\((a >> 8) & 255).\(a & 255)"
    }

    // MARK: 1. Distinct limit keys through PROXY headers

    @Test("a flood of distinct keys via PROXY v1 (up to 50,000 in 15 s) fills a 64k limit_conn_zone and a 128k limit_rate_zone no further than their size; gateway memory stops growing; an ordinary client is served throughout")
    func limitKeyFlood() throws {
        let upstream = try TestServer { connection in
            try? connection.send("ok\n")
            connection.close()
        }
        defer { upstream.stop() }
        let port = try freePort(), metricsPort = try freePort()
        let gateway = try MeasuredGateway(rules: """
            error_log {DIR}/error.log;
            stream {
                metrics_listen 127.0.0.1:\(metricsPort);
                limit_conn_zone $remote_addr zone=flood:64k;
                limit_rate_zone $remote_addr zone=rate:128k rate=10r/s;
                server {
                    listen 127.0.0.1:\(port) proxy_protocol backlog=4096;
                    set_real_ip_from 127.0.0.1;
                    limit_conn flood 1;
                    limit_rate rate;
                    proxy_pass 127.0.0.1:\(upstream.port);
                }
            }
            """, waitFor: port)
        // Warm up: the first sessions allocate what every later one reuses.
        for i in 0..<200 { _ = Self.exchange("192.0.2.\(1 + i % 200)", port: port) }
        let before = (rss: gateway.status("VmRSS"), heap: gateway.status("RssAnon"))

        let limit = 50_000, threads = 6, seconds = 15.0
        let next = Shared(0), done = Shared(0), stop = Shared(false)
        let tally = Tally()
        let started = Date()
        _ = Self.onThreads(threads) { _ in
            while Date().timeIntervalSince(started) < seconds {
                let n = next.update { n in defer { n += 1 }; return n }
                guard n < limit else { break }
                switch Self.exchange(Self.floodAddress(n), port: port) {
                case "ok\n": tally.add("served")
                case "": tally.add("refused")
                default: tally.add("errors")
                }
            }
            done.update { $0 += 1 }
        }
        // The ordinary client: one address, a connection every 100 ms (within its 10r/s).
        let ordinaryDone = Shared(0)
        _ = Self.onThreads(1) { _ in
            var due = Date()
            while !stop.value {
                tally.add(Self.exchange("198.51.100.1", port: port) == "ok\n" ? "ordinary ok" : "ordinary failed")
                due = max(due.addingTimeInterval(0.1), Date())
                let wait = due.timeIntervalSinceNow
                if wait > 0 { usleep(UInt32(wait * 1_000_000)) }
            }
            ordinaryDone.update { $0 += 1 }
        }
        // Memory once a third of the time has gone (both zones long full by then), and the peak.
        var third: (rss: Int, heap: Int, keys: Int)?
        var peak = 0
        while done.value < threads && Date().timeIntervalSince(started) < seconds + 10 {
            usleep(200_000)
            peak = max(peak, gateway.status("VmRSS"))
            if third == nil && Date().timeIntervalSince(started) > seconds / 3 {
                third = (gateway.status("VmRSS"), gateway.status("RssAnon"), tally["served"])
            }
        }
        let elapsed = Date().timeIntervalSince(started)
        #expect(Self.join(done, threads, timeout: 15), "flood threads did not finish")
        stop.value = true
        #expect(Self.join(ordinaryDone, 1, timeout: 10))
        let end = (rss: gateway.status("VmRSS"), heap: gateway.status("RssAnon"), hwm: gateway.status("VmHWM"))
        let metrics = try Self.scrape(metricsPort)
        let sent = min(next.value, limit)
        let served = tally["served"], refused = tally["refused"], errors = tally["errors"]
        let ordinaryOK = tally["ordinary ok"], ordinaryFailed = tally["ordinary failed"]
        let rateKeys = metrics[#"portcullis_limit_zone_keys{kind="limit_rate",zone="rate"}"#] ?? metrics[#"portcullis_limit_zone_keys{zone="rate",kind="limit_rate"}"#]
        let connKeys = metrics[#"portcullis_limit_zone_keys{kind="limit_conn",zone="flood"}"#] ?? metrics[#"portcullis_limit_zone_keys{zone="flood",kind="limit_conn"}"#]
        let evictions = metrics[#"portcullis_limit_zone_evictions_total{zone="rate"}"#]
        print("""
            limit-key flood: \(sent) distinct keys in \(String(format: "%.1f", elapsed)) s (\(Int(Double(sent) / elapsed)) conn/s): \
            served \(served), refused \(refused), errors \(errors); rate zone keys \(rateKeys ?? -1) (capacity 1024), \
            evictions \(evictions ?? -1), conn zone keys \(connKeys ?? -1); gateway RSS \(Self.mib(before.rss)) → \
            \(Self.mib(third?.rss ?? -1)) at a third (\(third?.keys ?? -1) keys) → \(Self.mib(end.rss)) at the end (peak \
            \(Self.mib(end.hwm))), heap \(Self.mib(before.heap)) → \(Self.mib(third?.heap ?? -1)) → \(Self.mib(end.heap)); \
            ordinary client \(ordinaryOK) of \(ordinaryOK + ordinaryFailed) served
            """)

        // The flood must have been one: at least 10 times each zone's capacity.
        #expect(sent >= 10_240, "only \(sent) keys sent")
        #expect(served + refused + errors == sent)
        #expect(errors == 0, "\(errors) flood connections failed")
        // New keys always find room in a rate zone (it evicts) and never exceed limit_conn 1.
        #expect(refused == 0, "\(refused) flood connections refused")
        // Both zones hold what their size allows, and no more: 1,024 keys each.
        #expect(rateKeys == 1024, "rate zone keys: \(String(describing: rateKeys))")
        #expect(connKeys == 0, "the flood's sessions ended, so the conn zone holds no keys: \(String(describing: connKeys))")
        // Every key past the first 1,024 (flood, warm-up and ordinary) pushed one out. (The
        // ordinary key is used every 100 ms and so stays in; a thread stalled long enough under
        // load could let it be pushed out and come back, one eviction more each time.)
        let expected = Double(served + 200 + 1 - 1024)
        let extra = (evictions ?? -1) - expected
        #expect(extra >= 0 && extra <= Double(ordinaryOK + ordinaryFailed),
                "evictions \(String(describing: evictions)), expected \(expected)")
        // Memory is bounded by the zones, not the keys: what the first third added, the last
        // two thirds (twice as many keys) do not add again.
        let third_ = try #require(third)
        #expect(end.heap - third_.heap < 8 * 1024, "heap grew \(end.heap - third_.heap) KiB after the zones were full")
        #expect(end.rss - before.rss < 48 * 1024, "RSS grew \(end.rss - before.rss) KiB")
        // The ordinary client kept being served.
        #expect(ordinaryOK + ordinaryFailed >= 50)
        #expect(Double(ordinaryOK) >= 0.95 * Double(ordinaryOK + ordinaryFailed),
                "ordinary client: \(ordinaryOK) of \(ordinaryOK + ordinaryFailed)")
        #expect(gateway.isRunning)
        #expect(gateway.stop() == 0)
    }

    // MARK: 2. 20,000 UDP source ports, an upstream that never answers

    /// Datagrams the kernel dropped on the UDP sockets bound to 127.0.0.1:`port` (the last
    /// column of /proc/net/udp), summed over every such socket.
    static func udpDrops(port: UInt16) -> Int {
        guard let text = try? String(contentsOfFile: "/proc/net/udp", encoding: .utf8) else { return -1 }
        let local = String(format: "0100007F:%04X", port)
        var drops = 0
        for line in text.split(separator: "\n") {
            let fields = line.split(separator: " ")
            if fields.count > 12, fields[1] == local, let n = Int(fields[fields.count - 1]) { drops += n }
        }
        return drops
    }

    static func forceReceiveBuffer(_ fd: Int32, bytes: Int32) {
        var size = bytes
        setsockopt(fd, SOL_SOCKET, 33 /* SO_RCVBUFFORCE */, &size, socklen_t(MemoryLayout<Int32>.size))
    }

    struct Sample: Sendable { var time: Double; var fds: Int; var heap: Int; var rss: Int; var active: Double }

    @Test("20,000 UDP source ports towards an upstream that never answers: every datagram is a session and reaches the upstream, sessions and descriptors rise and fall back after proxy_timeout 2s, memory per session bounded, a client of another listen is answered throughout")
    func udpSourcePortFlood() throws {
        // The upstream that never answers: it only counts what it gets, by payload.
        let silent = try UDPTestSocket(bind: "127.0.0.1")
        Self.forceReceiveBuffer(silent.fd, bytes: 32 << 20)
        let heard = Shared(Set<String>()), heardDatagrams = Shared(0), stopUpstreams = Shared(false)
        let upstreamsDone = Shared(0)
        _ = Self.onThreads(1) { _ in
            while !stopUpstreams.value {
                guard let (bytes, _, _) = silent.receiveFrom(timeout: 0.05) else { continue }
                heardDatagrams.update { $0 += 1 }
                heard.update { _ = $0.insert(String(decoding: bytes, as: UTF8.self)) }
            }
            upstreamsDone.update { $0 += 1 }
        }
        // The other listen's upstream answers every datagram with it.
        let echo = try UDPTestSocket(bind: "127.0.0.1")
        _ = Self.onThreads(1) { _ in
            while !stopUpstreams.value {
                guard let (bytes, host, port) = echo.receiveFrom(timeout: 0.05) else { continue }
                try? echo.send(bytes, to: host, port)
            }
            upstreamsDone.update { $0 += 1 }
        }
        defer {
            stopUpstreams.value = true
            _ = Self.join(upstreamsDone, 2, timeout: 3)
            silent.close()
            echo.close()
        }
        func freeUDP() throws -> UInt16 {
            let probe = try UDPTestSocket(bind: "127.0.0.1")
            defer { probe.close() }
            return probe.localPort
        }
        let floodPort = try freeUDP(), otherPort = try freeUDP(), metricsPort = try freePort()
        let gateway = try MeasuredGateway(rules: """
            error_log {DIR}/error.log;
            stream {
                metrics_listen 127.0.0.1:\(metricsPort);
                log_format udp '$server_port $remote_addr:$remote_port $status $bytes_received $bytes_sent';
                access_log {DIR}/access.log udp;
                proxy_timeout 2s;
                server {
                    listen 127.0.0.1:\(floodPort) udp;
                    proxy_responses 1;
                    proxy_pass 127.0.0.1:\(silent.localPort);
                }
                server {
                    listen 127.0.0.1:\(otherPort) udp;
                    proxy_responses 1;
                    proxy_pass 127.0.0.1:\(echo.localPort);
                }
            }
            """, waitFor: metricsPort)
        usleep(300_000)
        let baseline = (fds: gateway.descriptors, heap: gateway.status("RssAnon"), rss: gateway.status("VmRSS"))
        let dropsBefore = Self.udpDrops(port: floodPort)

        // The legitimate client, on the other listen: a query every 50 ms, each answered within 2 s.
        let tally = Tally()
        let stop = Shared(false), legitDone = Shared(0)
        _ = Self.onThreads(1) { _ in
            defer { legitDone.update { $0 += 1 } }
            guard let client = try? UDPTestSocket(bind: "127.0.78.1") else { return tally.add("legit failed") }
            var n = 0
            while !stop.value {
                n += 1
                let query = Array("legit-\(n)".utf8)
                do { try client.send(query, to: "127.0.0.1", otherPort) } catch { tally.add("legit failed"); continue }
                var answered = false
                let deadline = Date().addingTimeInterval(2)
                while Date() < deadline, let reply = client.receive(timeout: deadline.timeIntervalSinceNow) {
                    if reply == query { answered = true; break }
                }
                tally.add(answered ? "legit ok" : "legit failed")
                usleep(50_000)
            }
            client.close()
        }
        // Samples of the gateway: descriptors, heap, RSS, live sessions (metrics).
        let samples = Shared([Sample]())
        let samplerDone = Shared(0), stopSampler = Shared(false)
        let started = Date()
        _ = Self.onThreads(1) { _ in
            while !stopSampler.value {
                let active = (try? Self.scrape(metricsPort))?["portcullis_sessions_active"] ?? -1
                let sample = Sample(time: Date().timeIntervalSince(started), fds: gateway.descriptors,
                                    heap: gateway.status("RssAnon"), rss: gateway.status("VmRSS"), active: active)
                samples.update { $0.append(sample) }
                usleep(250_000)
            }
            samplerDone.update { $0 += 1 }
        }

        // The flood: 20,000 distinct (address, port) pairs, 10 addresses × ports from 20000,
        // 500 sockets at a time, each sending one datagram and closed. At most 2,000 datagrams
        // ahead of what the upstream has heard (waiting at most 3 s), so the flood goes no
        // faster than the gateway forwards rather than overrunning its socket buffer; and at
        // most 5,000 a second: each live session holds an upstream socket, and this process
        // (so the gateway) may open 20,000 descriptors at most (`ulimit -Hn`, which a
        // container without CAP_SYS_RESOURCE cannot raise), so about 10,000 sessions live at
        // once under proxy_timeout 2s.
        let total = 20_000, batch = 500, perSecond = 5_000.0
        var bindFailures = 0, payload = 0
        /// One wave: `total` datagrams from ports `firstPort`…, then the wait until every session
        /// has ended (2 s after its datagram) and the descriptors are back, with a margin.
        func wave(from firstPort: UInt16, total: Int) -> (sent: Int, seconds: Double, settled: Double, active: Double) {
            let began = Date()
            var sent = 0, port = firstPort, address = 0
            let heardBefore = heardDatagrams.value
            while sent < total && Date().timeIntervalSince(began) < 60 {
                var sockets: [UDPTestSocket] = []
                while sockets.count < min(batch, total - sent) && port < firstPort + 10_000 {
                    let host = "127.0.77.\(address + 1)"
                    if let socket = try? UDPTestSocket(bind: host, port: port) { sockets.append(socket) } else { bindFailures += 1 }
                    address += 1
                    if address == 10 { address = 0; port += 1 }
                }
                for socket in sockets {
                    if (try? socket.send(Array("flood-\(payload)".utf8), to: "127.0.0.1", floodPort)) != nil {
                        sent += 1
                        payload += 1
                    }
                    socket.close()
                }
                let waitUntil = Date().addingTimeInterval(3)
                while heardDatagrams.value - heardBefore < sent - 2_000 && Date() < waitUntil { usleep(2_000) }
                let due = began.addingTimeInterval(Double(sent) / perSecond).timeIntervalSinceNow
                if due > 0 { usleep(UInt32(due * 1_000_000)) }
            }
            let seconds = Date().timeIntervalSince(began)
            let settleDeadline = Date().addingTimeInterval(20)
            var active = -1.0
            while Date() < settleDeadline {
                active = (try? Self.scrape(metricsPort))?["portcullis_sessions_active"] ?? -1
                if active == 0 && gateway.descriptors <= baseline.fds { break }
                usleep(200_000)
            }
            let settled = Date().timeIntervalSince(began)
            usleep(500_000)
            return (sent, seconds, settled, active)
        }
        let first = wave(from: 20_000, total: total)
        let afterFirst = (fds: gateway.descriptors, heap: gateway.status("RssAnon"), rss: gateway.status("VmRSS"))
        let firstSamples = samples.value
        // A second wave from 10,000 other ports: the memory the first one left is used again.
        let second = wave(from: 30_000, total: total / 2)
        stopSampler.value = true
        stop.value = true
        #expect(Self.join(samplerDone, 1, timeout: 5) && Self.join(legitDone, 1, timeout: 5))
        let after = (fds: gateway.descriptors, heap: gateway.status("RssAnon"), rss: gateway.status("VmRSS"))
        let gatewayDrops = Self.udpDrops(port: floodPort) - dropsBefore
        let metrics = try Self.scrape(metricsPort)
        let dropped = metrics.filter { $0.key.hasPrefix("portcullis_udp_dropped_datagrams_total") }.values.reduce(0, +)
        let lines = gateway.lines(of: "access.log").filter { $0.hasPrefix("\(floodPort) ") }
        let statuses = Dictionary(grouping: lines) { String($0.split(separator: " ")[2]) }.mapValues(\.count)
        let clients = Set(lines.map { $0.split(separator: " ")[1] })
        let upstreamHeard = heard.value.count
        let all = samples.value
        let peak = firstSamples.max { $0.fds < $1.fds }
        let peakSessions = (peak?.fds ?? baseline.fds) - baseline.fds
        let peakActive = firstSamples.map(\.active).max() ?? -1
        let peakHeap = firstSamples.map(\.heap).max() ?? -1
        let peakHeapSecond = all.map(\.heap).max() ?? -1
        let bytesPerSession = peakSessions > 0 ? (peakHeap - baseline.heap) * 1024 / peakSessions : -1
        let sent = first.sent + second.sent
        let legitOK = tally["legit ok"], legitFailed = tally["legit failed"]
        print("""
            UDP port flood: 2 waves of \(first.sent) and \(second.sent) datagrams from distinct source ports in \
            \(String(format: "%.1f", first.seconds)) and \(String(format: "%.1f", second.seconds)) s (\(bindFailures) ports \
            taken), sessions logged \(lines.count) (\(statuses)), distinct clients \(clients.count), upstream heard \
            \(upstreamHeard) (\(heardDatagrams.value) datagrams), kernel drops at the gateway socket \(gatewayDrops), \
            gateway drops \(dropped); first wave: peak \(peakSessions) sessions by descriptors (\(Int(peakActive)) by \
            metrics), descriptors \(baseline.fds) → \(peak?.fds ?? -1) → \(afterFirst.fds) (settled \
            \(String(format: "%.1f", first.settled)) s after its start), heap \(Self.mib(baseline.heap)) → \
            \(Self.mib(peakHeap)) → \(Self.mib(afterFirst.heap)), RSS \(Self.mib(baseline.rss)) → \
            \(Self.mib(firstSamples.map(\.rss).max() ?? -1)) → \(Self.mib(afterFirst.rss)), \(bytesPerSession) bytes of \
            heap per live session; second wave: heap peak \(Self.mib(peakHeapSecond)), after \(Self.mib(after.heap)), RSS \
            after \(Self.mib(after.rss)), descriptors after \(after.fds) (settled \(String(format: "%.1f", second.settled)) s); \
            legitimate client \(legitOK) of \(legitOK + legitFailed) answered
            """)

        #expect(first.sent == total && second.sent == total / 2)
        // Each datagram is a session of its own (a new source port), or was dropped where the
        // drop is counted: by the kernel at the gateway's socket, or by the gateway (a full table).
        #expect(lines.count + gatewayDrops + Int(dropped) == sent,
                "\(lines.count) sessions + \(gatewayDrops) kernel drops + \(dropped) gateway drops")
        #expect(lines.count >= sent * 95 / 100, "only \(lines.count) sessions")
        #expect(clients.count == lines.count, "one session per source port")
        // No answer within proxy_timeout where one was expected: nginx's 502 ("upstream timed out").
        #expect(statuses == ["502": lines.count], "\(statuses)")
        // Every session's datagram reached the upstream, once.
        #expect(upstreamHeard == lines.count, "upstream heard \(upstreamHeard) of \(lines.count)")
        #expect(heardDatagrams.value == lines.count)
        #expect(Self.udpDrops(port: silent.localPort) == 0)
        // Sessions rose (thousands at once) and all ended after proxy_timeout, each wave.
        #expect(peakSessions >= 1_000, "peak \(peakSessions) sessions")
        #expect(first.active == 0 && second.active == 0, "sessions still active: \(first.active), \(second.active)")
        #expect(afterFirst.fds <= baseline.fds && after.fds <= baseline.fds,
                "descriptors \(baseline.fds) before, \(afterFirst.fds) and \(after.fds) after")
        // Memory: bounded per session; what the first wave took is used again by the second.
        #expect(bytesPerSession > 0 && bytesPerSession < 16 * 1024, "\(bytesPerSession) bytes a session")
        #expect(peakHeapSecond - peakHeap < 4 * 1024, "the second wave's heap peak \(peakHeapSecond) KiB, the first's \(peakHeap) KiB")
        #expect(after.heap - afterFirst.heap < 4 * 1024, "heap \(afterFirst.heap) KiB after the first wave, \(after.heap) KiB after the second")
        // The client of the other listen was answered meanwhile.
        #expect(legitOK + legitFailed >= 20)
        #expect(Double(legitOK) >= 0.95 * Double(legitOK + legitFailed), "legitimate client: \(legitOK) of \(legitOK + legitFailed)")
        #expect(gateway.isRunning)
        #expect(gateway.stop() == 0)
    }

    // MARK: 3. The geoip2 file truncated in place, then replaced by rename

    /// One client session of the geoip test: when it began and ended (seconds from the start),
    /// whom it presented, and what it got ("allowed", "refused", or "error").
    struct Decision: Sendable { var start: Double; var end: Double; var client: String; var outcome: String }

    @Test("geoip2 auto_reload 1s while clients connect: the file truncated in place is refused (logged) and the last good database keeps deciding; a new one renamed over it decides within auto_reload + margin; no crash, every session decided")
    func geoipFileFaults() throws {
        let upstream = try TestServer.echo()
        defer { upstream.stop() }
        let databases = try makeTemporaryDirectory("portcullis-geoip-fault")
        defer { try? FileManager.default.removeItem(at: databases) }
        let db = databases.appendingPathComponent("country.mmdb").path
        // The last good database: the project's country database (7.3 MiB, so that half of it
        // is thousands of pages: a lookup in a mapping of the truncated file would fault).
        let good = try Data(contentsOf: packageRoot.appendingPathComponent("data/country.mmdb"))
        try good.write(to: URL(fileURLWithPath: db))
        let port = try freePort()
        let gateway = try MeasuredGateway(rules: """
            error_log {DIR}/error.log info;
            stream {
                log_format cc '$remote_addr $cc $status';
                access_log {DIR}/access.log cc;
                geoip2 \(db) {
                    auto_reload 1s;
                    $cc default=-- country iso_code;
                }
                map $cc $blocked {
                    CN 1;
                    BE 1;
                    default 0;
                }
                server {
                    listen 127.0.0.1:\(port) proxy_protocol;
                    set_real_ip_from 127.0.0.1;
                    deny $blocked;
                    proxy_pass 127.0.0.1:\(upstream.port);
                }
            }
            """, waitFor: port)

        // data/country.mmdb: 1.0.1.1 CN (refused), 8.8.8.8 US, 193.0.0.1 NL (allowed).
        // types-v2.mmdb: 1.2.3.4 BE (refused); the three others not in it (allowed).
        let clients = ["1.0.1.1", "8.8.8.8", "193.0.0.1", "1.2.3.4"]
        let decisions = Shared([Decision]())
        let stop = Shared(false), done = Shared(0)
        let started = Date()
        let threads = 3
        _ = Self.onThreads(threads) { index in
            var i = index
            while !stop.value {
                let client = clients[i % clients.count]
                i += 1
                let begin = Date().timeIntervalSince(started)
                let got = Self.exchange(client, port: port, payload: "ping", limit: 4)
                let outcome = got == "ping" ? "allowed" : got == "" ? "refused" : "error"
                let decision = Decision(start: begin, end: Date().timeIntervalSince(started), client: client, outcome: outcome)
                decisions.update { $0.append(decision) }
                usleep(20_000)
            }
            done.update { $0 += 1 }
        }
        func now() -> Double { Date().timeIntervalSince(started) }
        func wait(_ seconds: Double) { usleep(UInt32(seconds * 1_000_000)) }

        wait(1.5)
        // (a) Truncated in place: the same inode, O_TRUNC, then half of the bytes written.
        let truncatedAt = now()
        let fd = open(db, O_WRONLY | O_TRUNC)
        try #require(fd >= 0)
        let half = good.count / 2
        let written = good.withUnsafeBytes { write(fd, $0.baseAddress, half) }
        close(fd)
        #expect(written == half)
        // Three auto_reload checks see the broken file.
        wait(3.5)
        // (b) A new database written beside it and renamed over it.
        let renamedAt = now()  // (copying the 1.7 KiB file beside it takes no time)
        try VariablesEndToEndTests.publish(VariablesEndToEndTests.geoipFixture("types-v2.mmdb"), over: db)
        wait(3.5)
        stop.value = true
        #expect(Self.join(done, threads, timeout: 10))
        let alive = gateway.isRunning
        let all = decisions.value

        let expectedBefore = ["1.0.1.1": "refused", "8.8.8.8": "allowed", "193.0.0.1": "allowed"]
        let expectedAfter = ["1.0.1.1": "allowed", "8.8.8.8": "allowed", "193.0.0.1": "allowed", "1.2.3.4": "refused"]
        // 1.2.3.4's country in data/country.mmdb decides it before (b): whatever it is, one
        // decision throughout.
        let before = all.filter { $0.end < renamedAt }
        let oneBefore = Set(before.filter { $0.client == "1.2.3.4" }.map(\.outcome))
        let changed = all.filter { $0.start >= renamedAt && $0.outcome == expectedAfter[$0.client] && $0.outcome != (expectedBefore[$0.client] ?? oneBefore.first) }
        let firstNew = changed.map(\.end).min()
        let switchTime = firstNew.map { $0 - renamedAt }
        let afterSwitch = all.filter { firstNew != nil && $0.start > firstNew! + 0.05 }
        let duringTruncation = before.filter { $0.start > truncatedAt }
        let errors = all.filter { $0.outcome == "error" }
        let errorLog = gateway.lines(of: "error.log")
        let refusedReloads = errorLog.filter { $0.contains("was not reloaded") }
        let access = gateway.lines(of: "access.log")
        print("""
            geoip2 faults: \(all.count) sessions (\(before.count) before the rename, \(duringTruncation.count) of them \
            after the truncation), \(errors.count) without a decision; new database deciding \
            \(switchTime.map { String(format: "%.2f", $0) } ?? "never") s after the rename; \
            error log: \(refusedReloads.count) refused reloads: \(refusedReloads.map { $0.suffix(120) })
            """)

        #expect(alive, "the gateway died: \(gateway.exitDescription)")
        #expect(errors.isEmpty, "sessions without a decision: \(errors.prefix(5))")
        #expect(all.count >= 100, "only \(all.count) sessions")
        #expect(duringTruncation.count >= 30, "only \(duringTruncation.count) sessions while the file was truncated")
        // Until the rename, every session was decided by the last good database.
        for decision in before where decision.client != "1.2.3.4" {
            #expect(decision.outcome == expectedBefore[decision.client], "\(decision)")
        }
        #expect(oneBefore.count == 1, "1.2.3.4 before the rename: \(oneBefore)")
        // The truncated file was refused, and said so, naming the file.
        #expect(refusedReloads.count >= 1, "\(errorLog)")
        #expect(refusedReloads.allSatisfy { $0.contains("[error]") && $0.contains(db) }, "\(refusedReloads)")
        #expect(refusedReloads.contains { $0.contains("is not a MaxMind DB file") || $0.contains("truncated") }, "\(refusedReloads)")
        let reloadedAt = errorLog.filter { $0.contains("reloaded, build epoch 1700000100") }
        #expect(reloadedAt.count == 1, "\(errorLog)")
        // After (b): the new database decides within auto_reload (1 s) + margin, and from then on.
        let switched = try #require(switchTime, "the new database never decided")
        #expect(switched <= 1.0 + 1.5, "\(switched) s")
        #expect(afterSwitch.count >= 20)
        for decision in afterSwitch {
            #expect(decision.outcome == expectedAfter[decision.client], "\(decision)")
        }
        // The access log agrees: only the two databases' answers, never an empty lookup for
        // an address the good database has (which a broken database would give).
        let countries = Dictionary(grouping: access.compactMap { line -> (String, String)? in
            let f = line.split(separator: " ")
            return f.count == 3 ? (String(f[0]), String(f[1])) : nil
        }, by: \.0).mapValues { Set($0.map(\.1)) }
        #expect(countries["1.0.1.1"] == ["CN", "--"], "\(countries)")
        #expect(countries["8.8.8.8"] == ["US", "--"], "\(countries)")
        #expect(countries["193.0.0.1"] == ["NL", "--"], "\(countries)")
        #expect(countries["1.2.3.4"]?.contains("BE") == true && countries["1.2.3.4"]!.count <= 2, "\(countries)")
        #expect(gateway.stop() == 0)
    }
}
