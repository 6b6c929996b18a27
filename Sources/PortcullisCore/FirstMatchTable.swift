/// "Which is the first rule in this ordered list whose range contains the key?" answered by a
/// binary search instead of a scan.
///
/// First match over an ordered list equals "the lowest-index rule whose range contains the key",
/// so the list is compiled once into sorted disjoint segments, each carrying the lowest rule index
/// that covers it. Lookup is O(log segments) whatever the list length; building is O(n log n).
/// See docs/decisions/0003-cidr-table.md.
public struct FirstMatchTable<Key: FixedWidthInteger & UnsignedInteger & Sendable>: Sendable {
    /// Segment `i` covers `starts[i] ..< starts[i + 1]` (the last one runs to `Key.max`).
    @usableFromInline let starts: [Key]
    /// Lowest covering rule index for each segment, or -1 where no rule covers it.
    @usableFromInline let ruleIndexes: [Int32]

    public var isEmpty: Bool { ruleIndexes.allSatisfy { $0 < 0 } }
    public var segmentCount: Int { starts.count }

    public init(ranges: [(range: ClosedRange<Key>, rule: Int32)]) {
        // Sweep the boundaries left to right with a min-heap of the rules currently covering.
        let opens = ranges.sorted { $0.range.lowerBound < $1.range.lowerBound }
        let closes = ranges.filter { $0.range.upperBound != Key.max }
            .sorted { $0.range.upperBound < $1.range.upperBound }
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
        // Merge neighbours that ended up with the same rule.
        var mergedStarts: [Key] = []
        var mergedValues: [Int32] = []
        mergedStarts.reserveCapacity(starts.count)
        mergedValues.reserveCapacity(starts.count)
        for (start, value) in zip(starts, values) where mergedValues.last != value {
            mergedStarts.append(start)
            mergedValues.append(value)
        }
        self.starts = mergedStarts
        self.ruleIndexes = mergedValues
    }

    /// The lowest index among the rules whose range contains `key`, or nil.
    @inlinable
    public func firstMatch(_ key: Key) -> Int32? {
        let value = ruleIndexes[segment(containing: key)]
        return value < 0 ? nil : value
    }

    @usableFromInline
    func segment(containing key: Key) -> Int {
        // Last segment whose start is <= key; starts[0] == 0 so one always exists.
        var low = 0, high = starts.count - 1
        while low < high {
            let mid = (low + high + 1) >> 1
            if starts[mid] <= key { low = mid } else { high = mid - 1 }
        }
        return low
    }
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
