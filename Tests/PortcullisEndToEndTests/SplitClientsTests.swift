#if canImport(Glibc)
import Glibc
#endif
import Foundation
import Testing
import PortcullisTestSupport

/// Issue #13 point 4: `split_clients` puts each client in the same bucket as nginx 1.22 does for
/// the same rule file (MurmurHash2 of the string, nginx's bucket bounds), checked by `return`ing
/// the variables to 400 clients that claim their addresses in PROXY v1 headers.
@Suite("split_clients", .serialized)
struct SplitClientsTests {
    static let rules = """
        stream {
            error_log {DIR}/error.log info;
            split_clients "${remote_addr}AAA" $variant {
                0.5%    .one;
                20%     .two;
                33.33%  .three;
                *       "";
            }
            # No "*": past 60 %, the empty value.
            split_clients "$remote_addr:$remote_port" $part {
                25% first;
                35% second;
            }
            log_format l '$remote_port $remote_addr "$variant" "$part"';
            access_log {DIR}/access.log l;
            server {
                listen 127.0.0.1:{PORT} proxy_protocol;
                set_real_ip_from 127.0.0.1;
                return "$variant|$part\\n";
            }
        }
        """

    static func answers(port: UInt16, clients: [String]) throws -> [String] {
        try clients.enumerated().map { offset, client in
            let connection = try TestConnection.connect(to: "127.0.0.1", port: port, timeout: 3)
            defer { connection.close() }
            connection.setTimeout(5)
            let header = client.contains(":")
                ? "PROXY TCP6 \(client) ::1 \(7000 + offset) 80\r\n"
                : "PROXY TCP4 \(client) 127.0.0.1 \(7000 + offset) 80\r\n"
            try connection.send(header)
            return String(decoding: (try? connection.receiveAll(limit: 4096)) ?? [], as: UTF8.self)
        }
    }

    @Test("400 clients (IPv4 and IPv6): the same $variant and $part as nginx for each, every bucket used")
    func sameBucketsAsNginx() async throws {
        var rng = SplitMix64(seed: 0x5711)
        let clients = (0..<400).map { index -> String in
            let value = UInt32(truncatingIfNeeded: rng.next())
            if index % 4 == 3 { return "2001:db8::\(String(value & 0xFFFF, radix: 16)):\(String(value >> 16, radix: 16))" }
            return "\(value >> 24 | 1).\(value >> 16 & 0xFF).\(value >> 8 & 0xFF).\(value & 0xFF)"
        }
        let nginx = try ExternalPeer.nginx(Self.rules)
        defer { nginx.stop() }
        let gateway = try await GatewayHarness.start(Self.rules)
        let theirs = try Self.answers(port: nginx.port, clients: clients)
        let ours = try Self.answers(port: gateway.port, clients: clients)
        let differences = clients.indices.filter { theirs[$0] != ours[$0] }.map {
            "\(clients[$0]): nginx \(theirs[$0].debugDescription), Portcullis \(ours[$0].debugDescription)"
        }
        let buckets = Dictionary(grouping: theirs, by: { $0 }).mapValues(\.count)
        print("split_clients same as nginx: \(clients.count) clients, \(differences.count) differ; nginx's buckets \(buckets.sorted { $0.key < $1.key })")
        #expect(differences.isEmpty, "\(differences.count) differ; the first 20:\n\(differences.prefix(20).joined(separator: "\n"))")
        let variants = Set(theirs.map { $0.split(separator: "|", omittingEmptySubsequences: false)[0] })
        let parts = Set(theirs.map { $0.split(separator: "|", omittingEmptySubsequences: false)[1] })
        #expect(variants == [".one", ".two", ".three", ""], "\(variants)")
        #expect(parts == ["first\n", "second\n", "\n"], "\(parts)")
        await gateway.stop()
    }
}
