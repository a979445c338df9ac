#!/usr/bin/env python3
"""RSS per idle WebSocket session through fleetgate.

Starts the `sandbox` upstream and `fleetgate serve` as separate processes (so only the
gateway's memory is measured), opens N idle `/v1/chat` sessions through the gateway, waits
for each session's first event, and reports (RSS after - RSS before) / N for the gateway.

    python3 benches/scripts/idle_ws_memory.py --sessions 5000 [--target-dir target] [--profile release]

Needs the `websockets` package (installed with cozepy).
"""
import argparse, asyncio, json, os, time

import websockets

from fgprocs import raise_fd_limit, rss_kib, start_gateway, start_sandbox


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sessions", type=int, default=2000)
    ap.add_argument("--target-dir", default=os.environ.get("CARGO_TARGET_DIR", "target"))
    ap.add_argument("--profile", default="debug")
    ap.add_argument("--buffer-bytes", type=int, default=4096, help="websocket.buffer_bytes")
    a = ap.parse_args()
    raise_fd_limit()
    bindir = os.path.join(a.target_dir, a.profile)
    sb, up = start_sandbox(bindir)
    gw = start_gateway(os.path.join(bindir, "fleetgate"), up,
                       extra=f"[websocket]\nbuffer_bytes = {a.buffer_bytes}\n")
    token = gw.device_token("mem")
    url = f"ws://{gw.device_addr}/v1/chat?bot_id=b1&authorization=Bearer%20{token}"

    async def run():
        conns = []
        # Warm up: a few sessions so allocator pools and runtime state exist before measuring.
        for _ in range(20):
            c = await websockets.connect(url, max_size=None)
            await c.recv()
            conns.append(c)
        await asyncio.sleep(1)
        before = rss_kib(gw.pid)
        sem = asyncio.Semaphore(200)

        async def one():
            async with sem:
                c = await websockets.connect(url, max_size=None, ping_interval=None)
                await c.recv()
                conns.append(c)

        t0 = time.time()
        await asyncio.gather(*(one() for _ in range(a.sessions)))
        await asyncio.sleep(2)
        after = rss_kib(gw.pid)
        per = (after - before) * 1024 / a.sessions
        print(json.dumps({"sessions": a.sessions, "profile": a.profile, "buffer_bytes": a.buffer_bytes, "gateway_rss_before_kib": before,
                          "gateway_rss_after_kib": after, "bytes_per_idle_session": round(per),
                          "open_seconds": round(time.time() - t0, 1)}))
        for c in conns:
            await c.close()

    try:
        asyncio.run(run())
    finally:
        gw.stop()
        sb.terminate()


if __name__ == "__main__":
    main()
