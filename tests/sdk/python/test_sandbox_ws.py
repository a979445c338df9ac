"""The sandbox's WebSocket APIs driven by the unmodified cozepy SDK (0.20.0).

Runs the sandbox binary (``SANDBOX_BIN``, default ``<repo>/target/debug/sandbox``) on a free
port. The binary paces audio in real time, so each voice reply takes a few seconds.

cozepy's ``Coze(...).websockets`` insists on an ``https://`` base URL (``http_base_url_to_ws``),
so the tests build the SDK's own websocket clients directly on the sandbox's ``ws://`` URL with a
``Requester(auth=TokenAuth(...))``: the clients, framing and parsers are the SDK's, unmodified.

Every downlink event the SDK parses must parse: a pydantic failure in cozepy's receive loop goes
to the ``error`` handler as an exception (recorded and asserted empty here), and an event type
the SDK does not know is logged as "unknown event" on the ``cozepy`` logger (captured and asserted
empty). A ``bot_id`` ending in ``_tools`` makes the bot call a tool
(``conversation.chat.requires_action``; the uplink ``conversation.chat.submit_tool_outputs``
continues the turn to ``conversation.chat.completed``) and one ending in ``_fail`` makes every reply
end in ``conversation.chat.failed`` (``last_error`` code 5000); both are driven through the SDK's
``WebsocketsChatEventHandler`` / ``AsyncWebsocketsChatEventHandler`` callbacks below.
"""

import asyncio
import base64
import json
import logging
import math
import os
import struct
import subprocess
import threading
from pathlib import Path

import pytest
from cozepy import CozeAPIError, TokenAuth
from cozepy.request import Requester
from cozepy.websockets.audio.speech import (
    InputTextBufferAppendEvent,
    SpeechUpdateEvent,
    WebsocketsAudioSpeechBuildClient,
)
from cozepy.websockets.audio.transcriptions import (
    InputAudioBufferAppendEvent,
    TranscriptionsUpdateEvent,
    WebsocketsAudioTranscriptionsBuildClient,
)
from cozepy import ChatStatus, ToolOutput
from cozepy.websockets.chat import (
    AsyncWebsocketsChatBuildClient,
    AsyncWebsocketsChatEventHandler,
    ChatUpdateEvent,
    ConversationChatCompletedEvent,
    ConversationChatFailedEvent,
    ConversationChatRequiresActionEvent,
    ConversationChatSubmitToolOutputsEvent,
    ConversationMessageCompletedEvent,
    ConversationMessageCreateEvent,
    ConversationMessageDeltaEvent,
    WebsocketsChatBuildClient,
    WebsocketsChatEventHandler,
)
from cozepy.websockets.ws import InputAudio, OutputAudio, WebsocketsErrorEvent, WebsocketsEventType

REPO = Path(__file__).resolve().parents[3]
TIMEOUT = 20


@pytest.fixture(scope="module")
def ws_sandbox():
    """Starts the sandbox binary; yields its ``{"base_url", "ws_url"}``."""
    binary = os.environ.get("SANDBOX_BIN", str(REPO / "target" / "debug" / "sandbox"))
    proc = subprocess.Popen(
        [binary, "--bind", "127.0.0.1:0"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
    )
    try:
        line = proc.stdout.readline()
        assert line, "sandbox printed nothing"
        yield json.loads(line)
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.fixture
def requester():
    return Requester(auth=TokenAuth("pat_sandbox"))


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


def tone_pcm16(ms, rate=16000, freq=300.0):
    n = rate * ms // 1000
    return b"".join(struct.pack("<h", int(3000 * math.sin(2 * math.pi * freq * i / rate))) for i in range(n))


def speech_ms(text, speed=1.0):
    """The sandbox's speech duration rule (sandbox::audio::speech_duration_ms)."""
    chars = sum(1 for c in text if not c.isspace())
    return max(round(chars * 60 / speed), 200)


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
        if isinstance(e, WebsocketsErrorEvent):
            self.signals.setdefault("error", threading.Event()).set()

    def wait_for(self, event_type):
        with self.lock:
            ev = self.signals.setdefault(event_type, threading.Event())
        assert ev.wait(TIMEOUT), f"no {event_type} within {TIMEOUT}s; got {self.types()}"

    def types(self):
        return [e.event_type.value for e in self.events]

    def of(self, event_type):
        return [e for e in self.events if e.event_type.value == event_type]

    def on_event(self, types):
        d = {WebsocketsEventType(t): self.handler for t in types}
        d[WebsocketsEventType.ERROR] = self.on_error
        d[WebsocketsEventType.CLIENT_ERROR] = self.on_error
        return d


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


def test_chat_voice_turn_sync(ws_sandbox, requester, sdk_warnings):
    rec = Recorder()
    client = WebsocketsChatBuildClient(ws_sandbox["ws_url"], requester).create(
        bot_id="7468", device_id=42, on_event=rec.on_event(CHAT_EVENTS)
    )
    client.connect()
    try:
        rec.wait_for("chat.created")
        client.chat_update(
            ChatUpdateEvent.Data(
                input_audio=InputAudio(format="pcm", codec="pcm", sample_rate=16000, channel=1, bit_depth=16),
                output_audio=OutputAudio(codec="g711a", voice_id="sandbox"),
                chat_config=ChatUpdateEvent.ChatConfig(user_id="u1", meta_data={"k": "v"}),
                turn_detection=ChatUpdateEvent.TurnDetection(type="client_interrupt"),
            )
        )
        rec.wait_for("chat.updated")
        updated = rec.of("chat.updated")[0].data
        assert updated.input_audio.sample_rate == 16000
        assert updated.output_audio.codec == "g711a"
        assert updated.output_audio.pcm_config.sample_rate == 8000
        assert updated.chat_config.meta_data == {"k": "v"}

        pcm = tone_pcm16(1000)
        for i in range(0, len(pcm), 640):  # 20 ms frames
            client.input_audio_buffer_append(InputAudioBufferAppendEvent.Data(delta=pcm[i : i + 640]))
        client.input_audio_buffer_complete()
        rec.wait_for("conversation.chat.completed")

        assert rec.of("conversation.audio_transcript.completed")[0].data.content == "sandbox heard 1.00 s of audio"
        question, answer = rec.of("conversation.message.completed")
        assert (question.data.role, question.data.type) == ("user", "question")
        assert (answer.data.role, answer.data.type) == ("assistant", "answer")
        deltas = "".join(e.data.content for e in rec.of("conversation.message.delta"))
        assert deltas == answer.data.content
        audio = b"".join(e.data.get_audio() for e in rec.of("conversation.audio.delta"))
        assert len(audio) == speech_ms(answer.data.content) * 8  # G.711: 8 bytes per ms
        done = rec.of("conversation.chat.completed")[0].data
        assert done.status == "completed"
        assert done.usage.token_count == done.usage.input_count + done.usage.output_count > 0

        client.input_audio_buffer_clear()
        client.conversation_clear()
        rec.wait_for("input_audio_buffer.cleared")
        rec.wait_for("conversation.cleared")

        # An invalid update comes back as an `error` event the SDK parses into CozeAPIError.
        client.chat_update(ChatUpdateEvent.Data(output_audio=OutputAudio(codec="mp3")))
        rec.wait_for("error")
    finally:
        client.close()

    errors = [e for e in rec.errors if not isinstance(e, WebsocketsErrorEvent)]
    assert not errors, errors
    [err] = [e for e in rec.errors if isinstance(e, WebsocketsErrorEvent)]
    assert isinstance(err.data, CozeAPIError) and err.data.code == 4000 and err.data.logid
    assert not [m for m in sdk_warnings if "unknown event" in m], sdk_warnings
    seen = set(rec.types())
    expected = set(CHAT_EVENTS) - {
        "conversation.chat.canceled",
        "input_audio_buffer.speech_started",
        "input_audio_buffer.speech_stopped",
    }
    assert expected <= seen, expected - seen
    order = [t for i, t in enumerate(rec.types()) if i == 0 or rec.types()[i - 1] != t]
    start = order.index("input_audio_buffer.completed")
    assert order[start : start + 12] == [
        "input_audio_buffer.completed",
        "conversation.chat.created",
        "conversation.chat.in_progress",
        "conversation.audio_transcript.update",
        "conversation.audio_transcript.completed",
        "conversation.message.completed",
        "conversation.message.delta",
        "conversation.audio.sentence_start",
        "conversation.audio.delta",
        "conversation.audio.completed",
        "conversation.message.completed",
        "conversation.chat.completed",
    ]


def test_chat_async_server_vad_and_cancel(ws_sandbox, requester, sdk_warnings):
    async def main():
        events = []
        errors = []
        signals = {t: asyncio.Event() for t in CHAT_EVENTS}

        async def handler(_cli, event):
            events.append(event)
            signals[event.event_type.value].set()

        async def on_error(_cli, e):
            errors.append(e)

        on_event = {WebsocketsEventType(t): handler for t in CHAT_EVENTS}
        on_event[WebsocketsEventType.ERROR] = on_error
        on_event[WebsocketsEventType.CLIENT_ERROR] = on_error
        client = AsyncWebsocketsChatBuildClient(ws_sandbox["ws_url"], requester).create(bot_id="7468", on_event=on_event)

        async def wait(t):
            await asyncio.wait_for(signals[t].wait(), TIMEOUT)

        await client.connect()
        try:
            await client.chat_update(
                ChatUpdateEvent.Data(
                    input_audio=InputAudio(format="pcm", codec="pcm", sample_rate=16000, channel=1, bit_depth=16),
                    output_audio=OutputAudio(codec="pcm", pcm_config={"sample_rate": 16000}),
                    turn_detection=ChatUpdateEvent.TurnDetection(type="server_vad", silence_duration_ms=300),
                )
            )
            await wait("chat.updated")
            assert events[-1].data.turn_detection.silence_duration_ms == 300
            pcm = tone_pcm16(500)
            for i in range(0, len(pcm), 640):
                await client.input_audio_buffer_append(InputAudioBufferAppendEvent.Data(delta=pcm[i : i + 640]))
            await wait("input_audio_buffer.speech_started")
            await wait("input_audio_buffer.speech_stopped")
            await wait("conversation.chat.completed")
            transcript = [e for e in events if e.event_type.value == "conversation.audio_transcript.completed"]
            assert transcript[0].data.content == "sandbox heard 0.50 s of audio"
            answer = [e for e in events if e.event_type.value == "conversation.message.completed"][-1]
            audio = b"".join(
                e.data.get_audio() for e in events if e.event_type.value == "conversation.audio.delta"
            )
            assert len(audio) == speech_ms(answer.data.content) * 32  # 16 kHz PCM16

            # Barge-in by text, then cancel mid-audio.
            signals["conversation.audio.delta"].clear()
            await client.conversation_message_create(
                ConversationMessageCreateEvent.Data(role="user", content_type="text", content="tell me more")
            )
            await wait("conversation.audio.delta")
            await client.conversation_chat_cancel()
            await wait("conversation.chat.canceled")
            canceled = [e for e in events if e.event_type.value == "conversation.chat.canceled"][-1]
            assert canceled.data.code == 2
            n = len(events)
            await asyncio.sleep(0.4)
            assert [e.event_type.value for e in events[n:]] == []
        finally:
            await client.close()
        assert not errors, errors

    asyncio.run(main())
    assert not [m for m in sdk_warnings if "unknown event" in m], sdk_warnings


def test_speech_stream(ws_sandbox, requester, sdk_warnings):
    rec = Recorder()
    types = [
        "speech.created",
        "speech.updated",
        "input_text_buffer.completed",
        "speech.audio.update",
        "speech.audio.completed",
    ]
    client = WebsocketsAudioSpeechBuildClient(ws_sandbox["ws_url"], requester).create(on_event=rec.on_event(types))
    client.connect()
    try:
        client.speech_update(
            SpeechUpdateEvent.model_validate(
                {"data": {"output_audio": {"codec": "pcm", "pcm_config": {"sample_rate": 16000}}}}
            )
        )
        rec.wait_for("speech.updated")
        assert rec.of("speech.updated")[0].data.output_audio.pcm_config.sample_rate == 16000
        client.input_text_buffer_append(InputTextBufferAppendEvent.Data(delta="Hello from "))
        client.input_text_buffer_append(InputTextBufferAppendEvent.Data(delta="the sandbox."))
        client.input_text_buffer_complete()
        rec.wait_for("speech.audio.completed")
    finally:
        client.close()
    assert not rec.errors, rec.errors
    assert set(types) <= set(rec.types())
    audio = b"".join(e.data.delta for e in rec.of("speech.audio.update"))
    assert len(audio) == speech_ms("Hello from the sandbox.") * 32
    assert not [m for m in sdk_warnings if "unknown event" in m], sdk_warnings


def test_transcriptions_stream(ws_sandbox, requester, sdk_warnings):
    rec = Recorder()
    types = [
        "transcriptions.created",
        "transcriptions.updated",
        "input_audio_buffer.completed",
        "input_audio_buffer.cleared",
        "transcriptions.message.update",
        "transcriptions.message.completed",
    ]
    client = WebsocketsAudioTranscriptionsBuildClient(ws_sandbox["ws_url"], requester).create(
        on_event=rec.on_event(types)
    )
    client.connect()
    try:
        client.transcriptions_update(
            TranscriptionsUpdateEvent.Data(
                input_audio=InputAudio(format="pcm", codec="pcm", sample_rate=16000, channel=1, bit_depth=16)
            )
        )
        rec.wait_for("transcriptions.updated")
        pcm = tone_pcm16(2200)
        for i in range(0, len(pcm), 3200):  # 100 ms chunks
            client.input_audio_buffer_append(InputAudioBufferAppendEvent.Data(delta=pcm[i : i + 3200]))
        client.input_audio_buffer_complete()
        rec.wait_for("transcriptions.message.completed")
        client.input_audio_buffer_clear()
        rec.wait_for("input_audio_buffer.cleared")
    finally:
        client.close()
    assert not rec.errors, rec.errors
    assert set(types) <= set(rec.types())
    contents = [e.data.content for e in rec.of("transcriptions.message.update")]
    assert contents == [
        "sandbox heard 1.00 s of audio",
        "sandbox heard 2.00 s of audio",
        "sandbox heard 2.20 s of audio",
    ]
    assert not [m for m in sdk_warnings if "unknown event" in m], sdk_warnings


def test_handshake_without_valid_token_raises_coze_api_error(ws_sandbox):
    bad = Requester(auth=TokenAuth("not-a-token"))
    client = WebsocketsChatBuildClient(ws_sandbox["ws_url"], bad).create(bot_id="7468", on_event={})
    with pytest.raises(CozeAPIError) as e:
        client.connect()
    assert "401" in str(e.value)
    assert e.value.logid


def test_audio_delta_base64_is_what_the_sdk_decodes(ws_sandbox, requester):
    """`Message.get_audio()` is plain base64 of the codec bytes (no data: URL, no padding games)."""
    rec = Recorder()
    client = WebsocketsChatBuildClient(ws_sandbox["ws_url"], requester).create(
        bot_id="7468", on_event=rec.on_event(CHAT_EVENTS)
    )
    client.connect()
    try:
        client.conversation_message_create(
            ConversationMessageCreateEvent.Data(role="user", content_type="text", content="hi")
        )
        rec.wait_for("conversation.audio.delta")
        first = rec.of("conversation.audio.delta")[0].data
        assert base64.b64encode(first.get_audio()).decode() == first.content
        assert len(first.get_audio()) == 4800  # 100 ms of 24 kHz PCM16
        client.conversation_chat_cancel()
        rec.wait_for("conversation.chat.canceled")
    finally:
        client.close()
    assert not rec.errors, rec.errors


def test_chat_requires_action_and_submit_tool_outputs(ws_sandbox, requester, sdk_warnings):
    """A `_tools` bot: the handler's on_conversation_chat_requires_action answers with
    conversation_chat_submit_tool_outputs and the same chat then completes.

    cozepy maps handler methods to events by the annotation of their ``event`` parameter, so the
    handlers below must be annotated."""

    class Handler(WebsocketsChatEventHandler):
        def __init__(self):
            self.actions = []
            self.completed = []
            self.messages = []
            self.errors = []
            self.done = threading.Event()

        def on_conversation_message_completed(self, cli, event: ConversationMessageCompletedEvent):
            self.messages.append(event.data)

        def on_conversation_chat_requires_action(self, cli, event: ConversationChatRequiresActionEvent):
            self.actions.append(event.data)
            call = event.data.required_action.submit_tool_outputs.tool_calls[0]
            cli.conversation_chat_submit_tool_outputs(
                ConversationChatSubmitToolOutputsEvent.Data(
                    chat_id=event.data.id, tool_outputs=[ToolOutput(tool_call_id=call.id, output="sunny 21C")]
                )
            )

        def on_conversation_chat_completed(self, cli, event: ConversationChatCompletedEvent):
            self.completed.append(event.data)
            self.done.set()

        def on_conversation_chat_failed(self, cli, event: ConversationChatFailedEvent):
            self.errors.append(("failed", event.data))
            self.done.set()

        def on_error(self, cli, e):
            self.errors.append(e)

        def on_client_error(self, cli, e):
            self.errors.append(e)

    h = Handler()
    client = WebsocketsChatBuildClient(ws_sandbox["ws_url"], requester).create(bot_id="bot_tools", on_event=h)
    client.connect()
    try:
        client.conversation_message_create(
            ConversationMessageCreateEvent.Data(role="user", content_type="text", content="weather in Paris?")
        )
        assert h.done.wait(TIMEOUT), "no conversation.chat.completed"
    finally:
        client.close()
    assert not h.errors, h.errors
    [action] = h.actions
    assert action.status == ChatStatus.REQUIRES_ACTION
    call = action.required_action.submit_tool_outputs.tool_calls[0]
    assert call.type == "function" and call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"location": "weather in Paris?"}
    [done] = h.completed
    assert done.id == action.id and done.status == ChatStatus.COMPLETED
    assert done.usage.input_count > action.usage.input_count
    assert done.usage.token_count == done.usage.input_count + done.usage.output_count
    assert h.messages[0].type == "function_call"
    assert h.messages[-1].content.startswith("Tool output received (sunny 21C).")
    assert not [m for m in sdk_warnings if "unknown event" in m], sdk_warnings


def test_chat_failed_async(ws_sandbox, requester, sdk_warnings):
    """A `_fail` bot: the async handler's on_conversation_chat_failed fires with last_error."""

    async def main():
        class Handler(AsyncWebsocketsChatEventHandler):
            def __init__(self):
                self.failed = []
                self.deltas = []
                self.errors = []
                self.done = asyncio.Event()

            async def on_conversation_message_delta(self, cli, event: ConversationMessageDeltaEvent):
                self.deltas.append(event.data.content)

            async def on_conversation_chat_failed(self, cli, event: ConversationChatFailedEvent):
                self.failed.append(event.data)
                self.done.set()

            async def on_conversation_chat_completed(self, cli, event: ConversationChatCompletedEvent):
                self.errors.append(("completed", event.data))
                self.done.set()

            async def on_error(self, cli, e):
                self.errors.append(e)

            async def on_client_error(self, cli, e):
                self.errors.append(e)

        h = Handler()
        client = AsyncWebsocketsChatBuildClient(ws_sandbox["ws_url"], requester).create(bot_id="bot_fail", on_event=h)
        await client.connect()
        try:
            await client.conversation_message_create(
                ConversationMessageCreateEvent.Data(role="user", content_type="text", content="hello")
            )
            await asyncio.wait_for(h.done.wait(), TIMEOUT)
        finally:
            await client.close()
        assert not h.errors, h.errors
        [failed] = h.failed
        assert failed.status == ChatStatus.FAILED
        assert failed.last_error.code == 5000 and failed.last_error.msg
        assert failed.failed_at
        assert len(h.deltas) == 2
        assert failed.usage.output_count > 0
        assert failed.usage.token_count == failed.usage.input_count + failed.usage.output_count

    asyncio.run(main())
    assert not [m for m in sdk_warnings if "unknown event" in m], sdk_warnings
