// The inputs of PolicyBenchmarks, built in each benchmark's setup (not measured).
import PortcullisCore
import PortcullisPolicy
import PortcullisWire

/// A fixed-seed generator (SplitMix64): every run measures the same rules and probes.
struct SeededGenerator: RandomNumberGenerator {
    private var state: UInt64
    init(seed: UInt64) { state = seed }
    mutating func next() -> UInt64 {
        state &+= 0x9E37_79B9_7F4A_7C15
        var z = state
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }
}

struct SetupError: Error, CustomStringConvertible {
    var description: String
}

/// Where the next iteration starts in an input ring, so that iterations walk the whole ring
/// instead of repeating its first thousand entries (which would stay in cache).
final class Cursor: @unchecked Sendable {
    private var position = 0
    private let mask: Int
    init(mask: Int) { self.mask = mask }
    /// The current position; the next call starts `count` further on.
    func take(_ count: Int) -> Int {
        defer { position = (position + count) & mask }
        return position
    }
}

/// A monotonic clock for the rate benchmarks: nanoseconds, advanced by what each iteration uses.
final class FakeClock: @unchecked Sendable {
    private var now: UInt64 = 1_000_000_000
    func take(_ span: UInt64) -> UInt64 {
        defer { now += span }
        return now
    }
}

/// Input rings are 2^20 entries long: larger than any cache, indexed with a mask.
let ringSize = 1 << 20

func grouped(_ value: Int) -> String {
    var text = String(value), out = ""
    while text.count > 3 { out = "," + text.suffix(3) + out; text.removeLast(3) }
    return text + out
}

func dotted(_ address: UInt32) -> String {
    "\(address >> 24).\(address >> 16 & 0xFF).\(address >> 8 & 0xFF).\(address & 0xFF)"
}

func hex16(_ value: UInt64) -> String { String(value & 0xFFFF, radix: 16) }

/// Compiles `text` as a rule file through the real loader (lexer, parser, compiler).
func compile(_ text: String, file: String) throws -> PolicySnapshot {
    let result = RuleLoader.load(text: text, file: file)
    guard let snapshot = result.snapshot, !result.hasErrors else {
        throw SetupError(description: "\(file) did not compile:\n\(result.rendered)")
    }
    return snapshot
}

// MARK: - 1. Access list

final class AccessListState: @unchecked Sendable {
    let list: AccessList
    let probes: [IPAddress]
    let mask = ringSize - 1
    let cursor = Cursor(mask: ringSize - 1)

    /// `ruleCount - 1` allow/deny lines of four kinds (an IPv4 /24, a single IPv4 address, an
    /// IPv6 /64, a single IPv6 address), then `allow all;`. Half the probes fall inside a rule,
    /// picked at random from all of them; the other half are random addresses of the same
    /// families, which mostly reach the final rule.
    init(ruleCount: Int) throws {
        var rng = SeededGenerator(seed: 1)
        var text = "stream {\n server {\n  listen 127.0.0.1:9999;\n"
        text.reserveCapacity(ruleCount * 40)
        var inside: [IPAddress] = []
        inside.reserveCapacity(ruleCount)
        for i in 0..<(ruleCount - 1) {
            let action = rng.next() % 4 == 0 ? "allow" : "deny"
            switch i % 4 {
            case 0:
                let network = UInt32(10) << 24 | UInt32.random(in: 0...0xFFFF, using: &rng) << 8
                text += "  \(action) \(dotted(network))/24;\n"
                inside.append(.v4(network | UInt32.random(in: 0...255, using: &rng)))
            case 1:
                let address = UInt32(172) << 24 | UInt32.random(in: 0x10_0000...0x1F_FFFF, using: &rng)
                text += "  \(action) \(dotted(address));\n"
                inside.append(.v4(address))
            case 2:
                let site = rng.next() & 0xFFFF_FFFF
                text += "  \(action) 2001:db8:\(hex16(site >> 16)):\(hex16(site))::/64;\n"
                inside.append(.v6(UInt128(0x2001_0db8) << 96 | UInt128(site) << 64 | UInt128(rng.next())))
            default:
                let host = rng.next()
                text += "  \(action) 2001:db8:ffff:ffff::\(hex16(host >> 16)):\(hex16(host));\n"
                inside.append(.v6(UInt128(0x2001_0db8_ffff_ffff) << 64 | UInt128(host & 0xFFFF_FFFF)))
            }
        }
        text += "  allow all;\n  proxy_pass 127.0.0.1:9998;\n }\n}\n"
        let snapshot = try compile(text, file: "access-list.conf")
        list = snapshot.servers[0].access
        guard list.rules.count == ruleCount else {
            throw SetupError(description: "expected \(ruleCount) rules, compiled \(list.rules.count)")
        }
        probes = (0..<ringSize).map { i in
            if i % 2 == 0 { return inside[Int.random(in: 0..<inside.count, using: &rng)] }
            switch i % 8 {
            case 1: return .v4(UInt32(10) << 24 | UInt32.random(in: 0...0xFF_FFFF, using: &rng))
            case 3: return .v4(UInt32(172) << 24 | UInt32.random(in: 0x10_0000...0x1F_FFFF, using: &rng))
            case 5: return .v6(UInt128(0x2001_0db8) << 96 | UInt128(rng.next()) << 32 | UInt128(rng.next() >> 32))
            default: return .v4(UInt32.random(in: 0...UInt32.max, using: &rng))
            }
        }
    }
}

// MARK: - 2. geo

final class GeoState: @unchecked Sendable {
    let geo: GeoVariable
    let probes: [IPAddress]
    let mask = ringSize - 1
    let cursor = Cursor(mask: ringSize - 1)

    /// `blockCount` IPv4 CIDRs of mixed lengths (/16 to /32) with 250 distinct values, in one
    /// `geo` block. Half the probes fall inside a block, half are random addresses.
    init(blockCount: Int) throws {
        var rng = SeededGenerator(seed: 2)
        var text = "stream {\n geo $geo_test {\n  default ZZ;\n"
        text.reserveCapacity(blockCount * 26)
        var inside: [UInt32] = []
        inside.reserveCapacity(blockCount)
        let lengths = [16, 20, 24, 24, 24, 28, 32]
        for i in 0..<blockCount {
            let length = lengths[i % lengths.count]
            let hostBits = UInt32(32 - length)
            let network = (UInt32.random(in: 0...UInt32.max, using: &rng) >> hostBits) << hostBits
            text += "  \(dotted(network))/\(length) c\(i % 250);\n"
            inside.append(hostBits == 0 ? network : network | UInt32.random(in: 0...(UInt32.max >> (32 - hostBits)), using: &rng))
        }
        text += " }\n server { listen 127.0.0.1:9999; proxy_pass 127.0.0.1:9998; }\n}\n"
        let snapshot = try compile(text, file: "geo.conf")
        guard let index = snapshot.variables.index(of: "geo_test"),
              case .geo(let geo) = snapshot.variables.definitions[index] else {
            throw SetupError(description: "no $geo_test variable in the compiled rules")
        }
        self.geo = geo
        probes = (0..<ringSize).map { i in
            i % 2 == 0 ? .v4(inside[Int.random(in: 0..<inside.count, using: &rng)])
                : .v4(UInt32.random(in: 0...UInt32.max, using: &rng))
        }
    }
}

// MARK: - 3. Limits

/// `$remote_addr` as a session renders it for a key: "10.x.y.z" for address number `i`.
func addressKey(_ i: Int) -> [UInt8] { Array(dotted(UInt32(10) << 24 | UInt32(i + 1)).utf8) }

/// No key template: the benchmarks pass rendered keys straight to the zone.
let noKey = LogTemplate(parts: [])

final class LimitConnState: @unchecked Sendable {
    let zone = LimitConnZone(name: "conn", key: noKey, size: 10 * 1024 * 1024, location: nil)
    let keys: [[UInt8]]
    let mask = ringSize - 1
    let cursor = Cursor(mask: ringSize - 1)

    /// A 10m zone (163,840 keys) holding `held` sessions of other keys; checks draw from
    /// 1,000,000 client addresses at random.
    init(held: Int) {
        for i in 0..<held { _ = zone.acquire(Array("held-\(i)".utf8), limit: 1) }
        var rng = SeededGenerator(seed: 3)
        keys = (0..<ringSize).map { _ in addressKey(Int.random(in: 0..<1_000_000, using: &rng)) }
    }
}

final class LimitRateState: @unchecked Sendable {
    let zone = LimitRateZone(name: "rate", key: noKey, kind: .sessions, rate: 10, burst: 10,
                             size: 10 * 1024 * 1024, rateText: "10r/s", location: nil)
    let keys: [[UInt8]]
    let mask = ringSize - 1
    let cursor = Cursor(mask: ringSize - 1)
    let clock = FakeClock()

    /// Keys drawn at random from `population` client addresses; the zone is filled by a first
    /// pass over the ring.
    init(population: Int) {
        var rng = SeededGenerator(seed: 4)
        let distinct = (0..<population).map(addressKey)
        keys = (0..<ringSize).map { _ in distinct[Int.random(in: 0..<population, using: &rng)] }
        for key in keys { _ = zone.admit(key, now: clock.take(1_000)) }
    }
}

// MARK: - 4. PROXY v2

final class ProxyState: @unchecked Sendable {
    let input: [UInt8]

    /// What a TLS-terminating proxy typically sends: TCP over IPv4, 192.168.0.1:56324 to
    /// 192.168.0.11:443, an AUTHORITY TLV ("example.com") and a 16-byte UNIQUE_ID TLV (61 bytes),
    /// then the first bytes of the client's payload, which the decoder must leave alone.
    init() throws {
        let header = ProxyHeaderEncoder.v2(
            source: SocketEndpoint(address: .v4(0xC0A8_0001), port: 56324),
            destination: SocketEndpoint(address: .v4(0xC0A8_000B), port: 443),
            tlvs: [ProxyTLV(.authority, Array("example.com".utf8)), ProxyTLV(.uniqueID, Array(0...15))])
        input = header + Array("GET / HTTP/1.1\r\nHost: example.com\r\n\r\n".utf8)
        guard let decoded = try ProxyHeaderDecoder.decode(input), decoded.length == header.count,
              decoded.header.tlvs.count == 2 else {
            throw SetupError(description: "the PROXY v2 header did not decode back")
        }
    }
}
