"""Unmodified cozepy 0.20.0 through the gateway over device TLS (`[device_listener.tls]`).

`fleetgate sandbox --tls-cert … --tls-key …` serves the device API as https:// and wss:// with
the test fixture certificate (tests/fixtures/tls: `upstream.pem`, valid for 127.0.0.1, issued
by the test CA `ca.pem`). The SDK is configured only as a user would: `base_url` set to the
gateway and `SSL_CERT_FILE` pointing at the CA (httpx and Python's ssl module both honour it).
With an https base URL, cozepy's own websocket clients work as they do against Coze (they
refuse a plain http base URL).

With `--client-ca`, the gateway also requires a device client certificate (mTLS) and binds
tokens to the device it names; cozepy takes the certificate through its `http_client`
parameter (an httpx client with an SSL context), its documented extension point.
"""

import json
import ssl
import urllib.request

import pytest
from conftest import FIXTURES, start_fleetgate
from cozepy import ChatEventType, Coze, CozeAPIError, TokenAuth
from cozepy.request import SyncHTTPClient
from test_gateway_cozepy import BOT, CHAT_EVENTS, Recorder, user


@pytest.fixture(scope="module")
def tls_gateway():
    yield from start_fleetgate(
        "--tls-cert", str(FIXTURES / "upstream.pem"), "--tls-key", str(FIXTURES / "upstream.key")
    )


@pytest.fixture(scope="module")
def mtls_gateway():
    yield from start_fleetgate(
        "--tls-cert",
        str(FIXTURES / "upstream.pem"),
        "--tls-key",
        str(FIXTURES / "upstream.key"),
        "--client-ca",
        str(FIXTURES / "device-ca.pem"),
    )


@pytest.fixture
def trust_test_ca(monkeypatch):
    monkeypatch.setenv("SSL_CERT_FILE", str(FIXTURES / "ca.pem"))


def test_chat_stream_over_tls(tls_gateway, trust_test_ca):
    assert tls_gateway["gateway_url"].startswith("https://")
    coze = Coze(auth=TokenAuth(tls_gateway["device_token"]), base_url=tls_gateway["gateway_url"])
    events = list(coze.chat.stream(bot_id=BOT, user_id="u1", additional_messages=[user("hello over tls")]))
    kinds = [e.event for e in events]
    assert kinds[-1] == ChatEventType.CONVERSATION_CHAT_COMPLETED
    answer = "".join(e.message.content for e in events if e.event == ChatEventType.CONVERSATION_MESSAGE_DELTA)
    assert "hello over tls" in answer


def test_sdk_websocket_client_over_wss(tls_gateway, trust_test_ca):
    """`coze.websockets.chat` derives wss:// from the https base URL: nothing but the URL and
    the CA differ from talking to Coze."""
    coze = Coze(auth=TokenAuth(tls_gateway["device_token"]), base_url=tls_gateway["gateway_url"])
    rec = Recorder()
    client = coze.websockets.chat.create(bot_id="7468", on_event=rec.on_event(CHAT_EVENTS))
    client.connect()
    try:
        rec.wait_for("chat.created")
    finally:
        client.close()
    assert not rec.errors, rec.errors


def test_untrusted_gateway_certificate_is_refused_by_the_sdk(tls_gateway, monkeypatch):
    monkeypatch.setenv("SSL_CERT_FILE", str(FIXTURES / "redis-ca.pem"))
    coze = Coze(auth=TokenAuth(tls_gateway["device_token"]), base_url=tls_gateway["gateway_url"])
    with pytest.raises(Exception) as e:
        coze.chat.create(bot_id=BOT, user_id="u1", additional_messages=[user("hi")])
    assert "CERTIFICATE_VERIFY_FAILED" in repr(e.value) or "certificate verify failed" in str(e.value)


def admin(gw, method, path, body):
    req = urllib.request.Request(
        gw["admin_url"] + path,
        data=json.dumps(body).encode(),
        method=method,
        headers={"Authorization": "Bearer " + gw["admin_token"], "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.loads(r.read() or b"{}")


def device_token(gw, device_id):
    admin(gw, "POST", "/admin/v1/devices", {"device_id": device_id})
    return admin(gw, "POST", f"/admin/v1/devices/{device_id}/tokens", {"duration_seconds": 600})["access_token"]


def with_client_cert(name):
    ctx = ssl.create_default_context(cafile=str(FIXTURES / "ca.pem"))
    ctx.load_cert_chain(str(FIXTURES / f"{name}.pem"), str(FIXTURES / f"{name}.key"))
    return SyncHTTPClient(verify=ctx)


def test_mtls_device_certificate_binds_the_token(mtls_gateway):
    token_a = device_token(mtls_gateway, "tls-dev-a")
    token_b = device_token(mtls_gateway, "tls-dev-b")
    url = mtls_gateway["gateway_url"]

    ok = Coze(auth=TokenAuth(token_a), base_url=url, http_client=with_client_cert("device-a"))
    chat = ok.chat.create(bot_id=BOT, user_id="u1", additional_messages=[user("hi")])
    assert chat.id

    other = Coze(auth=TokenAuth(token_b), base_url=url, http_client=with_client_cert("device-a"))
    with pytest.raises(CozeAPIError) as e:
        other.chat.create(bot_id=BOT, user_id="u1", additional_messages=[user("hi")])
    assert e.value.code == 4100

    # No client certificate: the handshake is refused before any HTTP.
    bare = SyncHTTPClient(verify=ssl.create_default_context(cafile=str(FIXTURES / "ca.pem")))
    none = Coze(auth=TokenAuth(token_a), base_url=url, http_client=bare)
    with pytest.raises(Exception) as e:
        none.chat.create(bot_id=BOT, user_id="u1", additional_messages=[user("hi")])
    assert not isinstance(e.value, CozeAPIError), e.value
