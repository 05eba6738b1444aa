// Messages, rooms and presence over socket.io: the contract's rules (§3), the same as
// /ws. Answers go to the acknowledgement when the client asks for one, else they are
// emitted as the event of the same name.
import assert from 'node:assert/strict';
import { randomUUID } from 'node:crypto';
import { after, before, describe, test } from 'node:test';
import { closeAll, collect, connected, once, sleep, startServer, until } from './helpers.mjs';

let server;
before(async () => {
  server = await startServer({ env: { ROOM_POLICY: 'admin:=admin', WS_MESSAGE_RATE_LIMIT: '20' } });
});
after(async () => { closeAll(); await server.destroy(); });

const as = (user, options = {}) => connected(server.url, { auth: { token: server.token(user, options) } });
const ack = (socket, event, data) => socket.timeout(5000).emitWithAck(event, data);

describe('a message to a user', () => {
  test('is acked (event or callback) and delivered once, durable, to every other connection', async () => {
    const alice = await as('alice');
    const aliceOther = await as('alice');
    const bob = await as('bob');
    const toBob = collect(bob, 'message');
    const toAliceOther = collect(aliceOther, 'message');
    const toAlice = collect(alice, 'message');
    const acks = collect(alice, 'message_ack');

    // Without a callback: `message_ack` as an event (the original's way).
    alice.emit('message', { type: 'chat.message', recipientId: 'bob', payload: { n: 1 } });
    await until(() => acks.length === 1, 'message_ack');
    assert.ok(acks[0].messageId && acks[0].eventId && Number.isInteger(acks[0].sequence));
    // With a callback: the ack's data there, and no event.
    const messageId = randomUUID();
    const answer = await ack(alice, 'message', { messageId, type: 'chat.message', recipientId: 'bob', payload: { n: 2 } });
    assert.equal(answer.messageId, messageId);
    assert.equal(answer.sequence, acks[0].sequence + 1);
    // A resend of the same id: acked again, never delivered twice.
    const again = await ack(alice, 'message', { messageId, type: 'chat.message', recipientId: 'bob', payload: { n: 2 } });
    assert.deepEqual(again, answer);

    await until(() => toBob.length === 2 && toAliceOther.length === 2, 'both deliveries');
    await sleep(300);
    assert.deepEqual(toBob.map((m) => m.payload.n), [1, 2]);
    assert.deepEqual(toAliceOther.map((m) => m.payload.n), [1, 2], "the sender's other connection");
    assert.equal(toAlice.length, 0, 'not the sending connection, which got the ack');
    assert.equal(acks.length, 1, 'the callback replaced the event');
    assert.equal(toBob[1].messageId, messageId);
  });

  test('CLASS_A is live only (no eventId), CLASS_D is refused with REALTIME_NOT_ALLOWED', async () => {
    const alice = await as('alice');
    const bob = await as('bob');
    const toBob = collect(bob, 'message');
    const live = await ack(alice, 'message', { type: 'typing', interactionClass: 'CLASS_A', recipientId: 'bob', payload: {} });
    assert.equal(live.eventId, undefined);
    await until(() => toBob.length === 1, 'the live message');
    assert.equal(toBob[0].sequence, undefined);

    const refusedD = await ack(alice, 'message', { type: 'pay', interactionClass: 'CLASS_D', recipientId: 'bob', payload: { amount: 1 } });
    assert.equal(refusedD.code, 'REALTIME_NOT_ALLOWED');
    assert.equal(refusedD.status, 422);
    // Without a callback, the refusal is an `error` event.
    const errors = collect(alice, 'error');
    alice.emit('message', { type: 'pay', interactionClass: 'CLASS_D', recipientId: 'bob', payload: {} });
    await until(() => errors.length === 1, 'the error event');
    assert.equal(errors[0].code, 'REALTIME_NOT_ALLOWED');
    await sleep(200);
    assert.equal(toBob.length, 1, 'nothing of CLASS_D reached bob');
  });

  test('naming another tenant is TENANT_VIOLATION', async () => {
    const alice = await as('alice');
    const answer = await ack(alice, 'message', { type: 't', recipientId: 'bob', tenantId: 'other', payload: {} });
    assert.equal(answer.code, 'TENANT_VIOLATION');
    const own = await ack(alice, 'message', { type: 't', recipientId: 'bob', tenantId: 'demo', payload: {} });
    assert.ok(own.sequence);
  });
});

describe('rooms', () => {
  test('a room message reaches every member once; posting needs membership', async () => {
    const room = `room-${randomUUID()}`;
    const alice = await as('alice');
    const bob = await as('bob');
    const carol = await as('carol');
    const toBob = collect(bob, 'message');
    const toCarol = collect(carol, 'message');
    const notMember = await ack(alice, 'message', { type: 't', roomId: room, payload: {} });
    assert.equal(notMember.code, 'AUTHZ_FAILED');
    for (const s of [alice, bob]) assert.deepEqual(await ack(s, 'join_room', { roomId: room }), { roomId: room });
    // `room_joined` as an event when no callback is given.
    const joined = once(carol, 'room_joined');
    carol.emit('join_room', { roomId: room });
    assert.deepEqual(await joined, { roomId: room });

    for (let n = 1; n <= 5; n++) {
      const a = await ack(alice, 'message', { type: 'chat', roomId: room, payload: { n } });
      assert.ok(a.sequence, JSON.stringify(a));
    }
    await until(() => toBob.length === 5 && toCarol.length === 5, 'five room messages at bob and carol');
    await sleep(300);
    for (const got of [toBob, toCarol]) {
      assert.deepEqual(got.map((m) => m.payload.n), [1, 2, 3, 4, 5]);
      assert.ok(got.every((m) => m.roomId === room && m.senderId === 'alice'));
    }
    // Leaving: room_left, and no more deliveries.
    assert.deepEqual(await ack(carol, 'leave_room', { roomId: room }), { roomId: room });
    await ack(alice, 'message', { type: 'chat', roomId: room, payload: { n: 6 } });
    await until(() => toBob.length === 6, 'the sixth at bob');
    await sleep(200);
    assert.equal(toCarol.length, 5);
  });

  test('the room policy reserves prefixes for roles', async () => {
    const user = await as('dave');
    const refusal = await ack(user, 'join_room', { roomId: 'admin:secrets' });
    assert.equal(refusal.code, 'AUTHZ_FAILED');
    const admin = await as('erin', { roles: ['admin'] });
    assert.deepEqual(await ack(admin, 'join_room', { roomId: 'admin:secrets' }), { roomId: 'admin:secrets' });
    const bad = await ack(user, 'join_room', {});
    assert.equal(bad.code, 'INVALID_REQUEST');
    assert.equal(bad.details.path, 'data.roomId');
  });
});

test('presence: on join, on update, offline when the last connection goes; never to oneself', async () => {
  const room = `presence-${randomUUID()}`;
  const frank = await as('frank');
  await ack(frank, 'join_room', { roomId: room });
  const grace = await as('grace');
  const atGrace = collect(grace, 'presence');
  const atFrank = collect(frank, 'presence');
  await ack(grace, 'join_room', { roomId: room });
  // The joiner hears of the members online; the members hear of the joiner.
  await until(() => atGrace.some((p) => p.userId === 'frank' && p.status === 'online'), 'frank online at grace');
  await until(() => atFrank.some((p) => p.userId === 'grace' && p.status === 'online'), 'grace online at frank');
  // presence_update: broadcast, and its callback gets the presence set.
  const set = await ack(frank, 'presence_update', { status: 'away', metadata: { note: 'lunch' } });
  assert.equal(set.status, 'away');
  await until(() => atGrace.some((p) => p.userId === 'frank' && p.status === 'away' && p.metadata?.note === 'lunch'), 'away at grace');
  const bad = await ack(frank, 'presence_update', { status: 'sleepy' });
  assert.equal(bad.code, 'INVALID_REQUEST');
  // Offline when frank's only connection closes.
  frank.close();
  await until(() => atGrace.some((p) => p.userId === 'frank' && p.status === 'offline'), 'frank offline at grace');
  assert.ok(!atFrank.some((p) => p.userId === 'frank'), 'never about oneself');
});

test('the per-user rate limit: RATE_LIMIT with retryAfterMs; refused events spend no budget', async () => {
  const henry = await as('henry');
  // Refused events (no target) do not count.
  for (let i = 0; i < 30; i++) {
    const r = await ack(henry, 'message', { type: 't', payload: {} });
    assert.equal(r.code, 'INVALID_REQUEST');
  }
  const answers = [];
  for (let i = 0; i < 25; i++) {
    answers.push(await ack(henry, 'message', { type: 't', interactionClass: 'CLASS_A', recipientId: 'nobody', payload: { i } }));
  }
  const limited = answers.filter((a) => a.code === 'RATE_LIMIT');
  assert.equal(answers.length - limited.length, 20, 'the burst is the per-minute limit');
  assert.equal(limited.length, 5);
  assert.ok(limited[0].details.retryAfterMs > 0);
  // The connection stays usable.
  assert.ok((await ack(henry, 'ping')).serverTime);
});
