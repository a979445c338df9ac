#!/usr/bin/env python3
"""CPU time and thread wake-ups of the gateway while N `/v1/chat` sessions sit idle.

Starts the `sandbox` upstream and `fleetgate serve` as separate processes, opens N idle
`/v1/chat` sessions through the gateway (raw sockets: upgrade, then wait for `chat.created`),
then measures the gateway process for `--seconds`: CPU time (user + system) and voluntary
context switches summed over its threads (each is a thread going to sleep after a wake-up).

    python3 benches/scripts/idle_ws_wakeups.py --sessions 1000 --seconds 20 [--time-rule]
        [--target-dir target] [--profile debug] [--bin PATH]

`--time-rule` installs an enterprise-wide `voice_session_ms` rule (large limit) before the
sessions open: every session then reports to the quota ledger once a second, idle or not.
Without it the sessions have no session-time exposure and should cost what they cost before
that reporting existed (compare with `--bin` pointing at an older build).
No third-party packages needed.
"""
import argparse, asyncio, json, os, time

from fgprocs import raise_fd_limit, start_gateway, start_sandbox


def cpu_ticks(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime + stime (fields 14, 15)


def voluntary_switches(pid):
    total = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/status") as f:
                for line in f:
                    if line.startswith("voluntary_ctxt_switches:"):
                        total += int(line.split()[1])
        except FileNotFoundError:
            pass
    return total


async def open_session(host, port, token):
    r, w = await asyncio.open_connection(host, port)
    w.write((f"GET /v1/chat?bot_id=b1 HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
             f"Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
             f"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
             f"Authorization: Bearer {token}\r\n\r\n").encode())
    await w.drain()
    head = await r.readuntil(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 101"), head[:80]
    # The first frame (`chat.created`): 2-byte header (short text frame) or 4 (len 126).
    h = await r.readexactly(2)
    n = h[1] & 0x7F
    if n == 126:
        n = int.from_bytes(await r.readexactly(2), "big")
    await r.readexactly(n)
    return r, w


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sessions", type=int, default=1000)
    ap.add_argument("--seconds", type=float, default=20)
    ap.add_argument("--time-rule", action="store_true")
    ap.add_argument("--target-dir", default=os.environ.get("CARGO_TARGET_DIR", "target"))
    ap.add_argument("--profile", default="debug")
    ap.add_argument("--bin", help="fleetgate binary (default: <target-dir>/<profile>/fleetgate)")
    a = ap.parse_args()
    raise_fd_limit()
    bindir = os.path.join(a.target_dir, a.profile)
    sb, up = start_sandbox(bindir)
    gw = start_gateway(a.bin or os.path.join(bindir, "fleetgate"), up)
    try:
        token = gw.device_token("idle")
        if a.time_rule:
            gw.post("/v1/commerce/benefit/limitations", {
                "entity_type": "enterprise_all_devices",
                "benefit_info": {"benefit_type": "voice_session_ms", "active_mode": "absolute_time",
                                 "started_at": 0, "ended_at": 253402300799, "limit": 10**15,
                                 "status": "valid", "trigger_unit": "never", "trigger_time": 1}})
        host, port = gw.device_addr.rsplit(":", 1)

        async def run():
            conns = []
            for _ in range(a.sessions):
                conns.append(await open_session(host, int(port), token))
            await asyncio.sleep(2)  # settle: handshakes, first reports
            t0, c0, s0 = time.monotonic(), cpu_ticks(gw.pid), voluntary_switches(gw.pid)
            await asyncio.sleep(a.seconds)
            t1, c1, s1 = time.monotonic(), cpu_ticks(gw.pid), voluntary_switches(gw.pid)
            for _, w in conns:
                w.close()
            return t1 - t0, (c1 - c0) / os.sysconf("SC_CLK_TCK"), s1 - s0

        secs, cpu, switches = asyncio.run(run())
        print(json.dumps({
            "sessions": a.sessions, "seconds": round(secs, 1), "time_rule": a.time_rule,
            "cpu_ms_per_s": round(cpu * 1000 / secs, 2),
            "wakeups_per_s": round(switches / secs, 1),
        }))
    finally:
        gw.stop()
        sb.terminate()
        sb.wait()


if __name__ == "__main__":
    main()
