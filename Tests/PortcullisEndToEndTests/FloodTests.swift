#if canImport(Glibc)
import Glibc
#endif
import Foundation
import Synchronization
import Testing
import PortcullisTestSupport

/// Issue #16 item 3, part A: floods against `portcullis run` as a child process, so that its
/// descriptors, CPU time and memory can be read from /proc while they happen: descriptor
/// exhaustion (EMFILE), slowloris on a `proxy_protocol` listener, and an upstream that accepts
/// and never reads. The figures go to docs/threat-model.md ("Memory exhaustion through one
/// connection", "Slow and idle clients").
@Suite("Floods: descriptors, slowloris, a never-reading upstream", .serialized)
struct FloodTests {
    // MARK: 1. EMFILE

    @Test("EMFILE: 3,000 connections at a gateway limited to 1,024 descriptors: it does not spin (< 30 % of a core), says so at most once a second, keeps its sessions, and serves new clients within seconds of the flood's end")
    func descriptorExhaustion() throws {
        let floodSize = 3_000, limit = 1_024, established = 20, window = 5.0
        try #require(Flood.raiseOwnDescriptorLimit(to: floodSize + 2_000) >= floodSize + 1_000)
        let echo = try PollEchoServer()
        defer { echo.stop() }
        let relayPort = try freePort(), holdPort = try freePort()
        // Two loops, so two listening sockets per listen: four sockets run out of descriptors
        // at once. Half the flood goes to a listen whose sessions wait 60 s for a PROXY header
        // with one descriptor each, so the last free descriptor is always taken by one of them
        // and the gateway really sits at its limit (a relayed session needs two).
        let gateway = try MeasuredGateway(rules: """
            worker_processes 2;
            error_log {DIR}/error.log;
            stream {
                log_format flood '$server_port $status $bytes_received';
                access_log {DIR}/access.log flood;
                server { listen 127.0.0.1:\(relayPort); proxy_pass 127.0.0.1:\(echo.port); }
                server {
                    listen 127.0.0.1:\(holdPort) proxy_protocol;
                    proxy_protocol_timeout 60s;
                    proxy_pass 127.0.0.1:\(echo.port);
                }
            }
            """, descriptorLimit: limit)
        defer { gateway.kill() }
        try #require(waitUntilListening(port: relayPort) && waitUntilListening(port: holdPort))
        let limits = try #require(gateway.descriptorLimits)
        try #require(limits.soft == limit && limits.hard == limit, "the gateway runs with \(limits)")

        // Sessions that exist before the flood must keep working through it.
        var kept: [TestConnection] = []
        for _ in 0..<established { kept.append(try TestConnection.connect(to: "127.0.0.1", port: relayPort, timeout: 5)) }
        defer { for connection in kept { connection.close() } }
        #expect(Flood.roundTrips(kept, tag: "before") == established)
        let descriptorsBefore = gateway.descriptors

        // The flood: 3,000 non-blocking connects, alternately to the two listens. Those the
        // backlogs cannot take stay in SYN-SENT and retry, as a real flood's would.
        let floodStart = Flood.now()
        var relayClients: [Int32] = [], holdClients: [Int32] = []
        defer { for fd in relayClients + holdClients { Flood.reset(fd) } }
        for index in 0..<floodSize {
            let fd = try Flood.connectStart(to: index % 2 == 0 ? relayPort : holdPort)
            if index % 2 == 0 { relayClients.append(fd) } else { holdClients.append(fd) }
        }
        // Relayed clients say something once connected; what was accepted echoes it.
        Flood.sendWhenConnected(relayClients, Array("ping\n".utf8), within: 2)
        let openedIn = Flood.now() - floodStart

        // Wait until the gateway holds all its descriptors.
        var full = false
        let fillDeadline = Flood.now() + 20
        while !full && Flood.now() < fillDeadline && gateway.isRunning {
            full = gateway.descriptors >= limit - 1
            if !full { usleep(50_000) }
        }
        try #require(full, "the gateway reached \(gateway.descriptors) descriptors of \(limit)")
        let filledAfter = Flood.now() - floodStart

        // The window: descriptors are out; the gateway must not spin, must stay up, and the
        // sessions it had must still relay.
        let cpuStart = try #require(gateway.cpuSeconds)
        let windowStart = Flood.now()
        var keptRoundTrips = 0
        for second in 0..<Int(window) {
            usleep(UInt32(max(0, windowStart + Double(second) - Flood.now()) * 1_000_000))
            keptRoundTrips += Flood.roundTrips(kept, tag: "during-\(second)")
            #expect(gateway.isRunning)
        }
        usleep(UInt32(max(0, windowStart + window - Flood.now()) * 1_000_000))
        let cpuEnd = try #require(gateway.cpuSeconds)
        let windowLength = Flood.now() - windowStart
        let cpuShare = (cpuEnd - cpuStart) / windowLength
        let descriptorsAtEnd = gateway.descriptors
        let floodEchoes = Flood.countReplies(relayClients, expecting: Array("ping\n".utf8))
        #expect(gateway.isRunning, "the gateway is still running")
        #expect(descriptorsAtEnd >= limit - 2, "descriptors stayed out for the whole window: \(descriptorsAtEnd)")
        #expect(cpuShare < 0.30, "CPU while out of descriptors: \(cpuShare * 100) % of one core")
        #expect(keptRoundTrips == established * Int(window), "sessions from before the flood relayed \(keptRoundTrips) of \(established * Int(window)) round trips")
        #expect(floodEchoes >= 50, "flood sessions the gateway accepted relayed: \(floodEchoes)")

        // The flood ends: every one of its connections is reset.
        let closeStart = Flood.now()
        for fd in relayClients + holdClients { Flood.reset(fd) }
        relayClients = []
        holdClients = []
        var servedAfter: Double?
        while servedAfter == nil && Flood.now() - closeStart < 15 {
            if Flood.oneRoundTrip(port: relayPort, payload: "again\n", timeout: 0.3) { servedAfter = Flood.now() - closeStart }
        }
        let recovery = try #require(servedAfter, "no new client was served within 15 s of the flood's end")
        #expect(recovery < 3, "the first new client was served \(recovery) s after the flood ended")
        var newServed = 0
        for index in 0..<20 {
            if Flood.oneRoundTrip(port: relayPort, payload: "new-\(index)\n", timeout: 3) { newServed += 1 }
            if Flood.oneRoundTrip(port: holdPort, header: "PROXY TCP4 198.51.100.1 203.0.113.1 4000 443\r\n",
                                  payload: "held-\(index)\n", timeout: 3) { newServed += 1 }
        }
        #expect(newServed == 40, "new clients served after the flood: \(newServed) of 40")
        #expect(Flood.roundTrips(kept, tag: "after") == established)
        let episode = Flood.now() - floodStart

        // The error log: one complaint a second at most, for the whole process.
        for connection in kept { connection.close() }
        let status = gateway.stop()
        #expect(status == 0, "the gateway exits cleanly on SIGTERM (status \(String(describing: status)))")
        let errorLines = gateway.lines(of: "error.log")
        let complaints = errorLines.filter { $0.contains("accept4() failed (24: Too many open files)") }
        let perSecond = Dictionary(grouping: complaints) { $0.prefix(19) }.mapValues(\.count)
        let others = errorLines.filter { !$0.contains("accept4() failed") }
        #expect(complaints.count >= 3, "the gateway said it was out of descriptors \(complaints.count) times")
        #expect(perSecond.values.max() ?? 0 <= 1, "complaints in one second: \(perSecond.values.max() ?? 0)")
        #expect(Double(complaints.count) <= episode + 1, "\(complaints.count) complaints in \(episode) s")
        print("""
            FLOOD-FIGURES emfile: limit \(limit), descriptors before \(descriptorsBefore), at end of window \(descriptorsAtEnd); \
            3,000 connects issued in \(Flood.fmt(openedIn)) s, full after \(Flood.fmt(filledAfter)) s; \
            CPU \(Flood.fmt(cpuEnd - cpuStart)) s over \(Flood.fmt(windowLength)) s = \(Flood.fmt(cpuShare * 100)) % of a core; \
            flood sessions relaying \(floodEchoes); kept round trips \(keptRoundTrips); first new client served \(Flood.fmt(recovery)) s after the reset; \
            complaints \(complaints.count) in \(Flood.fmt(episode)) s (max \(perSecond.values.max() ?? 0) a second); other error lines \(others.count): \
            \(Set(others.map { Flood.errorKind($0) }).sorted())
            """)
    }

    // MARK: 2. Slowloris on a proxy_protocol listener

    @Test("slowloris: 2,000 connections dripping a PROXY header byte by byte are each closed at proxy_protocol_timeout (3 s) + a margin, hold < 16 KiB each, are logged 400 and audited, and 50 legitimate clients are served meanwhile")
    func slowlorisOnProxyProtocol() throws {
        let slowCount = 2_000, legitimate = 50, timeout = 3.0
        try #require(Flood.raiseOwnDescriptorLimit(to: slowCount + 1_000) >= slowCount + 300)
        let echo = try TestServer.echo()
        defer { echo.stop() }
        let port = try freePort()
        let gateway = try MeasuredGateway(rules: """
            worker_processes 2;
            error_log {DIR}/error.log;
            stream {
                log_format pp '$realip_remote_addr $status $bytes_received $session_time';
                access_log {DIR}/access.log pp;
                audit_log {DIR}/audit.log;
                server {
                    listen 127.0.0.1:\(port) proxy_protocol backlog=4096;
                    set_real_ip_from 127.0.0.1;
                    proxy_protocol_timeout 3s;
                    proxy_pass 127.0.0.1:\(echo.port);
                }
            }
            """)
        defer { gateway.kill() }
        try #require(waitUntilListening(port: port))
        // A few whole clients first, so the baseline includes what serving costs once.
        for index in 0..<5 {
            #expect(Flood.oneRoundTrip(port: port, header: Flood.legitimateHeader(index), payload: "warm-\(index)\n", timeout: 5))
        }
        usleep(300_000)
        let baseRSS = try #require(gateway.residentKiB), basePSS = try #require(gateway.proportionalKiB)

        // 2,000 connections from 127.0.0.2, opened 100 at a time; each sends "P" once connected.
        let header = Array("PROXY TCP4 198.51.100.1 203.0.113.1 40000 443\r\n".utf8)
        var slow: [Int32] = [], startedAt = [Double](repeating: 0, count: slowCount)
        var closedAt = [Double?](repeating: nil, count: slowCount)
        var sent = [Int](repeating: 1, count: slowCount)
        defer { for (index, fd) in slow.enumerated() where closedAt[index] == nil { Flood.reset(fd) } }
        let openStart = Flood.now()
        for batch in stride(from: 0, to: slowCount, by: 100) {
            for slot in batch..<batch + 100 {
                // Timed from just before the connect: the gateway's clock starts at its accept,
                // later (give or take how stale its loop's clock is within one batch).
                startedAt[slot] = Flood.now()
                slow.append(try Flood.connectStart(to: port, from: "127.0.0.2"))
            }
            var waiting = Set(batch..<batch + 100)
            let deadline = Flood.now() + 5
            while !waiting.isEmpty && Flood.now() < deadline {
                let order = Array(waiting)
                for (index, _) in Flood.ready(order.map { slow[$0] }, Int16(POLLOUT), timeout: 0.5) {
                    let slot = order[index]
                    _ = header.withUnsafeBytes { Glibc.send(slow[slot], $0.baseAddress, 1, Int32(MSG_NOSIGNAL)) }
                    waiting.remove(slot)
                }
            }
            try #require(waiting.isEmpty, "\(waiting.count) slow connections did not connect")
        }
        let openedIn = Flood.now() - openStart

        // Legitimate clients meanwhile, from another thread.
        let results = LatencyList()
        Thread {
            for index in 0..<legitimate {
                let start = Flood.now()
                let served = Flood.oneRoundTrip(port: port, header: Flood.legitimateHeader(100 + index), payload: "legit-\(index)\n", timeout: 5)
                results.add(served ? Flood.now() - start : nil)
                usleep(20_000)
            }
            results.finish()
        }.start()

        // Drip one more byte on every open connection each 250 ms (never the whole header), and
        // note when the gateway closes each one. Memory is sampled while all 2,000 are held.
        var open = Set(0..<slowCount)
        var heldRSS = baseRSS, heldPSS = basePSS, heldSamples = 0
        var nextDrip = Flood.now() + 0.25
        let end = Flood.now() + timeout + 20
        var byte: UInt8 = 0
        while !open.isEmpty && Flood.now() < end {
            let order = Array(open)
            let events = Int16(POLLIN) | Flood.pollReadHangUp
            for (index, revents) in Flood.ready(order.map { slow[$0] }, events, timeout: max(0.001, nextDrip - Flood.now())) {
                let slot = order[index]
                let n = recv(slow[slot], &byte, 1, Int32(MSG_DONTWAIT))
                let gone = n == 0 || (n < 0 && errno != EAGAIN && errno != EINTR) || revents & Int16(POLLHUP | POLLERR) != 0
                if gone {
                    closedAt[slot] = Flood.now()
                    Glibc.close(slow[slot])
                    open.remove(slot)
                }
            }
            guard Flood.now() >= nextDrip else { continue }
            if open.count == slowCount, let rss = gateway.residentKiB, let pss = gateway.proportionalKiB {
                heldRSS = max(heldRSS, rss)
                heldPSS = max(heldPSS, pss)
                heldSamples += 1
            }
            for slot in open where sent[slot] < header.count - 2 {
                _ = header.withUnsafeBytes { Glibc.send(slow[slot], $0.baseAddress! + sent[slot], 1, Int32(MSG_NOSIGNAL | MSG_DONTWAIT)) }
                sent[slot] += 1
            }
            nextDrip += 0.25
        }
        #expect(open.isEmpty, "\(open.count) slow connections were still open \(timeout + 20) s after the last connect")
        let lifetimes = (0..<slowCount).compactMap { slot in closedAt[slot].map { $0 - startedAt[slot] } }.sorted()
        let shortest = lifetimes.first ?? 0, longest = lifetimes.last ?? 0
        let median = lifetimes.isEmpty ? 0 : lifetimes[lifetimes.count / 2]
        #expect(shortest >= timeout - 0.2, "a slow connection was closed after \(shortest) s, before proxy_protocol_timeout")
        #expect(longest <= timeout + 3, "a slow connection was closed only after \(longest) s")
        let bytesDripped = sent.reduce(0, +)

        #expect(results.wait(timeout: 60), "the legitimate clients finished")
        let latencies = results.values
        let served = latencies.compactMap { $0 }.sorted()
        #expect(served.count == legitimate, "legitimate clients served: \(served.count) of \(legitimate)")
        let slowestServed = served.last ?? 0
        #expect(slowestServed < 1.5, "the slowest legitimate client took \(slowestServed) s")

        try #require(heldSamples > 0, "no memory sample while all 2,000 were held")
        let perConnection = Double(heldRSS - baseRSS) / Double(slowCount)
        let perConnectionPSS = Double(heldPSS - basePSS) / Double(slowCount)
        #expect(perConnection < 16, "RSS grew by \(perConnection) KiB per held connection")

        let access = gateway.waitForLines(of: "access.log", timeout: 10) { lines in
            lines.filter { $0.hasPrefix("127.0.0.2 400 ") }.count >= slowCount
        }
        #expect(access.filter { $0.hasPrefix("127.0.0.2 400 ") }.count == slowCount)
        #expect(access.filter { $0.hasPrefix("127.0.0.1 200 ") }.count == 5 + legitimate)
        #expect(!access.contains { $0.hasPrefix("127.0.0.2 ") && !$0.hasPrefix("127.0.0.2 400 ") })

        // The audit log is flood-capped (100 lines a second); the summary written at the stop
        // counts the rest.
        #expect(gateway.stop() == 0)
        let audit = gateway.lines(of: "audit.log")
        let timedOut = audit.filter { $0.contains("\"peer\":\"127.0.0.2:") && $0.contains("\"reason\":\"PROXY protocol header timed out\"") }
        let suppressed = audit.filter { $0.contains("\"summary\":\"audit lines suppressed\"") }.reduce(0) { total, line in
            guard let object = try? JSONSerialization.jsonObject(with: Data(line.utf8)) as? [String: Any],
                  let phases = object["by_phase"] as? [String: Any], let count = phases["proxy_header_read"] as? Int else { return total }
            return total + count
        }
        let auditPerSecond = Dictionary(grouping: timedOut) { line -> Substring in
            guard let start = line.range(of: "\"time\":\"") else { return "" }
            return line[start.upperBound...].prefix(19)
        }.mapValues(\.count)
        #expect(timedOut.count + suppressed == slowCount, "audit: \(timedOut.count) lines + \(suppressed) suppressed")
        #expect((auditPerSecond.values.max() ?? 0) <= 100)
        print("""
            FLOOD-FIGURES slowloris: \(slowCount) connections opened in \(Flood.fmt(openedIn)) s, \(bytesDripped) bytes dripped; \
            closed after \(Flood.fmt(shortest, 3)) / \(Flood.fmt(median, 3)) / \(Flood.fmt(longest, 3)) s (min / median / max, timeout \(timeout) s); \
            RSS \(baseRSS) -> \(heldRSS) KiB = \(Flood.fmt(perConnection)) KiB per held connection; PSS \(basePSS) -> \(heldPSS) KiB = \(Flood.fmt(perConnectionPSS)) KiB; \
            legitimate \(served.count)/\(legitimate) served, latency median \(Flood.fmt(served.isEmpty ? 0 : served[served.count / 2] * 1000, 1)) ms, max \(Flood.fmt(slowestServed * 1000, 1)) ms; \
            audit \(timedOut.count) lines + \(suppressed) suppressed
            """)
    }

    // MARK: 3. An upstream that accepts and never reads

    @Test("an upstream that never reads: the client's sends block once kernel buffers and one 256 KiB read are full, RSS grows < 8 MiB (and < 512 KiB a session over 50), and proxy_timeout or the client's reset ends each with a logged record")
    func neverReadingUpstream() throws {
        let sink = try SinkServer()
        defer { sink.stop() }
        let port = try freePort(), port50 = try freePort()
        // The 50 sessions get their own server with a long proxy_timeout: on a loaded machine,
        // pushing and settling can take longer than 3 s, and a session ended by the timeout
        // has no queues left to measure.
        let gateway = try MeasuredGateway(rules: """
            worker_processes 2;
            error_log {DIR}/error.log;
            stream {
                log_format rec '$remote_port $status $bytes_received $bytes_sent $session_time';
                access_log {DIR}/access.log rec;
                server { listen 127.0.0.1:\(port); proxy_timeout 3s; proxy_pass 127.0.0.1:\(sink.port); }
                server { listen 127.0.0.1:\(port50); proxy_timeout 60s; proxy_pass 127.0.0.1:\(sink.port); }
            }
            """)
        defer { gateway.kill() }
        try #require(waitUntilListening(port: port))
        _ = gateway.waitForLines(of: "access.log", timeout: 5) { !$0.isEmpty }  // the probe's session
        usleep(300_000)
        let baseRSS = try #require(gateway.residentKiB)
        let total = 64 << 20, readBound = 256 << 10

        // One session: push 64 MiB, or until the sends have made no progress for 1.5 s.
        let client = try Flood.connectStart(to: port)
        defer { Flood.reset(client) }
        let clientPort = Flood.localPort(client)
        let pushed = Flood.push([client], upTo: total, stallAfter: 1.5)
        let stalledAt = Flood.now()
        let rss = try #require(gateway.residentKiB)
        let upstreamPort = try #require(sink.acceptedPorts.last)
        let clientQueued = KernelQueues.lookup(local: clientPort, remote: port)?.tx ?? -1
        let gatewayReceiveQueue = KernelQueues.lookup(local: port, remote: clientPort)?.rx ?? -1
        let gatewaySendQueue = KernelQueues.lookup(local: upstreamPort, remote: sink.port)?.tx ?? -1
        let sinkQueue = KernelQueues.lookup(local: sink.port, remote: upstreamPort)?.rx ?? -1
        try #require(clientQueued >= 0 && gatewayReceiveQueue >= 0 && gatewaySendQueue >= 0 && sinkQueue >= 0,
                     "found the four sockets: \(clientQueued) \(gatewayReceiveQueue) \(gatewaySendQueue) \(sinkQueue)")
        let inKernel = clientQueued + gatewayReceiveQueue + gatewaySendQueue + sinkQueue
        let heldByGateway = pushed[0] - inKernel
        #expect(pushed[0] < total, "the client pushed \(pushed[0]) bytes: its sends never blocked")
        #expect(heldByGateway >= 0 && heldByGateway <= readBound,
                "the gateway holds \(heldByGateway) bytes of the session (pushed \(pushed[0]), in kernel queues \(inKernel))")
        #expect(rss - baseRSS < 8 << 10, "RSS grew by \(rss - baseRSS) KiB for one session")

        // proxy_timeout (3 s of no progress) ends it, with its record.
        let closedAfter = Flood.waitClosed(client, timeout: 15).map { $0 - stalledAt + 1.5 }
        #expect(closedAfter.map { $0 > 2.5 && $0 < 8 } == true, "closed \(String(describing: closedAfter)) s after the last byte moved")
        let record = gateway.waitForLines(of: "access.log", timeout: 5) { $0.contains { $0.hasPrefix("\(clientPort) ") } }
            .first { $0.hasPrefix("\(clientPort) ") }?.split(separator: " ") ?? []
        #expect(record.count == 5 && record[1] == "200", "the record: \(record)")
        let received = record.count == 5 ? Int(record[2]) ?? -1 : -1
        #expect(received == pushed[0] - clientQueued - gatewayReceiveQueue,
                "bytes_received \(received) = pushed \(pushed[0]) - client queue \(clientQueued) - gateway receive queue \(gatewayReceiveQueue)")
        #expect(received - gatewaySendQueue - sinkQueue <= readBound)
        let rssAfterOne = gateway.residentKiB ?? 0

        // 50 at once, ended by their clients' resets. Each pushes 6 MiB (or until its sends
        // block): more than the gateway's side can pass on (its upstream socket's send buffer
        // autotunes to at most 4 MiB, the upstream's receive buffer is 128 KiB), so every
        // session ends up held back by the gateway. (Pushing until the sends block would park about 1 GB in the kernel's buffers:
        // the gateway's receive buffers autotune to up to 32 MiB each.)
        let sessions = 50, perClient = 6 << 20
        let before50 = try #require(gateway.residentKiB)
        let linesBefore = gateway.lines(of: "access.log").count
        let acceptedBefore = sink.acceptedPorts.count
        var clients: [Int32] = []
        defer { for fd in clients { Flood.reset(fd) } }
        for _ in 0..<sessions { clients.append(try Flood.connectStart(to: port50, sendBuffer: 64 << 10)) }
        let clientPorts = clients.map { Flood.localPort($0) }
        let pushed50 = Flood.push(clients, upTo: perClient, stallAfter: 1.5)
        // Let the gateway pass on what it will, until nothing moves any more.
        let upstreamPorts = Array(sink.acceptedPorts.dropFirst(acceptedBefore))
        #expect(upstreamPorts.count == sessions)
        func passedOnNow() -> Int {
            upstreamPorts.reduce(0) { total, upstreamPort in
                total + (KernelQueues.lookup(local: upstreamPort, remote: sink.port)?.tx ?? 0)
                    + (KernelQueues.lookup(local: sink.port, remote: upstreamPort)?.rx ?? 0)
            }
        }
        var passedOn = passedOnNow(), settled = false
        for _ in 0..<20 where !settled {
            usleep(200_000)
            let next = passedOnNow()
            settled = next == passedOn
            passedOn = next
        }
        let held50 = try #require(gateway.residentKiB)
        let pss50 = gateway.proportionalKiB ?? 0
        // Per client: what waits unread in front of the gateway (the client's and the gateway's queues).
        let clientQueues = clientPorts.map { clientPort in
            (KernelQueues.lookup(local: clientPort, remote: port50), KernelQueues.lookup(local: port50, remote: clientPort))
        }
        try #require(clientQueues.allSatisfy { $0.0 != nil && $0.1 != nil },
                     "every client socket and its gateway side are still established")
        let waitingAtGateway = clientQueues.map { ($0.0?.tx ?? 0) + ($0.1?.rx ?? 0) }
        let heldBy50 = pushed50.reduce(0, +) - waitingAtGateway.reduce(0, +) - passedOn
        let perSession = Double(held50 - before50) / Double(sessions)
        #expect(pushed50.allSatisfy { $0 > 0 }, "every client pushed: \(pushed50.min() ?? 0)...\(pushed50.max() ?? 0)")
        #expect(waitingAtGateway.allSatisfy { $0 >= 64 << 10 }, "every session is held back: \(waitingAtGateway.min() ?? 0) bytes wait unread at least")
        #expect(heldBy50 >= 0 && heldBy50 <= sessions * readBound, "the gateway holds \(heldBy50) bytes of 50 sessions")
        #expect(perSession < 512, "RSS grew by \(perSession) KiB a session over \(sessions) held-back sessions")
        let resetAt = Flood.now()
        for fd in clients { Flood.reset(fd) }
        clients = []
        let after = gateway.waitForLines(of: "access.log", timeout: 10) { $0.count >= linesBefore + sessions }
        let resetTook = Flood.now() - resetAt
        let ended = after.dropFirst(linesBefore).filter { line in
            clientPorts.contains(UInt16(line.split(separator: " ").first ?? "") ?? 0)
        }
        #expect(ended.count == sessions, "records of the reset sessions: \(ended.count) of \(sessions)")
        #expect(resetTook < 5, "the reset sessions were logged within \(resetTook) s")
        usleep(500_000)
        let rssAfterAll = gateway.residentKiB ?? 0
        #expect(gateway.stop() == 0)
        print("""
            FLOOD-FIGURES never-reading upstream: one session pushed \(pushed[0]) bytes before blocking: client send queue \(clientQueued), \
            gateway receive queue \(gatewayReceiveQueue), gateway send queue \(gatewaySendQueue), upstream receive queue \(sinkQueue), \
            held by the gateway \(heldByGateway); RSS \(baseRSS) -> \(rss) KiB (+\(rss - baseRSS)), after its end \(rssAfterOne); \
            closed \(Flood.fmt(closedAfter ?? -1)) s after the last byte moved (proxy_timeout 3 s); record \(record.joined(separator: " ")); \
            50 sessions of 6 MiB: settled \(settled), unread at the gateway \(waitingAtGateway.min() ?? 0)...\(waitingAtGateway.max() ?? 0) bytes each, \
            passed on \(passedOn), held by the gateway \(heldBy50) (\(heldBy50 / sessions) a session); RSS \(before50) -> \(held50) KiB = \(Flood.fmt(perSession)) KiB a session, PSS \(pss50); \
            after their resets \(rssAfterAll) KiB, all \(ended.count) logged in \(Flood.fmt(resetTook)) s; statuses \(Set(ended.map { $0.split(separator: " ")[1] }).sorted())
            """)
    }
}

// MARK: - Sockets and figures

enum Flood {
    static func now() -> Double {
        var time = timespec()
        clock_gettime(CLOCK_MONOTONIC, &time)
        return Double(time.tv_sec) + Double(time.tv_nsec) / 1e9
    }

    /// A whole v1 header for the `index`-th legitimate client.
    static func legitimateHeader(_ index: Int) -> String {
        "PROXY TCP4 198.51.100.\(index % 250 + 1) 203.0.113.1 \(41_000 + index) 443\r\n"
    }

    static func fmt(_ value: Double, _ digits: Int = 2) -> String { String(format: "%.\(digits)f", value) }

    /// What kind of error-log line this is: its text without the date, pid and numbers.
    static func errorKind(_ line: String) -> String {
        let text = line.split(separator: " ", maxSplits: 4).dropFirst(4).first.map(String.init) ?? line
        return String(text.prefix(60).map { $0.isNumber ? "N" : $0 })
    }

    /// Raises this process's soft RLIMIT_NOFILE to `wanted` (or the hard limit); the result.
    static func raiseOwnDescriptorLimit(to wanted: Int) -> Int {
        var value = rlimit()
        guard getrlimit(Int32(RLIMIT_NOFILE.rawValue), &value) == 0 else { return 0 }
        if value.rlim_cur < rlim_t(wanted) {
            value.rlim_cur = min(rlim_t(wanted), value.rlim_max)
            _ = setrlimit(Int32(RLIMIT_NOFILE.rawValue), &value)
            _ = getrlimit(Int32(RLIMIT_NOFILE.rawValue), &value)
        }
        return Int(value.rlim_cur)
    }

    static let pollReadHangUp: Int16 = 0x2000  // POLLRDHUP

    static func socket(nonBlocking: Bool) throws -> Int32 {
        var type = Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue)
        if nonBlocking { type |= Int32(SOCK_NONBLOCK.rawValue) }
        let fd = Glibc.socket(AF_INET, type, 0)
        guard fd >= 0 else { throw HarnessError("socket: \(String(cString: strerror(errno)))") }
        return fd
    }

    static func bind(_ fd: Int32, to host: String, port: UInt16 = 0) throws {
        var (address, length) = makeAddress(host, port)
        let result = withUnsafePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { Glibc.bind(fd, $0, length) }
        }
        guard result == 0 else { throw HarnessError("bind \(host): \(String(cString: strerror(errno)))") }
    }

    /// A non-blocking socket with its connect to 127.0.0.1:`port` started (from `source`).
    static func connectStart(to port: UInt16, from source: String? = nil, sendBuffer: Int32? = nil) throws -> Int32 {
        let fd = try socket(nonBlocking: true)
        if let source { try bind(fd, to: source) }
        if var size = sendBuffer {
            // A fixed size turns the kernel's autotuning off for this socket (it doubles the value).
            setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &size, socklen_t(MemoryLayout<Int32>.size))
        }
        var (address, length) = makeAddress("127.0.0.1", port)
        let result = withUnsafePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { Glibc.connect(fd, $0, length) }
        }
        guard result == 0 || errno == EINPROGRESS else {
            let error = errno
            Glibc.close(fd)
            throw HarnessError("connect: \(String(cString: strerror(error)))")
        }
        return fd
    }

    /// The port `fd` is bound to (0 if getsockname fails).
    static func localPort(_ fd: Int32) -> UInt16 { (try? TestServer.localPort(fd)) ?? 0 }

    /// Closes with a reset: no TIME-WAIT left behind by thousands of test sockets.
    static func reset(_ fd: Int32) {
        var value = linger(l_onoff: 1, l_linger: 0)
        setsockopt(fd, SOL_SOCKET, SO_LINGER, &value, socklen_t(MemoryLayout<linger>.size))
        Glibc.close(fd)
    }

    /// poll() over `fds` for `events`, up to `timeout` seconds: the indices that had an event.
    static func ready(_ fds: [Int32], _ events: Int16, timeout: Double) -> [(index: Int, revents: Int16)] {
        guard !fds.isEmpty else { return [] }
        var table = fds.map { pollfd(fd: $0, events: events, revents: 0) }
        let count = poll(&table, nfds_t(table.count), Int32(timeout * 1000))
        guard count > 0 else { return [] }
        return table.indices.compactMap { table[$0].revents != 0 ? ($0, table[$0].revents) : nil }
    }

    /// Sends `bytes` on each socket once its connect has finished, for up to `within` seconds.
    static func sendWhenConnected(_ fds: [Int32], _ bytes: [UInt8], within: Double) {
        var waiting = Set(fds.indices)
        let deadline = now() + within
        while !waiting.isEmpty && now() < deadline {
            let order = Array(waiting)
            for (index, revents) in ready(order.map { fds[$0] }, Int16(POLLOUT), timeout: 0.1) {
                if revents & Int16(POLLOUT) != 0 {
                    _ = bytes.withUnsafeBytes { Glibc.send(fds[order[index]], $0.baseAddress, $0.count, Int32(MSG_NOSIGNAL)) }
                }
                waiting.remove(order[index])
            }
        }
    }

    /// How many of `fds` have `expected` waiting to be read (without blocking).
    static func countReplies(_ fds: [Int32], expecting expected: [UInt8]) -> Int {
        var count = 0
        var buffer = [UInt8](repeating: 0, count: 256)
        for fd in fds {
            let n = buffer.withUnsafeMutableBytes { recv(fd, $0.baseAddress, $0.count, Int32(MSG_DONTWAIT)) }
            if n == expected.count && Array(buffer.prefix(n)) == expected { count += 1 }
        }
        return count
    }

    /// One round trip on each connection; how many came back whole.
    static func roundTrips(_ connections: [TestConnection], tag: String) -> Int {
        var good = 0
        for (index, connection) in connections.enumerated() {
            let message = Array("\(tag)-\(index)\n".utf8)
            connection.setTimeout(5)
            if (try? connection.send(message)) != nil, (try? connection.receive(exactly: message.count)) == message { good += 1 }
        }
        return good
    }

    /// A new client: connect, (a PROXY header,) a payload, its echo; true if it all came back.
    static func oneRoundTrip(port: UInt16, header: String = "", payload: String, timeout: Double) -> Bool {
        guard let connection = try? TestConnection.connect(to: "127.0.0.1", port: port, timeout: timeout) else { return false }
        defer { connection.close() }
        guard (try? connection.send(header + payload)) != nil else { return false }
        return (try? connection.receive(exactly: payload.utf8.count)) == Array(payload.utf8)
    }
}

/// Latencies of the legitimate clients (nil: not served), filled by another thread.
final class LatencyList: Sendable {
    private let list = Mutex<[Double?]>([])
    private let done = DispatchSemaphore(value: 0)

    func add(_ latency: Double?) { list.withLock { $0.append(latency) } }
    func finish() { done.signal() }
    func wait(timeout: Double) -> Bool { done.wait(timeout: .now() + timeout) == .success }
    var values: [Double?] { list.withLock { $0 } }
}

/// Send and receive queues of loopback IPv4 TCP sockets, the gateway's included, asked of the
/// kernel one socket at a time through sock_diag (what `ss` shows as Send-Q and Recv-Q; reading
/// /proc/net/tcp instead means parsing every socket of the machine, tens of thousands in
/// TIME-WAIT on a busy one, and can miss entries that move while it is read). `tx`: written and
/// not yet acknowledged (on loopback: not yet taken by the peer); `rx`: arrived and not read.
enum KernelQueues {
    /// The ESTABLISHED socket 127.0.0.1:`local` → 127.0.0.1:`remote`, or nil.
    static func lookup(local: UInt16, remote: UInt16) -> (tx: Int, rx: Int)? {
        let fd = socket(AF_NETLINK, Int32(SOCK_DGRAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 4)  // NETLINK_SOCK_DIAG
        guard fd >= 0 else { return nil }
        defer { Glibc.close(fd) }
        var timeout = timeval(tv_sec: 2, tv_usec: 0)
        setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &timeout, socklen_t(MemoryLayout<timeval>.size))
        // nlmsghdr (16 bytes, host order) + inet_diag_req_v2 (56 bytes; ports and addresses in
        // network order).
        var request = [UInt8](repeating: 0, count: 72)
        func put(_ value: UInt32, at offset: Int) { withUnsafeBytes(of: value) { for i in 0..<4 { request[offset + i] = $0[i] } } }
        func put(_ value: UInt16, at offset: Int) { withUnsafeBytes(of: value) { for i in 0..<2 { request[offset + i] = $0[i] } } }
        put(UInt32(72), at: 0)
        put(UInt16(20), at: 4)  // SOCK_DIAG_BY_FAMILY
        put(UInt16(1), at: 6)  // NLM_F_REQUEST: one socket, no dump
        put(UInt32(1), at: 8)
        request[16] = UInt8(AF_INET)
        request[17] = UInt8(IPPROTO_TCP)
        put(UInt32.max, at: 20)  // all states
        put(local.bigEndian, at: 24)
        put(remote.bigEndian, at: 26)
        request.replaceSubrange(28..<32, with: [127, 0, 0, 1])
        request.replaceSubrange(44..<48, with: [127, 0, 0, 1])
        for offset in 64..<72 { request[offset] = 0xFF }  // INET_DIAG_NOCOOKIE
        guard request.withUnsafeBytes({ Glibc.send(fd, $0.baseAddress, $0.count, 0) }) == 72 else { return nil }
        var reply = [UInt8](repeating: 0, count: 8192)
        let n = reply.withUnsafeMutableBytes { recv(fd, $0.baseAddress, $0.count, 0) }
        // nlmsghdr, then inet_diag_msg: 4 bytes, the socket id (48), expires, rqueue, wqueue.
        guard n >= 80 else { return nil }
        let type = reply.withUnsafeBytes { $0.load(fromByteOffset: 4, as: UInt16.self) }
        guard type == 20, reply[17] == 1 else { return nil }  // a socket, ESTABLISHED
        let rx = reply.withUnsafeBytes { $0.load(fromByteOffset: 72, as: UInt32.self) }
        let tx = reply.withUnsafeBytes { $0.load(fromByteOffset: 76, as: UInt32.self) }
        return (Int(tx), Int(rx))
    }
}

extension Flood {
    /// Writes to every socket of `fds` (non-blocking, connects started) as fast as each takes
    /// bytes, up to `total` each, until none has taken a byte for `stallAfter` seconds: what
    /// each one pushed.
    static func push(_ fds: [Int32], upTo total: Int, stallAfter: Double) -> [Int] {
        var pushed = [Int](repeating: 0, count: fds.count)
        var chunk = [UInt8](repeating: 0, count: 256 << 10)
        for index in chunk.indices { chunk[index] = UInt8(truncatingIfNeeded: index &* 31 &+ 7) }
        var lastProgress = now()
        let deadline = now() + 60
        while now() - lastProgress < stallAfter && now() < deadline {
            var moved = false
            for (index, fd) in fds.enumerated() where pushed[index] < total {
                while pushed[index] < total {
                    let size = min(chunk.count, total - pushed[index])
                    let n = chunk.withUnsafeBytes { Glibc.send(fd, $0.baseAddress, size, Int32(MSG_NOSIGNAL | MSG_DONTWAIT)) }
                    if n <= 0 { break }
                    pushed[index] += n
                    moved = true
                }
            }
            if moved { lastProgress = now() }
            if pushed.allSatisfy({ $0 >= total }) { break }
            _ = ready(fds, Int16(POLLOUT), timeout: 0.1)
        }
        return pushed
    }

    /// Waits until the peer closes or resets `fd` (reading and dropping what comes): when.
    static func waitClosed(_ fd: Int32, timeout: Double) -> Double? {
        let deadline = now() + timeout
        var buffer = [UInt8](repeating: 0, count: 4096)
        while now() < deadline {
            _ = ready([fd], Int16(POLLIN) | pollReadHangUp, timeout: 0.05)
            let n = buffer.withUnsafeMutableBytes { recv(fd, $0.baseAddress, $0.count, Int32(MSG_DONTWAIT)) }
            if n == 0 || (n < 0 && errno != EAGAIN && errno != EINTR) { return now() }
        }
        return nil
    }
}

/// An upstream that accepts and never reads a byte; it remembers its peers' ports (the
/// gateway's side of each upstream connection).
final class SinkServer: @unchecked Sendable {
    let port: UInt16
    private let listener: Int32
    private let state = Mutex<(fds: [Int32], ports: [UInt16], stopped: Bool)>(([], [], false))
    private let closedListener = Atomic<Bool>(false)

    init() throws {
        listener = try Flood.socket(nonBlocking: false)
        var one: Int32 = 1
        setsockopt(listener, SOL_SOCKET, SO_REUSEADDR, &one, socklen_t(MemoryLayout<Int32>.size))
        try Flood.bind(listener, to: "127.0.0.1")
        guard listen(listener, 1024) == 0 else { throw HarnessError("listen: \(String(cString: strerror(errno)))") }
        port = Flood.localPort(listener)
        Thread { [self] in
            while true {
                var storage = sockaddr_storage()
                var length = socklen_t(MemoryLayout<sockaddr_storage>.size)
                let fd = withUnsafeMutablePointer(to: &storage) {
                    $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { accept(listener, $0, &length) }
                }
                if fd < 0 {
                    if errno == EINTR || errno == ECONNABORTED { continue }
                    return
                }
                _ = fcntl(fd, F_SETFD, FD_CLOEXEC)
                let peerPort = withUnsafeBytes(of: storage) { UInt16(bigEndian: $0.load(fromByteOffset: 2, as: UInt16.self)) }
                let keep = state.withLock { state -> Bool in
                    guard !state.stopped else { return false }
                    state.fds.append(fd)
                    state.ports.append(peerPort)
                    return true
                }
                if !keep {
                    Glibc.close(fd)
                    return
                }
            }
        }.start()
    }

    var acceptedPorts: [UInt16] { state.withLock { $0.ports } }

    func stop() {
        guard !closedListener.exchange(true, ordering: .relaxed) else { return }
        let fds = state.withLock { state -> [Int32] in
            state.stopped = true
            defer { state.fds = [] }
            return state.fds
        }
        shutdown(listener, Int32(SHUT_RDWR))  // wakes the accept thread, which then returns
        usleep(20_000)
        Glibc.close(listener)
        for fd in fds { Flood.reset(fd) }
    }
}

// MARK: - Upstreams

/// An echo server on one thread with poll(): hundreds of upstream connections without a
/// thread each. Echoes what one read returns with one non-blocking send (the tests' messages
/// are a few bytes).
final class PollEchoServer: @unchecked Sendable {
    let port: UInt16
    private let listener: Int32
    private let stopped = Atomic<Bool>(false)
    private let finished = DispatchSemaphore(value: 0)

    init() throws {
        listener = try Flood.socket(nonBlocking: true)
        var one: Int32 = 1
        setsockopt(listener, SOL_SOCKET, SO_REUSEADDR, &one, socklen_t(MemoryLayout<Int32>.size))
        try Flood.bind(listener, to: "127.0.0.1")
        guard listen(listener, 4096) == 0 else { throw HarnessError("listen: \(String(cString: strerror(errno)))") }
        port = Flood.localPort(listener)
        Thread { [self] in run() }.start()
    }

    private func run() {
        var table = [pollfd(fd: listener, events: Int16(POLLIN), revents: 0)]
        var buffer = [UInt8](repeating: 0, count: 65_536)
        while !stopped.load(ordering: .relaxed) {
            guard poll(&table, nfds_t(table.count), 50) > 0 else { continue }
            var added: [Int32] = []
            var gone: [Int] = []
            for index in table.indices where table[index].revents != 0 {
                let fd = table[index].fd
                if index == 0 {
                    while true {
                        let client = accept(listener, nil, nil)
                        if client < 0 { break }
                        _ = fcntl(client, F_SETFD, FD_CLOEXEC)
                        _ = fcntl(client, F_SETFL, fcntl(client, F_GETFL) | O_NONBLOCK)
                        added.append(client)
                    }
                    continue
                }
                let n = buffer.withUnsafeMutableBytes { recv(fd, $0.baseAddress, $0.count, 0) }
                if n > 0 {
                    _ = buffer.withUnsafeBytes { Glibc.send(fd, $0.baseAddress, n, Int32(MSG_NOSIGNAL | MSG_DONTWAIT)) }
                } else if n == 0 || (errno != EAGAIN && errno != EINTR) {
                    Glibc.close(fd)
                    gone.append(index)
                }
            }
            for index in gone.reversed() { table.remove(at: index) }
            table += added.map { pollfd(fd: $0, events: Int16(POLLIN), revents: 0) }
        }
        for entry in table { Glibc.close(entry.fd) }
        finished.signal()
    }

    func stop() {
        guard !stopped.exchange(true, ordering: .relaxed) else { return }
        _ = finished.wait(timeout: .now() + 5)
    }
}
