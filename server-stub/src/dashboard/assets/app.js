// The WebWaka Realtime dashboard: plain JS, no library, nothing loaded from elsewhere
// (the server's Content-Security-Policy forbids it). Data comes from
// /dashboard/api/stream (server-sent events); actions use the admin API.
'use strict';
(function () {
  const $ = (selector) => document.querySelector(selector);
  const KEEP_EVENTS = 500;
  const HISTORY = 300; // one point a second: five minutes
  const state = { token: '', tenant: '', justification: '', source: null, points: [], last: null, events: [] };

  function el(tag, text, cls) {
    const node = document.createElement(tag);
    if (text !== undefined && text !== null) node.textContent = String(text);
    if (cls) node.className = cls;
    return node;
  }
  function row(cells) {
    const tr = document.createElement('tr');
    for (const cell of cells) {
      const td = cell instanceof Node ? wrap(cell) : el('td', cell);
      tr.appendChild(td);
    }
    return tr;
  }
  function wrap(node) {
    if (node.tagName === 'TD') return node;
    const td = document.createElement('td');
    td.appendChild(node);
    return td;
  }
  function time(ms) {
    if (!ms) return '';
    const d = new Date(ms);
    return d.toLocaleTimeString();
  }
  function showError(text) {
    const box = $('#error');
    box.textContent = text || '';
    box.hidden = !text;
  }
  function authHeaders(tenant) {
    const headers = { Authorization: 'Bearer ' + state.token };
    if (tenant && tenant !== '*') headers['X-Tenant-ID'] = tenant;
    else if (state.tenant && state.tenant !== '*') headers['X-Tenant-ID'] = state.tenant;
    if (state.justification) headers['X-Admin-Justification'] = state.justification;
    return headers;
  }
  function params() {
    const p = new URLSearchParams();
    if (state.tenant) p.set('tenant', state.tenant);
    if (state.justification) p.set('justification', state.justification);
    return p;
  }

  // ---- Logging in: the link's fragment (#token=…), else the box.
  function readFragment() {
    if (!location.hash || location.hash.length < 2) return;
    const p = new URLSearchParams(location.hash.slice(1));
    if (p.get('token')) {
      sessionStorage.setItem('webwaka.token', p.get('token'));
      sessionStorage.setItem('webwaka.tenant', p.get('tenant') || '');
      sessionStorage.setItem('webwaka.justification', p.get('justification') || '');
    }
    // Off the address bar (and out of the history).
    history.replaceState(null, '', location.pathname);
  }
  function loadLogin() {
    state.token = sessionStorage.getItem('webwaka.token') || '';
    state.tenant = sessionStorage.getItem('webwaka.tenant') || '';
    state.justification = sessionStorage.getItem('webwaka.justification') || '';
  }
  function showLogin() {
    $('#login').hidden = false;
    $('#board').hidden = true;
    $('#logout').hidden = true;
  }

  async function start() {
    loadLogin();
    if (!state.token) { showLogin(); return; }
    let answer;
    try {
      const response = await fetch('/dashboard/api/session?' + params(), { headers: authHeaders() });
      answer = await response.json();
      if (!response.ok) {
        showError('Refused: ' + (answer.code || response.status) + ': ' + (answer.error || ''));
        $('#status').textContent = 'refused';
        $('#status').className = 'status down';
        showLogin();
        return;
      }
    } catch (e) {
      showError('The server cannot be reached: ' + e);
      setTimeout(start, 3000);
      return;
    }
    showError('');
    $('#login').hidden = true;
    $('#board').hidden = false;
    $('#logout').hidden = false;
    $('#who').textContent = answer.user + ' @ ' + answer.tenant + ' · watching ' + answer.scope + ' · ' + answer.engine + ' · instance ' + answer.instance;
    $('#chaos').hidden = !answer.chaos;
    connect();
  }

  function connect() {
    if (state.source) state.source.close();
    const p = params();
    p.set('token', state.token);
    const source = new EventSource('/dashboard/api/stream?' + p);
    state.source = source;
    source.addEventListener('open', () => { $('#status').textContent = 'live'; $('#status').className = 'status live'; });
    source.addEventListener('error', () => { $('#status').textContent = 'reconnecting…'; $('#status').className = 'status down'; });
    source.addEventListener('snapshot', (e) => snapshot(JSON.parse(e.data)));
    source.addEventListener('durable', (e) => durable(JSON.parse(e.data)));
    source.addEventListener('item', (e) => item(JSON.parse(e.data)));
    source.addEventListener('backlog', (e) => backlog(JSON.parse(e.data)));
    source.addEventListener('history', (e) => pastPoints(JSON.parse(e.data)));
    // The token ran out (or the chaos layer expired it): the server ended the feed.
    source.addEventListener('expired', () => {
      source.close();
      $('#status').textContent = 'token expired';
      $('#status').className = 'status down';
      showError('The token expired: log in again.');
      showLogin();
    });
    source.addEventListener('skipped', (e) => { $('#event-count').textContent = '(' + e.data + ' skipped: too many to show)'; });
  }

  // ---- Live facts.
  function snapshot(s) {
    const body = $('#connections tbody');
    body.replaceChildren();
    for (const c of s.connections) {
      const tr = row([
        c.tenant, c.user, c.clientId || '', c.transport === 'ws' ? '/ws' : c.transport,
        time(c.since), c.instance || '',
        frameCell(c.lastIn),
        frameCell(c.lastOut),
      ]);
      tr.dataset.user = c.user;
      tr.dataset.tenant = c.tenant;
      tr.dataset.transport = c.transport;
      tr.dataset.instance = c.instance || '';
      body.appendChild(tr);
    }
    const listed = s.totals.listed;
    $('#connection-count').textContent = listed > s.connections.length ? '(' + s.connections.length + ' of ' + listed + ' shown)' : '(' + s.connections.length + ')';
    const rooms = $('#rooms tbody');
    rooms.replaceChildren();
    for (const r of s.rooms) {
      const members = document.createElement('td');
      for (const m of r.members) {
        members.appendChild(el('span', m.user + ' · ' + String(m.status).toLowerCase(), 'tag' + (m.status === 'offline' ? '' : ' live')));
      }
      const tr = row([r.tenant, r.room, members]);
      tr.dataset.room = r.room;
      rooms.appendChild(tr);
    }
    chart(s);
    if (s.chaos) $('#chaos-state').textContent = JSON.stringify(s.chaos, null, 1);
  }

  // A frame, cut to a line or two (all of it on hover).
  function frameCell(frame) {
    if (!frame) return el('td', '', 'text');
    const text = frame.text.length > 160 ? frame.text.slice(0, 160) + '…' : frame.text;
    const td = el('td', time(frame.at) + ' ' + text, 'text');
    td.title = frame.text;
    return td;
  }

  // The last minutes before the page opened: the server's samples (every few
  // seconds), spread over one point a second. Skipped when the charts already run
  // (the feed opened again).
  function pastPoints(samples) {
    if (state.points.length > 0 || !Array.isArray(samples)) return;
    for (let i = 1; i < samples.length; i++) {
      const a = samples[i - 1], b = samples[i];
      const dt = Math.max(0.001, (b.at - a.at) / 1000);
      const point = {
        at: b.at,
        connections: b.connections,
        messages: Math.max(0, (b.messages - a.messages) / dt),
        polls: Math.max(0, (b.polls - a.polls) / dt),
        errors: Math.max(0, (b.errors - a.errors) / dt),
      };
      for (let k = 0; k < Math.min(10, Math.round(dt)); k++) state.points.push(point);
    }
    while (state.points.length > HISTORY) state.points.shift();
    for (const key of ['connections', 'messages', 'polls', 'errors']) {
      draw($('#chart-' + key), state.points.map((p) => p[key]));
    }
  }

  function chart(s) {
    const t = s.totals;
    const errors = Object.values(t.errors || {}).reduce((a, b) => a + b, 0);
    const point = { at: s.at, connections: t.listed, messages: 0, polls: 0, errors: 0 };
    if (state.last) {
      const dt = Math.max(0.001, (s.at - state.last.at) / 1000);
      point.messages = Math.max(0, (t.messages - state.last.messages) / dt);
      point.polls = Math.max(0, (t.polls - state.last.polls) / dt);
      point.errors = Math.max(0, (errors - state.last.errors) / dt);
    }
    state.last = { at: s.at, messages: t.messages, polls: t.polls, errors };
    state.points.push(point);
    if (state.points.length > HISTORY) state.points.shift();
    for (const key of ['connections', 'messages', 'polls', 'errors']) {
      draw($('#chart-' + key), state.points.map((p) => p[key]));
      $('#now-' + key).textContent = Math.round(point[key] * 10) / 10;
    }
    $('#errors-by-code').textContent = Object.entries(t.errors || {}).map(([k, v]) => k + ' ' + v).join(' · ');
  }

  function draw(canvas, values) {
    const g = canvas.getContext('2d');
    const w = canvas.width, h = canvas.height;
    g.clearRect(0, 0, w, h);
    const max = Math.max(1, ...values);
    canvas.dataset.points = values.length;
    canvas.dataset.peak = Math.max(0, ...values);
    g.strokeStyle = '#2d6cdf';
    g.lineWidth = 1.5;
    g.beginPath();
    values.forEach((v, i) => {
      const x = w - (values.length - 1 - i) * (w / HISTORY);
      const y = h - 4 - (v / max) * (h - 14);
      if (i === 0) g.moveTo(x, y); else g.lineTo(x, y);
    });
    g.stroke();
    g.fillStyle = '#677085';
    g.fillText(String(Math.round(max * 10) / 10), 2, 10);
  }

  // ---- The event log tail.
  // The log's newest events, oldest first, sent when the feed opens (again after a
  // reconnection): those already shown are skipped.
  function backlog(items) {
    if (!Array.isArray(items)) { showError('Storage: ' + items.error); return; }
    for (const e of items) item(e, false);
    renderEvents();
  }
  function item(e, render = true) {
    if (e.kind === 'event' && state.events.some((x) => x.kind === 'event' && x.tenant === e.tenant && x.seq === e.seq)) return;
    state.events.unshift(e);
    if (state.events.length > KEEP_EVENTS) state.events.pop();
    if (render) renderEvents();
  }
  function matches(e) {
    const f = (id) => $('#filter-' + id).value.trim();
    if (e.kind === 'live' && !$('#filter-live').checked) return false;
    if (f('tenant') && e.tenant !== f('tenant')) return false;
    if (f('type') && !typeOf(e).includes(f('type'))) return false;
    if (f('room') && e.room !== f('room')) return false;
    if (f('user')) {
      const u = f('user');
      const inRecipients = (e.recipients || []).some((r) => r.user === u);
      if (e.sender !== u && e.recipient !== u && !inRecipients && !(e.frame || '').includes('"senderId":"' + u + '"')) return false;
    }
    return true;
  }
  function renderEvents() {
    const body = $('#events tbody');
    body.replaceChildren();
    let shown = 0;
    for (const e of state.events) {
      if (!matches(e)) continue;
      shown += 1;
      const recipients = document.createElement('td');
      for (const r of e.recipients || []) {
        recipients.appendChild(el('span', r.user + ': ' + r.delivery, 'tag ' + (r.delivery.startsWith('live') ? 'live' : 'awaiting')));
      }
      if (e.everyone) recipients.appendChild(el('span', 'everyone', 'tag'));
      const live = e.kind === 'live';
      const sender = live ? senderOf(e.frame) : e.sender;
      const tr = row([live ? '—' : e.seq, time(e.at), e.tenant, typeOf(e), sender || '', e.room || '', recipients, el('td', live ? e.frame : e.body, 'text')]);
      tr.className = live ? 'event live-row' : 'event';
      body.appendChild(tr);
    }
    $('#event-count').textContent = '(' + shown + ' of ' + state.events.length + ')';
  }
  // The event's type and, for a message, its own type (`message · chat.message`); a
  // live message's type is in its frame.
  function typeOf(e) {
    if (e.kind === 'live') {
      const m = /"type":"([^"]*)"/.exec(e.frame || '');
      return 'CLASS_A (live, not stored)' + (m ? ' · ' + m[1] : '');
    }
    return (e.type || '') + (e.messageType ? ' · ' + e.messageType : '');
  }
  function senderOf(frame) {
    const m = /"senderId":"([^"]*)"/.exec(frame || '');
    return m ? m[1] : '';
  }

  // ---- Durable facts.
  function durable(d) {
    if (d.error) { showError('Storage: ' + d.error); return; }
    const groups = $('#groups tbody');
    groups.replaceChildren();
    const counts = {};
    for (const t of d.deliveries || []) {
      for (const c of t.counts) {
        const key = t.tenant + '/' + c.group;
        counts[key] = (counts[key] || '') + c.state + ' ' + c.events + ' (' + c.deliveries + ' deliveries) ';
      }
    }
    for (const g of d.groups) {
      const tr = row([g.tenant, g.group, g.lag, counts[g.tenant + '/' + g.group] || '']);
      tr.dataset.group = g.group;
      groups.appendChild(tr);
    }
    const leases = $('#leases tbody');
    leases.replaceChildren();
    for (const t of d.deliveries || []) {
      for (const o of t.open) {
        leases.appendChild(row([t.tenant, o.group, o.seq, o.eventId, o.state, o.consumerId || '', o.deliveryCount, o.leaseExpiresMs ? time(o.leaseExpiresMs) : '']));
      }
    }
    const dlq = $('#dlq tbody');
    dlq.replaceChildren();
    for (const entry of d.dlq) {
      const button = el('button', 'Replay', 'replay');
      button.type = 'button';
      button.dataset.dlqId = entry.dlqId;
      button.addEventListener('click', () => replay(entry.tenant, entry.dlqId));
      const tr = row([entry.tenant, entry.consumerInfo ? entry.consumerInfo.consumerGroup : '', entry.originalEvent ? entry.originalEvent.eventId : '', entry.retryCount, entry.failureReason, button]);
      tr.dataset.dlqId = entry.dlqId;
      dlq.appendChild(tr);
    }
    const txs = $('#transactions');
    txs.replaceChildren();
    for (const tx of d.transactions) {
      const box = el('div', null, 'tx');
      box.dataset.transactionId = tx.transactionId;
      box.appendChild(el('b', tx.transactionId));
      box.appendChild(el('span', ' ' + (tx.status || '?') + (tx.reason ? ' (' + tx.reason + ')' : '') + ' · ' + tx.tenant));
      const steps = document.createElement('ol');
      for (const a of tx.audit) steps.appendChild(el('li', time(Date.parse(a.timestamp)) + ' ' + a.action + ' by ' + a.actorId + ' (' + a.result + ', audit #' + a.sequence + ')'));
      box.appendChild(steps);
      txs.appendChild(box);
    }
    const audit = $('#audit tbody');
    audit.replaceChildren();
    for (const a of d.audit) audit.appendChild(row([a.sequence, time(Date.parse(a.timestamp)), a.actorId, a.action, a.resource + (a.resourceId ? ' ' + a.resourceId : ''), a.result]));
  }

  // ---- Actions.
  async function replay(tenant, dlqId) {
    const out = $('#dlq-result');
    try {
      const response = await fetch('/api/eventbus/dlq/' + encodeURIComponent(dlqId) + '/replay', { method: 'POST', headers: authHeaders(tenant) });
      const body = await response.json();
      out.textContent = response.ok ? 'replayed ' + body.eventId + ' to ' + body.consumerGroup : 'refused: ' + body.code + ': ' + body.error;
    } catch (e) {
      out.textContent = 'failed: ' + e;
    }
  }

  async function verifyAudit() {
    const out = $('#audit-result');
    out.textContent = 'verifying…';
    out.className = '';
    try {
      const response = await fetch('/dashboard/api/audit/verify?' + params(), { method: 'POST', headers: authHeaders() });
      const body = await response.json();
      if (!response.ok) { out.textContent = 'refused: ' + body.code + ': ' + body.error; return; }
      if (body.valid) {
        out.textContent = 'valid (' + body.entries + ' entries)';
        out.className = 'valid';
      } else {
        out.textContent = 'broken at entry ' + body.brokenAt + ': ' + body.problem;
        out.className = 'broken';
      }
    } catch (e) {
      out.textContent = 'failed: ' + e;
    }
  }

  async function chaos(method, path, body) {
    const headers = authHeaders();
    if (body) headers['Content-Type'] = 'application/json';
    const response = await fetch('/api/admin/chaos' + path, { method, headers, body: body ? JSON.stringify(body) : undefined });
    const answer = await response.json();
    $('#chaos-state').textContent = JSON.stringify(answer, null, 1);
    if (!response.ok) showError('Chaos: ' + answer.code + ': ' + answer.error);
  }
  function chaosSettings() {
    const number = (id) => Number($('#' + id).value) || 0;
    const settings = {
      refuseWebSocket: $('#chaos-refuse-ws').checked,
      reconcileTimeout: $('#chaos-reconcile-timeout').checked,
      latencyMs: number('chaos-latency'),
      jitterMs: number('chaos-jitter'),
    };
    if (number('chaos-drop-acks') > 0) settings.dropAcks = { fraction: number('chaos-drop-acks') };
    if (number('chaos-http-failures') > 0) settings.httpFailures = { fraction: number('chaos-http-failures'), status: number('chaos-http-status') };
    return settings;
  }

  document.addEventListener('DOMContentLoaded', () => {
    readFragment();
    $('#login-form').addEventListener('submit', (e) => {
      e.preventDefault();
      sessionStorage.setItem('webwaka.token', $('#login-token').value.trim());
      sessionStorage.setItem('webwaka.tenant', $('#login-tenant').value.trim());
      sessionStorage.setItem('webwaka.justification', $('#login-justification').value.trim());
      start();
    });
    $('#logout').addEventListener('click', () => {
      sessionStorage.clear();
      if (state.source) state.source.close();
      location.reload();
    });
    for (const id of ['tenant', 'type', 'user', 'room']) $('#filter-' + id).addEventListener('input', renderEvents);
    $('#filter-live').addEventListener('change', renderEvents);
    $('#verify-audit').addEventListener('click', verifyAudit);
    $('#chaos-form').addEventListener('submit', (e) => { e.preventDefault(); chaos('PUT', '', chaosSettings()); });
    $('#chaos-drop').addEventListener('click', () => {
      const user = $('#chaos-drop-user').value.trim();
      chaos('POST', '/drop-connections', user ? { userId: user } : undefined);
    });
    $('#chaos-expire').addEventListener('click', () => chaos('POST', '/expire-tokens'));
    $('#chaos-reset').addEventListener('click', () => chaos('DELETE', ''));
    start();
  });
})();
