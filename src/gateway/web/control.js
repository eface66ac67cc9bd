// Chitin control page. Talks to the gateway's JSON API under /api/v1 (docs/protocol.md).
// Two ways in: the gateway token (the owner; kept in sessionStorage only, shared with the
// chat page of this tab) or a browser session from single sign-on (`/auth/login`): an
// HttpOnly cookie the script never sees, plus the session's CSRF token (from
// `GET /auth/session`, kept in memory) on every request that changes something.
// Rules: everything the server sends is rendered with textContent (never as markup); ids from the
// server are used in URLs only through encodeURIComponent.
'use strict';

(function () {
  const $ = (id) => document.getElementById(id);
  const VIEWS = ['sessions', 'approvals', 'audit', 'policy', 'usage', 'channels', 'health'];
  const state = {
    auditBefore: null, auditRecord: null, recent: null, sessionsCursor: null,
    // The browser session (single sign-on): {user, csrf}, or null.
    web: null,
    // Whether `/auth/methods` was asked since the last refusal.
    probed: false,
  };

  function el(tag, cls, text) {
    const e = document.createElement(tag);
    if (cls) e.className = cls;
    if (text !== undefined && text !== null) e.textContent = String(text);
    return e;
  }

  function clear(node) {
    while (node.firstChild) node.removeChild(node.firstChild);
  }

  function showError(msg) {
    const e = $('error');
    e.textContent = msg ? String(msg) : '';
    e.hidden = !msg;
  }

  function token() {
    return sessionStorage.getItem('chitin.token') || '';
  }

  // Plain words for an API refusal or failure.
  function explainError(status, body) {
    const err = (body && body.error) || {};
    const msg = err.message || ('the gateway answered ' + status);
    if (status === 401) return 'Not signed in: ' + msg;
    if (status === 403 && err.code === 'policy_denied') {
      const ids = (err.policies || []).join(', ');
      return 'Refused by policy: ' + msg + (ids ? ' (policies: ' + ids + ')' : ' (no policy permits it)');
    }
    if (status === 429) return 'Too many failed sign-ins from this address; wait a little. ' + msg;
    if (status === 503) return 'The gateway cannot do this right now: ' + msg;
    return msg;
  }

  class ApiError extends Error {
    constructor(status, body) {
      super(explainError(status, body));
      this.status = status;
      this.body = body;
    }
  }

  function showLogin() {
    $('login').hidden = false;
    $('whoami').hidden = true;
  }

  function signedOut() {
    sessionStorage.removeItem('chitin.token');
    state.web = null;
    state.probed = false;
    showLogin();
  }

  // How this gateway lets a browser in, and whether this browser holds a session: the SSO
  // link is offered when single sign-on is configured; a session (or a trusted identity
  // proxy) is taken up without asking for the token.
  async function probe() {
    state.probed = true;
    let m;
    try {
      const resp = await fetch('/auth/methods', { cache: 'no-store', credentials: 'same-origin' });
      m = await resp.json();
    } catch (_) {
      return;
    }
    $('sso').hidden = !m.oidc;
    if (!m.session_cookie && !m.proxy) return;
    const resp = await fetch('/auth/session', { cache: 'no-store', credentials: 'same-origin' });
    let body = null;
    try { body = await resp.json(); } catch (_) { body = null; }
    if (resp.ok && body && body.csrf) {
      state.web = { user: body.user, csrf: body.csrf };
      $('whoami-user').textContent = 'Signed in as ' + body.user;
      $('whoami').hidden = false;
      return;
    }
    if (resp.status === 403 && body && body.error && body.error.code === 'device_pending') {
      showLogin();
      throw new Error('This browser waits for an owner\'s approval as a new device: ' + body.error.message);
    }
  }

  async function signOut() {
    if (state.web) {
      await raw('POST', '/auth/logout');
    }
    signedOut();
    showError('');
  }

  async function raw(method, path, body) {
    const headers = {};
    if (token()) headers.Authorization = 'Bearer ' + token();
    else if (state.web && method !== 'GET' && method !== 'HEAD') headers['X-CSRF-Token'] = state.web.csrf;
    const init = { method, headers, cache: 'no-store', credentials: 'same-origin' };
    if (body !== undefined) {
      headers['Content-Type'] = 'application/json';
      init.body = JSON.stringify(body);
    }
    let resp;
    try {
      resp = await fetch(path, init);
    } catch (e) {
      throw new ApiError(0, { error: { message: 'the gateway cannot be reached (' + e.message + ')' } });
    }
    if (resp.status === 401) signedOut();
    if (!resp.ok) {
      let parsed = null;
      try { parsed = await resp.json(); } catch (_) { parsed = null; }
      throw new ApiError(resp.status, parsed);
    }
    return resp;
  }

  async function api(method, path, body) {
    const resp = await raw(method, path, body);
    return resp.json();
  }

  // Runs an action, showing its failure in words.
  async function guarded(fn) {
    showError('');
    try {
      await fn();
    } catch (e) {
      showError(e.message || String(e));
    }
  }

  // Loads of one kind may overlap (opening a view loads it; a search or a click loads it
  // again before the first answer is in). Only the newest may render: an older answer that
  // arrives late, such as the unfiltered audit page behind a search, is dropped instead of
  // replacing the newer one. `newest(kind)` starts a load; the function it returns says
  // whether that load is still the newest of its kind.
  const loads = {};
  function newest(kind) {
    const n = (loads[kind] || 0) + 1;
    loads[kind] = n;
    return () => loads[kind] === n;
  }

  function button(text, cls, onClick) {
    const b = el('button', cls, text);
    b.type = 'button';
    b.addEventListener('click', () => guarded(onClick));
    return b;
  }

  function cell(tr, text) {
    tr.appendChild(el('td', null, text === null || text === undefined ? '' : text));
  }

  function money(v) {
    return (Number(v) || 0).toFixed(4);
  }

  // ---- views -------------------------------------------------------------------------

  function current() {
    const h = location.hash.replace('#', '');
    return VIEWS.includes(h) ? h : 'sessions';
  }

  async function show() {
    const v = current();
    for (const name of VIEWS) $('view-' + name).hidden = name !== v;
    for (const a of document.querySelectorAll('nav a[data-view]')) {
      if (a.dataset.view === v) a.setAttribute('aria-current', 'page');
      else a.removeAttribute('aria-current');
    }
    if (!token() && !state.web && !state.probed) await probe();
    if (!token() && !state.web) {
      showLogin();
      return;
    }
    $('login').hidden = true;
    await LOADERS[v]();
  }

  // ---- sessions ------------------------------------------------------------------------

  // The first page of sessions, or (more) the next one appended.
  async function loadSessions(more) {
    const p = new URLSearchParams({ limit: '50' });
    if (more && state.sessionsCursor) p.set('cursor', state.sessionsCursor);
    const fresh = newest('sessions');
    const data = await api('GET', '/api/v1/sessions?' + p.toString());
    if (!fresh()) return;
    const body = $('sessions-table').querySelector('tbody');
    if (!more) clear(body);
    for (const s of data.sessions) {
      const tr = el('tr');
      tr.dataset.key = s.key;
      const td = el('td');
      td.appendChild(button(s.key, 'link session-open', () => loadSession(s.key)));
      tr.appendChild(td);
      cell(tr, s.user);
      cell(tr, s.channel);
      cell(tr, s.last_activity);
      cell(tr, money(s.spend_usd));
      cell(tr, s.messages);
      cell(tr, s.tainted ? 'tainted' : '');
      body.appendChild(tr);
    }
    state.sessionsCursor = data.next;
    $('sessions-more').hidden = !data.next;
    $('sessions-empty').hidden = body.children.length > 0;
  }

  function messageText(m) {
    if (m.role === 'user') return (m.from ? m.from + ': ' : '') + m.text;
    if (m.role === 'assistant') {
      const calls = (m.tool_calls || []).map((c) => c.name);
      return m.text + (calls.length ? ' [calls ' + calls.join(', ') + ']' : '');
    }
    return m.tool + ': ' + m.decision + ' (' + m.outcome + ')';
  }

  async function loadSession(key) {
    const fresh = newest('session');
    const data = await api('GET', '/api/v1/sessions/' + encodeURIComponent(key));
    if (!fresh()) return;
    const s = data.session;
    $('session-title').textContent = 'Session ' + s.key + ' of ' + s.user + ' (' + s.channel + ')' + (s.tainted ? ', tainted' : '');
    const runs = $('session-runs');
    clear(runs);
    for (const r of data.runs) {
      const d = el('div', 'run');
      d.dataset.id = r.id;
      d.appendChild(el('p', 'run-head', 'Run ' + r.id + ': ' + r.status + ', ' + r.task + ', ' + (r.model || 'no model') + ', $' + money(r.cost_usd) + ', ' + r.input_tokens + '+' + r.output_tokens + ' tokens' + (r.error ? ', error: ' + r.error : '')));
      const ul = el('ul', 'calls');
      for (const c of r.tool_calls) {
        const li = el('li', 'tool');
        li.dataset.decision = c.decision || '';
        li.appendChild(el('span', 'tool-name', c.tool));
        li.appendChild(el('span', 'tool-decision', c.decision || 'no decision'));
        li.appendChild(el('span', 'tool-outcome', c.outcome || ''));
        if (c.arguments !== undefined) li.appendChild(el('code', 'tool-args', c.arguments));
        ul.appendChild(li);
      }
      d.appendChild(ul);
      runs.appendChild(d);
    }
    if (!data.runs.length) runs.appendChild(el('p', 'empty', 'No runs.'));
    const ol = $('session-messages');
    clear(ol);
    for (const e of data.messages) {
      const li = el('li', 'msg ' + e.message.role);
      li.appendChild(el('span', 'at', e.at + ' '));
      li.appendChild(el('span', 'text', messageText(e.message)));
      ol.appendChild(li);
    }
    $('session-detail').hidden = false;
  }

  // ---- approvals -----------------------------------------------------------------------

  function fieldsList(fields) {
    const dl = el('dl', 'fields');
    for (const f of fields) {
      dl.appendChild(el('dt', null, f.label));
      const dd = el('dd');
      const v = el('pre', 'field-value', f.complete ? f.value : f.head + ' … ' + f.tail);
      v.dataset.complete = String(!!f.complete);
      v.tabIndex = 0;
      dd.appendChild(v);
      dd.appendChild(el('span', 'field-meta', f.kind + ', ' + f.bytes + ' bytes, sha256 ' + f.sha256 + (f.complete ? '' : ' (abbreviated)')));
      dl.appendChild(dd);
    }
    return dl;
  }

  function approvalCard(a) {
    const li = el('li', 'approval');
    li.dataset.id = a.id;
    li.dataset.status = a.status;
    li.appendChild(el('span', 'code', a.code));
    li.appendChild(el('span', 'status', ' ' + a.status));
    li.appendChild(el('span', 'tool-name', ' ' + a.tool));
    li.appendChild(el('span', 'summary', a.summary));
    li.appendChild(el('span', 'who', 'Asked by ' + a.requester + ' in session ' + a.session + '; created ' + a.created_at + ', expires ' + a.expires_at + (a.resolved_by ? '; resolved by ' + a.resolved_by : '')));
    li.appendChild(fieldsList(a.fields));
    if (a.fields.some((f) => !f.complete)) {
      li.appendChild(button('Show everything', 'show-full', async () => {
        const d = await api('GET', '/api/v1/approvals/' + encodeURIComponent(a.id));
        li.replaceWith(approvalCard(d.approval));
      }));
    }
    if (a.status === 'pending') {
      li.appendChild(button('Approve', 'approve', () => resolveApproval(a, 'approve')));
      li.appendChild(button('Deny', 'deny', () => resolveApproval(a, 'deny')));
    }
    return li;
  }

  async function resolveApproval(a, decision) {
    const d = await api('POST', '/api/v1/approvals/' + encodeURIComponent(a.id) + '/resolve', { decision });
    clear($('approval-opened'));
    await loadApprovals();
    $('approvals-list').prepend(el('li', 'note', 'Approval ' + d.approval.code + (d.approval.granted ? ' approved.' : ' denied.')));
  }

  // One approval by its id (from a chat message, a colleague or the audit log), in full.
  async function openApproval() {
    const id = $('approval-id').value.trim();
    if (!id) throw new Error('Enter the approval\'s id (32 hex digits).');
    const d = await api('GET', '/api/v1/approvals/' + encodeURIComponent(id));
    const ul = $('approval-opened');
    clear(ul);
    ul.appendChild(approvalCard(d.approval));
  }

  async function loadApprovals() {
    const all = $('approvals-all').checked;
    const fresh = newest('approvals');
    const data = await api('GET', '/api/v1/approvals?status=' + (all ? 'all' : 'pending'));
    // What a person approves is shown whole: pending ones are loaded in full (at once), all
    // of them before the list is replaced (two loads must not interleave their cards).
    const cards = await Promise.all(data.approvals.map((a) => (a.status === 'pending'
      ? api('GET', '/api/v1/approvals/' + encodeURIComponent(a.id)).then((d) => d.approval)
      : a)));
    if (!fresh()) return;
    const list = $('approvals-list');
    clear(list);
    for (const a of cards) list.appendChild(approvalCard(a));
    $('approvals-empty').hidden = data.approvals.length > 0;
  }

  // ---- audit ---------------------------------------------------------------------------

  function auditQuery(before) {
    const p = new URLSearchParams();
    for (const [k, id] of [['actor', 'audit-actor'], ['action', 'audit-action'], ['decision', 'audit-decision'], ['outcome', 'audit-outcome'], ['since', 'audit-since'], ['limit', 'audit-limit']]) {
      const v = $(id).value.trim();
      if (v) p.set(k, v);
    }
    if (before) p.set('before', String(before));
    return '/api/v1/audit?' + p.toString();
  }

  async function loadAudit(more) {
    const fresh = newest('audit');
    const data = await api('GET', auditQuery(more ? state.auditBefore : null));
    if (!fresh()) return;
    const body = $('audit-table').querySelector('tbody');
    if (!more) clear(body);
    for (const r of data.records) {
      const tr = el('tr');
      tr.dataset.decision = r.decision;
      const td = el('td');
      td.appendChild(button(String(r.seq), 'link audit-open', () => loadAuditRecord(r.seq)));
      tr.appendChild(td);
      for (const v of [r.time, r.kind, r.actor, r.action, r.resource, r.decision + (r.policies.length ? ' [' + r.policies.join(', ') + ']' : ''), r.outcome]) cell(tr, v);
      body.appendChild(tr);
    }
    state.auditBefore = data.next_before;
    $('audit-more').hidden = !data.next_before;
  }

  async function loadAuditRecord(seq) {
    const fresh = newest('audit-record');
    const d = await api('GET', '/api/v1/audit/' + encodeURIComponent(seq));
    if (!fresh()) return;
    const pre = $('audit-detail');
    pre.textContent = JSON.stringify(d.record, null, 2);
    pre.hidden = false;
    state.auditRecord = d.record;
    $('audit-explain').hidden = !requestOf(d.record);
    pre.focus();
  }

  // The policy request a recorded decision was made for (its context as recorded, redacted).
  function requestOf(r) {
    if (!r || r.kind !== 'decision' || !r.payload || typeof r.payload.context !== 'object') return null;
    return {
      principal: r.actor,
      action: 'Chitin::Action::' + JSON.stringify(r.action),
      resource: r.resource,
      context: r.payload.context,
    };
  }

  function fillExplain(req) {
    $('explain-principal').value = req.principal;
    $('explain-action').value = req.action;
    $('explain-resource').value = req.resource;
    $('explain-context').value = JSON.stringify(req.context, null, 2);
  }

  async function loadRecentDecisions() {
    const fresh = newest('recent');
    const data = await api('GET', '/api/v1/audit?kind=decision&limit=30');
    if (!fresh()) return;
    const sel = $('explain-recent');
    clear(sel);
    state.recent = new Map();
    sel.appendChild(el('option', null, '(pick one)')).value = '';
    for (const r of data.records) {
      const req = requestOf(r);
      if (!req) continue;
      state.recent.set(String(r.seq), req);
      const o = el('option', null, '#' + r.seq + ' ' + r.decision + ': ' + r.actor + ' ' + r.action + ' ' + r.resource);
      o.value = String(r.seq);
      sel.appendChild(o);
    }
  }

  async function verifyAudit() {
    $('audit-verify-status').textContent = 'Verifying…';
    const v = await api('GET', '/api/v1/audit/verify');
    const cp = v.last_checkpoint ? ('last checkpoint at record ' + v.last_checkpoint.seq + ' (' + v.last_checkpoint.time + ')') : 'no checkpoint yet';
    $('audit-verify-status').textContent = (v.ok ? 'Chain verified: ' : 'TAMPERED: ') + v.summary + '; ' + cp;
    $('audit-verify-status').dataset.ok = String(v.ok);
  }

  async function exportAudit() {
    const resp = await raw('GET', '/api/v1/audit/export?format=jsonl');
    const blob = await resp.blob();
    const a = document.createElement('a');
    a.href = URL.createObjectURL(blob);
    a.download = 'chitin-audit.jsonl';
    document.body.appendChild(a);
    a.click();
    a.remove();
    setTimeout(() => URL.revokeObjectURL(a.href), 60000);
  }

  // ---- policy --------------------------------------------------------------------------

  async function loadPolicy() {
    const fresh = newest('policy');
    const p = await api('GET', '/api/v1/policy');
    if (!fresh()) return;
    $('policy-summary').textContent = p.enforced + ' enforced and ' + p.shadow + ' shadow policies from ' + p.source + ' (' + p.files.join(', ') + ')' + (p.warnings.length ? '; warnings: ' + p.warnings.join('; ') : '');
    const problem = p.reload_refused || p.last_reload_error;
    $('policy-reload-error').hidden = !problem;
    $('policy-reload-error').textContent = problem ? 'The last reload failed; the previous set stays active: ' + problem : '';
    const list = $('policy-list');
    clear(list);
    for (const x of p.policies) {
      const li = el('li', 'policy');
      li.dataset.id = x.id;
      li.dataset.mode = x.mode;
      li.appendChild(el('span', 'policy-id', x.id));
      li.appendChild(el('span', 'badge', x.effect + ', ' + x.mode));
      li.appendChild(el('span', 'reason', x.reason || '(no @reason)'));
      const det = el('details');
      det.appendChild(el('summary', null, 'Text (' + x.file + ')'));
      det.appendChild(el('pre', 'policy-text', x.text));
      li.appendChild(det);
      list.appendChild(li);
    }
  }

  async function runExplain() {
    let context;
    try {
      context = JSON.parse($('explain-context').value || '{}');
    } catch (e) {
      throw new Error('The context is not valid JSON: ' + e.message);
    }
    const fresh = newest('explain');
    const r = await api('POST', '/api/v1/policy/explain', {
      principal: $('explain-principal').value.trim(),
      action: $('explain-action').value.trim(),
      resource: $('explain-resource').value.trim(),
      context,
    });
    if (!fresh()) return;
    // The answer is `chitin policy explain --json`'s (docs/policy-tooling.md).
    $('explain-decision').textContent = r.decision;
    const forbids = r.policies.filter((x) => x.effect === 'forbid').map((x) => x.id);
    let change = '';
    if (r.decision === 'approval_required') change = 'Allowed only with a person\'s approval.';
    else if (r.decision === 'deny' && forbids.length) change = 'Denied by ' + forbids.join(', ') + '; one of them would have to change.';
    else if (r.decision === 'deny') change = 'No permit policy applies (deny by default).';
    if (r.decision !== 'allow') {
      change += r.would_allow.length ? ' It would be allowed if:' : ' No single context change would allow it.';
    }
    $('explain-change').textContent = change;
    const ul = $('explain-policies');
    clear(ul);
    for (const x of r.policies) ul.appendChild(el('li', 'determining', x.id + ' (' + x.effect + '): ' + (x.reason || '(no @reason)')));
    for (const x of r.shadow) ul.appendChild(el('li', 'shadow', 'shadow ' + x.id + ' would make it ' + (r.shadow_decision || '?') + ': ' + (x.reason || '(no @reason)')));
    const would = $('explain-would');
    clear(would);
    for (const c of r.would_allow) {
      const li = el('li', 'would', 'context.' + c.attribute + (c.derived ? ' (derived by Chitin)' : '') + ' were ' + JSON.stringify(c.to) + ' (not ' + JSON.stringify(c.from) + '): ' + c.decision + (c.policies.length ? ' by ' + c.policies.map((x) => x.id).join(', ') : ''));
      li.dataset.attribute = c.attribute;
      would.appendChild(li);
    }
    const errs = $('explain-errors');
    clear(errs);
    for (const e of r.errors) errs.appendChild(el('li', null, e));
    $('explain-result').hidden = false;
  }

  async function loadShadow() {
    const days = $('shadow-days').value || '7';
    const fresh = newest('shadow');
    const r = await api('GET', '/api/v1/policy/shadow?days=' + encodeURIComponent(days));
    if (!fresh()) return;
    const ul = $('shadow-list');
    clear(ul);
    for (const x of r.policies) ul.appendChild(el('li', null, x.id + ': would deny ' + x.would_deny + ', would allow ' + x.would_allow));
    for (const x of r.latest) ul.appendChild(el('li', 'latest', '#' + x.seq + ' ' + x.time + ' ' + x.actor + ' ' + x.action + ' ' + x.resource + ': ' + x.outcome));
    $('shadow-empty').hidden = r.policies.length > 0;
  }

  // ---- usage ---------------------------------------------------------------------------

  async function loadUsage() {
    const p = new URLSearchParams({ by: $('usage-by').value });
    const since = $('usage-since').value.trim();
    if (since) p.set('since', since);
    const fresh = newest('usage');
    const r = await api('GET', '/api/v1/usage?' + p.toString());
    if (!fresh()) return;
    $('usage-key').textContent = r.by;
    $('usage-total').textContent = 'Total: $' + money(r.total.cost_usd) + ' over ' + r.total.calls + ' model calls in ' + r.total.runs + ' runs' + (r.since ? ' since ' + r.since : '') + (r.total.unpriced_calls ? ' (' + r.total.unpriced_calls + ' calls of models without a price)' : '');
    const body = $('usage-table').querySelector('tbody');
    clear(body);
    for (const g of r.groups) {
      const tr = el('tr');
      cell(tr, g.key === null ? '(none)' : g.key);
      cell(tr, money(g.cost_usd));
      cell(tr, g.calls);
      cell(tr, g.runs);
      cell(tr, g.input_tokens);
      cell(tr, g.output_tokens);
      cell(tr, g.unpriced_calls);
      body.appendChild(tr);
    }
    const ul = $('usage-budgets');
    clear(ul);
    for (const b of r.budgets) ul.appendChild(el('li', null, b.user + ': $' + money(b.spent_today_usd) + (b.daily_limit_usd === null ? ' (no limit)' : ' of $' + money(b.daily_limit_usd))));
  }

  // ---- channels and pairing ------------------------------------------------------------

  async function loadChannels() {
    const fresh = newest('channels');
    const r = await api('GET', '/api/v1/pairing');
    if (!fresh()) return;
    const cl = $('channels-list');
    clear(cl);
    for (const c of r.channels) {
      const li = el('li', 'channel');
      const st = c.connected === null ? 'not reported' : (c.connected ? 'connected' : 'disconnected');
      li.appendChild(el('span', 'name', c.channel + ' (' + c.kind + '): ' + st));
      if (c.connection_error) li.appendChild(el('span', 'problem', ' ' + c.connection_error));
      li.appendChild(el('span', 'meta', ' last event ' + (c.last_event_at || 'never') + ', ' + c.queued + ' queued, ' + c.failed + ' failed, ' + c.dead + ' dead letters'));
      cl.appendChild(li);
    }
    $('channels-empty').hidden = r.channels.length > 0;
    const pl = $('pairing-list');
    clear(pl);
    for (const q of r.requests) {
      const li = el('li', 'pairing');
      li.appendChild(el('span', 'code', q.code));
      li.appendChild(el('span', 'summary', ' ' + q.identity + ' on ' + q.channel + ', expires ' + q.expires_at));
      const user = el('input', 'pair-user');
      user.placeholder = 'user (default: you)';
      user.setAttribute('aria-label', 'Pair with user');
      li.appendChild(user);
      li.appendChild(button('Approve', 'approve', async () => {
        const body = { decision: 'approve' };
        if (user.value.trim()) body.user = user.value.trim();
        await api('POST', '/api/v1/pairing/' + encodeURIComponent(q.code) + '/resolve', body);
        await loadChannels();
      }));
      li.appendChild(button('Deny', 'deny', async () => {
        await api('POST', '/api/v1/pairing/' + encodeURIComponent(q.code) + '/resolve', { decision: 'deny' });
        await loadChannels();
      }));
      pl.appendChild(li);
    }
    $('pairing-empty').hidden = r.requests.length > 0;
    const dl = $('devices-list');
    clear(dl);
    for (const d of r.devices || []) {
      const li = el('li', 'device');
      li.dataset.id = d.id;
      li.dataset.status = d.status;
      li.appendChild(el('span', 'code', d.id));
      li.appendChild(el('span', 'status', ' ' + d.status));
      li.appendChild(el('span', 'summary', ' ' + d.user + ' from ' + d.client + (d.user_agent ? ' (' + d.user_agent + ')' : '') + ', since ' + d.created_at + (d.decided_by ? '; decided by ' + d.decided_by + ' at ' + d.decided_at : '')));
      const decide = (decision) => async () => {
        const x = await api('POST', '/api/v1/devices/' + encodeURIComponent(d.id) + '/resolve', { decision });
        await loadChannels();
        $('devices-list').prepend(el('li', 'note', 'Device ' + x.device.id + ' of ' + x.device.user + ' is ' + x.device.status + '.'));
      };
      if (d.status === 'pending') {
        li.appendChild(button('Approve', 'approve', decide('approve')));
        li.appendChild(button('Deny', 'deny', decide('deny')));
      } else if (d.status === 'approved') {
        li.appendChild(button('Revoke', 'deny', decide('deny')));
      }
      dl.appendChild(li);
    }
    $('devices-empty').hidden = (r.devices || []).length > 0;
  }

  // ---- health --------------------------------------------------------------------------

  async function loadHealth() {
    const fresh = newest('health');
    const h = await api('GET', '/api/v1/health');
    if (!fresh()) return;
    const up = Math.floor(h.uptime_secs / 3600) + ' h ' + Math.floor((h.uptime_secs % 3600) / 60) + ' min';
    $('health-summary').textContent = (h.ready ? 'Ready' : 'NOT ready') + '. Chitin ' + h.version + ', up ' + up + ' (since ' + h.started_at + '). Sandbox: ' + (h.sandbox.enforced ? 'fully enforced' : 'NOT enforced') + ' (' + h.sandbox.detail + '). Retention: ' + (h.retention.interval_minutes ? 'every ' + h.retention.interval_minutes + ' min, last run ' + (h.retention.last_run || 'never') + (h.retention.lag_ms ? ', behind by ' + Math.round(h.retention.lag_ms / 60000) + ' min' : '') : 'off') + '. Backups: ' + (h.backup.configured ? 'every ' + h.backup.interval_hours + ' h, last ' + (h.backup.last_run || 'never') : 'not configured') + '.';
    $('health-summary').dataset.ready = String(h.ready);
    const ul = $('health-checks');
    clear(ul);
    for (const [name, c] of Object.entries(h.checks)) {
      const li = el('li', 'check');
      li.dataset.ok = String(c.ok);
      li.appendChild(el('span', 'name', name + ': ' + (c.ok ? 'ok' : 'PROBLEM')));
      li.appendChild(el('span', 'detail', ' ' + c.detail));
      ul.appendChild(li);
    }
  }

  const LOADERS = {
    sessions: () => loadSessions(false),
    approvals: loadApprovals,
    audit: () => loadAudit(false),
    policy: loadPolicy,
    usage: loadUsage,
    channels: loadChannels,
    health: loadHealth,
  };

  function signIn() {
    const t = $('token').value.trim();
    if (!t) {
      showError('Enter the gateway token (`chitin token show` prints it).');
      return;
    }
    sessionStorage.setItem('chitin.token', t);
    $('token').value = '';
    guarded(show);
  }

  document.addEventListener('DOMContentLoaded', () => {
    $('signin').addEventListener('click', signIn);
    $('token').addEventListener('keydown', (e) => { if (e.key === 'Enter') signIn(); });
    for (const b of document.querySelectorAll('button.reload')) {
      b.addEventListener('click', () => guarded(LOADERS[b.dataset.reload]));
    }
    $('approvals-all').addEventListener('change', () => guarded(loadApprovals));
    $('sessions-more').addEventListener('click', () => guarded(() => loadSessions(true)));
    $('approval-open').addEventListener('click', () => guarded(openApproval));
    $('audit-search').addEventListener('click', () => guarded(() => loadAudit(false)));
    $('audit-more').addEventListener('click', () => guarded(() => loadAudit(true)));
    $('audit-verify').addEventListener('click', () => guarded(verifyAudit));
    $('audit-export').addEventListener('click', () => guarded(exportAudit));
    $('explain-run').addEventListener('click', () => guarded(runExplain));
    $('explain-recent-load').addEventListener('click', () => guarded(loadRecentDecisions));
    $('explain-recent').addEventListener('change', () => {
      const req = state.recent && state.recent.get($('explain-recent').value);
      if (req) fillExplain(req);
    });
    $('audit-explain').addEventListener('click', () => {
      const req = requestOf(state.auditRecord);
      if (!req) return;
      fillExplain(req);
      location.hash = '#policy';
      guarded(runExplain);
    });
    $('shadow-load').addEventListener('click', () => guarded(loadShadow));
    $('usage-load').addEventListener('click', () => guarded(loadUsage));
    $('signout').addEventListener('click', () => guarded(signOut));
    window.addEventListener('hashchange', () => guarded(show));
    guarded(show);
  });
})();
