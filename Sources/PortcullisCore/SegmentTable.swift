/// Sorted disjoint segments of a key space, each with a value: the lookup structure that both
/// `FirstMatchTable` (access lists) and `LongestPrefixTable` (geo) compile into.
///
/// A lookup is a binary search for the last segment starting at or before the key, narrowed
/// first by a 65,536-entry index on the key's top 16 bits, so that even a table of a million
/// segments is searched within a few cache lines. Small tables (most access lists) skip the
/// index: six probes of a 64-entry array are as quick, and building 256 KiB per table made
/// compiling a rule file with many servers slow.
public struct SegmentTable<Key: FixedWidthInteger & UnsignedInteger & Sendable>: Sendable {
    /// Segment `i` covers `starts[i] ..< starts[i + 1]` (the last one runs to `Key.max`).
    @usableFromInline let starts: [Key]
    /// The value of each segment; -1 where nothing covers it.
    @usableFromInline let values: [Int32]
    /// For each value of the key's top bits, the last segment starting at or before the first
    /// key with those bits; one extra entry closes the last range. Empty for small tables.
    @usableFromInline let index: [Int32]

    /// Up to this many segments, a lookup searches all of them instead of an index.
    public static var unindexedLimit: Int { 64 }

    /// The index covers the key's top 16 bits (all of them for narrower keys).
    @usableFromInline static var indexBits: Int { Swift.min(16, Key.bitWidth) }
    @usableFromInline static var indexShift: Int { Key.bitWidth - indexBits }

    public var count: Int { starts.count }
    public var isEmpty: Bool { values.allSatisfy { $0 < 0 } }
    /// Whether lookups go through the top-bits index (tables over `unindexedLimit` segments).
    public var isIndexed: Bool { !index.isEmpty }

    /// `starts` ascending with `starts[0] == 0`; neighbours with equal values are merged here.
    @_specialize(where Key == UInt32)
    @_specialize(where Key == UInt128)
    public init(starts rawStarts: [Key], values rawValues: [Int32]) {
        var starts: [Key] = []
        var values: [Int32] = []
        starts.reserveCapacity(rawStarts.count)
        values.reserveCapacity(rawStarts.count)
        for (start, value) in zip(rawStarts, rawValues) where values.last != value {
            starts.append(start)
            values.append(value)
        }
        self.starts = starts
        self.values = values
        guard starts.count > Self.unindexedLimit else {
            self.index = []
            return
        }
        let entries = 1 << Self.indexBits
        var index = [Int32](repeating: 0, count: entries + 1)
        var segment = 0
        for high in 0..<entries {
            let firstKey = Key(high) << Self.indexShift
            while segment + 1 < starts.count && starts[segment + 1] <= firstKey { segment += 1 }
            index[high] = Int32(segment)
        }
        index[entries] = Int32(starts.count - 1)
        self.index = index
    }

    /// The value of the segment containing `key`, or nil where nothing covers it.
    @inlinable
    public func value(at key: Key) -> Int32? {
        var low = 0
        var highest = starts.count - 1
        if !index.isEmpty {
            let high = Int(truncatingIfNeeded: key >> Self.indexShift)
            low = Int(index[high])
            highest = Int(index[high + 1])
        }
        while low < highest {
            let mid = (low + highest + 1) >> 1
            if starts[mid] <= key { low = mid } else { highest = mid - 1 }
        }
        let value = values[low]
        return value < 0 ? nil : value
    }
}
