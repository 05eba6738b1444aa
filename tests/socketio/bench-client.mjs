// The driver of the `socketio` benchmark group (tests/src/bench/socketio.rs): npm's
// socket.io-client (or `ws` for /ws) against one server, one benchmark per run.
//
// `node bench-client.mjs MODE` with JSON settings in BENCH (url, kind: socketio|ws|node,
// the server's secret and tenant to mint tokens with, counts). It connects, prints `ready`, waits for `go` on stdin (the
// parent reads the server's CPU time or memory in between), runs the measured part,
// prints `done {json}`, and waits for stdin to close.
import { performance } from 'node:perf_hooks';
import { createInterface } from 'node:readline';
import { io } from 'socket.io-client';
import WebSocket from 'ws';
import { mintToken } from './helpers.mjs';

const settings = JSON.parse(process.env.BENCH);
const mode = process.argv[2];
const lines = createInterface({ input: process.stdin });
const token = (user) => mintToken({ tenantId: settings.tenant, userId: user, secret: settings.secret, exp: Math.floor(Date.now() / 1000) + 86400 });
const go = () => new Promise((resolve) => lines.once('line', resolve));
lines.on('close', () => process.exit(0));
setTimeout(() => { console.error('bench-client: timed out'); process.exit(1); }, settings.timeoutMs ?? 600000).unref();

/** A connection: `send(event, data)`, `on(event, fn)`, `close()`, whatever the kind. */
async function connect(user) {
  if (settings.kind === 'ws') {
    const url = `${settings.url.replace('http', 'ws')}/ws?token=${token(user)}`;
    const ws = new WebSocket(url, { perMessageDeflate: false });
    const handlers = new Map();
    const conn = {
      send: (event, data) => ws.send(JSON.stringify({ event, data })),
      on: (event, fn) => handlers.set(event, fn),
      close: () => ws.close(),
    };
    await new Promise((resolve, reject) => {
      ws.on('message', (text) => {
        const frame = JSON.parse(text);
        if (frame.event === 'connected') resolve();
        handlers.get(frame.event)?.(frame.data);
      });
      ws.on('error', reject);
    });
    return conn;
  }
  const auth = settings.kind === 'node' ? { userId: user } : { token: token(user) };
  const socket = io(settings.url, { auth, transports: ['websocket'], forceNew: true, reconnection: false });
  await new Promise((resolve, reject) => {
    socket.once('connected', resolve);
    socket.once('connect_error', reject);
  });
  return { send: (event, data) => socket.emit(event, data), on: (event, fn) => socket.on(event, fn), close: () => socket.close() };
}

async function roundtrip() {
  const a = await connect('a');
  const b = await connect('b');
  const cls = settings.interactionClass;
  b.on('message', (m) => b.send('message', { type: 'echo', interactionClass: cls, recipientId: 'a', payload: m.payload }));
  let resolveOne;
  a.on('message', () => resolveOne());
  const one = async (i) => {
    const started = performance.now();
    await new Promise((resolve) => {
      resolveOne = resolve;
      a.send('message', { type: 'ping', interactionClass: cls, recipientId: 'b', payload: { i } });
    });
    return (performance.now() - started) * 1000;
  };
  for (let i = 0; i < settings.warmup; i++) await one(i);
  console.log('ready');
  await go();
  const samples = [];
  for (let i = 0; i < settings.count; i++) samples.push(await one(i));
  console.log(`done ${JSON.stringify({ samplesUs: samples, messages: 2 * settings.count })}`);
}

async function fanout() {
  const members = [];
  const room = 'fanout';
  let received = 0;
  let resolveAll;
  for (let i = 0; i < settings.members; i++) {
    const conn = await connect(`m${i}`);
    await new Promise((resolve) => {
      conn.on('room_joined', resolve);
      conn.send('join_room', { roomId: room });
    });
    conn.on('message', () => {
      received += 1;
      if (received === settings.members) resolveAll();
    });
    members.push(conn);
  }
  const sender = await connect('sender');
  await new Promise((resolve) => {
    sender.on('room_joined', resolve);
    sender.send('join_room', { roomId: room });
  });
  const one = async (i) => {
    received = 0;
    const started = performance.now();
    await new Promise((resolve) => {
      resolveAll = resolve;
      sender.send('message', { type: 'fan', interactionClass: settings.interactionClass, roomId: room, payload: { i } });
    });
    return performance.now() - started;
  };
  for (let i = 0; i < settings.warmup; i++) await one(i);
  console.log('ready');
  await go();
  const samples = [];
  for (let i = 0; i < settings.count; i++) samples.push(await one(i));
  console.log(`done ${JSON.stringify({ samplesMs: samples, fanouts: settings.count })}`);
}

async function idle() {
  // A few first, so that what the server allocates once is not counted.
  const warm = [];
  for (let i = 0; i < 20; i++) warm.push(await connect(`w${i}`));
  console.log('ready');
  await go();
  const open = [];
  for (let i = 0; i < settings.connections; i++) open.push(await connect(`i${i}`));
  await new Promise((r) => setTimeout(r, 1000));
  console.log(`done ${JSON.stringify({ connections: open.length })}`);
}

await ({ roundtrip, fanout, idle })[mode]();
