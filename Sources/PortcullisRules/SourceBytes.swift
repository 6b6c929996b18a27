#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif
public import PortcullisCore

extension SourceLocation {
    /// Where byte `offset` of `bytes` is, counted the way the lexer counts: lines from 1,
    /// columns from 1 in characters (UTF-8 continuation bytes do not move the column).
    init(offset: Int, in bytes: [UInt8], file: String) {
        var line = 1
        var column = 1
        for byte in bytes[..<min(offset, bytes.count)] {
            if byte == UInt8(ascii: "\n") {
                line += 1
                column = 1
            } else if byte & 0xC0 != 0x80 {
                column += 1
            }
        }
        self.init(file: file, line: line, column: column)
    }
}

enum UTF8Check {
    /// The offset of the first NUL byte in `range` of `bytes`, if any.
    static func firstNul(_ bytes: [UInt8], in range: Range<Int>) -> Int? {
        bytes.withUnsafeBufferPointer { buffer in
            guard let base = buffer.baseAddress, !range.isEmpty,
                  let found = memchr(base + range.lowerBound, 0, range.count) else { return nil }
            return base.distance(to: found.assumingMemoryBound(to: UInt8.self))
        }
    }

    /// The offset of the first byte that is not part of well-formed UTF-8, or nil if all is.
    static func firstInvalidByte(_ bytes: ArraySlice<UInt8>) -> Int? {
        // Rule files are almost always ASCII; check that quickly before a full validation.
        let ascii = bytes.withUnsafeBufferPointer { buffer in
            var combined: UInt8 = 0
            for byte in buffer { combined |= byte }
            return combined < 0x80
        }
        if ascii { return nil }
        var iterator = bytes.makeIterator()
        var decoder = UTF8()
        var offset = bytes.startIndex
        while true {
            switch decoder.decode(&iterator) {
            case .scalarValue(let scalar): offset += UTF8.width(scalar)
            case .emptyInput: return nil
            case .error: return offset
            }
        }
    }
}
