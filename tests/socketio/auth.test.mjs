// Connecting: each token form, and each refusal arriving as a connect_error whose
// message is `CODE: text` (socketioxide sends no `data` with a refusal).
import assert from 'node:assert/strict';
import { after, before, describe, test } from 'node:test';
import { closeAll, connected, mintToken, refused, startServer } from './helpers.mjs';

let server;
before(async () => { server = await startServer(); });
after(async () => { closeAll(); await server.destroy(); });

describe('the token', () => {
  test('in auth.token (the original README)', async () => {
    const socket = await connected(server.url, { auth: { token: server.token('alice') } });
    const data = socket.connectedData;
    assert.match(data.connectionId, /^conn-\d+$/);
    assert.deepEqual(data.interactionClasses, ['CLASS_A', 'CLASS_B', 'CLASS_C']);
    assert.equal(data.pingInterval, 1000);
    assert.equal(data.pingTimeout, 3000);
    assert.ok(data.clientId, 'the server made a client id');
    assert.ok(!Number.isNaN(Date.parse(data.serverTime)));
  });

  test('in the Authorization header', async () => {
    const socket = await connected(server.url, {
      extraHeaders: { authorization: `Bearer ${server.token('alice')}` },
      query: { clientId: 'from-query' },
    });
    assert.equal(socket.connectedData.clientId, 'from-query');
  });

  test('in the token query parameter', async () => {
    const socket = await connected(server.url, { query: { token: server.token('alice') } });
    const pong = await socket.timeout(5000).emitWithAck('ping');
    assert.ok(pong.serverTime);
  });

  test('over polling only, in each form', async () => {
    for (const options of [
      { auth: { token: server.token('alice') } },
      { extraHeaders: { authorization: `Bearer ${server.token('alice')}` } },
      { query: { token: server.token('alice') } },
    ]) {
      const socket = await connected(server.url, { transports: ['polling'], ...options });
      assert.equal(socket.io.engine.transport.name, 'polling');
      socket.close();
    }
  });
});

describe('refusals are connect_error with the code', () => {
  test('no token: AUTH_FAILED', async () => {
    const error = await refused(server.url, {});
    assert.match(error.message, /^AUTH_FAILED: /);
  });

  test('a bad token: AUTH_FAILED', async () => {
    const error = await refused(server.url, { auth: { token: 'not-a-jwt' } });
    assert.match(error.message, /^AUTH_FAILED: /);
    const forged = mintToken({ tenantId: 'demo', userId: 'alice', secret: 'another-secret-0123456789abcdef' });
    assert.match((await refused(server.url, { auth: { token: forged } })).message, /^AUTH_FAILED: /);
  });

  test('an expired token: AUTH_FAILED', async () => {
    const expired = server.token('alice', { exp: Math.floor(Date.now() / 1000) - 3600 });
    const error = await refused(server.url, { auth: { token: expired } });
    assert.match(error.message, /^AUTH_FAILED: .*expired/i);
  });

  test("another tenant's X-Tenant-ID header: TENANT_VIOLATION, audited", async () => {
    const error = await refused(server.url, {
      auth: { token: server.token('mallory') },
      extraHeaders: { 'x-tenant-id': 'other-tenant' },
    });
    assert.match(error.message, /^TENANT_VIOLATION: /);
    // The same in auth (or the query): refused too.
    const viaAuth = await refused(server.url, { auth: { token: server.token('mallory'), tenantId: 'other-tenant' } });
    assert.match(viaAuth.message, /^TENANT_VIOLATION: /);
    // Its own tenant named: fine.
    await connected(server.url, { auth: { token: server.token('mallory') }, extraHeaders: { 'x-tenant-id': 'demo' } });
    // The audit log has the attempt (read by an admin of the tenant).
    const admin = server.token('root', { roles: ['admin'] });
    const { status, body } = await server.http('GET', '/api/admin/audit?limit=100', admin);
    assert.equal(status, 200);
    const violations = body.entries.filter((e) => e.action === 'security.tenant_violation' && e.actorId === 'mallory' && e.targetTenantId === 'other-tenant');
    assert.ok(violations.length >= 2, JSON.stringify(body.entries.map((e) => e.action)));
  });

  test('a token of the wrong type in auth: INVALID_REQUEST naming auth.token', async () => {
    const error = await refused(server.url, { auth: { token: 42 } });
    assert.match(error.message, /^INVALID_REQUEST: .*auth\.token/);
  });

  test('an unknown cursor: CURSOR_EXPIRED', async () => {
    const error = await refused(server.url, { auth: { token: server.token('alice'), lastEventId: 'no-such-event' } });
    assert.match(error.message, /^CURSOR_EXPIRED: /);
  });
});

test('a full server: SERVER_FULL, not an auth failure', async () => {
  const small = await startServer({ env: { WS_MAX_CONNECTIONS: '1' } });
  try {
    const first = await connected(small.url, { auth: { token: small.token('alice') } });
    const error = await refused(small.url, { auth: { token: small.token('bob') } });
    assert.match(error.message, /^SERVER_FULL: /);
    // The slot comes back when the first one leaves.
    first.close();
    await new Promise((r) => setTimeout(r, 300));
    await connected(small.url, { auth: { token: small.token('bob') } });
  } finally {
    closeAll();
    await small.destroy();
  }
});
