// Reconnecting with auth.lastEventId: what was missed, in order, then `resumed`; across
// a server restart, with no gap and no duplicate.
import assert from 'node:assert/strict';
import { after, before, test } from 'node:test';
import { client, closeAll, collect, connected, once, sleep, startServer, until } from './helpers.mjs';

let server;
before(async () => { server = await startServer({ env: { WS_MESSAGE_RATE_LIMIT: '0' } }); });
after(async () => { closeAll(); await server.destroy(); });

test('a reconnect with auth.lastEventId replays what was missed, then resumed', async () => {
  const sender = server.token('s1');
  const post = (n) => server.http('POST', '/api/messages', sender, { type: 't', recipientId: 'r1', payload: { n } });
  const receiver = await connected(server.url, { auth: { token: server.token('r1') } });
  const got = collect(receiver, 'message');
  for (let n = 0; n < 3; n++) assert.equal((await post(n)).status, 201);
  await until(() => got.length === 3, 'three live');
  const cursor = got[2].eventId;
  receiver.close();
  for (let n = 3; n < 8; n++) await post(n);

  const again = client(server.url, { auth: { token: server.token('r1'), lastEventId: cursor } });
  const replayed = collect(again, 'message');
  const resumed = await once(again, 'resumed');
  assert.deepEqual(replayed.map((m) => m.payload.n), [3, 4, 5, 6, 7]);
  assert.equal(resumed.replayed, 5);
  assert.equal(resumed.lastEventId, replayed[4].eventId);
  // Live again afterwards, once.
  await post(8);
  await until(() => replayed.length === 6, 'the live one');
  await sleep(200);
  assert.deepEqual(replayed.map((m) => m.payload.n), [3, 4, 5, 6, 7, 8]);
  // `resume` as an event, with its answer in the callback.
  const answer = await again.timeout(5000).emitWithAck('resume', { lastEventId: cursor });
  assert.equal(answer.replayed, 6);
  const gone = await again.timeout(5000).emitWithAck('resume', { lastEventId: 'nope' });
  assert.equal(gone.code, 'CURSOR_EXPIRED');
});

test('across a server restart: reconnects by itself, resumes, no gap, no duplicate', async () => {
  const sender = server.token('s2');
  let last;
  const receiver = await connected(server.url, {
    // auth as a function: every reconnection sends the latest cursor.
    auth: (cb) => cb({ token: server.token('r2'), ...(last ? { lastEventId: last } : {}) }),
    reconnection: true,
    reconnectionDelay: 100,
    reconnectionDelayMax: 500,
  });
  const got = [];
  receiver.on('message', (m) => { got.push(m); last = m.eventId; });
  const resumes = collect(receiver, 'resumed');
  const post = (n) => server.http('POST', '/api/messages', sender, { type: 't', recipientId: 'r2', payload: { n } });
  for (let n = 0; n < 10; n++) await post(n);
  await until(() => got.length === 10, 'ten before the restart');

  server = await server.restart();
  // Posted while the receiver may still be away (or already back): either way each
  // arrives once, in order.
  for (let n = 10; n < 30; n++) await post(n);
  await until(() => got.length >= 30, 'thirty after the restart', 15000);
  await sleep(300);
  assert.deepEqual(got.map((m) => m.payload.n), [...Array(30).keys()], 'no gap, no duplicate, in order');
  assert.ok(resumes.length >= 1, 'the reconnection resumed from its cursor');
  const sequences = got.map((m) => m.sequence);
  assert.deepEqual(sequences, [...sequences].sort((a, b) => a - b));
});
