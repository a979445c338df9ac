#!/usr/bin/env python3
"""RSS per idle device connection, plain TCP beside TLS (device TLS, `[device_listener.tls]`).

    python3 benches/scripts/idle_tls_memory.py 5000   # needs target/release/fleetgate

Starts two gateways from one binary, one plain and one serving the test fixture certificate
(tests/fixtures/tls/upstream.pem, EC P-256), opens N connections to each (TLS ones complete
their handshake, trusting tests/fixtures/tls/ca.pem), sends nothing, and reports the RSS
each connection added to its gateway. The difference is what device TLS costs per idle
connection, on top of the idle WebSocket figure (`load ws-idle`).
"""
import base64, json, os, resource, socket, ssl, subprocess, sys, tempfile, time

resource.setrlimit(resource.RLIMIT_NOFILE, (resource.getrlimit(resource.RLIMIT_NOFILE)[1],) * 2)
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FIX = os.path.join(REPO, "tests", "fixtures", "tls")
BIN = os.environ.get("FLEETGATE_BIN") or os.path.join(
    os.environ.get("CARGO_TARGET_DIR", os.path.join(REPO, "target")), "release", "fleetgate"
)
N = int(sys.argv[1]) if len(sys.argv) > 1 else 5000

BASE = """[device_listener]
addr = "127.0.0.1:0"
{tls}
[admin_listener]
addr = "127.0.0.1:0"
token_env = "A"
[upstream]
base_url = "http://127.0.0.1:9"
pat_env = "P"
[tokens]
signing_keys = [{{ kid = "k", secret_env = "K" }}]
[log]
level = "warn"
[store]
path = ":memory:"
"""
TLS = f'[device_listener.tls]\ncert_file = "{FIX}/upstream.pem"\nkey_file = "{FIX}/upstream.key"\nhandshake_timeout = "60s"'


def start(tls):
    cfg = tempfile.NamedTemporaryFile("w", suffix=".toml", delete=False)
    cfg.write(BASE.format(tls=TLS if tls else ""))
    cfg.close()
    env = dict(os.environ, A="admin-token-0123456789", P="x", K=base64.b64encode(os.urandom(32)).decode())
    gw = subprocess.Popen([BIN, "serve", "--ready-json", "-c", cfg.name], stdout=subprocess.PIPE, text=True, env=env)
    host, port = json.loads(gw.stdout.readline())["device_addr"].rsplit(":", 1)
    return gw, (host, int(port))


def rss_kib(pid):
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS"):
            return int(line.split()[1])


def measure(tls):
    gw, addr = start(tls)
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
        gw.terminate()
        gw.wait()


plain, _ = measure(False)
tls, _ = measure(True)
print(json.dumps({"idle_connections": N, "plain_bytes_each": plain, "tls_bytes_each": tls, "tls_extra_bytes_each": tls - plain}))
