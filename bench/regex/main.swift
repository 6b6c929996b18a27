// The map-regex engine against Swift's Regex (the matcher it replaced), release build.
// Run: bash bench/regex.sh   (compiles Sources/PortcullisPolicy/Regex/*.swift with this file)

func nanoseconds(_ duration: Duration) -> Double {
    Double(duration.components.seconds) * 1e9 + Double(duration.components.attoseconds) / 1e9
}

/// Best of five runs of `body` (which does `count` matches), in ns per match.
func measure(_ count: Int, _ body: () -> Int) -> (Double, Int) {
    var best = Double.infinity
    var found = 0
    for _ in 0..<5 {
        let start = ContinuousClock.now
        found = body()
        best = min(best, nanoseconds(ContinuousClock.now - start) / Double(count))
    }
    return (best, found)
}

func format(_ value: Double) -> String {
    let rounded = (value * 10).rounded() / 10
    return String(rounded)
}

let sni = #"^(?<sub>[^.]+)\.example\.com$"#
let keys = (0..<1_000).map { i in i % 4 == 3 ? "host-\(i).other-domain.org" : "service-\(i)-eu.example.com" }
let keyBytes = keys.map { Array($0.utf8) }
let averageLength = Double(keyBytes.reduce(0) { $0 + $1.count }) / Double(keys.count)
let program = try RegexProgram(pattern: sni, caseInsensitive: false)
let swiftRegex = try Regex(sni).matchingSemantics(.unicodeScalar)
let rounds = 200

print("SNI-style pattern \(sni), \(keys.count) keys of \(format(averageLength)) bytes on average, 3 in 4 matching")
let (ours, oursFound) = measure(keys.count * rounds) {
    var found = 0
    for _ in 0..<rounds {
        for bytes in keyBytes where bytes.withUnsafeBufferPointer({ PikeVM.search(program, in: $0, encoding: .utf8) }) != nil { found += 1 }
    }
    return found
}
let (theirs, theirsFound) = measure(keys.count * rounds) {
    var found = 0
    for _ in 0..<rounds {
        for key in keys where (try? swiftRegex.firstMatch(in: key)) != nil { found += 1 }
    }
    return found
}
precondition(oursFound == theirsFound)
print("  Pike VM:     \(format(ours)) ns/match (\(format(averageLength / ours * 1000)) MB/s)")
print("  Swift Regex: \(format(theirs)) ns/match (\(format(averageLength / theirs * 1000)) MB/s)")

print("Hostile keys (one match each):")
for (pattern, subject) in [
    ("(.*a){20}", String(repeating: "a", count: 33)),
    ("(.*a){20}", String(repeating: "a", count: 50_000) + "b"),
    ("a*a*a*a*a*b", String(repeating: "a", count: 50_000)),
    ("(a+)+$", String(repeating: "a", count: 50_000) + "!"),
    ("(x+x+)+y", String(repeating: "x", count: 50_000)),
    // The worst case left: a program near the 10,000-instruction cap, every state live, 64 KiB.
    ("(.*a){1600}", String(repeating: "a", count: 65_536)),
] {
    let compiled = try RegexProgram(pattern: pattern, caseInsensitive: false)
    let bytes = Array(subject.utf8)
    let size = compiled.instructions.count
    let start = ContinuousClock.now
    let matched = bytes.withUnsafeBufferPointer { PikeVM.search(compiled, in: $0, encoding: .utf8) } != nil
    let elapsed = nanoseconds(ContinuousClock.now - start) / 1e6
    print("  \(pattern) (\(size) instructions) on \(bytes.count) bytes: \(format(elapsed)) ms, \(matched ? "match" : "no match")")
}
