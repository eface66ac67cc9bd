//! Credentials the gateway itself sends (not a tool's, a provider's or a channel's): the
//! state database's URL or password (`[store]`, principal `Chitin::Gateway::"store"`) and the
//! OpenTelemetry collector's headers (`[telemetry] headers`, `Chitin::Gateway::"telemetry"`).
//! Each `secret:NAME` is released by Cedar `secret.use` for exactly the host it goes to (which
//! the store also requires in the secret's audience), audited; `env:VAR` is read from the
//! environment.

use serde_json::{Map, json};
use zeroize::Zeroizing;

use super::BoxError;
use crate::config::secret_ref::{SecretName, SecretRef};
use crate::config::telemetry::{HeaderValue, TelemetryConfig};

/// The principal that asks for the collector's credentials.
pub const TELEMETRY_PRINCIPAL: &str = "Chitin::Gateway::\"telemetry\"";

/// Releases `r` for `principal` to send to `host`; `field` names the config key in messages.
pub fn release(
    principal: &str,
    field: &str,
    r: SecretRef,
    host: &str,
    gate: Option<&crate::gate::Gate>,
    secrets: &crate::secrets::SecretStore,
) -> Result<Zeroizing<String>, BoxError> {
    let name = match r {
        SecretRef::Env(var) => {
            return std::env::var(&var)
                .map(|v| Zeroizing::new(v.trim().to_string()))
                .map_err(|_| format!("{field}: the environment variable {var} is not set").into());
        }
        SecretRef::Secret(name) => name,
    };
    let Some(gate) = gate else {
        return Err(format!(
            "{field}: secret {} is released only through the policy gate, which is not open here",
            name.as_str()
        )
        .into());
    };
    release_named(principal, field, &name, host, gate, secrets)
}

fn release_named(
    principal: &str,
    field: &str,
    name: &SecretName,
    host: &str,
    gate: &crate::gate::Gate,
    secrets: &crate::secrets::SecretStore,
) -> Result<Zeroizing<String>, BoxError> {
    let mut context = Map::new();
    context.insert("host".into(), json!(host));
    let req = crate::policy::PolicyRequest {
        principal: principal.parse()?,
        action: crate::policy::Action::SecretUse.uid(),
        resource: name.cedar_resource().parse()?,
        context,
    };
    let extra: Vec<serde_json::Value> = secrets.cedar_entity(name).into_iter().collect();
    let refused = |why: &str| -> BoxError {
        format!(
            "{why}: secret.use by {principal} on secret {n} for host {host} ({field}); store it with `chitin secrets set {n} --audience {host}`",
            n = name.as_str()
        )
        .into()
    };
    let authz = match gate.check_with_entities(&req, &extra)? {
        crate::gate::Verdict::Allowed(a, _) => a,
        crate::gate::Verdict::Denied(_) => return Err(refused("policy denied")),
        crate::gate::Verdict::ApprovalRequired { .. } => {
            return Err(refused(
                "policy asks for an approval, which the gateway's start-up cannot wait for",
            ));
        }
    };
    let value = secrets.release(&authz, host, gate.audit().as_ref())?;
    let text = value
        .expose_str()
        .ok_or_else(|| format!("secret {} is not UTF-8 text", name.as_str()))?;
    let text = text.trim();
    if text.chars().any(char::is_control) {
        return Err(format!(
            "secret {} holds a line break or control character, which {field} cannot send; store it again without one",
            name.as_str()
        )
        .into());
    }
    Ok(Zeroizing::new(text.to_string()))
}

/// The `[telemetry] headers` to send with every export: plain values as written, each
/// secret released for the endpoint's host (an error names the header and the fix; the
/// gateway does not start half-configured).
pub fn telemetry_headers(
    cfg: &TelemetryConfig,
    gate: &crate::gate::Gate,
    secrets: &crate::secrets::SecretStore,
) -> Result<Vec<(String, Zeroizing<String>)>, BoxError> {
    let host = cfg.endpoint_host().unwrap_or_default();
    let mut out = Vec::new();
    for (header, value) in cfg.parsed_headers()? {
        let v = match value {
            HeaderValue::Plain(v) => Zeroizing::new(v),
            HeaderValue::Secret { prefix, name } => {
                let field = format!("[telemetry] headers `{header}`");
                let secret =
                    release_named(TELEMETRY_PRINCIPAL, &field, &name, &host, gate, secrets)?;
                Zeroizing::new(format!("{prefix}{}", secret.as_str()))
            }
        };
        out.push((header, v));
    }
    Ok(out)
}
