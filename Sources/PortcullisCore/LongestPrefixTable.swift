/// "Which is the most specific block containing this key?" — the lookup behind nginx's `geo`
/// (CIDR mode: longest prefix wins; for the same block written twice, the later one wins).
///
/// CIDR blocks are either nested or disjoint, so one left-to-right sweep with a stack of open
/// blocks turns them into sorted disjoint segments, each carrying the value of the innermost
/// block that covers it (a `SegmentTable`). See docs/decisions/0005-variables-and-deny-by-variable.md.
public struct LongestPrefixTable<Key: FixedWidthInteger & UnsignedInteger & Sendable>: Sendable {
    @usableFromInline let segments: SegmentTable<Key>

    public var segmentCount: Int { segments.count }

    /// `blocks` in file order: (first key, last key, prefix length, value index).
    @_specialize(where Key == UInt32)
    @_specialize(where Key == UInt128)
    public init(blocks: [(range: ClosedRange<Key>, prefixLength: Int, value: Int32)]) {
        // Outer blocks before inner ones at the same start; for the same block, the later wins.
        // (Sorted as plain arrays: comparing tuples in generic code costs a metadata lookup
        // per comparison, which dominated building a million-block table.)
        let lows = blocks.map(\.range.lowerBound)
        let lengths = blocks.map(\.prefixLength)
        var order = Array(blocks.indices)
        order.sort { a, b in
            if lows[a] != lows[b] { return lows[a] < lows[b] }
            if lengths[a] != lengths[b] { return lengths[a] < lengths[b] }
            return a < b
        }
        let ordered = order.map { blocks[$0] }
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
        var starts: [Key] = [0]
        var values: [Int32] = [-1]
        starts.reserveCapacity(unique.count * 2 + 1)
        values.reserveCapacity(unique.count * 2 + 1)
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
        for block in unique {
            while let top = open.last, top.last < block.range.lowerBound {
                open.removeLast()
                emit(top.last + 1, open.last?.value ?? -1)
            }
            emit(block.range.lowerBound, block.value)
            open.append((block.range.upperBound, block.value))
        }
        while let top = open.popLast() {
            if top.last < Key.max { emit(top.last + 1, open.last?.value ?? -1) }
        }
        segments = SegmentTable(starts: starts, values: values)
    }

    /// The value index of the most specific block containing `key`, or nil.
    @inlinable
    public func lookup(_ key: Key) -> Int32? { segments.value(at: key) }
}
