#!/usr/bin/env python3
"""Holds N idle TLS connections to 127.0.0.1:PORT (handshake done, nothing sent) until stdin
closes, for bench/tls.sh's memory figure. Prints "ready N" once all are up. Bounded: N
connections, 60 s of connecting at most."""
import socket, ssl, sys, time

port, count = int(sys.argv[1]), int(sys.argv[2])
context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
context.check_hostname = False
context.verify_mode = ssl.CERT_NONE
held = []
deadline = time.time() + 60
while len(held) < count and time.time() < deadline:
    raw = socket.create_connection(("127.0.0.1", port), timeout=10)
    held.append(context.wrap_socket(raw))
print("ready", len(held), flush=True)
sys.stdin.read()
for s in held:
    s.close()
