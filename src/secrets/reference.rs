//! Secret references in config (defined in `config::secret_ref`, the layer below).

pub use crate::config::secret_ref::{CredentialField, SecretRef};
