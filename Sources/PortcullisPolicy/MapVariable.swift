/// A compiled `map SRC $var { … }` block: nginx's `ngx_stream_map_module`.
///
/// Order of matching, as nginx: the exact string (case-insensitive); with `hostnames`, the
/// longest prefix mask (`*.example.com`, `.example.com`), then the longest suffix mask
/// (`www.example.*`); then the regular expressions in file order (`~` case-sensitive, `~*`
/// not), whose captures the value may use as `$1`…`$9` or `$name`; then `default` (else "").
public struct MapVariable: Sendable {
    public var source: LogTemplate
    /// Every value template; entries point into this array.
    public var values: [LogTemplate]
    var exact: [String: Int]
    let hostnames: Bool
    /// `*.example.com` → ".example.com" (subdomains only); `.example.com` → ".example.com"
    /// with `includesBare` (example.com itself too). Keys lowercased.
    var prefixMasks: [String: (value: Int, includesBare: Bool)]
    /// `www.example.*` → "www.example." (lowercased).
    var suffixMasks: [String: Int]
    var regexes: [MapRegex]
    var defaultValue: Int?

    public init(source: LogTemplate, hostnames: Bool) {
        self.source = source
        self.hostnames = hostnames
        values = []
        exact = [:]
        prefixMasks = [:]
        suffixMasks = [:]
        regexes = []
    }

    /// The entry that matches `key`, and the regex match if a regex decided.
    func match(_ key: String) -> (value: Int, captures: MapRegex.Captures?)? {
        var key = key
        if hostnames, key.hasSuffix(".") { key.removeLast() }
        let lowered = key.lowercased()
        if let value = exact[lowered] { return (value, nil) }
        if hostnames {
            if let mask = prefixMasks["." + lowered], mask.includesBare { return (mask.value, nil) }
            // Longest first: the suffix after the first dot is the longest candidate.
            var index = lowered.startIndex
            while let dot = lowered[index...].firstIndex(of: ".") {
                if let mask = prefixMasks[String(lowered[dot...])] { return (mask.value, nil) }
                index = lowered.index(after: dot)
            }
            var end = lowered.endIndex
            while let dot = lowered[..<end].lastIndex(of: ".") {
                if let value = suffixMasks[String(lowered[...dot])] { return (value, nil) }
                end = dot
            }
        }
        for regex in regexes {
            if let captures = regex.firstMatch(in: key) { return (regex.value, captures) }
        }
        return defaultValue.map { ($0, nil) }
    }

    func value(for key: [UInt8], record: SessionRecord, host: HostFacts) -> [UInt8] {
        guard let (index, captures) = match(String(decoding: key, as: UTF8.self)) else { return [] }
        let template = values[index]
        guard let captures else { return template.bytes(for: record, host: host) }
        var out: [UInt8] = []
        for part in template.parts {
            switch part {
            case .literal(let text): out += Array(text.utf8)
            case .variable(.capture(let n)): out += captures.numbered(n)
            case .variable(.namedCapture(let index)): out += captures.named(captures.names[index])
            case .variable(let variable): out += VariableRenderer.value(of: variable, in: record, host: host) ?? []
            }
        }
        return out
    }
}

/// One `~regex value;` entry of a map. Swift's `Regex` with Unicode-scalar semantics; its
/// syntax is Perl-compatible for everything an nginx operator commonly writes (classes,
/// anchors, alternation, quantifiers, `(?<name>…)`, `(?:…)`, `\d`, `\w`, `\s`, `\b`).
struct MapRegex: @unchecked Sendable {
    // Regex is immutable and safe to match from any thread; it is not declared Sendable.
    let regex: Regex<AnyRegexOutput>
    let pattern: String
    let value: Int
    /// Named groups, as written in the pattern.
    let names: [String]

    struct Captures {
        let match: Regex<AnyRegexOutput>.Match
        let names: [String]

        func numbered(_ n: Int) -> [UInt8] {
            guard n < match.output.count, let text = match.output[n].substring else { return [] }
            return Array(text.utf8)
        }

        func named(_ name: String) -> [UInt8] {
            guard let text = match.output[name]?.substring else { return [] }
            return Array(text.utf8)
        }
    }

    init(pattern: String, caseInsensitive: Bool, value: Int) throws {
        var regex = try Regex(pattern).matchingSemantics(.unicodeScalar)
        if caseInsensitive { regex = regex.ignoresCase() }
        self.regex = regex
        self.pattern = pattern
        self.value = value
        self.names = Self.groupNames(in: pattern)
    }

    func firstMatch(in key: String) -> Captures? {
        guard let match = try? regex.firstMatch(in: key) else { return nil }
        return Captures(match: match, names: names)
    }

    /// Swift's `Regex` backtracks without a step limit (PCRE, in nginx, stops at a match
    /// limit), and a map's source can be client-chosen (a PROXY TLV, an SNI name). So a pattern
    /// that can take exponential time is refused at compile time: a group repeated without bound
    /// (`*`, `+`, `{n,}`) that itself contains an unbounded repetition or an alternation, such as
    /// `(a+)+`, `(\w*\s?)*` or `(a|ab)+`. Returns the offending group, or nil.
    static func exponentialRisk(in pattern: String) -> String? {
        let chars = Array(pattern)
        struct Group { var start: Int; var unbounded = false; var alternation = false }
        var stack = [Group(start: 0)]
        var i = 0
        // After an atom at `i`, an unbounded quantifier? (Returns the index after it.)
        func unboundedQuantifier(at j: Int) -> Bool {
            guard j < chars.count else { return false }
            if chars[j] == "*" || chars[j] == "+" { return true }
            guard chars[j] == "{", let close = chars[j...].firstIndex(of: "}") else { return false }
            let body = String(chars[(j + 1)..<close])
            return body.hasSuffix(",") && Int(body.dropLast()) != nil
        }
        while i < chars.count {
            switch chars[i] {
            case "\\":
                i += 2
                if unboundedQuantifier(at: i) { stack[stack.count - 1].unbounded = true }
                continue
            case "[":
                var j = i + 1
                if j < chars.count && chars[j] == "^" { j += 1 }
                if j < chars.count && chars[j] == "]" { j += 1 }
                while j < chars.count && chars[j] != "]" { j += chars[j] == "\\" ? 2 : 1 }
                i = j + 1
                if unboundedQuantifier(at: i) { stack[stack.count - 1].unbounded = true }
                continue
            case "(":
                stack.append(Group(start: i))
            case "|":
                stack[stack.count - 1].alternation = true
            case ")":
                guard stack.count > 1 else { break }
                let group = stack.removeLast()
                if unboundedQuantifier(at: i + 1) {
                    if group.unbounded || group.alternation { return String(chars[group.start...i]) + String(chars[i + 1]) }
                    stack[stack.count - 1].unbounded = true
                } else if group.unbounded {
                    stack[stack.count - 1].unbounded = true
                }
            default:
                if unboundedQuantifier(at: i + 1) { stack[stack.count - 1].unbounded = true }
            }
            i += 1
        }
        return nil
    }

    /// `(?<name>`, `(?P<name>` and `(?'name'` groups.
    static func groupNames(in pattern: String) -> [String] {
        var names: [String] = []
        let chars = Array(pattern)
        var i = 0
        while i < chars.count {
            if chars[i] == "\\" { i += 2; continue }
            if chars[i] == "(", i + 2 < chars.count, chars[i + 1] == "?" {
                var j = i + 2
                if j < chars.count, chars[j] == "P" { j += 1 }
                if j < chars.count, chars[j] == "<" || chars[j] == "'", j + 1 < chars.count,
                   chars[j + 1] != "=", chars[j + 1] != "!" {
                    let close: Character = chars[j] == "<" ? ">" : "'"
                    var k = j + 1
                    var name = ""
                    while k < chars.count, chars[k] != close { name.append(chars[k]); k += 1 }
                    if !name.isEmpty { names.append(name) }
                }
            }
            i += 1
        }
        return names
    }
}
