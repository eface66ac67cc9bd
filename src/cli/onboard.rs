//! `chitin onboard`: the first run. Asks (or takes as flags, for automation) the model
//! provider and its key, tests the key with a one-line request to the provider, the model, a
//! first chat channel (Telegram, Slack in Socket Mode or with the Events API, Discord: its
//! tokens checked for form as the gateway would, stored as secrets for the platform's API host)
//! and its pairing, and the daily budget; then stores the credentials in
//! the secret store (Cedar `secret.set`, audited) and writes `chitin.toml`.
//!
//! Nothing is written before the key test passed: a wrong key or model leaves the config and
//! the secret store as they were. The config is edited in place (the documented template
//! keeps its comments): `[agent] model` and `[budgets] daily_usd_per_user` are set in their
//! tables, `[[providers]]` and `[[channels]]` tables appended; the result must parse before it
//! replaces the file (atomically, 0600).

use std::io::{BufRead, IsTerminal, Write};
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Args, ValueEnum};
use serde_json::json;

use super::{BoxError, CmdResult, Globals};
use crate::config::Config;
use crate::secrets::{SecretAudit, SecretName, SecretValue};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ProviderChoice {
    /// Anthropic's Messages API (api.anthropic.com).
    Anthropic,
    /// OpenAI's Chat Completions API (api.openai.com), or any compatible server with --base-url.
    Openai,
    /// A local Ollama server (http://127.0.0.1:11434/v1), no key.
    Ollama,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ChannelChoice {
    /// A Telegram bot (long polling: no public URL needed).
    Telegram,
    /// A Slack app's bot (Socket Mode: no public URL needed; or the Events API).
    Slack,
    /// A Discord bot (the gateway connection: no public URL needed).
    Discord,
    /// No chat channel now (the web chat and the API work without one).
    None,
}

/// How a Slack channel receives events.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum SlackModeChoice {
    /// Socket Mode: the gateway opens a WebSocket with the app-level token (no public URL).
    Socket,
    /// The Events API: Slack posts to /channels/<name>/events on the gateway (needs a public
    /// https URL and the app's signing secret).
    Events,
}

#[derive(Debug, Args)]
pub struct OnboardArgs {
    /// Never ask: every answer comes from the flags (missing ones are an error).
    #[arg(long)]
    non_interactive: bool,
    /// The model provider.
    #[arg(long, value_enum)]
    provider: Option<ProviderChoice>,
    /// The [[providers]] name [default: anthropic, openai, or local for ollama].
    #[arg(long, value_name = "NAME")]
    provider_name: Option<String>,
    /// The provider's API root [default: the provider's own].
    #[arg(long, value_name = "URL")]
    base_url: Option<String>,
    /// Read the API key from this environment variable (it is stored in the secret store).
    #[arg(long, value_name = "VAR", conflicts_with = "api_key_stdin")]
    api_key_env: Option<String>,
    /// Read the API key from standard input.
    #[arg(long)]
    api_key_stdin: bool,
    /// The model, as the provider names it (e.g. claude-sonnet-4-5, gpt-4o-mini, llama3.1).
    #[arg(long, value_name = "MODEL")]
    model: Option<String>,
    /// Do not send the test request (offline set-up; the key is then unchecked).
    #[arg(long)]
    skip_key_test: bool,
    /// A first chat channel.
    #[arg(long, value_enum)]
    channel: Option<ChannelChoice>,
    /// The channel's name [default: its kind].
    #[arg(long, value_name = "NAME")]
    channel_name: Option<String>,
    /// Read the channel's bot token from this environment variable (Telegram's and
    /// Discord's bot token, Slack's xoxb- bot token).
    #[arg(long, value_name = "VAR")]
    channel_token_env: Option<String>,
    /// Slack: Socket Mode (no public URL) or the Events API [default: socket].
    #[arg(long, value_enum, value_name = "MODE")]
    slack_mode: Option<SlackModeChoice>,
    /// Slack Socket Mode: read the app-level token (xapp-) from this environment variable.
    #[arg(long, value_name = "VAR")]
    slack_app_token_env: Option<String>,
    /// Slack Events API: read the app's signing secret from this environment variable.
    #[arg(long, value_name = "VAR")]
    slack_signing_secret_env: Option<String>,
    /// The platform's API root (a self-hosted Bot API server; tests).
    #[arg(long, value_name = "URL")]
    channel_api_base: Option<String>,
    /// Approve this pairing code (the code the bot answered your first message with).
    #[arg(long, value_name = "CODE")]
    pair: Option<String>,
    /// The user the paired identity acts as [default: the owner].
    #[arg(long, value_name = "USER")]
    pair_user: Option<String>,
    /// Daily spend limit per user in USD (0: none).
    #[arg(long, value_name = "USD")]
    budget_usd: Option<f64>,
}

/// Asks questions on the terminal (or refuses to, non-interactively).
struct Ask {
    interactive: bool,
}

impl Ask {
    fn line(&self, question: &str, default: &str, flag: &str) -> Result<String, BoxError> {
        if !self.interactive {
            if default.is_empty() {
                return Err(format!("{flag} is required with --non-interactive").into());
            }
            return Ok(default.to_string());
        }
        let mut out = std::io::stdout().lock();
        if default.is_empty() {
            write!(out, "{question}: ")?;
        } else {
            write!(out, "{question} [{default}]: ")?;
        }
        out.flush()?;
        drop(out);
        let mut answer = String::new();
        if std::io::stdin().lock().read_line(&mut answer)? == 0 {
            return Err("no answer (end of input); nothing was written".into());
        }
        let answer = answer.trim();
        Ok(if answer.is_empty() {
            default.to_string()
        } else {
            answer.to_string()
        })
    }

    fn secret(&self, question: &str, flag: &str) -> Result<SecretValue, BoxError> {
        if !self.interactive {
            return Err(format!("{flag} is required with --non-interactive").into());
        }
        let v = rpassword::prompt_password(format!("{question} (not shown): "))?;
        Ok(SecretValue::from_str_copy(v.trim()))
    }
}

/// Reads a secret from the environment variable `var` (an error naming it when empty).
fn from_env(var: &str) -> Result<SecretValue, BoxError> {
    match std::env::var(var) {
        Ok(v) if !v.trim().is_empty() => Ok(SecretValue::from_str_copy(v.trim())),
        _ => Err(format!("environment variable {var} is not set or empty").into()),
    }
}

/// The key source of the key test: the key just typed, for exactly this provider and host
/// (nothing is stored before the test passed).
struct TypedKey {
    provider: String,
    host: String,
    key: SecretValue,
}

impl crate::providers::KeySource for TypedKey {
    fn key_for(&self, req: &crate::providers::KeyRequest<'_>) -> Result<SecretValue, String> {
        if req.provider == self.provider && req.host.eq_ignore_ascii_case(&self.host) {
            Ok(SecretValue::from_bytes(self.key.expose().to_vec()))
        } else {
            Err(format!(
                "the key is for {} at {}, not {} at {}",
                self.provider, self.host, req.provider, req.host
            ))
        }
    }
}

/// Sends one short request to `config`'s model with `key`; the model's answer or why not.
fn key_test(
    config: &Config,
    provider: &str,
    host: &str,
    key: Option<&SecretValue>,
) -> Result<String, String> {
    let keys: Arc<dyn crate::providers::KeySource> = match key {
        Some(k) => Arc::new(TypedKey {
            provider: provider.into(),
            host: host.into(),
            key: SecretValue::from_bytes(k.expose().to_vec()),
        }),
        None => Arc::new(crate::providers::NoKeys),
    };
    crate::providers::init_tls();
    let router =
        crate::providers::Router::from_config(config, keys, Arc::new(crate::clock::SystemClock))
            .map_err(|e| e.to_string())?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    let mut req = crate::providers::ChatRequest::new(
        vec![crate::providers::Message::user(
            "This is a connection test from Chitin. Reply with the single word OK.",
        )],
        16,
    );
    req.stream = false;
    let resp = rt
        .block_on(router.chat(&req, &mut |_| {}))
        .map_err(|e| e.to_string())?;
    Ok(resp.text.chars().take(80).collect())
}

/// Sets `key = value` (a TOML value, as text) in `[table]`: the key's line is replaced where
/// the table has it, else the key is added under the header; a missing table is appended.
pub fn set_in_table(text: &str, table: &str, key: &str, value: &str) -> String {
    let header = format!("[{table}]");
    let lines: Vec<&str> = text.split('\n').collect();
    let Some(start) = lines.iter().position(|l| l.trim() == header) else {
        let mut out = text.trim_end().to_string();
        out.push_str(&format!("\n\n{header}\n{key} = {value}\n"));
        return out;
    };
    let end = lines
        .iter()
        .enumerate()
        .skip(start + 1)
        .find(|(_, l)| l.trim_start().starts_with('['))
        .map_or(lines.len(), |(i, _)| i);
    let mut out: Vec<String> = lines.iter().map(|l| (*l).to_string()).collect();
    let at = (start + 1..end).find(|&i| {
        lines[i]
            .split_once('=')
            .is_some_and(|(k, _)| k.trim() == key && !lines[i].trim_start().starts_with('#'))
    });
    match at {
        Some(i) => out[i] = format!("{key} = {value}"),
        None => out.insert(start + 1, format!("{key} = {value}")),
    }
    out.join("\n")
}

fn toml_str(s: &str) -> String {
    serde_json::Value::String(s.to_string()).to_string()
}

fn host_of(url: &str) -> Result<String, BoxError> {
    let u = reqwest::Url::parse(url).map_err(|e| format!("{url} is not a URL: {e}"))?;
    Ok(u.host_str()
        .ok_or_else(|| format!("{url} has no host"))?
        .trim_matches(['[', ']'])
        .to_ascii_lowercase())
}

/// One credential to store once everything is decided.
struct Credential {
    name: SecretName,
    value: SecretValue,
    audience: String,
}

pub fn run(args: OnboardArgs, globals: &Globals) -> CmdResult {
    let interactive = !args.non_interactive && std::io::stdin().is_terminal();
    if !args.non_interactive && !interactive {
        return Err(
            "standard input is not a terminal: answer with flags and pass --non-interactive \
             (see `chitin onboard --help`)"
                .into(),
        );
    }
    let ask = Ask { interactive };
    // A fresh machine: the same set-up as `chitin init` first (secret store, token, policies).
    if !globals.home.join("state.db").exists() || !globals.config_path.exists() {
        super::init::run(globals)?;
    }
    let original = std::fs::read_to_string(&globals.config_path)
        .map_err(|e| format!("cannot read {}: {e}", globals.config_path.display()))?;
    let current = Config::parse(&original, &globals.config_path)?;
    if interactive {
        println!(
            "Chitin first run: the model, a chat channel and a budget. Enter keeps [defaults]."
        );
    }

    // 1. The provider and its key, tested.
    let provider = match args.provider {
        Some(p) => p,
        None => {
            let a = ask.line(
                "Model provider (anthropic, openai, ollama)",
                "",
                "--provider",
            )?;
            ProviderChoice::from_str(&a, true)
                .map_err(|_| format!("unknown provider `{a}`: anthropic, openai or ollama"))?
        }
    };
    let (kind, default_name, default_base, default_model, needs_key) = match provider {
        ProviderChoice::Anthropic => (
            "anthropic",
            "anthropic",
            "https://api.anthropic.com",
            "claude-sonnet-4-5",
            true,
        ),
        ProviderChoice::Openai => (
            "openai",
            "openai",
            "https://api.openai.com/v1",
            "gpt-4o-mini",
            true,
        ),
        ProviderChoice::Ollama => (
            "openai",
            "local",
            "http://127.0.0.1:11434/v1",
            "llama3.1",
            false,
        ),
    };
    let name = args
        .provider_name
        .clone()
        .unwrap_or_else(|| default_name.into());
    if current.providers.iter().any(|p| p.name == name) {
        return Err(format!(
            "a provider named `{name}` is already configured in {}; pick another with --provider-name, or edit the file",
            globals.config_path.display()
        )
        .into());
    }
    let base_url = match &args.base_url {
        Some(b) => b.clone(),
        None if interactive => ask.line("API root", default_base, "--base-url")?,
        None => default_base.to_string(),
    };
    let host = host_of(&base_url)?;
    let model_default = args
        .model
        .clone()
        .unwrap_or_else(|| default_model.to_string());
    let mut model = if args.model.is_some() || !interactive {
        model_default
    } else {
        ask.line("Model", &model_default, "--model")?
    };
    let mut key: Option<SecretValue> = if let Some(var) = &args.api_key_env {
        Some(from_env(var)?)
    } else if args.api_key_stdin {
        let v = SecretValue::read_from(&mut std::io::stdin().lock())?;
        let t = v.expose_str().map(str::trim).unwrap_or("").to_string();
        (!t.is_empty()).then(|| SecretValue::from_str_copy(&t))
    } else if needs_key {
        Some(ask.secret(
            &format!("API key for {host}"),
            "--api-key-env VAR or --api-key-stdin",
        )?)
    } else {
        None
    };
    // A value the store would refuse is said now, before anything is sent or asked further.
    if let Some(k) = &key {
        k.check_len().map_err(|e| format!("the API key: {e}"))?;
    }
    let key_name = SecretName::parse(&format!("{}_key", name.replace('-', "_")))
        .map_err(|e| format!("cannot name the key secret after provider `{name}`: {e}"))?;
    let candidate = |model: &str, with_key: bool| -> Result<(String, Config), BoxError> {
        let mut text = set_in_table(
            &original,
            "agent",
            "model",
            &toml_str(&format!("{name}/{model}")),
        );
        text.push_str(&format!(
            "\n[[providers]]\nname = {}\nkind = {}\nbase_url = {}\n{}",
            toml_str(&name),
            toml_str(kind),
            toml_str(&base_url),
            if with_key {
                format!(
                    "api_key = {}\n",
                    toml_str(&format!("secret:{}", key_name.as_str()))
                )
            } else {
                String::new()
            }
        ));
        let cfg = Config::parse(&text, &globals.config_path)?;
        Ok((text, cfg))
    };
    let (mut text, _) = loop {
        let (text, cfg) = candidate(&model, key.is_some())?;
        if args.skip_key_test {
            println!("key test skipped (--skip-key-test): the key and model are unchecked");
            break (text, cfg);
        }
        match key_test(&cfg, &name, &host, key.as_ref()) {
            Ok(answer) => {
                println!("key test passed: {name}/{model} at {host} answered {answer:?}");
                break (text, cfg);
            }
            Err(e) if interactive => {
                println!("key test failed: {e}");
                let again =
                    ask.line("Try again with another key and model? (yes/no)", "yes", "")?;
                if !again.eq_ignore_ascii_case("yes") && !again.eq_ignore_ascii_case("y") {
                    println!("nothing was written");
                    return Ok(ExitCode::from(1));
                }
                model = ask.line("Model", &model, "--model")?;
                if needs_key {
                    key = Some(ask.secret(&format!("API key for {host}"), "")?);
                }
            }
            Err(e) => {
                println!("key test failed: {e}; nothing was written");
                return Ok(ExitCode::from(1));
            }
        }
    };
    let mut credentials: Vec<Credential> = Vec::new();
    if let Some(k) = key {
        credentials.push(Credential {
            name: key_name.clone(),
            value: k,
            audience: host.clone(),
        });
    }

    // 2. A first chat channel.
    let channel = match args.channel {
        Some(c) => c,
        None if interactive => {
            let a = ask.line(
                "A chat channel now (telegram, slack, discord, none)",
                "none",
                "--channel",
            )?;
            ChannelChoice::from_str(&a, true)
                .map_err(|_| format!("unknown channel `{a}`: telegram, slack, discord or none"))?
        }
        None => ChannelChoice::None,
    };
    let mut channel_name = None;
    let mut slack_events = false;
    if let Some((kind, default_api)) = match channel {
        ChannelChoice::Telegram => Some(("telegram", crate::config::channels::TELEGRAM_API_BASE)),
        ChannelChoice::Slack => Some(("slack", crate::config::channels::SLACK_API_BASE)),
        ChannelChoice::Discord => Some(("discord", crate::config::channels::DISCORD_API_BASE)),
        ChannelChoice::None => None,
    } {
        let cname = args.channel_name.clone().unwrap_or_else(|| kind.into());
        if current.channels.iter().any(|c| c.name == cname) {
            return Err(format!(
                "a channel named `{cname}` is already configured; pick another with --channel-name"
            )
            .into());
        }
        let api = args
            .channel_api_base
            .clone()
            .unwrap_or_else(|| default_api.into());
        let audience = host_of(&api)?;
        let secret = |value: &str, var: &Option<String>, question: &str, flag: &str| {
            let v = match var {
                Some(var) => from_env(var)?,
                None => ask.secret(question, flag)?,
            };
            v.check_len().map_err(|e| format!("{value}: {e}"))?;
            Ok::<_, BoxError>(v)
        };
        let name_for = |suffix: &str| {
            SecretName::parse(&format!("{}_{suffix}", cname.replace('-', "_"))).map_err(|e| {
                format!("cannot name the {suffix} secret after channel `{cname}`: {e}")
            })
        };
        // (config key, secret, value): every credential is a `secret:NAME` reference.
        let mut creds: Vec<(&str, SecretName, SecretValue)> = Vec::new();
        let mut extra = String::new();
        match channel {
            ChannelChoice::Slack => {
                let mode = match args.slack_mode {
                    Some(m) => m,
                    None if interactive => {
                        let a = ask.line(
                            "Slack connection: socket (no public URL needed) or events (Slack posts to this gateway)",
                            "socket",
                            "--slack-mode",
                        )?;
                        SlackModeChoice::from_str(&a, true)
                            .map_err(|_| format!("unknown Slack mode `{a}`: socket or events"))?
                    }
                    None => SlackModeChoice::Socket,
                };
                let bot = secret(
                    "the bot token",
                    &args.channel_token_env,
                    "Slack bot token (xoxb-..., OAuth & Permissions)",
                    "--channel-token-env VAR",
                )?;
                let z = |v: &SecretValue| {
                    zeroize::Zeroizing::new(v.expose_str().unwrap_or("").to_string())
                };
                let cfg = match mode {
                    SlackModeChoice::Socket => {
                        let app = secret(
                            "the app-level token",
                            &args.slack_app_token_env,
                            "Slack app-level token (xapp-..., Basic Information, scope connections:write)",
                            "--slack-app-token-env VAR",
                        )?;
                        let cfg = chitin_channels::slack::SlackConfig::socket(z(&bot), z(&app));
                        creds.push(("app_token", name_for("app_token")?, app));
                        extra.push_str("mode = \"socket\"\n");
                        cfg
                    }
                    SlackModeChoice::Events => {
                        let signing = secret(
                            "the signing secret",
                            &args.slack_signing_secret_env,
                            "Slack signing secret (Basic Information)",
                            "--slack-signing-secret-env VAR",
                        )?;
                        let cfg = chitin_channels::slack::SlackConfig::events(z(&bot), z(&signing));
                        creds.push(("signing_secret", name_for("signing_secret")?, signing));
                        extra.push_str("mode = \"events\"\n");
                        slack_events = true;
                        cfg
                    }
                };
                // The same checks the gateway makes (token forms, API root); nothing is sent.
                crate::providers::init_tls();
                let mut cfg = cfg.map_err(|e| format!("Slack: {e}"))?;
                cfg.api_base = reqwest::Url::parse(&api).map_err(|e| format!("{api}: {e}"))?;
                chitin_channels::slack::Slack::new(cfg).map_err(|e| format!("Slack: {e}"))?;
                creds.insert(0, ("bot_token", name_for("bot_token")?, bot));
            }
            ChannelChoice::Discord => {
                let token = secret(
                    "the bot token",
                    &args.channel_token_env,
                    "Discord bot token (Developer Portal, Bot; enable the Message Content intent)",
                    "--channel-token-env VAR",
                )?;
                let mut cfg = chitin_channels::discord::DiscordConfig::new(
                    zeroize::Zeroizing::new(token.expose_str().unwrap_or("").to_string()),
                )
                .map_err(|e| format!("Discord: {e}"))?;
                cfg.api_base = reqwest::Url::parse(&api).map_err(|e| format!("{api}: {e}"))?;
                chitin_channels::discord::Discord::new(cfg).map_err(|e| format!("Discord: {e}"))?;
                creds.push(("token", name_for("token")?, token));
            }
            _ => {
                let token = secret(
                    "the bot token",
                    &args.channel_token_env,
                    "Telegram bot token (from @BotFather)",
                    "--channel-token-env VAR",
                )?;
                creds.push(("token", name_for("token")?, token));
            }
        }
        text.push_str(&format!(
            "\n[[channels]]\nname = {}\nkind = {}\n",
            toml_str(&cname),
            toml_str(kind)
        ));
        for (key, name, _) in &creds {
            text.push_str(&format!(
                "{key} = {}\n",
                toml_str(&format!("secret:{}", name.as_str()))
            ));
        }
        text.push_str(&extra);
        if args.channel_api_base.is_some() {
            text.push_str(&format!("api_base = {}\n", toml_str(&api)));
        }
        for (_, name, value) in creds {
            credentials.push(Credential {
                name,
                value,
                audience: audience.clone(),
            });
        }
        channel_name = Some(cname);
    }

    // 3. The budget.
    let budget = match args.budget_usd {
        Some(b) => b,
        None if interactive => {
            let a = ask.line(
                "Daily budget per user in USD (0: no limit)",
                "0",
                "--budget-usd",
            )?;
            a.parse::<f64>()
                .map_err(|_| format!("`{a}` is not a number of USD"))?
        }
        None => current.budgets.daily_usd_per_user,
    };
    if !budget.is_finite() || budget < 0.0 {
        return Err("the budget must be 0 or more USD".into());
    }
    text = set_in_table(
        &text,
        "budgets",
        "daily_usd_per_user",
        &format!("{budget:?}"),
    );
    // The whole result must be a valid config before anything is written.
    let final_config = Config::parse(&text, &globals.config_path)?;

    // 4. Write: the credentials (Cedar `secret.set`, each audited before it is stored), then
    //    the config (atomically).
    let mut store = crate::secrets::SecretStore::open(&globals.home, &current.secrets)?;
    let gate = super::admin_gate(globals, &current, &mut store)?;
    let audit = Arc::clone(gate.audit());
    if !credentials.is_empty()
        && let Some(refused) =
            super::operator_may(&gate, &current, crate::policy::Action::SecretSet)?
    {
        audit.shutdown()?;
        return Ok(refused);
    }
    for c in &credentials {
        store.check_set(&c.name, &c.value, std::slice::from_ref(&c.audience))?;
    }
    for c in credentials {
        audit
            .record_change("set", Some(&c.name), "cli:onboard")
            .map_err(|e| format!("audit record could not be written ({e}); nothing changed"))?;
        store.set(&c.name, c.value, std::slice::from_ref(&c.audience))?;
        println!("stored secret `{}` (audience: {})", c.name, c.audience);
    }
    audit
        .append(chitin_audit::RecordInput::admin(
            "cli:onboard",
            "config.onboard",
            globals.config_path.display().to_string(),
            json!({"model": final_config.agent.model, "provider": name,
                   "channel": channel_name, "budget_usd": budget}),
        ))
        .map_err(|e| {
            format!("audit record could not be written ({e}); the config was not changed")
        })?;
    crate::state::write_atomic(&globals.config_path, text.as_bytes())?;
    audit.shutdown()?;
    drop((gate, store));
    println!(
        "wrote {}: model {}, daily budget {}",
        globals.config_path.display(),
        final_config.agent.model,
        if budget > 0.0 {
            format!("{budget} USD per user")
        } else {
            "none".into()
        }
    );

    // 5. Pairing: the bot answers a first message with a code, approved here.
    let code = match (&args.pair, &channel_name) {
        (Some(c), _) => Some(c.clone()),
        (None, Some(cname)) if interactive => {
            if slack_events {
                println!(
                    "In the Slack app's settings, set the Events API Request URL to https://<this gateway's public address>/channels/{cname}/events and Interactivity to /channels/{cname}/interactivity."
                );
            }
            println!(
                "Start the gateway in another terminal (`chitin gateway`) and send your bot a message on {cname}; it answers with a pairing code."
            );
            let c = ask.line("Pairing code (Enter to skip)", "", "--pair")?;
            (!c.is_empty()).then_some(c)
        }
        _ => None,
    };
    let mut code_result = ExitCode::SUCCESS;
    if let Some(code) = code {
        code_result = super::pairing::run_pairing(
            super::pairing::PairingCmd::Approve {
                code,
                user: args.pair_user.clone(),
            },
            globals,
        )?;
    } else if let Some(cname) = &channel_name {
        if slack_events {
            println!(
                "Slack posts events to https://<this gateway's public address>/channels/{cname}/events (set it as the app's Request URL, and Interactivity to /channels/{cname}/interactivity)"
            );
        }
        println!(
            "pair later: message the bot on {cname}, then `chitin pairing approve CODE` (`chitin pairing list` shows open codes)"
        );
    }
    let bind = final_config.gateway.bind.clone();
    println!(
        "next: `chitin gateway`, then open http://{bind}/ (the token: `chitin token show`); `chitin status` shows how it runs"
    );
    Ok(code_result)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests")]
    use super::*;

    #[test]
    fn set_in_table_replaces_the_key_in_its_table_only_and_keeps_comments() {
        let text =
            "[agent]\n# The model\nmodel = \"\"\nmax_steps = 16\n\n[budgets]\nmodel = \"x\"\n";
        let out = set_in_table(text, "agent", "model", "\"p/m\"");
        assert_eq!(
            out,
            "[agent]\n# The model\nmodel = \"p/m\"\nmax_steps = 16\n\n[budgets]\nmodel = \"x\"\n"
        );
        let out = set_in_table(text, "budgets", "daily_usd_per_user", "5.0");
        assert!(
            out.contains("[budgets]\ndaily_usd_per_user = 5.0\nmodel = \"x\""),
            "{out}"
        );
        let out = set_in_table("[cli]\n", "agent", "model", "\"a/b\"");
        assert_eq!(out, "[cli]\n\n[agent]\nmodel = \"a/b\"\n");
        // A commented-out key is not the key.
        let out = set_in_table("[agent]\n# model = \"old\"\n", "agent", "model", "\"n/m\"");
        assert_eq!(out, "[agent]\nmodel = \"n/m\"\n# model = \"old\"\n");
    }
}
