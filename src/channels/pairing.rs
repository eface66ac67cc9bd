//! Pairing: codes for unpaired identities, decisions by Cedar `pairing.approve`, and the
//! managed entity store (`managed_entities`: identity -> user) merged into the policy engine.

use chitin_audit::{Kind, RecordInput};
use chitin_channels::{ChatKind, ChatRef, Message};
use chitin_store::Conn;
use serde::Serialize;
use serde_json::{Map, Value, json};

use super::ingress::{Admission, DenyReason};
use super::outbox::{OutboxKind, OutboxNew};
use super::{
    ChannelSettings, ChannelsError, Engine, MAX_PENDING_PAIRINGS, PAIRING_RATE_WINDOW_MS,
    conversation_uid, identity_uid, user_uid,
};
use crate::clock::rfc3339;
use crate::gate::{Verdict, admin_request};
use crate::policy::Action;
use crate::store::params;

/// 32 letters and digits that are not confused when read or typed (no I, O, 0, 1): a code of
/// [`CODE_LEN`] of them carries 40 bits.
const CODE_ALPHABET: &[u8; 32] = b"ABCDEFGHJKLMNPQRSTUVWXYZ23456789";
const CODE_LEN: usize = 8;

/// An open pairing request, as listed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PairingRequest {
    pub code: String,
    pub channel: String,
    /// `<kind>:<platform user id>`.
    pub identity: String,
    pub chat_id: String,
    pub status: String,
    pub created_at: String,
    pub expires_at: String,
    pub user: Option<String>,
    pub resolved_by: Option<String>,
}

fn new_code() -> Result<String, ChannelsError> {
    let mut b = [0u8; CODE_LEN];
    getrandom::fill(&mut b).map_err(|e| ChannelsError::Random(e.to_string()))?;
    // 256 is a multiple of 32: every letter is equally likely.
    Ok(b.iter()
        .map(|x| char::from(CODE_ALPHABET[usize::from(*x) % CODE_ALPHABET.len()]))
        .collect())
}

/// A code as people type it: case, spaces and dashes ignored.
fn normalize_code(code: &str) -> String {
    code.chars()
        .filter(|c| !c.is_whitespace() && *c != '-')
        .map(|c| c.to_ascii_uppercase())
        .take(64)
        .collect()
}

fn expire_due(tx: &mut Conn<'_>, now: i64) -> Result<u64, chitin_store::Error> {
    tx.execute(
        "UPDATE pairing_requests SET status = 'expired', resolved_ms = ?1 WHERE status = 'pending' AND expires_ms <= ?1",
        params![now],
    )
}

fn row(r: &chitin_store::Row) -> Result<PairingRequest, ChannelsError> {
    Ok(PairingRequest {
        code: r.get(0)?,
        channel: r.get(1)?,
        identity: r.get(2)?,
        chat_id: r.get(3)?,
        status: r.get(4)?,
        created_at: rfc3339(r.get(5)?),
        expires_at: rfc3339(r.get(6)?),
        user: r.get(7)?,
        resolved_by: r.get(8)?,
    })
}

const COLUMNS: &str =
    "code, channel, identity, chat_id, status, created_ms, expires_ms, user_id, resolved_by";

impl Engine {
    /// Issues a pairing code to an unpaired identity writing in a DM (inside the admission's
    /// transaction): at most one per identity per [`PAIRING_RATE_WINDOW_MS`], at most
    /// [`MAX_PENDING_PAIRINGS`] open, exactly one outbox reply carrying it. Audited.
    pub(super) fn offer_pairing_in(
        &self,
        tx: &mut Conn<'_>,
        ch: &ChannelSettings,
        identity: &str,
        m: &Message,
        now: i64,
    ) -> Result<Admission, ChannelsError> {
        expire_due(tx, now)?;
        let recent: i64 = tx
            .query_row(
                "SELECT COUNT(*) FROM pairing_requests WHERE identity = ?1 AND created_ms > ?2",
                params![identity, now.saturating_sub(PAIRING_RATE_WINDOW_MS)],
            )?
            .get(0)?;
        if recent > 0 {
            return Ok(Admission::Denied(DenyReason::PairingAlreadySent));
        }
        let open: i64 = tx
            .query_row(
                "SELECT COUNT(*) FROM pairing_requests WHERE status = 'pending'",
                params![],
            )?
            .get(0)?;
        if open >= MAX_PENDING_PAIRINGS {
            self.audit(
                RecordInput::new(
                    Kind::Admin,
                    identity_uid(identity),
                    "pairing.request",
                    conversation_uid(&ch.kind, &m.chat),
                )
                .with_outcome("refused: too many open pairing codes")
                .with_payload(json!({"channel": ch.name, "open": open})),
            )?;
            return Ok(Admission::Denied(DenyReason::PairingListFull));
        }
        let mut code = String::new();
        for _ in 0..16 {
            let c = new_code()?;
            let taken = tx.query_opt(
                "SELECT code FROM pairing_requests WHERE code = ?1",
                params![c],
            )?;
            if taken.is_none() {
                code = c;
                break;
            }
        }
        if code.is_empty() {
            return Err(ChannelsError::Random(
                "could not find a free pairing code".into(),
            ));
        }
        let expires = now.saturating_add(ch.pairing_ttl_ms);
        tx.execute(
            "INSERT INTO pairing_requests (code, channel, identity, chat_id, created_ms, expires_ms, status)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, 'pending')",
            params![code, ch.name, identity, m.chat.id, now, expires],
        )?;
        let minutes = ch.pairing_ttl_ms / 60_000;
        let text = format!(
            "This account is not paired with this assistant yet.\n\nPairing code: {code}\n\n\
             Ask the owner to run: chitin pairing approve {code}\n(The code expires in {minutes} minutes.)"
        );
        let outbox_id = self.enqueue_in(
            tx,
            &OutboxNew {
                channel: ch.name.clone(),
                chat: m.chat.clone(),
                text,
                buttons: Vec::new(),
                reply_to: Some(m.message_id.clone()),
                kind: OutboxKind::Pairing,
                dedup_key: None,
            },
            now,
        )?;
        self.audit(
            RecordInput::new(
                Kind::Admin,
                identity_uid(identity),
                "pairing.request",
                conversation_uid(&ch.kind, &m.chat),
            )
            .with_outcome("pending")
            .with_payload(
                json!({"channel": ch.name, "code": code, "expires_at": rfc3339(expires)}),
            ),
        )?;
        Ok(Admission::PairingCodeSent { outbox_id })
    }

    /// Open pairing requests, newest first (after expiring the ones that are due).
    pub fn pairing_list(&self) -> Result<Vec<PairingRequest>, ChannelsError> {
        let now = self.clock.now_ms();
        self.store.db().tx(|tx| {
            expire_due(tx, now)?;
            tx.query_map(
                &format!(
                    "SELECT {COLUMNS} FROM pairing_requests WHERE status = 'pending' ORDER BY created_ms DESC, code"
                ),
                params![],
                row,
            )
        })
    }

    /// The open pairing requests, for `user` only if Cedar permits `pairing.approve` for
    /// them (a user who may not decide pairings does not see who asked): the WebSocket's and
    /// the web page's `pairing.list`.
    pub fn pairing_list_for(&self, user: &str) -> Result<Vec<PairingRequest>, ChannelsError> {
        self.may_decide_pairings(user)?;
        self.pairing_list()
    }

    /// Cedar `pairing.approve` for `user` (recorded by the gate); refused unless allowed.
    fn may_decide_pairings(&self, user: &str) -> Result<(), ChannelsError> {
        let req = admin_request(user, Action::PairingApprove, Map::new())?;
        match self.gate.check(&req)? {
            Verdict::Allowed(..) => Ok(()),
            other => {
                let d = other.decision();
                Err(ChannelsError::PairingRefused {
                    user: user.into(),
                    decision: d.decision.as_str().into(),
                    policies: if d.policies.is_empty() {
                        String::new()
                    } else {
                        format!(": {}", d.policies.join(", "))
                    },
                })
            }
        }
    }

    fn pending(&self, code: &str) -> Result<PairingRequest, ChannelsError> {
        let now = self.clock.now_ms();
        let r = self.store.db().tx(|tx| {
            expire_due(tx, now)?;
            tx.query_opt(
                &format!("SELECT {COLUMNS} FROM pairing_requests WHERE code = ?1"),
                params![code],
            )?
            .map(|r| row(&r))
            .transpose()
        })?;
        let r =
            r.ok_or_else(|| ChannelsError::PairingNotFound(code.escape_default().to_string()))?;
        match r.status.as_str() {
            "pending" => Ok(r),
            "expired" => Err(ChannelsError::PairingExpired(r.code)),
            other => Err(ChannelsError::PairingNotPending {
                code: r.code.clone(),
                status: other.into(),
            }),
        }
    }

    /// Approves pairing `code` on behalf of `acting_user` (Cedar `pairing.approve`): the
    /// identity becomes a member of `target_user` in the managed entity store, the policy
    /// engine is updated, the identity is told in its chat, and the step is audited.
    pub fn pairing_approve(
        &self,
        code: &str,
        acting_user: &str,
        target_user: &str,
    ) -> Result<PairingRequest, ChannelsError> {
        let code = normalize_code(code);
        let req = self.pending(&code)?;
        self.may_decide_pairings(acting_user)?;
        let active = self.gate.engine().active();
        let target = crate::policy::user_uid(target_user);
        if active.entities.get(&target).is_none() {
            return Err(ChannelsError::UnknownUser(
                target_user.escape_default().to_string(),
            ));
        }
        let mut managed = self.managed_rows()?;
        let ident = crate::policy::identity_uid(&req.identity);
        if active.entities.get(&ident).is_some()
            && !managed.iter().any(|(i, _, _)| *i == req.identity)
        {
            return Err(ChannelsError::DefinedInEntityFiles(req.identity));
        }
        drop(active);
        managed.retain(|(i, _, _)| *i != req.identity);
        managed.push((
            req.identity.clone(),
            target_user.to_string(),
            req.channel.clone(),
        ));
        // Checked before anything is stored: the new store must build with the active set.
        self.gate
            .engine()
            .check_managed_entities(&managed_json(&managed))?;
        let now = self.clock.now_ms();
        self.store.db().tx(|tx| {
            let changed = tx.execute(
                "UPDATE pairing_requests SET status = 'approved', user_id = ?2, resolved_by = ?3, resolved_ms = ?4
                 WHERE code = ?1 AND status = 'pending' AND expires_ms > ?4",
                params![code, target_user, acting_user, now],
            )?;
            if changed != 1 {
                return Err(ChannelsError::PairingNotPending {
                    code: code.clone(),
                    status: "resolved by someone else or expired".into(),
                });
            }
            tx.execute(
                "INSERT INTO managed_entities (identity, user_id, channel, added_by, added_ms) VALUES (?1, ?2, ?3, ?4, ?5)
                 ON CONFLICT(identity) DO UPDATE SET user_id = excluded.user_id, channel = excluded.channel,
                   added_by = excluded.added_by, added_ms = excluded.added_ms",
                params![req.identity, target_user, req.channel, acting_user, now],
            )?;
            if self.channels.contains_key(&req.channel) {
                self.enqueue_in(
                    tx,
                    &OutboxNew {
                        channel: req.channel.clone(),
                        chat: ChatRef {
                            id: req.chat_id.clone(),
                            kind: ChatKind::Dm,
                            thread: None,
                        },
                        text: "Paired: you can talk to the assistant now.".into(),
                        buttons: Vec::new(),
                        reply_to: None,
                        kind: OutboxKind::Pairing,
                        dedup_key: None,
                    },
                    now,
                )?;
            }
            self.audit(
                RecordInput::admin(
                    user_uid(acting_user),
                    "pairing.approve",
                    identity_uid(&req.identity),
                    json!({"code": code, "channel": req.channel, "user": target_user}),
                )
                .with_outcome("approved"),
            )
        })?;
        self.load_managed_entities()?;
        Ok(PairingRequest {
            status: "approved".into(),
            user: Some(target_user.into()),
            resolved_by: Some(acting_user.into()),
            ..req
        })
    }

    /// Denies pairing `code` on behalf of `acting_user` (Cedar `pairing.approve`). Audited.
    pub fn pairing_deny(
        &self,
        code: &str,
        acting_user: &str,
    ) -> Result<PairingRequest, ChannelsError> {
        let code = normalize_code(code);
        let req = self.pending(&code)?;
        self.may_decide_pairings(acting_user)?;
        let now = self.clock.now_ms();
        self.store.db().tx(|tx| {
            let changed = tx.execute(
                "UPDATE pairing_requests SET status = 'denied', resolved_by = ?2, resolved_ms = ?3
                 WHERE code = ?1 AND status = 'pending'",
                params![code, acting_user, now],
            )?;
            if changed != 1 {
                return Err(ChannelsError::PairingNotPending {
                    code: code.clone(),
                    status: "resolved by someone else".into(),
                });
            }
            self.audit(
                RecordInput::admin(
                    user_uid(acting_user),
                    "pairing.deny",
                    identity_uid(&req.identity),
                    json!({"code": code, "channel": req.channel}),
                )
                .with_outcome("denied"),
            )
        })?;
        Ok(PairingRequest {
            status: "denied".into(),
            resolved_by: Some(acting_user.into()),
            ..req
        })
    }

    /// Removes `identity` (`telegram:123` or `Chitin::Identity::"telegram:123"`) from the
    /// managed store on behalf of `acting_user` (Cedar `pairing.approve`); its next message is
    /// unpaired again. Audited.
    pub fn pairing_revoke(&self, identity: &str, acting_user: &str) -> Result<(), ChannelsError> {
        let identity = parse_identity(identity)?;
        self.may_decide_pairings(acting_user)?;
        self.store.db().tx(|tx| {
            let user: Option<String> = tx
                .query_opt(
                    "DELETE FROM managed_entities WHERE identity = ?1 RETURNING user_id",
                    params![identity],
                )?
                .map(|r| r.get(0))
                .transpose()?;
            let Some(user) = user else {
                return Err(ChannelsError::NotPaired(identity.clone()));
            };
            self.audit(
                RecordInput::admin(
                    user_uid(acting_user),
                    "pairing.revoke",
                    identity_uid(&identity),
                    json!({"user": user}),
                )
                .with_outcome("revoked"),
            )
        })?;
        self.load_managed_entities()?;
        Ok(())
    }

    fn managed_rows(&self) -> Result<Vec<(String, String, String)>, ChannelsError> {
        self.store.db().with(|c| {
            c.query_map(
                "SELECT identity, user_id, channel FROM managed_entities ORDER BY identity",
                params![],
                |r| Ok::<_, ChannelsError>((r.get(0)?, r.get(1)?, r.get(2)?)),
            )
        })
    }

    /// Installs the managed entity store of `state.db` (paired identities as members of their
    /// users) into the policy engine, merged with the entity files. Call at start; the pairing
    /// functions call it after every change.
    pub fn load_managed_entities(&self) -> Result<usize, ChannelsError> {
        let rows = self.managed_rows()?;
        let n = rows.len();
        self.gate
            .engine()
            .set_managed_entities(managed_json(&rows))?;
        Ok(n)
    }
}

fn managed_json(rows: &[(String, String, String)]) -> Vec<Value> {
    rows.iter()
        .map(|(identity, user, channel)| {
            json!({
                "uid": {"type": "Chitin::Identity", "id": identity},
                "attrs": {"channel": channel},
                "parents": [{"type": "Chitin::User", "id": user}],
            })
        })
        .collect()
}

/// `telegram:123` from `telegram:123` or `Chitin::Identity::"telegram:123"`.
fn parse_identity(s: &str) -> Result<String, ChannelsError> {
    let bad = || ChannelsError::InvalidIdentity(s.escape_default().to_string());
    let id = match s.strip_prefix("Chitin::Identity::") {
        Some(q) => serde_json::from_str::<String>(q).map_err(|_| bad())?,
        None => s.to_string(),
    };
    match id.split_once(':') {
        Some((k, rest))
            if !k.is_empty() && !rest.is_empty() && !id.chars().any(char::is_control) =>
        {
            Ok(id)
        }
        _ => Err(bad()),
    }
}

#[cfg(test)]
mod tests {
    #![allow(
        clippy::unwrap_used,
        clippy::expect_used,
        clippy::panic,
        reason = "tests"
    )]
    use super::*;

    #[test]
    fn codes_are_eight_letters_of_the_unambiguous_alphabet_and_differ() {
        let a = new_code().unwrap();
        let b = new_code().unwrap();
        assert_eq!(a.len(), 8);
        assert!(a.bytes().all(|c| CODE_ALPHABET.contains(&c)), "{a}");
        assert_ne!(a, b);
        assert_eq!(normalize_code("abcd-efgh "), "ABCDEFGH");
    }

    #[test]
    fn identities_parse_in_both_forms() {
        assert_eq!(parse_identity("telegram:1").unwrap(), "telegram:1");
        assert_eq!(
            parse_identity("Chitin::Identity::\"telegram:1\"").unwrap(),
            "telegram:1"
        );
        assert!(parse_identity("telegram").is_err());
    }
}
