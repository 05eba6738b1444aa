// Two socket.io clients behind the test's sticky load balancer, each on its own server
// instance (the `lb` query parameter picks it): driven by tests/tests/socketio_cluster.rs,
// which checks what this prints (one JSON line).
//
// Environment: PROXY_URL, TOKEN_A, LB_A, TOKEN_B, LB_B, COUNT, ROOM.
import { io } from 'socket.io-client';

const { PROXY_URL, TOKEN_A, LB_A, TOKEN_B, LB_B, ROOM } = process.env;
const COUNT = Number(process.env.COUNT ?? 20);
const deadline = setTimeout(() => fail('timed out after 30 s'), 30000);

function fail(why) {
  console.log(JSON.stringify({ error: why }));
  process.exit(1);
}

function open(token, lb, transports) {
  const socket = io(PROXY_URL, { auth: { token }, query: { lb }, transports, reconnection: false, forceNew: true });
  socket.got = [];
  socket.on('message', (m) => socket.got.push(m));
  socket.on('connect_error', (e) => fail(`connect_error: ${e.message}`));
  return new Promise((resolve) => socket.once('connected', () => resolve(socket)));
}

const waitFor = async (predicate) => {
  while (!predicate()) await new Promise((r) => setTimeout(r, 10));
};

// A: long-polling only; B: polling, then its upgrade to WebSocket.
const a = await open(TOKEN_A, LB_A, ['polling']);
const b = await open(TOKEN_B, LB_B, ['polling', 'websocket']);
for (const s of [a, b]) await s.timeout(5000).emitWithAck('join_room', { roomId: ROOM });
const acks = [];
for (let n = 0; n < COUNT; n++) {
  acks.push(await a.timeout(5000).emitWithAck('message', { type: 't', recipientId: 'user-b', payload: { n } }));
  acks.push(await b.timeout(5000).emitWithAck('message', { type: 't', recipientId: 'user-a', payload: { n } }));
  acks.push(await a.timeout(5000).emitWithAck('message', { type: 't', roomId: ROOM, payload: { n, room: true } }));
}
await waitFor(() => a.got.length >= COUNT && b.got.length >= 2 * COUNT);
await new Promise((r) => setTimeout(r, 300));
clearTimeout(deadline);
console.log(JSON.stringify({
  refused: acks.filter((x) => x.code),
  atA: a.got.map((m) => ({ n: m.payload.n, from: m.senderId, room: m.roomId ?? null })),
  atB: b.got.map((m) => ({ n: m.payload.n, from: m.senderId, room: m.roomId ?? null })),
  transportA: a.io.engine.transport.name,
  transportB: b.io.engine.transport.name,
}));
a.close();
b.close();
process.exit(0);
