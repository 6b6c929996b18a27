/// nginx's size and time arguments.
public enum Units {
    /// `512`, `16k`, `10m`, `1g` (case-insensitive) in bytes.
    public static func size(_ text: String) -> Int? {
        guard let last = text.last else { return nil }
        let multiplier: Int
        var digits = Substring(text)
        switch last {
        case "k", "K": multiplier = 1 << 10; digits = digits.dropLast()
        case "m", "M": multiplier = 1 << 20; digits = digits.dropLast()
        case "g", "G": multiplier = 1 << 30; digits = digits.dropLast()
        default: multiplier = 1
        }
        guard !digits.isEmpty, digits.allSatisfy({ $0.isASCII && $0.isNumber }),
              let value = Int(digits), value <= Int.max / multiplier else { return nil }
        return value * multiplier
    }

    /// `500ms`, `30s`, `10m`, `1h`, `1d`, `1w`, `1M`, `1y`, combinable (`1m30s`); a bare number
    /// is seconds. Returns milliseconds.
    public static func milliseconds(_ text: String) -> Int? {
        let units: [(String, Int)] = [
            ("ms", 1), ("s", 1000), ("m", 60_000), ("h", 3_600_000), ("d", 86_400_000),
            ("w", 604_800_000), ("M", 2_592_000_000), ("y", 31_536_000_000),
        ]
        var rest = Substring(text)
        guard !rest.isEmpty else { return nil }
        if rest.allSatisfy({ $0.isASCII && $0.isNumber }) {
            guard let seconds = Int(rest), seconds <= Int.max / 1000 else { return nil }
            return seconds * 1000
        }
        var total = 0
        var lastScale = Int.max
        while !rest.isEmpty {
            let digits = rest.prefix { $0.isASCII && $0.isNumber }
            guard !digits.isEmpty, let value = Int(digits) else { return nil }
            rest = rest.dropFirst(digits.count)
            guard let (unit, scale) = units.first(where: { rest.hasPrefix($0.0) && !(($0.0 == "m") && rest.hasPrefix("ms")) })
            else { return nil }
            // Units must go from large to small, each once (nginx rejects "30s1m").
            guard scale < lastScale, value <= (Int.max - total) / scale else { return nil }
            lastScale = scale
            total += value * scale
            rest = rest.dropFirst(unit.count)
        }
        return total
    }
}
