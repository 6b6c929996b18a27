#if canImport(Glibc)
import Glibc
#endif
import Foundation
import Synchronization
import Testing
import PortcullisTestSupport

/// The PROXY protocol against real peers: HAProxy 2.6 and nginx (stream module) as children of
/// the test, on loopback ports, with Portcullis in-process. Each side's own log is the witness:
/// what HAProxy or nginx logs as the client must be the client Portcullis saw (or, with
/// Portcullis behind HAProxy, the client HAProxy saw). HAProxy and nginx must be installed
/// (.ci/install-deps); without them these tests fail, they do not skip.
@Suite("PROXY protocol interop", .serialized)
struct ProxyInteropTests {
    enum Version: String, Sendable, CaseIterable, CustomTestStringConvertible {
        case v1, v2
        var testDescription: String { rawValue }
    }

    /// How the client reaches Portcullis.
    enum Family: String, Sendable, CaseIterable, CustomTestStringConvertible {
        /// From 127.0.0.5 to 127.0.0.1.
        case ipv4
        /// From ::1 to [::1].
        case ipv6

        var testDescription: String { rawValue }
        var host: String { self == .ipv4 ? "127.0.0.1" : "::1" }
        var listen: String { self == .ipv4 ? "127.0.0.1:{PORT}" : "[::1]:{PORT}" }
        var source: String { self == .ipv4 ? "127.0.0.5" : "::1" }
    }

    // MARK: 1. HAProxy behind Portcullis

    @Test("HAProxy (accept-proxy) behind Portcullis logs the client Portcullis saw, and the v2 TLVs it set",
          arguments: Version.allCases, Family.allCases)
    func haproxyReceives(version: Version, family: Family) async throws {
        let echo = try TestServer.echo()
        defer { withExtendedLifetime(echo) {} }  // to the end; its deinit stops it
        let haproxy = try ExternalPeer.haproxy("""
            frontend from_portcullis
                bind 127.0.0.1:{PORT} accept-proxy
                option tcplog
                log-format "%ci:%cp %[fc_pp_unique_id] %[fc_pp_authority] %fi:%fp"
                default_backend echo
            backend echo
                server echo 127.0.0.1:\(echo.port)
            """)
        defer { haproxy.stop() }
        let tlvs = version == .v2
            ? #"proxy_protocol_tlv unique_id "pc-$connection"; proxy_protocol_tlv authority "example.com";"#
            : ""
        let gateway = try await GatewayHarness.start("""
            stream {
                log_format peer '$remote_addr:$remote_port $connection';
                access_log {DIR}/access.log peer;
                server {
                    listen \(family.listen);
                    proxy_protocol \(version.rawValue);
                    \(tlvs)
                    proxy_pass 127.0.0.1:\(haproxy.port);
                }
            }
            """, host: family.host)

        let client = try TestConnection.connect(to: family.host, port: gateway.port, from: family.source)
        let me = try client.localEndpoint()
        #expect(me.address == family.source)
        try client.send("through two hops")
        #expect(try client.receive(exactly: 16) == Array("through two hops".utf8))
        client.close()

        let ours = await gateway.waitForLines(of: "access.log") { !$0.isEmpty }
        let theirs = await haproxy.waitForLogLines { !$0.isEmpty }
        await gateway.stop()
        let endpoint = "\(me.address):\(me.port)"
        try #require(ours.count == 1, "Portcullis access log: \(ours)")
        let fields = ours[0].split(separator: " ").map(String.init)
        try #require(fields.count == 2)
        #expect(fields[0] == endpoint)
        let tlvText = version == .v2 ? "pc-\(fields[1]) example.com" : "- -"
        // With accept-proxy, %fi:%fp is the header's destination: the address the client dialled.
        #expect(theirs == ["\(endpoint) \(tlvText) \(family.host):\(gateway.port)"], "HAProxy: \(haproxy.diagnostics)")
    }

    // MARK: 2. HAProxy in front of Portcullis

    static let realIPFormat = """
        log_format real '$remote_addr:$remote_port $realip_remote_addr $proxy_protocol_tlv_unique_id $status';
        """

    /// `send-proxy`, or `send-proxy-v2` with a CRC32C and a UNIQUE_ID TLV.
    static func haproxyInFront(of gatewayPort: UInt16, _ version: Version) throws -> ExternalPeer {
        let send = version == .v1 ? "send-proxy" : "send-proxy-v2 proxy-v2-options crc32c,unique-id"
        return try ExternalPeer.haproxy("""
            frontend clients
                bind 127.0.0.1:{PORT}
                unique-id-format %{+X}o%ci:%cp_%fi:%fp_%Ts_%rt:%pid
                log-format "%ci:%cp %ID"
                default_backend portcullis
            backend portcullis
                server pc 127.0.0.1:\(gatewayPort) \(send)
            """)
    }

    @Test("behind HAProxy (send-proxy / send-proxy-v2 with crc32c,unique-id) the client is the one HAProxy saw",
          arguments: Version.allCases)
    func haproxySends(version: Version) async throws {
        let echo = try TestServer.echo()
        defer { withExtendedLifetime(echo) {} }  // to the end; its deinit stops it
        let gateway = try await GatewayHarness.start("""
            stream {
                \(Self.realIPFormat)
                access_log {DIR}/access.log real;
                server {
                    listen 127.0.0.1:{PORT} proxy_protocol;
                    set_real_ip_from 127.0.0.1;
                    proxy_pass 127.0.0.1:\(echo.port);
                }
            }
            """)
        let haproxy = try Self.haproxyInFront(of: gateway.port, version)
        defer { haproxy.stop() }

        let client = try TestConnection.connect(to: "127.0.0.1", port: haproxy.port, from: "127.0.0.7")
        let me = try client.localEndpoint()
        #expect(me.address == "127.0.0.7")
        try client.send("behind haproxy")
        #expect(try client.receive(exactly: 14) == Array("behind haproxy".utf8))
        client.close()

        let theirs = await haproxy.waitForLogLines { !$0.isEmpty }
        let ours = await gateway.waitForLines(of: "access.log") { !$0.isEmpty }
        await gateway.stop()
        try #require(theirs.count == 1, "HAProxy log: \(theirs)\n\(haproxy.diagnostics)")
        let haproxyFields = theirs[0].split(separator: " ").map(String.init)
        try #require(haproxyFields.count == 2)
        #expect(haproxyFields[0] == "127.0.0.7:\(me.port)")
        let uniqueID = haproxyFields[1]
        #expect(!uniqueID.isEmpty && uniqueID != "-")
        // v1 carries no TLVs: the variable is missing and logged as "-".
        let loggedID = version == .v2 ? uniqueID : "-"
        #expect(ours == ["127.0.0.7:\(me.port) 127.0.0.1 \(loggedID) 200"])
        #expect(echo.connectionCount == 1)
    }

    @Test("allow/deny see the address from a trusted PROXY header: deny 127.0.0.7 refuses it, 127.0.0.8 passes")
    func accessRulesUseProxyAddress() async throws {
        let echo = try TestServer.echo()
        defer { withExtendedLifetime(echo) {} }  // to the end; its deinit stops it
        let gateway = try await GatewayHarness.start("""
            stream {
                \(Self.realIPFormat)
                access_log {DIR}/access.log real;
                server {
                    listen 127.0.0.1:{PORT} proxy_protocol;
                    set_real_ip_from 127.0.0.1;
                    deny 127.0.0.7;
                    allow all;
                    proxy_pass 127.0.0.1:\(echo.port);
                }
            }
            """)
        let haproxy = try Self.haproxyInFront(of: gateway.port, .v2)
        defer { haproxy.stop() }

        let denied = try TestConnection.connect(to: "127.0.0.1", port: haproxy.port, from: "127.0.0.7")
        let deniedPort = try denied.localEndpoint().port
        try denied.send("let me in")
        #expect(denied.isClosedByPeer())
        denied.close()
        _ = await gateway.waitForLines(of: "access.log") { !$0.isEmpty }

        let allowed = try TestConnection.connect(to: "127.0.0.1", port: haproxy.port, from: "127.0.0.8")
        let allowedPort = try allowed.localEndpoint().port
        try allowed.send("let me in")
        #expect(try allowed.receive(exactly: 9) == Array("let me in".utf8))
        allowed.close()

        let ours = await gateway.waitForLines(of: "access.log") { $0.count >= 2 }
        let theirs = await haproxy.waitForLogLines { $0.count >= 2 }
        await gateway.stop()
        try #require(theirs.count == 2, "HAProxy log: \(theirs)\n\(haproxy.diagnostics)")
        let ids = theirs.map { $0.split(separator: " ").map(String.init).last ?? "" }
        #expect(ours == [
            "127.0.0.7:\(deniedPort) 127.0.0.1 \(ids[0]) 403",
            "127.0.0.8:\(allowedPort) 127.0.0.1 \(ids[1]) 200",
        ])
        #expect(echo.connectionCount == 1, "the denied client must never reach the upstream")
    }

    @Test("UNIQUE_ID from a trusted HAProxy travels on in Portcullis's v2 header to a second HAProxy; an untrusted sender's does not",
          arguments: [true, false])
    func uniqueIDTravelsOn(trusted: Bool) async throws {
        let echo = try TestServer.echo()
        defer { withExtendedLifetime(echo) {} }  // to the end; its deinit stops it
        let back = try ExternalPeer.haproxy("""
            frontend from_portcullis
                bind 127.0.0.1:{PORT} accept-proxy
                log-format "%ci:%cp %[fc_pp_unique_id]"
                default_backend echo
            backend echo
                server echo 127.0.0.1:\(echo.port)
            """)
        defer { back.stop() }
        let gateway = try await GatewayHarness.start("""
            stream {
                log_format chain '$remote_addr:$remote_port $proxy_protocol_tlv_unique_id';
                access_log {DIR}/access.log chain;
                server {
                    listen 127.0.0.1:{PORT} proxy_protocol;
                    \(trusted ? "set_real_ip_from 127.0.0.1;" : "")
                    proxy_protocol v2;
                    proxy_pass 127.0.0.1:\(back.port);
                }
            }
            """)
        let front = try Self.haproxyInFront(of: gateway.port, .v2)
        defer { front.stop() }

        let client = try TestConnection.connect(to: "127.0.0.1", port: front.port, from: "127.0.0.11")
        let me = try client.localEndpoint()
        try client.send("three hops")
        #expect(try client.receive(exactly: 10) == Array("three hops".utf8))
        client.close()

        let frontLog = await front.waitForLogLines { !$0.isEmpty }
        let ours = await gateway.waitForLines(of: "access.log") { !$0.isEmpty }
        let backLog = await back.waitForLogLines { !$0.isEmpty }
        await gateway.stop()
        try #require(frontLog.count == 1 && ours.count == 1, "front HAProxy: \(frontLog), Portcullis: \(ours)")
        let uniqueID = try #require(frontLog[0].split(separator: " ").last.map(String.init))
        #expect(frontLog[0] == "127.0.0.11:\(me.port) \(uniqueID)")
        let fields = ours[0].split(separator: " ").map(String.init)
        // The received TLV is logged either way; realip (and passing it on) needs trust.
        #expect(fields.last == uniqueID)
        if trusted {
            #expect(ours == ["127.0.0.11:\(me.port) \(uniqueID)"])
            #expect(backLog == ["127.0.0.11:\(me.port) \(uniqueID)"], "back HAProxy: \(back.diagnostics)")
        } else {
            // $remote_addr stays the TCP peer (the front HAProxy), and that is what is sent on.
            #expect(fields.first?.hasPrefix("127.0.0.1:") == true)
            #expect(backLog == ["\(fields.first ?? "?") -"], "back HAProxy: \(back.diagnostics)")
        }
    }

    // MARK: 3. nginx behind Portcullis

    @Test("nginx (listen … proxy_protocol) behind Portcullis logs the client Portcullis saw",
          arguments: Version.allCases)
    func nginxReceives(version: Version) async throws {
        let echo = try TestServer.echo()
        defer { withExtendedLifetime(echo) {} }  // to the end; its deinit stops it
        let nginx = try ExternalPeer.nginx("""
            stream {
                log_format x '$proxy_protocol_addr:$proxy_protocol_port $remote_addr $proxy_protocol_server_addr:$proxy_protocol_server_port';
                access_log {DIR}/access.log x;
                server {
                    listen 127.0.0.1:{PORT} proxy_protocol;
                    proxy_pass 127.0.0.1:\(echo.port);
                }
            }
            """)
        defer { nginx.stop() }
        let gateway = try await GatewayHarness.start("""
            stream {
                log_format peer '$remote_addr:$remote_port';
                access_log {DIR}/access.log peer;
                server {
                    listen 127.0.0.1:{PORT};
                    proxy_protocol \(version.rawValue);
                    proxy_pass 127.0.0.1:\(nginx.port);
                }
            }
            """)

        let client = try TestConnection.connect(to: "127.0.0.1", port: gateway.port, from: "127.0.0.9")
        let me = try client.localEndpoint()
        #expect(me.address == "127.0.0.9")
        try client.send("to nginx and back")
        #expect(try client.receive(exactly: 17) == Array("to nginx and back".utf8))
        client.close()

        let ours = await gateway.waitForLines(of: "access.log") { !$0.isEmpty }
        let theirs = await nginx.waitForLogLines { !$0.isEmpty }
        await gateway.stop()
        #expect(ours == ["127.0.0.9:\(me.port)"])
        #expect(theirs == ["127.0.0.9:\(me.port) 127.0.0.1 127.0.0.1:\(gateway.port)"], "nginx: \(nginx.diagnostics)")
    }

    // MARK: 4. A custom TLV and the CRC32C, read byte by byte

    @Test("proxy_protocol v2 with a custom 0xE7 TLV and proxy_protocol_crc32c: the header, parsed here, is exact")
    func customTLVAndChecksum() async throws {
        let received = Box<[UInt8]>()
        let upstream = try TestServer { connection in
            // The header first (16 bytes, then `len` more), then echo whatever follows.
            guard let fixed = try? connection.receive(exactly: 16) else { return connection.close() }
            let length = Int(fixed[14]) << 8 | Int(fixed[15])
            guard let rest = try? connection.receive(exactly: length) else { return connection.close() }
            received.set(fixed + rest)
            while let chunk = try? connection.receive(), !chunk.isEmpty {
                try? connection.send(chunk)
            }
            connection.close()
        }
        defer { withExtendedLifetime(upstream) {} }  // to the end; its deinit stops it
        let gateway = try await GatewayHarness.start("""
            stream {
                server {
                    listen 127.0.0.1:{PORT};
                    proxy_protocol v2;
                    proxy_protocol_tlv 0xE7 "geo=$remote_addr";
                    proxy_protocol_crc32c on;
                    proxy_pass 127.0.0.1:\(upstream.port);
                }
            }
            """)
        let client = try TestConnection.connect(to: "127.0.0.1", port: gateway.port, from: "127.0.0.10")
        let me = try client.localEndpoint()
        try client.send("ping")
        #expect(try client.receive(exactly: 4) == Array("ping".utf8))
        client.close()
        await gateway.stop()

        let bytes = try #require(await received.wait(), "the upstream got no complete v2 header")
        let header = try V2Header.parse(bytes)
        #expect(header.versionCommand == 0x21)
        #expect(header.family == 0x11)
        #expect(header.source == [127, 0, 0, 10])
        #expect(header.sourcePort == me.port)
        #expect(header.destination == [127, 0, 0, 1])
        #expect(header.destinationPort == gateway.port)
        #expect(header.tlvs.map(\.type) == [0xE7, 0x03] || header.tlvs.map(\.type) == [0x03, 0xE7],
                "TLVs: \(header.tlvs.map { String(format: "0x%02X", $0.type) })")
        #expect(header.tlvs.first { $0.type == 0xE7 }.map { String(decoding: $0.value, as: UTF8.self) } == "geo=127.0.0.10")
        let crc = try #require(header.tlvs.first { $0.type == 0x03 })
        try #require(crc.value.count == 4)
        let sent = crc.value.reduce(UInt32(0)) { $0 << 8 | UInt32($1) }
        var zeroed = bytes
        for i in crc.valueOffset..<(crc.valueOffset + 4) { zeroed[i] = 0 }
        #expect(sent == CRC32C.checksum(zeroed), "CRC32C TLV \(String(format: "%08X", sent)) vs computed \(String(format: "%08X", CRC32C.checksum(zeroed)))")
    }

    @Test("the test's own CRC32C gives the RFC 3720 check values")
    func crc32cCheckValues() {
        #expect(CRC32C.checksum(Array("123456789".utf8)) == 0xE306_9283)
        #expect(CRC32C.checksum([UInt8](repeating: 0, count: 32)) == 0x8A91_36AA)
        #expect(CRC32C.checksum([UInt8](repeating: 0xFF, count: 32)) == 0x62A8_AB43)
    }
}

// MARK: - The test's own PROXY v2 reader and CRC32C (independent of PortcullisWire)

extension ProxyInteropTests {
    struct V2Header {
        struct TLV {
            var type: UInt8
            var value: [UInt8]
            /// Where the value starts in the whole header.
            var valueOffset: Int
        }

        var versionCommand: UInt8
        var family: UInt8
        var source: [UInt8]
        var destination: [UInt8]
        var sourcePort: UInt16
        var destinationPort: UInt16
        var tlvs: [TLV]

        static let signature: [UInt8] = [0x0D, 0x0A, 0x0D, 0x0A, 0x00, 0x0D, 0x0A, 0x51, 0x55, 0x49, 0x54, 0x0A]

        /// Parses one complete header (exactly 16 + len bytes), TCP over IPv4 or IPv6.
        static func parse(_ bytes: [UInt8]) throws -> V2Header {
            guard bytes.count >= 16, Array(bytes[0..<12]) == signature else { throw HarnessError("no v2 signature: \(bytes.prefix(16))") }
            let length = Int(bytes[14]) << 8 | Int(bytes[15])
            guard bytes.count == 16 + length else { throw HarnessError("len \(length) but \(bytes.count - 16) bytes follow") }
            let family = bytes[13]
            let addressLength: Int
            switch family >> 4 {
            case 0x1: addressLength = 4
            case 0x2: addressLength = 16
            default: throw HarnessError(String(format: "unexpected family byte 0x%02X", family))
            }
            let block = 2 * addressLength + 4
            guard length >= block else { throw HarnessError("address block of \(length) bytes is too short") }
            var offset = 16
            func take(_ count: Int) -> [UInt8] {
                defer { offset += count }
                return Array(bytes[offset..<(offset + count)])
            }
            let source = take(addressLength), destination = take(addressLength)
            let ports = take(4)
            var tlvs: [TLV] = []
            while offset < bytes.count {
                guard bytes.count - offset >= 3 else { throw HarnessError("truncated TLV header at \(offset)") }
                let type = bytes[offset]
                let valueLength = Int(bytes[offset + 1]) << 8 | Int(bytes[offset + 2])
                offset += 3
                guard bytes.count - offset >= valueLength else { throw HarnessError("TLV 0x\(String(type, radix: 16)) overruns the header") }
                tlvs.append(TLV(type: type, value: take(valueLength), valueOffset: offset - valueLength))
            }
            return V2Header(
                versionCommand: bytes[12], family: family, source: source, destination: destination,
                sourcePort: UInt16(ports[0]) << 8 | UInt16(ports[1]),
                destinationPort: UInt16(ports[2]) << 8 | UInt16(ports[3]), tlvs: tlvs)
        }
    }

    /// CRC-32C (Castagnoli), reflected polynomial 0x82F63B78, bit by bit.
    enum CRC32C {
        static func checksum(_ bytes: [UInt8]) -> UInt32 {
            var crc: UInt32 = 0xFFFF_FFFF
            for byte in bytes {
                crc ^= UInt32(byte)
                for _ in 0..<8 {
                    crc = crc & 1 == 1 ? (crc >> 1) ^ 0x82F6_3B78 : crc >> 1
                }
            }
            return ~crc
        }
    }

    /// A value one thread sets and a test waits for.
    final class Box<Value: Sendable>: Sendable {
        private let value = Mutex<Value?>(nil)

        func set(_ new: Value) { value.withLock { $0 = new } }

        func wait(timeout: Double = 5) async -> Value? {
            let deadline = Date().addingTimeInterval(timeout)
            while Date() < deadline {
                if let current = value.withLock({ $0 }) { return current }
                try? await Task.sleep(for: .milliseconds(10))
            }
            return nil
        }
    }
}
