import PortcullisPolicy
import Testing

/// Swift's `Regex` backtracks without a step limit, so `map` refuses patterns that can take
/// exponential time (a client can choose the string a map matches: a PROXY TLV, later an SNI).
@Suite struct MapRegexRiskTests {
    private func errors(_ key: String) -> [String] {
        let text = "stream {\n    map $remote_addr $m {\n        \"\(key)\" x;\n    }\n    server { listen 8080; proxy_pass 127.0.0.1:9000; }\n}\n"
        return RuleLoader.load(text: text, file: "rules.conf").diagnostics.filter { $0.severity == .error }.map(\.description)
    }

    @Test(arguments: [
        ("~^(a+)+$", "(a+)+"), ("~(\\w*\\s?)*x", "(\\w*\\s?)*"), ("~^(a|ab)+$", "(a|ab)+"), ("~(x{2,})*", "(x{2,})*"),
        ("~*((ab)*c)+", "((ab)*c)+"), ("~^(?:[a-z]+\\.)+example$", "(?:[a-z]+\\.)+"),
    ])
    func nestedRepetitionIsRefused(key: String, group: String) {
        let found = errors(key)
        #expect(found.count == 1)
        #expect(found.first?.contains("can take exponential time: \"\(group)\" repeats a group") == true, "\(found)")
        #expect(found.first?.hasPrefix("rules.conf:3:9: error: regular expression") == true, "\(found)")
    }

    @Test(arguments: [
        "~^(www\\.)?example\\.(com|org)$", "~^10\\.(\\d+)\\.", "~^(?<cc>[A-Z]{2})$", "~(ab)+", "~[a+]+x",
        "~\\(a+\\)+", "~^(a{1,3}b)+$", "~*^(GET|POST) ",
    ])
    func ordinaryPatternsAreAccepted(key: String) {
        #expect(errors(key).isEmpty, "\(key): \(errors(key))")
    }
}
