// libFuzzer harness for the TLS ClientHello peeker (PortcullisWire's ClientHelloPeeker).
// Built and run by `Tests/Fuzz/run-fuzzer.sh client-hello`; see docs/fuzzing.md. Not part of
// the SwiftPM package.
//
// For every input: peek must not crash; the [UInt8] and raw-buffer entry points agree; the
// answer is consistent with the answer for the input minus its last byte (parse-or-need-more:
// "need more" only follows "need more", a hello stays the same hello, "not TLS" stays
// "not TLS"); a hello stays the same with bytes appended; the values are well-formed (names
// of known protocols, non-empty ALPN names, Latin-1 text that gives back its bytes).
// Inputs starting with 0x2A ('*', which is never TLS) instead hold a handshake message to be
// wrapped by the harness: one record, then records of a size the next byte picks (with empty
// records between them if it says so, and varied record versions); every wrapping must give
// the same answer. libFuzzer finds the selector at once and then mutates hello fields directly.
import PortcullisWire

@_cdecl("LLVMFuzzerTestOneInput")
public func clientHelloFuzz(_ data: UnsafePointer<UInt8>?, _ size: Int) -> CInt {
    let bytes = size == 0 ? [] : Array(UnsafeBufferPointer(start: data, count: size))
    if bytes.first == wrapSelector {
        checkWrappings(Array(bytes.dropFirst()))
        return 0
    }
    let outcome = check(bytes)
    if !bytes.isEmpty {
        let shorter = ClientHelloPeeker.peek(Array(bytes.dropLast()))
        switch (shorter, outcome) {
        case (.needMore, _): break
        case (.notTLS, .notTLS): break
        case (.hello(let a), .hello(let b)): precondition(a == b, "a byte more changed the hello")
        default: preconditionFailure("\(size - 1) bytes: \(shorter), \(size) bytes: \(outcome)")
        }
    }
    if case .hello = outcome {
        precondition(ClientHelloPeeker.peek(bytes + [0x16, 0x03, 0x01, 0x00, 0x00, 0x17, 0xFF]) == outcome,
                     "bytes after the hello changed it")
    }
    return 0
}

let wrapSelector: UInt8 = 0x2A

/// Peeks both ways, checks the values, returns the answer.
@discardableResult
private func check(_ bytes: [UInt8]) -> ClientHelloPeek {
    let outcome = ClientHelloPeeker.peek(bytes)
    let raw = bytes.withUnsafeBytes { ClientHelloPeeker.peek($0) }
    precondition(outcome == raw, "array and raw-buffer entry points disagree")
    guard case .hello(let info) = outcome else { return outcome }
    let names: Set<String> = ["", "SSLv2", "SSLv3", "TLSv1", "TLSv1.1", "TLSv1.2", "TLSv1.3"]
    precondition(names.contains(info.protocolVersion), "protocol \(info.protocolVersion)")
    precondition(names.contains(info.nginxProtocolVersion), "nginx protocol \(info.nginxProtocolVersion)")
    precondition(info.protocolVersion == ClientHelloPeeker.protocolName(info.legacyVersion)
                 || info.supportedVersions?.contains { ClientHelloPeeker.protocolName($0) == info.protocolVersion } == true,
                 "protocol \(info.protocolVersion) neither legacy nor offered")
    precondition(info.serverName.unicodeScalars.allSatisfy { $0.value <= 0xFF }, "SNI not Latin-1")
    precondition(info.serverNameBytes.count == info.serverName.unicodeScalars.count, "SNI bytes")
    precondition(info.serverNameBytes.count <= bytes.count, "SNI longer than the input")
    for name in info.alpnProtocols {
        precondition(!name.isEmpty && name.unicodeScalars.count <= 255, "ALPN name of \(name.unicodeScalars.count)")
        precondition(name.unicodeScalars.allSatisfy { $0.value <= 0xFF }, "ALPN not Latin-1")
    }
    let joined = info.alpnProtocols.reduce(0) { $0 + $1.unicodeScalars.count } + max(info.alpnProtocols.count - 1, 0)
    precondition(info.alpnProtocolsValue.count == joined, "ALPN value length")
    return outcome
}

/// First byte: bits 0-5 the record size - 1 (1…64), bit 6 an empty record before each,
/// bit 7 record versions 3.0…3.3 in turn (else 3.1). The rest: the handshake bytes.
private func checkWrappings(_ input: [UInt8]) {
    guard let flags = input.first else { return }
    let message = Array(input.dropFirst())
    guard !message.isEmpty, message.count <= ClientHelloPeeker.maximumRecordLength else { return }
    let whole = check(record(message, version: 1))
    let size = Int(flags & 0x3F) + 1
    var fragmented: [UInt8] = []
    var index = 0
    for start in stride(from: 0, to: message.count, by: size) {
        let version: UInt8 = flags & 0x80 != 0 ? UInt8(index % 4) : 1
        if flags & 0x40 != 0 { fragmented += record([], version: version) }
        fragmented += record(Array(message[start..<min(start + size, message.count)]), version: version)
        index += 1
    }
    let split = check(fragmented)
    precondition(split == whole, "records of \(size): \(split), one record: \(whole)")
    // Whatever follows the message's last record cannot change a decided answer.
    if whole != .needMore {
        precondition(check(fragmented + record([0xFF], version: 1, type: 0x17)) == whole, "a record after changed it")
    }
}

private func record(_ payload: [UInt8], version: UInt8, type: UInt8 = 0x16) -> [UInt8] {
    [type, 0x03, version, UInt8(payload.count >> 8), UInt8(payload.count & 0xFF)] + payload
}
