import PortcullisCore

/// One JSON line of the audit log for a refused session: who, when, where, and which rule.
/// Every string goes through the JSON escaper, so a hostile value cannot forge a field or a line;
/// unlike nginx's `escape=json` (which the access log keeps), it escapes the Unicode line
/// separators too (`LogEscaping.appendJSONEscaped(_:to:lineSeparators:)`).
public enum AuditLine {
    public static func render(_ r: SessionRecord) -> String {
        var fields: [(String, String)] = [
            ("time", LogEscaping.jsonString(TimeText.iso8601(r.endTime, milliseconds: true))),
            ("connection", String(r.connection)),
            ("listener", LogEscaping.jsonString(r.listener)),
            ("protocol", LogEscaping.jsonString(r.transport.rawValue)),
            ("client", LogEscaping.jsonString(r.client.hostText)),
            ("client_port", r.client.isUnix ? "null" : String(r.client.port)),
            // The TCP peer: differs from the client when a trusted PROXY header named another.
            ("peer", LogEscaping.jsonString(r.peer.description)),
            ("server", LogEscaping.jsonString(r.server.description)),
            ("status", String(r.status.rawValue)),
            ("phase", LogEscaping.jsonString(r.phase.rawValue)),
        ]
        if let rule = r.rule {
            fields.append(("rule", "{\"at\":\(LogEscaping.jsonString(rule.position)),"
                + "\"file\":\(LogEscaping.jsonString(rule.file)),\"line\":\(rule.line),"
                + "\"text\":\(LogEscaping.jsonString(rule.text))}"))
        } else {
            fields.append(("rule", "null"))
        }
        if let variable = r.decidingVariable {
            // The value came from a lookup or a client-chosen header: escaped like everything else.
            var value = "\""
            LogEscaping.appendJSONEscaped(variable.value, to: &value, lineSeparators: true)
            fields.append(("variable", "{\"name\":\(LogEscaping.jsonString(variable.name)),\"value\":\(value)\"}"))
        }
        if let limit = r.limit {
            var key = "\""
            LogEscaping.appendJSONEscaped(limit.key, to: &key, lineSeparators: true)  // a key can hold client-chosen bytes
            fields.append(("limit", "{\"zone\":\(LogEscaping.jsonString(limit.zone)),\"key\":\(key)\",\"limit\":\(LogEscaping.jsonString(limit.limit))}"))
        }
        if let reason = r.reason { fields.append(("reason", LogEscaping.jsonString(reason))) }
        if !r.upstreamAttempts.isEmpty {
            let list = r.upstreamAttempts.map { LogEscaping.jsonString($0.address.description) }
            fields.append(("upstream", "[" + list.joined(separator: ",") + "]"))
        }
        fields.append(("dry_run", r.outcome.enforcement == .dryRun ? "true" : "false"))
        return "{" + fields.map { "\"\($0.0)\":\($0.1)" }.joined(separator: ",") + "}"
    }
}
