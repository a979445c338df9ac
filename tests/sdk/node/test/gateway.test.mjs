// The official Coze Node SDK (@coze/api, unmodified) THROUGH the gateway.
//
// Starts `fleetgate sandbox --json --port 0 --admin-port 0` (FLEETGATE_BIN, default
// <repo>/target/debug/fleetgate): the sandbox upstream plus a gateway wired to it. The SDK talks
// only to the gateway's device URL with the demo device's gateway token; the gateway swaps in the
// upstream PAT. The SDK sends the websocket token both as `Authorization` header and as
// `?authorization=Bearer%20<tok>`.

import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { CozeAPI, WebsocketsEventType, RoleType, ChatEventType } from '@coze/api';

import { startFleetgate } from '../fleetgate.mjs';

const TIMEOUT_MS = 20_000;

let info;

before(async () => {
  info = await startFleetgate();
});

after(() => info?.proc.kill('SIGTERM'));

function client(token = info.device_token) {
  return new CozeAPI({ token, baseURL: info.gateway_url, baseWsURL: info.ws_url });
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

test('chat.stream through the gateway', async () => {
  const events = [];
  const stream = await client().chat.stream({
    bot_id: '7468',
    additional_messages: [{ role: RoleType.User, content: 'hello gateway', content_type: 'text' }],
  });
  for await (const part of stream) events.push(part);
  const names = events.map(e => e.event);
  assert.equal(names[0], ChatEventType.CONVERSATION_CHAT_CREATED, names.join(','));
  assert.ok(names.includes(ChatEventType.CONVERSATION_MESSAGE_DELTA), names.join(','));
  const answer = events
    .filter(e => e.event === ChatEventType.CONVERSATION_MESSAGE_DELTA)
    .map(e => e.data.content)
    .join('');
  assert.ok(answer.startsWith('Sandbox reply to'), answer);
  const completed = events.find(e => e.event === ChatEventType.CONVERSATION_CHAT_COMPLETED);
  assert.ok(completed?.data.usage.token_count > 0, 'usage on chat.completed');
  assert.equal(names.at(-1), ChatEventType.DONE);
});

test('a bad token is an AuthenticationError with code 4100', async () => {
  await assert.rejects(
    client('not-a-gateway-token').chat.create({
      bot_id: '7468',
      additional_messages: [{ role: RoleType.User, content: 'hi', content_type: 'text' }],
    }),
    err => {
      assert.equal(err.constructor.name, 'AuthenticationError');
      assert.equal(err.code, 4100);
      assert.ok(err.logid, 'logid');
      return true;
    },
  );
});

test('websocket chat voice turn through the gateway (pcm 16 kHz in, pcm 16 kHz out)', async () => {
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
        output_audio: { codec: 'pcm', pcm_config: { sample_rate: 16000 } },
      },
    });
    const updated = await rec.waitFor(WebsocketsEventType.CHAT_UPDATED);
    assert.equal(updated.data.output_audio.pcm_config.sample_rate, 16000);

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
    assert.equal(audioBytes, speechMs(answer.content) * 32);
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

// coze-js finds the handshake logid with rawHeaders.findIndex(h => h === 'X-Tt-Logid')
// (case-sensitive); the gateway writes its own denials with a title-cased `X-Tt-Logid`.
test('websocket handshake with a bad token reports 401 and the gateway logid', async () => {
  const err = await handshakeError('not-a-gateway-token');
  assert.equal(err.event_type, WebsocketsEventType.ERROR);
  assert.equal(err.data.code, 401);
  assert.match(err.detail.logid ?? '', /^\d{14}[0-9A-F]{18}$/, 'X-Tt-Logid surfaced');
});
