// Decodes one PROXY v2 header over and over on one thread and prints decodes per second.
// The header is what a TLS-terminating proxy typically sends: TCP over IPv4 with an AUTHORITY
// TLV ("example.com") and a 16-byte UNIQUE_ID TLV, 61 bytes in all. The decoder is called
// through its raw-buffer entry point, as the channel handler does on a ByteBuffer's bytes.
// Usage: proxy-decode [ITERATIONS] (default 50,000,000)
import PortcullisCore
import PortcullisWire

let iterations = CommandLine.arguments.dropFirst().first.flatMap { Int($0) } ?? 50_000_000

// sig, 0x21 PROXY, 0x11 TCP/IPv4, len 45, 192.168.0.1:56324 -> 192.168.0.11:443, then the TLVs.
let header: [UInt8] = [
    0x0D, 0x0A, 0x0D, 0x0A, 0x00, 0x0D, 0x0A, 0x51, 0x55, 0x49, 0x54, 0x0A, 0x21, 0x11, 0x00, 0x2D,
    0xC0, 0xA8, 0x00, 0x01, 0xC0, 0xA8, 0x00, 0x0B, 0xDC, 0x04, 0x01, 0xBB,
    0x02, 0x00, 0x0B] + Array("example.com".utf8) + [0x05, 0x00, 0x10] + Array(0...15)
precondition(header == ProxyHeaderEncoder.v2(
    source: SocketEndpoint(address: .v4(0xC0A8_0001), port: 56324),
    destination: SocketEndpoint(address: .v4(0xC0A8_000B), port: 443),
    tlvs: [ProxyTLV(.authority, Array("example.com".utf8)), ProxyTLV(.uniqueID, Array(0...15))]))
// Followed by payload, as on a real connection: the decoder must stop at the header.
let input = header + Array("GET / HTTP/1.1\r\nHost: example.com\r\n\r\n".utf8)

func run(_ count: Int) -> Int {
    var sink = 0
    input.withUnsafeBytes { raw in
        for _ in 0..<count {
            guard let (decoded, length) = try! ProxyHeaderDecoder.decode(raw) else { fatalError("need more?") }
            sink &+= length &+ decoded.tlvBytes.count &+ Int(decoded.source?.port ?? 0)
        }
    }
    return sink
}

let check = try! ProxyHeaderDecoder.decode(input)!
precondition(check.length == header.count && check.header.tlv(ProxyTLVType.authority.rawValue) == Array("example.com".utf8))

_ = run(iterations / 50)  // warm up
let clock = ContinuousClock()
var sink = 0
let elapsed = clock.measure { sink = run(iterations) }
// Every decode's result was used, so none could be skipped.
precondition(sink == iterations &* (header.count + (header.count - 28) + 56324))
let seconds = Double(elapsed.components.seconds) + Double(elapsed.components.attoseconds) / 1e18
let rate = Double(iterations) / seconds
func grouped(_ value: Int) -> String {
    var text = String(value), out = ""
    while text.count > 3 { out = "," + text.suffix(3) + out; text.removeLast(3) }
    return text + out
}
print("proxy v2 decode (TCP4 + AUTHORITY + UNIQUE_ID, \(header.count) bytes): "
    + "\(grouped(iterations)) decodes in \(format3(seconds)) s = \(grouped(Int(rate))) decodes/s, "
    + "\(format1(1e9 / rate)) ns/decode")

func format3(_ x: Double) -> String { String(Double(Int(x * 1000)) / 1000) }
func format1(_ x: Double) -> String { String(Double(Int(x * 10)) / 10) }
