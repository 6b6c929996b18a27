#!/usr/bin/env python3
"""The soak's two halves (issue #16 item 5), run by bench/soak.sh.

upstream PORT
    A checksumming upstream. Each connection starts with a header (magic, connection id,
    upload length, download length). The upstream reads the upload, hashing it with SHA-256 in
    order, answers its digest, then sends the download (pseudo-random bytes, hashed as they
    are sent) and that digest, and closes. A connection that starts with b"SOAKSTAT" gets the
    totals as one JSON line instead (asked directly, not through the gateway).

load --port P --upstream-port U ...
    The clients and the rest of the soak: CONNECTIONS threads that each connect through the
    gateway, send an upload (hashed as sent), check the upstream's digest of it, receive the
    download (hashed as received), check it against the upstream's digest of what it sent,
    check that the upstream then closes, close, and start again, until TOTAL payload bytes
    (upload plus download) have been relayed. Meanwhile one thread rewrites the rule file
    every RELOAD_EVERY seconds (two variants in turn) and runs `portcullis reload`, and one
    samples the gateway's RSS and PSS every second. At the end it stops the gateway, reads its
    access log, prints the figures and exits 1 if any property failed.
"""
import argparse
import hashlib
import json
import math
import os
import random
import signal
import socket
import socketserver
import struct
import subprocess
import sys
import threading
import time

MAGIC = b"SOAK1\0\0\0"
STAT = b"SOAKSTAT"
HEADER = struct.Struct("<8sQQQ")  # magic, connection id, upload length, download length
DIGEST = 32
BLOCK = 256 * 1024
POOL = 64 * 1024 * 1024  # pseudo-random bytes that uploads and downloads are sliced from
MAX_PART = 8 * 1024 * 1024
MIB = 1024 * 1024
GIB = 1024 * MIB


def pool_bytes():
    return os.urandom(POOL)


def part_length(rng):
    """Log-uniform from 0 to MAX_PART - 1: many small transfers, some of several MiB."""
    return int(2 ** (rng.random() * math.log2(MAX_PART))) - 1


def recv_exactly(sock, count):
    out = bytearray()
    while len(out) < count:
        chunk = sock.recv(count - len(out))
        if not chunk:
            raise EOFError(f"EOF after {len(out)} of {count} bytes")
        out += chunk
    return bytes(out)


def recv_digest(sock, count, what):
    """Reads exactly `count` bytes (`what` names them in the error) and returns their SHA-256."""
    hasher = hashlib.sha256()
    view = memoryview(bytearray(BLOCK))
    left = count
    while left:
        n = sock.recv_into(view, min(left, BLOCK))
        if n == 0:
            raise EOFError(f"{what}: EOF with {left} of {count} bytes missing")
        hasher.update(view[:n])
        left -= n
    return hasher.digest()


# ---------------------------------------------------------------------------- upstream

class Totals:
    def __init__(self):
        self.lock = threading.Lock()
        self.connections = 0
        self.received = 0
        self.sent = 0
        self.errors = 0
        self.first_error = None

    def add(self, received, sent):
        with self.lock:
            self.connections += 1
            self.received += received
            self.sent += sent

    def error(self, what):
        with self.lock:
            self.errors += 1
            if self.first_error is None:
                self.first_error = what


def run_upstream(port):
    pool = pool_bytes()
    totals = Totals()

    class Handler(socketserver.BaseRequestHandler):
        def handle(self):
            sock = self.request
            sock.settimeout(60)
            try:
                head = recv_exactly(sock, HEADER.size)
                if head[:8] == STAT:
                    with totals.lock:
                        figures = dict(connections=totals.connections, received=totals.received,
                                       sent=totals.sent, errors=totals.errors, first_error=totals.first_error)
                    sock.sendall((json.dumps(figures) + "\n").encode())
                    return
                magic, conn, up, down = HEADER.unpack(head)
                if magic != MAGIC:
                    raise ValueError(f"bad header {head!r}")
                sock.sendall(recv_digest(sock, up, f"connection {conn}: upload"))
                hasher = hashlib.sha256()
                start = random.randrange(POOL - down + 1)
                source = memoryview(pool)[start:start + down]
                for offset in range(0, down, BLOCK):
                    piece = source[offset:offset + BLOCK]
                    hasher.update(piece)
                    sock.sendall(piece)
                sock.sendall(hasher.digest())
                sock.shutdown(socket.SHUT_WR)
                # Wait for the client's close, so the upstream never resets a connection.
                while sock.recv(BLOCK):
                    raise ValueError(f"connection {conn}: bytes after the upload")
                totals.add(up, down)
            except Exception as error:  # counted, reported through SOAKSTAT
                totals.error(f"{type(error).__name__}: {error}")

    class Server(socketserver.ThreadingTCPServer):
        daemon_threads = True
        allow_reuse_address = True
        request_queue_size = 512

    server = Server(("127.0.0.1", port), Handler)
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    server.serve_forever()


# ---------------------------------------------------------------------------- load

def status_kib(pid, field):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def pss_kib(pid):
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def cpu_seconds(pid):
    """utime + stime of every thread of PID, in seconds."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(") ", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None


def ask_upstream(port):
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(STAT + bytes(HEADER.size - len(STAT)))
        data = b""
        while not data.endswith(b"\n"):
            chunk = sock.recv(4096)
            if not chunk:
                break
            data += chunk
    return json.loads(data)


class Load:
    def __init__(self, args):
        self.args = args
        self.pool = pool_bytes()
        self.lock = threading.Lock()
        self.scheduled = 0      # payload bytes handed to connections
        self.up = 0             # upload bytes whose digest matched
        self.down = 0           # download bytes whose digest matched
        self.connections = 0    # connections that passed every check
        self.failures = 0
        self.problems = []
        self.stop = threading.Event()
        self.done = threading.Event()
        self.reloads = 0
        self.reload_failures = 0
        self.reload_times = []  # seconds each `portcullis reload` took, check and answer included
        self.samples = []       # (seconds, relayed bytes, rss KiB, pss KiB)
        self.start = time.monotonic()
        self.next_id = 0
        self.cpu_start = self.cpu_end = None

    def fail(self, what):
        with self.lock:
            self.failures += 1
            if len(self.problems) < 5:
                self.problems.append(what)

    def relayed(self):
        with self.lock:
            return self.up + self.down

    def claim(self, rng):
        """The next connection's lengths, or None once TOTAL bytes are handed out."""
        up, down = part_length(rng), part_length(rng)
        with self.lock:
            if self.scheduled >= self.args.total or self.stop.is_set():
                return None
            self.scheduled += up + down
            self.next_id += 1
            return self.next_id, up, down

    def one_connection(self, conn, up, down, rng):
        a = self.args
        hasher = hashlib.sha256()
        with socket.create_connection(("127.0.0.1", a.port), timeout=a.io_timeout) as sock:
            sock.sendall(HEADER.pack(MAGIC, conn, up, down))
            start = rng.randrange(POOL - up + 1)
            source = memoryview(self.pool)[start:start + up]
            for offset in range(0, up, BLOCK):
                piece = source[offset:offset + BLOCK]
                hasher.update(piece)
                sock.sendall(piece)
            theirs = recv_exactly(sock, DIGEST)
            if theirs != hasher.digest():
                raise ValueError(f"connection {conn}: the upstream's digest of {up} upload bytes differs")
            mine = recv_digest(sock, down, f"connection {conn}: download")
            theirs = recv_exactly(sock, DIGEST)
            if theirs != mine:
                raise ValueError(f"connection {conn}: {down} download bytes differ from the upstream's digest")
            extra = sock.recv(16)
            if extra:
                raise ValueError(f"connection {conn}: {len(extra)} bytes after the download")
        with self.lock:
            self.up += up
            self.down += down
            self.connections += 1

    def worker(self, index):
        rng = random.Random(index * 7919 + 1)
        while not self.stop.is_set():
            claim = self.claim(rng)
            if claim is None:
                return
            conn, up, down = claim
            try:
                self.one_connection(conn, up, down, rng)
            except Exception as error:
                self.fail(f"{type(error).__name__}: {error}")
                time.sleep(0.05)

    def reloader(self):
        a = self.args
        variants = [open(a.variant_a).read(), open(a.variant_b).read()]
        turn = 1  # the gateway started on variant A
        while not self.done.wait(a.reload_every):
            text = variants[turn % 2]
            temporary = a.rules + ".new"
            with open(temporary, "w") as f:
                f.write(text)
            os.rename(temporary, a.rules)
            began = time.monotonic()
            result = subprocess.run([a.portcullis, "reload", "-c", a.rules], capture_output=True, text=True, timeout=60)
            with self.lock:
                self.reload_times.append(time.monotonic() - began)
            if result.returncode == 0 and "is running" in result.stdout:
                with self.lock:
                    self.reloads += 1
            else:
                with self.lock:
                    self.reload_failures += 1
                self.fail(f"reload {turn}: exit {result.returncode}: {result.stdout.strip()} {result.stderr.strip()}")
            turn += 1

    def sample(self):
        rss = status_kib(self.args.pid, "VmRSS")
        pss = pss_kib(self.args.pid)
        entry = (time.monotonic() - self.start, self.relayed(), rss, pss)
        with self.lock:
            self.samples.append(entry)
        return entry

    def sampler(self):
        while not self.done.wait(0.5):
            self.sample()

    def run(self):
        a = self.args
        workers = [threading.Thread(target=self.worker, args=(i,), daemon=True) for i in range(a.connections)]
        helpers = [threading.Thread(target=self.reloader, daemon=True), threading.Thread(target=self.sampler, daemon=True)]
        self.sample()
        self.cpu_start = cpu_seconds(a.pid)
        for t in workers + helpers:
            t.start()
        deadline = self.start + a.max_seconds
        for t in workers:
            t.join(max(0.0, deadline - time.monotonic()))
        timed_out = any(t.is_alive() for t in workers)
        if timed_out:
            self.stop.set()
            self.fail(f"MAX_SECONDS ({a.max_seconds}) ran out after {self.relayed() / GIB:.2f} GiB")
            for t in workers:
                t.join(a.io_timeout + 5)
        elapsed = time.monotonic() - self.start
        end = self.sample()  # every client has closed its last connection, or is about to
        self.cpu_end = cpu_seconds(a.pid)
        self.done.set()
        for t in helpers:
            t.join(90)
        time.sleep(2.0)  # the gateway's last sessions end, its log lines are written
        closed = self.sample()
        return elapsed, end, closed, timed_out


def parse_access_log(path):
    """Lines 'TAG STATUS BYTES_RECEIVED BYTES_SENT' -> (count, by tag, non-200, received, sent)."""
    count, tags, bad, received, sent = 0, {}, 0, 0, 0
    with open(path) as f:
        for line in f:
            fields = line.split()
            if len(fields) != 4:
                bad += 1
                continue
            count += 1
            tags[fields[0]] = tags.get(fields[0], 0) + 1
            if fields[1] != "200":
                bad += 1
            received += int(fields[2])
            sent += int(fields[3])
    return count, tags, bad, received, sent


def run_load(a):
    load = Load(a)
    print(f"soak: {a.total / GIB:.2f} GiB through 127.0.0.1:{a.port}, {a.connections} connections, "
          f"reload every {a.reload_every} s, at most {a.max_seconds} s", flush=True)
    elapsed, end, closed, timed_out = load.run()
    upstream = ask_upstream(a.upstream_port)

    # Stop the gateway gracefully, so every access line is written, then read them.
    stop = subprocess.run([a.portcullis, "-s", "quit", "-c", a.rules], capture_output=True, text=True, timeout=60)
    for _ in range(300):  # until it has exited (gone, or a zombie its parent has not reaped)
        try:
            with open(f"/proc/{a.pid}/stat") as f:
                if f.read().rsplit(") ", 1)[1][0] == "Z":
                    break
        except OSError:
            break
        time.sleep(0.1)
    lines, tags, bad_lines, log_received, log_sent = parse_access_log(a.access_log)

    relayed = load.up + load.down
    header_bytes = HEADER.size * load.connections
    digest_bytes = 2 * DIGEST * load.connections
    samples = load.samples
    tenth = next((s for s in samples if s[1] >= 0.1 * a.total), None)
    rss = [s[2] for s in samples if s[2] is not None]

    print(f"relayed        {relayed / GIB:.2f} GiB of payload ({load.up / GIB:.2f} GiB up, {load.down / GIB:.2f} GiB down) in {elapsed:.1f} s "
          f"= {relayed / elapsed / 1e9:.2f} GB/s ({relayed * 8 / elapsed / 1e9:.2f} Gbit/s)")
    if load.cpu_start is not None and load.cpu_end is not None:
        cpu = load.cpu_end - load.cpu_start
        print(f"gateway CPU    {cpu:.1f} s = {cpu / elapsed * 100:.0f} % of one core, {cpu / (relayed / 1e9):.2f} CPU-s per GB relayed")
    print(f"connections    {load.connections} verified, {load.failures} failed; {load.connections / elapsed:.0f} a second")
    print(f"upstream       {upstream['connections']} connections, {upstream['received'] / GIB:.2f} GiB received, "
          f"{upstream['sent'] / GIB:.2f} GiB sent, {upstream['errors']} errors")
    times = load.reload_times or [0.0]
    mean_reload = sum(times) / len(times)
    print(f"reloads        {load.reloads} done, {load.reload_failures} failed; `portcullis reload` took "
          f"{mean_reload * 1000:.0f} ms on average, {max(times) * 1000:.0f} ms at most")
    print(f"access log     {lines} lines {tags}, {bad_lines} not 200, bytes_received {log_received}, bytes_sent {log_sent}")
    step = max(1, len(samples) // 12)
    shown = samples[::step] + ([samples[-1]] if (len(samples) - 1) % step else [])
    print("RSS/PSS MiB    " + ", ".join(f"{s[0]:.0f}s {s[1] / GIB:.1f}GiB {s[2] / 1024:.1f}/{(s[3] or 0) / 1024:.1f}"
                                         for s in shown if s[2] is not None))
    if tenth:
        print(f"memory         RSS at 10 %: {tenth[2] / 1024:.1f} MiB, at the end: {end[2] / 1024:.1f} MiB "
              f"({(end[2] - tenth[2]) / 1024:+.1f}), after the clients closed: {closed[2] / 1024:.1f} MiB "
              f"({(closed[2] - tenth[2]) / 1024:+.1f}); peak {max(rss) / 1024:.1f} MiB; "
              f"PSS at 10 % {tenth[3] / 1024:.1f}, end {end[3] / 1024:.1f}, closed {closed[3] / 1024:.1f} MiB")

    problems = list(load.problems)
    def check(ok, what):
        if not ok:
            problems.append(what)
    check(not timed_out, "MAX_SECONDS ran out")
    check(relayed >= a.total, f"only {relayed} of {a.total} bytes relayed")
    check(load.failures == 0, f"{load.failures} failed connections")
    check(upstream["errors"] == 0, f"upstream errors: {upstream['errors']}: {upstream['first_error']}")
    check(upstream["connections"] == load.connections, f"the upstream saw {upstream['connections']} connections, the clients {load.connections}")
    check(upstream["received"] == load.up and upstream["sent"] == load.down,
          f"the upstream counted {upstream['received']} up / {upstream['sent']} down, the clients {load.up} / {load.down}")
    # The reloader waits RELOAD_EVERY after each reload has answered.
    check(load.reloads >= max(1, int(elapsed / (a.reload_every + mean_reload)) - 2) and load.reload_failures == 0,
          f"{load.reloads} reloads done, {load.reload_failures} failed in {elapsed:.0f} s")
    check(stop.returncode == 0, f"portcullis -s quit: {stop.returncode} {stop.stderr.strip()}")
    check(lines == load.connections and bad_lines == 0,
          f"{lines} access lines ({bad_lines} bad) for {load.connections} connections")
    check(log_received == load.up + header_bytes and log_sent == load.down + digest_bytes,
          f"the gateway logged {log_received} bytes received / {log_sent} sent, expected "
          f"{load.up + header_bytes} / {load.down + digest_bytes}")
    check(len(tags) == 2 or load.reloads == 0, f"both rule variants served sessions: {tags}")
    limit = max(a.growth_mib * 1024, 0.10 * (tenth[2] if tenth else 0))
    check(tenth is not None and end[2] - tenth[2] <= limit,
          f"RSS grew {(end[2] - tenth[2]) / 1024 if tenth else float('nan'):.1f} MiB between 10 % and the end (limit {limit / 1024:.1f})")
    check(tenth is not None and closed[2] - tenth[2] <= limit,
          f"RSS after the clients closed is {(closed[2] - tenth[2]) / 1024 if tenth else float('nan'):.1f} MiB above 10 % (limit {limit / 1024:.1f})")
    if problems:
        print("FAILED:\n  " + "\n  ".join(problems))
        return 1
    print("soak passed: 0 bytes lost or reordered, 0 failed connections, memory flat")
    return 0


def main():
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="mode", required=True)
    up = sub.add_parser("upstream")
    up.add_argument("port", type=int)
    wait = sub.add_parser("wait-upstream")
    wait.add_argument("port", type=int)
    ld = sub.add_parser("load")
    ld.add_argument("--port", type=int, required=True)
    ld.add_argument("--upstream-port", type=int, required=True)
    ld.add_argument("--pid", type=int, required=True)
    ld.add_argument("--portcullis", required=True)
    ld.add_argument("--rules", required=True)
    ld.add_argument("--variant-a", required=True)
    ld.add_argument("--variant-b", required=True)
    ld.add_argument("--access-log", required=True)
    ld.add_argument("--total", type=int, default=10 * GIB)
    ld.add_argument("--connections", type=int, default=50)
    ld.add_argument("--reload-every", type=float, default=3.0)
    ld.add_argument("--max-seconds", type=float, default=900)
    ld.add_argument("--io-timeout", type=float, default=30)
    ld.add_argument("--growth-mib", type=float, default=16)
    a = parser.parse_args()
    if a.mode == "upstream":
        run_upstream(a.port)
    elif a.mode == "wait-upstream":
        for _ in range(100):
            try:
                ask_upstream(a.port)
                return
            except OSError:
                time.sleep(0.1)
        sys.exit(1)
    else:
        sys.exit(run_load(a))


if __name__ == "__main__":
    main()
