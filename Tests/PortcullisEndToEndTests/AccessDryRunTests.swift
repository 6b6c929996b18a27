#if canImport(Glibc)
import Glibc
#endif
import Foundation
import Testing
import PortcullisTestSupport

/// `access_dry_run on` (an extension, RULES.md): a `deny` that matches is written to the error
/// log and the audit log as a dry run, and the session goes on as if it were allowed; a server
/// with `access_dry_run off` enforces again.
@Suite("access_dry_run")
struct AccessDryRunTests {
    @Test("a denied client is relayed (200) with one dry-run audit line naming the rule and an error-log line; off in a server enforces")
    func dryRun() async throws {
        let upstream = try TestServer.echo()
        defer { upstream.stop() }
        let enforcing = try freePort()
        let gateway = try await GatewayHarness.start("""
            stream {
                error_log {DIR}/error.log info;
                log_format l '$remote_addr $status';
                access_log {DIR}/access.log l;
                audit_log {DIR}/audit.log;
                access_dry_run on;
                deny 127.0.0.7;
                server { listen 127.0.0.1:{PORT}; proxy_pass 127.0.0.1:\(upstream.port); }
                server { listen 127.0.0.1:\(enforcing); access_dry_run off; proxy_pass 127.0.0.1:\(upstream.port); }
            }
            """)
        for port in [gateway.port, enforcing] {
            let connection = try TestConnection.connect(to: "127.0.0.1", port: port, from: "127.0.0.7", timeout: 3)
            connection.setTimeout(3)
            try? connection.send("ping")
            let echoed = String(decoding: (try? connection.receive()) ?? [], as: UTF8.self)
            #expect(echoed == (port == enforcing ? "" : "ping"), "port \(port): \(echoed)")
            connection.close()
        }
        let access = await gateway.waitForLines(of: "access.log") { $0.count >= 2 }
        #expect(Set(access) == ["127.0.0.7 200", "127.0.0.7 403"], "\(access)")
        let audit = await gateway.waitForLines(of: "audit.log") { $0.count >= 2 }
        let dry = audit.filter { $0.contains("\"dry_run\":true") }
        #expect(dry.count == 1 && dry[0].contains("\"phase\":\"access\"") && dry[0].contains("\"text\":\"deny 127.0.0.7;\""), "\(audit)")
        #expect(audit.filter { $0.contains("\"dry_run\":false") && $0.contains("\"status\":403") }.count == 1, "\(audit)")
        let errors = gateway.lines(of: "error.log")
        #expect(errors.contains { $0.contains("access forbidden by rule, dry run, client: 127.0.0.7") }, "\(errors.suffix(5))")
        await gateway.stop()
    }
}
