public import PortcullisCore

/// A compiled `geo [$src] $var { … }` block: nginx's `ngx_stream_geo_module`.
///
/// CIDR mode: the most specific block containing the address wins (`LongestPrefixTable`).
/// `ranges` mode: IPv4 ranges with nginx's own rules (`RangeTable`): a range inside an earlier
/// one overrides that part of it, any other overlap is an error, `delete` removes only a range
/// as stored.
/// IPv4-mapped IPv6 addresses are looked up in the IPv4 table; in `ranges` mode other IPv6
/// addresses are looked up as 255.255.255.255, as nginx. Values are interned: a million
/// blocks usually share a few hundred distinct values.
public struct GeoVariable: Sendable {
    /// nil = the client address after realip (`$remote_addr`).
    public var source: LogTemplate?
    public let ranges: Bool
    @usableFromInline let ipv4: SegmentTable<UInt32>
    @usableFromInline let ipv6: SegmentTable<UInt128>
    @usableFromInline let values: [[UInt8]]
    @usableFromInline let defaultValue: [UInt8]

    public var segmentCount: Int { ipv4.count + ipv6.count }

    /// Inlinable: the lookup is the whole cost of a `geo` variable, and inlining the table
    /// search into the caller took it from 12 to 20 M lookups/s (bench/micro).
    @inlinable
    public func value(for address: IPAddress) -> [UInt8] {
        let index: Int32?
        switch address {
        case .v4(let value):
            index = ipv4.value(at: value)
        case .v6(let value):
            if let mapped = address.mappedIPv4 {
                index = ipv4.value(at: mapped)
            } else if ranges {
                index = ipv4.value(at: UInt32.max)
            } else {
                index = ipv6.value(at: value)
            }
        }
        guard let index, index >= 0 else { return defaultValue }
        return values[Int(index)]
    }

    /// Collects a block's entries in file order, then compiles them in one go.
    public struct Builder {
        public let ranges: Bool
        public var source: LogTemplate?
        /// `default VALUE;`. In CIDR mode nginx stores it as the entries 0.0.0.0/0 and ::/0 of
        /// its radix trees, so it takes its place in file order: `0.0.0.0/0 A; default B;` gives
        /// IPv4 clients B, `default B; 0.0.0.0/0 A;` gives them A, and `delete 0.0.0.0/0;`
        /// after `default` removes it for IPv4 clients (who then get "").
        public var defaultValue: [UInt8] = [] {
            didSet {
                guard !ranges else { return }
                let index = intern(defaultValue)
                add(CIDR(address: .v4(0), prefixLength: 0), valueIndex: index)
                add(CIDR(address: .v6(0), prefixLength: 0), valueIndex: index)
            }
        }
        private var values = ValueInterner()
        /// IPv4 blocks packed for the bulk path (`LongestPrefixTable.pack`), and their values.
        private var v4Packed: [UInt64] = []
        private var v4Values: [Int32] = []
        private var v6Blocks: [(range: ClosedRange<UInt128>, prefixLength: Int, value: Int32)] = []
        /// `delete NET`: the block, and how many IPv4 and IPv6 blocks had been entered before it
        /// (it removes those of them that are the same block; one entered later stays).
        private var deletions: [(block: CIDR, v4Before: Int, v6Before: Int)] = []
        private var rangeTable = RangeTable()

        public init(ranges: Bool) {
            self.ranges = ranges
        }

        /// The number of a value, the same for the same bytes.
        public mutating func intern(_ value: UnsafeBufferPointer<UInt8>) -> Int32 { values.intern(value) }

        public mutating func intern(_ value: [UInt8]) -> Int32 { value.withUnsafeBufferPointer { values.intern($0) } }

        /// `CIDR VALUE;` (CIDR mode).
        public mutating func add(_ block: CIDR, value: [UInt8]) {
            add(block, valueIndex: intern(value))
        }

        public mutating func add(_ block: CIDR, valueIndex index: Int32) {
            if let range = block.ipv4Range {
                v4Packed.append(LongestPrefixTable.pack(first: range.lowerBound, prefixLength: block.prefixLength,
                                                        position: v4Values.count))
                v4Values.append(index)
            } else if let range = block.ipv6Range {
                v6Blocks.append((range, block.prefixLength, index))
            }
        }

        /// `FROM-TO VALUE;` (ranges mode). Returns what it overlaps when nginx would refuse it.
        public mutating func add(range: ClosedRange<UInt32>, value: [UInt8]) -> RangeTable.Problem? {
            rangeTable.add(range, value: intern(value))
        }

        /// `delete FROM-TO;` (ranges mode). Returns false, as nginx warns, when some part of it
        /// was not a range as stored.
        public mutating func deleteRange(_ range: ClosedRange<UInt32>) -> Bool {
            rangeTable.delete(range)
        }

        /// `delete CIDR;` (CIDR mode): removes that exact block if it was entered before.
        public mutating func delete(_ block: CIDR) {
            deletions.append((block, v4Values.count, v6Blocks.count))
        }

        public func build() -> GeoVariable {
            var v4 = v4Packed
            var v6 = v6Blocks
            if !deletions.isEmpty {
                // Deletions are rare: for each deleted block, the latest deletion's position.
                var v4Cut: [UInt64: Int] = [:]  // keyed by the packed block without its position
                var v6Cut: [ClosedRange<UInt128>: Int] = [:]
                for deletion in deletions {
                    if let range = deletion.block.ipv4Range {
                        let key = LongestPrefixTable.pack(first: range.lowerBound, prefixLength: deletion.block.prefixLength, position: 0)
                        v4Cut[key] = max(v4Cut[key] ?? 0, deletion.v4Before)
                    }
                    if let range = deletion.block.ipv6Range { v6Cut[range] = max(v6Cut[range] ?? 0, deletion.v6Before) }
                }
                v4 = v4Packed.filter { packed in
                    let position = Int(packed & UInt64(LongestPrefixTable<UInt32>.maximumPackedBlocks - 1))
                    return position >= (v4Cut[(packed >> 26) << 26] ?? 0)
                }
                v6 = v6Blocks.enumerated().filter { $0.offset >= (v6Cut[$0.element.range] ?? 0) }.map(\.element)
            }
            let ipv4: SegmentTable<UInt32>
            if ranges {
                ipv4 = rangeTable.segments()
            } else {
                ipv4 = LongestPrefixTable(packed: v4, values: v4Values).segments
            }
            return GeoVariable(
                source: source, ranges: ranges, ipv4: ipv4,
                ipv6: ranges ? SegmentTable(starts: [0], values: [-1]) : LongestPrefixTable(blocks: v6).segments,
                values: values.all, defaultValue: ranges ? defaultValue : [])
        }
    }
}

/// Interns byte strings without allocating for ones already seen: open addressing over FNV-1a
/// hashes. A geo block of a million lines has a few hundred distinct values, and building a
/// `[UInt8]` key per line just to find it in a dictionary was a measurable share of the load.
struct ValueInterner {
    private(set) var all: [[UInt8]] = []
    private var slots = [Int32](repeating: -1, count: 1024)
    private var hashes: [UInt64] = []

    mutating func intern(_ value: UnsafeBufferPointer<UInt8>) -> Int32 {
        var hash: UInt64 = 0xcbf2_9ce4_8422_2325
        for byte in value { hash = (hash ^ UInt64(byte)) &* 0x100_0000_01b3 }
        let mask = slots.count - 1
        var slot = Int(truncatingIfNeeded: hash) & mask
        while true {
            let index = slots[slot]
            if index < 0 { break }
            if hashes[Int(index)] == hash && all[Int(index)].elementsEqual(value) { return index }
            slot = (slot + 1) & mask
        }
        let index = Int32(all.count)
        all.append(Array(value))
        hashes.append(hash)
        slots[slot] = index
        if all.count * 2 > slots.count { rehash() }
        return index
    }

    private mutating func rehash() {
        slots = [Int32](repeating: -1, count: slots.count * 2)
        let mask = slots.count - 1
        for (index, hash) in hashes.enumerated() {
            var slot = Int(truncatingIfNeeded: hash) & mask
            while slots[slot] >= 0 { slot = (slot + 1) & mask }
            slots[slot] = Int32(index)
        }
    }
}

/// nginx's `geo … { ranges; }` store (`ngx_stream_geo_add_range`), reproduced so that the same
/// file gives the same answers: every range is cut at /16 boundaries, and in each /16 the pieces
/// are kept sorted. A new piece equal to a stored one replaces its value (nginx warns); one
/// strictly inside a stored piece, or sharing its start or its end, splits it; any other overlap
/// is an error. `delete` removes only pieces exactly as stored.
public struct RangeTable: Sendable {
    struct Piece { var start: UInt16; var end: UInt16; var value: Int32 }

    /// Pieces per /16 (the address's top 16 bits), sorted.
    private var buckets: [UInt16: [Piece]] = [:]

    /// The stored piece a new range overlaps, when nginx refuses the range.
    public struct Problem: Error, Sendable, Equatable {
        public var overlapped: ClosedRange<UInt32>
    }

    /// The /16 pieces of `range`: (top 16 bits, first, last).
    private static func pieces(_ range: ClosedRange<UInt32>) -> [(UInt16, UInt16, UInt16)] {
        var out: [(UInt16, UInt16, UInt16)] = []
        var n = range.lowerBound
        while true {
            let high = UInt16(n >> 16)
            let s = n == range.lowerBound ? UInt16(n & 0xFFFF) : 0
            let e = n | 0xFFFF > range.upperBound ? UInt16(range.upperBound & 0xFFFF) : 0xFFFF
            out.append((high, s, e))
            if high == 0xFFFF || n | 0xFFFF >= range.upperBound { break }
            n = (n | 0xFFFF) + 1
        }
        return out
    }

    mutating func add(_ range: ClosedRange<UInt32>, value: Int32) -> Problem? {
        for (high, s, e) in Self.pieces(range) {
            var list = buckets[high] ?? []
            // As nginx: look from the last piece back for the first one not wholly above.
            var i = list.count
            var placed = false
            while i > 0 {
                i -= 1
                let piece = list[i]
                if e < piece.start { continue }
                if s > piece.end {
                    list.insert(Piece(start: s, end: e, value: value), at: i + 1)
                } else if s == piece.start && e == piece.end {
                    list[i].value = value
                } else if s > piece.start && e < piece.end {
                    list[i].end = s - 1
                    list.insert(contentsOf: [Piece(start: s, end: e, value: value),
                                             Piece(start: e + 1, end: piece.end, value: piece.value)], at: i + 1)
                } else if s == piece.start && e < piece.end {
                    list[i].start = e + 1
                    list.insert(Piece(start: s, end: e, value: value), at: i)
                } else if s > piece.start && e == piece.end {
                    list[i].end = s - 1
                    list.insert(Piece(start: s, end: e, value: value), at: i + 1)
                } else {
                    let base = UInt32(high) << 16
                    return Problem(overlapped: (base | UInt32(piece.start))...(base | UInt32(piece.end)))
                }
                placed = true
                break
            }
            if !placed { list.insert(Piece(start: s, end: e, value: value), at: 0) }
            buckets[high] = list
        }
        return nil
    }

    mutating func delete(_ range: ClosedRange<UInt32>) -> Bool {
        var complete = true
        for (high, s, e) in Self.pieces(range) {
            if let index = buckets[high]?.firstIndex(where: { $0.start == s && $0.end == e }) {
                buckets[high]!.remove(at: index)
            } else {
                complete = false
            }
        }
        return complete
    }

    /// The stored pieces as lookup segments (-1 where no range covers).
    func segments() -> SegmentTable<UInt32> {
        var starts: [UInt32] = [0]
        var values: [Int32] = [-1]
        func emit(_ point: UInt32, _ value: Int32) {
            if starts[starts.count - 1] == point { values[values.count - 1] = value } else { starts.append(point); values.append(value) }
        }
        for high in buckets.keys.sorted() {
            let base = UInt32(high) << 16
            for piece in buckets[high]! {
                emit(base | UInt32(piece.start), piece.value)
                let next = UInt64(base | UInt32(piece.end)) + 1
                if next <= UInt64(UInt32.max) { emit(UInt32(next), -1) }
            }
        }
        return SegmentTable(starts: starts, values: values)
    }
}
