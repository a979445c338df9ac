#!/usr/bin/env python3
"""RSS per idle device connection, plain TCP beside TLS (device TLS, `[device_listener.tls]`).

    python3 benches/scripts/idle_tls_memory.py 5000   # needs target/release/fleetgate

Starts two gateways from one binary, one plain and one serving the test fixture certificate
(tests/fixtures/tls/upstream.pem, EC P-256), opens N connections to each (TLS ones complete
their handshake, trusting tests/fixtures/tls/ca.pem), sends nothing, and reports the RSS
each connection added to its gateway. The difference is what device TLS costs per idle
connection, on top of the idle WebSocket figure (`load ws-idle`).
"""
import json, os, socket, ssl, sys, time

from fgprocs import raise_fd_limit, rss_kib, start_gateway

raise_fd_limit()
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FIX = os.path.join(REPO, "tests", "fixtures", "tls")
BIN = os.environ.get("FLEETGATE_BIN") or os.path.join(
    os.environ.get("CARGO_TARGET_DIR", os.path.join(REPO, "target")), "release", "fleetgate"
)
N = int(sys.argv[1]) if len(sys.argv) > 1 else 5000

TLS = f'[device_listener.tls]\ncert_file = "{FIX}/upstream.pem"\nkey_file = "{FIX}/upstream.key"\nhandshake_timeout = "60s"'


def measure(tls):
    gw = start_gateway(BIN, extra=TLS if tls else "", store=":memory:")
    host, port = gw.device_addr.rsplit(":", 1)
    addr = (host, int(port))
    ctx = ssl.create_default_context(cafile=os.path.join(FIX, "ca.pem"))

    def connect():
        s = socket.create_connection(addr)
        return ctx.wrap_socket(s, server_hostname="localhost") if tls else s

    try:
        warm = [connect() for _ in range(50)]
        time.sleep(1)
        before = rss_kib(gw.pid)
        conns = [connect() for _ in range(N)]
        time.sleep(2)
        after = rss_kib(gw.pid)
        return round((after - before) * 1024 / N), len(warm) + len(conns)
    finally:
        gw.stop()


plain, _ = measure(False)
tls, _ = measure(True)
print(json.dumps({"idle_connections": N, "plain_bytes_each": plain, "tls_bytes_each": tls, "tls_extra_bytes_each": tls - plain}))
