#if canImport(Glibc)
import Glibc
#endif
public import Logging
public import PortcullisPolicy

/// A swift-log handler that writes nginx's error-log format, so log watchers written for nginx
/// (fail2ban's `access forbidden by rule` filter, for one) keep working:
///
///     2026/11/27 18:57:55 [error] 4242#0: *17 access forbidden by rule, client: 127.0.0.2, server: 127.0.0.1:8080
///
/// The connection number comes from the `connection` metadata key. Lines go through a
/// `LogFile`, so logging never blocks an event loop.
public struct ErrorLogHandler: LogHandler {
    private let file: LogFile
    public var metadata: Logger.Metadata = [:]
    public var logLevel: Logger.Level

    public init(file: LogFile, level: ErrorLogSpec.Level) {
        self.file = file
        self.logLevel = Self.swiftLogLevel(level)
    }

    public static func swiftLogLevel(_ level: ErrorLogSpec.Level) -> Logger.Level {
        switch level {
        case .debug: return .debug
        case .info: return .info
        case .notice: return .notice
        case .warn: return .warning
        case .error: return .error
        case .crit, .alert, .emerg: return .critical
        }
    }

    private static func nginxName(_ level: Logger.Level) -> String {
        switch level {
        case .trace, .debug: return "debug"
        case .info: return "info"
        case .notice: return "notice"
        case .warning: return "warn"
        case .error: return "error"
        case .critical: return "crit"
        }
    }

    public subscript(metadataKey key: String) -> Logger.Metadata.Value? {
        get { metadata[key] }
        set { metadata[key] = newValue }
    }

    public func log(event: LogEvent) {
        var now = time_t(time(nil))
        var t = tm()
        localtime_r(&now, &t)
        func pad(_ v: Int32) -> String { v < 10 ? "0\(v)" : "\(v)" }
        var line = "\(t.tm_year + 1900)/\(pad(t.tm_mon + 1))/\(pad(t.tm_mday)) \(pad(t.tm_hour)):\(pad(t.tm_min)):\(pad(t.tm_sec))"
        line += " [\(Self.nginxName(event.level))] \(getpid())#0: "
        let merged = metadata.merging(event.metadata ?? [:]) { $1 }
        if let connection = merged["connection"] { line += "*\(connection) " }
        // Control bytes are escaped so nothing can start a forged line; quotes stay, as nginx's
        // `upstream: "10.0.0.1:80"` has them.
        for byte in event.message.description.utf8 {
            if byte < 0x20 || byte == 0x7F {
                line += "\\x" + String(byte, radix: 16, uppercase: true).leftPadded(to: 2)
            } else {
                line.unicodeScalars.append(Unicode.Scalar(byte))
            }
        }
        file.write(line)
    }
}

extension String {
    fileprivate func leftPadded(to width: Int) -> String {
        String(repeating: "0", count: max(0, width - count)) + self
    }
}
