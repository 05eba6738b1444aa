// The original README's client example runs unchanged against this server (only the
// URL and the token filled in), and its message reaches its recipient.
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { readFileSync, writeFileSync, rmSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { after, before, test } from 'node:test';
import { fileURLToPath } from 'node:url';
import { closeAll, collect, connected, startServer, until } from './helpers.mjs';

const here = dirname(fileURLToPath(import.meta.url));
let server;

before(async () => { server = await startServer(); });
after(async () => { closeAll(); await server.destroy(); });

test("the original README's client example reaches user-123", async () => {
  // The recipient: user-123 of the same tenant.
  const recipient = await connected(server.url, { auth: { token: server.token('user-123') } });
  const received = collect(recipient, 'message');

  const example = readFileSync(join(here, 'readme-client.mjs'), 'utf8');
  const filled = example
    .replace("'http://localhost:3000'", `'${server.url}'`)
    .replace("'your-jwt-token'", `'${server.token('alice')}'`);
  // Exactly the two literals changed, nothing else.
  assert.notEqual(filled, example);
  assert.equal(filled.split('\n').length, example.split('\n').length);
  const file = join(here, `.readme-client-${process.pid}.mjs`);
  writeFileSync(file, filled);
  const child = spawn(process.execPath, [file], { stdio: ['ignore', 'pipe', 'pipe'] });
  let out = '';
  child.stdout.on('data', (chunk) => { out += chunk; });
  child.stderr.on('data', (chunk) => { out += chunk; });
  try {
    await until(() => received.length > 0, 'the example message at user-123');
    await until(() => out.includes('Connected:'), "the example's `connected` log line");
    const [message] = received;
    assert.equal(message.type, 'chat.message');
    assert.deepEqual(message.payload, { text: 'Hello, World!' });
    assert.equal(message.senderId, 'alice');
    assert.equal(message.recipientId, 'user-123');
    assert.equal(message.tenantId, 'demo');
    assert.equal(message.interactionClass, 'CLASS_C');
    assert.ok(Number.isInteger(message.sequence) && message.eventId, 'durable: it has a place in the log');
    assert.match(out, /clientId: 'unique-client-id'/, 'the query clientId reached the server');
    // Delivered once.
    await new Promise((r) => setTimeout(r, 300));
    assert.equal(received.length, 1);
  } finally {
    child.kill('SIGKILL');
    rmSync(file, { force: true });
  }
});
