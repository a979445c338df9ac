"""Structural checks of the deployment artifacts in deploy/.

Nothing here needs a container engine or a cluster: the files are parsed and cross-checked
against the metrics catalog (docs/metrics.md), the config (config.toml and the ConfigMaps of
the single-node and the cluster deployment) and the real binary (`fleetgate check-config`).
Optional tools (`kubectl kustomize`, `systemd-analyze`, `promtool`) are used when installed
and skipped otherwise.

Env: FLEETGATE_BIN (default ${CARGO_TARGET_DIR:-<repo>/target}/debug/fleetgate; built with
`cargo build --bins -p gateway` when missing).
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
K8S = DEPLOY / "k8s"
K8S_CLUSTER = DEPLOY / "k8s-cluster"
ALERT_TESTS = Path(__file__).resolve().parent / "alerts_test.yaml"

METRIC_RE = re.compile(r"\bfleetgate_[a-z_]+")
HIST_SUFFIXES = ("_bucket", "_sum", "_count")
ADMIN_PORT = 9090
DEVICE_PORT = 8080

# Values for `check-config`: syntactically valid, obviously fake.
DUMMY_ENV = {
    "FLEETGATE_ADMIN_TOKEN": "dummy-admin-token-for-tests",
    "COZE_API_TOKEN": "pat_dummy_for_tests",
    "FLEETGATE_SIGNING_KEY_K1": base64.b64encode(bytes(range(32))).decode(),
}
# Cluster mode also names the Redis password.
CLUSTER_DUMMY_ENV = {**DUMMY_ENV, "FLEETGATE_REDIS_PASSWORD": "dummy-redis-password"}


# --- helpers -------------------------------------------------------------------------------


def parse_duration(text: str) -> float:
    """humantime-style durations as used in config.toml ("30s", "1m30s", "500ms", "1h")."""
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}
    parts = re.findall(r"(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)", text)
    assert parts and "".join(n + u for n, u in parts) == text.replace(" ", ""), text
    return sum(float(n) * units[u] for n, u in parts)


def yaml_files() -> list[Path]:
    return sorted(p for p in DEPLOY.rglob("*") if p.suffix in (".yaml", ".yml"))


def load_yaml_docs(path: Path) -> list:
    with path.open() as f:
        return [d for d in yaml.safe_load_all(f) if d is not None]


def k8s_objects(directory: Path = K8S) -> list[dict]:
    objs = []
    for p in sorted(directory.glob("*.yaml")):
        if p.name == "kustomization.yaml":
            continue
        for d in load_yaml_docs(p):
            d = dict(d)
            d["__file__"] = p.name
            objs.append(d)
    return objs


def one(kind: str, name: str | None = None, directory: Path = K8S) -> dict:
    found = [o for o in k8s_objects(directory)
             if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def documented_metrics() -> dict[str, str]:
    """name -> type, from the table in docs/metrics.md."""
    text = (REPO / "docs" / "metrics.md").read_text()
    rows = re.findall(r"^\|\s*`(fleetgate_[a-z_]+)`\s*\|\s*([a-z]+)\s*\|", text, re.M)
    assert rows, "no metrics found in docs/metrics.md"
    return dict(rows)


def check_metric_refs(exprs: list[str], where: str) -> set[str]:
    """Every fleetgate_* name in `exprs` is documented; histograms only with their suffixes."""
    docs = documented_metrics()
    used = set()
    for expr in exprs:
        for name in METRIC_RE.findall(expr):
            base = name
            for suf in HIST_SUFFIXES:
                if name.endswith(suf) and name[: -len(suf)] in docs:
                    base = name[: -len(suf)]
                    assert docs[base] == "histogram", f"{where}: {name}: {base} is a {docs[base]}, not a histogram"
            assert base in docs, f"{where}: metric {name!r} is not in docs/metrics.md"
            if base == name:
                assert docs[base] != "histogram", f"{where}: histogram {name} used without _bucket/_sum/_count"
            used.add(base)
    return used


def balanced(expr: str) -> bool:
    pairs = {")": "(", "]": "[", "}": "{"}
    stack = []
    in_str = False
    for c in expr:
        if c == '"':
            in_str = not in_str
        if in_str:
            continue
        if c in "([{":
            stack.append(c)
        elif c in pairs:
            if not stack or stack.pop() != pairs[c]:
                return False
    return not stack and not in_str


SECRET_KEY_RE = re.compile(r"(token|secret|password|passwd|private_key|api_key|credential)", re.I)
ENV_NAME_RE = re.compile(r"^[A-Z][A-Z0-9_]*$")


def secret_literals(table, path="") -> list[str]:
    """Keys that look like secrets but hold a literal instead of an env var name or a file."""
    bad = []
    if isinstance(table, dict):
        for k, v in table.items():
            p = f"{path}.{k}" if path else k
            if isinstance(v, (dict, list)):
                bad += secret_literals(v, p)
            elif isinstance(v, str) and SECRET_KEY_RE.search(k):
                if k.endswith("_env") and ENV_NAME_RE.match(v):
                    continue
                if k.endswith("_file") and v.startswith("/"):
                    continue
                bad.append(f"{p} = {v!r}")
    elif isinstance(table, list):
        for i, v in enumerate(table):
            bad += secret_literals(v, f"{path}[{i}]")
    return bad


def env_names(table) -> set[str]:
    """Every environment variable a config names (keys ending in _env)."""
    out = set()
    if isinstance(table, dict):
        for k, v in table.items():
            if isinstance(v, str) and k.endswith("_env"):
                out.add(v)
            else:
                out |= env_names(v)
    elif isinstance(table, list):
        for v in table:
            out |= env_names(v)
    return out


def configmap_toml_text() -> str:
    return one("ConfigMap", "fleetgate-config")["data"]["config.toml"]


def configmap_config() -> dict:
    return tomllib.loads(configmap_toml_text())


def cluster_configmap_toml_text() -> str:
    return one("ConfigMap", "fleetgate-config", K8S_CLUSTER)["data"]["config.toml"]


def cluster_configmap_config() -> dict:
    return tomllib.loads(cluster_configmap_toml_text())


def port_of(addr: str) -> int:
    return int(addr.rsplit(":", 1)[1])


# --- every file parses ----------------------------------------------------------------------


def test_every_yaml_and_json_file_parses():
    files = yaml_files()
    assert len(files) >= 8, files
    for p in files:
        docs = load_yaml_docs(p)
        assert docs, f"{p} is empty"
        for d in docs:
            assert isinstance(d, dict), f"{p}: top-level document is not a mapping"
    jsons = sorted(DEPLOY.rglob("*.json"))
    assert jsons
    for p in jsons:
        json.loads(p.read_text())


# --- Prometheus alerts -----------------------------------------------------------------------


def alert_rules() -> list[dict]:
    (doc,) = load_yaml_docs(DEPLOY / "prometheus" / "alerts.yaml")
    groups = doc["groups"]
    assert groups
    rules = []
    for g in groups:
        assert g["name"] and g["rules"], g
        rules += g["rules"]
    return rules


def test_alert_rules_are_well_formed():
    rules = alert_rules()
    names = [r["alert"] for r in rules]
    assert len(names) == len(set(names)), "duplicate alert names"
    for r in rules:
        assert set(r) <= {"alert", "expr", "for", "labels", "annotations", "keep_firing_for"}, r
        assert isinstance(r["expr"], str) and r["expr"].strip()
        assert balanced(r["expr"]), f"{r['alert']}: unbalanced brackets or quotes"
        assert r["labels"]["severity"] in ("critical", "warning", "info")
        assert r["annotations"]["summary"]
        if "for" in r:
            parse_duration(r["for"])


def test_alerts_use_only_documented_metrics():
    rules = alert_rules()
    used = check_metric_refs([r["expr"] for r in rules], "alerts.yaml")
    for name in ("fleetgate_requests_total", "fleetgate_upstream_errors_total",
                 "fleetgate_upstream_token_exchanges_total", "fleetgate_token_endpoint_errors_total",
                 "fleetgate_websocket_sessions", "fleetgate_quota_sync_last_success_timestamp_seconds",
                 "fleetgate_quota_sync_runs_total", "fleetgate_store_errors_total",
                 "fleetgate_cluster_redis_up", "fleetgate_cluster_errors_total"):
        assert name in used, f"no alert on {name}"
    # A name that is not in the catalog may appear in a comment only, never in a rule.
    docs = documented_metrics()
    for line in (DEPLOY / "prometheus" / "alerts.yaml").read_text().splitlines():
        for name in METRIC_RE.findall(line):
            base = next((name[: -len(s)] for s in HIST_SUFFIXES if name.endswith(s)), name)
            if base not in docs and name not in docs:
                assert line.lstrip().startswith("#"), f"undocumented metric outside a comment: {line}"


def test_alerts_cover_the_required_conditions():
    exprs = {r["alert"]: " ".join(r["expr"].split()) for r in alert_rules()}
    joined = "\n".join(exprs.values())

    def has(pattern: str) -> bool:
        return re.search(pattern, joined) is not None

    assert has(r"\bup\{[^}]*\}\s*==\s*0"), "gateway down (up == 0)"
    assert has(r'fleetgate_requests_total\{[^}]*status_class="5xx"'), "5xx ratio"
    assert has(r"fleetgate_upstream_errors_total"), "upstream errors"
    assert has(r'fleetgate_upstream_token_exchanges_total\{[^}]*result!="ok"'), "token exchange failures"
    assert has(r'fleetgate_token_endpoint_errors_total\{[^}]*error_code="rate_limited"'), "token endpoint abuse"
    assert has(r'reason="shutting_down"'), "draining too long"
    assert has(r"fleetgate_websocket_sessions\{[^}]*\}\)?\s*==\s*0"), "WebSocket sessions to zero"
    assert has(r"time\(\)\s*-\s*max by \(job, instance\) \(fleetgate_quota_sync_last_success_timestamp_seconds"), \
        "quota sync stale"
    assert has(r'fleetgate_quota_sync_runs_total\{[^}]*result="error"'), "quota sync failing"
    assert has(r"increase\(fleetgate_store_errors_total"), "store write errors"
    assert has(r"fleetgate_cluster_redis_up\{[^}]*\}\)?\s*==\s*0"), "Redis down"
    # fleetgate_cluster_redis_up is 0 on every embedded-store node: a rule on it must also
    # require a series only cluster nodes have.
    for name, expr in exprs.items():
        if "fleetgate_cluster_redis_up" in expr:
            assert "fleetgate_cluster_errors_total" in expr, f"{name} would fire on embedded-store nodes"
    # Quota sync alerts must stay silent where the sync is off (the timestamp gauge is 0 there).
    for name, expr in exprs.items():
        if "fleetgate_quota_sync_last_success_timestamp_seconds" in expr:
            assert "fleetgate_quota_sync_runs_total" in expr, f"{name} would fire with the sync off"


def test_promtool_check_rules():
    promtool = shutil.which("promtool")
    if not promtool:
        pytest.skip("promtool not installed")
    out = subprocess.run([promtool, "check", "rules", str(DEPLOY / "prometheus" / "alerts.yaml")],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


def test_promtool_alert_unit_tests():
    """tests/deploy/alerts_test.yaml: which nodes the state alerts fire for, and when."""
    (doc,) = load_yaml_docs(ALERT_TESTS)
    tested = {t["alertname"] for group in doc["tests"] for t in group["alert_rule_test"]}
    assert tested >= {"FleetgateQuotaSyncFailing", "FleetgateQuotaSyncStale", "FleetgateStoreWriteErrors",
                      "FleetgateRedisDown"}, tested
    promtool = shutil.which("promtool")
    if not promtool:
        pytest.skip("promtool not installed")
    out = subprocess.run([promtool, "test", "rules", ALERT_TESTS.name], cwd=ALERT_TESTS.parent,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


# --- Grafana ---------------------------------------------------------------------------------


def grafana_panels() -> list[dict]:
    dash = json.loads((DEPLOY / "grafana" / "fleetgate.json").read_text())
    assert dash["title"] and dash["uid"] and isinstance(dash["schemaVersion"], int)
    panels = []
    for p in dash["panels"]:
        panels.append(p)
        panels += p.get("panels", [])
    return panels


def test_grafana_dashboard_structure():
    panels = grafana_panels()
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "duplicate panel ids"
    for p in panels:
        g = p["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24 and g["h"] > 0, p["title"]
        if p["type"] == "row":
            continue
        assert p["targets"], f"panel {p['title']!r} has no queries"
        refs = [t["refId"] for t in p["targets"]]
        assert len(refs) == len(set(refs)), p["title"]
        for t in p["targets"]:
            assert balanced(t["expr"]), f"{p['title']}: unbalanced expr"


def test_grafana_uses_only_documented_metrics_and_covers_the_catalog():
    dash = json.loads((DEPLOY / "grafana" / "fleetgate.json").read_text())
    exprs = [t["expr"] for p in grafana_panels() if p["type"] != "row" for t in p["targets"]]
    exprs += [v["definition"] for v in dash["templating"]["list"] if "definition" in v]
    used = check_metric_refs(exprs, "fleetgate.json")
    for name in ("fleetgate_requests_total", "fleetgate_denials_total", "fleetgate_request_duration_seconds",
                 "fleetgate_upstream_first_byte_seconds", "fleetgate_websocket_sessions", "fleetgate_sse_streams",
                 "fleetgate_relayed_bytes_total", "fleetgate_token_endpoint_errors_total",
                 "fleetgate_upstream_token_exchanges_total"):
        assert name in used, f"no panel shows {name}"
    text = "\n".join(exprs)
    for q in ("0.5", "0.99"):
        for h in ("fleetgate_request_duration_seconds_bucket", "fleetgate_upstream_first_byte_seconds_bucket"):
            assert re.search(rf"histogram_quantile\({q},[^\n]*{h}", text), f"p{q} of {h}"


# --- Kubernetes ------------------------------------------------------------------------------


def test_k8s_objects_are_namespace_agnostic_and_listed():
    objs = k8s_objects()
    for o in objs:
        assert o.get("apiVersion") and o.get("kind") and o["metadata"].get("name"), o["__file__"]
        assert "namespace" not in o["metadata"], f"{o['__file__']}: hard-coded namespace"
    (kust,) = load_yaml_docs(K8S / "kustomization.yaml")
    assert "namespace" not in kust
    listed = set(kust["resources"])
    for r in listed:
        assert (K8S / r).is_file(), f"kustomization lists missing {r}"
    kust_text = (K8S / "kustomization.yaml").read_text()
    for p in K8S.glob("*.yaml"):
        if p.name != "kustomization.yaml" and p.name not in listed:
            # Deliberately left out: must say so in the kustomization and in its own header.
            assert re.search(rf"^\s*#\s*-\s*{re.escape(p.name)}\b", kust_text, re.M), f"{p.name} unlisted, unexplained"
    kinds = {o["kind"] for o in objs}
    for k in ("ConfigMap", "Secret", "Deployment", "PersistentVolumeClaim", "Service",
              "PodDisruptionBudget"):
        assert k in kinds, f"no {k}"
    # Redis and the autoscaler belong to cluster mode (deploy/k8s-cluster) only.
    assert not kinds & {"HorizontalPodAutoscaler", "StatefulSet"}, kinds


def kustomize(directory: Path) -> list[dict]:
    kubectl = shutil.which("kubectl")
    if not kubectl:
        pytest.skip("kubectl not installed")
    out = subprocess.run([kubectl, "kustomize", str(directory)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def test_kustomize_builds():
    kinds = [d["kind"] for d in kustomize(K8S)]
    assert "Deployment" in kinds and "Secret" not in kinds and "StatefulSet" not in kinds, kinds
    assert "HorizontalPodAutoscaler" not in kinds, kinds


def pod_spec() -> dict:
    return one("Deployment", "fleetgate")["spec"]["template"]["spec"]


def gateway_container() -> dict:
    (c,) = [c for c in pod_spec()["containers"] if c["name"] == "fleetgate"]
    return c


def resolve_port(container: dict, port) -> int:
    if isinstance(port, int):
        return port
    (p,) = [p for p in container["ports"] if p.get("name") == port]
    return p["containerPort"]


def test_deployment_single_replica_recreate():
    dep = one("Deployment", "fleetgate")
    assert dep["spec"]["replicas"] == 1, "the embedded store has one writer: one replica"
    assert dep["spec"]["strategy"]["type"] == "Recreate"
    assert not [o for o in k8s_objects() if o["kind"] == "HorizontalPodAutoscaler"], \
        "the embedded store allows one replica: no autoscaler"
    labels = dep["spec"]["template"]["metadata"]["labels"]
    assert dep["spec"]["selector"]["matchLabels"].items() <= labels.items()
    pdb = one("PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert pdb["spec"].get("maxUnavailable") == 1, "minAvailable: 1 would block node drains forever"


def test_probes_point_at_admin_port():
    c = gateway_container()
    for probe, path in (("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")):
        get = c[probe]["httpGet"]
        assert get["path"] == path, probe
        assert resolve_port(c, get["port"]) == ADMIN_PORT, probe
    if "startupProbe" in c:
        assert c["startupProbe"]["httpGet"]["path"] == "/healthz"
    ports = {p["containerPort"] for p in c["ports"]}
    assert ports == {DEVICE_PORT, ADMIN_PORT}
    cfg = configmap_config()
    assert port_of(cfg["admin_listener"]["addr"]) == ADMIN_PORT
    assert port_of(cfg["device_listener"]["addr"]) == DEVICE_PORT
    # Probes come from the kubelet over the pod IP: loopback would fail them.
    assert not cfg["admin_listener"]["addr"].startswith("127.")


def test_termination_grace_exceeds_drain_grace():
    grace = parse_duration(configmap_config()["server"]["grace_period"])
    assert pod_spec()["terminationGracePeriodSeconds"] > grace
    assert "preStop" not in gateway_container().get("lifecycle", {}), "SIGTERM drains by itself"


def test_pod_security_and_resources():
    spec, c = pod_spec(), gateway_container()
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["securityContext"].get("runAsUser", 1) != 0
    sc = c["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"]["drop"] == ["ALL"]
    assert c["resources"]["requests"]["memory"] and c["resources"]["limits"]["memory"]


def test_volumes_config_secret_and_store_are_wired():
    spec, c = pod_spec(), gateway_container()
    volumes = {v["name"]: v for v in spec["volumes"]}
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
    # Config: the ConfigMap mounted as a directory (no subPath, so edits propagate for SIGHUP).
    m = mounts["/etc/fleetgate"]
    assert "subPath" not in m
    assert volumes[m["name"]]["configMap"]["name"] == "fleetgate-config"
    assert " ".join(c["args"]).endswith("serve -c /etc/fleetgate/config.toml")
    # Store: the PVC mounted where store.path lives.
    store = configmap_config()["store"]["path"]
    assert store.startswith("/var/lib/fleetgate/")
    m = mounts[str(Path(store).parent)]
    claim = volumes[m["name"]]["persistentVolumeClaim"]["claimName"]
    pvc = one("PersistentVolumeClaim", claim)
    assert pvc["spec"]["accessModes"] == ["ReadWriteOnce"]
    # Secrets: the Secret provides every env var the config names.
    (ref,) = c["envFrom"]
    secret = one("Secret", ref["secretRef"]["name"])
    assert set(secret["stringData"]) >= env_names(configmap_config())


def test_secret_holds_only_marked_placeholders():
    secret = one("Secret")
    assert "data" not in secret, "use stringData so placeholders stay readable"
    for k, v in secret["stringData"].items():
        assert "REPLACE_ME" in v, f"{k} is not a marked placeholder"


def test_services():
    labels = one("Deployment", "fleetgate")["spec"]["template"]["metadata"]["labels"]
    c = gateway_container()
    device, admin = one("Service", "fleetgate"), one("Service", "fleetgate-admin")
    for svc in (device, admin):
        assert svc["spec"]["selector"].items() <= labels.items()
    assert [resolve_port(c, p["targetPort"]) for p in device["spec"]["ports"]] == [DEVICE_PORT]
    assert [resolve_port(c, p["targetPort"]) for p in admin["spec"]["ports"]] == [ADMIN_PORT]
    assert admin["spec"].get("type", "ClusterIP") == "ClusterIP", "the admin port must stay private"


# --- Kubernetes, cluster mode (deploy/k8s-cluster, an overlay of deploy/k8s) ------------------


def cluster_kustomization() -> dict:
    (kust,) = load_yaml_docs(K8S_CLUSTER / "kustomization.yaml")
    return kust


def test_cluster_overlay_lists_its_files():
    kust = cluster_kustomization()
    assert "namespace" not in kust
    assert kust["resources"][0] == "../k8s", "the overlay builds on the single-node deployment"
    own = set(kust["resources"][1:])
    patch_files = {p["path"] for p in kust["patches"] if "path" in p}
    for f in own | patch_files:
        assert (K8S_CLUSTER / f).is_file(), f"kustomization lists missing {f}"
    for p in K8S_CLUSTER.glob("*.yaml"):
        if p.name != "kustomization.yaml":
            assert p.name in own | patch_files, f"{p.name} is not used by the overlay"
    assert {"redis.yaml", "hpa.yaml"} <= own
    for o in k8s_objects(K8S_CLUSTER):
        assert o.get("apiVersion") and o.get("kind") and o["metadata"].get("name"), o["__file__"]
        assert "namespace" not in o["metadata"], f"{o['__file__']}: hard-coded namespace"


def test_cluster_configmap_is_the_single_node_one_with_redis():
    base, cluster = configmap_config(), cluster_configmap_config()
    assert {k: v for k, v in cluster.items() if k != "store"} == {k: v for k, v in base.items() if k != "store"}, \
        "only [store] differs between the two deployments"
    store = cluster["store"]
    assert store["kind"] == "redis"
    assert Path(store["path"]).parent == Path(base["store"]["path"]).parent, "store.path on the data volume"
    redis = store["redis"]
    assert not {"sentinel", "cluster"} & set(redis), "the overlay's own Redis is a single instance"
    m = re.fullmatch(r"redis://([a-z0-9-]+):(\d+)/\d+", redis["url"])
    assert m, redis["url"]
    svc = one("Service", m.group(1), K8S_CLUSTER)
    assert int(m.group(2)) in [p["port"] for p in svc["spec"]["ports"]]
    assert not secret_literals(cluster), secret_literals(cluster)
    assert redis["password_env"] in one("Secret")["stringData"]
    assert set(one("Secret")["stringData"]) >= env_names(cluster)


def test_cluster_redis():
    svc = one("Service", "fleetgate-redis", K8S_CLUSTER)
    sts = one("StatefulSet", "fleetgate-redis", K8S_CLUSTER)
    pod_labels = sts["spec"]["template"]["metadata"]["labels"]
    assert svc["spec"]["selector"].items() <= pod_labels.items()
    assert sts["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    assert sts["spec"]["serviceName"] == svc["metadata"]["name"]
    (c,) = sts["spec"]["template"]["spec"]["containers"]
    args = c["args"]
    assert args[args.index("--appendonly") + 1] == "yes", "Redis holds the usage: it must persist (AOF)"
    # The password comes from the gateway's Secret, under the name the gateway's config reads.
    (env,) = [e for e in c["env"] if f"$({e['name']})" in args]
    assert args[args.index("--requirepass") + 1] == f"$({env['name']})"
    ref = env["valueFrom"]["secretKeyRef"]
    assert ref["name"] == "fleetgate-secrets"
    assert ref["key"] == cluster_configmap_config()["store"]["redis"]["password_env"]
    # redis-cli exits 0 on an error reply (NOAUTH): the probe must look for PONG.
    assert "PONG" in " ".join(c["readinessProbe"]["exec"]["command"])
    assert env["name"] == "REDISCLI_AUTH", "the probe authenticates through REDISCLI_AUTH"
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    assert mounts["/data"] in {t["metadata"]["name"] for t in sts["spec"]["volumeClaimTemplates"]}
    sc = sts["spec"]["template"]["spec"]["securityContext"]
    assert sc["runAsNonRoot"] is True and sc.get("runAsUser", 1) != 0
    assert c["securityContext"]["readOnlyRootFilesystem"] is True


def test_cluster_deployment_patch_and_hpa():
    patch = one("Deployment", "fleetgate", K8S_CLUSTER)
    strategy = patch["spec"]["strategy"]
    assert strategy["type"] == "RollingUpdate" and strategy["rollingUpdate"]["maxUnavailable"] == 0
    (data,) = [v for v in patch["spec"]["template"]["spec"]["volumes"] if v["name"] == "data"]
    assert "emptyDir" in data and data["persistentVolumeClaim"] is None, "drop the shared PVC per pod"
    hpa = one("HorizontalPodAutoscaler", "fleetgate", K8S_CLUSTER)
    assert hpa["spec"]["scaleTargetRef"]["name"] == "fleetgate"
    assert 2 <= hpa["spec"]["minReplicas"] < hpa["spec"]["maxReplicas"]


def test_cluster_kustomize_builds():
    objs = kustomize(K8S_CLUSTER)
    kinds = [d["kind"] for d in objs]
    assert "Secret" not in kinds and "PersistentVolumeClaim" not in kinds, kinds
    assert {"Deployment", "StatefulSet", "HorizontalPodAutoscaler", "PodDisruptionBudget"} <= set(kinds), kinds
    (dep,) = [d for d in objs if d["kind"] == "Deployment"]
    assert "replicas" not in dep["spec"], "the HPA owns the replica count"
    assert dep["spec"]["strategy"]["type"] == "RollingUpdate"
    spec = dep["spec"]["template"]["spec"]
    (data,) = [v for v in spec["volumes"] if v["name"] == "data"]
    assert set(data) == {"name", "emptyDir"}, data
    (c,) = [c for c in spec["containers"] if c["name"] == "fleetgate"]
    assert {m["name"]: m["mountPath"] for m in c["volumeMounts"]}["data"] == \
        str(Path(cluster_configmap_config()["store"]["path"]).parent)
    (cm,) = [d for d in objs if d["kind"] == "ConfigMap"]
    assert cm["data"]["config.toml"] == cluster_configmap_toml_text()


def test_configmap_config_has_no_secret_values():
    cfg = configmap_config()
    assert not secret_literals(cfg), secret_literals(cfg)
    assert env_names(cfg) >= {"FLEETGATE_ADMIN_TOKEN", "COZE_API_TOKEN", "FLEETGATE_SIGNING_KEY_K1"}
    # Nothing in the text that looks like a key or a PAT either.
    text = configmap_toml_text()
    assert not re.search(r"[A-Za-z0-9+/]{40,}={0,2}", text), "base64 blob in the ConfigMap"
    assert not re.search(r"\b(pat|sat|fgs)_[A-Za-z0-9]{8,}", text), "token-like literal in the ConfigMap"
    repo_cfg = tomllib.loads((REPO / "config.toml").read_text())
    assert not secret_literals(repo_cfg)


# --- fleetgate check-config ------------------------------------------------------------------


@pytest.fixture(scope="session")
def fleetgate_bin() -> Path:
    target = Path(os.environ.get("CARGO_TARGET_DIR") or REPO / "target")
    path = Path(os.environ.get("FLEETGATE_BIN") or target / "debug" / "fleetgate")
    if not path.exists():
        cargo = shutil.which("cargo")
        if not cargo:
            pytest.fail(f"{path} missing and cargo not found (set FLEETGATE_BIN)")
        subprocess.run([cargo, "build", "--bins", "-p", "gateway"], cwd=REPO, check=True,
                       env={**os.environ, "CARGO_TARGET_DIR": str(target)})
    assert path.exists(), path
    return path


def check_config(binary: Path, text: str, tmp_path: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    cfg = tmp_path / "config.toml"
    cfg.write_text(text)
    base = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(tmp_path)}
    return subprocess.run([str(binary), "check-config", "-c", str(cfg)], capture_output=True, text=True,
                          env={**base, **env}, cwd=tmp_path, timeout=60)


def test_configmap_passes_check_config(fleetgate_bin, tmp_path):
    store_dir = Path(configmap_config()["store"]["path"]).parent
    existed = store_dir.exists()
    out = check_config(fleetgate_bin, configmap_toml_text(), tmp_path, DUMMY_ENV)
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.strip().endswith(": ok")
    # check-config only validates: it does not open (or create) the store.
    assert store_dir.exists() == existed


def test_check_config_does_not_open_the_store(fleetgate_bin, tmp_path):
    store = tmp_path / "absent" / "dir" / "fleetgate.redb"
    text = configmap_toml_text().replace(configmap_config()["store"]["path"], str(store))
    assert str(store) in text
    out = check_config(fleetgate_bin, text, tmp_path, DUMMY_ENV)
    assert out.returncode == 0, out.stdout + out.stderr
    assert not (tmp_path / "absent").exists()


def test_secret_placeholders_are_rejected(fleetgate_bin, tmp_path):
    """Deploying the placeholder Secret unchanged must fail validation, not run."""
    env = dict(one("Secret")["stringData"])
    out = check_config(fleetgate_bin, configmap_toml_text(), tmp_path, env)
    assert out.returncode != 0
    err = out.stdout + out.stderr
    assert "admin" in err and "signing_keys" in err, err


def test_missing_secrets_are_rejected(fleetgate_bin, tmp_path):
    out = check_config(fleetgate_bin, configmap_toml_text(), tmp_path, {})
    assert out.returncode != 0
    err = out.stdout + out.stderr
    for name in DUMMY_ENV:
        assert name in err, f"{name} not reported missing: {err}"


def test_cluster_configmap_passes_check_config(fleetgate_bin, tmp_path):
    out = check_config(fleetgate_bin, cluster_configmap_toml_text(), tmp_path, CLUSTER_DUMMY_ENV)
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.strip().endswith(": ok")


def test_cluster_secret_placeholders_are_rejected(fleetgate_bin, tmp_path):
    env = dict(one("Secret")["stringData"])
    out = check_config(fleetgate_bin, cluster_configmap_toml_text(), tmp_path, env)
    assert out.returncode != 0
    err = out.stdout + out.stderr
    assert "admin" in err and "signing_keys" in err, err


def test_cluster_missing_secrets_are_rejected(fleetgate_bin, tmp_path):
    out = check_config(fleetgate_bin, cluster_configmap_toml_text(), tmp_path, {})
    assert out.returncode != 0
    err = out.stdout + out.stderr
    for name in CLUSTER_DUMMY_ENV:
        assert name in err, f"{name} not reported missing: {err}"


def test_docker_image_config_passes_check_config(fleetgate_bin, tmp_path):
    text = docker_image_config()
    out = check_config(fleetgate_bin, text, tmp_path, DUMMY_ENV)
    assert out.returncode == 0, out.stdout + out.stderr


# --- systemd ---------------------------------------------------------------------------------


def unit() -> dict[str, list[str]]:
    """key -> values (all sections; keys may repeat)."""
    out: dict[str, list[str]] = {}
    for line in (DEPLOY / "systemd" / "fleetgate.service").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";", "[")):
            continue
        k, _, v = line.partition("=")
        out.setdefault(k.strip(), []).append(v.strip())
    return out


def test_systemd_unit():
    u = unit()

    def val(k):
        assert k in u, f"missing {k}"
        return u[k][-1]

    assert val("Type") == "simple"
    assert val("ExecStart").endswith("fleetgate serve -c /etc/fleetgate/config.toml")
    assert re.fullmatch(r"/bin/kill -(s )?HUP \$MAINPID", val("ExecReload"))
    assert val("EnvironmentFile").lstrip("-") == "/etc/fleetgate/env"
    assert val("StateDirectory") == "fleetgate"
    assert val("DynamicUser") == "yes" or val("User") not in ("", "root")
    for k in ("ProtectHome", "PrivateTmp", "NoNewPrivileges"):
        assert val(k) == "yes", k
    assert val("ProtectSystem") == "strict"
    assert val("CapabilityBoundingSet") == ""
    assert set(val("RestrictAddressFamilies").split()) == {"AF_INET", "AF_INET6", "AF_UNIX"}
    assert "@system-service" in u["SystemCallFilter"][0].split()
    assert val("LimitNOFILE") == "1048576"
    assert val("KillSignal") == "SIGTERM"
    assert val("Restart") == "on-failure"
    grace = parse_duration(tomllib.loads((REPO / "config.toml").read_text())["server"]["grace_period"])
    stop = val("TimeoutStopSec")
    assert parse_duration(stop if not stop.isdigit() else stop + "s") > grace


def test_systemd_analyze(fleetgate_bin, tmp_path):
    sa = shutil.which("systemd-analyze")
    if not sa:
        pytest.skip("systemd-analyze not installed")
    text = (DEPLOY / "systemd" / "fleetgate.service").read_text().replace("/usr/local/bin/fleetgate", str(fleetgate_bin))
    (tmp_path / "fleetgate.service").write_text(text)
    out = subprocess.run([sa, "verify", "./fleetgate.service"], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    sec = subprocess.run([sa, "security", "--offline=yes", "./fleetgate.service"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=60)
    m = re.search(r"Overall exposure level for fleetgate.service: ([\d.]+)", sec.stdout)
    if sec.returncode != 0 and not m:
        pytest.skip(f"systemd-analyze security --offline unsupported: {sec.stderr.strip()[:200]}")
    assert m and float(m.group(1)) <= 2.0, sec.stdout[-500:]


# --- Dockerfile ------------------------------------------------------------------------------


def dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuations joined and comments dropped."""
    out, cur = [], ""
    for line in (DEPLOY / "Dockerfile").read_text().splitlines():
        if not cur and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if cur and line.lstrip().startswith("#"):
            continue
        if line.rstrip().endswith("\\"):
            cur += line.rstrip()[:-1] + " "
            continue
        cur += line
        instr, _, args = cur.strip().partition(" ")
        out.append((instr.upper(), args.strip()))
        cur = ""
    assert not cur
    return out


def stages() -> list[list[tuple[str, str]]]:
    st: list[list[tuple[str, str]]] = []
    for ins in dockerfile():
        if ins[0] == "FROM":
            st.append([])
        assert st, "instruction before FROM"
        st[-1].append(ins)
    return st


def docker_image_config() -> str:
    """config.toml as the image ships it: the repo's file with the image's sed applied."""
    (sed,) = [a for i, a in stages()[-1] if i == "RUN" and "sed -i" in a]
    m = re.search(r"sed -i 's\|([^|]+)\|([^|]+)\|' /etc/fleetgate/config.toml", sed)
    assert m, sed
    pattern, repl = m.group(1), m.group(2)
    src = (REPO / "config.toml").read_text()
    assert re.search(pattern, src, re.M), "the Dockerfile's sed no longer matches config.toml"
    return re.sub(pattern, repl, src, flags=re.M)


def test_dockerfile_stages():
    st = stages()
    assert len(st) == 2
    builder, runtime = st
    assert builder[0][1] == "rust:1.95-bookworm AS builder"
    b_runs = " ".join(a for i, a in builder if i == "RUN")
    assert re.search(r"apt-get install[^&]*\bcmake\b", b_runs)
    assert "cargo build --release --locked -p gateway --bin fleetgate" in b_runs
    assert runtime[0][1].startswith("debian:bookworm-slim")
    r_runs = " ".join(a for i, a in runtime if i == "RUN")
    assert re.search(r"apt-get install[^&]*\bca-certificates\b", r_runs)
    copies = [a for i, a in runtime if i == "COPY"]
    assert any(a.startswith("--from=builder") and a.endswith("/usr/local/bin/fleetgate") for a in copies)
    assert "config.toml /etc/fleetgate/config.toml" in copies
    assert (REPO / "config.toml").is_file()


def test_dockerfile_runtime_settings():
    runtime = stages()[-1]
    users = [a for i, a in runtime if i == "USER"]
    assert users, "no USER in the runtime stage"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0"), users
    expose = {int(p.split("/")[0]) for i, a in runtime if i == "EXPOSE" for p in a.split()}
    assert expose == {DEVICE_PORT, ADMIN_PORT}
    volumes = " ".join(a for i, a in runtime if i == "VOLUME")
    assert "/var/lib/fleetgate" in volumes
    assert ("STOPSIGNAL", "SIGTERM") in runtime
    cmd = " ".join(" ".join(json.loads(a)) for i, a in runtime if i in ("ENTRYPOINT", "CMD"))
    assert "fleetgate" in cmd and "serve -c /etc/fleetgate/config.toml" in cmd
    # The image's config binds the admin listener where a published port reaches it.
    cfg = tomllib.loads(docker_image_config())
    assert cfg["admin_listener"]["addr"] == f"0.0.0.0:{ADMIN_PORT}"
    assert Path(cfg["store"]["path"]).parent == Path("/var/lib/fleetgate")


def test_dockerfile_bakes_in_no_secrets():
    secretish = re.compile(r"(TOKEN|SECRET|PASSWORD|PASSWD|SIGNING_KEY|PRIVATE_KEY|API_KEY|CREDENTIAL)", re.I)
    for instr, args in dockerfile():
        if instr in ("ENV", "ARG", "LABEL"):
            assert not secretish.search(args), f"{instr} {args}"
        if instr in ("COPY", "ADD"):
            assert not re.search(r"(\.env\b|env$|\.pem\b|\.key\b|secret)", args, re.I), f"{instr} {args}"
