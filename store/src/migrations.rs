//! The schema migrations of both backends, with the same numbering: `SQLITE[i]` and
//! `POSTGRES[i]` are schema version `i + 1`. Append only: a released migration is never edited.
//!
//! The PostgreSQL text of each is the SQLite text with the portable types (INTEGER -> BIGINT,
//! REAL -> DOUBLE PRECISION, BLOB -> BYTEA, AUTOINCREMENT -> an identity column, STRICT
//! dropped) except where noted (9: a CHECK changed in place; 15: the FTS5 table).

/// The SQLite migrations, in order (moved here from the gateway's `src/store.rs`).
pub const SQLITE: &[&str] = &[
    // 1: bookkeeping.
    "CREATE TABLE meta (
        key   TEXT PRIMARY KEY,
        value TEXT NOT NULL
     ) STRICT;",
    // 2: approvals for high-risk actions, bound to the request digest, single-use.
    "CREATE TABLE approvals (
        id             TEXT PRIMARY KEY,
        code           TEXT NOT NULL,
        requester      TEXT NOT NULL,
        session        TEXT NOT NULL,
        tool           TEXT NOT NULL,
        summary        TEXT NOT NULL,
        args_json      TEXT NOT NULL,
        request_digest BLOB NOT NULL,
        status         TEXT NOT NULL CHECK (status IN ('pending', 'granted', 'denied', 'expired', 'used')),
        created_ms     INTEGER NOT NULL,
        expires_ms     INTEGER NOT NULL,
        resolved_by    TEXT,
        resolved_ms    INTEGER,
        used_ms        INTEGER
     ) STRICT;
     CREATE UNIQUE INDEX approvals_open_code ON approvals(code) WHERE status IN ('pending', 'granted');
     CREATE INDEX approvals_digest ON approvals(request_digest, status);",
    // 3: the agent's sessions, runs, transcripts and usage. Content (`body`, `summary`) is
    // sealed with the data subject's key (`subject`: a Cedar entity reference such as
    // `Chitin::User::"alice"`); ids, times, sizes and token counts stay queryable for routing,
    // budgets and retention.
    "CREATE TABLE sessions (
        key          TEXT PRIMARY KEY,
        user_id      TEXT NOT NULL,
        subject      TEXT NOT NULL,
        channel      TEXT NOT NULL,
        created_ms   INTEGER NOT NULL,
        updated_ms   INTEGER NOT NULL,
        tainted      INTEGER NOT NULL DEFAULT 0,
        summary      BLOB,
        summary_seq  INTEGER NOT NULL DEFAULT 0
     ) STRICT;
     CREATE INDEX sessions_subject ON sessions(subject);
     CREATE TABLE runs (
        id            TEXT PRIMARY KEY,
        session_key   TEXT NOT NULL,
        user_id       TEXT NOT NULL,
        subject       TEXT NOT NULL,
        status        TEXT NOT NULL CHECK (status IN ('queued', 'running', 'waiting_approval', 'completed', 'failed', 'cancelled', 'timed_out', 'interrupted')),
        created_ms    INTEGER NOT NULL,
        updated_ms    INTEGER NOT NULL,
        finished_ms   INTEGER,
        steps         INTEGER NOT NULL DEFAULT 0,
        model         TEXT,
        input_tokens  INTEGER NOT NULL DEFAULT 0,
        output_tokens INTEGER NOT NULL DEFAULT 0,
        cost_usd      REAL NOT NULL DEFAULT 0,
        approval_id   TEXT,
        error         TEXT
     ) STRICT;
     CREATE INDEX runs_session ON runs(session_key, created_ms);
     CREATE INDEX runs_subject ON runs(subject);
     CREATE INDEX runs_status ON runs(status);
     CREATE TABLE messages (
        id           INTEGER PRIMARY KEY AUTOINCREMENT,
        session_key  TEXT NOT NULL,
        run_id       TEXT,
        subject      TEXT NOT NULL,
        seq          INTEGER NOT NULL,
        role         TEXT NOT NULL CHECK (role IN ('user', 'assistant', 'tool')),
        class        TEXT NOT NULL CHECK (class IN ('transcript', 'tool_output', 'attachment')),
        created_ms   INTEGER NOT NULL,
        size         INTEGER NOT NULL,
        body         BLOB NOT NULL,
        UNIQUE (session_key, seq)
     ) STRICT;
     CREATE INDEX messages_subject ON messages(subject, created_ms);
     CREATE INDEX messages_class_time ON messages(class, created_ms);
     CREATE TABLE usage (
        id            INTEGER PRIMARY KEY AUTOINCREMENT,
        at_ms         INTEGER NOT NULL,
        user_id       TEXT NOT NULL,
        subject       TEXT NOT NULL,
        session_key   TEXT NOT NULL,
        run_id        TEXT NOT NULL,
        model         TEXT NOT NULL,
        tool          TEXT,
        input_tokens  INTEGER NOT NULL,
        output_tokens INTEGER NOT NULL,
        cost_usd      REAL
     ) STRICT;
     CREATE INDEX usage_user_time ON usage(user_id, at_ms);",
    // 4: legal holds: retention never deletes a held subject's data (a Cedar entity reference,
    // as in `sessions.subject`).
    "CREATE TABLE holds (
        subject     TEXT PRIMARY KEY,
        reason      TEXT NOT NULL,
        created_ms  INTEGER NOT NULL,
        created_by  TEXT NOT NULL
     ) STRICT;",
    // 5: chat channels. Inbound events are unique per (channel, event_id) and committed with
    // the channel's cursor in one transaction; only an admitted message keeps its text, sealed
    // with the data subject's key (`subject`); the outbox is what the gateway sends, with its
    // delivery state; pairing requests; the managed entity store (identity -> user) that the
    // policy engine merges with entities.json.
    "CREATE TABLE channel_events (
        id           INTEGER PRIMARY KEY AUTOINCREMENT,
        channel      TEXT NOT NULL,
        event_id     TEXT NOT NULL,
        received_ms  INTEGER NOT NULL,
        event_kind   TEXT NOT NULL CHECK (event_kind IN ('message', 'edited', 'button', 'ignored')),
        chat_id      TEXT,
        chat_kind    TEXT CHECK (chat_kind IN ('dm', 'group')),
        thread       TEXT,
        sender_id    TEXT,
        message_id   TEXT,
        status       TEXT NOT NULL CHECK (status IN ('new', 'admitted', 'denied', 'pairing', 'ignored', 'done')),
        subject      TEXT,
        text         BLOB,
        callback_id  TEXT,
        button_data  TEXT,
        updated_ms   INTEGER NOT NULL,
        UNIQUE (channel, event_id)
     ) STRICT;
     CREATE INDEX channel_events_status ON channel_events(channel, status, id);
     CREATE INDEX channel_events_subject ON channel_events(subject);
     CREATE TABLE channel_cursors (
        channel     TEXT PRIMARY KEY,
        cursor      TEXT NOT NULL,
        updated_ms  INTEGER NOT NULL
     ) STRICT;
     CREATE TABLE channel_outbox (
        id                   INTEGER PRIMARY KEY AUTOINCREMENT,
        channel              TEXT NOT NULL,
        chat_id              TEXT NOT NULL,
        chat_kind            TEXT NOT NULL CHECK (chat_kind IN ('dm', 'group')),
        thread               TEXT,
        text                 TEXT NOT NULL,
        buttons_json         TEXT NOT NULL DEFAULT '[]',
        reply_to             TEXT,
        kind                 TEXT NOT NULL CHECK (kind IN ('reply', 'approval', 'pairing', 'send_message')),
        status               TEXT NOT NULL CHECK (status IN ('queued', 'sending', 'sent', 'failed', 'dead')),
        attempts             INTEGER NOT NULL DEFAULT 0,
        next_attempt_ms      INTEGER NOT NULL,
        platform_message_id  TEXT,
        last_error           TEXT,
        created_ms           INTEGER NOT NULL,
        updated_ms           INTEGER NOT NULL
     ) STRICT;
     CREATE INDEX channel_outbox_due ON channel_outbox(channel, status, next_attempt_ms);
     CREATE INDEX channel_outbox_chat ON channel_outbox(channel, chat_id, status, id);
     CREATE TABLE pairing_requests (
        code         TEXT PRIMARY KEY,
        channel      TEXT NOT NULL,
        identity     TEXT NOT NULL,
        chat_id      TEXT NOT NULL,
        created_ms   INTEGER NOT NULL,
        expires_ms   INTEGER NOT NULL,
        status       TEXT NOT NULL CHECK (status IN ('pending', 'approved', 'denied', 'expired')),
        user_id      TEXT,
        resolved_by  TEXT,
        resolved_ms  INTEGER
     ) STRICT;
     CREATE INDEX pairing_requests_identity ON pairing_requests(identity, created_ms);
     CREATE INDEX pairing_requests_status ON pairing_requests(status, expires_ms);
     CREATE TABLE managed_entities (
        identity   TEXT PRIMARY KEY,
        user_id    TEXT NOT NULL,
        channel    TEXT NOT NULL,
        added_by   TEXT NOT NULL,
        added_ms   INTEGER NOT NULL
     ) STRICT;",
    // 6: prompt files (`AGENTS.md`, ...) whose content was written by a run of a tainted
    // session (`tools::prompt_guard`): the system prompt shows that exact content (`digest`)
    // as untrusted data. One row per content; `session`/`run_id`/`at_ms` of the latest run
    // that wrote it.
    "CREATE TABLE prompt_file_taint (
        workspace  TEXT NOT NULL,
        name       TEXT NOT NULL,
        digest     TEXT NOT NULL,
        session    TEXT NOT NULL,
        run_id     TEXT,
        at_ms      INTEGER NOT NULL,
        PRIMARY KEY (workspace, name, digest)
     ) STRICT;",
    // 7: exactly-once chat turns and streamed replies. `runs.origin` names what started a run
    // (`channel:<name>:<event row id>`): a message whose turn was recorded is never run again
    // after a crash. `channel_outbox.dedup_key` makes queuing idempotent (a reply per run, an
    // approval prompt per approval); `edit_text` is the final text a streamed reply's message
    // is still to be edited to. `channel_events.attachments`: the files of an admitted
    // message (platform references, names, sizes; sealed like its text), fetched when its turn
    // starts.
    "ALTER TABLE runs ADD COLUMN origin TEXT;
     CREATE UNIQUE INDEX runs_origin ON runs(origin) WHERE origin IS NOT NULL;
     ALTER TABLE channel_outbox ADD COLUMN dedup_key TEXT;
     ALTER TABLE channel_outbox ADD COLUMN edit_text TEXT;
     CREATE UNIQUE INDEX channel_outbox_dedup ON channel_outbox(channel, dedup_key) WHERE dedup_key IS NOT NULL;
     CREATE INDEX channel_outbox_edits ON channel_outbox(channel, status) WHERE edit_text IS NOT NULL;
     ALTER TABLE channel_events ADD COLUMN attachments BLOB;",
    // 8: each channel's connection as its gateway last reported it (for `chitin channels
    // status`, which runs in another process): refreshed while the channel runs.
    "CREATE TABLE channel_state (
        channel      TEXT PRIMARY KEY,
        connected    INTEGER NOT NULL,
        since_ms     INTEGER NOT NULL,
        last_error   TEXT,
        updated_ms   INTEGER NOT NULL
     ) STRICT;",
    // 9: invitations of the bot into a conversation (Matrix room invites) are events too:
    // decided by Cedar like a message, joined only when admitted. SQLite cannot change a
    // CHECK constraint in place, so the table is rebuilt with the same columns.
    "CREATE TABLE channel_events_v9 (
        id           INTEGER PRIMARY KEY AUTOINCREMENT,
        channel      TEXT NOT NULL,
        event_id     TEXT NOT NULL,
        received_ms  INTEGER NOT NULL,
        event_kind   TEXT NOT NULL CHECK (event_kind IN ('message', 'edited', 'button', 'ignored', 'invite')),
        chat_id      TEXT,
        chat_kind    TEXT CHECK (chat_kind IN ('dm', 'group')),
        thread       TEXT,
        sender_id    TEXT,
        message_id   TEXT,
        status       TEXT NOT NULL CHECK (status IN ('new', 'admitted', 'denied', 'pairing', 'ignored', 'done')),
        subject      TEXT,
        text         BLOB,
        callback_id  TEXT,
        button_data  TEXT,
        updated_ms   INTEGER NOT NULL,
        attachments  BLOB,
        UNIQUE (channel, event_id)
     ) STRICT;
     INSERT INTO channel_events_v9 (id, channel, event_id, received_ms, event_kind, chat_id, chat_kind, thread,
                                    sender_id, message_id, status, subject, text, callback_id, button_data,
                                    updated_ms, attachments)
       SELECT id, channel, event_id, received_ms, event_kind, chat_id, chat_kind, thread, sender_id, message_id,
              status, subject, text, callback_id, button_data, updated_ms, attachments FROM channel_events;
     DROP TABLE channel_events;
     ALTER TABLE channel_events_v9 RENAME TO channel_events;
     CREATE INDEX channel_events_status ON channel_events(channel, status, id);
     CREATE INDEX channel_events_subject ON channel_events(subject);",
    // 10: what the platform reported of a sent message (WhatsApp status callbacks: delivered,
    // read, failed), on its outbox row; looked up by the platform's message id.
    "ALTER TABLE channel_outbox ADD COLUMN platform_status TEXT;
     CREATE INDEX channel_outbox_platform_id ON channel_outbox(channel, platform_message_id)
       WHERE platform_message_id IS NOT NULL;",
    // 11: automation. Cron jobs from
    // chitin.toml (source `config`, synced by the gateway), `chitin cron add` (`cli`), the
    // agent's `cron` tool (`agent`) and the heartbeat, each as its JSON, with the latest time
    // considered. `cron_firings`: one row per job and slot (`t:<ms>` for a scheduled time,
    // `manual:<id>` for `chitin cron run`), written BEFORE the run starts, so a restart never
    // runs a time twice; then the run and its outcome. `hook_deliveries`: one row per webhook
    // and delivery id, written before the answer, so a replay runs nothing; the body's size and
    // SHA-256 only, never the body.
    "CREATE TABLE cron_jobs (
        name         TEXT PRIMARY KEY,
        source       TEXT NOT NULL CHECK (source IN ('config', 'cli', 'agent', 'heartbeat')),
        user_id      TEXT NOT NULL,
        job_json     TEXT NOT NULL,
        created_by   TEXT NOT NULL,
        created_ms   INTEGER NOT NULL,
        updated_ms   INTEGER NOT NULL,
        last_tick_ms INTEGER
     ) STRICT;
     CREATE TABLE cron_firings (
        id           INTEGER PRIMARY KEY AUTOINCREMENT,
        job          TEXT NOT NULL,
        slot         TEXT NOT NULL,
        tick_ms      INTEGER NOT NULL,
        kind         TEXT NOT NULL CHECK (kind IN ('scheduled', 'missed', 'manual')),
        status       TEXT NOT NULL CHECK (status IN ('requested', 'started', 'skipped', 'completed', 'failed', 'interrupted')),
        run_id       TEXT,
        result       TEXT,
        requested_by TEXT,
        created_ms   INTEGER NOT NULL,
        finished_ms  INTEGER,
        UNIQUE (job, slot)
     ) STRICT;
     CREATE INDEX cron_firings_status ON cron_firings(status);
     CREATE TABLE hook_deliveries (
        hook         TEXT NOT NULL,
        delivery_id  TEXT NOT NULL,
        event        TEXT NOT NULL,
        body_sha256  TEXT NOT NULL,
        body_bytes   INTEGER NOT NULL,
        status       TEXT NOT NULL CHECK (status IN ('accepted', 'started', 'completed', 'failed', 'ignored', 'interrupted')),
        run_id       TEXT,
        result       TEXT,
        received_ms  INTEGER NOT NULL,
        finished_ms  INTEGER,
        PRIMARY KEY (hook, delivery_id)
     ) STRICT;
     CREATE INDEX hook_deliveries_received ON hook_deliveries(received_ms);",
    // 12: workflow runs (`workflow_runner`): one row per run (sub-workflows too, with their
    // parent), its steps' results and its pauses (approval and input gates, policy
    // approvals). Arguments, results, outputs, errors and pause requests are sealed with the
    // owner's key (`subject`); ids, names, digests, statuses and times stay queryable.
    // `runner_pid`/`runner_start` name the process running it (a dead one: `interrupted`).
    // Approvals learn who may resolve them: `required_approver` (only that user),
    // `distinct_from` (anyone but that user), both for workflow approval gates.
    "CREATE TABLE workflow_runs (
        id            TEXT PRIMARY KEY,
        name          TEXT NOT NULL,
        file_root     TEXT NOT NULL,
        file_rel      TEXT NOT NULL,
        file_sha256   TEXT NOT NULL,
        owner         TEXT NOT NULL,
        subject       TEXT NOT NULL,
        origin        TEXT NOT NULL CHECK (origin IN ('user', 'model', 'automation')),
        session       TEXT NOT NULL,
        tainted       INTEGER NOT NULL DEFAULT 0,
        parent_run    TEXT,
        status        TEXT NOT NULL CHECK (status IN ('running', 'paused', 'ok', 'failed', 'cancelled', 'interrupted')),
        args          BLOB NOT NULL,
        args_digest   TEXT NOT NULL,
        cursor        INTEGER NOT NULL DEFAULT 0,
        cost_usd      REAL NOT NULL DEFAULT 0,
        output        BLOB,
        error         BLOB,
        runner_pid    INTEGER,
        runner_start  INTEGER,
        created_ms    INTEGER NOT NULL,
        updated_ms    INTEGER NOT NULL,
        finished_ms   INTEGER
     ) STRICT;
     CREATE INDEX workflow_runs_status ON workflow_runs(status);
     CREATE INDEX workflow_runs_subject ON workflow_runs(subject);
     CREATE TABLE workflow_steps (
        run_id       TEXT NOT NULL,
        step         TEXT NOT NULL,
        status       TEXT NOT NULL CHECK (status IN ('running', 'ok', 'failed', 'skipped', 'interrupted', 'paused')),
        attempts     INTEGER NOT NULL DEFAULT 0,
        result       BLOB,
        started_ms   INTEGER NOT NULL,
        finished_ms  INTEGER,
        PRIMARY KEY (run_id, step)
     ) STRICT;
     CREATE TABLE workflow_pauses (
        id           TEXT PRIMARY KEY,
        run_id       TEXT NOT NULL,
        step         TEXT NOT NULL,
        kind         TEXT NOT NULL CHECK (kind IN ('approval', 'input', 'policy', 'run')),
        nonce        BLOB NOT NULL,
        approval_id  TEXT,
        request      BLOB NOT NULL,
        status       TEXT NOT NULL CHECK (status IN ('pending', 'claimed', 'used', 'cancelled')),
        created_ms   INTEGER NOT NULL,
        expires_ms   INTEGER NOT NULL,
        used_ms      INTEGER,
        used_by      TEXT
     ) STRICT;
     CREATE INDEX workflow_pauses_run ON workflow_pauses(run_id, status);
     CREATE INDEX workflow_pauses_approval ON workflow_pauses(approval_id);
     ALTER TABLE approvals ADD COLUMN required_approver TEXT;
     ALTER TABLE approvals ADD COLUMN distinct_from TEXT;",
    // 13: automation durability and sealing. `cron_jobs.job_sealed`: the job's JSON sealed
    // with its user's data key (the prompt is user text); `job_json` is emptied by the job
    // store when it seals a row written before this version. `hook_deliveries.body`: a
    // workflow target's body, sealed with the hook user's key (`subject`), stored before the
    // 2xx and dropped once the run has started, so a stop between the answer and the start
    // loses nothing. `workflow_state`: the values of the pipeline stages `state.set` /
    // `state.get` / `diff.last`, per owner and workflow, sealed.
    "ALTER TABLE cron_jobs ADD COLUMN job_sealed BLOB;
     ALTER TABLE hook_deliveries ADD COLUMN body BLOB;
     ALTER TABLE hook_deliveries ADD COLUMN subject TEXT;
     CREATE INDEX hook_deliveries_pending ON hook_deliveries(status) WHERE body IS NOT NULL;
     CREATE TABLE workflow_state (
        owner        TEXT NOT NULL,
        subject      TEXT NOT NULL,
        workflow     TEXT NOT NULL,
        key          TEXT NOT NULL,
        value        BLOB NOT NULL,
        updated_ms   INTEGER NOT NULL,
        PRIMARY KEY (owner, workflow, key)
     ) STRICT;
     CREATE INDEX workflow_state_subject ON workflow_state(subject);",
    // 14: what caused each model call (`usage.task`: chat, channel, cron, webhook, workflow),
    // so spend can be told apart by task (`chitin usage --by task`, `GET /api/v1/usage`).
    // Existing rows are classified from their run's origin; a call outside an agent run is a
    // workflow's `llm.invoke`.
    "ALTER TABLE usage ADD COLUMN task TEXT;
     UPDATE usage SET task = COALESCE(
        (SELECT CASE WHEN r.origin LIKE 'channel:%' THEN 'channel'
                     WHEN r.origin LIKE 'cron:%' THEN 'cron'
                     WHEN r.origin LIKE 'hook:%' THEN 'webhook'
                     ELSE 'chat' END
         FROM runs r WHERE r.id = usage.run_id),
        'workflow');
     CREATE INDEX usage_time ON usage(at_ms);",
    // 15: the memory index (`tools::memory`): per user, a random index key sealed with the user's
    // data key; documents (memory files, transcript messages) by id, with no text; an FTS5
    // table of keyed term hashes (no plaintext term is ever stored) with secure-delete, so a
    // deleted document's terms are removed from the index pages (not only tombstoned: a
    // contentless table could not, it does not know a deleted row's terms).
    // Deleting a transcript message (retention, erasure) deletes its document, and deleting a
    // document deletes its index entries, by trigger.
    "CREATE TABLE memory_index_keys (
        subject     TEXT PRIMARY KEY,
        sealed      BLOB NOT NULL
     ) STRICT;
     CREATE TABLE memory_cursor (
        subject          TEXT PRIMARY KEY,
        last_message_id  INTEGER NOT NULL
     ) STRICT;
     CREATE TABLE memory_docs (
        id           INTEGER PRIMARY KEY AUTOINCREMENT,
        subject      TEXT NOT NULL,
        kind         TEXT NOT NULL CHECK (kind IN ('file', 'transcript')),
        workspace    TEXT,
        path         TEXT,
        mac          TEXT,
        message_id   INTEGER UNIQUE,
        session_key  TEXT,
        seq          INTEGER,
        role         TEXT,
        created_ms   INTEGER NOT NULL,
        UNIQUE (subject, workspace, path)
     ) STRICT;
     CREATE INDEX memory_docs_subject ON memory_docs(subject, kind);
     CREATE VIRTUAL TABLE memory_fts USING fts5(terms, tokenize='ascii');
     INSERT INTO memory_fts(memory_fts, rank) VALUES ('secure-delete', 1);
     CREATE TRIGGER memory_docs_gone AFTER DELETE ON memory_docs BEGIN
        DELETE FROM memory_fts WHERE rowid = old.id;
     END;
     CREATE TRIGGER memory_messages_gone AFTER DELETE ON messages BEGIN
        DELETE FROM memory_docs WHERE message_id = old.id;
     END;",
    // 16: operator accounts (issue #17): users managed in state.db (`chitin users add`, single
    // sign-on), per-user API tokens (only a SHA-256 of the secret part is kept), browser
    // sessions (a SHA-256 of the cookie), devices held until an owner approves them, and the
    // server side of OIDC logins (state, nonce, PKCE verifier; each used once).
    "CREATE TABLE account_users (
        user_id     TEXT PRIMARY KEY,
        groups      TEXT NOT NULL,
        source      TEXT NOT NULL CHECK (source IN ('cli', 'oidc', 'proxy')),
        added_by    TEXT NOT NULL,
        added_ms    INTEGER NOT NULL,
        updated_ms  INTEGER NOT NULL
     ) STRICT;
     CREATE TABLE api_tokens (
        id            TEXT PRIMARY KEY,
        user_id       TEXT NOT NULL,
        name          TEXT NOT NULL,
        hash          BLOB NOT NULL,
        created_by    TEXT NOT NULL,
        created_ms    INTEGER NOT NULL,
        expires_ms    INTEGER,
        last_used_ms  INTEGER
     ) STRICT;
     CREATE INDEX api_tokens_user ON api_tokens(user_id);
     CREATE TABLE web_sessions (
        id            TEXT PRIMARY KEY,
        hash          BLOB NOT NULL,
        user_id       TEXT NOT NULL,
        groups        TEXT NOT NULL,
        method        TEXT NOT NULL,
        csrf          TEXT NOT NULL,
        device_id     TEXT,
        client        TEXT NOT NULL,
        created_ms    INTEGER NOT NULL,
        last_seen_ms  INTEGER NOT NULL,
        expires_ms    INTEGER NOT NULL
     ) STRICT;
     CREATE INDEX web_sessions_user ON web_sessions(user_id);
     CREATE TABLE devices (
        id          TEXT PRIMARY KEY,
        hash        BLOB NOT NULL,
        user_id     TEXT NOT NULL,
        status      TEXT NOT NULL CHECK (status IN ('pending', 'approved', 'revoked')),
        client      TEXT NOT NULL,
        user_agent  TEXT NOT NULL,
        created_ms  INTEGER NOT NULL,
        decided_ms  INTEGER,
        decided_by  TEXT
     ) STRICT;
     CREATE INDEX devices_user ON devices(user_id);
     CREATE TABLE oidc_logins (
        state       TEXT PRIMARY KEY,
        nonce       TEXT NOT NULL,
        verifier    TEXT NOT NULL,
        browser     BLOB NOT NULL,
        created_ms  INTEGER NOT NULL,
        expires_ms  INTEGER NOT NULL,
        used_ms     INTEGER
     ) STRICT;
     CREATE TABLE oidc_nonces_used (
        nonce    TEXT PRIMARY KEY,
        used_ms  INTEGER NOT NULL
     ) STRICT;",
    // 17: MCP servers trusted by an owner (`chitin mcp trust`): the server's identity (command
    // line or URL) and the pinned tool definitions; a tool whose definition no longer has its
    // pinned digest is withheld.
    "CREATE TABLE mcp_trust (
        server       TEXT PRIMARY KEY,
        identity     TEXT NOT NULL,
        list_digest  TEXT NOT NULL,
        trusted_ms   INTEGER NOT NULL,
        trusted_by   TEXT NOT NULL
     ) STRICT;
     CREATE TABLE mcp_pins (
        server       TEXT NOT NULL,
        tool         TEXT NOT NULL,
        digest       TEXT NOT NULL,
        definition   TEXT NOT NULL,
        PRIMARY KEY (server, tool)
     ) STRICT;",
    // 18: users removed by an operator (`chitin users remove`, issue #17): a tombstone so the
    // next single sign-on (or identity proxy) login does not create them again; `chitin users
    // add` lifts it. Only SHA-256 of the user id is kept (no personal data in clear), so the
    // tombstone stays when the user's data is erased and the removal keeps holding.
    "CREATE TABLE account_removed (
        user_hash   BLOB PRIMARY KEY,
        removed_ms  INTEGER NOT NULL
     ) STRICT;",
    // 19 (issue #21, the agent turn's cost): a counter of changes to stored messages other
    // than appends (a row deleted by retention, erasure or a restore's purge, or rewritten),
    // kept by triggers whoever makes them (this gateway, the CLI in another process): the
    // agent's cache of opened messages (`agent::transcripts::HistoryCache`) starts over
    // whenever it moved; an index of messages by run; the daily spend per user.
    "CREATE TABLE transcript_changes (
        id  INTEGER PRIMARY KEY CHECK (id = 1),
        n   INTEGER NOT NULL
     ) STRICT;
     INSERT INTO transcript_changes (id, n) VALUES (1, 0);
     CREATE TRIGGER messages_deleted_count AFTER DELETE ON messages
     BEGIN UPDATE transcript_changes SET n = n + 1 WHERE id = 1; END;
     CREATE TRIGGER messages_updated_count AFTER UPDATE ON messages
     BEGIN UPDATE transcript_changes SET n = n + 1 WHERE id = 1; END;
     -- A run's messages without walking its session (a run's summary at its end).
     CREATE INDEX messages_run ON messages(run_id, seq);
     -- Spend per user and UTC day, kept by triggers from `usage` (whoever inserts or deletes
     -- usage rows: the agent, retention, erasure), so the budget check of every model call
     -- reads one row instead of summing the day's calls.
     CREATE TABLE spend_daily (
        user_id   TEXT NOT NULL,
        day       INTEGER NOT NULL,
        cost_usd  REAL NOT NULL,
        calls     INTEGER NOT NULL,
        PRIMARY KEY (user_id, day)
     ) STRICT;
     INSERT INTO spend_daily (user_id, day, cost_usd, calls)
        SELECT user_id, at_ms / 86400000, SUM(COALESCE(cost_usd, 0.0)), COUNT(*)
        FROM usage GROUP BY user_id, at_ms / 86400000;
     CREATE TRIGGER usage_spend_insert AFTER INSERT ON usage BEGIN
        INSERT INTO spend_daily (user_id, day, cost_usd, calls)
        VALUES (NEW.user_id, NEW.at_ms / 86400000, COALESCE(NEW.cost_usd, 0.0), 1)
        ON CONFLICT (user_id, day) DO UPDATE SET cost_usd = cost_usd + excluded.cost_usd,
                                                 calls = calls + 1;
     END;
     CREATE TRIGGER usage_spend_delete AFTER DELETE ON usage BEGIN
        UPDATE spend_daily SET cost_usd = cost_usd - COALESCE(OLD.cost_usd, 0.0), calls = calls - 1
        WHERE user_id = OLD.user_id AND day = OLD.at_ms / 86400000;
        DELETE FROM spend_daily WHERE user_id = OLD.user_id AND day = OLD.at_ms / 86400000
                                AND calls <= 0;
     END;
     CREATE TRIGGER usage_spend_update AFTER UPDATE OF user_id, at_ms, cost_usd ON usage BEGIN
        UPDATE spend_daily SET cost_usd = cost_usd - COALESCE(OLD.cost_usd, 0.0), calls = calls - 1
        WHERE user_id = OLD.user_id AND day = OLD.at_ms / 86400000;
        DELETE FROM spend_daily WHERE user_id = OLD.user_id AND day = OLD.at_ms / 86400000
                                AND calls <= 0;
        INSERT INTO spend_daily (user_id, day, cost_usd, calls)
        VALUES (NEW.user_id, NEW.at_ms / 86400000, COALESCE(NEW.cost_usd, 0.0), 1)
        ON CONFLICT (user_id, day) DO UPDATE SET cost_usd = cost_usd + excluded.cost_usd,
                                                 calls = calls + 1;
     END;",
    // 20: coordination between replicas (issue #18). `leases`: a named lease with its owner,
    // expiry and fencing token (the token grows on every take-over; a released lease keeps its
    // row so the token never goes back). `replicas`: each gateway's registration and heartbeat.
    "CREATE TABLE leases (
        name        TEXT PRIMARY KEY,
        owner       TEXT,
        expires_ms  INTEGER NOT NULL,
        fence       INTEGER NOT NULL
     ) STRICT;
     CREATE INDEX leases_owner ON leases(owner);
     CREATE TABLE replicas (
        id            TEXT PRIMARY KEY,
        host          TEXT NOT NULL,
        started_ms    INTEGER NOT NULL,
        heartbeat_ms  INTEGER NOT NULL,
        version       TEXT NOT NULL
     ) STRICT;",
    // 21: the order in which a workflow run's steps first started (`workflow_steps.seq`,
    // 1, 2, .. per run, set when the step's row is inserted), so both backends list them
    // alike (SQLite listed them by rowid, which PostgreSQL has not). Existing rows keep their
    // rowid order.
    "ALTER TABLE workflow_steps ADD COLUMN seq INTEGER;
     UPDATE workflow_steps SET seq = rowid;",
    // 22: failed authentications per client address (gateway::auth::SharedFailures), so the
    // lockout holds across every gateway of a deployment.
    "CREATE TABLE auth_failures (
        client TEXT NOT NULL,
        at_ms INTEGER NOT NULL
     ) STRICT;
     CREATE INDEX auth_failures_client ON auth_failures (client, at_ms);
     CREATE INDEX auth_failures_at ON auth_failures (at_ms);
     CREATE TABLE auth_lockouts (
        client TEXT PRIMARY KEY,
        until_ms INTEGER NOT NULL
     ) STRICT;",
    // 23: which replica (`replicas.id`, issue #18) started a cron firing, runs a workflow
    // run or handles a webhook delivery, so that recovery on PostgreSQL takes over only the
    // work of replicas that are no longer live. `workflow_runs.runner_host`: the machine of a
    // runner that is not a replica (`chitin workflow run`), whose pid only that machine can
    // check. NULL on rows written before (and on SQLite's CLI runs): judged as before.
    "ALTER TABLE cron_firings ADD COLUMN replica TEXT;
     ALTER TABLE hook_deliveries ADD COLUMN replica TEXT;
     ALTER TABLE workflow_runs ADD COLUMN runner_replica TEXT;
     ALTER TABLE workflow_runs ADD COLUMN runner_host TEXT;",
    // 24: the vault's sealed data-key set (`vault.keys` bytes: magic, nonce, sealed JSON) shared
    // by every replica on PostgreSQL (`src/vault.rs`, the database backing); one row, its
    // `version` moved by every write. Unused on SQLite (the file stays).
    "CREATE TABLE vault_keys (
        id INTEGER PRIMARY KEY CHECK (id = 1),
        sealed BLOB NOT NULL,
        version INTEGER NOT NULL
     ) STRICT;",
    // 25: the final edits still due (`Engine::due_edits`, every sender step) are found
    // through their partial index with the due time in it. On `(channel, status)` alone,
    // SQLite preferred `channel_outbox_due` (`channel, status, next_attempt_ms`) and read
    // every sent row of the channel to test `edit_text` (issue #21: 7.5 % of a gateway's CPU
    // after a few hundred replies, growing with every message sent).
    "DROP INDEX channel_outbox_edits;
     CREATE INDEX channel_outbox_edits ON channel_outbox(channel, status, next_attempt_ms)
        WHERE edit_text IS NOT NULL;",
];

/// The PostgreSQL migrations, in order.
pub const POSTGRES: &[&str] = &[
    // 1: as SQLite's 1.
    "CREATE TABLE meta (
        key   TEXT PRIMARY KEY,
        value TEXT NOT NULL
     );",
    // 2: as SQLite's 2.
    "CREATE TABLE approvals (
        id             TEXT PRIMARY KEY,
        code           TEXT NOT NULL,
        requester      TEXT NOT NULL,
        session        TEXT NOT NULL,
        tool           TEXT NOT NULL,
        summary        TEXT NOT NULL,
        args_json      TEXT NOT NULL,
        request_digest BYTEA NOT NULL,
        status         TEXT NOT NULL CHECK (status IN ('pending', 'granted', 'denied', 'expired', 'used')),
        created_ms     BIGINT NOT NULL,
        expires_ms     BIGINT NOT NULL,
        resolved_by    TEXT,
        resolved_ms    BIGINT,
        used_ms        BIGINT
     );
     CREATE UNIQUE INDEX approvals_open_code ON approvals(code) WHERE status IN ('pending', 'granted');
     CREATE INDEX approvals_digest ON approvals(request_digest, status);",
    // 3: as SQLite's 3.
    "CREATE TABLE sessions (
        key          TEXT PRIMARY KEY,
        user_id      TEXT NOT NULL,
        subject      TEXT NOT NULL,
        channel      TEXT NOT NULL,
        created_ms   BIGINT NOT NULL,
        updated_ms   BIGINT NOT NULL,
        tainted      BIGINT NOT NULL DEFAULT 0,
        summary      BYTEA,
        summary_seq  BIGINT NOT NULL DEFAULT 0
     );
     CREATE INDEX sessions_subject ON sessions(subject);
     CREATE TABLE runs (
        id            TEXT PRIMARY KEY,
        session_key   TEXT NOT NULL,
        user_id       TEXT NOT NULL,
        subject       TEXT NOT NULL,
        status        TEXT NOT NULL CHECK (status IN ('queued', 'running', 'waiting_approval', 'completed', 'failed', 'cancelled', 'timed_out', 'interrupted')),
        created_ms    BIGINT NOT NULL,
        updated_ms    BIGINT NOT NULL,
        finished_ms   BIGINT,
        steps         BIGINT NOT NULL DEFAULT 0,
        model         TEXT,
        input_tokens  BIGINT NOT NULL DEFAULT 0,
        output_tokens BIGINT NOT NULL DEFAULT 0,
        cost_usd      DOUBLE PRECISION NOT NULL DEFAULT 0,
        approval_id   TEXT,
        error         TEXT
     );
     CREATE INDEX runs_session ON runs(session_key, created_ms);
     CREATE INDEX runs_subject ON runs(subject);
     CREATE INDEX runs_status ON runs(status);
     CREATE TABLE messages (
        id           BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
        session_key  TEXT NOT NULL,
        run_id       TEXT,
        subject      TEXT NOT NULL,
        seq          BIGINT NOT NULL,
        role         TEXT NOT NULL CHECK (role IN ('user', 'assistant', 'tool')),
        class        TEXT NOT NULL CHECK (class IN ('transcript', 'tool_output', 'attachment')),
        created_ms   BIGINT NOT NULL,
        size         BIGINT NOT NULL,
        body         BYTEA NOT NULL,
        UNIQUE (session_key, seq)
     );
     CREATE INDEX messages_subject ON messages(subject, created_ms);
     CREATE INDEX messages_class_time ON messages(class, created_ms);
     CREATE TABLE usage (
        id            BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
        at_ms         BIGINT NOT NULL,
        user_id       TEXT NOT NULL,
        subject       TEXT NOT NULL,
        session_key   TEXT NOT NULL,
        run_id        TEXT NOT NULL,
        model         TEXT NOT NULL,
        tool          TEXT,
        input_tokens  BIGINT NOT NULL,
        output_tokens BIGINT NOT NULL,
        cost_usd      DOUBLE PRECISION
     );
     CREATE INDEX usage_user_time ON usage(user_id, at_ms);",
    // 4: as SQLite's 4.
    "CREATE TABLE holds (
        subject     TEXT PRIMARY KEY,
        reason      TEXT NOT NULL,
        created_ms  BIGINT NOT NULL,
        created_by  TEXT NOT NULL
     );",
    // 5: as SQLite's 5.
    "CREATE TABLE channel_events (
        id           BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
        channel      TEXT NOT NULL,
        event_id     TEXT NOT NULL,
        received_ms  BIGINT NOT NULL,
        event_kind   TEXT NOT NULL CHECK (event_kind IN ('message', 'edited', 'button', 'ignored')),
        chat_id      TEXT,
        chat_kind    TEXT CHECK (chat_kind IN ('dm', 'group')),
        thread       TEXT,
        sender_id    TEXT,
        message_id   TEXT,
        status       TEXT NOT NULL CHECK (status IN ('new', 'admitted', 'denied', 'pairing', 'ignored', 'done')),
        subject      TEXT,
        text         BYTEA,
        callback_id  TEXT,
        button_data  TEXT,
        updated_ms   BIGINT NOT NULL,
        UNIQUE (channel, event_id)
     );
     CREATE INDEX channel_events_status ON channel_events(channel, status, id);
     CREATE INDEX channel_events_subject ON channel_events(subject);
     CREATE TABLE channel_cursors (
        channel     TEXT PRIMARY KEY,
        cursor      TEXT NOT NULL,
        updated_ms  BIGINT NOT NULL
     );
     CREATE TABLE channel_outbox (
        id                   BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
        channel              TEXT NOT NULL,
        chat_id              TEXT NOT NULL,
        chat_kind            TEXT NOT NULL CHECK (chat_kind IN ('dm', 'group')),
        thread               TEXT,
        text                 TEXT NOT NULL,
        buttons_json         TEXT NOT NULL DEFAULT '[]',
        reply_to             TEXT,
        kind                 TEXT NOT NULL CHECK (kind IN ('reply', 'approval', 'pairing', 'send_message')),
        status               TEXT NOT NULL CHECK (status IN ('queued', 'sending', 'sent', 'failed', 'dead')),
        attempts             BIGINT NOT NULL DEFAULT 0,
        next_attempt_ms      BIGINT NOT NULL,
        platform_message_id  TEXT,
        last_error           TEXT,
        created_ms           BIGINT NOT NULL,
        updated_ms           BIGINT NOT NULL
     );
     CREATE INDEX channel_outbox_due ON channel_outbox(channel, status, next_attempt_ms);
     CREATE INDEX channel_outbox_chat ON channel_outbox(channel, chat_id, status, id);
     CREATE TABLE pairing_requests (
        code         TEXT PRIMARY KEY,
        channel      TEXT NOT NULL,
        identity     TEXT NOT NULL,
        chat_id      TEXT NOT NULL,
        created_ms   BIGINT NOT NULL,
        expires_ms   BIGINT NOT NULL,
        status       TEXT NOT NULL CHECK (status IN ('pending', 'approved', 'denied', 'expired')),
        user_id      TEXT,
        resolved_by  TEXT,
        resolved_ms  BIGINT
     );
     CREATE INDEX pairing_requests_identity ON pairing_requests(identity, created_ms);
     CREATE INDEX pairing_requests_status ON pairing_requests(status, expires_ms);
     CREATE TABLE managed_entities (
        identity   TEXT PRIMARY KEY,
        user_id    TEXT NOT NULL,
        channel    TEXT NOT NULL,
        added_by   TEXT NOT NULL,
        added_ms   BIGINT NOT NULL
     );",
    // 6: as SQLite's 6.
    "CREATE TABLE prompt_file_taint (
        workspace  TEXT NOT NULL,
        name       TEXT NOT NULL,
        digest     TEXT NOT NULL,
        session    TEXT NOT NULL,
        run_id     TEXT,
        at_ms      BIGINT NOT NULL,
        PRIMARY KEY (workspace, name, digest)
     );",
    // 7: as SQLite's 7.
    "ALTER TABLE runs ADD COLUMN origin TEXT;
     CREATE UNIQUE INDEX runs_origin ON runs(origin) WHERE origin IS NOT NULL;
     ALTER TABLE channel_outbox ADD COLUMN dedup_key TEXT;
     ALTER TABLE channel_outbox ADD COLUMN edit_text TEXT;
     CREATE UNIQUE INDEX channel_outbox_dedup ON channel_outbox(channel, dedup_key) WHERE dedup_key IS NOT NULL;
     CREATE INDEX channel_outbox_edits ON channel_outbox(channel, status) WHERE edit_text IS NOT NULL;
     ALTER TABLE channel_events ADD COLUMN attachments BYTEA;",
    // 8: as SQLite's 8.
    "CREATE TABLE channel_state (
        channel      TEXT PRIMARY KEY,
        connected    BIGINT NOT NULL,
        since_ms     BIGINT NOT NULL,
        last_error   TEXT,
        updated_ms   BIGINT NOT NULL
     );",
    // 9: the CHECK constraint learns 'invite' in place (SQLite rebuilt the table).
    "ALTER TABLE channel_events DROP CONSTRAINT channel_events_event_kind_check;
     ALTER TABLE channel_events ADD CONSTRAINT channel_events_event_kind_check
       CHECK (event_kind IN ('message', 'edited', 'button', 'ignored', 'invite'));",
    // 10: as SQLite's 10.
    "ALTER TABLE channel_outbox ADD COLUMN platform_status TEXT;
     CREATE INDEX channel_outbox_platform_id ON channel_outbox(channel, platform_message_id)
       WHERE platform_message_id IS NOT NULL;",
    // 11: as SQLite's 11.
    "CREATE TABLE cron_jobs (
        name         TEXT PRIMARY KEY,
        source       TEXT NOT NULL CHECK (source IN ('config', 'cli', 'agent', 'heartbeat')),
        user_id      TEXT NOT NULL,
        job_json     TEXT NOT NULL,
        created_by   TEXT NOT NULL,
        created_ms   BIGINT NOT NULL,
        updated_ms   BIGINT NOT NULL,
        last_tick_ms BIGINT
     );
     CREATE TABLE cron_firings (
        id           BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
        job          TEXT NOT NULL,
        slot         TEXT NOT NULL,
        tick_ms      BIGINT NOT NULL,
        kind         TEXT NOT NULL CHECK (kind IN ('scheduled', 'missed', 'manual')),
        status       TEXT NOT NULL CHECK (status IN ('requested', 'started', 'skipped', 'completed', 'failed', 'interrupted')),
        run_id       TEXT,
        result       TEXT,
        requested_by TEXT,
        created_ms   BIGINT NOT NULL,
        finished_ms  BIGINT,
        UNIQUE (job, slot)
     );
     CREATE INDEX cron_firings_status ON cron_firings(status);
     CREATE TABLE hook_deliveries (
        hook         TEXT NOT NULL,
        delivery_id  TEXT NOT NULL,
        event        TEXT NOT NULL,
        body_sha256  TEXT NOT NULL,
        body_bytes   BIGINT NOT NULL,
        status       TEXT NOT NULL CHECK (status IN ('accepted', 'started', 'completed', 'failed', 'ignored', 'interrupted')),
        run_id       TEXT,
        result       TEXT,
        received_ms  BIGINT NOT NULL,
        finished_ms  BIGINT,
        PRIMARY KEY (hook, delivery_id)
     );
     CREATE INDEX hook_deliveries_received ON hook_deliveries(received_ms);",
    // 12: as SQLite's 12.
    "CREATE TABLE workflow_runs (
        id            TEXT PRIMARY KEY,
        name          TEXT NOT NULL,
        file_root     TEXT NOT NULL,
        file_rel      TEXT NOT NULL,
        file_sha256   TEXT NOT NULL,
        owner         TEXT NOT NULL,
        subject       TEXT NOT NULL,
        origin        TEXT NOT NULL CHECK (origin IN ('user', 'model', 'automation')),
        session       TEXT NOT NULL,
        tainted       BIGINT NOT NULL DEFAULT 0,
        parent_run    TEXT,
        status        TEXT NOT NULL CHECK (status IN ('running', 'paused', 'ok', 'failed', 'cancelled', 'interrupted')),
        args          BYTEA NOT NULL,
        args_digest   TEXT NOT NULL,
        cursor        BIGINT NOT NULL DEFAULT 0,
        cost_usd      DOUBLE PRECISION NOT NULL DEFAULT 0,
        output        BYTEA,
        error         BYTEA,
        runner_pid    BIGINT,
        runner_start  BIGINT,
        created_ms    BIGINT NOT NULL,
        updated_ms    BIGINT NOT NULL,
        finished_ms   BIGINT
     );
     CREATE INDEX workflow_runs_status ON workflow_runs(status);
     CREATE INDEX workflow_runs_subject ON workflow_runs(subject);
     CREATE TABLE workflow_steps (
        run_id       TEXT NOT NULL,
        step         TEXT NOT NULL,
        status       TEXT NOT NULL CHECK (status IN ('running', 'ok', 'failed', 'skipped', 'interrupted', 'paused')),
        attempts     BIGINT NOT NULL DEFAULT 0,
        result       BYTEA,
        started_ms   BIGINT NOT NULL,
        finished_ms  BIGINT,
        PRIMARY KEY (run_id, step)
     );
     CREATE TABLE workflow_pauses (
        id           TEXT PRIMARY KEY,
        run_id       TEXT NOT NULL,
        step         TEXT NOT NULL,
        kind         TEXT NOT NULL CHECK (kind IN ('approval', 'input', 'policy', 'run')),
        nonce        BYTEA NOT NULL,
        approval_id  TEXT,
        request      BYTEA NOT NULL,
        status       TEXT NOT NULL CHECK (status IN ('pending', 'claimed', 'used', 'cancelled')),
        created_ms   BIGINT NOT NULL,
        expires_ms   BIGINT NOT NULL,
        used_ms      BIGINT,
        used_by      TEXT
     );
     CREATE INDEX workflow_pauses_run ON workflow_pauses(run_id, status);
     CREATE INDEX workflow_pauses_approval ON workflow_pauses(approval_id);
     ALTER TABLE approvals ADD COLUMN required_approver TEXT;
     ALTER TABLE approvals ADD COLUMN distinct_from TEXT;",
    // 13: as SQLite's 13.
    "ALTER TABLE cron_jobs ADD COLUMN job_sealed BYTEA;
     ALTER TABLE hook_deliveries ADD COLUMN body BYTEA;
     ALTER TABLE hook_deliveries ADD COLUMN subject TEXT;
     CREATE INDEX hook_deliveries_pending ON hook_deliveries(status) WHERE body IS NOT NULL;
     CREATE TABLE workflow_state (
        owner        TEXT NOT NULL,
        subject      TEXT NOT NULL,
        workflow     TEXT NOT NULL,
        key          TEXT NOT NULL,
        value        BYTEA NOT NULL,
        updated_ms   BIGINT NOT NULL,
        PRIMARY KEY (owner, workflow, key)
     );
     CREATE INDEX workflow_state_subject ON workflow_state(subject);",
    // 14: as SQLite's 14.
    "ALTER TABLE usage ADD COLUMN task TEXT;
     UPDATE usage SET task = COALESCE(
        (SELECT CASE WHEN r.origin LIKE 'channel:%' THEN 'channel'
                     WHEN r.origin LIKE 'cron:%' THEN 'cron'
                     WHEN r.origin LIKE 'hook:%' THEN 'webhook'
                     ELSE 'chat' END
         FROM runs r WHERE r.id = usage.run_id),
        'workflow');
     CREATE INDEX usage_time ON usage(at_ms);",
    // 15: the memory index. FTS5 has no PostgreSQL counterpart that keeps the same behaviour
    // (keyed term hashes, BM25 ranking, entries removed with their document), so it is two plain
    // tables: `memory_fts` (one row per document: its length in terms) and `memory_terms` (one
    // row per term and document with the term's count, indexed by term), from which the memory
    // search computes BM25 in SQL. Deleting a document removes its entries (cascade), and the two
    // triggers of the SQLite text become PL/pgSQL triggers.
    "CREATE TABLE memory_index_keys (
        subject     TEXT PRIMARY KEY,
        sealed      BYTEA NOT NULL
     );
     CREATE TABLE memory_cursor (
        subject          TEXT PRIMARY KEY,
        last_message_id  BIGINT NOT NULL
     );
     CREATE TABLE memory_docs (
        id           BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
        subject      TEXT NOT NULL,
        kind         TEXT NOT NULL CHECK (kind IN ('file', 'transcript')),
        workspace    TEXT,
        path         TEXT,
        mac          TEXT,
        message_id   BIGINT UNIQUE,
        session_key  TEXT,
        seq          BIGINT,
        role         TEXT,
        created_ms   BIGINT NOT NULL,
        UNIQUE (subject, workspace, path)
     );
     CREATE INDEX memory_docs_subject ON memory_docs(subject, kind);
     CREATE TABLE memory_fts (
        rowid   BIGINT PRIMARY KEY,
        length  BIGINT NOT NULL
     );
     CREATE TABLE memory_terms (
        term  TEXT NOT NULL,
        doc   BIGINT NOT NULL REFERENCES memory_fts(rowid) ON DELETE CASCADE,
        tf    BIGINT NOT NULL,
        PRIMARY KEY (term, doc)
     );
     CREATE INDEX memory_terms_doc ON memory_terms(doc);
     CREATE FUNCTION memory_docs_gone() RETURNS trigger LANGUAGE plpgsql AS $$
     BEGIN
        DELETE FROM memory_fts WHERE rowid = OLD.id;
        RETURN OLD;
     END $$;
     CREATE TRIGGER memory_docs_gone AFTER DELETE ON memory_docs
        FOR EACH ROW EXECUTE FUNCTION memory_docs_gone();
     CREATE FUNCTION memory_messages_gone() RETURNS trigger LANGUAGE plpgsql AS $$
     BEGIN
        DELETE FROM memory_docs WHERE message_id = OLD.id;
        RETURN OLD;
     END $$;
     CREATE TRIGGER memory_messages_gone AFTER DELETE ON messages
        FOR EACH ROW EXECUTE FUNCTION memory_messages_gone();",
    // 16: as SQLite's 16.
    "CREATE TABLE account_users (
        user_id     TEXT PRIMARY KEY,
        groups      TEXT NOT NULL,
        source      TEXT NOT NULL CHECK (source IN ('cli', 'oidc', 'proxy')),
        added_by    TEXT NOT NULL,
        added_ms    BIGINT NOT NULL,
        updated_ms  BIGINT NOT NULL
     );
     CREATE TABLE api_tokens (
        id            TEXT PRIMARY KEY,
        user_id       TEXT NOT NULL,
        name          TEXT NOT NULL,
        hash          BYTEA NOT NULL,
        created_by    TEXT NOT NULL,
        created_ms    BIGINT NOT NULL,
        expires_ms    BIGINT,
        last_used_ms  BIGINT
     );
     CREATE INDEX api_tokens_user ON api_tokens(user_id);
     CREATE TABLE web_sessions (
        id            TEXT PRIMARY KEY,
        hash          BYTEA NOT NULL,
        user_id       TEXT NOT NULL,
        groups        TEXT NOT NULL,
        method        TEXT NOT NULL,
        csrf          TEXT NOT NULL,
        device_id     TEXT,
        client        TEXT NOT NULL,
        created_ms    BIGINT NOT NULL,
        last_seen_ms  BIGINT NOT NULL,
        expires_ms    BIGINT NOT NULL
     );
     CREATE INDEX web_sessions_user ON web_sessions(user_id);
     CREATE TABLE devices (
        id          TEXT PRIMARY KEY,
        hash        BYTEA NOT NULL,
        user_id     TEXT NOT NULL,
        status      TEXT NOT NULL CHECK (status IN ('pending', 'approved', 'revoked')),
        client      TEXT NOT NULL,
        user_agent  TEXT NOT NULL,
        created_ms  BIGINT NOT NULL,
        decided_ms  BIGINT,
        decided_by  TEXT
     );
     CREATE INDEX devices_user ON devices(user_id);
     CREATE TABLE oidc_logins (
        state       TEXT PRIMARY KEY,
        nonce       TEXT NOT NULL,
        verifier    TEXT NOT NULL,
        browser     BYTEA NOT NULL,
        created_ms  BIGINT NOT NULL,
        expires_ms  BIGINT NOT NULL,
        used_ms     BIGINT
     );
     CREATE TABLE oidc_nonces_used (
        nonce    TEXT PRIMARY KEY,
        used_ms  BIGINT NOT NULL
     );",
    // 17: as SQLite's 17.
    "CREATE TABLE mcp_trust (
        server       TEXT PRIMARY KEY,
        identity     TEXT NOT NULL,
        list_digest  TEXT NOT NULL,
        trusted_ms   BIGINT NOT NULL,
        trusted_by   TEXT NOT NULL
     );
     CREATE TABLE mcp_pins (
        server       TEXT NOT NULL,
        tool         TEXT NOT NULL,
        digest       TEXT NOT NULL,
        definition   TEXT NOT NULL,
        PRIMARY KEY (server, tool)
     );",
    // 18: as SQLite's 18.
    "CREATE TABLE account_removed (
        user_hash   BYTEA PRIMARY KEY,
        removed_ms  BIGINT NOT NULL
     );",
    // 19: as SQLite's 19; the triggers are PL/pgSQL (row-level, like SQLite's). Integer
    // division of BIGINT truncates as in SQLite (times are never negative).
    "CREATE TABLE transcript_changes (
        id  BIGINT PRIMARY KEY CHECK (id = 1),
        n   BIGINT NOT NULL
     );
     INSERT INTO transcript_changes (id, n) VALUES (1, 0);
     CREATE FUNCTION transcript_changes_bump() RETURNS trigger LANGUAGE plpgsql AS $$
     BEGIN
        UPDATE transcript_changes SET n = n + 1 WHERE id = 1;
        RETURN NULL;
     END $$;
     CREATE TRIGGER messages_deleted_count AFTER DELETE ON messages
        FOR EACH ROW EXECUTE FUNCTION transcript_changes_bump();
     CREATE TRIGGER messages_updated_count AFTER UPDATE ON messages
        FOR EACH ROW EXECUTE FUNCTION transcript_changes_bump();
     CREATE INDEX messages_run ON messages(run_id, seq);
     CREATE TABLE spend_daily (
        user_id   TEXT NOT NULL,
        day       BIGINT NOT NULL,
        cost_usd  DOUBLE PRECISION NOT NULL,
        calls     BIGINT NOT NULL,
        PRIMARY KEY (user_id, day)
     );
     INSERT INTO spend_daily (user_id, day, cost_usd, calls)
        SELECT user_id, at_ms / 86400000, SUM(COALESCE(cost_usd, 0.0)), COUNT(*)
        FROM usage GROUP BY user_id, at_ms / 86400000;
     CREATE FUNCTION usage_spend_add(p_user TEXT, p_at BIGINT, p_cost DOUBLE PRECISION) RETURNS void
     LANGUAGE plpgsql AS $$
     BEGIN
        INSERT INTO spend_daily AS s (user_id, day, cost_usd, calls)
        VALUES (p_user, p_at / 86400000, COALESCE(p_cost, 0.0), 1)
        ON CONFLICT (user_id, day) DO UPDATE SET cost_usd = s.cost_usd + excluded.cost_usd,
                                                 calls = s.calls + 1;
     END $$;
     CREATE FUNCTION usage_spend_remove(p_user TEXT, p_at BIGINT, p_cost DOUBLE PRECISION) RETURNS void
     LANGUAGE plpgsql AS $$
     BEGIN
        UPDATE spend_daily SET cost_usd = cost_usd - COALESCE(p_cost, 0.0), calls = calls - 1
        WHERE user_id = p_user AND day = p_at / 86400000;
        DELETE FROM spend_daily WHERE user_id = p_user AND day = p_at / 86400000 AND calls <= 0;
     END $$;
     CREATE FUNCTION usage_spend_changed() RETURNS trigger LANGUAGE plpgsql AS $$
     BEGIN
        IF TG_OP = 'DELETE' OR TG_OP = 'UPDATE' THEN
           PERFORM usage_spend_remove(OLD.user_id, OLD.at_ms, OLD.cost_usd);
        END IF;
        IF TG_OP = 'INSERT' OR TG_OP = 'UPDATE' THEN
           PERFORM usage_spend_add(NEW.user_id, NEW.at_ms, NEW.cost_usd);
        END IF;
        RETURN NULL;
     END $$;
     CREATE TRIGGER usage_spend_insert AFTER INSERT ON usage
        FOR EACH ROW EXECUTE FUNCTION usage_spend_changed();
     CREATE TRIGGER usage_spend_delete AFTER DELETE ON usage
        FOR EACH ROW EXECUTE FUNCTION usage_spend_changed();
     CREATE TRIGGER usage_spend_update AFTER UPDATE OF user_id, at_ms, cost_usd ON usage
        FOR EACH ROW EXECUTE FUNCTION usage_spend_changed();",
    // 20: as SQLite's 20.
    "CREATE TABLE leases (
        name        TEXT PRIMARY KEY,
        owner       TEXT,
        expires_ms  BIGINT NOT NULL,
        fence       BIGINT NOT NULL
     );
     CREATE INDEX leases_owner ON leases(owner);
     CREATE TABLE replicas (
        id            TEXT PRIMARY KEY,
        host          TEXT NOT NULL,
        started_ms    BIGINT NOT NULL,
        heartbeat_ms  BIGINT NOT NULL,
        version       TEXT NOT NULL
     );",
    // 21: as SQLite's 21 (rows copied from SQLite carry their `seq`).
    "ALTER TABLE workflow_steps ADD COLUMN seq BIGINT;",
    // 22: as SQLite's 22.
    "CREATE TABLE auth_failures (
        client TEXT NOT NULL,
        at_ms BIGINT NOT NULL
     );
     CREATE INDEX auth_failures_client ON auth_failures (client, at_ms);
     CREATE INDEX auth_failures_at ON auth_failures (at_ms);
     CREATE TABLE auth_lockouts (
        client TEXT PRIMARY KEY,
        until_ms BIGINT NOT NULL
     );",
    // 23: as SQLite's 23.
    "ALTER TABLE cron_firings ADD COLUMN replica TEXT;
     ALTER TABLE hook_deliveries ADD COLUMN replica TEXT;
     ALTER TABLE workflow_runs ADD COLUMN runner_replica TEXT;
     ALTER TABLE workflow_runs ADD COLUMN runner_host TEXT;",
    // 24: as SQLite's 24.
    "CREATE TABLE vault_keys (
        id BIGINT PRIMARY KEY CHECK (id = 1),
        sealed BYTEA NOT NULL,
        version BIGINT NOT NULL
     );",
    // 25: as SQLite's 25.
    "DROP INDEX channel_outbox_edits;
     CREATE INDEX channel_outbox_edits ON channel_outbox(channel, status, next_attempt_ms)
        WHERE edit_text IS NOT NULL;",
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_backends_have_the_same_migrations_by_number() {
        assert_eq!(SQLITE.len(), POSTGRES.len());
    }

    #[test]
    fn no_postgres_migration_keeps_a_sqlite_only_type_or_keyword() {
        for (i, m) in POSTGRES.iter().enumerate() {
            for word in [
                "STRICT",
                "AUTOINCREMENT",
                " BLOB",
                " REAL",
                "INTEGER PRIMARY",
                "VIRTUAL TABLE",
            ] {
                assert!(!m.contains(word), "migration {}: {word}", i + 1);
            }
        }
    }
}
