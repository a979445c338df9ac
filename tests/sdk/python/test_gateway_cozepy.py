"""Unmodified cozepy 0.20.0 THROUGH the gateway: `fleetgate sandbox` (sandbox upstream + gateway).

The `fleetgate` fixture (conftest.py) starts `fleetgate sandbox --json --port 0 --admin-port 0`
(binary from ``FLEETGATE_BIN``, default ``<repo>/target/debug/fleetgate``). Every request here
goes to the gateway's device URL with the demo device's gateway token; the gateway admits it,
swaps in the upstream PAT and relays to the sandbox. The SDK must not tell the gateway from Coze.

The sandbox upstream paces SSE events (``--sse-delay-ms``, 20 ms by default), so non-stream chats
settle a little after creation, and it paces websocket audio in real time, so a voice turn takes a
few seconds.

As in test_sandbox_ws.py, cozepy's ``Coze(...).websockets`` refuses a non-https base URL, so the
websocket test builds the SDK's own websocket client classes on the gateway's ``ws://`` URL, and
waits on its own events (cozepy's sync ``client.wait()`` is buggy).
"""

import base64
import logging
import math
import struct
import threading
import time
import wave

import pytest
from cozepy import (
    AudioFormat,
    ChatEventType,
    ChatStatus,
    Coze,
    CozeAPIError,
    Message,
    MessageType,
    TokenAuth,
    WorkflowEventType,
)
from cozepy.request import Requester
from cozepy.websockets.audio.transcriptions import InputAudioBufferAppendEvent
from cozepy.websockets.chat import ChatUpdateEvent, WebsocketsChatBuildClient
from cozepy.websockets.ws import InputAudio, OutputAudio, WebsocketsErrorEvent, WebsocketsEventType

BOT = "7379462189365198898"
TIMEOUT = 20


def user(text):
    return Message.build_user_question_text(text)


def speech_ms(text, speed=1.0):
    """The sandbox's speech duration rule (sandbox::audio::speech_duration_ms)."""
    chars = sum(1 for c in text if not c.isspace())
    return max(round(chars * 60 / speed), 200)


def tone_pcm16(ms, rate=16000, freq=300.0):
    n = rate * ms // 1000
    return b"".join(struct.pack("<h", int(3000 * math.sin(2 * math.pi * freq * i / rate))) for i in range(n))


@pytest.fixture(scope="module")
def gw(fleetgate):
    """A Coze client on the gateway, authenticated with the demo device's gateway token."""
    return Coze(auth=TokenAuth(fleetgate["device_token"]), base_url=fleetgate["gateway_url"])


class _Collect(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


@pytest.fixture
def sdk_warnings():
    """Warnings the SDK logs (cozepy's logger does not propagate, so caplog misses them)."""
    h = _Collect()
    logger = logging.getLogger("cozepy")
    logger.addHandler(h)
    yield h.messages
    logger.removeHandler(h)


# --- REST / SSE -------------------------------------------------------------------------------


def test_chat_stream(gw):
    seen = []
    answer = ""
    completed = None
    stream = gw.chat.stream(bot_id=BOT, user_id="u1", additional_messages=[user("hello through the gateway")])
    assert stream.response.logid, "X-Tt-Logid on the SSE response"
    for event in stream:
        assert event.event != ChatEventType.UNKNOWN
        seen.append(event.event)
        if event.event == ChatEventType.CONVERSATION_MESSAGE_DELTA:
            answer += event.message.content
        if event.event == ChatEventType.CONVERSATION_CHAT_COMPLETED:
            completed = event.chat
    assert seen[0] == ChatEventType.CONVERSATION_CHAT_CREATED
    assert seen[1] == ChatEventType.CONVERSATION_CHAT_IN_PROGRESS
    assert seen.count(ChatEventType.CONVERSATION_MESSAGE_DELTA) >= 1
    assert ChatEventType.CONVERSATION_MESSAGE_COMPLETED in seen
    assert seen[-1] == ChatEventType.CONVERSATION_CHAT_COMPLETED
    assert completed is not None and completed.status == ChatStatus.COMPLETED
    assert completed.usage.token_count == completed.usage.input_count + completed.usage.output_count
    assert completed.usage.output_count > 0
    assert answer.startswith("Sandbox reply to")


def test_chat_stream_is_not_buffered(gw):
    """The upstream paces events (20 ms apart by default); the SDK must see them spread out, not
    all at once at the end (which is what a buffering proxy would produce)."""
    arrivals = []
    for event in gw.chat.stream(bot_id=BOT, user_id="u1", additional_messages=[user("pace me")]):
        arrivals.append((time.monotonic(), event.event))
    assert arrivals[-1][1] == ChatEventType.CONVERSATION_CHAT_COMPLETED
    # 9 events, 8 gaps of 20 ms upstream; allow generous slack for a loaded machine.
    assert arrivals[-1][0] - arrivals[0][0] >= 0.08, arrivals


def test_chat_stream_audio_deltas(gw):
    from cozepy import MessageObjectString

    msg = Message.build_user_question_objects(
        [MessageObjectString.build_text("speak"), MessageObjectString.build_audio(file_url="https://x/a.wav")]
    )
    audio = b""
    for event in gw.chat.stream(bot_id=BOT, user_id="u1", additional_messages=[msg]):
        if event.event == ChatEventType.CONVERSATION_AUDIO_DELTA:
            audio += event.message.get_audio()
    assert len(audio) > 0 and len(audio) % 2 == 0


def test_chat_create_retrieve_messages(gw):
    chat = gw.chat.create(bot_id=BOT, user_id="u1", additional_messages=[user("non stream")])
    assert chat.status == ChatStatus.IN_PROGRESS
    assert chat.response.logid
    deadline = time.monotonic() + TIMEOUT
    while True:
        chat = gw.chat.retrieve(conversation_id=chat.conversation_id, chat_id=chat.id)
        if chat.status != ChatStatus.IN_PROGRESS or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert chat.status == ChatStatus.COMPLETED
    assert chat.usage.token_count == chat.usage.input_count + chat.usage.output_count > 0
    messages = gw.chat.messages.list(conversation_id=chat.conversation_id, chat_id=chat.id)
    assert [m.type for m in messages] == [MessageType.ANSWER, MessageType.VERBOSE]
    assert messages[0].content.startswith("Sandbox reply to")


def test_chat_create_and_poll(gw):
    poll = gw.chat.create_and_poll(bot_id=BOT, user_id="u1", additional_messages=[user("poll me")])
    assert poll.chat.status == ChatStatus.COMPLETED
    assert poll.chat.usage.token_count > 0
    assert any(m.type == MessageType.ANSWER for m in poll.messages)


def test_workflow_stream(gw):
    events = list(gw.workflows.runs.stream(workflow_id="wf1", parameters={"q": "x"}))
    assert events and all(e.event != WorkflowEventType.UNKNOWN for e in events)
    messages = [e for e in events if e.event == WorkflowEventType.MESSAGE]
    assert messages and messages[-1].message.node_is_finish
    assert messages[-1].message.usage.token_count > 0
    assert [e.id for e in events] == list(range(len(events)))


def test_workflow_run(gw):
    res = gw.workflows.runs.create(workflow_id="wf1", parameters={"city": "Paris"})
    assert res.data and "output" in res.data
    assert res.execute_id and res.debug_url
    assert res.usage.token_count > 0


def test_audio_speech_wav(gw, tmp_path):
    text = "hello from the gateway"
    speech = gw.audio.speech.create(input=text, voice_id="v1", response_format=AudioFormat.WAV, sample_rate=16000)
    out = tmp_path / "speech.wav"
    speech.write_to_file(str(out))
    with wave.open(str(out)) as w:
        assert w.getframerate() == 16000 and w.getnchannels() == 1 and w.getsampwidth() == 2
        duration_ms = w.getnframes() * 1000 / w.getframerate()
    assert duration_ms == speech_ms(text)


def test_bad_token_is_coze_api_error_4100(fleetgate):
    bad = Coze(auth=TokenAuth("not-a-gateway-token"), base_url=fleetgate["gateway_url"])
    with pytest.raises(CozeAPIError) as e:
        bad.chat.create(bot_id=BOT, user_id="u1", additional_messages=[user("hi")])
    assert e.value.code == 4100
    assert e.value.logid

    with pytest.raises(CozeAPIError) as e:
        list(bad.chat.stream(bot_id=BOT, user_id="u1", additional_messages=[user("hi")]))
    assert e.value.code == 4100


def test_upstream_pat_is_not_a_device_token(fleetgate):
    """The gateway's device listener must not accept the upstream PAT as a device credential."""
    pat = Coze(auth=TokenAuth("pat_sandbox"), base_url=fleetgate["gateway_url"])
    with pytest.raises(CozeAPIError) as e:
        pat.chat.create(bot_id=BOT, user_id="u1", additional_messages=[user("hi")])
    assert e.value.code == 4100


# --- websocket --------------------------------------------------------------------------------


CHAT_EVENTS = [
    "chat.created",
    "chat.updated",
    "input_audio_buffer.completed",
    "input_audio_buffer.cleared",
    "conversation.chat.created",
    "conversation.chat.in_progress",
    "conversation.audio_transcript.update",
    "conversation.audio_transcript.completed",
    "conversation.message.delta",
    "conversation.audio.sentence_start",
    "conversation.audio.delta",
    "conversation.message.completed",
    "conversation.audio.completed",
    "conversation.chat.completed",
    "conversation.chat.canceled",
    "conversation.cleared",
    "input_audio_buffer.speech_started",
    "input_audio_buffer.speech_stopped",
]


class Recorder:
    """Collects events by type for the sync clients; ``errors`` holds exceptions and error events."""

    def __init__(self):
        self.events = []
        self.errors = []
        self.signals = {}
        self.lock = threading.Lock()

    def handler(self, _cli, event):
        with self.lock:
            self.events.append(event)
            self.signals.setdefault(event.event_type.value, threading.Event()).set()

    def on_error(self, _cli, e):
        self.errors.append(e)
        with self.lock:
            self.signals.setdefault("error", threading.Event()).set()

    def wait_for(self, event_type):
        with self.lock:
            ev = self.signals.setdefault(event_type, threading.Event())
        assert ev.wait(TIMEOUT), f"no {event_type} within {TIMEOUT}s; got {self.types()}; errors {self.errors}"

    def types(self):
        return [e.event_type.value for e in self.events]

    def of(self, event_type):
        return [e for e in self.events if e.event_type.value == event_type]

    def on_event(self, types):
        d = {WebsocketsEventType(t): self.handler for t in types}
        d[WebsocketsEventType.ERROR] = self.on_error
        d[WebsocketsEventType.CLIENT_ERROR] = self.on_error
        return d


def test_ws_chat_voice_turn(fleetgate, sdk_warnings):
    requester = Requester(auth=TokenAuth(fleetgate["device_token"]))
    rec = Recorder()
    client = WebsocketsChatBuildClient(fleetgate["ws_url"], requester).create(
        bot_id="7468", on_event=rec.on_event(CHAT_EVENTS)
    )
    client.connect()
    try:
        rec.wait_for("chat.created")
        client.chat_update(
            ChatUpdateEvent.Data(
                input_audio=InputAudio(format="pcm", codec="pcm", sample_rate=16000, channel=1, bit_depth=16),
                output_audio=OutputAudio(codec="pcm", pcm_config={"sample_rate": 16000}),
                chat_config=ChatUpdateEvent.ChatConfig(user_id="u1"),
                turn_detection=ChatUpdateEvent.TurnDetection(type="client_interrupt"),
            )
        )
        rec.wait_for("chat.updated")
        assert rec.of("chat.updated")[0].data.output_audio.pcm_config.sample_rate == 16000

        pcm = tone_pcm16(1000)
        for i in range(0, len(pcm), 640):  # 20 ms frames
            client.input_audio_buffer_append(InputAudioBufferAppendEvent.Data(delta=pcm[i : i + 640]))
        client.input_audio_buffer_complete()
        rec.wait_for("conversation.chat.completed")
    finally:
        client.close()

    assert not rec.errors, rec.errors
    assert not [m for m in sdk_warnings if "unknown event" in m], sdk_warnings
    assert rec.of("conversation.audio_transcript.completed")[0].data.content == "sandbox heard 1.00 s of audio"
    question, answer = rec.of("conversation.message.completed")
    assert (question.data.role, question.data.type) == ("user", "question")
    assert (answer.data.role, answer.data.type) == ("assistant", "answer")
    deltas = "".join(e.data.content for e in rec.of("conversation.message.delta"))
    assert deltas == answer.data.content
    audio_events = rec.of("conversation.audio.delta")
    assert audio_events
    assert base64.b64encode(audio_events[0].data.get_audio()).decode() == audio_events[0].data.content
    audio = b"".join(e.data.get_audio() for e in audio_events)
    assert len(audio) == speech_ms(answer.data.content) * 32  # 16 kHz PCM16
    done = rec.of("conversation.chat.completed")[0].data
    assert done.status == "completed"
    assert done.usage.token_count == done.usage.input_count + done.usage.output_count > 0


def test_ws_handshake_with_bad_token_raises_coze_api_error(fleetgate):
    bad = Requester(auth=TokenAuth("not-a-gateway-token"))
    client = WebsocketsChatBuildClient(fleetgate["ws_url"], bad).create(bot_id="7468", on_event={})
    with pytest.raises(CozeAPIError) as e:
        client.connect()
    assert "401" in str(e.value)
    assert e.value.logid


# --- device identity: the gateway's own token endpoint, driven by cozepy's OAuth client -----

KEYS = __import__("pathlib").Path(__file__).resolve().parents[3] / "policy" / "tests" / "keys"


def _admin(fleetgate, method, path, body=None):
    import json as _json
    import urllib.request

    req = urllib.request.Request(
        fleetgate["admin_url"] + path,
        data=None if body is None else _json.dumps(body).encode(),
        method=method,
        headers={"Authorization": "Bearer " + fleetgate["admin_token"], "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req) as r:
        return _json.loads(r.read())


def _stream_hello(coze):
    events = list(
        coze.chat.stream(
            bot_id="b1", user_id="u1", additional_messages=[Message.build_user_question_text("hello")]
        )
    )
    completed = [e for e in events if e.event == ChatEventType.CONVERSATION_CHAT_COMPLETED]
    assert completed and completed[0].chat.usage.token_count > 0
    return events


def test_jwt_oauth_app_gets_a_gateway_token_and_jwt_auth_streams(fleetgate):
    """cozepy's JWTOAuthApp, unmodified, with client_id = device id and the device's own key
    pair, obtains a gateway token; Coze(auth=JWTAuth(oauth_app=...)) then streams a chat."""
    from cozepy import JWTAuth, JWTOAuthApp

    _admin(fleetgate, "POST", "/admin/v1/devices", {"device_id": "py-jwt-dev"})
    _admin(
        fleetgate,
        "POST",
        "/admin/v1/devices/py-jwt-dev/credentials",
        {
            "type": "public_key",
            "kid": "py-k1",
            "algorithm": "RS256",
            "public_key_pem": (KEYS / "rsa2048_public_spki.pem").read_text(),
        },
    )
    private_pem = (
        KEYS.parents[2] / "sandbox" / "tests" / "keys" / "test_only_rsa_private.pem"
    ).read_text()
    app = JWTOAuthApp(
        client_id="py-jwt-dev",
        private_key=private_pem,
        public_key_id="py-k1",
        base_url=fleetgate["gateway_url"],
    )
    token = app.get_access_token(ttl=900)
    assert token.access_token and token.expires_in > time.time() + 800
    coze = Coze(auth=JWTAuth(oauth_app=app), base_url=fleetgate["gateway_url"])
    _stream_hello(coze)


def test_secret_device_gets_a_token_with_client_credentials(fleetgate):
    """A device that cannot do public-key crypto uses a generated secret (client_credentials);
    the token then works with cozepy's TokenAuth."""
    import httpx

    _admin(fleetgate, "POST", "/admin/v1/devices", {"device_id": "py-secret-dev"})
    cred = _admin(fleetgate, "POST", "/admin/v1/devices/py-secret-dev/credentials", {"type": "secret"})
    r = httpx.post(
        fleetgate["gateway_url"] + "/api/permission/oauth2/token",
        json={"grant_type": "client_credentials", "client_id": "py-secret-dev", "client_secret": cred["secret"]},
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["token_type"] == "Bearer" and body["expires_in"] > time.time()
    _stream_hello(Coze(auth=TokenAuth(body["access_token"]), base_url=fleetgate["gateway_url"]))
    bad = httpx.post(
        fleetgate["gateway_url"] + "/api/permission/oauth2/token",
        json={"grant_type": "client_credentials", "client_id": "py-secret-dev", "client_secret": "wrong"},
    )
    assert bad.status_code == 401 and bad.json()["error_code"] == "invalid_client"


def test_out_of_quota_device_gets_a_typed_4028_error(fleetgate):
    """A device whose quota is exhausted gets HTTP 429 with code 4028 in Coze's envelope, so
    cozepy raises CozeAPIError(code=4028) before anything reaches the upstream."""
    _admin(fleetgate, "POST", "/admin/v1/devices", {"device_id": "py-quota-dev"})
    token = _admin(fleetgate, "POST", "/admin/v1/devices/py-quota-dev/tokens", {})["access_token"]
    _admin(
        fleetgate,
        "POST",
        "/v1/commerce/benefit/limitations",
        {
            "entity_type": "single_device",
            "entity_id": "py-quota-dev",
            "benefit_info": {
                "benefit_type": "requests",
                "active_mode": "absolute_time",
                "started_at": 0,
                "ended_at": 253402300799,
                "limit": 0,
                "status": "valid",
                "trigger_unit": "never",
                "trigger_time": 1,
            },
        },
    )
    coze = Coze(auth=TokenAuth(token), base_url=fleetgate["gateway_url"])
    with pytest.raises(CozeAPIError) as err:
        coze.chat.create(bot_id="b1", user_id="u1", additional_messages=[Message.build_user_question_text("hi")])
    assert err.value.code == 4028
    assert err.value.logid
    with pytest.raises(CozeAPIError) as err:
        list(coze.chat.stream(bot_id="b1", user_id="u1", additional_messages=[Message.build_user_question_text("hi")]))
    assert err.value.code == 4028
