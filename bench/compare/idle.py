# Idle connections for bench/compare.sh's memory row.
#   python3 idle.py hold PORT STATS   an upstream that accepts connections and holds them
#                                     (reads until the peer closes, never writes); it keeps the
#                                     number of connections open now in the file STATS
#   python3 idle.py open PORT N       opens N connections to 127.0.0.1:PORT, at most 256
#                                     connecting at a time, sends nothing and holds them until
#                                     it is killed; prints "connected failed" once every attempt
#                                     is done
import asyncio
import os
import sys


async def hold(port, stats):
    open_now = 0
    last = None

    async def serve(reader, writer):
        nonlocal open_now
        open_now += 1
        try:
            while await reader.read(65536):
                pass
        except OSError:
            pass
        finally:
            open_now -= 1
            writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", port, backlog=4096)
    async with server:
        while True:
            if open_now != last:
                last = open_now
                with open(stats + ".tmp", "w") as f:
                    f.write(f"{open_now}\n")
                os.replace(stats + ".tmp", stats)
            await asyncio.sleep(0.05)


async def open_many(port, n):
    gate = asyncio.Semaphore(256)
    held = []
    failed = 0

    async def one():
        nonlocal failed
        async with gate:
            try:
                held.append(await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 10))
            except (OSError, asyncio.TimeoutError):
                failed += 1

    await asyncio.gather(*(one() for _ in range(n)))
    print(f"{len(held)} {failed}", flush=True)
    await asyncio.Event().wait()


mode = sys.argv[1]
if mode == "hold":
    asyncio.run(hold(int(sys.argv[2]), sys.argv[3]))
elif mode == "open":
    asyncio.run(open_many(int(sys.argv[2]), int(sys.argv[3])))
else:
    sys.exit("usage: idle.py hold PORT STATS | open PORT N")
