public import PortcullisCore

/// One argument of a directive, as written.
public struct Argument: Sendable, Equatable, CustomStringConvertible {
    public var text: String
    public var quoted: Bool
    public var location: SourceLocation
    public var length: Int

    public init(text: String, quoted: Bool, location: SourceLocation, length: Int) {
        self.text = text
        self.quoted = quoted
        self.location = location
        self.length = length
    }

    public var description: String { text }
}

/// `name arg…;` or `name arg… { children }`, with where it was written.
public struct Directive: Sendable, Equatable {
    public var name: String
    public var nameLocation: SourceLocation
    public var arguments: [Argument]
    /// nil for a simple directive; the children for a block directive.
    public var block: [Directive]?
    /// For a `geo` block: its lines as compact rows (and `block` is empty).
    public var entries: EntryTable?

    public init(name: String, nameLocation: SourceLocation, arguments: [Argument], block: [Directive]?) {
        self.name = name
        self.nameLocation = nameLocation
        self.arguments = arguments
        self.block = block
    }

    /// The directive as one line of text (without its block), for the audit log.
    public var text: String {
        let args = arguments.map { arg in arg.quoted || arg.text.isEmpty ? "\"\(arg.text)\"" : arg.text }
        return ([name] + args).joined(separator: " ") + (block == nil ? ";" : " { … }")
    }

    public var reference: RuleReference {
        RuleReference(file: nameLocation.file, line: nameLocation.line, text: text)
    }
}

/// The parsed rule files: top-level directives with `include`s already spliced in.
public struct RuleFile: Sendable {
    public var mainFile: String
    public var directives: [Directive]
    public var sources: SourceFiles
}
