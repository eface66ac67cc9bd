//! The `[backup]` section of `chitin.toml`: where encrypted backups go and who can read them.

use serde::Deserialize;

/// Documentation and defaults for the `[backup]` section, written by `chitin init`.
pub const TEMPLATE: &str = r#"
[backup]
# The age X25519 public key ("age1...") backups are encrypted to. Keep the matching identity
# OFF this machine. Make a pair with `age-keygen -o backup-identity.txt` (the public key is
# printed and written in the file's comment), or with `chitin backup keygen --out FILE`.
# "" = `chitin backup create` refuses and says how to make one.
recipient = ""
# Identity file used by `chitin backup verify` / `restore` when --identity is not given
# ("" = --identity is required).
identity = ""
# Scheduled backups (run by the gateway): directory for backup-<time>.chitin-backup files
# ("" = no scheduled backups), how often, and how many of the newest to keep.
dir = ""
interval_hours = 24
keep = 7
# Off-site copies: every scheduled backup (already age-encrypted) is also uploaded to an
# S3-compatible store ("" = off). target = "s3://bucket/prefix".
target = ""
# The store's URL, scheme://host[:port] ("" = AWS, https://s3.<region>.amazonaws.com). Plain
# http is accepted only on loopback.
endpoint = ""
region = "us-east-1"
# true: https://host/bucket/key (MinIO, most self-hosted stores); false: https://bucket.host/key
path_style = false
# Credentials as references, never literals: "secret:NAME" (stored with
# `chitin secrets set NAME --audience <endpoint host>`) or "env:VAR".
access_key_id = ""
secret_access_key = ""
# Remote retention: keep the newest remote_keep backups, and delete any older than
# remote_max_age_days (0 = no age limit). The newest is never deleted.
remote_keep = 30
remote_max_age_days = 0
# Test-restore the newest remote backup (download, decrypt with [backup] identity, check the
# signature, database and audit chain in a scratch dir) every this many hours (0 = never;
# needs [backup] identity on this host).
test_restore_hours = 24
# Backups larger than multipart_threshold_bytes are uploaded in parts of multipart_part_bytes
# (multipart upload; a failed one is aborted). S3 and most compatible stores refuse parts under
# 5 MiB (except the last) and single uploads over 5 GiB, so the threshold is at most 5 GiB.
multipart_threshold_bytes = 67108864
multipart_part_bytes = 16777216
"#;

/// The `[backup]` section.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct BackupConfig {
    pub recipient: String,
    pub identity: String,
    pub dir: String,
    pub interval_hours: u64,
    pub keep: usize,
    pub target: String,
    pub endpoint: String,
    pub region: String,
    pub path_style: bool,
    pub access_key_id: String,
    pub secret_access_key: String,
    pub remote_keep: usize,
    pub remote_max_age_days: u64,
    pub test_restore_hours: u64,
    pub multipart_threshold_bytes: u64,
    pub multipart_part_bytes: u64,
}

impl Default for BackupConfig {
    fn default() -> Self {
        Self {
            recipient: String::new(),
            identity: String::new(),
            dir: String::new(),
            interval_hours: 24,
            keep: 7,
            target: String::new(),
            endpoint: String::new(),
            region: "us-east-1".into(),
            path_style: false,
            access_key_id: String::new(),
            secret_access_key: String::new(),
            remote_keep: 30,
            remote_max_age_days: 0,
            test_restore_hours: 24,
            multipart_threshold_bytes: 64 * 1024 * 1024,
            multipart_part_bytes: 16 * 1024 * 1024,
        }
    }
}

impl BackupConfig {
    /// Checks the recipient (if set) is an age X25519 public key.
    pub fn validate(&self) -> Result<(), String> {
        if !self.recipient.is_empty() && self.recipient.parse::<age::x25519::Recipient>().is_err() {
            return Err(
                "[backup] recipient is not an age X25519 public key (age1...); make one with `chitin backup keygen --out FILE`"
                    .into(),
            );
        }
        if self.keep == 0 {
            return Err("[backup] keep must be at least 1".into());
        }
        if !self.target.is_empty() {
            S3Target::parse(&self.target)?;
            endpoint_url(&self.endpoint, &self.region)?;
            if self.region.is_empty() {
                return Err("[backup] region is empty; set it (e.g. \"us-east-1\")".into());
            }
            for (field, v) in [
                ("[backup] access_key_id", &self.access_key_id),
                ("[backup] secret_access_key", &self.secret_access_key),
            ] {
                crate::config::secret_ref::SecretRef::parse_credential(field, v)?;
            }
            if self.remote_keep == 0 {
                return Err("[backup] remote_keep must be at least 1".into());
            }
            const FIVE_GIB: u64 = 5 * 1024 * 1024 * 1024;
            if self.multipart_threshold_bytes == 0 || self.multipart_threshold_bytes > FIVE_GIB {
                return Err(
                    "[backup] multipart_threshold_bytes must be between 1 and 5368709120 (5 GiB, the single-upload limit); the default is 67108864"
                        .into(),
                );
            }
            if self.multipart_part_bytes == 0 || self.multipart_part_bytes > FIVE_GIB {
                return Err(
                    "[backup] multipart_part_bytes must be between 1 and 5368709120 (5 GiB); S3 wants at least 5242880 (5 MiB); the default is 16777216"
                        .into(),
                );
            }
        }
        Ok(())
    }
}

/// `s3://bucket/prefix`, parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct S3Target {
    pub bucket: String,
    /// Without leading/trailing `/`; may be empty.
    pub prefix: String,
}

impl S3Target {
    /// Parses `s3://bucket[/prefix]`. Bucket names follow S3's rules (3-63 of `a-z0-9.-`).
    pub fn parse(text: &str) -> Result<Self, String> {
        let rest = text
            .strip_prefix("s3://")
            .ok_or_else(|| format!("[backup] target {text:?} is not an s3://bucket/prefix URL"))?;
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        let ok = (3..=63).contains(&bucket.len())
            && bucket
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'.' || b == b'-');
        if !ok {
            return Err(format!(
                "[backup] target: bucket {bucket:?} is not a valid S3 bucket name (3-63 characters a-z 0-9 . -)"
            ));
        }
        let prefix = prefix.trim_matches('/').to_string();
        if prefix.split('/').any(|s| s == "." || s == "..") || prefix.chars().any(char::is_control)
        {
            return Err(format!("[backup] target: prefix {prefix:?} is not allowed"));
        }
        Ok(Self {
            bucket: bucket.to_string(),
            prefix,
        })
    }

    /// The object key of `name` under the prefix.
    pub fn key(&self, name: &str) -> String {
        if self.prefix.is_empty() {
            name.to_string()
        } else {
            format!("{}/{name}", self.prefix)
        }
    }

    /// The listing prefix (with a trailing `/` when there is a prefix).
    pub fn list_prefix(&self) -> String {
        if self.prefix.is_empty() {
            String::new()
        } else {
            format!("{}/", self.prefix)
        }
    }
}

/// The endpoint URL for `endpoint` (or AWS's for `region` when empty), checked: https, or
/// http on loopback only.
pub fn endpoint_url(endpoint: &str, region: &str) -> Result<reqwest::Url, String> {
    let text = if endpoint.is_empty() {
        format!("https://s3.{region}.amazonaws.com")
    } else {
        endpoint.to_string()
    };
    let url = reqwest::Url::parse(&text)
        .map_err(|e| format!("[backup] endpoint {text:?} is not a URL: {e}"))?;
    let host = url.host_str().unwrap_or_default();
    let loopback = host == "localhost"
        || host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<std::net::IpAddr>()
            .is_ok_and(|a| a.is_loopback());
    match url.scheme() {
        "https" => {}
        "http" if loopback => {}
        "http" => {
            return Err(format!(
                "[backup] endpoint {text:?} is plain http: use https (http is accepted only on loopback)"
            ));
        }
        s => return Err(format!("[backup] endpoint scheme {s:?} is not http(s)")),
    }
    if url.host_str().is_none() || (url.path() != "/" && !url.path().is_empty()) {
        return Err(format!(
            "[backup] endpoint {text:?} must be scheme://host[:port] with no path"
        ));
    }
    Ok(url)
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
    fn the_template_parses_to_the_defaults() {
        #[derive(Deserialize)]
        struct W {
            backup: BackupConfig,
        }
        let w: W = toml::from_str(TEMPLATE).unwrap();
        assert_eq!(w.backup, BackupConfig::default());
        assert!(w.backup.validate().is_ok());
    }

    #[test]
    fn a_recipient_that_is_not_an_age_key_is_refused() {
        let c = BackupConfig {
            recipient: "ssh-ed25519 AAAA".into(),
            ..BackupConfig::default()
        };
        assert!(c.validate().unwrap_err().contains("age1"));
    }

    #[test]
    fn an_off_site_target_with_a_literal_credential_is_refused() {
        let c = BackupConfig {
            target: "s3://bucket/chitin".into(),
            access_key_id: "secret:s3-id".into(),
            secret_access_key: "wJalrXUtnFEMI".into(),
            ..BackupConfig::default()
        };
        let e = c.validate().unwrap_err();
        assert!(e.contains("secret_access_key"), "{e}");
        assert!(!e.contains("wJalrXUtnFEMI"), "{e}");
        let ok = BackupConfig {
            secret_access_key: "env:S3_SECRET".into(),
            ..c
        };
        assert!(ok.validate().is_ok());
    }

    #[test]
    fn targets_parse_and_bad_ones_are_refused() {
        let t = S3Target::parse("s3://my-bucket/a/b/").unwrap();
        assert_eq!((t.bucket.as_str(), t.prefix.as_str()), ("my-bucket", "a/b"));
        assert_eq!(t.key("x.age"), "a/b/x.age");
        assert_eq!(S3Target::parse("s3://bkt").unwrap().key("x"), "x");
        assert!(S3Target::parse("https://b/x").is_err());
        assert!(S3Target::parse("s3://B_ad/x").is_err());
        assert!(S3Target::parse("s3://bucket/../x").is_err());
    }

    #[test]
    fn plain_http_endpoints_are_refused_unless_on_loopback() {
        assert!(endpoint_url("http://127.0.0.1:9000", "r").is_ok());
        assert!(endpoint_url("http://localhost:9000", "r").is_ok());
        assert!(
            endpoint_url("http://s3.example.com", "r")
                .unwrap_err()
                .contains("plain http")
        );
        assert_eq!(
            endpoint_url("", "eu-west-1").unwrap().as_str(),
            "https://s3.eu-west-1.amazonaws.com/"
        );
    }
}
