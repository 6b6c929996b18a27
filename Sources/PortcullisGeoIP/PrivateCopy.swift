#if canImport(Glibc)
import Glibc
#endif

/// Which version of a file a database was loaded from: at a reload check, a different identity
/// at the path means different bytes (a new file renamed over it, or the same file rewritten).
///
/// The inode tells a rename apart; size and modification time tell an in-place rewrite apart;
/// the status-change time (ctime, which no one can set by hand) catches a rewrite that kept the
/// size and put the old modification time back (`cp -p`, `rsync --inplace -t`). A false
/// "changed" (a `chmod`, a new hard link) only costs one needless reload of the same bytes.
public struct FileIdentity: Sendable, Equatable, CustomStringConvertible {
    public var device: UInt64
    public var inode: UInt64
    public var size: Int64
    public var modificationSeconds: Int64
    public var modificationNanoseconds: Int64
    public var statusChangeSeconds: Int64
    public var statusChangeNanoseconds: Int64

    init(_ info: stat) {
        device = UInt64(info.st_dev)
        inode = UInt64(info.st_ino)
        size = Int64(info.st_size)
        modificationSeconds = Int64(info.st_mtim.tv_sec)
        modificationNanoseconds = Int64(info.st_mtim.tv_nsec)
        statusChangeSeconds = Int64(info.st_ctim.tv_sec)
        statusChangeNanoseconds = Int64(info.st_ctim.tv_nsec)
    }

    /// The identity of the file `path` names now (following symbolic links, as opening does).
    public init(path: String) throws(MaxMindDatabase.OpenError) {
        var info = stat()
        guard stat(path, &info) == 0 else {
            throw .missing(path: path, reason: String(cString: strerror(errno)))
        }
        self.init(info)
    }

    public var description: String {
        "dev \(device) inode \(inode) size \(size) mtime \(modificationSeconds).\(modificationNanoseconds)"
    }
}

/// Copies a database file into anonymous memory before libmaxminddb maps it.
///
/// libmaxminddb maps its file shared: if anyone truncates or rewrites that file in place while
/// it is mapped, the next lookup touching a page past the new end gets SIGBUS and the process
/// dies (nginx's geoip2 crash, leev/ngx_http_geoip2_module#98). A copy in a `memfd` belongs to
/// this process alone and is sealed against shrinking, so nothing done to the file on disk can
/// reach a running lookup. The copy is read with `read(2)`, which answers a concurrent
/// truncation with a short read, never a signal. The price is the database's size in memory
/// (twice during a reload, while sessions still use the old one), which the page cache would
/// otherwise share.
enum PrivateCopy {
    /// A `memfd` holding the bytes of `path` (the caller closes it), and the identity of the
    /// file those bytes came from.
    static func make(of path: String) throws(MaxMindDatabase.OpenError) -> (fd: Int32, identity: FileIdentity) {
        // O_NONBLOCK: opening a FIFO for reading would otherwise wait for a writer. It changes
        // nothing for a regular file.
        let source = open(path, O_RDONLY | O_CLOEXEC | O_NONBLOCK)
        guard source >= 0 else { throw .missing(path: path, reason: String(cString: strerror(errno))) }
        defer { close(source) }

        var before = stat()
        guard fstat(source, &before) == 0 else {
            throw .missing(path: path, reason: String(cString: strerror(errno)))
        }
        switch before.st_mode & S_IFMT {
        case S_IFREG: break
        case S_IFDIR: throw .missing(path: path, reason: String(cString: strerror(EISDIR)))
        default: throw .missing(path: path, reason: "not a regular file")
        }
        // An empty file is what a reload sees in the middle of `> file` or an O_TRUNC rewrite;
        // libmaxminddb would call it an I/O error (it cannot map 0 bytes).
        guard before.st_size > 0 else { throw .notMaxMindDB(path: path) }

        let copy = try createMemoryFile(for: path)
        do throws(MaxMindDatabase.OpenError) {
            try copyContents(from: source, to: copy, size: Int(before.st_size), path: path)
            // The bytes copied are one version of the file only if nothing wrote to it meanwhile
            // (a writer that finished before the first fstat or starts after this one is caught
            // by the next reload check instead).
            var after = stat()
            guard fstat(source, &after) == 0 else {
                throw .missing(path: path, reason: String(cString: strerror(errno)))
            }
            guard FileIdentity(after) == FileIdentity(before) else { throw .changedWhileReading(path: path) }
        } catch {
            close(copy)
            throw error
        }
        // No one (not even another process of this user, through /proc/PID/fd) can shrink,
        // grow or write the copy from now on. Defence in depth: if sealing is refused the copy
        // is still private, so it is not worth failing the load.
        _ = fcntl(copy, linuxAddSeals, sealShrink | sealGrow | sealWrite | sealSeal)
        return (copy, FileIdentity(before))
    }

    /// `memfd_create(2)`. Swift's Glibc module is built without _GNU_SOURCE, which hides the
    /// declaration and its constants; the function is looked up in the C library by name and
    /// the constants are the kernel's (stable ABI, <linux/memfd.h> and <linux/fcntl.h>).
    private static func createMemoryFile(for path: String) throws(MaxMindDatabase.OpenError) -> Int32 {
        typealias MemfdCreate = @convention(c) (UnsafePointer<CChar>?, UInt32) -> Int32
        guard let symbol = dlsym(nil, "memfd_create") else {
            throw .privateCopyFailed(path: path, reason: "this C library has no memfd_create")
        }
        let memfdCreate = unsafeBitCast(symbol, to: MemfdCreate.self)
        let cloexec: UInt32 = 0x1, allowSealing: UInt32 = 0x2, noexecSeal: UInt32 = 0x8
        // MFD_NOEXEC_SEAL (Linux 6.3+) keeps the kernel from warning about, or with
        // vm.memfd_noexec=2 refusing, an executable memfd; older kernels reject the flag.
        var fd = memfdCreate("portcullis-geoip", cloexec | allowSealing | noexecSeal)
        if fd < 0 && errno == EINVAL {
            fd = memfdCreate("portcullis-geoip", cloexec | allowSealing)
        }
        guard fd >= 0 else {
            throw .privateCopyFailed(path: path, reason: "memfd_create: " + String(cString: strerror(errno)))
        }
        return fd
    }

    private static let linuxAddSeals: Int32 = 1024 + 9  // F_ADD_SEALS
    private static let sealSeal: Int32 = 0x1, sealShrink: Int32 = 0x2, sealGrow: Int32 = 0x4, sealWrite: Int32 = 0x8

    /// Exactly `size` bytes from `source` to `destination`. Fewer bytes (end of file early)
    /// means the file shrank under the read.
    private static func copyContents(
        from source: Int32, to destination: Int32, size: Int, path: String
    ) throws(MaxMindDatabase.OpenError) {
        let bufferSize = min(size, 1 << 20)
        let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: bufferSize, alignment: 16)
        defer { buffer.deallocate() }
        var remaining = size
        while remaining > 0 {
            let got = read(source, buffer.baseAddress, min(remaining, bufferSize))
            if got < 0 {
                if errno == EINTR { continue }
                throw .missing(path: path, reason: String(cString: strerror(errno)))
            }
            if got == 0 { throw .changedWhileReading(path: path) }
            var written = 0
            while written < got {
                let put = write(destination, buffer.baseAddress! + written, got - written)
                if put < 0 {
                    if errno == EINTR { continue }
                    // ENOSPC / ENOMEM: the memory (or cgroup limit) for the copy ran out.
                    throw .privateCopyFailed(path: path, reason: String(cString: strerror(errno)))
                }
                written += put
            }
            remaining -= got
        }
    }
}
