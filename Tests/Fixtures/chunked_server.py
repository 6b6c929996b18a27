#!/usr/bin/env python3
"""A real HTTP/1.1 server that streams a chunked response: one chunk every INTERVAL seconds,
each carrying the wall-clock time it was sent, so a client can measure how long each chunk
took to arrive (directly, or through a proxy).

usage: chunked_server.py PORT_FILE [CHUNKS] [INTERVAL]
Binds 127.0.0.1 on an ephemeral port and writes the port number to PORT_FILE.
"""
import http.server
import socketserver
import sys
import time

CHUNKS = int(sys.argv[2]) if len(sys.argv) > 2 else 20
INTERVAL = float(sys.argv[3]) if len(sys.argv) > 3 else 0.05


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        self.wfile.flush()
        for index in range(CHUNKS):
            time.sleep(INTERVAL)
            body = ("chunk %d t=%.6f\n" % (index, time.time())).encode()
            self.wfile.write(b"%x\r\n%s\r\n" % (len(body), body))
            self.wfile.flush()
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()

    def log_message(self, *args):
        pass


class Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True
    allow_reuse_address = True


def exit_with_parent():
    # Bounded life: stop when the test process that started us is gone.
    import os, threading
    parent = os.getppid()
    def watch():
        while os.getppid() == parent:
            time.sleep(0.2)
        os._exit(0)
    threading.Thread(target=watch, daemon=True).start()


if __name__ == "__main__":
    exit_with_parent()
    server = Server(("127.0.0.1", 0), Handler)
    with open(sys.argv[1] + ".tmp", "w") as f:
        f.write(str(server.server_address[1]))
    import os
    os.rename(sys.argv[1] + ".tmp", sys.argv[1])
    server.serve_forever()
