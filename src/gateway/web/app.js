// Chitin web chat. Talks the gateway's WebSocket protocol (docs/protocol.md).
// Rules: the token lives in sessionStorage only; everything the server sends is rendered with
// textContent (never as markup); ids from the server are used as Map keys, never in selectors.
'use strict';

(function () {
  const $ = (id) => document.getElementById(id);
  const state = {
    ws: null,
    nextId: 1,
    pending: new Map(), // request id -> {resolve, reject}
    session: sessionStorage.getItem('chitin.session'),
    runs: new Map(), // run_id -> {segments: [msg], text: span of the open segment or null, finished}
    tools: new Map(), // call_id -> element
    approvals: new Map(), // approval id -> element
    noted: new Set(), // approval ids whose resolution was shown
    // Reconnecting: the timer, the attempt number, whether the person disconnected or the
    // gateway refused the token (then the page does not retry by itself).
    retryTimer: null,
    attempt: 0,
    stop: false,
    everConnected: false,
    // The browser holds a session from single sign-on (an HttpOnly cookie sent with the
    // WebSocket upgrade): `connect` then needs no token.
    cookie: false,
  };

  // What the page says when the connection ends, by WebSocket close code.
  function closeReason(ev) {
    if (ev.code === 1001) return 'the gateway restarted or is stopping';
    if (ev.code === 1008) return 'the gateway closed the connection (' + (ev.reason || 'policy') + ')';
    if (ev.code === 1009) return 'a message was too large for the gateway';
    if (ev.code === 1006) return 'the connection to the gateway was lost (the gateway stopped, or the network)';
    return 'the connection closed (' + ev.code + (ev.reason ? ' ' + ev.reason : '') + ')';
  }

  // Refusals of `connect` that retrying with the same token cannot fix.
  function refusalText(e) {
    if (e.code === 'rate_limited') {
      return 'Locked out: too many failed token attempts from this address. Wait a few minutes (the gateway\'s [gateway] auth_lockout_secs), then connect with the right token.';
    }
    if (e.code === 'unauthorized') {
      return String(e.message || 'the token was refused') + ' — paste the current token (`chitin token show`).';
    }
    return 'Refused: ' + String(e.message || e.code);
  }

  function scheduleReconnect(why) {
    if (state.stop || (!sessionStorage.getItem('chitin.token') && !state.cookie)) {
      setStatus('disconnected', 'disconnected');
      showError('Disconnected: ' + why + '.');
      return;
    }
    const delay = Math.min(30, Math.pow(2, state.attempt));
    state.attempt += 1;
    setStatus('reconnecting in ' + delay + ' s', 'reconnecting');
    showError('Disconnected: ' + why + '. Reconnecting by itself in ' + delay + ' s (attempt ' + state.attempt + ').');
    clearTimeout(state.retryTimer);
    state.retryTimer = setTimeout(() => connect(true), delay * 1000);
  }

  function el(tag, cls, text) {
    const e = document.createElement(tag);
    if (cls) e.className = cls;
    if (text !== undefined && text !== null) e.textContent = String(text);
    return e;
  }

  function setStatus(text, st) {
    const s = $('status');
    s.textContent = text;
    s.dataset.state = st;
  }

  function showError(msg) {
    const e = $('error');
    if (!msg) {
      e.hidden = true;
      e.textContent = '';
      return;
    }
    e.textContent = String(msg);
    e.hidden = false;
  }

  function setSession(s) {
    state.session = s || null;
    if (state.session) sessionStorage.setItem('chitin.session', state.session);
    $('session').textContent = state.session ? 'session ' + state.session : '';
  }

  function scroll() {
    const m = $('messages');
    m.scrollTop = m.scrollHeight;
  }

  function append(node) {
    $('messages').appendChild(node);
    scroll();
  }

  function request(method, params) {
    return new Promise((resolve, reject) => {
      if (!state.ws || state.ws.readyState !== WebSocket.OPEN) {
        reject({ code: 'closed', message: 'not connected' });
        return;
      }
      const id = String(state.nextId++);
      state.pending.set(id, { resolve, reject });
      state.ws.send(JSON.stringify({ type: 'req', id, method, params: params || {} }));
    });
  }

  function setConnected(on) {
    $('input').disabled = !on;
    $('send').disabled = !on;
    $('connect').hidden = on;
    $('disconnect').hidden = !on;
    $('token').disabled = on;
  }

  function connect(retry) {
    clearTimeout(state.retryTimer);
    state.retryTimer = null;
    if (retry !== true) {
      state.attempt = 0;
      state.stop = false;
      showError('');
    }
    const typed = $('token').value.trim();
    const token = typed || sessionStorage.getItem('chitin.token') || '';
    if (!token && !state.cookie) {
      showError('Enter the gateway token (`chitin token show` prints it).');
      return;
    }
    $('token').value = '';
    if (state.ws) state.ws.close();
    const url = (location.protocol === 'https:' ? 'wss://' : 'ws://') + location.host + '/ws';
    let ws;
    try {
      ws = new WebSocket(url);
    } catch (e) {
      showError('Cannot open the WebSocket: ' + e);
      return;
    }
    state.ws = ws;
    setStatus('connecting', 'connecting');
    ws.addEventListener('open', () => {
      const params = { client: { name: 'chitin-web' } };
      if (token) params.token = token;
      request('connect', params).then(
        (p) => {
          if (token) sessionStorage.setItem('chitin.token', token);
          const again = state.attempt > 0;
          state.attempt = 0;
          state.everConnected = true;
          setStatus('connected as ' + p.user, 'connected');
          setConnected(true);
          setSession(state.session);
          showError('');
          if (again) append(el('div', 'msg system', 'Reconnected.'));
          if (!p.agent) {
            showError('No agent is configured on this gateway (set [agent] model and [[providers]] in chitin.toml); approvals still work here.');
          }
          loadApprovals();
          loadPairings();
          if (state.session) loadHistory();
        },
        (e) => {
          if (e.code === 'closed') return; // the close handler says why
          // The token is wrong, the session ended (or this address is locked out): retrying
          // cannot help.
          sessionStorage.removeItem('chitin.token');
          state.cookie = false;
          state.stop = true;
          setStatus(e.code === 'rate_limited' ? 'locked out' : 'refused', 'error');
          showError(refusalText(e));
        },
      );
    });
    ws.addEventListener('message', (m) => onFrame(ws, m.data));
    ws.addEventListener('close', (ev) => {
      if (state.ws !== ws) return;
      state.ws = null;
      setConnected(false);
      for (const p of state.pending.values()) p.reject({ code: 'closed', message: 'connection closed' });
      state.pending.clear();
      if ($('status').dataset.state === 'error') return; // refused: already said why
      scheduleReconnect(closeReason(ev));
    });
  }

  function disconnect() {
    state.stop = true;
    clearTimeout(state.retryTimer);
    sessionStorage.removeItem('chitin.token');
    if (state.ws) state.ws.close();
    else setStatus('disconnected', 'disconnected');
  }

  function onFrame(ws, data) {
    if (state.ws !== ws || typeof data !== 'string') return;
    let f;
    try {
      f = JSON.parse(data);
    } catch (e) {
      return;
    }
    if (!f || typeof f !== 'object') return;
    if (f.type === 'res') {
      const p = state.pending.get(String(f.id));
      if (!p) {
        if (!f.ok && f.error) showError(f.error.message || f.error.code);
        return;
      }
      state.pending.delete(String(f.id));
      if (f.ok) p.resolve(f.payload || {});
      else p.reject(f.error || { code: 'error', message: 'request failed' });
    } else if (f.type === 'event') {
      onEvent(String(f.event), f.payload || {});
    }
  }

  function mine(p) {
    return !state.session || p.session === state.session || state.runs.has(p.run_id);
  }

  // A run's answer is shown as text segments between its tool cards, in the order things
  // happened: a tool call closes the open segment, the next text opens a new one after it.
  function runEl(runId) {
    let r = state.runs.get(runId);
    if (!r) {
      r = { segments: [], text: null, finished: false };
      state.runs.set(runId, r);
    }
    return r;
  }

  function openText(runId) {
    const r = runEl(runId);
    if (!r.text) {
      const msg = el('div', 'msg assistant');
      msg.dataset.runId = String(runId);
      if (r.segments.length) msg.classList.add('continued');
      const text = el('span', 'text');
      msg.appendChild(text);
      r.segments.push(msg);
      r.text = text;
      append(msg);
    }
    return r.text;
  }

  function onEvent(name, p) {
    switch (name) {
      case 'run.started':
        if (mine(p)) runEl(p.run_id);
        break;
      case 'assistant.delta':
        if (mine(p)) {
          openText(p.run_id).textContent += String(p.text == null ? '' : p.text);
          scroll();
        }
        break;
      case 'tool.start':
        if (mine(p)) toolStart(p);
        break;
      case 'tool.end':
        if (mine(p)) toolEnd(p);
        break;
      case 'approval.requested':
        addApproval(p.approval || {}, p);
        break;
      case 'approval.resolved':
        approvalResolved(p);
        break;
      case 'run.finished':
        if (mine(p)) runFinished(p);
        break;
      case 'events.lagged':
        append(el('div', 'msg system', 'Some events were missed (' + p.missed + '); reload the history.'));
        break;
      default:
        break;
    }
  }

  function toolStart(p) {
    // The text so far ends here; what the model writes after the call goes below the card.
    if (state.runs.has(p.run_id)) state.runs.get(p.run_id).text = null;
    const t = el('div', 'tool');
    t.dataset.callId = String(p.call_id);
    t.dataset.runId = String(p.run_id);
    t.dataset.decision = 'pending';
    t.appendChild(el('span', 'tool-name', p.tool));
    t.appendChild(el('span', 'tool-decision', '…'));
    let args = '';
    try {
      args = JSON.stringify(p.args);
    } catch (e) {
      args = '';
    }
    if (args && args.length > 600) args = args.slice(0, 600) + '…';
    t.appendChild(el('span', 'tool-args', args));
    t.appendChild(el('span', 'tool-outcome', ''));
    state.tools.set(String(p.call_id), t);
    append(t);
  }

  function toolEnd(p) {
    let t = state.tools.get(String(p.call_id));
    if (!t) {
      toolStart(p);
      t = state.tools.get(String(p.call_id));
    }
    const decision = String(p.decision);
    t.dataset.decision = decision;
    t.querySelector('.tool-decision').textContent = decision;
    let outcome = p.outcome;
    if (outcome && typeof outcome === 'object') outcome = JSON.stringify(outcome);
    const pol = Array.isArray(p.policies) && p.policies.length ? ' [' + p.policies.join(', ') + ']' : '';
    t.querySelector('.tool-outcome').textContent = String(outcome == null ? '' : outcome) + pol;
  }

  function runFinished(p) {
    const r = runEl(p.run_id);
    r.finished = true;
    const shown = r.segments.some((m) => m.textContent);
    if (p.reply && !shown) openText(p.run_id).textContent = String(p.reply);
    if (!r.segments.length) openText(p.run_id);
    for (const m of r.segments) m.dataset.status = String(p.status);
    if (p.error) r.segments[r.segments.length - 1].appendChild(el('span', 'error', p.error));
    r.text = null;
    scroll();
  }

  function refreshNoApprovals() {
    $('no-approvals').hidden = state.approvals.size > 0;
  }

  function addApproval(a, ctx) {
    const id = String(a.id);
    if (!a.id || state.approvals.has(id)) return;
    const li = el('li', 'approval');
    li.dataset.id = id;
    li.dataset.code = String(a.code);
    const head = el('div');
    head.appendChild(el('span', 'code', a.code));
    head.appendChild(el('span', 'approval-tool', ' ' + String(a.tool)));
    li.appendChild(head);
    li.appendChild(el('span', 'summary', a.summary));
    addFields(li, id, a.fields);
    if (a.expires_at) li.appendChild(el('small', 'expires', 'expires ' + a.expires_at));
    if (ctx && ctx.session) li.title = 'session ' + ctx.session;
    const approve = el('button', 'approve', 'Approve');
    approve.type = 'button';
    const deny = el('button', 'deny', 'Deny');
    deny.type = 'button';
    approve.addEventListener('click', () => resolveApproval(li, id, 'approve'));
    deny.addEventListener('click', () => resolveApproval(li, id, 'deny'));
    li.appendChild(approve);
    li.appendChild(deny);
    state.approvals.set(id, li);
    $('approvals').appendChild(li);
    refreshNoApprovals();
  }

  function fieldMeta(f) {
    return String(f.bytes) + ' bytes, sha256 ' + String(f.sha256);
  }

  // Fills one field's value box: the whole value, or its head and tail when the server sent
  // an abbreviation. Text only (textContent), never markup.
  function fillField(row, f) {
    if (f.complete) {
      row.value.textContent = String(f.value == null ? '' : f.value);
      row.value.dataset.complete = 'true';
      row.meta.textContent = f.kind === 'text' ? fieldMeta(f) : String(f.kind);
    } else {
      row.value.textContent = String(f.head) + ' … ' + String(f.tail);
      row.value.dataset.complete = 'false';
      row.meta.textContent = fieldMeta(f) + ' (abbreviated)';
    }
  }

  // Every argument the approval binds (the server's `fields`), each labelled; large values
  // abbreviated with a button that loads the full text (approvals.show).
  function addFields(li, id, fields) {
    if (!Array.isArray(fields) || !fields.length) return;
    const dl = el('dl', 'fields');
    const rows = new Map(); // field path -> {value, meta}
    for (const f of fields) {
      if (!f || typeof f !== 'object') continue;
      dl.appendChild(el('dt', 'field-label', f.label));
      const dd = el('dd', 'field');
      dd.dataset.kind = String(f.kind);
      const row = { value: el('pre', 'field-value'), meta: el('small', 'field-meta') };
      dd.appendChild(row.value);
      dd.appendChild(row.meta);
      dl.appendChild(dd);
      rows.set(String(f.path), row);
      fillField(row, f);
    }
    li.appendChild(dl);
    if (!fields.some((f) => f && f.complete === false)) return;
    const more = el('button', 'show-full', 'Show full text');
    more.type = 'button';
    more.addEventListener('click', () => {
      more.disabled = true;
      request('approvals.show', { id }).then(
        (p) => {
          const full = (p.approval && p.approval.fields) || [];
          for (const f of full) {
            const row = f && rows.get(String(f.path));
            if (row) fillField(row, f);
          }
          more.remove();
        },
        (e) => {
          more.disabled = false;
          showError('Approval not loaded: ' + (e.message || e.code));
        },
      );
    });
    li.appendChild(more);
  }

  function removeApproval(id) {
    const li = state.approvals.get(id);
    if (li) {
      li.remove();
      state.approvals.delete(id);
    }
    refreshNoApprovals();
  }

  function resolveApproval(li, id, decision) {
    for (const b of li.querySelectorAll('button')) b.disabled = true;
    request('approvals.resolve', { id, decision }).then(
      (p) => approvalResolved(p),
      (e) => {
        for (const b of li.querySelectorAll('button')) b.disabled = false;
        showError('Approval not resolved: ' + (e.message || e.code));
      },
    );
  }

  // From our own approvals.resolve answer or from the approval.resolved event (whichever
  // comes first; either may also come from another client or the CLI).
  function approvalResolved(p) {
    const id = String(p.approval_id);
    const known = state.approvals.has(id);
    removeApproval(id);
    if (known && !state.noted.has(id)) {
      state.noted.add(id);
      const verb = p.granted ? 'approved' : 'denied';
      append(el('div', 'msg system', 'Approval ' + String(p.code) + ' ' + verb + ' by ' + String(p.by) + '.'));
    }
  }

  // The server's list replaces ours (approvals resolved elsewhere, e.g. the CLI, disappear).
  function loadApprovals() {
    request('approvals.list').then(
      (p) => {
        const list = p.approvals || [];
        const ids = new Set(list.map((a) => String(a.id)));
        for (const id of Array.from(state.approvals.keys())) if (!ids.has(id)) removeApproval(id);
        for (const a of list) addApproval(a, a);
      },
      (e) => {
        if (e.code !== 'not_configured') showError('Approvals not loaded: ' + (e.message || e.code));
      },
    );
  }

  // Pairing requests (pairing.list / pairing.resolve): who asked, from which channel and
  // chat, until when; text only. Approving pairs the identity with the connected user.
  function loadPairings() {
    request('pairing.list').then(
      (p) => {
        const list = p.requests || [];
        const ul = $('pairings');
        ul.replaceChildren();
        for (const r of list) ul.appendChild(pairingItem(r));
        $('no-pairings').hidden = list.length > 0;
        $('no-pairings').textContent = 'None.';
      },
      (e) => {
        $('pairings').replaceChildren();
        $('no-pairings').hidden = false;
        // not_configured: no channel; forbidden: this user may not decide pairings.
        $('no-pairings').textContent =
          e.code === 'not_configured' || e.code === 'forbidden' ? String(e.message || e.code) : 'Not loaded: ' + String(e.message || e.code);
      },
    );
  }

  function pairingItem(r) {
    const li = el('li', 'pairing');
    const head = el('div');
    head.appendChild(el('span', 'code', r.code));
    head.appendChild(el('span', 'pairing-identity', ' ' + String(r.identity)));
    li.appendChild(head);
    li.appendChild(el('span', 'summary', 'channel ' + String(r.channel) + ', chat ' + String(r.chat_id) + '; approving pairs this identity with you'));
    if (r.expires_at) li.appendChild(el('small', 'expires', 'expires ' + r.expires_at));
    for (const decision of ['approve', 'deny']) {
      const b = el('button', decision, decision === 'approve' ? 'Approve' : 'Deny');
      b.type = 'button';
      b.addEventListener('click', () => {
        for (const x of li.querySelectorAll('button')) x.disabled = true;
        request('pairing.resolve', { code: String(r.code), decision }).then(
          (p) => {
            const q = p.request || {};
            append(el('div', 'msg system', 'Pairing ' + String(q.code) + ' (' + String(q.identity) + ') ' + (decision === 'approve' ? 'approved' : 'denied') + '.'));
            loadPairings();
          },
          (e) => {
            for (const x of li.querySelectorAll('button')) x.disabled = false;
            showError('Pairing not resolved: ' + (e.message || e.code));
            loadPairings();
          },
        );
      });
      li.appendChild(b);
    }
    return li;
  }

  function loadHistory() {
    request('chat.history', { session: state.session, limit: 50 }).then(
      (p) => {
        $('messages').replaceChildren();
        state.runs.clear();
        state.tools.clear();
        for (const m of p.messages || []) {
          let e;
          if (m.role === 'tool') {
            // A tool call where it happened, between the texts of its run.
            e = el('div', 'tool history');
            e.appendChild(el('span', 'tool-outcome', m.text));
          } else {
            const role = m.role === 'user' ? 'user' : m.role === 'assistant' ? 'assistant' : 'system';
            e = el('div', 'msg ' + role, m.text);
          }
          if (m.run_id) e.dataset.runId = String(m.run_id);
          append(e);
        }
      },
      (e) => {
        if (e.code === 'not_found') setSession(null);
      },
    );
  }

  function send() {
    const input = $('input');
    const text = input.value;
    if (!text.trim()) return;
    showError('');
    input.value = '';
    append(el('div', 'msg user', text));
    const params = { text };
    if (state.session) params.session = state.session;
    request('chat.send', params).then(
      (p) => {
        setSession(p.session);
        runEl(p.run_id);
      },
      (e) => showError(e.message || e.code),
    );
  }

  function init() {
    $('connect').addEventListener('click', connect);
    $('disconnect').addEventListener('click', disconnect);
    $('token').addEventListener('keydown', (ev) => {
      if (ev.key === 'Enter') connect();
    });
    $('send').addEventListener('click', send);
    $('refresh-approvals').addEventListener('click', () => {
      if (state.ws) loadApprovals();
    });
    $('refresh-pairings').addEventListener('click', () => {
      if (state.ws) loadPairings();
    });
    $('input').addEventListener('keydown', (ev) => {
      if (ev.key === 'Enter' && !ev.shiftKey) {
        ev.preventDefault();
        send();
      }
    });
    refreshNoApprovals();
    // Back online: try at once instead of waiting for the timer.
    window.addEventListener('online', () => {
      if (!state.ws && state.retryTimer) connect(true);
    });
    if (sessionStorage.getItem('chitin.token')) {
      connect();
      return;
    }
    // Offer single sign-on where it is configured; a browser already signed in connects.
    fetch('/auth/methods', { cache: 'no-store', credentials: 'same-origin' })
      .then((r) => r.json())
      .then((m) => {
        $('sso').hidden = !m.oidc;
        if (m.session_cookie) {
          state.cookie = true;
          connect();
        }
      })
      .catch(() => {});
  }

  if (document.readyState === 'loading') document.addEventListener('DOMContentLoaded', init);
  else init();
})();
