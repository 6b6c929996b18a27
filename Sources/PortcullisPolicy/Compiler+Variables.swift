import PortcullisCore
import PortcullisRules

/// `geo`, `map`, `geoip2` and `set`: declaring every name first (so a definition may use a
/// variable defined further down, as in nginx), compiling each definition, and refusing cycles.
extension PolicyCompiler {
    // MARK: Names

    /// Reserves a number for every variable the stream defines; a clash is an error.
    mutating func declareVariables(stream children: [Directive], servers: [Directive]) {
        func declare(_ argument: Argument, by d: Directive) {
            guard let name = variableName(argument, in: d) else { return }
            if Variable(name: name) != nil {
                error("\"$\(name)\" is a built-in variable; \"\(d.name)\" cannot redefine it", at: argument)
                return
            }
            if let existing = variables.index(of: name), definedBy[existing] != "set" || d.name != "set" {
                error("duplicate variable \"$\(name)\"; it was first defined at \(variables.locations[existing])", at: argument)
                return
            }
            let index = variables.declare(name, at: argument.location)
            definedBy[index] = d.name
        }
        for d in children {
            switch d.name {
            case "geo", "map", "split_clients":
                if let last = d.arguments.last, (1...2).contains(d.arguments.count) { declare(last, by: d) }
            case "geoip2":
                for child in d.block ?? [] where child.name.hasPrefix("$") {
                    declare(Argument(text: child.name, quoted: false, location: child.nameLocation, length: child.name.count),
                            by: d)
                }
            default: break
            }
        }
        for server in servers {
            for d in server.block ?? [] where d.name == "set" && d.arguments.count == 2 {
                declare(d.arguments[0], by: d)
            }
        }
    }

    /// `$name` → "name", or an error.
    mutating func variableName(_ argument: Argument, in d: Directive) -> String? {
        let text = argument.text
        let name = text.dropFirst()
        guard text.hasPrefix("$"), !name.isEmpty,
              name.allSatisfy({ $0.isASCII && ($0.isLetter || $0.isNumber || $0 == "_") }) else {
            error("invalid variable name \"\(text)\" in \"\(d.name)\"; expected \"$\" and a name of letters, digits and \"_\"", at: argument)
            return nil
        }
        return String(name)
    }

    /// A name in a template: a built-in variable, or one the rules define.
    func resolveVariable(_ name: String) -> Variable? {
        if let builtin = Variable(name: name) { return builtin }
        return variables.index(of: name).map(Variable.defined)
    }

    var knownVariableNames: [String] { Variable.knownNames + variables.names }

    // MARK: geo

    /// `geo [$src] $var { … }`
    mutating func compileGeo(_ d: Directive) {
        guard let nameArgument = d.arguments.last, let name = variableName(nameArgument, in: d),
              let index = variables.index(of: name), definedBy[index] == "geo" else { return }
        var source: LogTemplate?
        if d.arguments.count == 2 {
            guard let parsed = template(d.arguments[0], in: d) else { return }
            // The default source needs no rendering and parsing: read the address directly.
            if parsed.parts != [.variable(.fixed(.remoteAddr))] { source = parsed }
        }
        let entries = d.entries ?? EntryTable()
        guard entries.count < LongestPrefixTable<UInt32>.maximumPackedBlocks else {
            error("a \"geo\" block may have at most \(LongestPrefixTable<UInt32>.maximumPackedBlocks - 1) entries; this one has \(entries.count)", at: d)
            return
        }
        var ranges = false
        for row in 0..<entries.count where entries.wordCount(row) == 1 && entries.bytes(row, 0).elementsEqual("ranges".utf8) {
            ranges = true
        }
        var builder = GeoVariable.Builder(ranges: ranges)
        builder.source = source
        var seenEntry = false
        var ok = true
        for row in 0..<entries.count {
            // The common line first, without making strings: `a.b.c.d/n value;`.
            if !ranges, entries.wordCount(row) == 2,
               let block = entries.withWord(row, 0, { CIDR.simpleIPv4($0) }) {
                seenEntry = true
                if block.hostBitsSet { warnHostBits(entries.argument(row, 0), block) }
                builder.add(block, valueIndex: entries.withWord(row, 1) { builder.intern($0) })
                continue
            }
            let key = entries.word(row, 0)
            let keyArgument = entries.argument(row, 0)
            switch key {
            case "ranges":
                if entries.wordCount(row) != 1 {
                    error("\"ranges\" takes no value", at: entries.argument(row, 1)); ok = false
                } else if seenEntry {
                    error("\"ranges\" must come before the first entry of the \"geo\" block", at: keyArgument); ok = false
                }
                continue
            case "volatile" where entries.wordCount(row) == 1:
                continue  // nothing is cached across sessions anyway: nothing to do
            case "proxy", "proxy_recursive":
                error("\"\(key)\" is an HTTP geo parameter; nginx's stream geo has none (use set_real_ip_from)", at: keyArgument)
                ok = false
                continue
            default: break
            }
            seenEntry = true
            guard entries.wordCount(row) == 2 else {
                error("invalid entry in \"geo\": expected \"NETWORK VALUE;\", \"default VALUE;\" or \"delete NETWORK;\"", at: keyArgument)
                ok = false
                continue
            }
            let argument = entries.argument(row, 1)
            switch key {
            case "default":
                builder.defaultValue = Array(entries.bytes(row, 1))
            case "delete":
                if ranges {
                    guard let range = ipv4Range(argument.text, argument: argument) else { ok = false; continue }
                    if !builder.deleteRange(range) {
                        // nginx's warning: only ranges as stored (cut at /16 boundaries) can go.
                        diagnostics.warning("no address range \"\(argument.text)\" to delete (only a range exactly as written before, within each /16, can be deleted)",
                                            at: argument.location, length: argument.length)
                    }
                } else {
                    guard let block = geoBlock(argument.text, at: argument) else { ok = false; continue }
                    builder.delete(block)
                }
            default:
                if ranges {
                    guard let range = ipv4Range(key, argument: keyArgument) else { ok = false; continue }
                    if let problem = builder.add(range: range, value: Array(entries.bytes(row, 1))) {
                        let overlapped = "\(IPAddress.v4(problem.overlapped.lowerBound))-\(IPAddress.v4(problem.overlapped.upperBound))"
                        error("range \"\(key)\" overlaps \"\(overlapped)\"; in \"ranges\" mode a range may only lie inside an earlier one (as nginx)", at: keyArgument)
                        ok = false
                    }
                } else {
                    guard let block = geoBlock(key, at: keyArgument) else { ok = false; continue }
                    builder.add(block, value: Array(entries.bytes(row, 1)))
                }
            }
        }
        if ok { variables.define(index, as: .geo(builder.build())) }
    }

    private mutating func warnHostBits(_ argument: Argument, _ block: CIDR) {
        diagnostics.warning("low address bits of \(argument.text) are meaningless; the entry applies to \(block)",
                            at: argument.location, length: argument.length)
    }

    /// A geo key in CIDR mode: a block or a single address.
    mutating func geoBlock(_ text: String, at argument: Argument) -> CIDR? {
        if let block = CIDR(text) {
            if block.hostBitsSet { warnHostBits(argument, block) }
            return block
        }
        error("invalid network \"\(text)\" in \"geo\"; expected an address or a block such as 10.0.0.0/8 or 2001:db8::/32", at: argument)
        return nil
    }

    /// `A.B.C.D-E.F.G.H` in `ranges` mode (IPv4 only, as nginx).
    mutating func ipv4Range(_ text: String, argument: Argument) -> ClosedRange<UInt32>? {
        let parts = text.split(separator: "-", omittingEmptySubsequences: false)
        if parts.count == 2, case .v4(let from)? = IPAddress(parts[0]), case .v4(let to)? = IPAddress(parts[1]) {
            guard from <= to else {
                error("invalid range \"\(text)\" in \"geo\": the first address is above the last", at: argument)
                return nil
            }
            return from...to
        }
        error("invalid range \"\(text)\" in \"geo ranges\"; expected FIRST-LAST such as 10.0.0.0-10.0.255.255 (IPv4 only, as nginx)", at: argument)
        return nil
    }

    // MARK: map

    /// `map SRC $var { … }`
    mutating func compileMap(_ d: Directive) {
        guard d.arguments.count == 2, let name = variableName(d.arguments[1], in: d),
              let index = variables.index(of: name), definedBy[index] == "map",
              let source = template(d.arguments[0], in: d) else { return }
        let entries = d.block ?? []
        let hostnames = entries.contains { $0.name == "hostnames" && $0.arguments.isEmpty }
        var map = MapVariable(source: source, hostnames: hostnames)
        var seenEntry = false
        var ok = true
        var exactSites: [String: SourceLocation] = [:]
        for entry in entries {
            if entry.name == "hostnames" && entry.arguments.isEmpty {
                if seenEntry { error("\"hostnames\" must come before the first entry of the \"map\" block", at: entry); ok = false }
                continue
            }
            if entry.name == "volatile" && entry.arguments.isEmpty { continue }
            seenEntry = true
            guard entry.arguments.count == 1, entry.block == nil else {
                error("invalid entry in \"map\": expected \"KEY VALUE;\" or \"default VALUE;\"", at: entry)
                ok = false
                continue
            }
            let valueArgument = entry.arguments[0]
            var key = entry.name
            let keyArgument = Argument(text: key, quoted: false, location: entry.nameLocation, length: key.count)
            if key == "default" {
                if map.defaultValue != nil {
                    error("duplicate default map parameter", at: keyArgument)  // nginx's words
                    ok = false
                    continue
                }
                guard let value = template(valueArgument, in: d) else { ok = false; continue }
                map.defaultValue = map.values.count
                map.values.append(value)
                continue
            }
            if key.hasPrefix("~") {
                let caseInsensitive = key.hasPrefix("~*")
                let pattern = String(key.dropFirst(caseInsensitive ? 2 : 1))
                let regex: MapRegex
                do {
                    regex = try MapRegex(pattern: pattern, caseInsensitive: caseInsensitive, value: map.values.count)
                } catch {
                    self.error("invalid regular expression \"\(pattern)\" in \"map\": \(error)", at: keyArgument)
                    ok = false
                    continue
                }
                let table = variables
                guard let value = template(valueArgument, in: d, resolve: { name in
                    if name.count == 1, let digit = Int(name) { return .capture(digit) }
                    if let number = regex.groupNumber(named: name) { return .capture(number) }
                    return Variable(name: name) ?? table.index(of: name).map(Variable.defined)
                }) else { ok = false; continue }
                map.values.append(value)
                map.regexes.append(regex)
                continue
            }
            if key.hasPrefix("\\") { key.removeFirst() }  // `\default`, `\~x`: a literal key
            guard let value = template(valueArgument, in: d) else { ok = false; continue }
            let valueIndex = map.values.count
            map.values.append(value)
            let lowered = key.lowercased()
            // Keys are compared case-insensitively, so `A` after `a` is the same key (nginx:
            // "conflicting parameter"); masks are keyed by their kind too.
            // (`.example.com` and `*.example.com` share the mask ".example.com".)
            let site = hostnames && (lowered.hasPrefix("*.") || lowered.hasPrefix("."))
                ? "prefix:" + (lowered.hasPrefix("*") ? String(lowered.dropFirst()) : lowered)
                : (hostnames && lowered.hasSuffix(".*") ? "suffix:" : "exact:") + lowered
            if let first = exactSites[site] {
                error("conflicting key \"\(key)\" in \"map\"; it was first given at \(first)", at: keyArgument)
                ok = false
                continue
            }
            exactSites[site] = entry.nameLocation
            if hostnames && (lowered.hasPrefix("*.") || lowered.hasPrefix(".")) {
                let suffix = lowered.hasPrefix("*") ? String(lowered.dropFirst()) : lowered
                map.prefixMasks[suffix] = (valueIndex, !lowered.hasPrefix("*"))
            } else if hostnames && lowered.hasSuffix(".*") {
                map.suffixMasks[String(lowered.dropLast())] = valueIndex
            } else {
                map.exact[lowered] = valueIndex
            }
        }
        if ok { variables.define(index, as: .map(map)) }
    }

    // MARK: split_clients

    /// `split_clients STRING $var { PERCENT% VALUE; … [* VALUE;] }`
    mutating func compileSplitClients(_ d: Directive) {
        guard d.arguments.count == 2, let name = variableName(d.arguments[1], in: d),
              let index = variables.index(of: name), definedBy[index] == "split_clients",
              let source = template(d.arguments[0], in: d) else { return }
        var hundredths: [UInt32] = []
        var values: [[UInt8]] = []
        var ok = true
        for entry in d.block ?? [] {
            let keyArgument = Argument(text: entry.name, quoted: false, location: entry.nameLocation, length: entry.name.count)
            guard entry.arguments.count == 1, entry.block == nil else {
                error("invalid entry in \"split_clients\": expected \"PERCENT% VALUE;\" or \"* VALUE;\"", at: entry)
                ok = false
                continue
            }
            if entry.name == "*" {
                hundredths.append(0)
            } else if entry.name.hasSuffix("%"), let part = SplitClientsVariable.hundredths(entry.name.dropLast()) {
                hundredths.append(part)
            } else {
                error("invalid percent value \"\(entry.name)\" in \"split_clients\"; expected a percentage such as 0.5% or 25%, with at most two decimals, or \"*\"", at: keyArgument)
                ok = false
                continue
            }
            values.append(Array(entry.arguments[0].text.utf8))
        }
        guard ok else { return }
        guard let bounds = SplitClientsVariable.bounds(hundredths) else {
            error("percent total is greater than 100% in \"split_clients\"", at: d)
            return
        }
        variables.define(index, as: .splitClients(SplitClientsVariable(source: source, buckets: Array(zip(bounds, values)))))
    }

    // MARK: geoip2

    /// `geoip2 FILE { auto_reload T; $var [default=V] [source=$v] PATH…; $var metadata FIELD; }`
    mutating func compileGeoIP2(_ d: Directive) {
        let file = d.arguments[0]
        var autoReload: Int?
        for entry in d.block ?? [] where entry.name == "auto_reload" {
            guard entry.arguments.count == 1, let ms = Units.milliseconds(entry.arguments[0].text) else {
                error("invalid \"auto_reload\"; expected one interval such as 5m", at: entry)
                return
            }
            autoReload = ms > 0 ? ms : nil
        }
        guard let geoip else {
            error("GeoIP databases cannot be opened in this context", at: file)
            return
        }
        let database: any GeoIPDatabase
        do throws(GeoIPOpenFailure) {
            database = try geoip.open(path: RuleParser.resolve(file.text, relativeTo: file.location.file),
                                      autoReloadMilliseconds: autoReload)
        } catch {
            self.error("\(error.message) (in \"geoip2\")", at: file)
            return
        }
        geoipDatabases.append(database)
        for entry in d.block ?? [] where entry.name != "auto_reload" {
            guard entry.name.hasPrefix("$") else {
                error("invalid parameter \"\(entry.name)\" in \"geoip2\"; expected \"$variable [default=V] [source=$v] PATH…\", \"$variable metadata FIELD\" or \"auto_reload INTERVAL\"", at: entry)
                continue
            }
            guard let index = variables.index(of: String(entry.name.dropFirst())), definedBy[index] == "geoip2" else { continue }
            var arguments = entry.arguments[...]
            if arguments.first?.text == "metadata" {
                guard arguments.count == 2, let field = GeoIPMetadataField(rawValue: arguments.last!.text) else {
                    let fields = GeoIPMetadataField.allCases.map(\.rawValue).joined(separator: ", ")
                    error("invalid \"metadata\" in \"geoip2\"; expected one of: \(fields)", at: arguments.last ?? entry.arguments[0])
                    continue
                }
                variables.define(index, as: .geoip2Metadata(database, field))
                continue
            }
            var defaultValue: [UInt8]?
            var source: LogTemplate?
            var valid = true
            while let argument = arguments.first, argument.text.hasPrefix("default=") || argument.text.hasPrefix("source=") {
                arguments = arguments.dropFirst()
                if argument.text.hasPrefix("default=") {
                    // As leev's module: an empty default is no default (the value is "not found").
                    let value = Array(argument.text.dropFirst("default=".count).utf8)
                    defaultValue = value.isEmpty ? nil : value
                } else {
                    let text = String(argument.text.dropFirst("source=".count))
                    var located = argument
                    located.text = text
                    located.location.column += "source=".count
                    guard text.hasPrefix("$"), let parsed = template(located, in: entry) else {
                        if !text.hasPrefix("$") { error("\"source=\" in \"geoip2\" must name a variable, such as source=$remote_addr", at: argument) }
                        valid = false
                        continue
                    }
                    if parsed.parts != [.variable(.fixed(.remoteAddr))] { source = parsed }
                }
            }
            guard !arguments.isEmpty else {
                error("no lookup path for \"\(entry.name)\" in \"geoip2\"; expected one such as \"country iso_code\"", at: entry)
                continue
            }
            guard valid else { continue }
            let path = arguments.map(\.text)
            variables.define(index, as: .geoip2(GeoIP2Variable(
                database: database, query: database.makeQuery(path), defaultValue: defaultValue, source: source)))
        }
    }

    // MARK: set

    /// `set $var VALUE;` in a server (ordinal `server`); a later `set` replaces an earlier one.
    mutating func compileSet(_ d: Directive, server: Int) -> Bool {
        guard let name = variableName(d.arguments[0], in: d), let index = variables.index(of: name),
              definedBy[index] == "set", let value = template(d.arguments[1], in: d) else { return false }
        guard case .set(var values) = variables.definitions[index] else { return false }
        var current = value
        if current.definedVariables.contains(index) {
            // nginx runs a server's `set` lines in order, so `$x` in `set $x "${x}b";` is what
            // the earlier `set` gave it (nothing, before the first one). The earlier value
            // becomes a hidden variable of its own, and this value reads that one.
            var earlier: [LogTemplate.Part] = []
            if let previous = values[server] {
                let hidden = variables.declare("\(name)#\(variables.count)", at: d.nameLocation)  // "#": no $name can say it
                definedBy[hidden] = "set"
                variables.define(hidden, as: .set([server: previous]))
                earlier = [.variable(.defined(hidden))]
            }
            current = LogTemplate(parts: current.parts.flatMap { part -> [LogTemplate.Part] in
                part == .variable(.defined(index)) ? earlier : [part]
            })
        }
        values[server] = current
        variables.define(index, as: .set(values))
        return true
    }

    // MARK: Cycles

    /// `map $a $b {…}` with `map $b $a {…}` would never finish evaluating: refuse it here.
    mutating func checkVariableCycles() {
        enum Mark { case unvisited, inProgress, done }
        var marks = Array(repeating: Mark.unvisited, count: variables.count)
        var reported = false
        func visit(_ index: Int, path: [Int]) {
            guard !reported else { return }
            switch marks[index] {
            case .done: return
            case .inProgress:
                let cycle = (path.drop { $0 != index } + [index]).map { "$" + variables.names[$0] }
                diagnostics.error("variables refer to each other in a cycle: \(cycle.joined(separator: " → "))",
                                  at: variables.locations[index], length: variables.names[index].count + 1)
                reported = true
                return
            case .unvisited:
                marks[index] = .inProgress
                for template in variables.definitions[index].templates {
                    for next in template.definedVariables { visit(next, path: path + [index]) }
                }
                marks[index] = .done
            }
        }
        for index in 0..<variables.count { visit(index, path: []) }
    }
}
