// Bad input: each gets a clear error and the connection stays usable, as on /ws (a bad
// event never closes the connection by itself); what cannot be read as a socket.io
// packet at all, or is over WS_MAX_FRAME_BYTES, closes it (as 1002/1009 do on /ws).
// Nothing accepted before is lost.
import assert from 'node:assert/strict';
import { after, before, test } from 'node:test';
import { closeAll, collect, connected, first, sleep, startServer, until } from './helpers.mjs';

let server;
before(async () => { server = await startServer({ env: { WS_MESSAGE_RATE_LIMIT: '0', WS_MAX_FRAME_BYTES: '65536' } }); });
after(async () => { closeAll(); await server.destroy(); });

const as = (user, options = {}) => connected(server.url, { auth: { token: server.token(user) }, ...options });
const ack = (socket, event, ...args) => socket.timeout(5000).emitWithAck(event, ...args);

for (const transport of ['websocket', 'polling']) {
  test(`refused events name what is wrong and the connection stays (${transport})`, async () => {
    const socket = await as('bad-1', { transports: [transport] });
    const expectInvalid = async (answer, path) => {
      assert.equal(answer.code, 'INVALID_REQUEST', JSON.stringify(answer));
      assert.equal(answer.status, 400);
      if (path) assert.equal(answer.details.path, path, JSON.stringify(answer));
    };
    await expectInvalid(await ack(socket, 'no_such_event', {}), 'event');
    await expectInvalid(await ack(socket, 'message', 'a string, not an object'), 'data');
    await expectInvalid(await ack(socket, 'message', { payload: {} }), 'data.type');
    await expectInvalid(await ack(socket, 'message', { type: 't', recipientId: 'x', roomId: 'y', payload: {} }));
    await expectInvalid(await ack(socket, 'message', { type: 't', recipientId: 'x', payload: {} }, { extra: true }), 'input');
    await expectInvalid(await ack(socket, 'message', { type: 't', recipientId: 'x', payload: Buffer.from('bin') }), 'input');
    await expectInvalid(await ack(socket, 'join_room', { roomId: 'r'.repeat(1000) }), 'data.roomId');
    // Errors as events when no callback is given.
    const errors = collect(socket, 'error');
    socket.emit('no_such_event');
    await until(() => errors.length === 1, 'the error event');
    assert.match(errors[0].error, /unknown event/);
    // Still usable.
    assert.ok((await ack(socket, 'ping')).serverTime);
  });
}

test('a malformed packet closes the connection (socket.io cannot read it); the client comes back, nothing lost', async () => {
  const receiver = await as('bad-2r');
  const got = collect(receiver, 'message');
  const socket = await as('bad-2', { transports: ['websocket'], reconnection: true, reconnectionDelay: 100 });
  assert.ok((await ack(socket, 'message', { type: 't', recipientId: 'bad-2r', payload: { n: 1 } })).sequence);
  for (const garbage of ['2["message",{"type":', '9 not a packet', '2{"message"}']) {
    const closed = first(socket, ['disconnect']);
    socket.io.engine.write(garbage);
    assert.equal((await closed).event, 'disconnect', garbage);
    // socket.io-client reconnects by itself after a transport close.
    await first(socket, ['connected']);
  }
  assert.ok((await ack(socket, 'message', { type: 't', recipientId: 'bad-2r', payload: { n: 2 } })).sequence);
  await until(() => got.length === 2, 'both messages');
  await sleep(200);
  assert.deepEqual(got.map((m) => m.payload.n), [1, 2]);
});

test('a payload over WS_MAX_FRAME_BYTES closes the connection; what was accepted before stays', async () => {
  const sender = await as('big-1', { transports: ['websocket'] });
  const receiver = await as('big-2');
  const got = collect(receiver, 'message');
  const before = await ack(sender, 'message', { type: 't', recipientId: 'big-2', payload: { n: 1 } });
  assert.ok(before.sequence);
  const closed = first(sender, ['disconnect']);
  sender.emit('message', { type: 't', recipientId: 'big-2', payload: { blob: 'x'.repeat(100_000) } });
  assert.equal((await closed).event, 'disconnect');
  // Over polling too (the HTTP payload limit).
  const poller = await as('big-3', { transports: ['polling'] });
  const pollClosed = first(poller, ['disconnect']);
  poller.emit('message', { type: 't', recipientId: 'big-2', payload: { blob: 'y'.repeat(100_000) } });
  assert.equal((await pollClosed).event, 'disconnect');
  // The message accepted before was delivered, and the big ones never were.
  await until(() => got.length >= 1, 'the first message');
  await sleep(300);
  assert.deepEqual(got.map((m) => m.payload.n), [1]);
  const { body } = await server.http('GET', '/api/events/poll', server.token('big-2'));
  assert.deepEqual(body.events.map((e) => e.payload.payload.n), [1]);
  // The sender can come back.
  const back = await as('big-1');
  assert.ok((await ack(back, 'ping')).serverTime);
});

test('a client that keeps sending refused events is told why, then disconnected', async () => {
  const socket = await as('bad-3');
  const errors = collect(socket, 'error');
  const closed = first(socket, ['disconnect'], 10000);
  for (let i = 0; i < 101; i++) socket.emit('no_such_event');
  const { data: reason } = await closed;
  assert.equal(reason, 'io server disconnect');
  const last = errors.at(-1);
  assert.equal(last.details.close, 'TOO_MANY_VIOLATIONS', JSON.stringify(last));
  assert.equal(errors.length, 102);
});
