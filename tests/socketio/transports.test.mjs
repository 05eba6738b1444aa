// Both Engine.IO transports: HTTP long-polling alone, WebSocket alone, and polling
// upgraded to WebSocket, each carrying messages both ways, exactly once.
import assert from 'node:assert/strict';
import { after, before, test } from 'node:test';
import { closeAll, collect, connected, sleep, startServer, until } from './helpers.mjs';

let server;
before(async () => { server = await startServer({ env: { WS_MESSAGE_RATE_LIMIT: '0' } }); });
after(async () => { closeAll(); await server.destroy(); });

async function exchange(a, b, count) {
  const atB = collect(b, 'message');
  const atA = collect(a, 'message');
  for (let n = 0; n < count; n++) {
    const ack = await a.timeout(5000).emitWithAck('message', { type: 't', recipientId: b.user, payload: { n } });
    assert.ok(ack.sequence, JSON.stringify(ack));
    b.emit('message', { type: 't', recipientId: a.user, payload: { n } });
  }
  await until(() => atB.length === count && atA.length === count, `${count} messages each way`);
  await sleep(200);
  assert.deepEqual(atB.map((m) => m.payload.n), [...Array(count).keys()]);
  assert.deepEqual(atA.map((m) => m.payload.n), [...Array(count).keys()]);
}

async function as(user, options) {
  const socket = await connected(server.url, { auth: { token: server.token(user) }, ...options });
  socket.user = user;
  return socket;
}

test('a polling-only client sends and receives', async () => {
  const polling = await as('poll-1', { transports: ['polling'] });
  const other = await as('poll-2', { transports: ['websocket'] });
  await exchange(polling, other, 20);
  assert.equal(polling.io.engine.transport.name, 'polling');
  // Deliveries while the client waits in a long poll, and a burst bigger than a poll.
  const got = collect(polling, 'message');
  for (let n = 0; n < 300; n++) other.emit('message', { type: 'burst', recipientId: 'poll-1', payload: { n } });
  await until(() => got.length === 300, '300 messages over polling', 15000);
  assert.deepEqual(got.map((m) => m.payload.n), [...Array(300).keys()]);
});

test('a websocket-only client', async () => {
  const a = await as('ws-1', { transports: ['websocket'] });
  const b = await as('ws-2', { transports: ['websocket'] });
  await exchange(a, b, 10);
  assert.equal(a.io.engine.transport.name, 'websocket');
});

test('polling upgrades to WebSocket, losing nothing', async () => {
  const upgrading = await as('up-1', { transports: ['polling', 'websocket'] });
  const other = await as('up-2', { transports: ['polling'] });
  const got = collect(upgrading, 'message');
  // Messages flow while the upgrade happens.
  for (let n = 0; n < 50; n++) other.emit('message', { type: 't', recipientId: 'up-1', payload: { n } });
  await until(() => upgrading.io.engine.transport.name === 'websocket', 'the upgrade to websocket');
  for (let n = 50; n < 100; n++) other.emit('message', { type: 't', recipientId: 'up-1', payload: { n } });
  await until(() => got.length === 100, '100 messages across the upgrade');
  await sleep(200);
  assert.deepEqual(got.map((m) => m.payload.n), [...Array(100).keys()]);
  await exchange(upgrading, other, 5);
});

test('the health endpoint counts connections by transport', async () => {
  await as('h-1', { transports: ['websocket'] });
  const response = await fetch(`${server.url}/health`);
  const health = await response.json();
  assert.ok(health.services.websocket.transports['socket.io'] >= 1, JSON.stringify(health.services.websocket));
});
