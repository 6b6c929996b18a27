/// "Which is the first rule in this ordered list whose range contains the key?" answered by a
/// binary search instead of a scan.
///
/// First match over an ordered list equals "the lowest-index rule whose range contains the key",
/// so the list is compiled once into sorted disjoint segments, each carrying the lowest rule index
/// that covers it (a `SegmentTable`). Lookup is O(log segments) whatever the list length;
/// building is O(n log n).
/// See docs/decisions/0003-cidr-table.md.
public struct FirstMatchTable<Key: FixedWidthInteger & UnsignedInteger & Sendable>: Sendable {
    @usableFromInline let segments: SegmentTable<Key>

    public var isEmpty: Bool { segments.isEmpty }
    public var segmentCount: Int { segments.count }

    @_specialize(where Key == UInt32)
    @_specialize(where Key == UInt128)
    public init(ranges: [(range: ClosedRange<Key>, rule: Int32)]) {
        // Sweep the boundaries left to right with a min-heap of the rules currently covering.
        // (Sorted through index arrays: comparing tuples in generic code costs a metadata
        // lookup per comparison.)
        let lows = ranges.map(\.range.lowerBound)
        let highs = ranges.map(\.range.upperBound)
        let opens = ranges.indices.sorted { lows[$0] < lows[$1] }.map { ranges[$0] }
        let closes = ranges.indices.filter { highs[$0] != Key.max }.sorted { highs[$0] < highs[$1] }.map { ranges[$0] }
        var heap = MinHeap()
        // How many of each rule's ranges cover the sweep point (a rule may have several).
        var active = [Int32](repeating: 0, count: (ranges.map { Int($0.rule) }.max() ?? -1) + 1)
        var starts: [Key] = [0]
        var values: [Int32] = [-1]
        var o = 0, c = 0
        while o < opens.count || c < closes.count {
            // The next boundary: a range opening at `lowerBound` or one closing after `upperBound`.
            let nextOpen = o < opens.count ? opens[o].range.lowerBound : nil
            let nextClose = c < closes.count ? closes[c].range.upperBound + 1 : nil
            let point: Key
            switch (nextOpen, nextClose) {
            case (let a?, let b?): point = Swift.min(a, b)
            case (let a?, nil): point = a
            case (nil, let b?): point = b
            case (nil, nil): fatalError("unreachable")
            }
            while o < opens.count && opens[o].range.lowerBound == point {
                heap.push(opens[o].rule)
                active[Int(opens[o].rule)] += 1
                o += 1
            }
            while c < closes.count && closes[c].range.upperBound + 1 == point {
                active[Int(closes[c].rule)] -= 1
                c += 1
            }
            while let top = heap.top, active[Int(top)] == 0 { heap.pop() }
            let value = heap.top ?? -1
            if starts.last == point {
                values[values.count - 1] = value
            } else {
                starts.append(point)
                values.append(value)
            }
        }
        segments = SegmentTable(starts: starts, values: values)
    }

    /// The lowest index among the rules whose range contains `key`, or nil.
    @inlinable
    public func firstMatch(_ key: Key) -> Int32? { segments.value(at: key) }
}

/// A binary min-heap of rule indexes, enough for the sweep above.
private struct MinHeap {
    private var items: [Int32] = []
    var top: Int32? { items.first }

    mutating func push(_ value: Int32) {
        items.append(value)
        var child = items.count - 1
        while child > 0 {
            let parent = (child - 1) / 2
            guard items[child] < items[parent] else { break }
            items.swapAt(child, parent)
            child = parent
        }
    }

    mutating func pop() {
        guard !items.isEmpty else { return }
        items.swapAt(0, items.count - 1)
        items.removeLast()
        var parent = 0
        while true {
            let left = 2 * parent + 1, right = left + 1
            var smallest = parent
            if left < items.count && items[left] < items[smallest] { smallest = left }
            if right < items.count && items[right] < items[smallest] { smallest = right }
            if smallest == parent { break }
            items.swapAt(parent, smallest)
            parent = smallest
        }
    }
}
