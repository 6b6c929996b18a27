import PortcullisCore
import PortcullisRules

/// `limit_conn_zone`, `limit_conn`, `limit_rate_zone`, `limit_rate` and their switches.
/// Zones are made here, once per rule file, and shared by every server that names them.
extension PolicyCompiler {
    /// `limit_conn_zone KEY zone=NAME:SIZE;`
    mutating func limitConnZone(_ d: Directive) -> LimitConnZone? {
        guard d.arguments.count == 2, let key = template(d.arguments[0], in: d),
              let (name, size) = zoneParameter(d.arguments[1], in: d) else {
            if d.arguments.count != 2 { error("invalid number of arguments in \"limit_conn_zone\": expected KEY zone=NAME:SIZE", at: d) }
            return nil
        }
        return carried.carry(LimitConnZone(name: name, key: key, size: size, location: d.nameLocation))
    }

    /// `limit_rate_zone KEY zone=NAME:SIZE rate=R [burst=B];`
    mutating func limitRateZone(_ d: Directive) -> LimitRateZone? {
        guard (3...4).contains(d.arguments.count) else {
            error("invalid number of arguments in \"limit_rate_zone\": expected KEY zone=NAME:SIZE rate=RATE [burst=N]", at: d)
            return nil
        }
        guard let key = template(d.arguments[0], in: d), let (name, size) = zoneParameter(d.arguments[1], in: d) else { return nil }
        var rate: (kind: LimitRateZone.Kind, perSecond: Double, text: String)?
        var burst: Double?
        for argument in d.arguments.dropFirst(2) {
            if argument.text.hasPrefix("rate=") {
                let text = String(argument.text.dropFirst(5))
                rate = parseRate(text)
                if rate == nil {
                    error("invalid rate \"\(text)\" in \"limit_rate_zone\"; expected sessions such as 10r/s or 100r/m, or bytes per second such as 512k or 1m", at: argument)
                    return nil
                }
            } else if argument.text.hasPrefix("burst=") {
                let text = String(argument.text.dropFirst(6))
                // Sessions for a session rate, a size for a bandwidth rate.
                if let n = Int(text), n > 0 {
                    burst = Double(n)
                } else if let bytes = Units.size(text), bytes > 0 {
                    burst = Double(bytes)
                } else {
                    error("invalid burst \"\(text)\" in \"limit_rate_zone\"; expected a positive number (or a size for a bandwidth rate)", at: argument)
                    return nil
                }
            } else {
                error("invalid parameter \"\(argument.text)\" in \"limit_rate_zone\"; expected rate= or burst=", at: argument)
                return nil
            }
        }
        guard let rate else {
            error("no \"rate=\" in \"limit_rate_zone\"; expected e.g. rate=10r/s or rate=1m", at: d)
            return nil
        }
        // burst defaults to one second's worth (at least one session).
        let defaultBurst = rate.kind == .sessions ? max(1, rate.perSecond.rounded(.up)) : rate.perSecond
        return carried.carry(LimitRateZone(name: name, key: key, kind: rate.kind, rate: rate.perSecond,
                                           burst: burst ?? defaultBurst, size: size, rateText: rate.text, location: d.nameLocation))
    }

    /// `10r/s`, `100r/m` (sessions); `512k`, `1m`, `1m/s` (bytes per second).
    func parseRate(_ text: String) -> (kind: LimitRateZone.Kind, perSecond: Double, text: String)? {
        for (suffix, seconds) in [("r/s", 1.0), ("r/m", 60.0)] where text.hasSuffix(suffix) {
            guard let n = Int(text.dropLast(suffix.count)), n > 0 else { return nil }
            return (.sessions, Double(n) / seconds, text)
        }
        let sizeText = text.hasSuffix("/s") ? String(text.dropLast(2)) : text
        guard let bytes = Units.size(sizeText), bytes > 0 else { return nil }
        return (.bandwidth, Double(bytes), text)
    }

    /// `zone=NAME:SIZE`, with nginx's minimum of 32 KiB.
    mutating func zoneParameter(_ argument: Argument, in d: Directive) -> (String, Int)? {
        let text = argument.text
        guard text.hasPrefix("zone="), let colon = text.lastIndex(of: ":") else {
            error("invalid zone \"\(text)\" in \"\(d.name)\"; expected zone=NAME:SIZE such as zone=addr:10m", at: argument)
            return nil
        }
        let name = String(text[text.index(text.startIndex, offsetBy: 5)..<colon])
        let sizeText = String(text[text.index(after: colon)...])
        guard !name.isEmpty else {
            error("invalid zone \"\(text)\" in \"\(d.name)\": the zone has no name", at: argument)
            return nil
        }
        guard let size = Units.size(sizeText) else {
            error("invalid zone size \"\(sizeText)\" in \"\(d.name)\"; expected a size such as 10m", at: argument)
            return nil
        }
        guard size >= 32 * 1024 else {
            error("zone \"\(name)\" is too small (\(sizeText)); the least is 32k", at: argument)
            return nil
        }
        return (name, size)
    }

    /// The zone an argument names, or an error with "did you mean".
    private mutating func zone<Zone>(named argument: Argument, in zones: [String: Zone], kind: String) -> Zone? {
        if let zone = zones[argument.text] { return zone }
        var message = "unknown \(kind) \"\(argument.text)\""
        if let guess = closestMatch(to: argument.text, in: zones.keys) { message += "; did you mean \"\(guess)\"?" }
        error(message, at: argument)
        return nil
    }

    /// `limit_conn NAME N;`
    mutating func limitConn(_ d: Directive, zones: [String: LimitConnZone]) -> LimitConnRule? {
        guard d.arguments.count == 2 else {
            error("invalid number of arguments in \"limit_conn\": expected ZONE NUMBER", at: d)
            return nil
        }
        guard let zone = zone(named: d.arguments[0], in: zones, kind: "limit_conn_zone") else { return nil }
        guard let n = Int(d.arguments[1].text), n > 0 else {
            error("invalid number of connections \"\(d.arguments[1].text)\" in \"limit_conn\"; expected 1 to 65535", at: d.arguments[1])
            return nil
        }
        guard n < 65536 else {
            error("connection limit must be less 65536", at: d.arguments[1])  // nginx's words
            return nil
        }
        return LimitConnRule(zone: zone, limit: n, reference: d.reference)
    }

    /// `limit_rate NAME;`
    mutating func limitRate(_ d: Directive, zones: [String: LimitRateZone]) -> LimitRateRule? {
        guard d.arguments.count == 1 else {
            error("invalid number of arguments in \"limit_rate\": expected the name of a limit_rate_zone", at: d)
            return nil
        }
        guard let zone = zone(named: d.arguments[0], in: zones, kind: "limit_rate_zone") else { return nil }
        return LimitRateRule(zone: zone, reference: d.reference)
    }

    /// The switches (`*_dry_run`, `limit_conn_log_level`, `proxy_*_rate`); true if `d` was one.
    mutating func applyLimitSetting(_ d: Directive, to limits: inout LimitSettings) -> Bool {
        let argument = d.arguments[0]
        switch d.name {
        case "limit_conn_dry_run": if let v = flag(argument, in: d) { limits.connDryRun = v }
        case "limit_rate_dry_run": if let v = flag(argument, in: d) { limits.rateDryRun = v }
        case "access_dry_run": if let v = flag(argument, in: d) { limits.accessDryRun = v }
        case "limit_conn_log_level":
            guard let level = ErrorLogSpec.Level(rawValue: argument.text), [.info, .notice, .warn, .error].contains(level) else {
                error("invalid value \"\(argument.text)\" in \"limit_conn_log_level\"; it must be info, notice, warn or error", at: argument)
                return true
            }
            limits.connLogLevel = level
        case "proxy_upload_rate", "proxy_download_rate":
            let upload = d.name == "proxy_upload_rate"
            if argument.text.contains("$") {
                // nginx 1.17.0: a size made of variables, worked out per session.
                guard let value = template(argument, in: d) else { return true }
                if upload { (limits.uploadRateTemplate, limits.uploadRate) = (value, 0) } else { (limits.downloadRateTemplate, limits.downloadRate) = (value, 0) }
                return true
            }
            guard let bytes = size(argument, in: d) else { return true }
            if upload { (limits.uploadRate, limits.uploadRateTemplate) = (bytes, nil) } else { (limits.downloadRate, limits.downloadRateTemplate) = (bytes, nil) }
        default:
            return false
        }
        return true
    }
}
