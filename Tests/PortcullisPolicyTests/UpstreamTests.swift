import Testing
import PortcullisCore
@testable import PortcullisPolicy

func peer(_ name: String, weight: Int = 1, backup: Bool = false, down: Bool = false,
          maxFails: Int = 1, failTimeout: Int = 10_000) -> UpstreamServer {
    let last = UInt32(name.unicodeScalars.first!.value)
    var s = UpstreamServer(endpoint: SocketEndpoint(address: .v4(0x0A00_0000 | last), port: 80), name: name)
    s.weight = weight
    s.backup = backup
    s.down = down
    s.maxFails = maxFails
    s.failTimeoutMilliseconds = failTimeout
    return s
}

@Suite struct UpstreamTests {
    func picks(_ group: UpstreamGroup, _ count: Int, now: Int64 = 0) -> String {
        (0..<count).map { _ in group.pick(excluding: [], now: now).map { group.servers[$0].name } ?? "-" }.joined()
    }

    /// The algorithm as nginx writes it: add each weight to its current weight, take the
    /// largest (first on ties), subtract the total from the winner.
    func reference(weights: [Int], picks: Int) -> [Int] {
        var current = [Int](repeating: 0, count: weights.count)
        let total = weights.reduce(0, +)
        return (0..<picks).map { _ in
            for i in weights.indices { current[i] += weights[i] }
            var best = 0
            for i in weights.indices where current[i] > current[best] { best = i }
            current[best] -= total
            return best
        }
    }

    @Test func smoothWeightedRoundRobin511() {
        let group = UpstreamGroup(name: "g", servers: [peer("a", weight: 5), peer("b"), peer("c")], location: nil)
        #expect(picks(group, 7) == "aabacaa")
        #expect(reference(weights: [5, 1, 1], picks: 7) == [0, 0, 1, 0, 2, 0, 0])
        #expect(picks(group, 7) == "aabacaa")  // the cycle repeats
    }

    @Test(arguments: [[1, 1, 1], [3, 2, 1], [2, 7, 1, 4], [10, 1], [1]])
    func matchesReferenceAlgorithm(weights: [Int]) {
        let names = ["a", "b", "c", "d"]
        let group = UpstreamGroup(name: "g", servers: weights.enumerated().map { peer(names[$0], weight: $1) }, location: nil)
        let expected = reference(weights: weights, picks: 40)
        let actual = (0..<40).map { _ in group.pick(excluding: [], now: 0) ?? -1 }
        #expect(actual == expected)
        // Over one cycle every server gets exactly its weight.
        let cycle = weights.reduce(0, +)
        for (index, weight) in weights.enumerated() {
            #expect(actual.prefix(cycle).filter { $0 == index }.count == weight)
        }
    }

    @Test func downIsNeverPicked() {
        let group = UpstreamGroup(name: "g", servers: [peer("a", down: true), peer("b"), peer("c", weight: 2)], location: nil)
        let seq = picks(group, 30)
        #expect(!seq.contains("a"))
        #expect(seq.filter { $0 == "c" }.count == 20)
        let allDown = UpstreamGroup(name: "g", servers: [peer("a", down: true)], location: nil)
        #expect(allDown.pick(excluding: [], now: 0) == nil)
    }

    @Test func backupOnlyWhenPrimariesFail() {
        let group = UpstreamGroup(name: "g", servers: [
            peer("a", maxFails: 1, failTimeout: 10_000), peer("b", maxFails: 2, failTimeout: 5_000), peer("z", backup: true),
        ], location: nil)
        #expect(picks(group, 4, now: 0) == "abab")
        group.report(0, succeeded: false, now: 1_000)  // a: 1 fail >= max_fails 1 -> out until 11_000
        #expect(picks(group, 3, now: 1_000) == "bbb")
        group.report(1, succeeded: false, now: 2_000)
        #expect(picks(group, 1, now: 2_000) == "b")    // b: 1 of 2 fails, still in
        group.report(1, succeeded: false, now: 3_000)  // b: out until 8_000
        #expect(picks(group, 3, now: 3_000) == "zzz")
        #expect(picks(group, 1, now: 8_000) == "z")     // "<= fail_timeout" still excludes
        #expect(picks(group, 1, now: 8_001) == "b")     // b is back
        #expect(group.pick(excluding: [1], now: 8_001) == 2)
        #expect(group.pick(excluding: [], now: 11_001).map { group.servers[$0].name } != "z")
    }

    @Test func maxFailsZeroNeverMarksDown() {
        let group = UpstreamGroup(name: "g", servers: [peer("a", maxFails: 0), peer("b", backup: true)], location: nil)
        for t in 0..<5 { group.report(0, succeeded: false, now: Int64(t)) }
        #expect(picks(group, 3, now: 5) == "aaa")
    }

    @Test func excludingTriedPeers() {
        let group = UpstreamGroup(name: "g", servers: [peer("a"), peer("b"), peer("c"), peer("z", backup: true)], location: nil)
        #expect(group.pick(excluding: [0], now: 0) == 1)
        #expect(group.pick(excluding: [0, 1], now: 0) == 2)
        #expect(group.pick(excluding: [0, 1, 2], now: 0) == 3)
        #expect(group.pick(excluding: [0, 1, 2, 3], now: 0) == nil)
    }

    @Test func successAfterTimeoutForgetsFailures() {
        let group = UpstreamGroup(name: "g", servers: [peer("a", maxFails: 2, failTimeout: 1_000), peer("z", backup: true)], location: nil)
        group.report(0, succeeded: false, now: 0)
        group.report(0, succeeded: true, now: 1_001)  // fail_timeout passed: failures forgotten
        group.report(0, succeeded: false, now: 1_100)  // 1 of 2 again, not 2 of 2
        #expect(picks(group, 1, now: 1_101) == "a")
        group.report(0, succeeded: false, now: 1_200)
        #expect(picks(group, 1, now: 1_201) == "z")
    }
}
