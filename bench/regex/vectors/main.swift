// Writes random map-regex vectors (FLAGS, PATTERN, SUBJECT, the engine's answer) in the format
// of Tests/Fixtures/regex/pcre2-vectors.tsv; bench/regex/pcre2-check.c then checks every answer
// against PCRE2. The fixture is this with 1500 (and its three comment lines):
//   swiftc -O Sources/PortcullisPolicy/Regex/*.swift Tests/PortcullisTestSupport/SplitMix64.swift \
//     bench/regex/vectors/main.swift -o /tmp/vectors
//   /tmp/vectors 1500 > vectors.tsv && /tmp/pcre2-check < vectors.tsv
func gen(_ rng: inout SplitMix64, depth: Int) -> String {
  let atoms = ["a", "b", "c", ".", "[ab]", "[^a]", "\\b", "^", "$", "a", "b", "", "\\w", "\\s", "[a-c]", "\\B", "\\Z", "\\z", "\\n", "(?i)a", "[[:alpha:]]", "\\d"]
  let r = Int.random(in: 0..<10, using: &rng)
  if depth <= 0 || r < 3 { return atoms.randomElement(using: &rng)! }
  switch r {
  case 3, 4: return gen(&rng, depth: depth - 1) + gen(&rng, depth: depth - 1)
  case 5: return gen(&rng, depth: depth - 1) + "|" + gen(&rng, depth: depth - 1)
  case 6: return "(" + gen(&rng, depth: depth - 1) + ")"
  case 7: return "(?:" + gen(&rng, depth: depth - 1) + ")"
  default:
    let inner = "(" + gen(&rng, depth: depth - 1) + ")"
    let q = ["*", "+", "?", "{2}", "{1,3}", "{0,2}", "{2,}", "*?", "+?", "??", "{1,2}?"].randomElement(using: &rng)!
    return inner + q
  }
}
func caps(_ prog: RegexProgram, _ s: String) -> [String?]? {
  let bytes = Array(s.utf8)
  guard let r = bytes.withUnsafeBufferPointer({ PikeVM.search(prog, in: $0, encoding: .utf8) }) else { return nil }
  return (0...prog.groupCount).map { g in r[2*g] < 0 ? nil : String(decoding: bytes[r[2*g]..<r[2*g+1]], as: UTF8.self) }
}


var rng = SplitMix64(seed: 2026)
func enc(_ s: String) -> String { s.unicodeScalars.map { $0 == "\n" ? "\\n" : String($0) }.joined() }
for _ in 0..<Int(CommandLine.arguments[1])! {
  let p = gen(&rng, depth: 4)
  let ci = Int.random(in: 0..<6, using: &rng) == 0
  guard let prog = try? RegexProgram(pattern: p, caseInsensitive: ci) else { continue }
  for _ in 0..<2 {
    let alphabet = Array("abcA \n1")
    let n = Int.random(in: 0...8, using: &rng)
    let s = String((0..<n).map { _ in alphabet[Int.random(in: 0..<alphabet.count, using: &rng)] })
    let mine = caps(prog, s)
    let out = mine.map { $0.map { $0.map { "[" + enc($0) + "]" } ?? "nil" }.joined(separator: " ") } ?? "no"
    print((ci ? "~*" : "~") + "\t" + p + "\t" + enc(s) + "\t" + out)
  }
}
