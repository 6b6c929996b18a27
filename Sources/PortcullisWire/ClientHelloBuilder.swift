/// A minimal TLS 1.3 ClientHello record, for `portcullis explain --sni`: what `ssl_preread`
/// would read from a client offering that server name and those ALPN protocols. Not a real
/// client's hello (no key shares): only what the peeker looks at is meaningful.
public enum ClientHelloBuilder {
    public static func record(serverName: String?, alpn: [String] = []) -> [UInt8] {
        func u16(_ n: Int) -> [UInt8] { [UInt8(truncatingIfNeeded: n >> 8), UInt8(truncatingIfNeeded: n)] }
        func vector16(_ bytes: [UInt8]) -> [UInt8] { u16(bytes.count) + bytes }
        var extensions: [UInt8] = []
        if let serverName, !serverName.isEmpty {
            let name = Array(serverName.utf8.prefix(255))
            extensions += u16(0) + vector16(vector16([0] + vector16(name)))
        }
        if !alpn.isEmpty {
            let names = alpn.flatMap { name -> [UInt8] in
                let bytes = Array(name.utf8.prefix(255))
                return [UInt8(bytes.count)] + bytes
            }
            extensions += u16(16) + vector16(vector16(names))
        }
        extensions += u16(43) + vector16([4, 0x03, 0x04, 0x03, 0x03])  // TLS 1.3, 1.2
        let body: [UInt8] = [0x03, 0x03] + [UInt8](repeating: 0, count: 32) + [0] + vector16([0x13, 0x01]) + [1, 0]
            + vector16(extensions)
        let handshake: [UInt8] = [1, 0] + u16(body.count) + body
        return [0x16, 0x03, 0x01] + u16(handshake.count) + handshake
    }
}
