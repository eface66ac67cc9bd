//! The `[mcp]` section of `chitin.toml`: the MCP servers whose tools the agent may call
//! (`[[mcp.servers]]`).

use std::collections::BTreeMap;

use serde::Deserialize;

/// Documentation and defaults for the `[mcp]` section, written by `chitin init`.
pub const TEMPLATE: &str = r#"
# MCP servers (Model Context Protocol). Their tools are offered to the model as
# mcp__<server>__<tool> once an owner pinned them with `chitin mcp trust SERVER`; each call is
# decided by Cedar `mcp.call` (default policies: approval for high-risk tools, and every tool
# is high risk unless configured otherwise). A changed description or a new tool is withheld
# until the owner trusts the server again. See docs/mcp.md.
#
# A stdio server runs inside the sandbox, in its own directory ($CHITIN_HOME/workspaces/
# mcp-<name>), without network unless a policy allows `mcp.egress` to one of its `hosts`:
#
# [[mcp.servers]]
# name = "notes"                      # a-z 0-9 - (no "__"); tools become mcp__notes__<tool>
# command = "python3"                 # found in the sandbox's /usr; or an absolute path
# args = ["server.py"]                # relative to its directory
# env = { NOTES_TOKEN = "secret:notes_token", LOG_LEVEL = "info" }
#                                     # secret: values are released by Cedar `secret.use`
#                                     # (principal Chitin::Tool::"mcp:<name>")
# hosts = ["api.example.com:443"]     # network the server may get (each decided by policy)
# ro = []                             # extra read-only paths in its sandbox (absolute)
# timeout_secs = 60                   # one call (start-up and tool lists: at least 30 s)
# max_result_kib = 256                # a larger result is an error
# memory_mb = 512                     # the server's sandbox memory limit
# lifetime_secs = 86400               # the sandbox's wall clock: restarted when it ends
# [mcp.servers.tools.search]
# risk = "low"                        # low | medium | high (default high)
#
# A Streamable HTTP server is reached only at its configured URL (no redirects, no proxy):
#
# [[mcp.servers]]
# name = "remote"
# url = "https://mcp.example.com/mcp"
# headers = { Authorization = "Bearer secret:remote_token" }
#                                     # sent with every request to `url`; each value is
#                                     # "secret:NAME" or "<Scheme> secret:NAME", released by
#                                     # Cedar `secret.use` (principal Chitin::Tool::"mcp:<name>",
#                                     # host = the URL's host, which must be in the secret's
#                                     # audience: `chitin secrets set NAME --audience HOST`)
"#;

/// The `[mcp]` section.
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct McpConfig {
    pub servers: Vec<McpServerConfig>,
}

/// How risky a tool is, as the operator says (`resource.risk` of `mcp.call`).
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum Risk {
    Low,
    Medium,
    #[default]
    High,
}

impl Risk {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Low => "low",
            Self::Medium => "medium",
            Self::High => "high",
        }
    }
}

/// `[mcp.servers.tools.<tool>]`.
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct McpToolConfig {
    pub risk: Risk,
}

/// One `[[mcp.servers]]` entry.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct McpServerConfig {
    pub name: String,
    pub command: Option<String>,
    pub args: Vec<String>,
    pub env: BTreeMap<String, String>,
    pub url: Option<String>,
    /// HTTP servers: request headers whose values are secret references.
    pub headers: BTreeMap<String, String>,
    pub hosts: Vec<String>,
    pub ro: Vec<String>,
    pub timeout_secs: u64,
    pub max_result_kib: u64,
    pub memory_mb: u64,
    pub lifetime_secs: u64,
    pub tools: BTreeMap<String, McpToolConfig>,
}

impl Default for McpServerConfig {
    fn default() -> Self {
        Self {
            name: String::new(),
            command: None,
            args: Vec::new(),
            env: BTreeMap::new(),
            url: None,
            headers: BTreeMap::new(),
            hosts: Vec::new(),
            ro: Vec::new(),
            timeout_secs: 60,
            max_result_kib: 256,
            memory_mb: 512,
            lifetime_secs: 24 * 60 * 60,
            tools: BTreeMap::new(),
        }
    }
}

/// Where a server runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Transport<'a> {
    Stdio {
        command: &'a str,
        args: &'a [String],
    },
    Http {
        url: &'a str,
    },
}

/// Headers Chitin sets itself (or HTTP itself governs): not configurable.
const RESERVED_HEADERS: [&str; 9] = [
    "host",
    "content-type",
    "content-length",
    "accept",
    "connection",
    "transfer-encoding",
    "mcp-session-id",
    "mcp-protocol-version",
    "user-agent",
];

/// One configured header of an HTTP server, parsed: `value` is `secret:NAME` (the header is
/// the secret's value) or `<Scheme> secret:NAME` (the scheme, a space, then the value, as in
/// `Bearer secret:NAME`). Returns the scheme prefix (`""` or `"Bearer "`) and the secret name.
pub fn header_secret<'a>(
    server: &str,
    name: &str,
    value: &'a str,
) -> Result<(&'a str, &'a str), String> {
    let lower = name.to_ascii_lowercase();
    if !crate::config::secret_ref::is_header_name(name) {
        return Err(format!(
            "[[mcp.servers]] `{server}`: header `{}` is not a header name",
            name.escape_default()
        ));
    }
    if RESERVED_HEADERS.contains(&lower.as_str()) {
        return Err(format!(
            "[[mcp.servers]] `{server}`: header `{name}` is set by Chitin and cannot be configured"
        ));
    }
    let Some((prefix, secret)) = crate::config::secret_ref::header_secret_parts(value) else {
        return Err(format!(
            "[[mcp.servers]] `{server}`: header `{name}` must be \"secret:NAME\" or \"<Scheme> secret:NAME\" (e.g. \"Bearer secret:NAME\"); a credential is never written in chitin.toml"
        ));
    };
    if crate::config::secret_ref::SecretName::parse(secret).is_err() {
        return Err(format!(
            "[[mcp.servers]] `{server}`: header `{name}` names an invalid secret"
        ));
    }
    Ok((prefix, secret))
}

/// The longest server name: `mcp__<server>__<tool>` must fit the 64 characters model APIs
/// accept for a tool name.
pub const MAX_SERVER_NAME: usize = 24;

/// Whether `name` is a valid server name: `[a-z0-9-]`, starting with a letter or digit.
pub fn valid_server_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_SERVER_NAME
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-')
}

impl McpServerConfig {
    /// The transport this entry configures (checked by [`validate`]).
    pub fn transport(&self) -> Transport<'_> {
        match (&self.command, &self.url) {
            (Some(c), _) => Transport::Stdio {
                command: c,
                args: &self.args,
            },
            (None, Some(u)) => Transport::Http { url: u },
            (None, None) => Transport::Stdio {
                command: "",
                args: &self.args,
            },
        }
    }

    /// The risk of `tool` (`high` unless configured).
    pub fn risk(&self, tool: &str) -> Risk {
        self.tools.get(tool).map(|t| t.risk).unwrap_or_default()
    }

    /// A call's time limit.
    pub fn timeout(&self) -> std::time::Duration {
        std::time::Duration::from_secs(self.timeout_secs.max(1))
    }

    /// The time limit of the start-up handshake and of tool listings: `timeout_secs`, but at
    /// least 30 s (a cold start on a busy machine).
    pub fn startup_timeout(&self) -> std::time::Duration {
        self.timeout().max(std::time::Duration::from_secs(30))
    }

    /// The largest result accepted, in bytes.
    pub fn max_result_bytes(&self) -> usize {
        usize::try_from(self.max_result_kib.saturating_mul(1024)).unwrap_or(usize::MAX)
    }

    /// What identifies the server for trust: the transport and where it runs. Trust given
    /// to one command line (or URL) does not carry over to another.
    pub fn identity(&self) -> serde_json::Value {
        match self.transport() {
            Transport::Stdio { command, args } => {
                serde_json::json!({"command": command, "args": args, "ro": self.ro, "env": self.env, "hosts": self.hosts})
            }
            Transport::Http { url } => serde_json::json!({"url": url}),
        }
    }

    fn validate(&self) -> Result<(), String> {
        let n = &self.name;
        if !valid_server_name(n) {
            return Err(format!(
                "[[mcp.servers]] name `{}`: use 1 to {MAX_SERVER_NAME} characters a-z 0-9 - (tools are named mcp__<server>__<tool>)",
                n.escape_default()
            ));
        }
        match (&self.command, &self.url) {
            (Some(_), Some(_)) => {
                return Err(format!(
                    "[[mcp.servers]] `{n}`: set either `command` (a stdio server) or `url` (a Streamable HTTP server), not both"
                ));
            }
            (None, None) => {
                return Err(format!(
                    "[[mcp.servers]] `{n}`: set `command` (a stdio server) or `url` (a Streamable HTTP server)"
                ));
            }
            (Some(c), None) => {
                if c.trim().is_empty() || c.contains('\0') {
                    return Err(format!("[[mcp.servers]] `{n}`: `command` is empty"));
                }
                if !self.headers.is_empty() {
                    return Err(format!(
                        "[[mcp.servers]] `{n}`: `headers` are for HTTP servers (with `url`); a stdio server gets secrets through `env`"
                    ));
                }
            }
            (None, Some(u)) => {
                let parsed = reqwest::Url::parse(u)
                    .map_err(|e| format!("[[mcp.servers]] `{n}`: `url` is not a URL ({e})"))?;
                if !matches!(parsed.scheme(), "http" | "https") || parsed.host_str().is_none() {
                    return Err(format!(
                        "[[mcp.servers]] `{n}`: `url` must be an http:// or https:// URL with a host"
                    ));
                }
                if !parsed.username().is_empty() || parsed.password().is_some() {
                    return Err(format!(
                        "[[mcp.servers]] `{n}`: `url` must not carry credentials"
                    ));
                }
                if !self.args.is_empty()
                    || !self.env.is_empty()
                    || !self.hosts.is_empty()
                    || !self.ro.is_empty()
                {
                    return Err(format!(
                        "[[mcp.servers]] `{n}`: `args`, `env`, `hosts` and `ro` are for stdio servers (with `command`)"
                    ));
                }
            }
        }
        for (k, v) in &self.headers {
            header_secret(n, k, v)?;
        }
        for k in self.env.keys() {
            if !chitin_sandbox::secret_env::valid_env_key(k) {
                return Err(format!(
                    "[[mcp.servers]] `{n}`: env `{}` is not a variable name",
                    k.escape_default()
                ));
            }
        }
        for (k, v) in &self.env {
            if let Some(s) = v.strip_prefix("secret:")
                && crate::config::secret_ref::SecretName::parse(s).is_err()
            {
                return Err(format!(
                    "[[mcp.servers]] `{n}`: env `{k}` names an invalid secret"
                ));
            }
            if v.contains('\0') {
                return Err(format!(
                    "[[mcp.servers]] `{n}`: env `{k}` contains a NUL byte"
                ));
            }
        }
        for h in &self.hosts {
            if h.parse::<chitin_sandbox::NetDest>().is_err() {
                return Err(format!(
                    "[[mcp.servers]] `{n}`: hosts entry `{}` is not HOST:PORT",
                    h.escape_default()
                ));
            }
        }
        for p in &self.ro {
            if !p.starts_with('/') {
                return Err(format!(
                    "[[mcp.servers]] `{n}`: ro path `{}` must be absolute",
                    p.escape_default()
                ));
            }
        }
        if self.timeout_secs == 0 || self.max_result_kib == 0 || self.lifetime_secs == 0 {
            return Err(format!(
                "[[mcp.servers]] `{n}`: timeout_secs, max_result_kib and lifetime_secs must be at least 1"
            ));
        }
        if self.memory_mb < 16 {
            return Err(format!(
                "[[mcp.servers]] `{n}`: memory_mb must be at least 16"
            ));
        }
        Ok(())
    }
}

impl McpConfig {
    /// Checks every server and that names are unique.
    pub fn validate(&self) -> Result<(), String> {
        let mut seen = std::collections::BTreeSet::new();
        for s in &self.servers {
            s.validate()?;
            if !seen.insert(s.name.as_str()) {
                return Err(format!("[[mcp.servers]] name `{}` is used twice", s.name));
            }
        }
        Ok(())
    }

    /// The server named `name`.
    pub fn server(&self, name: &str) -> Option<&McpServerConfig> {
        self.servers.iter().find(|s| s.name == name)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests")]
    use super::*;

    fn parse(text: &str) -> Result<McpConfig, String> {
        #[derive(Deserialize)]
        struct Wrap {
            mcp: McpConfig,
        }
        let w: Wrap = toml::from_str(text).map_err(|e| e.to_string())?;
        w.mcp.validate()?;
        Ok(w.mcp)
    }

    #[test]
    fn a_stdio_and_an_http_server_parse_with_their_defaults() {
        let c = parse(
            r#"
[[mcp.servers]]
name = "notes"
command = "python3"
args = ["server.py"]
env = { TOKEN = "secret:notes_token", LEVEL = "info" }
hosts = ["api.example.com:443"]
[mcp.servers.tools.search]
risk = "low"

[[mcp.servers]]
name = "remote"
url = "http://127.0.0.1:9/mcp"
"#,
        )
        .unwrap();
        let s = c.server("notes").unwrap();
        assert_eq!(s.risk("search"), Risk::Low);
        assert_eq!(s.risk("other"), Risk::High);
        assert_eq!(s.timeout_secs, 60);
        assert_eq!(
            c.server("remote").unwrap().transport(),
            Transport::Http {
                url: "http://127.0.0.1:9/mcp"
            }
        );
    }

    #[test]
    fn bad_entries_are_refused_with_the_key_to_fix() {
        for (text, want) in [
            (
                "[[mcp.servers]]\nname = \"a__b\"\ncommand = \"x\"\n",
                "a-z 0-9 -",
            ),
            ("[[mcp.servers]]\nname = \"a\"\n", "set `command`"),
            (
                "[[mcp.servers]]\nname = \"a\"\ncommand = \"x\"\nurl = \"http://h/\"\n",
                "not both",
            ),
            (
                "[[mcp.servers]]\nname = \"a\"\nurl = \"ftp://h/\"\n",
                "http:// or https://",
            ),
            (
                "[[mcp.servers]]\nname = \"a\"\ncommand = \"x\"\nhosts = [\"nope\"]\n",
                "HOST:PORT",
            ),
            (
                "[[mcp.servers]]\nname = \"a\"\ncommand = \"x\"\n[mcp.servers.tools.t]\nrisk = \"extreme\"\n",
                "unknown variant",
            ),
            (
                "[[mcp.servers]]\nname = \"a\"\ncommand = \"x\"\n[[mcp.servers]]\nname = \"a\"\ncommand = \"y\"\n",
                "used twice",
            ),
        ] {
            let e = parse(text).unwrap_err();
            assert!(e.contains(want), "{text}: {e}");
        }
    }
}
