import Foundation

/// Reads a gzip file the way a log reader would, but with Python's zlib rather than our code:
/// the text of each gzip member in file order, or nil when the file is not whole members
/// (a member cut short, or bytes that are not gzip).
public func gzipMembers(_ path: String) -> [String]? {
    let script = """
        import sys, zlib, json
        data = open(sys.argv[1], 'rb').read()
        out = []
        while data:
            d = zlib.decompressobj(31)
            out.append(d.decompress(data).decode())
            if not d.eof: sys.exit(1)
            data = d.unused_data
        print(json.dumps(out))
        """
    let process = Process()
    process.executableURL = URL(fileURLWithPath: "/usr/bin/python3")
    process.arguments = ["-c", script, path]
    let pipe = Pipe()
    process.standardOutput = pipe
    guard (try? process.run()) != nil else { return nil }
    let output = pipe.fileHandleForReading.readDataToEndOfFile()
    process.waitUntilExit()
    guard process.terminationStatus == 0 else { return nil }
    return try? JSONDecoder().decode([String].self, from: output)
}
