/// A parsed pattern compiled to instructions for `PikeVM` (Thompson's construction, as RE2
/// and Rust's `regex` build it). Counted repetition is expanded, so the program's size, and with
/// it the matcher's work per input scalar, is bounded by `instructionLimit`.
///
/// Slots: `2n` and `2n+1` hold the byte offsets of group n's start and end (group 0 is the
/// whole match); after them, one slot per loop whose body can match empty, holding where its
/// current iteration began. PCRE ends such a loop after an iteration that consumed nothing
/// (`(a*)+` on "aa" leaves $1 empty); `loopEnd` does the same, so the captures agree.
struct RegexProgram: Sendable {
    enum Instruction: Sendable, Equatable {
        case scalar(UInt32)
        case set(Int)
        /// `.`: anything but `\n`.
        case anyButNewline
        case any
        /// Try `first`, then `second` (leftmost-first priority).
        case split(first: Int, second: Int)
        case jump(Int)
        case save(slot: Int)
        case assert(RegexAssertion)
        /// A loop iteration begins: its slot takes the current offset.
        case loopStart(slot: Int)
        /// A loop iteration ends: to `exit` if it consumed nothing, else to `again`.
        case loopEnd(slot: Int, exit: Int, again: Int)
        case match
    }

    /// The largest program compiled; bigger is a compile error (`{1000}{1000}`).
    static let instructionLimit = 10_000

    var instructions: [Instruction] = []
    var sets: [CompiledSet] = []
    var groupCount: Int
    /// Named groups, as written, with their numbers.
    var names: [(name: String, index: Int)]
    var captureSlotCount: Int { 2 * (groupCount + 1) }
    /// Capture slots, then one slot per empty-matching loop.
    private(set) var slotCount: Int
    /// Every match starts at offset 0 (the pattern begins with `^` or `\A`).
    var anchoredAtStart: Bool

    /// Threads are deduplicated per (instruction, which enclosing empty-matching loops began
    /// their iteration at the current offset); those form a chain, so an instruction inside d
    /// such loops has d+1 states. `stateBase[pc]` is its first state's number.
    private(set) var stateBase: [Int] = []
    private(set) var stateCount = 0
    /// The loop slots enclosing instruction pc, outermost first:
    /// `enclosingSlots[enclosingStart[pc]..<enclosingStart[pc + 1]]`.
    private(set) var enclosingStart: [Int] = []
    private(set) var enclosingSlots: [Int] = []
    var hasEmptyLoops: Bool { slotCount > captureSlotCount }

    struct CompiledSet: Sendable {
        /// Membership of scalars 0…127, for the common case.
        let asciiLow: UInt64
        let asciiHigh: UInt64
        let set: ScalarSet

        init(_ set: ScalarSet) {
            var low: UInt64 = 0, high: UInt64 = 0
            for scalar in UInt32(0)..<128 where set.contains(scalar) {
                if scalar < 64 { low |= 1 << UInt64(scalar) } else { high |= 1 << UInt64(scalar - 64) }
            }
            asciiLow = low
            asciiHigh = high
            self.set = set
        }

        @inline(__always) func contains(_ scalar: UInt32) -> Bool {
            if scalar < 64 { return asciiLow & (1 << UInt64(scalar)) != 0 }
            if scalar < 128 { return asciiHigh & (1 << UInt64(scalar - 64)) != 0 }
            return set.contains(scalar)
        }
    }

    init(_ syntax: RegexSyntax) throws(RegexSyntaxError) {
        groupCount = syntax.groupCount
        names = syntax.names
        anchoredAtStart = syntax.root.isAnchoredAtStart
        slotCount = 2 * (syntax.groupCount + 1)
        var builder = Builder(nextSlot: slotCount)
        try builder.emit(.save(slot: 0))
        try builder.compile(syntax.root)
        try builder.emit(.save(slot: 1))
        try builder.emit(.match)
        instructions = builder.instructions
        sets = builder.sets.map(CompiledSet.init)
        slotCount = builder.nextSlot
        var base = 0
        for enclosing in builder.enclosing {
            stateBase.append(base)
            base += enclosing.count + 1
            enclosingStart.append(enclosingSlots.count)
            enclosingSlots += enclosing
        }
        enclosingStart.append(enclosingSlots.count)
        stateCount = base
    }

    init(pattern: String, caseInsensitive: Bool) throws(RegexSyntaxError) {
        try self.init(RegexSyntax(pattern: pattern, caseInsensitive: caseInsensitive))
    }

    private struct Builder {
        var instructions: [Instruction] = []
        /// Per instruction, the slots of the empty-matching loops around it.
        var enclosing: [[Int]] = []
        var sets: [ScalarSet] = []
        var loops: [Int] = []
        var nextSlot: Int

        init(nextSlot: Int) { self.nextSlot = nextSlot }

        var next: Int { instructions.count }

        @discardableResult
        mutating func emit(_ instruction: Instruction) throws(RegexSyntaxError) -> Int {
            guard instructions.count < RegexProgram.instructionLimit else {
                throw RegexSyntaxError(kind: .tooLarge(instructions: instructions.count + 1, limit: RegexProgram.instructionLimit), offset: 0)
            }
            instructions.append(instruction)
            enclosing.append(loops)
            return instructions.count - 1
        }

        mutating func compile(_ node: RegexNode) throws(RegexSyntaxError) {
            switch node {
            case .empty:
                break
            case .scalar(let scalar):
                try emit(.scalar(scalar))
            case .set(let set):
                if let index = sets.firstIndex(of: set) {
                    try emit(.set(index))
                } else {
                    sets.append(set)
                    try emit(.set(sets.count - 1))
                }
            case .any(let dotAll):
                try emit(dotAll ? .any : .anyButNewline)
            case .assertion(let assertion):
                try emit(.assert(assertion))
            case .group(let body, let index):
                if let index { try emit(.save(slot: 2 * index)) }
                try compile(body)
                if let index { try emit(.save(slot: 2 * index + 1)) }
            case .concat(let nodes):
                for node in nodes { try compile(node) }
            case .alternation(let branches):
                var jumps: [Int] = []
                for (i, branch) in branches.enumerated() {
                    if i < branches.count - 1 {
                        let split = try emit(.split(first: 0, second: 0))
                        try compile(branch)
                        jumps.append(try emit(.jump(0)))
                        instructions[split] = .split(first: split + 1, second: next)
                    } else {
                        try compile(branch)
                    }
                }
                for jump in jumps { instructions[jump] = .jump(next) }
            case .repetition(let body, let min, let max, let greedy):
                try repetition(body, min: min, max: max, greedy: greedy)
            }
        }

        mutating func repetition(_ body: RegexNode, min: Int, max: Int?, greedy: Bool) throws(RegexSyntaxError) {
            guard let max else {
                // {n,}: n-1 copies and a `+` loop, or a `*` loop (as PCRE compiles them).
                for _ in 0..<Swift.max(min - 1, 0) { try compile(body) }
                try loop(body, atLeastOnce: min > 0, greedy: greedy)
                return
            }
            for _ in 0..<min { try compile(body) }
            // {n,m}: m-n optional copies, each skipping to the end: x(x(x)?)?)?
            var splits: [Int] = []
            for _ in min..<max {
                splits.append(try emit(.split(first: 0, second: 0)))
                try compile(body)
            }
            for split in splits {
                instructions[split] = greedy ? .split(first: split + 1, second: next) : .split(first: next, second: split + 1)
            }
        }

        /// `x*` (head split, body, back to head) or `x+` (body, split back).
        mutating func loop(_ body: RegexNode, atLeastOnce: Bool, greedy: Bool) throws(RegexSyntaxError) {
            let guarded = body.isNullable
            let head = atLeastOnce ? nil : try emit(.split(first: 0, second: 0))
            let bodyStart = next
            var slot = 0
            if guarded {
                slot = nextSlot
                nextSlot += 1
                try emit(.loopStart(slot: slot))
                loops.append(slot)
            }
            try compile(body)
            var loopEnd: Int?
            if guarded {
                loopEnd = try emit(.loopEnd(slot: slot, exit: 0, again: 0))
                loops.removeLast()
            }
            if let head {
                if loopEnd == nil { try emit(.jump(head)) }
                let exit = next
                instructions[head] = greedy ? .split(first: head + 1, second: exit) : .split(first: exit, second: head + 1)
                if let loopEnd { instructions[loopEnd] = .loopEnd(slot: slot, exit: exit, again: head) }
            } else {
                let tail = try emit(.split(first: 0, second: 0))
                let exit = next
                instructions[tail] = greedy ? .split(first: bodyStart, second: exit) : .split(first: exit, second: bodyStart)
                if let loopEnd { instructions[loopEnd] = .loopEnd(slot: slot, exit: exit, again: tail) }
            }
        }
    }
}
