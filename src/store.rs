//! The embedded store: one SQLite database (`state.db`, bundled SQLite) in WAL mode with
//! versioned migrations. The audit log has its own database file (see the audit crate).
//!
//! Invariants: migrations are applied in order inside one transaction each and are never
//! edited once released; a database written by a newer Chitin is refused, not downgraded.
//!
//! Durability (group commit): SQLite runs with `synchronous=NORMAL` (a commit writes its WAL
//! frames without an fsync) and the [`StoreConn`] guard makes every commit durable before it
//! is handed back: a guard under which something was committed takes a ticket while it still
//! holds the connection, lets go of the connection, and returns only after an `fdatasync` of
//! the WAL file that started after its ticket. Concurrent committers share one fsync, and no
//! one waits for another's fsync while holding the connection. Same guarantee as
//! `synchronous=FULL` (acknowledged means on disk), without one fsync per commit under the
//! lock. A failed fsync aborts the process: nothing written since is acknowledged, and what is
//! on disk is what SQLite recovers.

use std::fs::File;
use std::ops::{Deref, DerefMut};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use rusqlite::{Connection, OptionalExtension, params};

/// Errors of the embedded store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("store {path}: {source}")]
    Sqlite {
        path: PathBuf,
        source: rusqlite::Error,
    },
    #[error(
        "store {path} has schema version {found}, newer than this Chitin understands ({known}): \
         it was written by a newer Chitin, and this one refuses to touch it rather than lose data. \
         Run the newer `chitin` binary again (`chitin --version` shows which one this is), or, to go \
         back to this version, restore a backup made by it (`chitin backup restore FILE`, or the \
         copy `state.db.before-schema-*.bak` kept by the upgrade next to the database)"
    )]
    TooNew {
        path: PathBuf,
        found: i64,
        known: i64,
    },
    #[error(transparent)]
    State(#[from] crate::state::StateError),
    #[error("store lock poisoned by a panic in another thread; restart the gateway")]
    Poisoned,
}

/// The migrations, in order. Index + 1 is the schema version. Append only.
const MIGRATIONS: &[&str] = &[
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
    // 18 (issue #21, the agent turn's cost): a counter of changes to stored messages other
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
];

/// The state database.
#[derive(Debug)]
pub struct Store {
    path: PathBuf,
    conn: Mutex<Connection>,
    /// When this open migrated an existing database: its schema version before, and the copy
    /// of it taken first.
    migrated: Option<(i64, PathBuf)>,
    /// Set by the connection's commit hook: something was committed under the current guard.
    committed: Arc<AtomicBool>,
    /// The group fsync of the WAL.
    wal: WalSync,
}

/// The group fsync of `state.db-wal` (see the module docs).
#[derive(Debug)]
struct WalSync {
    path: PathBuf,
    state: Mutex<SyncState>,
    done: Condvar,
}

#[derive(Debug, Default)]
struct SyncState {
    /// Tickets handed out (one per guard that committed), in commit order.
    issued: u64,
    /// Every ticket up to this one is durable.
    synced: u64,
    /// An fsync is running.
    syncing: bool,
    /// Fsyncs made.
    fsyncs: u64,
    /// The WAL file and its inode (reopened if SQLite ever replaced the file).
    file: Option<(File, u64)>,
}

impl WalSync {
    fn new(db: &Path) -> Self {
        let mut name = db.as_os_str().to_os_string();
        name.push("-wal");
        Self {
            path: PathBuf::from(name),
            state: Mutex::new(SyncState::default()),
            done: Condvar::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, SyncState> {
        match self.state.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    }

    /// A ticket for a commit just made (called while the connection is still held, so tickets
    /// follow commit order).
    fn ticket(&self) -> u64 {
        let mut st = self.lock();
        st.issued += 1;
        st.issued
    }

    /// Returns once the commit of `ticket` is on disk: joins the fsync in progress when it
    /// started after the ticket, otherwise runs one (covering every ticket issued so far).
    fn wait_durable(&self, ticket: u64) {
        let mut st = self.lock();
        loop {
            if st.synced >= ticket {
                return;
            }
            if st.syncing {
                st = match self.done.wait(st) {
                    Ok(g) => g,
                    Err(p) => p.into_inner(),
                };
                continue;
            }
            st.syncing = true;
            let target = st.issued;
            let file = match st.file.take() {
                Some(f) => Some(f),
                None => open_wal(&self.path),
            };
            drop(st);
            let (file, ok) = match file {
                Some((f, ino)) => {
                    // Reopen when SQLite replaced the file (never while this store's
                    // connection is open, but checked rather than assumed).
                    let (f, ino) = match wal_inode(&self.path) {
                        Some(now) if now != ino => open_wal(&self.path).unwrap_or((f, ino)),
                        _ => (f, ino),
                    };
                    let ok = f.sync_data().is_ok();
                    (Some((f, ino)), ok)
                }
                None => (None, false),
            };
            if !ok {
                // Commits were handed to SQLite that may not be on disk: acknowledging them
                // (or anything after them) would break "acknowledged means durable".
                tracing::error!(wal = %self.path.display(), "fsync of the state database's WAL failed: stopping so that nothing unsaved is acknowledged");
                std::process::abort();
            }
            st = self.lock();
            st.file = file;
            st.syncing = false;
            st.fsyncs += 1;
            st.synced = st.synced.max(target);
            self.done.notify_all();
        }
    }
}

/// Counters of the group commit (for benchmarks and tests).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Durability {
    /// Guards under which something was committed (each took a ticket).
    pub commits: u64,
    /// Every commit up to this ticket is on disk.
    pub synced: u64,
    /// Fsyncs of the WAL made for them.
    pub fsyncs: u64,
}

/// The WAL file, opened to `fdatasync` it (SQLite writes it through its own descriptor; the
/// fsync is of the file). `None` when it cannot be opened.
fn open_wal(path: &Path) -> Option<(File, u64)> {
    let f = File::open(path).ok()?;
    let ino = std::os::unix::fs::MetadataExt::ino(&f.metadata().ok()?);
    Some((f, ino))
}

/// The inode the WAL file's path names now.
fn wal_inode(path: &Path) -> Option<u64> {
    std::fs::metadata(path)
        .ok()
        .map(|m| std::os::unix::fs::MetadataExt::ino(&m))
}

/// Exclusive access to the state database's connection. Dropping it after a commit waits until
/// the commit is durable (see the module docs), after letting go of the connection.
pub struct StoreConn<'a> {
    // Dropped in this order: the connection is let go of, then the wait runs.
    guard: MutexGuard<'a, Connection>,
    after: AfterRelease<'a>,
}

/// The wait for durability, run after the connection was let go of.
struct AfterRelease<'a> {
    store: &'a Store,
    ticket: Option<u64>,
}

impl Deref for StoreConn<'_> {
    type Target = Connection;
    fn deref(&self) -> &Connection {
        &self.guard
    }
}

impl DerefMut for StoreConn<'_> {
    fn deref_mut(&mut self) -> &mut Connection {
        &mut self.guard
    }
}

impl Drop for StoreConn<'_> {
    fn drop(&mut self) {
        // Still holding the connection: the ticket follows commit order.
        if self.after.store.committed.swap(false, Ordering::SeqCst) {
            self.after.ticket = Some(self.after.store.wal.ticket());
        }
    }
}

impl Drop for AfterRelease<'_> {
    fn drop(&mut self) {
        if let Some(t) = self.ticket {
            self.store.wal.wait_durable(t);
        }
    }
}

impl Store {
    /// Opens (creating if needed, mode 0600) and migrates the database at `path`.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        crate::state::ensure_private_file(path)?;
        let sql = |source| StoreError::Sqlite {
            path: path.to_path_buf(),
            source,
        };
        let mut conn = Connection::open(path).map_err(sql)?;
        conn.busy_timeout(std::time::Duration::from_secs(5))
            .map_err(sql)?;
        // The agent, approvals and retention reuse a few dozen statements on every turn.
        conn.set_prepared_statement_cache_capacity(64);
        let mode: String = conn
            .query_row("PRAGMA journal_mode=WAL", [], |r| r.get(0))
            .map_err(sql)?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(sql(rusqlite::Error::InvalidQuery));
        }
        // Migrations commit with an fsync each (FULL); then NORMAL (below).
        conn.pragma_update(None, "synchronous", "FULL")
            .map_err(sql)?;
        conn.pragma_update(None, "foreign_keys", "ON")
            .map_err(sql)?;
        // Deleted content is overwritten, not left in free pages.
        conn.pragma_update(None, "secure_delete", "ON")
            .map_err(sql)?;
        let migrated = migrate(&mut conn, path)?;
        // NORMAL: no fsync inside a commit (under the connection); `StoreConn` makes each
        // commit durable before it is acknowledged, one fsync for every commit waiting.
        conn.pragma_update(None, "synchronous", "NORMAL")
            .map_err(sql)?;
        let committed = Arc::new(AtomicBool::new(false));
        {
            let flag = Arc::clone(&committed);
            conn.commit_hook(Some(move || {
                flag.store(true, Ordering::SeqCst);
                // false: let the commit go ahead.
                false
            }))
            .map_err(sql)?;
        }
        Ok(Self {
            path: path.to_path_buf(),
            conn: Mutex::new(conn),
            migrated,
            committed,
            wal: WalSync::new(path),
        })
    }

    /// Whether opening migrated an existing database: the schema version it had, and where
    /// the copy taken before migrating is (`state.db.before-schema-<new>.bak`).
    pub fn migrated_from(&self) -> Option<(i64, &Path)> {
        self.migrated.as_ref().map(|(v, p)| (*v, p.as_path()))
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The schema version this binary migrates to.
    pub fn latest_version() -> i64 {
        i64::try_from(MIGRATIONS.len()).unwrap_or(i64::MAX)
    }

    /// The schema version of the open database.
    pub fn version(&self) -> Result<i64, StoreError> {
        let conn = self.conn()?;
        current_version(&conn).map_err(|source| StoreError::Sqlite {
            path: self.path.clone(),
            source,
        })
    }

    /// The group commit's counters so far.
    pub fn durability(&self) -> Durability {
        let st = self.wal.lock();
        Durability {
            commits: st.issued,
            synced: st.synced,
            fsyncs: st.fsyncs,
        }
    }

    /// Exclusive access to the connection; a commit made through it is durable when the
    /// guard has been dropped.
    pub fn conn(&self) -> Result<StoreConn<'_>, StoreError> {
        let guard = self.conn.lock().map_err(|_| StoreError::Poisoned)?;
        Ok(StoreConn {
            guard,
            after: AfterRelease {
                store: self,
                ticket: None,
            },
        })
    }

    /// Reads a `meta` value.
    pub fn meta(&self, key: &str) -> Result<Option<String>, StoreError> {
        let conn = self.conn()?;
        conn.query_row("SELECT value FROM meta WHERE key = ?1", [key], |r| r.get(0))
            .optional()
            .map_err(|source| StoreError::Sqlite {
                path: self.path.clone(),
                source,
            })
    }

    /// Writes a `meta` value.
    pub fn set_meta(&self, key: &str, value: &str) -> Result<(), StoreError> {
        let conn = self.conn()?;
        conn.execute(
            "INSERT INTO meta(key, value) VALUES (?1, ?2)
             ON CONFLICT(key) DO UPDATE SET value = excluded.value",
            params![key, value],
        )
        .map(|_| ())
        .map_err(|source| StoreError::Sqlite {
            path: self.path.clone(),
            source,
        })
    }
}

fn current_version(conn: &Connection) -> rusqlite::Result<i64> {
    conn.query_row("PRAGMA user_version", [], |r| r.get(0))
}

/// Copies the database (consistent, through SQLite: `VACUUM INTO`) to
/// `<path>.before-schema-<known>.bak`, mode 0600, replacing an older copy atomically.
fn backup_before_migrating(
    conn: &Connection,
    path: &Path,
    known: i64,
) -> Result<PathBuf, StoreError> {
    use std::os::unix::fs::OpenOptionsExt;
    let name = path
        .file_name()
        .map_or_else(|| "state.db".into(), |n| n.to_string_lossy().into_owned());
    let target = path.with_file_name(format!("{name}.before-schema-{known}.bak"));
    let tmp = path.with_file_name(format!("{name}.before-schema-{known}.bak.tmp"));
    let io = |source: std::io::Error| StoreError::Sqlite {
        path: tmp.clone(),
        source: rusqlite::Error::ToSqlConversionFailure(Box::new(source)),
    };
    let _ = std::fs::remove_file(&tmp);
    // Created empty and private first: VACUUM INTO fills an empty file and keeps its mode.
    drop(
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&tmp)
            .map_err(io)?,
    );
    let tmp_text = tmp.to_string_lossy().into_owned();
    conn.execute("VACUUM INTO ?1", [&tmp_text])
        .map_err(|source| StoreError::Sqlite {
            path: tmp.clone(),
            source,
        })?;
    std::fs::File::open(&tmp)
        .and_then(|f| f.sync_all())
        .map_err(io)?;
    std::fs::rename(&tmp, &target).map_err(io)?;
    if let Some(dir) = target.parent() {
        std::fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(io)?;
    }
    Ok(target)
}

fn migrate(conn: &mut Connection, path: &Path) -> Result<Option<(i64, PathBuf)>, StoreError> {
    let sql = |source| StoreError::Sqlite {
        path: path.to_path_buf(),
        source,
    };
    let found = current_version(conn).map_err(sql)?;
    let known = Store::latest_version();
    if found > known {
        return Err(StoreError::TooNew {
            path: path.to_path_buf(),
            found,
            known,
        });
    }
    // An existing database is copied before the first migration touches it.
    let migrated = if found > 0 && found < known {
        Some((found, backup_before_migrating(conn, path, known)?))
    } else {
        None
    };
    for (i, migration) in MIGRATIONS
        .iter()
        .enumerate()
        .skip(usize::try_from(found).unwrap_or(0))
    {
        let version = i64::try_from(i + 1).unwrap_or(i64::MAX);
        let tx = conn.transaction().map_err(sql)?;
        tx.execute_batch(migration).map_err(sql)?;
        tx.pragma_update(None, "user_version", version)
            .map_err(sql)?;
        tx.commit().map_err(sql)?;
    }
    Ok(migrated)
}

#[cfg(test)]
mod tests {
    #![allow(
        clippy::unwrap_used,
        clippy::expect_used,
        clippy::panic,
        reason = "tests"
    )]
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    #[test]
    fn a_new_store_is_private_wal_and_fully_migrated() {
        let t = tempfile::tempdir().unwrap();
        let p = t.path().join("state.db");
        let s = Store::open(&p).unwrap();
        assert_eq!(s.version().unwrap(), Store::latest_version());
        let mode: String = s
            .conn()
            .unwrap()
            .query_row("PRAGMA journal_mode", [], |r| r.get(0))
            .unwrap();
        assert_eq!(mode, "wal");
        assert_eq!(
            std::fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            0o600
        );
    }

    #[test]
    fn reopening_keeps_data_and_does_not_rerun_migrations() {
        let t = tempfile::tempdir().unwrap();
        let p = t.path().join("state.db");
        Store::open(&p).unwrap().set_meta("k", "v").unwrap();
        let s = Store::open(&p).unwrap();
        assert_eq!(s.meta("k").unwrap().as_deref(), Some("v"));
        assert_eq!(s.version().unwrap(), Store::latest_version());
    }

    #[test]
    fn a_database_from_a_newer_chitin_is_refused() {
        let t = tempfile::tempdir().unwrap();
        let p = t.path().join("state.db");
        drop(Store::open(&p).unwrap());
        let c = Connection::open(&p).unwrap();
        c.pragma_update(None, "user_version", 99).unwrap();
        drop(c);
        let err = Store::open(&p).unwrap_err().to_string();
        assert!(err.contains("schema version 99, newer than"), "{err}");
        assert!(err.contains("Run the newer `chitin` binary"), "{err}");
        assert!(err.contains("chitin backup restore FILE"), "{err}");
        // Refused before anything was written: still the newer version.
        let c = Connection::open(&p).unwrap();
        assert_eq!(current_version(&c).unwrap(), 99);
    }

    #[test]
    fn migrating_an_older_database_first_keeps_a_copy_of_it() {
        let t = tempfile::tempdir().unwrap();
        let p = t.path().join("state.db");
        // A database as the previous release left it: every migration but the last.
        let older = Store::latest_version() - 1;
        {
            let mut c = Connection::open(&p).unwrap();
            for (i, m) in MIGRATIONS
                .iter()
                .take(usize::try_from(older).unwrap())
                .enumerate()
            {
                let tx = c.transaction().unwrap();
                tx.execute_batch(m).unwrap();
                tx.pragma_update(None, "user_version", i64::try_from(i + 1).unwrap())
                    .unwrap();
                tx.commit().unwrap();
            }
            c.execute("INSERT INTO meta(key, value) VALUES ('k', 'before')", [])
                .unwrap();
        }
        let s = Store::open(&p).unwrap();
        assert_eq!(s.version().unwrap(), Store::latest_version());
        let (from, copy) = s.migrated_from().unwrap();
        assert_eq!(from, older);
        let copy = copy.to_path_buf();
        assert_eq!(
            copy,
            t.path().join(format!(
                "state.db.before-schema-{}.bak",
                Store::latest_version()
            ))
        );
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(&copy).unwrap().permissions().mode() & 0o777,
            0o600
        );
        let c = Connection::open(&copy).unwrap();
        assert_eq!(current_version(&c).unwrap(), older);
        let v: String = c
            .query_row("SELECT value FROM meta WHERE key = 'k'", [], |r| r.get(0))
            .unwrap();
        assert_eq!(v, "before");
        // A database already at the latest version is not copied again.
        drop(s);
        std::fs::remove_file(&copy).unwrap();
        assert!(Store::open(&p).unwrap().migrated_from().is_none());
        assert!(!copy.exists());
    }
}
