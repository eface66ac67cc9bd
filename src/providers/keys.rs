//! [`GateKeySource`]: the production [`KeySource`]. Every key request is a gate decision
//! (`secret.use` by `Chitin::Provider::"<name>"` on `Chitin::Secret::"NAME"` with context
//! `{host}`), recorded in the audit log; only an `allow` reaches the secret store.
//!
//! The request carries the Secret entity built from the store (its `audience`), so the
//! default policy `secrets.providers-use-keys-for-their-audience` can permit a provider's key
//! for exactly the hosts in the secret's audience.

use std::sync::Arc;

use serde_json::{Map, json};

use super::{KeyRequest, KeySource};
use crate::gate::{Authorized, Gate, Verdict};
use crate::policy::PolicyRequest;
use crate::secrets::{SecretName, SecretRef, SecretValue, SharedSecretStore};

/// Releases a secret for an allowed request: the gateway passes a closure over its
/// [`crate::secrets::SecretStore`] that calls `store.release(authz, host, audit)` and copies
/// the value (`SecretValue::from_bytes(v.expose().to_vec())`).
pub type ReleaseFn = Arc<dyn Fn(&Authorized, &str) -> Result<SecretValue, String> + Send + Sync>;

/// Reads `env:VAR` credentials (containers). `None`: `env:` credentials are refused.
pub type EnvFn = Arc<dyn Fn(&str) -> Option<SecretValue> + Send + Sync>;

/// The Cedar entity of a stored secret (`{"uid", "attrs": {"audience": [..]}}`), or None
/// when the store has no such secret.
pub type EntityFn = Arc<dyn Fn(&SecretName) -> Option<serde_json::Value> + Send + Sync>;

/// The gate-backed key source.
#[derive(Clone)]
pub struct GateKeySource {
    gate: Gate,
    release: ReleaseFn,
    env: Option<EnvFn>,
    entity: Option<EntityFn>,
}

impl std::fmt::Debug for GateKeySource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GateKeySource")
            .field("gate", &self.gate)
            .field("env", &self.env.is_some())
            .field("entity", &self.entity.is_some())
            .finish_non_exhaustive()
    }
}

impl GateKeySource {
    pub fn new(gate: Gate, release: ReleaseFn) -> Self {
        Self {
            gate,
            release,
            env: None,
            entity: None,
        }
    }

    /// The production key source over the gateway's shared store: releases with
    /// `store.release(authz, host, audit log)` and gives Cedar each secret's entity (its
    /// audience), so the default audience policy applies.
    pub fn from_store(gate: Gate, store: SharedSecretStore) -> Self {
        let audit = Arc::clone(gate.audit());
        let s1 = store.clone();
        let release: ReleaseFn = Arc::new(move |authz, host| {
            s1.release(authz, host, audit.as_ref())
                .map_err(|e| e.to_string())
        });
        let entity: EntityFn = Arc::new(move |name| store.cedar_entity(name));
        Self::new(gate, release).with_entities(entity)
    }

    /// Adds the Secret entity (with its audience) to every key decision.
    #[must_use]
    pub fn with_entities(mut self, entity: EntityFn) -> Self {
        self.entity = Some(entity);
        self
    }

    /// Allows `env:VAR` credentials, read by `env` (they bypass the store, not the gate:
    /// the decision is still made, on resource `Chitin::Secret::"env:VAR"`).
    #[must_use]
    pub fn with_env(mut self, env: EnvFn) -> Self {
        self.env = Some(env);
        self
    }

    /// The Cedar request for a key.
    pub fn policy_request(req: &KeyRequest<'_>) -> Result<PolicyRequest, String> {
        let resource_id = match req.secret {
            SecretRef::Secret(name) => name.as_str().to_string(),
            SecretRef::Env(var) => format!("env:{var}"),
        };
        let q = |s: &str| serde_json::Value::String(s.to_string()).to_string();
        let uid = |s: String| {
            s.parse::<cedar_policy::EntityUid>()
                .map_err(|e| format!("invalid entity: {e}"))
        };
        let mut context = Map::new();
        context.insert("host".into(), json!(req.host));
        Ok(PolicyRequest {
            principal: uid(format!("Chitin::Provider::{}", q(req.provider)))?,
            action: crate::policy::Action::SecretUse.uid(),
            resource: uid(format!("Chitin::Secret::{}", q(&resource_id)))?,
            context,
        })
    }
}

impl KeySource for GateKeySource {
    fn key_for(&self, req: &KeyRequest<'_>) -> Result<SecretValue, String> {
        let pr = Self::policy_request(req)?;
        let extra: Vec<serde_json::Value> = match (req.secret, &self.entity) {
            (SecretRef::Secret(name), Some(entity)) => entity(name).into_iter().collect(),
            _ => Vec::new(),
        };
        let verdict = self
            .gate
            .check_with_entities(&pr, &extra)
            .map_err(|e| e.to_string())?;
        // A stored key whose audience does not name this provider's host is the common case
        // (the key was stored without `--audience`, or for another host): say how to fix that,
        // not how to write a policy.
        let audience_miss = match &extra.first() {
            Some(entity) => {
                let audience: Vec<String> = entity["attrs"]["audience"]
                    .as_array()
                    .map(|a| {
                        a.iter()
                            .filter_map(|h| h.as_str().map(str::to_string))
                            .collect()
                    })
                    .unwrap_or_default();
                (!audience.iter().any(|h| h.eq_ignore_ascii_case(req.host))).then_some(audience)
            }
            None => None,
        };
        let deny = |why: &str| match (&audience_miss, req.secret) {
            (Some(audience), SecretRef::Secret(name)) => format!(
                "{why}: provider `{}` sends its key to {}, but secret `{}` may only be sent to [{}]; \
                 add the host with `chitin secrets set {} --audience {}` (the value is read from stdin; \
                 repeat --audience for every host it may go to), then reload the gateway (SIGHUP)",
                req.provider,
                req.host,
                name.as_str(),
                audience.join(", "),
                name.as_str(),
                req.host
            ),
            _ => format!(
                "{why}: secret.use by Chitin::Provider::\"{}\" for host {}; allow it with a \
                 Cedar policy (try it with `chitin policy eval`)",
                req.provider, req.host
            ),
        };
        let authz = match verdict {
            Verdict::Allowed(authz, _) => authz,
            Verdict::Denied(_) => return Err(deny("policy denied")),
            Verdict::ApprovalRequired { .. } => {
                return Err(deny(
                    "policy asks for an approval, which a model call cannot wait for",
                ));
            }
        };
        match req.secret {
            SecretRef::Secret(_) => (self.release)(&authz, req.host),
            SecretRef::Env(var) => match &self.env {
                Some(env) => env(var)
                    .ok_or_else(|| format!("environment variable {var} is not set or empty")),
                None => Err(format!(
                    "`env:{var}` credentials are not enabled in this gateway; store the key with \
                     `chitin secrets set NAME` and use \"secret:NAME\""
                )),
            },
        }
    }
}
