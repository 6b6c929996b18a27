/// The deadlines of one event loop: a binary min-heap of (deadline, session slot, generation).
///
/// No cancellation: a session keeps the earliest deadline it has in the heap
/// (`TCPSession.heapDeadline`) and pushes only an earlier one, so moving a deadline later (an
/// idle timeout after activity) costs nothing, and an entry whose slot was reused (another
/// generation) or whose session no longer wants it is dropped when it comes due. With 10,000
/// idle sessions that is 10,000 entries of 16 bytes, one push per `proxy_timeout` each.
struct TimerHeap {
    struct Entry: Equatable {
        var deadline: UInt64
        /// The session's slot and generation (`SessionSlab`).
        var slot: UInt32
        var generation: UInt32
    }

    private(set) var entries: [Entry] = []

    var isEmpty: Bool { entries.isEmpty }
    var count: Int { entries.count }
    var earliest: UInt64? { entries.first?.deadline }

    mutating func push(_ entry: Entry) {
        entries.append(entry)
        var child = entries.count - 1
        while child > 0 {
            let parent = (child - 1) / 2
            guard entries[child].deadline < entries[parent].deadline else { break }
            entries.swapAt(child, parent)
            child = parent
        }
    }

    /// The earliest entry if it is due at `now`.
    mutating func popDue(now: UInt64) -> Entry? {
        guard let first = entries.first, first.deadline <= now else { return nil }
        let last = entries.removeLast()
        if !entries.isEmpty {
            entries[0] = last
            var parent = 0
            while true {
                let left = 2 * parent + 1, right = left + 1
                var smallest = parent
                if left < entries.count, entries[left].deadline < entries[smallest].deadline { smallest = left }
                if right < entries.count, entries[right].deadline < entries[smallest].deadline { smallest = right }
                guard smallest != parent else { break }
                entries.swapAt(parent, smallest)
                parent = smallest
            }
        }
        return first
    }
}
