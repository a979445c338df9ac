#!/usr/bin/env python3
"""RSS per idle WebSocket session through fleetgate.

Starts the `sandbox` upstream and `fleetgate serve` as separate processes (so only the
gateway's memory is measured), opens N idle `/v1/chat` sessions through the gateway, waits
for each session's first event, and reports (RSS after - RSS before) / N for the gateway.

    python3 benches/scripts/idle_ws_memory.py --sessions 5000 [--target-dir target] [--profile release]

Needs the `websockets` package (installed with cozepy).
"""
import argparse, asyncio, base64, json, os, resource, subprocess, sys, tempfile, time, urllib.request

import websockets


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sessions", type=int, default=2000)
    ap.add_argument("--target-dir", default=os.environ.get("CARGO_TARGET_DIR", "target"))
    ap.add_argument("--profile", default="debug")
    ap.add_argument("--buffer-bytes", type=int, default=4096, help="websocket.buffer_bytes")
    a = ap.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    bindir = os.path.join(a.target_dir, a.profile)
    sb = subprocess.Popen([os.path.join(bindir, "sandbox"), "--bind", "127.0.0.1:0", "--fast-audio"],
                          stdout=subprocess.PIPE, text=True)
    up = json.loads(sb.stdout.readline())["base_url"]
    tmp = tempfile.mkdtemp()
    cfg = os.path.join(tmp, "config.toml")
    with open(cfg, "w") as f:
        f.write(f"""
[server]
threads = 2
[device_listener]
addr = "127.0.0.1:0"
[admin_listener]
addr = "127.0.0.1:0"
token_env = "A"
[upstream]
base_url = "{up}"
pat_env = "P"
[websocket]
buffer_bytes = {a.buffer_bytes}
[tokens]
signing_keys = [{{ kid = "k", secret_env = "K" }}]
[log]
level = "warn"
access_log = false
""")
    env = dict(os.environ, A="admin-token-0123456789", P="pat_sandbox",
               K=base64.b64encode(os.urandom(32)).decode())
    gw = subprocess.Popen([os.path.join(bindir, "fleetgate"), "serve", "--ready-json", "-c", cfg],
                          stdout=subprocess.PIPE, text=True, env=env)
    ready = json.loads(gw.stdout.readline())
    admin = f"http://{ready['admin_addr']}"

    def post(path, body):
        req = urllib.request.Request(admin + path, data=json.dumps(body).encode(), method="POST",
                                     headers={"Authorization": "Bearer admin-token-0123456789",
                                              "Content-Type": "application/json"})
        return json.loads(urllib.request.urlopen(req).read())

    post("/admin/v1/devices", {"device_id": "mem"})
    token = post("/admin/v1/devices/mem/tokens", {})["access_token"]
    url = f"ws://{ready['device_addr']}/v1/chat?bot_id=b1&authorization=Bearer%20{token}"

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
        gw.terminate(); sb.terminate()


if __name__ == "__main__":
    main()
