// socket.io clients and the Rust SDK (over /ws) on one server: messages cross in both
// directions, each exactly once and in order, to users and to rooms.
import assert from 'node:assert/strict';
import { after, before, test } from 'node:test';
import { closeAll, collect, connected, sdkPeer, sleep, startServer, until } from './helpers.mjs';

let server;
let peer;
before(async () => {
  server = await startServer({ env: { WS_MESSAGE_RATE_LIMIT: '0' } });
  peer = await sdkPeer(server.url, server.token('rusty'));
});
after(async () => {
  closeAll();
  await peer?.quit();
  await server.destroy();
});

const COUNT = 50;

test('socket.io → Rust SDK: direct messages, once, in order', async () => {
  const web = await connected(server.url, { auth: { token: server.token('webby') } });
  for (let n = 0; n < COUNT; n++) {
    web.emit('message', { type: 'chat.text', recipientId: 'rusty', payload: { n } });
  }
  await peer.until(() => peer.messages().filter((m) => m.senderId === 'webby').length >= COUNT, `${COUNT} at the SDK`, 15000);
  await sleep(300);
  const got = peer.messages().filter((m) => m.senderId === 'webby');
  assert.deepEqual(got.map((m) => m.payload.n), [...Array(COUNT).keys()]);
});

test('Rust SDK → socket.io: direct messages, once, in order', async () => {
  const web = await connected(server.url, { auth: { token: server.token('webby') } });
  const got = collect(web, 'message');
  for (let n = 0; n < COUNT; n++) peer.send({ send: { user: 'webby' }, type: 'chat.text', payload: { n } });
  await until(() => got.length >= COUNT, `${COUNT} at socket.io`, 15000);
  await sleep(300);
  assert.deepEqual(got.map((m) => m.payload.n), [...Array(COUNT).keys()]);
  assert.ok(got.every((m) => m.senderId === 'rusty' && Number.isInteger(m.sequence)));
});

test('a room shared by both, both ways', async () => {
  const room = 'mixed';
  const web = await connected(server.url, { auth: { token: server.token('webby') } });
  const got = collect(web, 'message');
  await web.timeout(5000).emitWithAck('join_room', { roomId: room });
  peer.send({ join: room });
  await peer.until((s) => s.room === room && s.joined, 'the SDK joined the room');
  for (let n = 0; n < 10; n++) {
    web.emit('message', { type: 'chat.text', roomId: room, payload: { from: 'web', n } });
    peer.send({ send: { room }, type: 'chat.text', payload: { from: 'sdk', n } });
  }
  const fromWeb = () => peer.messages().filter((m) => m.roomId === room && m.payload.from === 'web');
  await peer.until(() => fromWeb().length >= 10, 'ten room messages at the SDK', 15000);
  await until(() => got.filter((m) => m.roomId === room).length >= 10, 'ten room messages at socket.io', 15000);
  await sleep(300);
  assert.deepEqual(fromWeb().map((m) => m.payload.n), [...Array(10).keys()]);
  assert.deepEqual(got.filter((m) => m.roomId === room).map((m) => m.payload.n), [...Array(10).keys()]);
});
