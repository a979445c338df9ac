#!/usr/bin/env python3
"""Server CPU per full TLS handshake: fleetgate's device listener beside nginx.

    python3 benches/scripts/tls_handshake_cost.py [--rsa] [N]   # needs target/release/fleetgate, nginx

Starts `fleetgate sandbox` with device TLS and an nginx `listen … ssl` (one worker), both
serving the same fixture certificate: `tests/fixtures/tls/redis-node.pem` (EC P-256), or
`upstream.pem` (RSA-2048) with `--rsa`. Then, for each in turn, N times: TCP connect, a TLS
1.3 handshake (Python's ssl, verifying against the fixture CA), close. Reports the serving
process's CPU (utime + stime from /proc) per handshake: what a reconnect storm costs per
device. The client's own CPU is not counted.
"""
import json, os, socket, ssl, subprocess, sys, tempfile, time

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FIX = os.path.join(REPO, "tests", "fixtures", "tls")
BIN = os.environ.get("FLEETGATE_BIN") or os.path.join(
    os.environ.get("CARGO_TARGET_DIR", os.path.join(REPO, "target")), "release", "fleetgate"
)
args = [a for a in sys.argv[1:] if a != "--rsa"]
RSA = "--rsa" in sys.argv
N = int(args[0]) if args else 3000
CERT, KEY, CA = (
    ("upstream.pem", "upstream.key", "ca.pem") if RSA else ("redis-node.pem", "redis-node.key", "redis-ca.pem")
)


def cpu_s(pid):
    f = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")


def per_handshake(port, pid):
    ctx = ssl.create_default_context(cafile=os.path.join(FIX, CA))
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    for _ in range(50):  # warm-up
        ctx.wrap_socket(socket.create_connection(("127.0.0.1", port)), server_hostname="localhost").close()
    c0 = cpu_s(pid)
    for _ in range(N):
        ctx.wrap_socket(socket.create_connection(("127.0.0.1", port)), server_hostname="localhost").close()
    return round((cpu_s(pid) - c0) * 1e6 / N)


gw = subprocess.Popen(
    [BIN, "sandbox", "--json", "--port", "0", "--admin-port", "0",
     "--tls-cert", os.path.join(FIX, CERT), "--tls-key", os.path.join(FIX, KEY)],
    stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
)
ng_dir = tempfile.mkdtemp(prefix="fg-hs-nginx-")
s = socket.socket(); s.bind(("127.0.0.1", 0)); ng_port = s.getsockname()[1]; s.close()
open(f"{ng_dir}/nginx.conf", "w").write(f"""daemon off; master_process off; worker_processes 1;
pid {ng_dir}/nginx.pid; error_log {ng_dir}/error.log warn;
events {{ worker_connections 4096; }}
http {{ access_log off; client_body_temp_path {ng_dir}/b; proxy_temp_path {ng_dir}/p;
  fastcgi_temp_path {ng_dir}/f; uwsgi_temp_path {ng_dir}/u; scgi_temp_path {ng_dir}/s;
  server {{ listen 127.0.0.1:{ng_port} ssl; ssl_certificate {FIX}/{CERT}; ssl_certificate_key {FIX}/{KEY};
    ssl_protocols TLSv1.2 TLSv1.3; location / {{ return 200 "ok"; }} }} }}
""")
ng = subprocess.Popen(["nginx", "-p", ng_dir, "-c", f"{ng_dir}/nginx.conf"], stderr=subprocess.DEVNULL)
try:
    gw_port = int(json.loads(gw.stdout.readline())["gateway_url"].rsplit(":", 1)[1])
    time.sleep(0.5)
    out = {"certificate": "RSA-2048" if RSA else "EC P-256", "handshakes": N}
    for round_ in (1, 2):
        out[f"gateway_cpu_us_{round_}"] = per_handshake(gw_port, gw.pid)
        out[f"nginx_cpu_us_{round_}"] = per_handshake(ng_port, ng.pid)
    print(json.dumps(out))
finally:
    gw.terminate(); ng.terminate(); gw.wait(); ng.wait()
