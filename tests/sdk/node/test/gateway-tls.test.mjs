// The official Coze Node SDK (@coze/api, unmodified) through the gateway over device TLS.
//
// Starts `fleetgate sandbox --json --tls-cert … --tls-key …` with the test fixture certificate
// (tests/fixtures/tls/upstream.pem, for 127.0.0.1, issued by the test CA ca.pem): the device API
// is https:// and wss://. Node trusts the test CA through NODE_EXTRA_CA_CERTS, which
// tests/sdk/run.sh sets for the whole Node run (Node reads it once, at start-up), exactly as an
// operator with a private CA would.

import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import path from 'node:path';

import { CozeAPI, WebsocketsEventType, RoleType, ChatEventType } from '@coze/api';

import { REPO, startFleetgate } from '../fleetgate.mjs';

const FIXTURES = path.join(REPO, 'tests', 'fixtures', 'tls');
const TIMEOUT_MS = 20_000;

let info;

before(async () => {
  assert.ok(process.env.NODE_EXTRA_CA_CERTS, 'run with NODE_EXTRA_CA_CERTS=tests/fixtures/tls/ca.pem');
  info = await startFleetgate([
    '--tls-cert', path.join(FIXTURES, 'upstream.pem'),
    '--tls-key', path.join(FIXTURES, 'upstream.key'),
  ]);
});

after(() => info?.proc.kill('SIGTERM'));

const client = () =>
  new CozeAPI({ token: info.device_token, baseURL: info.gateway_url, baseWsURL: info.ws_url });

test('chat.stream over https', async () => {
  assert.ok(info.gateway_url.startsWith('https://'), info.gateway_url);
  const events = [];
  const stream = await client().chat.stream({
    bot_id: '7468',
    additional_messages: [{ role: RoleType.User, content: 'hello tls', content_type: 'text' }],
  });
  for await (const part of stream) events.push(part);
  const names = events.map(e => e.event);
  assert.equal(names[0], ChatEventType.CONVERSATION_CHAT_CREATED, names.join(','));
  assert.ok(names.includes(ChatEventType.CONVERSATION_CHAT_COMPLETED), names.join(','));
  assert.equal(names.at(-1), ChatEventType.DONE);
});

test('websocket chat over wss', async () => {
  const ws = await client().websockets.chat.create({ bot_id: '7468' });
  try {
    const created = await new Promise((resolve, reject) => {
      const timer = setTimeout(() => reject(new Error('no chat.created')), TIMEOUT_MS);
      ws.onmessage = data => {
        if (data.event_type === WebsocketsEventType.CHAT_CREATED) {
          clearTimeout(timer);
          resolve(data);
        }
      };
      ws.onerror = err => {
        clearTimeout(timer);
        reject(new Error(JSON.stringify(err)));
      };
    });
    assert.equal(created.event_type, WebsocketsEventType.CHAT_CREATED);
  } finally {
    ws.close();
  }
});
