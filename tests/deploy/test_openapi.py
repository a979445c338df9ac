"""Keeps docs/openapi.yaml (the admin API contract) in sync with the gateway.

What this checks, and how far it can be trusted:

1. The document is valid OpenAPI (`openapi-spec-validator`).
2. Code → spec, by reading the Rust sources (no Rust is compiled or changed for this): the
   route tables in gateway/src/admin/mod.rs (`("GET", "/healthz")`, the `/metrics` check),
   gateway/src/admin/devices.rs (`path == "/admin/v1/devices"` with its `"POST" =>` arms, and
   the `("METHOD", None | Some("segment"), _ | None | Some(var))` arms under
   `/admin/v1/devices/{device_id}`) and gateway/src/quota_api.rs (the
   `strip_prefix("/v1/commerce/benefit/limitations")` prefix and its `("METHOD", "suffix" | id)`
   arms) are matched with regular expressions, and the resulting (method, path) set must EQUAL
   the spec's. This is text matching, not parsing: it relies on the routes staying written in
   that style. If the code is restructured, the sets stop matching and the test fails (it does
   not silently pass) — then update the extraction here.
3. Spec → running code: every operation in the spec is called on a live `fleetgate sandbox`
   with the admin token and a valid request (the table REQUESTS below, which must cover the
   spec exactly), in an order that creates what later calls need. Each must answer 2xx (so in
   particular never 404 "no such admin route" or 405), with the content type the spec names,
   and a body valid against the spec's schema for that status.
4. Every authenticated operation answers 401 with the error envelope without the token, and
   the unauthenticated ones (`/healthz`, `/readyz`, `/metrics`) answer without it.

Fuzzing (bad inputs → 4xx, never 5xx; response conformance) is test_schemathesis.py.
"""

from __future__ import annotations

import json
import re
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from jsonschema import Draft202012Validator
from openapi_spec_validator import validate

REPO = Path(__file__).resolve().parents[2]

METHODS = ("get", "put", "post", "patch", "delete", "head", "options", "trace")
ADMIN_SRC = REPO / "gateway" / "src" / "admin" / "mod.rs"
DEVICES_SRC = REPO / "gateway" / "src" / "admin" / "devices.rs"
QUOTA_SRC = REPO / "gateway" / "src" / "quota_api.rs"

DEVICE = "openapi-sync-1"
KID = "openapi-k1"


def spec_operations(spec: dict) -> set[tuple[str, str]]:
    return {
        (m.upper(), path)
        for path, item in spec["paths"].items()
        for m in item
        if m in METHODS
    }


def normalize(path: str) -> str:
    return re.sub(r"\{[^}]*\}", "{}", path)


# --- 1. validity -----------------------------------------------------------------------------


def test_spec_is_valid_openapi(openapi_spec):
    validate(openapi_spec)
    assert openapi_spec["openapi"].startswith("3.")


def test_spec_security_model(openapi_spec):
    """Bearer auth everywhere except the three probes."""
    schemes = openapi_spec["components"]["securitySchemes"]
    assert schemes["adminToken"] == {**schemes["adminToken"], "type": "http", "scheme": "bearer"}
    assert openapi_spec["security"] == [{"adminToken": []}]
    for method, path in spec_operations(openapi_spec):
        op = openapi_spec["paths"][path][method.lower()]
        unauthenticated = path in ("/healthz", "/readyz", "/metrics")
        assert (op.get("security") == []) == unauthenticated, (method, path)


# --- 2. code → spec --------------------------------------------------------------------------


def fn_start(src: str, name: str) -> int:
    """Where `pub fn name(` or `pub async fn name(` starts."""
    m = re.search(rf"pub (?:async )?fn {name}\(", src)
    assert m, f"`pub fn {name}(` not found"
    return m.start()


def code_routes() -> set[tuple[str, str]]:
    routes: set[tuple[str, str]] = set()

    admin = ADMIN_SRC.read_text()
    for method, path in re.findall(r'\("(GET|POST|PUT|PATCH|DELETE)",\s*"(/[^"]*)"\)', admin):
        routes.add((method, path))
    m = re.search(r'uri\.path\(\)\s*==\s*"(/metrics)"\s*&&\s*session\.req_header\(\)\.method\s*==\s*Method::(\w+)', admin)
    assert m, "the /metrics check in admin/mod.rs was not recognised"
    routes.add((m.group(2), m.group(1)))

    devices = DEVICES_SRC.read_text()
    route_fn = devices[fn_start(devices, "route") :]
    collections = re.findall(r'if path == "(/admin/v1/[a-z]+)" \{(.*?)\n    \}', route_fn, re.S)
    assert {p for p, _ in collections} >= {"/admin/v1/devices", "/admin/v1/tokens"}, (
        "the collection routes in admin/devices.rs were not recognised"
    )
    for path, arms in collections:
        for method in re.findall(r'"(GET|POST|PUT|PATCH|DELETE)" =>', arms):
            routes.add((method, path))
    base = "/admin/v1/devices"
    assert f'strip_prefix("{base}/")' in route_fn
    arms = re.findall(
        r'\("(GET|POST|PUT|PATCH|DELETE)",\s*(None|Some\("([a-z_]+)"\)),\s*(_|None|Some\((\w+)\))\)',
        route_fn,
    )
    assert arms, "the per-device routes in admin/devices.rs were not recognised"
    for method, _, segment, _, var in arms:
        path = f"{base}/{{device_id}}"
        if segment:
            path += f"/{segment}"
        if var:
            path += f"/{{{var}}}"
        routes.add((method, path))

    quota = QUOTA_SRC.read_text()
    route_fn = quota[fn_start(quota, "route") : quota.index("\nfn parse")]
    m = re.search(r'strip_prefix\("(/v1/commerce/benefit/limitations)"\)', route_fn)
    assert m, "the quota route prefix in quota_api.rs was not recognised"
    prefix = m.group(1)
    for method, literal, ident in re.findall(
        r'\("(GET|POST|PUT|PATCH|DELETE)",\s*(?:"([^"]*)"|([a-z_]+))\)', route_fn
    ):
        routes.add((method, prefix + literal if not ident else f"{prefix}/{{benefit_id}}"))
    return routes


def test_code_routes_are_extracted():
    """Guards the extraction itself: the routes known today must all be found."""
    found = {(m, normalize(p)) for m, p in code_routes()}
    for expected in [
        ("GET", "/healthz"),
        ("GET", "/metrics"),
        ("POST", "/admin/v1/devices"),
        ("POST", "/admin/v1/tokens"),
        ("DELETE", "/admin/v1/devices/{}/credentials/{}"),
        ("GET", "/v1/commerce/benefit/limitations/usage"),
        ("PUT", "/v1/commerce/benefit/limitations/{}"),
    ]:
        assert expected in found


def test_spec_and_code_have_the_same_routes(openapi_spec):
    code = {(m, normalize(p)) for m, p in code_routes()}
    spec = {(m, normalize(p)) for m, p in spec_operations(openapi_spec)}
    assert not code - spec, f"routed by the gateway but missing from docs/openapi.yaml: {sorted(code - spec)}"
    assert not spec - code, f"in docs/openapi.yaml but not found in the route code: {sorted(spec - code)}"


# --- 3. spec → running gateway ---------------------------------------------------------------


def call(base: str, method: str, path: str, token: str | None, body=None, query: str = ""):
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(base + path + (f"?{query}" if query else ""), data=data, method=method)
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    if data is not None:
        req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, resp.headers.get("content-type", ""), resp.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers.get("content-type", ""), e.read()


RSA_PUBLIC = (REPO / "sandbox" / "tests" / "keys" / "test_only_rsa_public.pem").read_text()

# (method, path template) → (concrete path, query, body), in call order. `{benefit_id}` is
# filled from the create answer.
REQUESTS: list[tuple[tuple[str, str], tuple[str, str, object]]] = [
    (("GET", "/healthz"), ("/healthz", "", None)),
    (("GET", "/readyz"), ("/readyz", "", None)),
    (("GET", "/metrics"), ("/metrics", "", None)),
    (("POST", "/admin/v1/devices"), ("/admin/v1/devices", "", {"device_id": DEVICE, "labels": {"model": "m1"}})),
    (("GET", "/admin/v1/devices"), ("/admin/v1/devices", "page_size=1000", None)),
    (("GET", "/admin/v1/devices/{device_id}"), (f"/admin/v1/devices/{DEVICE}", "", None)),
    (("PATCH", "/admin/v1/devices/{device_id}"), (f"/admin/v1/devices/{DEVICE}", "", {"labels": {"model": "m2"}})),
    (("POST", "/admin/v1/devices/{device_id}/credentials"),
     (f"/admin/v1/devices/{DEVICE}/credentials", "",
      {"type": "public_key", "kid": KID, "algorithm": "RS256", "public_key_pem": RSA_PUBLIC})),
    (("GET", "/admin/v1/devices/{device_id}/credentials"), (f"/admin/v1/devices/{DEVICE}/credentials", "", None)),
    (("POST", "/admin/v1/devices/{device_id}/tokens"),
     (f"/admin/v1/devices/{DEVICE}/tokens", "", {"duration_seconds": 60})),
    (("POST", "/admin/v1/tokens"),
     ("/admin/v1/tokens", "", {"device_ids": [DEVICE, "no-such-device"], "duration_seconds": 60})),
    (("POST", "/admin/v1/devices/{device_id}/revoke"), (f"/admin/v1/devices/{DEVICE}/revoke", "", None)),
    (("POST", "/admin/v1/reload"), ("/admin/v1/reload", "", None)),
    (("DELETE", "/admin/v1/devices/{device_id}/credentials/{kid}"),
     (f"/admin/v1/devices/{DEVICE}/credentials/{KID}", "", None)),
    (("POST", "/v1/commerce/benefit/limitations"),
     ("/v1/commerce/benefit/limitations", "",
      {"entity_type": "single_device", "entity_id": DEVICE,
       "benefit_info": {"benefit_type": "requests", "started_at": 0, "ended_at": 253402300799,
                        "limit": 100, "trigger_unit": "day", "trigger_time": 1}})),
    (("GET", "/v1/commerce/benefit/limitations"),
     ("/v1/commerce/benefit/limitations", f"entity_type=single_device&entity_id={DEVICE}", None)),
    (("PUT", "/v1/commerce/benefit/limitations/{benefit_id}"),
     ("/v1/commerce/benefit/limitations/{benefit_id}", "", {"limit": 200})),
    (("GET", "/v1/commerce/benefit/limitations/usage"),
     ("/v1/commerce/benefit/limitations/usage", f"entity_type=single_device&entity_id={DEVICE}", None)),
    (("DELETE", "/admin/v1/devices/{device_id}"), (f"/admin/v1/devices/{DEVICE}", "", None)),
]


def test_request_table_covers_the_spec(openapi_spec):
    keys = [k for k, _ in REQUESTS]
    assert len(keys) == len(set(keys))
    assert set(keys) == spec_operations(openapi_spec)


def response_validator(spec: dict, response: dict, media_type: str) -> Draft202012Validator | None:
    if "$ref" in response:
        response = spec["components"]["responses"][response["$ref"].rsplit("/", 1)[1]]
    schema = response.get("content", {}).get(media_type, {}).get("schema")
    if schema is None:
        return None
    # Local `#/components/...` refs resolve against this root.
    return Draft202012Validator({**schema, "components": spec["components"]})


def test_every_spec_operation_is_routed_and_conforms(admin_sandbox, openapi_spec):
    base, token = admin_sandbox["admin_url"], admin_sandbox["admin_token"]
    benefit_id = None
    for (method, template), (path, query, body) in REQUESTS:
        if "{benefit_id}" in path:
            assert benefit_id, "the create call did not return a benefit_id"
            path = path.replace("{benefit_id}", benefit_id)
        status, ctype, raw = call(base, method, path, token, body, query)
        where = f"{method} {path}{'?' + query if query else ''} → {status} {raw[:300]!r}"
        if status in (404, 405):
            assert b"no such admin route" not in raw and status != 405, f"not routed: {where}"
        assert 200 <= status < 300, where

        op = openapi_spec["paths"][template][method.lower()]
        response = op["responses"].get(str(status))
        assert response is not None, f"status {status} not documented: {where}"
        if "$ref" in response:
            response = openapi_spec["components"]["responses"][response["$ref"].rsplit("/", 1)[1]]
        media_type = ctype.split(";")[0].strip()
        assert media_type in response.get("content", {}), f"content type {ctype!r} not documented: {where}"
        validator = response_validator(openapi_spec, response, media_type)
        if media_type == "application/json":
            doc = json.loads(raw)
            errors = sorted(validator.iter_errors(doc), key=str)
            assert not errors, f"{where}: {errors[0].message} at {list(errors[0].absolute_path)}"
            if template == "/v1/commerce/benefit/limitations" and method == "POST":
                benefit_id = doc["data"]["benefit_info"]["benefit_id"]
        else:
            assert raw.startswith(b"# HELP"), where


def test_authentication(admin_sandbox, openapi_spec):
    base = admin_sandbox["admin_url"]
    error = response_validator(openapi_spec, {"$ref": "#/components/responses/Unauthorized"}, "application/json")
    for (method, template), (path, query, body) in REQUESTS:
        path = path.replace("{benefit_id}", "b1")
        op = openapi_spec["paths"][template][method.lower()]
        status, _, raw = call(base, method, path, None, body, query)
        if op.get("security") == []:
            assert status == 200, (method, path, status)
        else:
            assert status == 401, (method, path, status, raw)
            error.validate(json.loads(raw))
            assert json.loads(raw)["code"] == 4100


def test_unrouted_requests_are_told_apart(admin_sandbox):
    """The routing probe above can tell routed from unrouted requests."""
    base, token = admin_sandbox["admin_url"], admin_sandbox["admin_token"]
    status, _, raw = call(base, "GET", "/admin/v1/nope", token)
    assert status == 404 and json.loads(raw)["msg"] == "no such admin route"
    status, _, raw = call(base, "GET", "/admin/v1/devices/x/nope", token)
    assert status == 404 and json.loads(raw)["msg"] == "no such admin route"
    status, _, _ = call(base, "PUT", "/admin/v1/devices/x", token, {})
    assert status == 405
