//! `web_search`: a web search through the configured backend (`[tools.web_search]`: a
//! SearXNG instance's JSON API or the Brave Search API).
//!
//! Invariants:
//! - Decided as network egress before anything leaves: Cedar `web_search` on
//!   `Tool::"web_search"` with the query, the count, the backend, its host and `api_base` in
//!   the context; bound to the normalized arguments. Nothing is resolved or sent before the
//!   allow.
//! - The query goes only to the configured `api_base`; redirects are not followed, no proxy
//!   is used, the answer is capped ([`MAX_RESPONSE_BYTES`]).
//! - Brave's key is released only after that allow, through Cedar `secret.use` by
//!   `Chitin::Provider::"web_search"` for the api host (the secret's audience must name it),
//!   and only into a request header; the model never sees it (and output is redacted).
//! - Results (titles, URLs, snippets) are untrusted: the agent fences them and the session is
//!   tainted, like every tool result.

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};

use super::gated::{self, Gated};
use super::invoke::{InvokeError, Invoked};
use super::{Sandbox, ToolError, ToolResult};
use crate::approvals::Approvals;
use crate::config::secret_ref::SecretRef;
use crate::config::tools::{SearchBackend, WebSearchConfig};
use crate::gate::{Authorized, CallContext, Gate, StepContext, Verdict};
use crate::policy::{Action, PolicyRequest, Tool};
use crate::secrets::{CredentialField, SharedSecretStore};

/// The largest answer read from the backend.
pub const MAX_RESPONSE_BYTES: usize = 1024 * 1024;
/// The longest query accepted.
pub const MAX_QUERY_CHARS: usize = 400;
/// Each title and snippet is cut to this many characters.
const MAX_FIELD_CHARS: usize = 600;

/// What the model is told.
pub const DESCRIPTION: &str = "Search the web. Returns titles, URLs and snippets (untrusted text); fetch a page with web_fetch to read it.";

/// The JSON schema of the arguments.
pub fn input_schema(max: u32) -> Value {
    json!({"type": "object", "additionalProperties": false, "required": ["query"], "properties": {
        "query": {"type": "string", "description": "the search terms"},
        "count": {"type": "integer", "minimum": 1, "maximum": max, "description": "how many results"}
    }})
}

/// `web_search` arguments.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct WebSearchArgs {
    pub query: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub count: Option<u32>,
}

/// The configured backend and where its key comes from.
pub struct WebSearch {
    cfg: WebSearchConfig,
    url: reqwest::Url,
    secrets: Option<SharedSecretStore>,
}

impl std::fmt::Debug for WebSearch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WebSearch")
            .field("backend", &self.cfg.backend)
            .field("api_base", &self.cfg.api_base)
            .finish_non_exhaustive()
    }
}

impl WebSearch {
    /// The backend of a (validated) `[tools.web_search]`; `secrets` releases Brave's key.
    pub fn new(cfg: WebSearchConfig, secrets: Option<SharedSecretStore>) -> Result<Self, String> {
        cfg.validate()?;
        let url = reqwest::Url::parse(&cfg.api_base).map_err(|e| e.to_string())?;
        Ok(Self { cfg, url, secrets })
    }

    /// The backend's host (lower case), where queries go.
    pub fn host(&self) -> String {
        self.url.host_str().unwrap_or("").to_ascii_lowercase()
    }

    pub fn config(&self) -> &WebSearchConfig {
        &self.cfg
    }

    /// The count asked for, checked.
    fn count(&self, asked: Option<u32>) -> Result<u32, String> {
        match asked {
            None => Ok(self.cfg.count),
            Some(n) if n >= 1 && n <= self.cfg.max_count => Ok(n),
            Some(n) => Err(format!(
                "count {n} is out of range; ask for 1 to {}",
                self.cfg.max_count
            )),
        }
    }

    /// The request URL for a query.
    fn request_url(&self, query: &str, count: u32) -> reqwest::Url {
        let mut u = self.url.clone();
        let base = u.path().trim_end_matches('/').to_string();
        match self.cfg.backend {
            SearchBackend::Searxng => {
                u.set_path(&format!("{base}/search"));
                u.query_pairs_mut()
                    .clear()
                    .append_pair("q", query)
                    .append_pair("format", "json");
            }
            SearchBackend::Brave => {
                u.set_path(&format!("{base}/web/search"));
                u.query_pairs_mut()
                    .clear()
                    .append_pair("q", query)
                    .append_pair("count", &count.to_string());
            }
        }
        u
    }

    /// The Cedar request of one search.
    fn policy_request(
        &self,
        call: &CallContext,
        step: Option<&StepContext>,
        args: &WebSearchArgs,
        count: u32,
    ) -> Result<PolicyRequest, InvokeError> {
        let mut ctx = gated::base_context(call, step, true);
        ctx.insert("query".into(), json!(args.query));
        ctx.insert("count".into(), json!(count));
        ctx.insert("backend".into(), json!(self.cfg.backend.as_str()));
        ctx.insert("host".into(), json!(self.host()));
        ctx.insert("url".into(), json!(self.cfg.api_base));
        Ok(PolicyRequest::new(
            gated::user_uid(&call.user)?,
            Action::WebSearch,
            Tool::WebSearch.uid(),
            ctx,
        ))
    }

    /// Brave's key, released through the gate for the api host.
    fn key(&self, gate: &Gate) -> Result<Option<crate::secrets::SecretValue>, ToolError> {
        let Some(CredentialField(r)) = &self.cfg.api_key else {
            return Ok(None);
        };
        let SecretRef::Secret(name) = r else {
            return Err(ToolError::InvalidArgs(
                "web_search: api_key must be \"secret:NAME\"".into(),
            ));
        };
        let Some(store) = &self.secrets else {
            return Err(ToolError::InvalidArgs(
                "web_search: the secret store is not open in this runtime".into(),
            ));
        };
        let host = self.host();
        let q = |s: &str| Value::String(s.to_string()).to_string();
        let uid = |s: String| {
            s.parse::<cedar_policy::EntityUid>()
                .map_err(|e| ToolError::InvalidArgs(format!("invalid entity: {e}")))
        };
        let mut ctx = Map::new();
        ctx.insert("host".into(), json!(host));
        let req = PolicyRequest::new(
            uid("Chitin::Provider::\"web_search\"".into())?,
            Action::SecretUse,
            uid(format!("Chitin::Secret::{}", q(name.as_str())))?,
            ctx,
        );
        let extra: Vec<Value> = store.cedar_entity(name).into_iter().collect();
        let withheld = |why: &str| {
            ToolError::InvalidArgs(format!(
                "web_search: the search key `{name}` was withheld ({why}): secret.use by Chitin::Provider::\"web_search\" for host {host}; store it with `chitin secrets set {name} --audience {host}`"
            ))
        };
        match gate
            .check_with_entities(&req, &extra)
            .map_err(|e| ToolError::InvalidArgs(e.to_string()))?
        {
            Verdict::Allowed(authz, _) => store
                .release(&authz, &host, gate.audit().as_ref())
                .map(Some)
                .map_err(|e| withheld(&e.to_string())),
            Verdict::Denied(_) => Err(withheld("denied by policy")),
            Verdict::ApprovalRequired { .. } => Err(withheld("the policy asks for an approval")),
        }
    }
}

/// Text of an HTML-ish snippet: tags dropped, entities for `<>&"'` decoded, whitespace
/// collapsed, cut to [`MAX_FIELD_CHARS`].
fn plain(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut in_tag = false;
    for c in s.chars() {
        match c {
            '<' => in_tag = true,
            '>' if in_tag => in_tag = false,
            _ if !in_tag => out.push(c),
            _ => {}
        }
    }
    let out = out
        .replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&quot;", "\"")
        .replace("&#39;", "'")
        .replace("&#x27;", "'")
        .replace("&amp;", "&");
    let collapsed = out.split_whitespace().collect::<Vec<_>>().join(" ");
    match collapsed.char_indices().nth(MAX_FIELD_CHARS) {
        Some((i, _)) => format!("{}…", &collapsed[..i]),
        None => collapsed,
    }
}

/// The results of a backend's JSON answer: `{title, url, snippet}` each.
pub fn results_of(backend: SearchBackend, body: &Value, count: u32) -> Result<Vec<Value>, String> {
    let list = match backend {
        SearchBackend::Searxng => body.get("results"),
        SearchBackend::Brave => body.get("web").and_then(|w| w.get("results")),
    };
    let Some(list) = list else {
        return Ok(Vec::new());
    };
    let list = list
        .as_array()
        .ok_or("the backend's `results` is not a list")?;
    let snippet_key = match backend {
        SearchBackend::Searxng => "content",
        SearchBackend::Brave => "description",
    };
    Ok(list
        .iter()
        .filter_map(|r| {
            let url = r.get("url").and_then(Value::as_str)?;
            let title = r.get("title").and_then(Value::as_str).unwrap_or("");
            let snippet = r.get(snippet_key).and_then(Value::as_str).unwrap_or("");
            Some(json!({"title": plain(title), "url": url, "snippet": plain(snippet)}))
        })
        .take(usize::try_from(count).unwrap_or(usize::MAX))
        .collect())
}

/// Runs the search an `Authorized` covers.
pub fn search(
    auth: &Authorized,
    gate: &Gate,
    ws: &WebSearch,
    args: &WebSearchArgs,
) -> Result<ToolResult, ToolError> {
    super::require(auth, Tool::WebSearch, args)?;
    let count = ws.count(args.count).map_err(ToolError::InvalidArgs)?;
    let started = Instant::now();
    let key = ws.key(gate)?;
    let handle = tokio::runtime::Handle::try_current().map_err(|_| {
        ToolError::InvalidArgs("web_search needs the gateway's async runtime".into())
    })?;
    let tls = crate::net::client_tls().map_err(ToolError::InvalidArgs)?;
    let client = reqwest::Client::builder()
        .tls_backend_preconfigured(tls)
        .redirect(reqwest::redirect::Policy::none())
        .timeout(Duration::from_secs(ws.cfg.timeout_secs))
        .connect_timeout(Duration::from_secs(10))
        .no_proxy()
        .user_agent(concat!("chitin/", env!("CARGO_PKG_VERSION")))
        .build()
        .map_err(|e| ToolError::InvalidArgs(format!("http client: {e}")))?;
    let mut req = client
        .get(ws.request_url(&args.query, count))
        .header(reqwest::header::ACCEPT, "application/json");
    if let Some(k) = &key {
        let v = reqwest::header::HeaderValue::from_bytes(k.expose()).map_err(|_| {
            ToolError::InvalidArgs("web_search: the search key is not a valid header value".into())
        })?;
        let mut v = v;
        v.set_sensitive(true);
        req = req.header("X-Subscription-Token", v);
    }
    drop(key);
    let outcome = handle.block_on(async move {
        let mut resp = req.send().await?;
        let status = resp.status().as_u16();
        let mut body = Vec::new();
        let mut truncated = false;
        while let Some(chunk) = resp.chunk().await? {
            let room = MAX_RESPONSE_BYTES.saturating_sub(body.len());
            if chunk.len() > room {
                truncated = true;
                break;
            }
            body.extend_from_slice(&chunk);
        }
        Ok::<_, reqwest::Error>((status, body, truncated))
    });
    let failed = |e: String| gated::failed(started, e);
    let (status, body, truncated) = match outcome {
        Ok(x) => x,
        Err(e) => {
            return Ok(failed(format!(
                "the search backend could not be reached: {}",
                e.without_url()
            )));
        }
    };
    if truncated {
        return Ok(failed(format!(
            "the search backend answered more than {MAX_RESPONSE_BYTES} bytes; nothing was read"
        )));
    }
    if !(200..300).contains(&status) {
        return Ok(failed(format!(
            "the search backend answered HTTP {status}{}",
            match (status, ws.cfg.backend) {
                (403, SearchBackend::Searxng) =>
                    " (is `json` among the instance's search formats?)",
                (401 | 403 | 422, SearchBackend::Brave) => " (check the subscription token)",
                _ => "",
            }
        )));
    }
    let parsed: Value = match serde_json::from_slice(&body) {
        Ok(v) => v,
        Err(e) => {
            return Ok(failed(format!(
                "the search backend's answer is not JSON: {e}"
            )));
        }
    };
    let results = match results_of(ws.cfg.backend, &parsed, count) {
        Ok(r) => r,
        Err(e) => return Ok(failed(e)),
    };
    Ok(gated::output(
        started,
        json!({"query": args.query, "backend": ws.cfg.backend.as_str(), "results": results}),
    ))
}

fn check_query(q: &str) -> Result<(), String> {
    if q.trim().is_empty() {
        return Err("query is empty".into());
    }
    if q.chars().count() > MAX_QUERY_CHARS {
        return Err(format!("query is longer than {MAX_QUERY_CHARS} characters"));
    }
    if q.chars().any(char::is_control) {
        return Err("query contains control characters".into());
    }
    Ok(())
}

/// Runs one `web_search` call (the tool path of [`super::invoke::invoke`]).
pub fn invoke(
    gate: &Gate,
    sandbox: &Sandbox,
    call: &CallContext,
    step: Option<&StepContext>,
    args: &Value,
    approvals: Option<&Approvals>,
) -> Result<Invoked, InvokeError> {
    let tool = Tool::WebSearch;
    let gated::Prepared {
        args: parsed,
        cap: ws,
        checked: count,
        norm,
    } = gated::prepare(
        gate,
        call,
        tool,
        args,
        sandbox.web_search().map(Arc::clone),
        "no search backend is configured ([tools.web_search] in chitin.toml)",
        |p: &WebSearchArgs, ws: &Arc<WebSearch>| {
            check_query(&p.query).and_then(|()| ws.count(p.count))
        },
    )?;
    let req = ws.policy_request(call, step, &parsed, count)?;
    let go = match gated::decide(gate, approvals, &[req], &norm, norm.clone())? {
        Gated::Go(g) => g,
        Gated::Done(i) => return Ok(i),
    };
    let started = Instant::now();
    let run = search(&go.auth, gate, &ws, &parsed);
    let argv = vec![tool.as_str().to_string(), ws.host(), parsed.query.clone()];
    gated::finish(gate, call, tool, &argv, started, run, go)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests")]
    use super::*;

    #[test]
    fn both_backends_answers_become_title_url_snippet_with_markup_removed() {
        let sx = json!({"query": "q", "results": [
            {"url": "https://a.example/", "title": "A <b>title</b>", "content": "one &amp; two", "engine": "x"},
            {"title": "no url"},
            {"url": "https://b.example/", "title": "B", "content": "b"}
        ]});
        let r = results_of(SearchBackend::Searxng, &sx, 5).unwrap();
        assert_eq!(r.len(), 2);
        assert_eq!(
            r[0],
            json!({"title": "A title", "url": "https://a.example/", "snippet": "one & two"})
        );
        let br = json!({"type": "search", "web": {"type": "search", "results": [
            {"url": "https://c.example/", "title": "C", "description": "<strong>c</strong> text"},
            {"url": "https://d.example/", "title": "D", "description": "d"}
        ]}});
        let r = results_of(SearchBackend::Brave, &br, 1).unwrap();
        assert_eq!(
            r,
            vec![json!({"title": "C", "url": "https://c.example/", "snippet": "c text"})]
        );
        assert_eq!(
            results_of(SearchBackend::Brave, &json!({}), 3).unwrap(),
            Vec::<Value>::new()
        );
    }

    #[test]
    fn the_query_goes_to_the_backends_own_path_encoded() {
        let ws = |b: &str, base: &str, key: Option<&str>| {
            let mut t = format!("backend = \"{b}\"\napi_base = \"{base}\"\n");
            if let Some(k) = key {
                t.push_str(&format!("api_key = \"{k}\"\n"));
            }
            WebSearch::new(toml::from_str(&t).unwrap(), None).unwrap()
        };
        let s = ws("searxng", "http://127.0.0.1:9/searx/", None);
        assert_eq!(
            s.request_url("a b&c", 5).as_str(),
            "http://127.0.0.1:9/searx/search?q=a+b%26c&format=json"
        );
        let b = ws(
            "brave",
            "https://api.search.brave.com/res/v1",
            Some("secret:brave"),
        );
        assert_eq!(
            b.request_url("x", 3).as_str(),
            "https://api.search.brave.com/res/v1/web/search?q=x&count=3"
        );
        assert_eq!(b.host(), "api.search.brave.com");
        assert!(b.count(Some(21)).is_err());
        assert_eq!(b.count(None).unwrap(), 5);
    }

    #[test]
    fn empty_long_and_control_character_queries_are_refused() {
        assert!(check_query(" ").is_err());
        assert!(check_query(&"x".repeat(401)).is_err());
        assert!(check_query("a\nb").is_err());
        assert!(check_query("rust sqlite fts5").is_ok());
    }
}
