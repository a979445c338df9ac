// The sandbox driven by the official Coze Node SDK (@coze/api, unmodified).
//
// Starts the sandbox binary (SANDBOX_BIN, default <repo>/target/debug/sandbox) on a free port.
// In Node the SDK's WebSocketAPI wraps `ws` in `reconnecting-websocket`; it sends the token both
// as `Authorization` header and as `?authorization=Bearer <tok>` (the URL parser encodes the space
// as %20). It does not validate payloads, so "the SDK understands every event" is checked as:
// every downlink `event_type` is a member of the SDK's `WebsocketsEventType` enum, and every
// frame is JSON (the SDK logs 'WebSocketAPI onmessage error' otherwise).

import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { createInterface } from 'node:readline';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

import { CozeAPI, WebsocketsEventType, RoleType, ChatEventType } from '@coze/api';

const REPO = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../../../..');
const TIMEOUT_MS = 20_000;

let proc;
let urls;

before(async () => {
  const bin = process.env.SANDBOX_BIN ?? path.join(REPO, 'target', 'debug', 'sandbox');
  proc = spawn(bin, ['--bind', '127.0.0.1:0'], { stdio: ['ignore', 'pipe', 'ignore'] });
  const rl = createInterface({ input: proc.stdout });
  const line = await new Promise((resolve, reject) => {
    rl.once('line', resolve);
    proc.once('exit', code => reject(new Error(`sandbox exited: ${code}`)));
  });
  urls = JSON.parse(line);
});

after(() => proc?.kill());

function client(token = 'pat_sandbox') {
  return new CozeAPI({ token, baseURL: urls.base_url, baseWsURL: urls.ws_url });
}

/** Speech duration rule of the sandbox (sandbox::audio::speech_duration_ms). */
function speechMs(text, speed = 1) {
  const chars = [...text].filter(c => !/\s/.test(c)).length;
  return Math.max(Math.round((chars * 60) / speed), 200);
}

function tonePcm16(ms, rate = 16000) {
  const n = (rate * ms) / 1000;
  const buf = Buffer.alloc(n * 2);
  for (let i = 0; i < n; i++) {
    buf.writeInt16LE(Math.round(3000 * Math.sin((2 * Math.PI * 300 * i) / rate)), i * 2);
  }
  return buf;
}

/** Records events of a WebSocketAPI and lets a test await one by type. */
function recorder(ws) {
  const events = [];
  const waiters = [];
  ws.onmessage = data => {
    events.push(data);
    for (const w of waiters.splice(0)) {
      if (!w.check()) waiters.push(w);
    }
  };
  const waitFor = (type, from = 0) =>
    new Promise((resolve, reject) => {
      const check = () => {
        const ev = events.slice(from).find(e => e.event_type === type);
        if (ev) resolve(ev);
        return Boolean(ev);
      };
      if (check()) return;
      const timer = setTimeout(
        () => reject(new Error(`no ${type}; got ${events.map(e => e.event_type).join(',')}`)),
        TIMEOUT_MS,
      );
      waiters.push({ check: () => check() && (clearTimeout(timer), true) });
    });
  return { events, waitFor };
}

const opened = ws =>
  new Promise((resolve, reject) => {
    ws.onopen = resolve;
    ws.onerror = err => reject(new Error(JSON.stringify(err)));
  });

test('websocket chat voice turn (pcm 16 kHz in, g711u out)', async () => {
  const ws = await client().websockets.chat.create({ bot_id: '7468' });
  const rec = recorder(ws);
  await opened(ws);
  try {
    await rec.waitFor(WebsocketsEventType.CHAT_CREATED);
    ws.send({
      id: 'u1',
      event_type: WebsocketsEventType.CHAT_UPDATE,
      data: {
        input_audio: { format: 'pcm', codec: 'pcm', sample_rate: 16000, channel: 1, bit_depth: 16 },
        output_audio: { codec: 'g711u' },
      },
    });
    const updated = await rec.waitFor(WebsocketsEventType.CHAT_UPDATED);
    assert.equal(updated.data.output_audio.codec, 'g711u');
    assert.equal(updated.data.output_audio.pcm_config.sample_rate, 8000);

    const pcm = tonePcm16(1000);
    for (let i = 0; i < pcm.length; i += 640) {
      ws.send({
        id: `a${i}`,
        event_type: WebsocketsEventType.INPUT_AUDIO_BUFFER_APPEND,
        data: { delta: pcm.subarray(i, i + 640).toString('base64') },
      });
    }
    ws.send({ id: 'c1', event_type: WebsocketsEventType.INPUT_AUDIO_BUFFER_COMPLETE });
    const done = await rec.waitFor(WebsocketsEventType.CONVERSATION_CHAT_COMPLETED);
    assert.ok(done.data.usage.token_count > 0);

    const types = rec.events.map(e => e.event_type);
    const known = new Set(Object.values(WebsocketsEventType));
    assert.deepEqual(types.filter(t => !known.has(t)), [], 'event types unknown to the SDK');
    for (const t of [
      WebsocketsEventType.INPUT_AUDIO_BUFFER_COMPLETED,
      WebsocketsEventType.CONVERSATION_CHAT_CREATED,
      WebsocketsEventType.CONVERSATION_CHAT_IN_PROGRESS,
      WebsocketsEventType.CONVERSATION_AUDIO_TRANSCRIPT_UPDATE,
      WebsocketsEventType.CONVERSATION_AUDIO_TRANSCRIPT_COMPLETED,
      WebsocketsEventType.CONVERSATION_MESSAGE_DELTA,
      WebsocketsEventType.CONVERSATION_AUDIO_SENTENCE_START,
      WebsocketsEventType.CONVERSATION_AUDIO_DELTA,
      WebsocketsEventType.CONVERSATION_AUDIO_COMPLETED,
      WebsocketsEventType.CONVERSATION_MESSAGE_COMPLETED,
    ]) {
      assert.ok(types.includes(t), `missing ${t}`);
    }
    const transcript = rec.events.find(
      e => e.event_type === WebsocketsEventType.CONVERSATION_AUDIO_TRANSCRIPT_COMPLETED,
    );
    assert.equal(transcript.data.content, 'sandbox heard 1.00 s of audio');
    const answer = rec.events
      .filter(e => e.event_type === WebsocketsEventType.CONVERSATION_MESSAGE_COMPLETED)
      .at(-1).data;
    assert.equal(answer.role, RoleType.Assistant);
    const audioBytes = rec.events
      .filter(e => e.event_type === WebsocketsEventType.CONVERSATION_AUDIO_DELTA)
      .reduce((n, e) => n + Buffer.from(e.data.content, 'base64').length, 0);
    assert.equal(audioBytes, speechMs(answer.content) * 8);

    // Cancel mid-reply.
    const from = rec.events.length;
    ws.send({
      id: 'm1',
      event_type: WebsocketsEventType.CONVERSATION_MESSAGE_CREATE,
      data: { role: 'user', content_type: 'text', content: 'again' },
    });
    await rec.waitFor(WebsocketsEventType.CONVERSATION_AUDIO_DELTA, from);
    ws.send({ id: 'x1', event_type: WebsocketsEventType.CONVERSATION_CHAT_CANCEL });
    const canceled = await rec.waitFor(WebsocketsEventType.CONVERSATION_CHAT_CANCELED, from);
    assert.equal(canceled.data.code, 2);
  } finally {
    ws.close();
  }
});

async function handshakeError(token) {
  const ws = await client(token).websockets.chat.create({ bot_id: '7468' });
  try {
    return await new Promise(resolve => {
      ws.onerror = resolve;
    });
  } finally {
    ws.close(); // also stops reconnecting-websocket's retries
  }
}

test('websocket handshake without a valid token reports 401', async () => {
  const err = await handshakeError('not-a-token');
  assert.equal(err.event_type, WebsocketsEventType.ERROR);
  assert.equal(err.data.code, 401);
});

// coze-js finds the logid with rawHeaders.findIndex(h => h === 'X-Tt-Logid'): case-sensitive.
// The sandbox serves with hyper's title_case_headers so the name arrives as Coze writes it.
test('websocket handshake error surfaces X-Tt-Logid to coze-js', async () => {
  const err = await handshakeError('not-a-token');
  assert.ok(err.detail.logid, 'X-Tt-Logid surfaced');
});

test('streaming TTS and ASR', async () => {
  const tts = await client().websockets.audio.speech.create();
  const t = recorder(tts);
  await opened(tts);
  try {
    await t.waitFor(WebsocketsEventType.SPEECH_CREATED);
    tts.send({
      id: '1',
      event_type: WebsocketsEventType.SPEECH_UPDATE,
      data: { output_audio: { codec: 'pcm', pcm_config: { sample_rate: 24000 } } },
    });
    await t.waitFor(WebsocketsEventType.SPEECH_UPDATED);
    tts.send({ id: '2', event_type: WebsocketsEventType.INPUT_TEXT_BUFFER_APPEND, data: { delta: 'hello there' } });
    tts.send({ id: '3', event_type: WebsocketsEventType.INPUT_TEXT_BUFFER_COMPLETE });
    await t.waitFor(WebsocketsEventType.SPEECH_AUDIO_COMPLETED);
    const bytes = t.events
      .filter(e => e.event_type === WebsocketsEventType.SPEECH_AUDIO_UPDATE)
      .reduce((n, e) => n + Buffer.from(e.data.delta, 'base64').length, 0);
    assert.equal(bytes, speechMs('hello there') * 48);
  } finally {
    tts.close();
  }

  const asr = await client().websockets.audio.transcriptions.create();
  const a = recorder(asr);
  await opened(asr);
  try {
    await a.waitFor(WebsocketsEventType.TRANSCRIPTIONS_CREATED);
    asr.send({
      id: '1',
      event_type: WebsocketsEventType.TRANSCRIPTIONS_UPDATE,
      data: { input_audio: { format: 'pcm', codec: 'pcm', sample_rate: 16000, channel: 1, bit_depth: 16 } },
    });
    await a.waitFor(WebsocketsEventType.TRANSCRIPTIONS_UPDATED);
    const pcm = tonePcm16(1500);
    for (let i = 0; i < pcm.length; i += 3200) {
      asr.send({
        id: `a${i}`,
        event_type: WebsocketsEventType.INPUT_AUDIO_BUFFER_APPEND,
        data: { delta: pcm.subarray(i, i + 3200).toString('base64') },
      });
    }
    asr.send({ id: 'c', event_type: WebsocketsEventType.INPUT_AUDIO_BUFFER_COMPLETE });
    await a.waitFor(WebsocketsEventType.TRANSCRIPTIONS_MESSAGE_COMPLETED);
    const updates = a.events
      .filter(e => e.event_type === WebsocketsEventType.TRANSCRIPTIONS_MESSAGE_UPDATE)
      .map(e => e.data.content);
    assert.deepEqual(updates, ['sandbox heard 1.00 s of audio', 'sandbox heard 1.50 s of audio']);
  } finally {
    asr.close();
  }
});

// Depends on the REST chat v3 module (sandbox/src/chat.rs).
test('chat.stream (SSE chat v3)', async () => {
  const events = [];
  const stream = await client().chat.stream({
    bot_id: '7468',
    additional_messages: [{ role: RoleType.User, content: 'hello', content_type: 'text' }],
  });
  for await (const part of stream) events.push(part);
  const names = events.map(e => e.event);
  assert.ok(names.includes(ChatEventType.CONVERSATION_CHAT_CREATED), names.join(','));
  assert.ok(names.includes(ChatEventType.CONVERSATION_MESSAGE_DELTA), names.join(','));
  const completed = events.find(e => e.event === ChatEventType.CONVERSATION_CHAT_COMPLETED);
  assert.ok(completed?.data.usage.token_count > 0, 'usage on chat.completed');
  assert.equal(names.at(-1), ChatEventType.DONE);
});
