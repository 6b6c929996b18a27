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
        guard !regexes.isEmpty else { return defaultValue.map { ($0, nil) } }
        let subject = Array(key.utf8)  // once, for every regex entry
        for regex in regexes {
            if let captures = regex.firstMatch(utf8: subject) { return (regex.value, captures) }
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
            case .variable(let variable): out += VariableRenderer.value(of: variable, in: record, host: host) ?? []
            }
        }
        return out
    }
}

/// One `~regex value;` entry of a map, or a health check's `expect ~regex`: PCRE syntax run
/// by a linear-time Pike VM (`Regex/`, decision 0016), so a client-chosen key (an SNI name, a
/// PROXY TLV) cannot make a match take exponential time. Map keys are matched as UTF-8 (`.`
/// and classes take a whole scalar).
struct MapRegex: Sendable {
    let program: RegexProgram
    let value: Int

    struct Captures {
        /// The subject's bytes and the match's slots (byte offsets; -1 unset).
        let subject: [UInt8]
        let slots: [Int]

        func numbered(_ n: Int) -> [UInt8] {
            guard n >= 0, 2 * n + 1 < slots.count else { return [] }
            let start = slots[2 * n], end = slots[2 * n + 1]
            guard start >= 0, end >= start else { return [] }
            return Array(subject[start..<end])
        }
    }

    init(pattern: String, caseInsensitive: Bool, value: Int) throws(RegexSyntaxError) {
        program = try RegexProgram(pattern: pattern, caseInsensitive: caseInsensitive)
        self.value = value
    }

    /// The number of the group `(?<name>…)`, for the compiler: a `map` value refers to it.
    func groupNumber(named name: String) -> Int? {
        program.names.first { $0.name == name }?.index
    }

    func firstMatch(in key: String) -> Captures? {
        firstMatch(utf8: Array(key.utf8))
    }

    func firstMatch(utf8 subject: [UInt8]) -> Captures? {
        guard let slots = subject.withUnsafeBufferPointer({ PikeVM.search(program, in: $0, encoding: .utf8) }) else { return nil }
        return Captures(subject: subject, slots: slots)
    }

    /// Whether the bytes, one character each (Latin-1), contain a match; captures are not kept.
    func matches(latin1 subject: [UInt8]) -> Bool {
        subject.withUnsafeBufferPointer { PikeVM.search(program, in: $0, encoding: .latin1, captures: false) } != nil
    }
}
