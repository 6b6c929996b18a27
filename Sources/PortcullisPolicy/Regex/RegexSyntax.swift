/// The regular-expression syntax of `map` keys and health-check `expect ~`: PCRE's, as nginx
/// compiles it, minus what needs backtracking. Parsed into a tree that `RegexProgram` compiles
/// for the Pike VM (decision 0016).
///
/// Supported: literals and escapes (`\t \n \r \f \e \a \0`, `\xHH`, `\x{H…}`, `\o{…}`, `\cX`,
/// `\Q…\E`), `.` (not `\n`; any with `(?s)`), classes `[…]` with ranges, negation, escapes and
/// POSIX names (`[[:alpha:]]`), `\d \w \s \h \v \N` and their negations (ASCII, as PCRE without
/// UCP), `\p{…}`/`\P{…}` general categories, groups `(…)`, `(?:…)`, `(?<name>…)`, `(?P<name>…)`,
/// `(?'name'…)`, comments `(?#…)`, options `(?imsx-imsx)` and `(?imsx-imsx:…)`, alternation,
/// greedy and lazy quantifiers `* + ? {n} {n,} {n,m} {,m}`, anchors `^ $ \A \z \Z \G`, `\b \B`.
/// Refused, with a `RegexSyntaxError`: backreferences, lookaround, atomic groups, possessive
/// quantifiers, recursion, conditionals, `\K`, `\X`, `\C`, `\R`, verbs — they need backtracking
/// or are not regular.
struct RegexSyntaxError: Error, CustomStringConvertible, Equatable, Sendable {
    enum Kind: Equatable, Sendable {
        /// Valid PCRE that this engine does not run; `feature` names it.
        case unsupported(feature: String)
        case malformed(String)
        /// The compiled program would exceed `RegexProgram.instructionLimit`.
        case tooLarge(instructions: Int, limit: Int)
    }

    var kind: Kind
    /// Offset in the pattern, in Unicode scalars (0-based).
    var offset: Int

    var description: String {
        switch kind {
        case .unsupported(let feature):
            return "\(feature) at offset \(offset) is not supported (it needs backtracking; the map regex engine runs in linear time)"
        case .malformed(let message):
            return "\(message) at offset \(offset)"
        case .tooLarge(let instructions, let limit):
            return "the pattern compiles to more than \(limit) instructions (\(instructions) so far); reduce the counted repetitions such as {n,m}"
        }
    }
}

/// A set of Unicode scalars: a class, `.`-like escapes, or a case-folded literal.
struct ScalarSet: Sendable, Equatable {
    /// Sorted, non-overlapping, non-adjacent.
    var ranges: [ClosedRange<UInt32>] = []
    /// `\p{…}` items: general categories, each possibly negated (`\P{…}`).
    var categories: [CategoryItem] = []
    var negated = false

    struct CategoryItem: Sendable, Equatable {
        var categories: Set<GeneralCategoryCode>
        var negated: Bool
    }

    /// A general category as a small number (`code(_:)`), so a class's categories are a cheap set.
    typealias GeneralCategoryCode = UInt8

    init() {}

    init(ranges: [ClosedRange<UInt32>], negated: Bool = false) {
        self.ranges = Self.normalized(ranges)
        self.negated = negated
    }

    /// Membership without the ASCII shortcut (the compiled program has one).
    func contains(_ scalar: UInt32) -> Bool {
        var found = false
        var low = 0, high = ranges.count
        while low < high {
            let mid = (low + high) / 2
            if ranges[mid].upperBound < scalar { low = mid + 1 } else { high = mid }
        }
        if low < ranges.count, ranges[low].contains(scalar) { found = true }
        if !found, !categories.isEmpty, let s = Unicode.Scalar(scalar) {
            let code = Self.code(s.properties.generalCategory)
            found = categories.contains { $0.categories.contains(code) != $0.negated }
        }
        return found != negated
    }

    mutating func add(_ range: ClosedRange<UInt32>) { ranges.append(range) }

    mutating func add(_ other: ScalarSet) {
        if other.negated {
            // `\D`-like sets (ranges only) complement into ranges; `\P{…}` (a category only)
            // becomes a negated category item.
            if other.categories.isEmpty {
                ranges += Self.complement(Self.normalized(other.ranges))
            } else {
                categories += other.categories.map { CategoryItem(categories: $0.categories, negated: !$0.negated) }
            }
        } else {
            ranges += other.ranges
            categories += other.categories
        }
    }

    mutating func normalize() { ranges = Self.normalized(ranges) }

    /// Adds the simple case variants of every scalar in a range of moderate size. (Huge ranges,
    /// such as a complemented `\W`, already hold most of their variants.)
    mutating func addCaseVariants() {
        var extra: [ClosedRange<UInt32>] = []
        for range in ranges where range.count <= 0x3000 {
            for scalar in range { for variant in Self.caseVariants(scalar) where variant != scalar { extra.append(variant...variant) } }
        }
        ranges = Self.normalized(ranges + extra)
    }

    static func normalized(_ ranges: [ClosedRange<UInt32>]) -> [ClosedRange<UInt32>] {
        let sorted = ranges.sorted { $0.lowerBound < $1.lowerBound }
        var out: [ClosedRange<UInt32>] = []
        for range in sorted {
            if let last = out.last, range.lowerBound <= last.upperBound &+ 1 {
                out[out.count - 1] = last.lowerBound...max(last.upperBound, range.upperBound)
            } else {
                out.append(range)
            }
        }
        return out
    }

    static func complement(_ ranges: [ClosedRange<UInt32>]) -> [ClosedRange<UInt32>] {
        var out: [ClosedRange<UInt32>] = []
        var next: UInt32 = 0
        for range in ranges {
            if range.lowerBound > next { out.append(next...(range.lowerBound - 1)) }
            next = range.upperBound &+ 1
            if range.upperBound == 0x10FFFF { return out }
        }
        out.append(next...0x10FFFF)
        return out
    }

    /// The scalar and its single-scalar lower, upper and title case mappings.
    static func caseVariants(_ scalar: UInt32) -> [UInt32] {
        if scalar < 0x80 {
            if (0x41...0x5A).contains(scalar) { return [scalar, scalar + 0x20] }
            if (0x61...0x7A).contains(scalar) { return [scalar, scalar - 0x20] }
            return [scalar]
        }
        guard let s = Unicode.Scalar(scalar) else { return [scalar] }
        var out = [scalar]
        let properties = s.properties
        guard properties.changesWhenCaseMapped else { return out }
        for mapping in [properties.lowercaseMapping, properties.uppercaseMapping, properties.titlecaseMapping] {
            let scalars = mapping.unicodeScalars
            if scalars.count == 1, let only = scalars.first, !out.contains(only.value) { out.append(only.value) }
        }
        return out
    }

    static func code(_ category: Unicode.GeneralCategory) -> GeneralCategoryCode {
        switch category {
        case .uppercaseLetter: 0
        case .lowercaseLetter: 1
        case .titlecaseLetter: 2
        case .modifierLetter: 3
        case .otherLetter: 4
        case .nonspacingMark: 5
        case .spacingMark: 6
        case .enclosingMark: 7
        case .decimalNumber: 8
        case .letterNumber: 9
        case .otherNumber: 10
        case .connectorPunctuation: 11
        case .dashPunctuation: 12
        case .openPunctuation: 13
        case .closePunctuation: 14
        case .initialPunctuation: 15
        case .finalPunctuation: 16
        case .otherPunctuation: 17
        case .mathSymbol: 18
        case .currencySymbol: 19
        case .modifierSymbol: 20
        case .otherSymbol: 21
        case .spaceSeparator: 22
        case .lineSeparator: 23
        case .paragraphSeparator: 24
        case .control: 25
        case .format: 26
        case .surrogate: 27
        case .privateUse: 28
        case .unassigned: 29
        @unknown default: 29
        }
    }

    /// PCRE's general-category names (`L`, `Lu`, `L&`, `Any`, …), to category codes.
    static func categories(named name: String) -> Set<GeneralCategoryCode>? {
        let table: [String: [GeneralCategoryCode]] = [
            "Lu": [0], "Ll": [1], "Lt": [2], "Lm": [3], "Lo": [4], "L": [0, 1, 2, 3, 4], "L&": [0, 1, 2], "LC": [0, 1, 2],
            "Mn": [5], "Mc": [6], "Me": [7], "M": [5, 6, 7],
            "Nd": [8], "Nl": [9], "No": [10], "N": [8, 9, 10],
            "Pc": [11], "Pd": [12], "Ps": [13], "Pe": [14], "Pi": [15], "Pf": [16], "Po": [17], "P": Array(11...17),
            "Sm": [18], "Sc": [19], "Sk": [20], "So": [21], "S": [18, 19, 20, 21],
            "Zs": [22], "Zl": [23], "Zp": [24], "Z": [22, 23, 24],
            "Cc": [25], "Cf": [26], "Cs": [27], "Co": [28], "Cn": [29], "C": [25, 26, 27, 28, 29],
            "Any": Array(0...29),
        ]
        return table[name].map(Set.init)
    }
}

enum RegexAssertion: Sendable, Equatable {
    /// `^`: start of the subject; with `(?m)` also after an internal `\n`.
    case lineStart(multiline: Bool)
    /// `$`: end, or before a final `\n`; with `(?m)` also before any `\n`.
    case lineEnd(multiline: Bool)
    /// `\A` (and `\G`, which is the same for a single match from offset 0).
    case subjectStart
    /// `\z`.
    case subjectEnd
    /// `\Z`: end, or before a final `\n`.
    case subjectEndBeforeNewline
    case wordBoundary
    case notWordBoundary
}

indirect enum RegexNode: Sendable, Equatable {
    case empty
    case scalar(UInt32)
    case set(ScalarSet)
    /// `.`: anything but `\n`, or anything with `dotAll`.
    case any(dotAll: Bool)
    case assertion(RegexAssertion)
    /// `index` nil: a non-capturing group.
    case group(RegexNode, index: Int?)
    case concat([RegexNode])
    case alternation([RegexNode])
    case repetition(RegexNode, min: Int, max: Int?, greedy: Bool)

    /// Can it match the empty string?
    var isNullable: Bool {
        switch self {
        case .empty, .assertion: true
        case .scalar, .set, .any: false
        case .group(let node, _): node.isNullable
        case .concat(let nodes): nodes.allSatisfy(\.isNullable)
        case .alternation(let nodes): nodes.contains(where: \.isNullable)
        case .repetition(let node, let min, _, _): min == 0 || node.isNullable
        }
    }

    /// Does every match start at offset 0 (`^`, `\A`)?
    var isAnchoredAtStart: Bool {
        switch self {
        case .assertion(.lineStart(multiline: false)), .assertion(.subjectStart): true
        case .group(let node, _): node.isAnchoredAtStart
        case .concat(let nodes):
            nodes.first { !($0 == .empty) }?.isAnchoredAtStart ?? false
        case .alternation(let nodes): !nodes.isEmpty && nodes.allSatisfy(\.isAnchoredAtStart)
        case .repetition(let node, let min, _, _): min > 0 && node.isAnchoredAtStart
        default: false
        }
    }
}

/// The parsed pattern.
struct RegexSyntax: Sendable {
    var root: RegexNode
    /// Capturing groups, numbered from 1.
    var groupCount: Int
    /// Named groups as written, with their numbers, in pattern order.
    var names: [(name: String, index: Int)]

    init(pattern: String, caseInsensitive: Bool) throws(RegexSyntaxError) {
        var parser = RegexParser(pattern: Array(pattern.unicodeScalars).map(\.value))
        var flags = RegexParser.Flags(caseInsensitive: caseInsensitive)
        root = try parser.parseAlternation(flags: &flags, depth: 0)
        if parser.position < parser.pattern.count {
            throw RegexSyntaxError(kind: .malformed("unmatched closing parenthesis"), offset: parser.position)
        }
        groupCount = parser.groupCount
        names = parser.names
    }
}

struct RegexParser {
    struct Flags {
        var caseInsensitive = false
        var multiline = false
        var dotAll = false
        var extended = false
    }

    let pattern: [UInt32]
    var position = 0
    var groupCount = 0
    var names: [(name: String, index: Int)] = []
    /// The characters of a `\Q…\E` before its last, which `parseAtom` returns.
    private var quoted: [RegexNode] = []

    init(pattern: [UInt32]) { self.pattern = pattern }

    /// Deep nesting would overflow the parser's (and compiler's) stack.
    static let depthLimit = 250

    private var atEnd: Bool { position >= pattern.count }
    private var current: UInt32? { atEnd ? nil : pattern[position] }
    private func peek(_ ahead: Int) -> UInt32? { position + ahead < pattern.count ? pattern[position + ahead] : nil }

    private func fail(_ message: String, at offset: Int? = nil) -> RegexSyntaxError {
        RegexSyntaxError(kind: .malformed(message), offset: offset ?? position)
    }

    private func unsupported(_ feature: String, at offset: Int) -> RegexSyntaxError {
        RegexSyntaxError(kind: .unsupported(feature: feature), offset: offset)
    }

    private static func char(_ c: Character) -> UInt32 { c.unicodeScalars.first!.value }

    mutating func parseAlternation(flags: inout Flags, depth: Int) throws(RegexSyntaxError) -> RegexNode {
        if depth > Self.depthLimit { throw fail("parentheses nested more than \(Self.depthLimit) deep") }
        var branches: [RegexNode] = [try parseConcat(flags: &flags, depth: depth)]
        while current == Self.char("|") {
            position += 1
            branches.append(try parseConcat(flags: &flags, depth: depth))
        }
        return branches.count == 1 ? branches[0] : .alternation(branches)
    }

    private mutating func skipExtendedSpace(_ flags: Flags) {
        guard flags.extended else { return }
        while let c = current {
            if c == 0x20 || (0x09...0x0D).contains(c) { position += 1; continue }
            if c == Self.char("#") {
                while let d = current, d != 0x0A { position += 1 }
                continue
            }
            break
        }
    }

    mutating func parseConcat(flags: inout Flags, depth: Int) throws(RegexSyntaxError) -> RegexNode {
        var items: [RegexNode] = []
        while true {
            skipExtendedSpace(flags)
            guard let c = current, c != Self.char("|"), c != Self.char(")") else { break }
            let start = position
            guard let atom = try parseAtom(flags: &flags, depth: depth) else { continue }
            items += quoted
            quoted = []
            skipExtendedSpace(flags)
            items.append(try parseQuantifiers(atom, start: start, flags: flags))
        }
        switch items.count {
        case 0: return .empty
        case 1: return items[0]
        default: return .concat(items)
        }
    }

    /// Quantifiers after an atom (several in a row nest, as PCRE: `a{2}{3}` is six).
    private mutating func parseQuantifiers(_ atom: RegexNode, start: Int, flags: Flags) throws(RegexSyntaxError) -> RegexNode {
        var node = atom
        while let c = current {
            let quantifierStart = position
            var bounds: (Int, Int?)
            switch c {
            case Self.char("*"): bounds = (0, nil); position += 1
            case Self.char("+"): bounds = (1, nil); position += 1
            case Self.char("?"): bounds = (0, 1); position += 1
            case Self.char("{"):
                guard let counted = parseCountedBounds() else { return node }
                bounds = counted
            default: return node
            }
            if let max = bounds.1, max < bounds.0 {
                throw fail("numbers out of order in {} quantifier", at: quantifierStart)
            }
            var greedy = true
            if current == Self.char("?") { greedy = false; position += 1 }
            else if current == Self.char("+") { throw unsupported("a possessive quantifier", at: position) }
            if case .assertion = node {
                // PCRE allows a quantified assertion; it is the assertion or nothing.
                node = bounds.0 == 0 ? .empty : node
            } else if node == .empty {
                node = .empty
            } else {
                node = .repetition(node, min: bounds.0, max: bounds.1, greedy: greedy)
            }
            skipExtendedSpace(flags)
        }
        return node
    }

    /// `{n}`, `{n,}`, `{n,m}`, `{,m}`; nil (position unchanged) when the brace is a literal.
    private mutating func parseCountedBounds() -> (Int, Int?)? {
        var i = position + 1
        // Digits at i: (value or nil if none, too big).
        func number() -> (Int?, Bool) {
            var value: Int?
            while i < pattern.count, (0x30...0x39).contains(pattern[i]) {
                value = (value ?? 0) * 10 + Int(pattern[i] - 0x30)
                if value! > 65_535 { return (value, true) }
                i += 1
            }
            return (value, false)
        }
        let (low, lowTooBig) = number()
        guard !lowTooBig, i < pattern.count else { return nil }
        if pattern[i] == Self.char("}") {
            guard let low else { return nil }
            position = i + 1
            return (low, low)
        }
        guard pattern[i] == Self.char(",") else { return nil }
        i += 1
        let (high, highTooBig) = number()
        guard !highTooBig, i < pattern.count, pattern[i] == Self.char("}"), low != nil || high != nil else { return nil }
        position = i + 1
        return (low ?? 0, high)
    }

    /// One atom; nil for something that matches nothing and takes no quantifier (`(?i)`, `(?#…)`, `\Q\E`).
    private mutating func parseAtom(flags: inout Flags, depth: Int) throws(RegexSyntaxError) -> RegexNode? {
        let start = position
        let c = pattern[position]
        position += 1
        switch c {
        case Self.char("("):
            return try parseGroup(start: start, flags: &flags, depth: depth)
        case Self.char("["):
            return .set(try parseClass(flags: flags, start: start))
        case Self.char("."):
            return .any(dotAll: flags.dotAll)
        case Self.char("^"):
            return .assertion(.lineStart(multiline: flags.multiline))
        case Self.char("$"):
            return .assertion(.lineEnd(multiline: flags.multiline))
        case Self.char("*"), Self.char("+"), Self.char("?"):
            throw fail("quantifier does not follow a repeatable item", at: start)
        case Self.char("{"):
            position = start
            if parseCountedBounds() != nil { throw fail("quantifier does not follow a repeatable item", at: start) }
            position = start + 1
            return literal(c, flags)
        case Self.char("\\"):
            return try parseEscape(start: start, flags: flags)
        default:
            return literal(c, flags)
        }
    }

    private func literal(_ scalar: UInt32, _ flags: Flags) -> RegexNode {
        guard flags.caseInsensitive else { return .scalar(scalar) }
        let variants = ScalarSet.caseVariants(scalar)
        if variants.count == 1 { return .scalar(scalar) }
        return .set(ScalarSet(ranges: variants.map { $0...$0 }))
    }

    private mutating func parseGroup(start: Int, flags: inout Flags, depth: Int) throws(RegexSyntaxError) -> RegexNode? {
        if current == Self.char("*") { throw unsupported("a backtracking control verb \"(*…)\"", at: start) }
        guard current == Self.char("?") else {
            groupCount += 1
            let index = groupCount
            return .group(try groupBody(start: start, flags: flags, depth: depth), index: index)
        }
        position += 1
        guard let c = current else { throw fail("missing ) after (?", at: start) }
        switch c {
        case Self.char(":"):
            position += 1
            return .group(try groupBody(start: start, flags: flags, depth: depth), index: nil)
        case Self.char("#"):
            while let d = current, d != Self.char(")") { position += 1 }
            guard !atEnd else { throw fail("missing ) after (?# comment", at: start) }
            position += 1
            return nil
        case Self.char("="), Self.char("!"):
            throw unsupported("a lookahead assertion", at: start)
        case Self.char(">"):
            throw unsupported("an atomic group", at: start)
        case Self.char("|"):
            throw unsupported("a branch-reset group", at: start)
        case Self.char("("):
            throw unsupported("a conditional group", at: start)
        case Self.char("R"), Self.char("&"), Self.char("+"):
            throw unsupported("recursion or a subroutine call", at: start)
        case let digit where (0x30...0x39).contains(digit):
            throw unsupported("recursion or a subroutine call", at: start)
        case Self.char("-") where peek(1).map({ (0x30...0x39).contains($0) }) ?? false:
            throw unsupported("recursion or a subroutine call", at: start)
        case Self.char("P") where peek(1) == Self.char("="):
            throw unsupported("a backreference", at: start)
        case Self.char("P") where peek(1) == Self.char(">"):
            throw unsupported("recursion or a subroutine call", at: start)
        case Self.char("<") where peek(1) == Self.char("=") || peek(1) == Self.char("!"):
            throw unsupported("a lookbehind assertion", at: start)
        case Self.char("<"), Self.char("'"), Self.char("P"):
            if c == Self.char("P") {
                position += 1
                guard current == Self.char("<") else { throw fail("unrecognized character after (?P", at: start) }
            }
            let close = current == Self.char("'") ? Self.char("'") : Self.char(">")
            position += 1
            let nameStart = position
            var name = ""
            while let d = current, d != close {
                guard let s = Unicode.Scalar(d), s == "_" || (s.isASCII && (s.properties.isAlphabetic || (0x30...0x39).contains(d))) else {
                    throw fail("group name must contain only letters, digits and underscores", at: position)
                }
                name.unicodeScalars.append(s)
                position += 1
            }
            guard !atEnd else { throw fail("missing terminator for the group name", at: nameStart) }
            guard let first = name.unicodeScalars.first, !(0x30...0x39).contains(first.value) else {
                throw fail("group name must start with a letter or underscore", at: nameStart)
            }
            if names.contains(where: { $0.name == name }) {
                throw fail("two named groups have the same name \"\(name)\"", at: nameStart)
            }
            position += 1
            groupCount += 1
            let index = groupCount
            names.append((name, index))
            return .group(try groupBody(start: start, flags: flags, depth: depth), index: index)
        default:
            // Options: (?imsx-imsx) for the rest of the group, or (?imsx-imsx:…) for the inside.
            var changed = flags
            var on = true
            while let d = current, d != Self.char(")"), d != Self.char(":") {
                switch d {
                case Self.char("i"): changed.caseInsensitive = on
                case Self.char("m"): changed.multiline = on
                case Self.char("s"): changed.dotAll = on
                case Self.char("x"): changed.extended = on
                case Self.char("-") where on: on = false
                default:
                    let s = Unicode.Scalar(d).map { String($0) } ?? "?"
                    throw fail("unrecognized character \"\(s)\" after (? or (?-", at: position)
                }
                position += 1
            }
            guard let end = current else { throw fail("missing ) after (?", at: start) }
            position += 1
            if end == Self.char(")") {
                flags = changed
                return nil
            }
            return .group(try groupBody(start: start, flags: changed, depth: depth), index: nil)
        }
    }

    private mutating func groupBody(start: Int, flags: Flags, depth: Int) throws(RegexSyntaxError) -> RegexNode {
        var inner = flags
        let body = try parseAlternation(flags: &inner, depth: depth + 1)
        guard current == Self.char(")") else { throw fail("missing closing parenthesis", at: start) }
        position += 1
        return body
    }

    /// After a backslash outside a class.
    private mutating func parseEscape(start: Int, flags: Flags) throws(RegexSyntaxError) -> RegexNode? {
        guard let c = current else { throw fail("\\ at end of pattern", at: start) }
        switch c {
        case Self.char("A"), Self.char("G"): position += 1; return .assertion(.subjectStart)
        case Self.char("z"): position += 1; return .assertion(.subjectEnd)
        case Self.char("Z"): position += 1; return .assertion(.subjectEndBeforeNewline)
        case Self.char("b"): position += 1; return .assertion(.wordBoundary)
        case Self.char("B"): position += 1; return .assertion(.notWordBoundary)
        case Self.char("N") where peek(1) != Self.char("{"): position += 1; return .any(dotAll: false)
        case Self.char("Q"):
            position += 1
            var items: [RegexNode] = []
            while let d = current {
                if d == Self.char("\\"), peek(1) == Self.char("E") { position += 2; break }
                items.append(literal(d, flags))
                position += 1
            }
            // A quantifier after \E takes the last character only, as in PCRE.
            guard let last = items.popLast() else { return nil }
            quoted = items
            return last
        case Self.char("E"): position += 1; return nil
        case let digit where (0x31...0x39).contains(digit):
            throw unsupported("a backreference", at: start)
        case Self.char("g"), Self.char("k"):
            throw unsupported("a backreference", at: start)
        case Self.char("K"): throw unsupported("\\K (reset match start)", at: start)
        case Self.char("X"): throw unsupported("\\X (extended grapheme cluster)", at: start)
        case Self.char("C"): throw unsupported("\\C (single code unit)", at: start)
        case Self.char("R"): throw unsupported("\\R (newline sequence, an atomic group)", at: start)
        default:
            if let set = try parseClassEscape(start: start, flags: flags) { return .set(set) }
            return literal(try parseScalarEscape(start: start), flags)
        }
    }

    /// `\d \D \w \W \s \S \h \H \v \V \p{…} \P{…}`, or nil (position unchanged).
    private mutating func parseClassEscape(start: Int, flags: Flags) throws(RegexSyntaxError) -> ScalarSet? {
        guard let c = current else { return nil }
        let digit: [ClosedRange<UInt32>] = [0x30...0x39]
        let word: [ClosedRange<UInt32>] = [0x30...0x39, 0x41...0x5A, 0x5F...0x5F, 0x61...0x7A]
        let space: [ClosedRange<UInt32>] = [0x09...0x0D, 0x20...0x20]
        let horizontal: [ClosedRange<UInt32>] = [0x09...0x09, 0x20...0x20, 0xA0...0xA0, 0x1680...0x1680, 0x180E...0x180E,
                                                 0x2000...0x200A, 0x202F...0x202F, 0x205F...0x205F, 0x3000...0x3000]
        let vertical: [ClosedRange<UInt32>] = [0x0A...0x0D, 0x85...0x85, 0x2028...0x2029]
        let set: ScalarSet
        switch c {
        case Self.char("d"): set = ScalarSet(ranges: digit)
        case Self.char("D"): set = ScalarSet(ranges: digit, negated: true)
        case Self.char("w"): set = ScalarSet(ranges: word)
        case Self.char("W"): set = ScalarSet(ranges: word, negated: true)
        case Self.char("s"): set = ScalarSet(ranges: space)
        case Self.char("S"): set = ScalarSet(ranges: space, negated: true)
        case Self.char("h"): set = ScalarSet(ranges: horizontal)
        case Self.char("H"): set = ScalarSet(ranges: horizontal, negated: true)
        case Self.char("v"): set = ScalarSet(ranges: vertical)
        case Self.char("V"): set = ScalarSet(ranges: vertical, negated: true)
        case Self.char("p"), Self.char("P"):
            position += 1
            var name = ""
            var negated = c == Self.char("P")
            if current == Self.char("{") {
                position += 1
                if current == Self.char("^") { negated.toggle(); position += 1 }
                while let d = current, d != Self.char("}") {
                    if let s = Unicode.Scalar(d), s != " ", s != "_" { name.unicodeScalars.append(s) }
                    position += 1
                }
                guard !atEnd else { throw fail("malformed \\p{…}", at: start) }
                position += 1
            } else if let d = current, let s = Unicode.Scalar(d) {
                name = String(s)
                position += 1
            }
            guard let categories = ScalarSet.categories(named: name) else {
                throw unsupported("the Unicode property \"\(name)\" (only general categories such as \\p{L}, \\p{Lu}, \\p{Nd})", at: start)
            }
            var result = ScalarSet()
            result.categories = [.init(categories: categories, negated: false)]
            result.negated = negated
            return result
        default: return nil
        }
        position += 1
        return set
    }

    /// A single-scalar escape (`\n`, `\x41`, `\.` …), position after the backslash.
    private mutating func parseScalarEscape(start: Int) throws(RegexSyntaxError) -> UInt32 {
        guard let c = current else { throw fail("\\ at end of pattern", at: start) }
        position += 1
        switch c {
        case Self.char("t"): return 0x09
        case Self.char("n"): return 0x0A
        case Self.char("r"): return 0x0D
        case Self.char("f"): return 0x0C
        case Self.char("e"): return 0x1B
        case Self.char("a"): return 0x07
        case Self.char("0"):
            // \0 and up to two more octal digits.
            var value: UInt32 = 0
            var count = 0
            while count < 2, let d = current, (0x30...0x37).contains(d) { value = value * 8 + d - 0x30; position += 1; count += 1 }
            return value
        case Self.char("o"):
            guard current == Self.char("{") else { throw fail("missing { after \\o", at: start) }
            position += 1
            return try bracedNumber(radix: 8, start: start)
        case Self.char("x"):
            if current == Self.char("{") {
                position += 1
                return try bracedNumber(radix: 16, start: start)
            }
            var value: UInt32 = 0
            var count = 0
            while count < 2, let d = current, let v = Self.hexValue(d) { value = value * 16 + v; position += 1; count += 1 }
            return value
        case Self.char("c"):
            guard let d = current, d < 0x80, d >= 0x20 else { throw fail("\\c must be followed by a printable ASCII character", at: start) }
            position += 1
            let upper = (0x61...0x7A).contains(d) ? d - 0x20 : d
            return upper ^ 0x40
        case Self.char("N"), Self.char("u"), Self.char("U"), Self.char("L"), Self.char("l"):
            throw fail("PCRE does not support \\L, \\l, \\N{name}, \\U, or \\u", at: start)
        default:
            if let s = Unicode.Scalar(c), s.isASCII, s.properties.isAlphabetic || (0x30...0x39).contains(c) {
                throw fail("unrecognized escape \"\\\(s)\"", at: start)
            }
            return c  // `\.`, `\\`, `\-`, `\ `… : the character itself.
        }
    }

    private mutating func bracedNumber(radix: UInt32, start: Int) throws(RegexSyntaxError) -> UInt32 {
        var value: UInt32 = 0
        var count = 0
        while let d = current, d != Self.char("}") {
            guard let v = Self.hexValue(d), v < radix else { throw fail("invalid digit in braced escape", at: position) }
            value = value * radix + v
            count += 1
            guard value <= 0x10FFFF else { throw fail("character code point value is too large", at: start) }
            position += 1
        }
        guard !atEnd, count > 0 else { throw fail("malformed braced escape", at: start) }
        position += 1
        if (0xD800...0xDFFF).contains(value) { throw fail("surrogate code points are not characters", at: start) }
        return value
    }

    private static func hexValue(_ d: UInt32) -> UInt32? {
        switch d {
        case 0x30...0x39: d - 0x30
        case 0x41...0x46: d - 0x41 + 10
        case 0x61...0x66: d - 0x61 + 10
        default: nil
        }
    }

    private static let classEscapeLetters: Set<UInt32> = Set("dDwWsShHvVpP".unicodeScalars.map(\.value))

    private static let posixClasses: [String: [ClosedRange<UInt32>]] = [
        "alpha": [0x41...0x5A, 0x61...0x7A], "digit": [0x30...0x39],
        "alnum": [0x30...0x39, 0x41...0x5A, 0x61...0x7A], "upper": [0x41...0x5A], "lower": [0x61...0x7A],
        "space": [0x09...0x0D, 0x20...0x20], "blank": [0x09...0x09, 0x20...0x20],
        "punct": [0x21...0x2F, 0x3A...0x40, 0x5B...0x60, 0x7B...0x7E], "print": [0x20...0x7E], "graph": [0x21...0x7E],
        "cntrl": [0x00...0x1F, 0x7F...0x7F], "xdigit": [0x30...0x39, 0x41...0x46, 0x61...0x66],
        "word": [0x30...0x39, 0x41...0x5A, 0x5F...0x5F, 0x61...0x7A], "ascii": [0x00...0x7F],
    ]

    /// After `[`.
    private mutating func parseClass(flags: Flags, start: Int) throws(RegexSyntaxError) -> ScalarSet {
        var set = ScalarSet()
        if current == Self.char("^") { set.negated = true; position += 1 }
        var first = true
        while true {
            guard let c = current else { throw fail("missing terminating ] for character class", at: start) }
            if c == Self.char("]") && !first { position += 1; break }
            first = false
            // POSIX [:name:] / [:^name:].
            if c == Self.char("["), let d = peek(1), d == Self.char(":") || d == Self.char(".") || d == Self.char("=") {
                let nameStart = position
                var i = position + 2
                var negated = false
                if d == Self.char(":"), i < pattern.count, pattern[i] == Self.char("^") { negated = true; i += 1 }
                var name = ""
                while i < pattern.count, let s = Unicode.Scalar(pattern[i]), s.isASCII, s.properties.isAlphabetic {
                    name.unicodeScalars.append(s); i += 1
                }
                if i + 1 < pattern.count, pattern[i] == d, pattern[i + 1] == Self.char("]") {
                    guard d == Self.char(":") else { throw fail("POSIX collating elements are not supported", at: nameStart) }
                    guard var ranges = Self.posixClasses[name] else { throw fail("unknown POSIX class name \"\(name)\"", at: nameStart) }
                    if flags.caseInsensitive, name == "upper" || name == "lower" { ranges = Self.posixClasses["alpha"]! }
                    set.add(ScalarSet(ranges: ranges, negated: negated))
                    position = i + 2
                    continue
                }
            }
            var low: UInt32
            if c == Self.char("\\") {
                let escapeStart = position
                position += 1
                if current == Self.char("b") { position += 1; low = 0x08 }
                else if let escaped = try parseClassEscape(start: escapeStart, flags: flags) {
                    set.add(escaped)
                    if current == Self.char("-"), let e = peek(1), e != Self.char("]") {
                        throw fail("invalid range in character class", at: position)
                    }
                    continue
                } else if let e = current, [Self.char("Q"), Self.char("E")].contains(e) {
                    throw fail("\\Q…\\E inside a character class is not supported", at: escapeStart)
                } else {
                    low = try parseScalarEscape(start: escapeStart)
                }
            } else {
                low = c
                position += 1
            }
            // A range low-high (a `-` before `]` is literal).
            if current == Self.char("-"), let next = peek(1), next != Self.char("]") {
                let dash = position
                position += 1
                var high: UInt32
                if next == Self.char("\\") {
                    let escapeStart = position
                    position += 1
                    if current == Self.char("b") { position += 1; high = 0x08 }
                    else if let e = current, Self.classEscapeLetters.contains(e) {
                        throw fail("invalid range in character class", at: dash)
                    } else {
                        high = try parseScalarEscape(start: escapeStart)
                    }
                } else if next == Self.char("["), peek(1) == Self.char(":") {
                    throw fail("invalid range in character class", at: dash)
                } else {
                    high = next
                    position += 1
                }
                guard low <= high else { throw fail("range out of order in character class", at: dash) }
                set.add(low...high)
            } else {
                set.add(low...low)
            }
        }
        set.normalize()
        if flags.caseInsensitive { set.addCaseVariants() }
        return set
    }
}
