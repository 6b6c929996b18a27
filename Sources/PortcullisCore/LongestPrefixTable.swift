/// "Which is the most specific block containing this key?" — the lookup behind nginx's `geo`
/// (CIDR mode: longest prefix wins; for the same block written twice, the later one wins).
///
/// CIDR blocks are either nested or disjoint, so one left-to-right sweep with a stack of open
/// blocks turns them into sorted disjoint segments, each carrying the value of the innermost
/// block that covers it (a `SegmentTable`). See docs/decisions/0005-variables-and-deny-by-variable.md.
public struct LongestPrefixTable<Key: FixedWidthInteger & UnsignedInteger & Sendable>: Sendable {
    public let segments: SegmentTable<Key>

    public var segmentCount: Int { segments.count }

    /// `blocks` in file order: (first key, last key, prefix length, value index).
    @_specialize(where Key == UInt32)
    @_specialize(where Key == UInt128)
    public init(blocks: [(range: ClosedRange<Key>, prefixLength: Int, value: Int32)]) {
        // Outer blocks before inner ones at the same start; for the same block, the later wins.
        // (Sorted as plain arrays: comparing tuples in generic code costs a metadata lookup
        // per comparison, which dominated building a million-block table.)
        let ordered = Self.sortedOuterFirst(blocks)
        // The same block written twice: keep one, with the later value.
        var unique: [(range: ClosedRange<Key>, prefixLength: Int, value: Int32)] = []
        unique.reserveCapacity(ordered.count)
        for block in ordered {
            if let last = unique.last, last.range == block.range {
                unique[unique.count - 1].value = block.value
            } else {
                unique.append(block)
            }
        }
        self.init(sortedUniqueBlocks: unique.count) { i in
            (unique[i].range.lowerBound, unique[i].range.upperBound, unique[i].value)
        }
    }

    /// The sweep over blocks already sorted outer-first, with duplicates removed.
    init(sortedUniqueBlocks count: Int, block: (Int) -> (low: Key, last: Key, value: Int32)) {
        var starts: [Key] = [0]
        var values: [Int32] = [-1]
        starts.reserveCapacity(count * 2 + 1)
        values.reserveCapacity(count * 2 + 1)
        func emit(_ point: Key, _ value: Int32) {
            if starts[starts.count - 1] == point {
                values[values.count - 1] = value
            } else {
                starts.append(point)
                values.append(value)
            }
        }
        // Sweep: `open` holds the blocks containing the current point, innermost last.
        var open: [(last: Key, value: Int32)] = []
        for i in 0..<count {
            let (low, last, value) = block(i)
            while let top = open.last, top.last < low {
                open.removeLast()
                emit(top.last + 1, open.last?.value ?? -1)
            }
            emit(low, value)
            open.append((last, value))
        }
        while let top = open.popLast() {
            if top.last < Key.max { emit(top.last + 1, open.last?.value ?? -1) }
        }
        segments = SegmentTable(starts: starts, values: values)
    }

    /// `blocks` by first key, outer (shorter prefix) before inner, file order among equals.
    static func sortedOuterFirst(_ blocks: [(range: ClosedRange<Key>, prefixLength: Int, value: Int32)])
        -> [(range: ClosedRange<Key>, prefixLength: Int, value: Int32)] {
        let lows = blocks.map(\.range.lowerBound)
        let lengths = blocks.map(\.prefixLength)
        var order = Array(blocks.indices)
        order.sort { a, b in
            if lows[a] != lows[b] { return lows[a] < lows[b] }
            if lengths[a] != lengths[b] { return lengths[a] < lengths[b] }
            return a < b
        }
        return order.map { blocks[$0] }
    }

    /// The value index of the most specific block containing `key`, or nil.
    @inlinable
    public func lookup(_ key: Key) -> Int32? { segments.value(at: key) }
}

extension LongestPrefixTable where Key == UInt32 {
    /// Packs an IPv4 block for `init(packed:values:)`: first address, prefix length, and its
    /// position in file order (below 2^26), so that sorting plain integers orders the blocks
    /// outer-first with the later of two equal blocks last.
    @inlinable
    public static func pack(first: UInt32, prefixLength: Int, position: Int) -> UInt64 {
        UInt64(first) << 32 | UInt64(prefixLength) << 26 | UInt64(position)
    }

    public static let maximumPackedBlocks = 1 << 26

    /// The bulk IPv4 path (a million-line `geo`): 8 bytes per block while building, one sort
    /// of integers, no intermediate arrays of tuples. `values[position]` is each block's value.
    public init(packed: [UInt64], values: [Int32]) {
        var keys = packed
        keys.sort()
        // The same block written twice: keep the later (the last of a run of equal blocks).
        var unique = 0
        for i in keys.indices {
            if i + 1 < keys.count && keys[i + 1] >> 26 == keys[i] >> 26 { continue }
            keys[unique] = keys[i]
            unique += 1
        }
        self.init(sortedUniqueBlocks: unique) { i in
            let key = keys[i]
            let low = UInt32(truncatingIfNeeded: key >> 32)
            let length = Int(key >> 26 & 0x3F)
            let last = length == 0 ? UInt32.max : low | (UInt32.max >> length)
            return (low, last, values[Int(key & (1 << 26 - 1))])
        }
    }
}
