#!/usr/bin/env python3
"""RSS per idle raw TCP connection on fleetgate's device port (connect, send nothing).

    python3 benches/scripts/idle_tcp_memory.py 5000   # needs target/release/fleetgate

Isolates the per-connection cost of the accept path from the WebSocket relay's.
"""
import json, os, socket, subprocess, sys, time, base64, resource
resource.setrlimit(resource.RLIMIT_NOFILE, (resource.getrlimit(resource.RLIMIT_NOFILE)[1],)*2)
B=os.path.join(os.environ.get("CARGO_TARGET_DIR", "target"), "release")
cfg="/tmp/gw_idle.toml"
open(cfg,"w").write('''[device_listener]
addr = "127.0.0.1:0"
[admin_listener]
addr = "127.0.0.1:0"
token_env = "A"
[upstream]
base_url = "http://127.0.0.1:9"
pat_env = "P"
[tokens]
signing_keys = [{ kid = "k", secret_env = "K" }]
[log]
level = "warn"
''')
env=dict(os.environ, A="admin-token-0123456789", P="x", K=base64.b64encode(os.urandom(32)).decode())
gw=subprocess.Popen([B+"/fleetgate","serve","--ready-json","-c",cfg],stdout=subprocess.PIPE,text=True,env=env)
r=json.loads(gw.stdout.readline()); host,port=r["device_addr"].rsplit(":",1)
def rss():
    for l in open(f"/proc/{gw.pid}/status"):
        if l.startswith("VmRSS"): return int(l.split()[1])
warm=[socket.create_connection((host,int(port))) for _ in range(20)]
time.sleep(1); b=rss(); N=int(sys.argv[1])
socks=[socket.create_connection((host,int(port))) for _ in range(N)]
time.sleep(2); a=rss()
print(json.dumps({"idle_tcp_connections":N,"bytes_each":round((a-b)*1024/N)}))
gw.terminate()
