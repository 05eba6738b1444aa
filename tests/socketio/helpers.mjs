// Shared by the socket.io test files: the real server binary on a loopback port with a
// data directory of its own, tokens, socket.io clients, and the Rust SDK peer. Every
// wait is bounded in time.
import { spawn } from 'node:child_process';
import { createHmac } from 'node:crypto';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join, resolve } from 'node:path';
import { createInterface } from 'node:readline';
import { fileURLToPath } from 'node:url';
import { io } from 'socket.io-client';

const here = dirname(fileURLToPath(import.meta.url));
const targetDir = process.env.CARGO_TARGET_DIR
  ? resolve(process.env.CARGO_TARGET_DIR)
  : resolve(here, '..', '..', 'target');

/** The server binary (`cargo build -p webwaka-server-stub`). */
export const SERVER_BIN = process.env.WEBWAKA_SERVER_BIN ?? join(targetDir, 'debug', 'webwaka-server-stub');
/** The Rust SDK peer (`cargo build -p webwaka-e2e --bin sdk_peer`). */
export const SDK_PEER_BIN = process.env.WEBWAKA_SDK_PEER_BIN ?? join(targetDir, 'debug', 'sdk_peer');
/** The secret every test server signs with. */
export const SECRET = 'socketio-test-secret-0123456789abcdef';
/** How long a test waits for one expected thing. */
export const WAIT_MS = 5000;

const b64url = (value) => Buffer.from(typeof value === 'string' ? value : JSON.stringify(value)).toString('base64url');

/** An HS256 JWT with the protocol's claims (`exp` in seconds; default one hour from now). */
export function mintToken({ tenantId, userId, roles = [], exp, secret = SECRET }) {
  const now = Math.floor(Date.now() / 1000);
  const header = b64url({ alg: 'HS256', typ: 'JWT' });
  const claims = b64url({ tenantId, userId, sub: userId, roles, iat: now, exp: exp ?? now + 3600 });
  const signature = createHmac('sha256', secret).update(`${header}.${claims}`).digest('base64url');
  return `${header}.${claims}.${signature}`;
}

/** Resolves when `predicate()` is true, polling every 10 ms; rejects after `ms`. */
export async function until(predicate, what, ms = WAIT_MS) {
  const deadline = Date.now() + ms;
  while (Date.now() < deadline) {
    if (await predicate()) return;
    await sleep(10);
  }
  throw new Error(`timed out after ${ms} ms waiting for ${what}`);
}

export const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

/** The first `event` that `socket` emits, within `ms`. */
export async function once(socket, event, ms = WAIT_MS) {
  return (await first(socket, [event], ms)).data;
}

/** Whichever of `events` `socket` emits first, within `ms`: { event, data }. */
export function first(socket, events, ms = WAIT_MS) {
  return new Promise((resolvePromise, reject) => {
    const handlers = new Map();
    const done = () => {
      clearTimeout(timer);
      for (const [event, handler] of handlers) socket.off(event, handler);
    };
    const timer = setTimeout(() => {
      done();
      reject(new Error(`none of ${events.join(', ')} within ${ms} ms`));
    }, ms);
    for (const event of events) {
      const handler = (data) => {
        done();
        resolvePromise({ event, data });
      };
      handlers.set(event, handler);
      socket.on(event, handler);
    }
  });
}

/** Keeps every `event` that `socket` emits, in order. */
export function collect(socket, event) {
  const seen = [];
  socket.on(event, (data) => seen.push(data));
  return seen;
}

/**
 * The server binary, started on a free loopback port (or `port`) with a fresh data
 * directory (or `dataDir`), `env` added to the test settings. Resolves once it prints
 * where it listens.
 */
export async function startServer({ env = {}, port = 0, dataDir } = {}) {
  const dir = dataDir ?? mkdtempSync(join(tmpdir(), 'webwaka-socketio-'));
  const child = spawn(SERVER_BIN, [], {
    env: {
      PATH: process.env.PATH,
      JWT_SECRET: SECRET,
      WS_HOST: '127.0.0.1',
      WS_PORT: String(port),
      DATA_DIR: dir,
      WS_PING_INTERVAL: '1000',
      WS_PING_TIMEOUT: '3000',
      SHUTDOWN_GRACE_MS: '2000',
      LOG_LEVEL: 'warn',
      ...env,
    },
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  let stderr = '';
  child.stderr.on('data', (chunk) => { stderr += chunk; });
  const lines = createInterface({ input: child.stdout });
  const listening = await new Promise((resolvePromise, reject) => {
    const timer = setTimeout(() => reject(new Error(`the server did not start within 20 s: ${stderr}`)), 20000);
    child.once('exit', (code) => {
      clearTimeout(timer);
      reject(new Error(`the server exited (${code}): ${stderr}`));
    });
    lines.on('line', (line) => {
      const m = line.match(/listening\s+http:\/\/([\d.]+):(\d+)/);
      if (m) {
        clearTimeout(timer);
        resolvePromise(Number(m[2]));
      }
    });
  });
  const server = {
    port: listening,
    url: `http://127.0.0.1:${listening}`,
    dataDir: dir,
    child,
    stderr: () => stderr,
    /** Stops it gracefully (SIGTERM), waiting for the exit. */
    async stop() {
      if (child.exitCode !== null || child.signalCode !== null) return;
      const exited = new Promise((r) => child.once('exit', r));
      child.kill('SIGTERM');
      const timer = setTimeout(() => child.kill('SIGKILL'), 10000);
      await exited;
      clearTimeout(timer);
    },
    /** Stops it, then starts another on the same port and data directory. */
    async restart() {
      await server.stop();
      return startServer({ env, port: listening, dataDir: dir });
    },
    /** Stops it and removes its data directory. */
    async destroy() {
      await server.stop();
      rmSync(dir, { recursive: true, force: true });
    },
    token: (userId, { tenantId = 'demo', roles = [], exp } = {}) => mintToken({ tenantId, userId, roles, exp }),
    /** An HTTP request with a token, answering { status, body }. */
    async http(method, path, token, body, headers = {}) {
      const response = await fetch(`${server.url}${path}`, {
        method,
        headers: {
          authorization: `Bearer ${token}`,
          ...(body ? { 'content-type': 'application/json' } : {}),
          ...headers,
        },
        body: body ? JSON.stringify(body) : undefined,
      });
      const text = await response.text();
      return { status: response.status, body: text ? JSON.parse(text) : null };
    },
  };
  return server;
}

/** A socket.io client for `url`, not reconnecting unless asked, closed by `closeAll`. */
const opened = new Set();
export function client(url, options = {}) {
  const socket = io(url, { reconnection: false, forceNew: true, timeout: WAIT_MS, ...options });
  opened.add(socket);
  return socket;
}

/** A client that has received `connected` (its data is `socket.connectedData`). */
export async function connected(url, options = {}) {
  const socket = client(url, options);
  const { event, data } = await first(socket, ['connected', 'connect_error']);
  if (event === 'connect_error') throw new Error(`connect_error: ${data.message}`);
  socket.connectedData = data;
  return socket;
}

/** The `connect_error` a client gets (it must not connect). */
export async function refused(url, options = {}) {
  const socket = client(url, options);
  const { event, data } = await first(socket, ['connected', 'connect_error']);
  socket.close();
  if (event === 'connected') throw new Error('connected, but a refusal was expected');
  return data;
}

/** Closes every client this file opened. */
export function closeAll() {
  for (const socket of opened) socket.close();
  opened.clear();
}

/**
 * The Rust SDK client (`sdk_peer`) for `url` as `token`: `send(command)` writes a
 * command line, `seen` holds what it reported, `until(pred)` waits for a report.
 */
export async function sdkPeer(url, token) {
  const dir = mkdtempSync(join(tmpdir(), 'webwaka-sdk-peer-'));
  const child = spawn(SDK_PEER_BIN, [url, token, join(dir, 'client.db')], {
    env: { PATH: process.env.PATH },
    stdio: ['pipe', 'pipe', 'pipe'],
  });
  let stderr = '';
  child.stderr.on('data', (chunk) => { stderr += chunk; });
  const seen = [];
  createInterface({ input: child.stdout }).on('line', (line) => {
    try { seen.push(JSON.parse(line)); } catch { seen.push({ raw: line }); }
  });
  const peer = {
    seen,
    stderr: () => stderr,
    send: (command) => child.stdin.write(`${JSON.stringify(command)}\n`),
    until: (predicate, what, ms) => until(() => seen.some(predicate), what, ms),
    messages: () => seen.filter((s) => s.message).map((s) => s.message),
    async quit() {
      if (child.exitCode !== null) return;
      const exited = new Promise((r) => child.once('exit', r));
      peer.send({ quit: true });
      const timer = setTimeout(() => child.kill('SIGKILL'), 5000);
      await exited;
      clearTimeout(timer);
      rmSync(dir, { recursive: true, force: true });
    },
  };
  await peer.until((s) => s.state === 'Realtime', 'the SDK client to be Realtime', 10000);
  return peer;
}
