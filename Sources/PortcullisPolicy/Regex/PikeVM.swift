/// Runs a `RegexProgram` over a subject in one pass: Thompson's NFA simulation with a thread
/// per live instruction, kept in priority order so the first thread to reach `match` is the
/// match a backtracking engine (PCRE) would report — leftmost-first alternation, greedy and
/// lazy quantifiers, the same captures. Each input scalar costs at most one visit per program
/// state, so a match takes O(subject × program) time whatever the pattern: no exponential
/// blow-up for `(a+)+$` or `(.*a){20}` (decision 0016).
///
/// The subject is bytes: UTF-8 (a map key: `.` and classes take a whole scalar) or Latin-1
/// (a health-check answer: one byte, one character). Offsets in the slots are byte offsets.
struct PikeVM {
    enum Encoding { case utf8, latin1 }

    /// The leftmost-first match's capture slots (`-1`: unset), or nil. With `captures` false,
    /// stops at the first match found and returns an empty array.
    static func search(_ program: RegexProgram, in subject: UnsafeBufferPointer<UInt8>, encoding: Encoding, captures: Bool = true) -> [Int]? {
        program.instructions.withUnsafeBufferPointer { instructions in
            program.stateBase.withUnsafeBufferPointer { stateBase in
                program.enclosingStart.withUnsafeBufferPointer { enclosingStart in
                    program.enclosingSlots.withUnsafeBufferPointer { enclosingSlots in
                        program.sets.withUnsafeBufferPointer { sets in
                            var vm = PikeVM(
                                program: program, instructions: instructions, stateBase: stateBase,
                                enclosingStart: enclosingStart, enclosingSlots: enclosingSlots, sets: sets,
                                subject: subject, latin1: encoding == .latin1)
                            defer { vm.deallocate() }
                            return vm.run(captures: captures)
                        }
                    }
                }
            }
        }
    }

    private let instructions: UnsafeBufferPointer<RegexProgram.Instruction>
    private let stateBase: UnsafeBufferPointer<Int>
    private let enclosingStart: UnsafeBufferPointer<Int>
    private let enclosingSlots: UnsafeBufferPointer<Int>
    private let sets: UnsafeBufferPointer<RegexProgram.CompiledSet>
    private let subject: UnsafeBufferPointer<UInt8>
    private let latin1: Bool
    private let anchoredAtStart: Bool
    private let hasEmptyLoops: Bool
    private let slotCount: Int
    private let captureSlotCount: Int

    /// The list being stepped (`current`, at `position`) and the one being built (`next`):
    /// each thread's instruction, and its `slotCount` slots.
    private var currentPCs: UnsafeMutablePointer<Int>
    private var currentSlots: UnsafeMutablePointer<Int>
    private var currentCount = 0
    private var nextPCs: UnsafeMutablePointer<Int>
    private var nextSlots: UnsafeMutablePointer<Int>
    private var nextCount = 0
    /// `visited[state] == generation`: the state already has a thread in the list being built.
    private let visited: UnsafeMutablePointer<Int>
    private var generation = 0
    /// The closure's explicit stack: `pc >= 0` explore, else restore slot `-pc-1` to `value`.
    /// Each visited state pushes at most one frame, so `stateCount + 1` is enough.
    private let stackPCs: UnsafeMutablePointer<Int>
    private let stackValues: UnsafeMutablePointer<Int>
    /// The slots of the thread being followed.
    private let scratch: UnsafeMutablePointer<Int>

    /// Where the closure is being computed, and the scalars either side.
    private var position = 0
    private var previous: UInt32?
    private var following: UInt32?

    private init(
        program: RegexProgram, instructions: UnsafeBufferPointer<RegexProgram.Instruction>, stateBase: UnsafeBufferPointer<Int>,
        enclosingStart: UnsafeBufferPointer<Int>, enclosingSlots: UnsafeBufferPointer<Int>,
        sets: UnsafeBufferPointer<RegexProgram.CompiledSet>, subject: UnsafeBufferPointer<UInt8>, latin1: Bool
    ) {
        self.instructions = instructions
        self.stateBase = stateBase
        self.enclosingStart = enclosingStart
        self.enclosingSlots = enclosingSlots
        self.sets = sets
        self.subject = subject
        self.latin1 = latin1
        anchoredAtStart = program.anchoredAtStart
        hasEmptyLoops = program.hasEmptyLoops
        slotCount = program.slotCount
        captureSlotCount = program.captureSlotCount
        // One allocation, carved up (a map key is short; the allocations were a good part of a match).
        let states = program.stateCount
        let slots = states * slotCount
        storage = .allocate(capacity: 5 * states + 2 + 2 * slots + slotCount)
        currentPCs = storage
        nextPCs = storage + states
        visited = storage + 2 * states
        visited.initialize(repeating: -1, count: states)
        stackPCs = storage + 3 * states
        stackValues = storage + 4 * states + 1
        currentSlots = storage + 5 * states + 2
        nextSlots = currentSlots + slots
        scratch = nextSlots + slots
    }

    private let storage: UnsafeMutablePointer<Int>

    private func deallocate() { storage.deallocate() }

    /// The scalar at `offset` and its length in bytes; invalid UTF-8 is U+FFFD, one byte.
    @inline(__always)
    private func decode(_ offset: Int) -> (scalar: UInt32, length: Int)? {
        guard offset < subject.count else { return nil }
        let b0 = UInt32(subject[offset])
        if b0 < 0x80 || latin1 { return (b0, 1) }
        func continuation(_ i: Int) -> UInt32? {
            guard offset + i < subject.count else { return nil }
            let b = UInt32(subject[offset + i])
            return b & 0xC0 == 0x80 ? b & 0x3F : nil
        }
        switch b0 {
        case 0xC2...0xDF:
            if let b1 = continuation(1) { return ((b0 & 0x1F) << 6 | b1, 2) }
        case 0xE0...0xEF:
            if let b1 = continuation(1), let b2 = continuation(2) {
                let scalar = (b0 & 0x0F) << 12 | b1 << 6 | b2
                if scalar >= 0x800, !(0xD800...0xDFFF).contains(scalar) { return (scalar, 3) }
            }
        case 0xF0...0xF4:
            if let b1 = continuation(1), let b2 = continuation(2), let b3 = continuation(3) {
                let scalar = (b0 & 0x07) << 18 | b1 << 12 | b2 << 6 | b3
                if (0x10000...0x10FFFF).contains(scalar) { return (scalar, 4) }
            }
        default:
            break
        }
        return (0xFFFD, 1)
    }

    private mutating func run(captures: Bool) -> [Int]? {
        var best: [Int]?
        var here = decode(0)
        position = 0
        previous = nil
        following = here?.scalar
        generation += 1
        while true {
            // A new thread starts here, behind every older one, until something matched.
            if best == nil && (position == 0 || !anchoredAtStart) {
                scratch.update(repeating: -1, count: slotCount)
                if addThread(toNext: false, pc: 0), !captures { return [] }
            }
            if currentCount == 0 && (best != nil || here == nil || anchoredAtStart) { break }
            // Step every thread over the scalar at `position` into `next`, at the offset after it.
            let after = position + (here?.length ?? 0)
            let ahead = here == nil ? nil : decode(after)
            generation += 1
            nextCount = 0
            previous = here?.scalar
            following = ahead?.scalar
            position = after
            let scalar = here?.scalar ?? UInt32.max
            threads: for i in 0..<currentCount {
                let pc = currentPCs[i]
                let matches: Bool
                switch instructions[pc] {
                case .match:
                    // Lower-priority threads lose; higher ones already moved on to `next`.
                    best = Array(UnsafeBufferPointer(start: currentSlots + i * slotCount, count: captureSlotCount))
                    if !captures { return [] }
                    break threads
                case .scalar(let wanted): matches = scalar == wanted
                case .set(let index): matches = here != nil && sets[index].contains(scalar)
                case .anyButNewline: matches = here != nil && scalar != 0x0A
                case .any: matches = here != nil
                default: matches = false
                }
                guard matches else { continue }
                scratch.update(from: currentSlots + i * slotCount, count: slotCount)
                if addThread(toNext: true, pc: pc + 1), !captures { return [] }
            }
            swap(&currentPCs, &nextPCs)
            swap(&currentSlots, &nextSlots)
            currentCount = nextCount
            if here == nil { break }
            here = ahead
        }
        return best
    }

    @inline(__always)
    private func state(of pc: Int) -> Int {
        let base = stateBase[pc]
        guard hasEmptyLoops else { return base }
        let start = enclosingStart[pc], end = enclosingStart[pc + 1]
        for k in start..<end where scratch[enclosingSlots[k]] == position { return base + (k - start) }
        return base + (end - start)
    }

    /// Follows `pc` through splits, jumps, saves and assertions at `position`, adding a thread
    /// for each consuming instruction (and `match`) reached, in priority order, to the list
    /// being built (`next`, or `current` for a thread starting at `position`). Returns whether
    /// a `match` was added.
    private mutating func addThread(toNext: Bool, pc start: Int) -> Bool {
        var matched = false
        var depth = 1
        stackPCs[0] = start
        while depth > 0 {
            depth -= 1
            var pc = stackPCs[depth]
            if pc < 0 {
                scratch[-pc - 1] = stackValues[depth]
                continue
            }
            while true {
                let state = state(of: pc)
                if visited[state] == generation { break }
                visited[state] = generation
                switch instructions[pc] {
                case .jump(let target):
                    pc = target
                    continue
                case .split(let first, let second):
                    stackPCs[depth] = second
                    depth += 1
                    pc = first
                    continue
                case .save(let slot), .loopStart(let slot):
                    stackPCs[depth] = -slot - 1
                    stackValues[depth] = scratch[slot]
                    depth += 1
                    scratch[slot] = position
                    pc += 1
                    continue
                case .loopEnd(let slot, let exit, let again):
                    pc = scratch[slot] == position ? exit : again
                    continue
                case .assert(let assertion):
                    guard holds(assertion) else { break }
                    pc += 1
                    continue
                case .match:
                    matched = true
                    fallthrough
                case .scalar, .set, .anyButNewline, .any:
                    if toNext {
                        nextPCs[nextCount] = pc
                        (nextSlots + nextCount * slotCount).update(from: scratch, count: slotCount)
                        nextCount += 1
                    } else {
                        currentPCs[currentCount] = pc
                        (currentSlots + currentCount * slotCount).update(from: scratch, count: slotCount)
                        currentCount += 1
                    }
                }
                break
            }
        }
        return matched
    }

    @inline(__always)
    private static func isWord(_ scalar: UInt32?) -> Bool {
        guard let scalar else { return false }
        return (0x30...0x39).contains(scalar) || (0x41...0x5A).contains(scalar) || (0x61...0x7A).contains(scalar) || scalar == 0x5F
    }

    private func holds(_ assertion: RegexAssertion) -> Bool {
        let end = subject.count
        switch assertion {
        case .subjectStart, .lineStart(multiline: false):
            return position == 0
        case .lineStart(multiline: true):
            return position == 0 || (previous == 0x0A && position < end)
        case .subjectEnd:
            return position == end
        case .lineEnd(multiline: false), .subjectEndBeforeNewline:
            return position == end || (position == end - 1 && subject[position] == 0x0A)
        case .lineEnd(multiline: true):
            return position == end || following == 0x0A
        case .wordBoundary:
            return Self.isWord(previous) != Self.isWord(following)
        case .notWordBoundary:
            return Self.isWord(previous) == Self.isWord(following)
        }
    }
}
