//! Secret names and secret references in config: credential fields hold `secret:NAME` (or
//! `env:VAR` for containers), never the credential itself. Owned by `config` (the bottom
//! layer); `secrets` re-exports them.

use serde::Deserialize;

/// A secret's name: `[A-Za-z][A-Za-z0-9_.-]{0,63}`. Safe to log, to put in a Cedar entity id
/// (`Chitin::Secret::"NAME"`) and in `[REDACTED:NAME]`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SecretName(String);

impl SecretName {
    /// Validates a name. The error says what is allowed.
    pub fn parse(name: &str) -> Result<Self, String> {
        let mut chars = name.chars();
        let ok_first = chars.next().is_some_and(|c| c.is_ascii_alphabetic());
        let ok_rest = chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'));
        if ok_first && ok_rest && name.len() <= 64 {
            Ok(Self(name.to_string()))
        } else {
            Err(format!(
                "invalid secret name `{}`: use 1-64 characters A-Z a-z 0-9 _ . -, starting with a letter",
                name.escape_default()
            ))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Whether the name is reserved for Chitin's own secrets (`chitin.*`, e.g. the audit
    /// signing key): never released to a tool or provider.
    pub fn is_reserved(&self) -> bool {
        self.0.starts_with("chitin.")
    }

    /// The Cedar resource id of this secret: `Chitin::Secret::"NAME"`.
    pub fn cedar_resource(&self) -> String {
        format!("Chitin::Secret::\"{}\"", self.0)
    }
}

impl std::fmt::Display for SecretName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// Where a credential comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SecretRef {
    /// `secret:NAME`: from the encrypted store.
    Secret(SecretName),
    /// `env:VAR`: from the gateway's environment (containers that inject credentials).
    Env(String),
}

impl SecretRef {
    /// Parses a credential field. A literal credential is an error; the message names the
    /// field and says how to store the credential, and never repeats the value.
    pub fn parse_credential(field_name: &str, value: &str) -> Result<Self, String> {
        let fix = |what: &str| {
            format!(
                "config field `{field_name}` {what}; store the credential with \
                 `chitin secrets set NAME` (it reads the value from stdin) and write \
                 \"secret:NAME\" here (or \"env:VAR\" to take it from the environment)"
            )
        };
        if let Some(name) = value.strip_prefix("secret:") {
            return SecretName::parse(name)
                .map(Self::Secret)
                .map_err(|e| format!("config field `{field_name}`: {e}"));
        }
        if let Some(var) = value.strip_prefix("env:") {
            let ok = !var.is_empty()
                && var.len() <= 128
                && var.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
                && !var.starts_with(|c: char| c.is_ascii_digit());
            return if ok {
                Ok(Self::Env(var.to_string()))
            } else {
                Err(format!(
                    "config field `{field_name}`: `env:` must be followed by an environment \
                     variable name (A-Z a-z 0-9 _, not starting with a digit)"
                ))
            };
        }
        if value.is_empty() {
            return Err(fix("is empty"));
        }
        Err(fix("holds a literal credential, which is not allowed"))
    }
}

/// A config credential field that deserializes only from `secret:NAME` / `env:VAR`.
/// Use it as the type of every credential field (`api_key: CredentialField`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CredentialField(pub SecretRef);

impl<'de> Deserialize<'de> for CredentialField {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        // Borrow the string when possible and never echo it in the error.
        let s = zeroize::Zeroizing::new(String::deserialize(d)?);
        SecretRef::parse_credential("credential", &s)
            .map(CredentialField)
            .map_err(serde::de::Error::custom)
    }
}

/// A configured HTTP header that carries a secret: its value is `secret:NAME` or
/// `<Scheme> secret:NAME` (e.g. `Bearer secret:NAME`). Returns the text sent before the
/// secret (`""` or `"Bearer "`) and the secret's name; `None` when the value is neither (a
/// credential is never written in `chitin.toml`).
pub fn header_secret_parts(value: &str) -> Option<(&str, &str)> {
    let (prefix, secret) = match value.strip_prefix("secret:") {
        Some(s) => ("", s),
        None => match value.split_once(' ') {
            Some((scheme, rest))
                if !scheme.is_empty()
                    && scheme
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'-')
                    && rest.starts_with("secret:") =>
            {
                (&value[..=scheme.len()], &rest["secret:".len()..])
            }
            _ => return None,
        },
    };
    Some((prefix, secret))
}

/// Whether `name` is an HTTP header name (an RFC 9110 token).
pub fn is_header_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
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
    fn a_header_secret_is_a_reference_with_an_optional_scheme() {
        assert_eq!(header_secret_parts("secret:tok"), Some(("", "tok")));
        assert_eq!(
            header_secret_parts("Bearer secret:tok"),
            Some(("Bearer ", "tok"))
        );
        assert_eq!(header_secret_parts("Bearer abc123"), None);
        assert_eq!(header_secret_parts("abc123"), None);
        assert_eq!(header_secret_parts("Be arer secret:x"), None);
        assert!(is_header_name("X-Scope-OrgID"));
        assert!(!is_header_name("bad name"));
        assert!(!is_header_name(""));
    }

    #[test]
    fn secret_and_env_references_parse() {
        assert_eq!(
            SecretRef::parse_credential("api_key", "secret:OPENAI").unwrap(),
            SecretRef::Secret(SecretName::parse("OPENAI").unwrap())
        );
        assert_eq!(
            SecretRef::parse_credential("api_key", "env:OPENAI_API_KEY").unwrap(),
            SecretRef::Env("OPENAI_API_KEY".into())
        );
    }

    #[test]
    fn a_literal_credential_is_refused_with_the_fix_and_without_the_value() {
        let e = SecretRef::parse_credential("providers.openai.api_key", "sk-live-abcdef123")
            .unwrap_err();
        assert!(e.contains("chitin secrets set NAME"), "{e}");
        assert!(e.contains("providers.openai.api_key"), "{e}");
        assert!(!e.contains("sk-live-abcdef123"), "{e}");
    }

    #[test]
    fn a_credential_field_in_toml_rejects_literals() {
        #[derive(Deserialize)]
        struct P {
            #[allow(dead_code, reason = "only deserialized")]
            api_key: CredentialField,
        }
        let e = toml::from_str::<P>("api_key = \"sk-live-abcdef123\"")
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("chitin secrets set NAME"), "{e}");
        // Note: toml's error quotes the source line, so the literal appears there; the
        // config loader must redact (reported to the lead).
        assert!(toml::from_str::<P>("api_key = \"secret:OPENAI\"").is_ok());
    }
}
