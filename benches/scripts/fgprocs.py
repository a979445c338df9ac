"""Processes for the measurement scripts in this directory: the `sandbox` upstream and a
`fleetgate serve` with a minimal config, and the admin calls they need. Standard library only.

    from fgprocs import start_sandbox, start_gateway, rss_kib
"""
import base64, json, os, resource, subprocess, tempfile, urllib.request

ADMIN_TOKEN = "admin-token-0123456789"

CONFIG = """[server]
threads = 2
[device_listener]
addr = "127.0.0.1:0"
[admin_listener]
addr = "127.0.0.1:0"
token_env = "A"
[upstream]
base_url = "{upstream}"
pat_env = "P"
[tokens]
signing_keys = [{{ kid = "k", secret_env = "K" }}]
[store]
path = "{store}"
[log]
level = "warn"
access_log = false
{extra}
"""


def raise_fd_limit():
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def start_sandbox(bindir):
    """The sandbox upstream on a free port: (process, base URL)."""
    sb = subprocess.Popen([os.path.join(bindir, "sandbox"), "--bind", "127.0.0.1:0", "--fast-audio"],
                          stdout=subprocess.PIPE, text=True)
    return sb, json.loads(sb.stdout.readline())["base_url"]


class Gateway:
    """`fleetgate serve` on free ports. `extra` is TOML appended to the config (whole
    sections; a section already in CONFIG must not be repeated)."""

    def __init__(self, binary, upstream="http://127.0.0.1:9", extra="", store=None):
        self.tmp = tempfile.mkdtemp()
        cfg = os.path.join(self.tmp, "config.toml")
        with open(cfg, "w") as f:
            f.write(CONFIG.format(upstream=upstream, extra=extra,
                                  store=store or os.path.join(self.tmp, "store.redb")))
        env = dict(os.environ, A=ADMIN_TOKEN, P="pat_sandbox",
                   K=base64.b64encode(os.urandom(32)).decode())
        self.proc = subprocess.Popen([binary, "serve", "--ready-json", "-c", cfg],
                                     stdout=subprocess.PIPE, text=True, env=env)
        ready = json.loads(self.proc.stdout.readline())
        self.pid = self.proc.pid
        self.device_addr = ready["device_addr"]
        self.admin = f"http://{ready['admin_addr']}"

    def post(self, path, body):
        req = urllib.request.Request(self.admin + path, data=json.dumps(body).encode(), method="POST",
                                     headers={"Authorization": f"Bearer {ADMIN_TOKEN}",
                                              "Content-Type": "application/json"})
        return json.loads(urllib.request.urlopen(req).read())

    def device_token(self, device):
        """Registers `device` and returns a token for it."""
        self.post("/admin/v1/devices", {"device_id": device})
        return self.post(f"/admin/v1/devices/{device}/tokens", {})["access_token"]

    def stop(self):
        self.proc.terminate()
        self.proc.wait()


def start_gateway(binary, upstream="http://127.0.0.1:9", extra="", store=None):
    return Gateway(binary, upstream, extra, store)
