"""Unmodified cozepy 0.20.0 against the sandbox's REST and SSE APIs."""

import time
import wave

import pytest
from cozepy import (
    AudioFormat,
    ChatEventType,
    ChatStatus,
    CozeAPIError,
    JWTOAuthApp,
    Message,
    MessageContentType,
    MessageRole,
    MessageType,
    WorkflowEventType,
)

BOT = "7379462189365198898"


def user(text):
    return Message.build_user_question_text(text)


def test_jwt_oauth_token(sandbox):
    app = JWTOAuthApp(
        client_id=sandbox["app_id"],
        private_key=sandbox["private_key"],
        public_key_id=sandbox["kid"],
        base_url=sandbox["base_url"],
    )
    token = app.get_access_token(ttl=1200)
    assert token.access_token.startswith("czs_")
    assert token.token_type == "Bearer"
    assert abs(token.expires_in - (int(time.time()) + 1200)) <= 2


def test_jwt_oauth_wrong_kid_is_rejected(sandbox):
    app = JWTOAuthApp(
        client_id=sandbox["app_id"],
        private_key=sandbox["private_key"],
        public_key_id="unknown-kid",
        base_url=sandbox["base_url"],
    )
    with pytest.raises(CozeAPIError):
        app.get_access_token()


def test_chat_stream(coze):
    seen = []
    answer = ""
    completed = None
    for event in coze.chat.stream(bot_id=BOT, user_id="u1", additional_messages=[user("hello there")]):
        assert event.event != ChatEventType.UNKNOWN
        seen.append(event.event)
        if event.event == ChatEventType.CONVERSATION_MESSAGE_DELTA:
            answer += event.message.content
        if event.event == ChatEventType.CONVERSATION_CHAT_COMPLETED:
            completed = event.chat
    assert seen[0] == ChatEventType.CONVERSATION_CHAT_CREATED
    assert seen[1] == ChatEventType.CONVERSATION_CHAT_IN_PROGRESS
    assert ChatEventType.CONVERSATION_MESSAGE_COMPLETED in seen
    assert completed is not None and completed.status == ChatStatus.COMPLETED
    assert completed.usage.token_count == completed.usage.input_count + completed.usage.output_count
    assert completed.usage.output_count > 0
    assert answer.startswith("Sandbox reply to")


def test_chat_stream_audio_deltas(coze):
    from cozepy import MessageObjectString

    msg = Message.build_user_question_objects(
        [MessageObjectString.build_text("speak"), MessageObjectString.build_audio(file_url="https://x/a.wav")]
    )
    audio = b""
    for event in coze.chat.stream(bot_id=BOT, user_id="u1", additional_messages=[msg]):
        if event.event == ChatEventType.CONVERSATION_AUDIO_DELTA:
            audio += event.message.get_audio()
    assert len(audio) > 0 and len(audio) % 2 == 0


def test_chat_tools_flow(coze):
    events = list(coze.chat.stream(bot_id="bot_tools", user_id="u1", additional_messages=[user("weather?")]))
    action = events[-1]
    assert action.event == ChatEventType.CONVERSATION_CHAT_REQUIRES_ACTION
    call = action.chat.required_action.submit_tool_outputs.tool_calls[0]
    from cozepy import ToolOutput

    out = list(
        coze.chat.submit_tool_outputs(
            conversation_id=action.chat.conversation_id,
            chat_id=action.chat.id,
            tool_outputs=[ToolOutput(tool_call_id=call.id, output="sunny")],
            stream=True,
        )
    )
    assert out[-1].event == ChatEventType.CONVERSATION_CHAT_COMPLETED


def test_chat_stream_failed(coze):
    """A `_fail` bot: the stream ends in CONVERSATION_CHAT_FAILED with last_error and usage."""
    events = list(coze.chat.stream(bot_id="bot_fail", user_id="u1", additional_messages=[user("please fail")]))
    assert all(e.event != ChatEventType.UNKNOWN for e in events)
    assert [e.event for e in events] == [
        ChatEventType.CONVERSATION_CHAT_CREATED,
        ChatEventType.CONVERSATION_CHAT_IN_PROGRESS,
        ChatEventType.CONVERSATION_MESSAGE_DELTA,
        ChatEventType.CONVERSATION_MESSAGE_DELTA,
        ChatEventType.CONVERSATION_CHAT_FAILED,
    ]
    failed = events[-1].chat
    assert failed.status == ChatStatus.FAILED
    assert failed.last_error.code == 5000 and failed.last_error.msg
    assert failed.failed_at
    assert failed.usage.output_count > 0
    assert failed.usage.token_count == failed.usage.input_count + failed.usage.output_count

    chat = coze.chat.retrieve(conversation_id=failed.conversation_id, chat_id=failed.id)
    assert chat.status == ChatStatus.FAILED
    assert chat.last_error.code == 5000 and chat.failed_at
    assert chat.usage.token_count == failed.usage.token_count


def test_chat_create_and_poll_failed(coze):
    poll = coze.chat.create_and_poll(bot_id="bot_fail", user_id="u1", additional_messages=[user("poll fail")])
    assert poll.chat.status == ChatStatus.FAILED
    assert poll.chat.last_error.code == 5000
    assert poll.chat.failed_at
    assert list(poll.messages) == []


def test_chat_create_retrieve_list(coze):
    chat = coze.chat.create(bot_id=BOT, user_id="u1", additional_messages=[user("non stream")])
    assert chat.status == ChatStatus.IN_PROGRESS
    chat = coze.chat.retrieve(conversation_id=chat.conversation_id, chat_id=chat.id)
    assert chat.status == ChatStatus.COMPLETED
    assert chat.usage.token_count > 0
    messages = coze.chat.messages.list(conversation_id=chat.conversation_id, chat_id=chat.id)
    assert [m.type for m in messages] == [MessageType.ANSWER, MessageType.VERBOSE]


def test_chat_create_and_poll(coze):
    poll = coze.chat.create_and_poll(bot_id=BOT, user_id="u1", additional_messages=[user("poll me")])
    assert poll.chat.status == ChatStatus.COMPLETED
    assert any(m.type == MessageType.ANSWER for m in poll.messages)


def test_workflow_run(coze):
    res = coze.workflows.runs.create(workflow_id="wf1", parameters={"city": "Paris"})
    assert res.data and "output" in res.data
    assert res.execute_id and res.debug_url
    assert res.usage.token_count > 0


def test_workflow_stream_and_resume(coze):
    events = list(coze.workflows.runs.stream(workflow_id="wf1", parameters={"q": "x"}))
    messages = [e for e in events if e.event == WorkflowEventType.MESSAGE]
    assert messages and messages[-1].message.node_is_finish
    assert messages[-1].message.usage.token_count > 0
    assert [e.id for e in events] == list(range(len(events)))

    events = list(coze.workflows.runs.stream(workflow_id="wf_interrupt"))
    interrupt = [e for e in events if e.event == WorkflowEventType.INTERRUPT][0].interrupt
    resumed = list(
        coze.workflows.runs.resume(
            workflow_id="wf_interrupt",
            event_id=interrupt.interrupt_data.event_id,
            resume_data="Paris",
            interrupt_type=interrupt.interrupt_data.type,
        )
    )
    assert any(e.event == WorkflowEventType.MESSAGE for e in resumed)


def test_workflow_chat_stream(coze):
    events = list(coze.workflows.chat.stream(workflow_id="wf_chat", additional_messages=[user("hi")], parameters={}))
    assert all(e.event != ChatEventType.UNKNOWN for e in events)
    assert events[-1].event == ChatEventType.CONVERSATION_CHAT_COMPLETED
    assert events[-1].chat.usage.token_count > 0


def test_conversations_and_messages(coze):
    conv = coze.conversations.create(bot_id=BOT, messages=[user("first")], meta_data={"device": "SN1"})
    assert conv.meta_data == {"device": "SN1"}
    assert coze.conversations.retrieve(conversation_id=conv.id).id == conv.id
    assert coze.conversations.update(conversation_id=conv.id, name="renamed").name == "renamed"
    listed = [c.id for c in coze.conversations.list(bot_id=BOT, page_size=2)]
    assert conv.id in listed

    created = [
        coze.conversations.messages.create(
            conversation_id=conv.id, role=MessageRole.USER, content=f"m{i}", content_type=MessageContentType.TEXT
        )
        for i in range(5)
    ]
    all_msgs = [m.content for m in coze.conversations.messages.list(conversation_id=conv.id, limit=2)]
    assert all_msgs == ["m4", "m3", "m2", "m1", "m0", "first"]
    mid = created[0].id
    assert coze.conversations.messages.retrieve(conversation_id=conv.id, message_id=mid).content == "m0"
    updated = coze.conversations.messages.update(conversation_id=conv.id, message_id=mid, content="edited")
    assert updated.content == "edited"
    deleted = coze.conversations.messages.delete(conversation_id=conv.id, message_id=mid)
    assert deleted.id == mid
    section = coze.conversations.clear(conversation_id=conv.id)
    assert section.conversation_id == conv.id
    coze.conversations.delete(conversation_id=conv.id)
    with pytest.raises(CozeAPIError):
        coze.conversations.retrieve(conversation_id=conv.id)


def test_files(coze, tmp_path):
    path = tmp_path / "note.txt"
    path.write_bytes(b"hello sandbox")
    f = coze.files.upload(file=path)
    assert f.bytes == 13 and f.file_name == "note.txt"
    assert coze.files.retrieve(file_id=f.id).id == f.id


def test_audio_speech_and_transcription(coze, tmp_path):
    text = "hello from the sandbox"
    speech = coze.audio.speech.create(input=text, voice_id="v1", response_format=AudioFormat.WAV, sample_rate=16000)
    out = tmp_path / "speech.wav"
    speech.write_to_file(str(out))
    with wave.open(str(out)) as w:
        assert w.getframerate() == 16000 and w.getnchannels() == 1 and w.getsampwidth() == 2
        duration_ms = w.getnframes() * 1000 / w.getframerate()
    expected_ms = max(200, round(len(text.replace(" ", "")) * 60))
    assert duration_ms == expected_ms

    with pytest.raises(CozeAPIError):
        coze.audio.speech.create(input=text, voice_id="v1")  # mp3: unsupported in the sandbox

    res = coze.audio.transcriptions.create(file=out)
    assert res.text == f"sandbox transcript of {expected_ms / 1000:.2f} s"


def test_audio_voices_and_rooms(coze):
    voices = list(coze.audio.voices.list(page_size=2))
    assert len(voices) == 5 and all(v.is_system_voice for v in voices)
    room = coze.audio.rooms.create(bot_id=BOT, uid="dev-1")
    assert room.uid == "dev-1" and room.room_id and room.token
