#if canImport(Glibc)
import Glibc
#endif
import Foundation
import Testing
import PortcullisGateway
import PortcullisPolicy
import PortcullisTestSupport

/// Issue #15 part 2: the Prometheus endpoint, scraped and parsed by the official Python client
/// (prometheus_client's text parser), as a Prometheus server would read it.
@Suite("Metrics", .serialized)
struct MetricsTests {
    struct Scrape {
        var contentType: String
        var types: [String: String]
        var samples: [(name: String, labels: [String: String], value: Double)]

        /// The one sample with this name and these labels (others may be present), nil if none.
        func value(_ name: String, _ labels: [String: String] = [:]) -> Double? {
            let matching = samples.filter { sample in
                sample.name == name && labels.allSatisfy { sample.labels[$0.key] == $0.value }
            }
            return matching.count == 1 ? matching[0].value : nil
        }
    }

    static func scrape(_ port: UInt16) throws -> Scrape {
        let script = packageRoot.appendingPathComponent("Tests/Fixtures/scrape_metrics.py").path
        let output = try runTool("python3", [script, "http://127.0.0.1:\(port)/metrics"])
        let data = Data(output.stdout)
        guard output.status == 0,
              let object = try JSONSerialization.jsonObject(with: data) as? [String: Any] else {
            throw HarnessError("scrape failed (\(output.status)): \(output.stderr)")
        }
        let samples = (object["samples"] as? [[Any]] ?? []).map { row in
            (name: row[0] as? String ?? "", labels: row[1] as? [String: String] ?? [:], value: (row[2] as? NSNumber)?.doubleValue ?? .nan)
        }
        return Scrape(contentType: object["content_type"] as? String ?? "", types: object["types"] as? [String: String] ?? [:],
                      samples: samples)
    }

    @Test("metrics_listen: sessions by server, protocol and status; refusals by phase, cause and rule; upstream attempts, failures, connect times; bytes; zones; reloads — parsed by prometheus_client")
    func scrapedAndParsed() async throws {
        let echo = try TestServer.echo()
        defer { echo.stop() }
        let dead = try freePort(), metricsPort = try freePort()
        let gateway = try await GatewayHarness.start("""
            metrics_listen 127.0.0.1:\(metricsPort);
            stream {
                limit_rate_zone $binary_remote_addr zone=newconn:1m rate=1r/m burst=1;
                upstream pool { server 127.0.0.1:\(dead); server 127.0.0.1:\(echo.port); }
                server {
                    listen 127.0.0.1:{PORT};
                    deny 127.0.0.2;
                    proxy_pass pool;
                }
                server { listen 127.0.0.3:{PORT}; limit_rate newconn; return "hi\\n"; }
            }
            """)
        let port = gateway.port
        let main = "127.0.0.1:\(port)", other = "127.0.0.3:\(port)"

        let client = try TestConnection.connect(to: "127.0.0.1", port: port)
        try client.send("hello")
        #expect(try client.receive(exactly: 5) == Array("hello".utf8))
        client.close()
        let denied = try TestConnection.connect(to: "127.0.0.1", port: port, from: "127.0.0.2")
        #expect(denied.isClosedByPeer())
        denied.close()
        for _ in 0..<2 {
            let returned = try TestConnection.connect(to: "127.0.0.3", port: port)
            _ = try? returned.receiveAll(limit: 100)
            returned.close()
        }
        let ok = await gateway.gateway.reload(path: gateway.rulePath)
        #expect(ok.succeeded)
        let brokenPath = gateway.path("broken.conf")
        try "stream { server { listen 1 } }".write(toFile: brokenPath, atomically: true, encoding: .utf8)
        let broken = await gateway.gateway.reload(path: brokenPath)
        #expect(!broken.succeeded)

        var scrape = try Self.scrape(metricsPort)
        for _ in 0..<50 where scrape.value("portcullis_sessions_total", ["server": other, "status": "503"]) == nil {
            try await Task.sleep(for: .milliseconds(100))
            scrape = try Self.scrape(metricsPort)
        }
        #expect(scrape.contentType.hasPrefix("text/plain; version=0.0.4"))
        #expect(scrape.types["portcullis_sessions"] == "counter" && scrape.types["portcullis_sessions_active"] == "gauge")
        #expect(scrape.types["portcullis_upstream_connect_duration_seconds"] == "histogram")

        // Sessions: the echo let through and one denied on the main listen; on the other, one
        // answered and one refused by the session rate.
        #expect(scrape.value("portcullis_sessions_total", ["server": main, "protocol": "tcp", "status": "200"]) == 1)
        #expect(scrape.value("portcullis_sessions_total", ["server": main, "protocol": "tcp", "status": "403"]) == 1)
        #expect(scrape.value("portcullis_sessions_total", ["server": other, "status": "200"]) == 1)
        #expect(scrape.value("portcullis_sessions_total", ["server": other, "status": "503"]) == 1)
        let path = gateway.rulePath
        #expect(scrape.value("portcullis_refusals_total", ["phase": "access", "cause": "access_denied", "rule": "\(path):7",
                                                            "enforcement": "enforced"]) == 1)
        #expect(scrape.value("portcullis_refusals_total", ["phase": "limit_rate", "cause": "session_rate_limit",
                                                            "rule": "\(path):10"]) == 1)
        // Upstreams: the dead server once (refused), then the live one.
        #expect(scrape.value("portcullis_upstream_attempts_total", ["upstream": "pool", "server": "127.0.0.1:\(dead)"]) == 1)
        #expect(scrape.value("portcullis_upstream_failures_total", ["upstream": "pool", "server": "127.0.0.1:\(dead)"]) == 1)
        let live = scrape.value("portcullis_upstream_attempts_total", ["upstream": "pool", "server": "127.0.0.1:\(echo.port)"]) ?? 0
        #expect(live == 1, "round-robin tried the dead server first, then the live one once")
        #expect(scrape.value("portcullis_upstream_connect_duration_seconds_count", ["upstream": "pool"]) == live)
        #expect(scrape.value("portcullis_client_received_bytes_total", ["server": main]) == 5)
        #expect(scrape.value("portcullis_client_sent_bytes_total", ["server": main]) == 5)
        #expect(scrape.value("portcullis_upstream_server_up", ["upstream": "pool", "server": "127.0.0.1:\(echo.port)"]) == 1)
        // Zones (read at the scrape) and reloads.
        #expect(scrape.value("portcullis_limit_zone_keys", ["zone": "newconn", "kind": "limit_rate"]) == 1)
        #expect(scrape.value("portcullis_limit_zone_capacity_keys", ["zone": "newconn"]) == Double((1 << 20) / 128))
        #expect(scrape.value("portcullis_reloads_total", ["result": "ok"]) == 1)
        #expect(scrape.value("portcullis_reloads_total", ["result": "failed"]) == 1)
        #expect(scrape.value("portcullis_rules_generation") == 2)
        #expect(scrape.value("portcullis_sessions_active") == 0)

        // Anything but GET /metrics (or /) is not the metrics.
        let wrong = try TestConnection.connect(to: "127.0.0.1", port: metricsPort)
        try wrong.send("GET /other HTTP/1.1\r\nHost: x\r\n\r\n")
        #expect(String(decoding: try wrong.receiveAll(limit: 4096), as: UTF8.self).hasPrefix("HTTP/1.1 404"))
        wrong.close()
        await gateway.stop()
        #expect(!waitUntilListening(port: metricsPort, timeout: 0.5), "the endpoint closes with the gateway")
    }

    @Test("metrics_listen: a bad address is a located error; twice (main and stream) is a duplicate")
    func directiveErrors() throws {
        let bad = RuleLoader.load(text: "metrics_listen 127.0.0.1:notaport;\nstream { server { listen 1; return x; } }")
        #expect(bad.hasErrors && bad.rendered.contains("test.conf:1:16: error: invalid \"metrics_listen\" address"), "\(bad.rendered)")
        let twice = RuleLoader.load(text: "metrics_listen 9145;\nstream { metrics_listen 9146; server { listen 1; return x; } }")
        #expect(twice.hasErrors && twice.rendered.contains("\"metrics_listen\" directive is duplicate"), "\(twice.rendered)")
        let good = RuleLoader.load(text: "stream { metrics_listen 9145; server { listen 1; return x; } }")
        #expect(good.snapshot?.main.metricsListen?.description == "127.0.0.1:9145", "a bare port is loopback")
    }
}
